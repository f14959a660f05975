"""The ``nnunet:`` section of the config, typed: what every FSL-nnUNet step reads.

Why: the defaults live in ``configs/ssl_medsam2.yaml`` only; a config lacking a key fails here, naming
it (:func:`ssl_medsam2.config.section`), and a bad value fails before any work, naming the key.
Values that ``state.json`` records (the run's fingerprint, ``min_change``) are kept as configured, so a
resumed run compares them exactly as before; the others are converted to their type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from ..config import Section
from . import trainers
from .schedule import OVERRIDE_KEYS, Schedule, parse

#: nnU-Net v2's configurations (what its planner can make)
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
#: ``all`` (train on every case) or a fold of nnU-Net's 5-fold split
FOLDS = ("all", "0", "1", "2", "3", "4")
GATE_MODES = ("holdout", "off")


def _number(name: str, v, kind=float, at_least=None, optional=False):
    """``v`` as ``kind`` (None allowed when ``optional``); ValueError naming ``nnunet.<name>`` otherwise."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"nnunet.{name} must be a number, got {v!r}")
    try:
        out = kind(v)
    except ValueError:
        raise ValueError(f"nnunet.{name} must be a number, got {v!r}") from None
    if at_least is not None and out < at_least:
        raise ValueError(f"nnunet.{name} must be >= {at_least}, got {v!r}")
    return out


@dataclass(frozen=True)
class NnUNetSettings(Section):
    """The ``nnunet:`` section (what each key means: configs/ssl_medsam2.yaml). No defaults here."""

    SECTION = "nnunet"
    configuration: str
    fold: str | int
    schedule: str
    schedules: dict
    epochs: int | None
    iterations_per_epoch: int | None
    val_iterations: int | None
    speed_probe_iterations: int
    checkpoint_every: int
    device: str | None
    num_gpus: int
    cpu_threads: int | None
    num_workers: int
    num_processes: int
    gpu_memory_target: float | None
    use_mirroring: bool
    compile: bool
    max_rounds: int
    min_change: float | None
    fine_tune: bool
    ignore_entropy_threshold: float | None
    quality_gate: str | bool | None
    gate_cases: int
    gate_tolerance: float
    keep_intermediate: bool
    seed: int | None

    def __post_init__(self):
        if self.configuration not in CONFIGURATIONS:
            raise ValueError(f"nnunet.configuration must be one of {', '.join(CONFIGURATIONS)}, "
                             f"got {self.configuration!r}")
        if str(self.fold) not in FOLDS:
            raise ValueError(f"nnunet.fold must be all or 0..4, got {self.fold!r}")
        parse(self.schedule)  # auto | short | full | minutes:N, else a ValueError naming nnunet.schedule
        for name in ("short", "full"):
            preset = (self.schedules or {}).get(name)
            if not isinstance(preset, Mapping):
                raise ValueError(f"nnunet.schedules.{name} is missing from the config")
            for k in OVERRIDE_KEYS:
                _number(f"schedules.{name}.{k}", preset.get(k), int, at_least=1)
        for k in OVERRIDE_KEYS:
            _number(k, getattr(self, k), int, at_least=1, optional=True)
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"nnunet.quality_gate must be one of {', '.join(GATE_MODES)}, got {self.quality_gate!r}")
        for name in ("gpu_memory_target", "min_change", "ignore_entropy_threshold"):
            _number(name, getattr(self, name), optional=True)
        _number("gate_cases", self.gate_cases, int)
        for name, at_least in (("speed_probe_iterations", 1), ("checkpoint_every", 1), ("num_gpus", 1),
                               ("num_workers", 0), ("num_processes", 0), ("max_rounds", 0)):
            self._set(**{name: _number(name, getattr(self, name), int, at_least=at_least)})
        self._set(cpu_threads=_number("cpu_threads", self.cpu_threads, int, at_least=0, optional=True),
                  seed=_number("seed", self.seed, int, optional=True),
                  gate_tolerance=_number("gate_tolerance", self.gate_tolerance),
                  **{name: bool(getattr(self, name)) for name in ("use_mirroring", "compile", "keep_intermediate")})

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def fold_id(self) -> str | int:
        """The fold as nnU-Net takes it: ``"all"`` or an int."""
        return "all" if str(self.fold) == "all" else int(self.fold)

    def torch_device(self):
        """``device`` resolved (auto: CUDA when present), as a ``torch.device``."""
        from ..devices import resolve_device

        return resolve_device(self.device)

    @property
    def gate_mode(self) -> str:
        """``holdout`` or ``off`` (YAML reads a bare ``off`` as False)."""
        return "off" if self.quality_gate in (False, None) else str(self.quality_gate)

    @property
    def trainer_name(self) -> str:
        """The trainer class nnU-Net resolves for this schedule (epochs etc. filled: :meth:`with_schedule`)."""
        return trainers.trainer_name(self.epochs, self.iterations_per_epoch, self.val_iterations)

    def with_schedule(self, schedule: Schedule) -> "NnUNetSettings":
        """These settings with the schedule's epochs / iterations filled in (what training and the trainer
        name use)."""
        return dataclasses.replace(self, epochs=schedule.epochs, iterations_per_epoch=schedule.iterations_per_epoch,
                                   val_iterations=schedule.val_iterations)
