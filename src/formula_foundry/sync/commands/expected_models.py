"""The logged models a destination should hold for one spooled run (``model_*`` events).

Part of ``verify``'s reference (:mod:`formula_foundry.sync.commands.expected`). The events are
folded by the one reading of them (:mod:`formula_foundry.tracking.model_events`), which the
replay and the drop-in share; what the destination adds is added here: the tag
``ff.model_id`` a created model carries (``ModelSpec.creation_tags``), and files it refused
(quarantined as ``refused``) are not expected. Events the replay quarantines are not expected.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TypeAlias

from formula_foundry.errors import ValidationError
from formula_foundry.sync.engine.payloads import InvalidRecord, PayloadChecker
from formula_foundry.sync.engine.sink import ArtifactRef
from formula_foundry.tracking.events import K_MODEL_START, MODEL_ID_TAG
from formula_foundry.tracking.model_events import ModelState
from formula_foundry.tracking.model_events import fold_model_event as fold
from formula_foundry.tracking.spool_reader import Event

# The destination model one spooled model should have become.
ExpectedModel: TypeAlias = ModelState[ArtifactRef]


def fold_model_event(
    models: dict[str, ExpectedModel],
    ev: Event,
    check: PayloadChecker,
    refused: Collection[tuple[str, int]],
    path: str,
) -> None:
    """Apply one ``model_*`` event of the segment at ``path`` to ``models``;
    :class:`InvalidRecord` if the replay quarantines it (nothing applied)."""
    mid = ev.data.get("model")
    created = ev.kind == K_MODEL_START and mid not in models
    try:
        # A segment lives in its run's folder (scan): the folder names the source run.
        fold(models, Path(path).parent.name, ev, check, keep_file=(path, ev.offset) not in refused)
    except ValidationError as exc:
        raise InvalidRecord(str(exc)) from None
    if created and isinstance(mid, str):
        models[mid].tags[MODEL_ID_TAG] = mid  # how the replay finds it again
