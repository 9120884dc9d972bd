"""Determinism settings: one base seed, one derived seed per PRNG, and what strict mode sets.

NumPy and PyTorch are optional: they are looked up with :func:`importlib.util.find_spec` and only
imported inside :meth:`DeterminismConfig.apply`, so importing the substrate never pulls them in.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from formula_foundry.substrate.errors import InvalidDeterminismConfig

__all__ = [
    "DEFAULT_CUBLAS_WORKSPACE_CONFIG",
    "MODES",
    "PRNGS",
    "AppliedDeterminism",
    "DeterminismConfig",
    "DeterminismMode",
    "available_prngs",
    "derive_seed",
]

DeterminismMode = Literal["strict", "relaxed", "off"]
MODES: Final[tuple[str, ...]] = ("strict", "relaxed", "off")
# Order matters only for display; each PRNG's seed depends on its name, not its position.
PRNGS: Final[tuple[str, ...]] = ("python", "numpy", "torch")
_PRNG_MODULES: Final = {"python": "random", "numpy": "numpy", "torch": "torch"}

# The smaller of the two settings NVIDIA documents for deterministic cuBLAS.
DEFAULT_CUBLAS_WORKSPACE_CONFIG: Final = ":4096:8"
_CUBLAS_RE: Final = re.compile(r"(?::[0-9]+:[0-9]+)+")
_MAX_SEED: Final = 2**64 - 1


def derive_seed(base_seed: int, prng: str) -> int:
    """The seed for ``prng``: 32 bits of SHA-256 over a versioned label, the name and the base.

    32 bits because ``numpy.random.seed`` rejects larger values; hashing (rather than
    ``base + k``) keeps the streams of different PRNGs unrelated.
    """
    label = f"formula-foundry/seed/v1/{prng}/{base_seed}".encode()
    return int.from_bytes(hashlib.sha256(label).digest()[:4], "big")


def available_prngs() -> tuple[str, ...]:
    """The PRNGs whose library is installed here (``python`` always is)."""
    return tuple(
        name
        for name in PRNGS
        if name == "python" or importlib.util.find_spec(_PRNG_MODULES[name]) is not None
    )


@dataclass(frozen=True)
class AppliedDeterminism:
    """What :meth:`DeterminismConfig.apply` did: PRNGs seeded, variables set, caveats."""

    mode: str
    seeded: tuple[str, ...]
    environment: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeterminismConfig:
    """How deterministic a run must be, and the base seed its PRNG seeds derive from.

    ``mode``:
      * ``"strict"`` — seed every installed PRNG and turn on deterministic algorithms
        (``CUBLAS_WORKSPACE_CONFIG``, ``torch.use_deterministic_algorithms(True)``,
        cuDNN deterministic, ``PYTHONHASHSEED`` for child processes). Needs ``seed``.
      * ``"relaxed"`` — seed every installed PRNG, leave algorithm choice alone. Needs ``seed``.
      * ``"off"`` — touch nothing; ``seed`` is optional and only recorded.

    ``seed`` is an int in ``[0, 2**64)``. ``cublas_workspace_config`` has the form
    ``:<size>:<count>`` (repeatable); strict mode defaults it to ``":4096:8"``.
    """

    mode: DeterminismMode
    seed: int | None = None
    cublas_workspace_config: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise InvalidDeterminismConfig(
                f"invalid determinism mode {self.mode!r}; expected one of {', '.join(MODES)}"
            )
        seed = self.seed
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED
        ):
            raise InvalidDeterminismConfig(
                f"invalid seed {seed!r}; expected an int between 0 and 2**64-1"
            )
        if seed is None and self.mode != "off":
            raise InvalidDeterminismConfig(
                f"determinism mode {self.mode!r} needs a seed; pass seed=<int>"
            )
        cublas = self.cublas_workspace_config
        if cublas is not None and (
            not isinstance(cublas, str) or _CUBLAS_RE.fullmatch(cublas) is None
        ):
            raise InvalidDeterminismConfig(
                f"invalid cublas_workspace_config {cublas!r}; expected e.g. ':4096:8' or ':16:8'"
            )

    @property
    def seeds(self) -> dict[str, int]:
        """One derived seed per known PRNG (installed or not), empty when there is no seed."""
        if self.seed is None:
            return {}
        return {name: derive_seed(self.seed, name) for name in PRNGS}

    @property
    def effective_cublas_workspace_config(self) -> str | None:
        """The value strict mode puts in ``CUBLAS_WORKSPACE_CONFIG`` (``None`` outside strict
        unless one was given explicitly)."""
        if self.cublas_workspace_config is not None:
            return self.cublas_workspace_config
        return DEFAULT_CUBLAS_WORKSPACE_CONFIG if self.mode == "strict" else None

    def apply(self) -> AppliedDeterminism:
        """Seed the installed PRNGs and, in strict mode, enable deterministic algorithms.

        Call it early, before CUDA is initialised: cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG``
        when its first handle is created. ``PYTHONHASHSEED`` cannot change the running
        interpreter; strict mode sets it for child processes and says so in ``notes``.
        """
        if self.mode == "off" or self.seed is None:
            return AppliedDeterminism(mode=self.mode, seeded=())
        seeds = self.seeds
        env: dict[str, str] = {}
        notes: list[str] = []

        cublas = self.effective_cublas_workspace_config
        if cublas is not None:
            previous = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
            if previous not in (None, cublas):
                notes.append(f"CUBLAS_WORKSPACE_CONFIG was {previous!r}, replaced by {cublas!r}")
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = env["CUBLAS_WORKSPACE_CONFIG"] = cublas
        if self.mode == "strict":
            _strict_hash_seed(seeds["python"], env, notes)

        random.seed(seeds["python"])
        seeded = ["python"]
        if importlib.util.find_spec("numpy") is not None:
            numpy: Any = importlib.import_module("numpy")
            numpy.random.seed(seeds["numpy"])
            seeded.append("numpy")
        if importlib.util.find_spec("torch") is not None:
            torch: Any = importlib.import_module("torch")
            torch.manual_seed(seeds["torch"])  # also seeds every CUDA device
            if self.mode == "strict":
                torch.use_deterministic_algorithms(True)
                torch.backends.cudnn.deterministic = True
                torch.backends.cudnn.benchmark = False
            seeded.append("torch")
        return AppliedDeterminism(
            mode=self.mode, seeded=tuple(seeded), environment=env, notes=tuple(notes)
        )


def _strict_hash_seed(python_seed: int, env: dict[str, str], notes: list[str]) -> None:
    current = os.environ.get("PYTHONHASHSEED")
    if current is None or current == "random":
        os.environ["PYTHONHASHSEED"] = env["PYTHONHASHSEED"] = str(python_seed)
        notes.append(
            "PYTHONHASHSEED set for child processes only; this interpreter keeps randomised "
            "str hashes — start Python with PYTHONHASHSEED=<n> for reproducible set order"
        )
