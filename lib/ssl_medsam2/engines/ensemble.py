"""Ensemble of few-shot engines (SAM2 + atlas by default): the mean of their probabilities.

Why: SAM2 propagation and atlas registration fail in different ways (SAM2 leaks or drops slices,
registration misplaces boundaries), so their mean is usually better than either, and where they
disagree the mean probability sits near 0.5 and the entropy rises: exactly the voxels (and volumes)
an annotator should look at. Each engine counts once, whatever its number of internal runs.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..metrics import dice
from .base import Case, EngineResult, FewShotEngine, ProgressFn


class EnsembleEngine:
    """Weighted mean of member engines' per-class probabilities (equal weights by default)."""

    name = "ensemble"

    def __init__(self, engines: Sequence[FewShotEngine], weights: Sequence[float] | None = None):
        if len(engines) == 0:
            raise ValueError("an ensemble needs at least one engine")
        w = np.ones(len(engines)) if weights is None else np.asarray(weights, dtype=float)
        if w.shape != (len(engines),) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"ensemble weights {list(w)} must be non-negative, one per engine, not all zero")
        self.engines = list(engines)
        self.weights = w / w.sum()

    def work_units(self, supports: Sequence[Case], query: Case, classes: Sequence[int]) -> int:
        return sum(e.work_units(supports, query, classes) for e in self.engines)

    def predict(self, supports: Sequence[Case], query: Case, classes: Sequence[int],
                progress: ProgressFn | None = None) -> EngineResult:
        classes = tuple(int(c) for c in classes)
        results: list[EngineResult] = []
        timings = {}
        for e in self.engines:
            t0 = time.perf_counter()
            r = e.predict(supports, query, classes, progress=progress)
            timings[f"{e.name}_s"] = round(time.perf_counter() - t0, 3)
            if tuple(r.classes) != classes:
                raise RuntimeError(f"engine {e.name} returned classes {r.classes}, expected {classes}")
            if r.probs.shape != (len(classes),) + query.image.shape:
                raise RuntimeError(f"engine {e.name} returned probabilities of shape {r.probs.shape}, "
                                   f"expected {(len(classes),) + query.image.shape}")
            results.append(r)
        probs = np.zeros_like(results[0].probs, dtype=np.float32)
        for w, r in zip(self.weights, results):
            probs += np.float32(w) * r.probs.astype(np.float32)
        # how much the members agree, per class (Dice of their 0.5-thresholded masks)
        agreement = {}
        if len(results) >= 2:
            for k, c in enumerate(classes):
                agreement[str(c)] = dice(results[0].probs[k] > 0.5, results[1].probs[k] > 0.5)
        meta = {
            "members": {e.name: {"n_runs": r.n_runs, "weight": float(w), **r.meta}
                        for e, r, w in zip(self.engines, results, self.weights)},
            "member_agreement_dice": agreement,
            "doubts": [f"{e.name}: {d}" for e, r in zip(self.engines, results) for d in r.meta.get("doubts") or []],
            "random_weights": any(bool(r.meta.get("random_weights", False)) for r in results),
            "timings": timings,
        }
        return EngineResult(np.clip(probs, 0.0, 1.0), classes, sum(r.n_runs for r in results), meta)
