"""The destination's identity tags (:mod:`formula_foundry.sync.engine.destination_id`) as the MLflow
adapter keeps them: tags of the ``Default`` experiment, or of
:data:`~formula_foundry.sync.engine.destination_id.FALLBACK_EXPERIMENT` where that one is deleted or
cannot be tagged. A user who may not read or tag them (a server with per-experiment
permissions) gets :class:`~formula_foundry.sync.engine.sink.IdentityUnavailable`: the pass then goes
on without the identity checks. Works on the adapter's client; imports no MLflow itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from formula_foundry.errors import FormulaFoundryError
from formula_foundry.sync.engine.destination_id import (
    FALLBACK_EXPERIMENT,
    IDENTITY_EXPERIMENT_ID,
    TAG_PREFIX,
)
from formula_foundry.sync.engine.sink import DestinationRejected, IdentityUnavailable

T = TypeVar("T")


class IdentityTags:
    """Mixin of :class:`~formula_foundry.sync.mlflow.client_sink.MlflowSink`."""

    description: str
    _client: Any
    _identity_exp: str | None

    def classify(self, exc: BaseException, what: str) -> FormulaFoundryError | None:
        raise NotImplementedError

    def _experiment_id(self, name: str, create: bool) -> str | None:
        raise NotImplementedError

    def identity_tags(self) -> dict[str, str]:
        """The ``ff.sync.*`` tags of the identity experiment (see :meth:`set_identity_tag`)."""
        self._identity_exp = None
        what = "read the destination's identity"
        fallback = self._identity_call(
            what, lambda: self._client.get_experiment_by_name(FALLBACK_EXPERIMENT)
        )
        candidates: list[Any] = [fallback]
        try:
            candidates.append(self._client.get_experiment(IDENTITY_EXPERIMENT_ID))
        except Exception as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise self._identity_error(exc, what) from exc
        for exp in candidates:
            if exp is not None and exp.lifecycle_stage == "active":
                self._identity_exp = str(exp.experiment_id)
                return {k: v for k, v in exp.tags.items() if k.startswith(TAG_PREFIX)}
        return {}

    def set_identity_tag(self, key: str, value: str) -> None:
        """Tag the experiment :meth:`identity_tags` read; ``Default`` if it found none, or,
        where that one is deleted or cannot be tagged, :data:`FALLBACK_EXPERIMENT`."""
        eid = self._identity_exp or IDENTITY_EXPERIMENT_ID
        what = "record the destination's identity"
        try:
            self._client.set_experiment_tag(eid, key, value)
            self._identity_exp = eid
            return
        except Exception as exc:
            code = getattr(exc, "error_code", None)
            usable = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED"}
            if eid != IDENTITY_EXPERIMENT_ID or code not in usable:
                raise self._identity_error(exc, what) from exc
        fallback = self._identity_call(
            what, lambda: self._experiment_id(FALLBACK_EXPERIMENT, create=True)
        )
        if fallback is None:  # pragma: no cover - create=True returns an id or raises
            raise DestinationRejected(f"{self.description}: could not {what}")
        self._identity_exp = fallback
        self._identity_call(what, lambda: self._client.set_experiment_tag(fallback, key, value))

    def _identity_call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except FormulaFoundryError as exc:
            if isinstance(exc.__cause__, Exception) and _denied(exc.__cause__):
                raise IdentityUnavailable(f"{self.description}: {what}: permission denied") from exc
            raise
        except Exception as exc:
            raise self._identity_error(exc, what) from exc

    def _identity_error(self, exc: Exception, what: str) -> Exception:
        """A refusal for lack of permission (another user's experiment on a server with
        per-experiment permissions) turns the identity checks off, nothing else does."""
        if _denied(exc):
            return IdentityUnavailable(f"{self.description}: {what}: permission denied")
        return self.classify(exc, what) or exc


def _denied(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) == "PERMISSION_DENIED"
