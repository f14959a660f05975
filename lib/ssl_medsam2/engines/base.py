"""The one small interface every few-shot engine implements: supports + query in, probabilities out.

Engines never write files and never threshold: they return, on the query's canonical grid, the mean
per-class foreground probability over all their runs. Turning that into a label map, an
uncertainty map and files is the job of :mod:`ssl_medsam2.protocol`, :mod:`ssl_medsam2.uncertainty`
and :mod:`ssl_medsam2.pseudo_label`, so every engine (SAM2, atlas, their ensemble) is post-processed
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from ..io import InputError, Volume


@dataclass
class Case:
    """An image, optionally with its label map on the same grid (supports have one, queries do not)."""

    image: Volume
    label: Volume | None = None

    @property
    def name(self) -> str:
        return self.image.name


@dataclass
class EngineResult:
    """Per-class mean foreground probability on the query's canonical grid.

    ``probs[i]`` is the probability of ``classes[i]``; shape (C, X, Y, Z), float32 in [0, 1].
    ``meta`` holds what the JSON summary reports (runs, weights, timings, engine settings).
    """

    probs: np.ndarray
    classes: tuple[int, ...]
    n_runs: int
    meta: dict = field(default_factory=dict)


ProgressFn = Callable[[int], None]  # called with the number of finished units of work


@runtime_checkable
class FewShotEngine(Protocol):
    name: str

    def predict(self, supports: Sequence[Case], query: Case, classes: Sequence[int],
                progress: ProgressFn | None = None) -> EngineResult:
        ...

    def work_units(self, supports: Sequence[Case], query: Case, classes: Sequence[int]) -> int:
        """How many times ``predict`` will call ``progress(1)`` (for progress bars)."""
        ...


@runtime_checkable
class CampaignEngine(Protocol):
    """An engine that gains from several queries in one call (the batched SAM2 engine: their runs share
    its steps). Optional: the folder command and the Ray workers ask through :func:`campaign_size` and
    :func:`predict_queries`, so any other engine runs one query per call."""

    def campaign_size(self) -> int:
        """How many queries one :meth:`predict_campaign` call should get (1: no gain)."""
        ...

    def predict_campaign(self, supports: Sequence[Case], queries: Sequence[Case], classes: Sequence[int],
                         progress: ProgressFn | None = None) -> list[EngineResult]:
        """Each query's result, as :meth:`FewShotEngine.predict` would give it."""
        ...


def campaign_size(engine: FewShotEngine) -> int:
    """Queries per call the engine wants: its :meth:`CampaignEngine.campaign_size`, else 1."""
    return max(1, int(engine.campaign_size())) if isinstance(engine, CampaignEngine) else 1


def predict_queries(engine: FewShotEngine, supports: Sequence[Case], queries: Sequence[Case],
                    classes: Sequence[int], progress: ProgressFn | None = None) -> list[EngineResult]:
    """Every query's result: in one campaign call where the engine takes several, else one by one."""
    if isinstance(engine, CampaignEngine):
        return engine.predict_campaign(supports, queries, classes, progress)
    return [engine.predict(supports, q, classes, progress=progress) for q in queries]


def check_supports(supports: Sequence[Case], classes: Sequence[int]) -> None:
    """Every engine's input contract: at least one support, each with a non-empty label on its grid."""
    if len(supports) == 0:
        raise InputError(None, "no support volume: at least one labelled volume is needed")
    for s in supports:
        if s.label is None:
            raise InputError(s.image.path, "support volume has no label map")
        if s.label.shape != s.image.shape:
            raise InputError(s.label.path, f"label shape {s.label.shape} does not match image {s.image.shape}")
        present = set(np.unique(s.label.array).tolist()) - {0}
        if not present:
            raise InputError(s.label.path, "support mask is empty (no foreground voxel)")
        if classes and not present & set(int(c) for c in classes):
            raise InputError(s.label.path, f"support mask has none of the requested classes {list(classes)}"
                                           f" (it has {sorted(present)})")


def classes_in(supports: Sequence[Case]) -> tuple[int, ...]:
    """All foreground class ids present in any support label."""
    found: set[int] = set()
    for s in supports:
        if s.label is not None:
            found |= set(int(v) for v in np.unique(s.label.array)) - {0}
    return tuple(sorted(found))
