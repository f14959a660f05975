"""How long each round trains: ``nnunet.schedule: auto | short | full | minutes:N``.

A schedule is epochs x iterations per epoch (+ validation iterations per epoch); nnU-Net's own default
(1000 x 250) is a day of GPU time per model, far too long for a labelling campaign that retrains
every few labels, and the old fixed 20 x 25 left GPU users with under-trained models. So:

- ``short`` (``nnunet.schedules.short``, 20 x 25 + 5): sized for a CPU; a plumbing-and-trend
  schedule, not a converged model.
- ``full`` (``nnunet.schedules.full``, 100 x 250 + 50 = 25,000 iterations): nnU-Net's own network,
  loss and augmentation for the length of nnU-Net's shipped ``nnUNetTrainer_100epochs`` variant.
  On one H200 a 2d iteration costs ~0.05-0.1 s, so a round is ~20-40 min: a campaign can retrain
  between annotation sessions. It is 20x the 1,200 iterations that already lifted held-out liver Dice
  from 0.79 (500 iterations) to 0.87 on 8 CHAOS volumes, without the 250,000 of the default.
- ``auto``: ``full`` on CUDA, ``short`` on CPU.
- ``minutes:N``: N minutes of training per round on this machine: the epochs follow from a speed
  measured over the first iterations (iterations per epoch from the device's ``auto`` schedule).

Explicit ``nnunet.epochs`` / ``iterations_per_epoch`` / ``val_iterations`` override the schedule's.
The resolved schedule (and the speed it was sized with) is recorded in the run's state, so a resumed
run keeps it even on another machine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

MODES = ("auto", "short", "full")
_MINUTES = re.compile(r"^minutes:(\d+(?:\.\d+)?)$")
#: a validation iteration (forward pass only) costs about this fraction of a training iteration
VAL_COST = 0.5
OVERRIDE_KEYS = ("epochs", "iterations_per_epoch", "val_iterations")


@dataclass(frozen=True)
class Schedule:
    spec: str  # as configured: auto | short | full | minutes:N
    name: str  # what it resolved to: short | full | minutes:N
    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    reason: str  # why, in words
    it_per_s: float | None = None  # measured training speed it was sized / estimated with

    @property
    def iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch

    def seconds(self, it_per_s: float | None = None) -> float | None:
        """Estimated training seconds for one round at ``it_per_s`` (default: the measured speed)."""
        speed = it_per_s or self.it_per_s
        if not speed:
            return None
        return self.epochs * (self.iterations_per_epoch + VAL_COST * self.val_iterations) / float(speed)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["iterations"] = self.iterations
        s = self.seconds()
        d["estimated_minutes_per_round"] = None if s is None else round(s / 60, 1)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def describe(self, max_rounds: int | None = None) -> str:
        """One line: what was chosen, why, and roughly how long it will take."""
        line = (f"nnU-Net schedule {self.name} ({self.reason}): {self.epochs} epochs x {self.iterations_per_epoch} "
                f"iterations (+{self.val_iterations} validation) = {self.iterations} training iterations per round")
        s = self.seconds()
        if s is not None:
            line += f"; measured {self.it_per_s:.2f} it/s -> ~{_minutes(s)} of training per round"
            if max_rounds and max_rounds > 1:
                line += f", up to ~{_minutes(s * max_rounds)} for {max_rounds} rounds (+ predictions)"
        return line


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def parse(spec) -> tuple[str, float | None]:
    """``auto|short|full`` -> (mode, None); ``minutes:N`` -> ("minutes", N). Anything else: ValueError."""
    s = str(spec or "auto").strip().lower()
    if s in MODES:
        return s, None
    m = _MINUTES.match(s)
    if m and float(m.group(1)) > 0:
        return "minutes", float(m.group(1))
    raise ValueError(f"nnunet.schedule must be auto, short, full or minutes:N (N > 0), got {spec!r}")


def epochs_for_minutes(minutes: float, it_per_s: float, iterations_per_epoch: int, val_iterations: int) -> int:
    """Whole epochs that fit ``minutes`` of training at ``it_per_s`` (at least 1)."""
    if not it_per_s or it_per_s <= 0:
        raise ValueError("minutes:N needs a measured training speed (iterations per second > 0)")
    per_epoch_s = (int(iterations_per_epoch) + VAL_COST * int(val_iterations)) / float(it_per_s)
    return max(1, int(math.floor(minutes * 60.0 / per_epoch_s)))


class ScheduleSettings(Protocol):
    """What :func:`resolve` reads of the ``nnunet:`` settings (:class:`.settings.NnUNetSettings` has it; the
    settings import this module, so this module names only the keys it reads)."""

    schedule: str
    schedules: Mapping
    epochs: int | None
    iterations_per_epoch: int | None
    val_iterations: int | None


def resolve(settings: ScheduleSettings, device_type: str, it_per_s: float | None = None) -> Schedule:
    """The schedule for these settings on a ``device_type`` ("cuda" / "cpu") machine.

    ``it_per_s``: the measured training speed (needed for ``minutes:N``; otherwise only for the estimate).
    The settings check that both presets exist (:class:`.settings.NnUNetSettings`).
    """
    spec = str(settings.schedule or "auto")
    mode, minutes = parse(spec)
    presets = settings.schedules
    device_pick = "full" if device_type == "cuda" else "short"
    if mode == "auto":
        name, base = device_pick, presets[device_pick]
        reason = (f"schedule auto on {device_type.upper() if device_type == 'cuda' else 'CPU'}: "
                  + ("nnU-Net-like length that fits a campaign round" if name == "full"
                     else "the CPU-sized schedule; a GPU gets 'full'"))
    elif mode == "minutes":
        base = dict(presets[device_pick])
        base["epochs"] = epochs_for_minutes(minutes, it_per_s, base["iterations_per_epoch"], base["val_iterations"])
        name = f"minutes:{minutes:g}"
        reason = (f"{minutes:g} min of training per round at the measured speed; not counted: export, "
                  f"plan + preprocess, the speed probe and predicting every case, which come on top (each round's "
                  f"log line gives the split)")
    else:
        name, base = mode, presets[mode]
        reason = f"schedule {mode}"
    values = {k: int(base[k]) for k in OVERRIDE_KEYS}
    over = {k: int(getattr(settings, k)) for k in OVERRIDE_KEYS if getattr(settings, k) is not None}
    if over:
        values.update(over)
        reason += "; overridden: " + ", ".join(f"{k}={v}" for k, v in over.items())
    for k, v in values.items():
        if v < 1:
            raise ValueError(f"nnunet.{k} must be >= 1, got {v}")
    return Schedule(spec=spec, name=name, reason=reason, it_per_s=it_per_s, **values)
