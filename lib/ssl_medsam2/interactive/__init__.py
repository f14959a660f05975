"""Interactive correction: an annotator's clicks and scribbles turn a base label into a better one.

The contract between the library and the app (the app converts client coordinates once, at the edge):
every array here is in the canonical (RAS+) voxel order of :class:`ssl_medsam2.io.Volume`, and points
are integer voxel indices into it. The result is recomputed from the base mask plus every click in the
request (no hidden state between requests: deleting a point in the client is the undo).

- :func:`prepare` does the per-image work once (normalisation, spacing); the app caches its result per
  client and image.
- :func:`correct` returns the corrected binary mask of one organ; only voxels within a bounded region
  around the clicks / scribbles may differ from ``base``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

Point = Sequence[int]


@dataclass(frozen=True)
class PreparedVolume:
    """Per-image state reused across clicks (cache it per client and image)."""

    image: np.ndarray  # canonical voxel order, float32, normalised for the engine
    spacing: tuple[float, float, float]  # mm along the canonical axes
    extra: Mapping[str, Any] | None = None  # engine-specific precomputed data


def prepare(image: np.ndarray, spacing: Sequence[float]) -> PreparedVolume:
    """Normalise one image for interactive correction (placeholder: the engine replaces it)."""
    arr = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(arr, [0.5, 99.5]) if arr.size else (0.0, 1.0)
    norm = np.clip((arr - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)
    return PreparedVolume(norm, tuple(float(s) for s in spacing))


def correct(volume: PreparedVolume, base: np.ndarray, foreground: Sequence[Point], background: Sequence[Point], *,
            fg_scribble: np.ndarray | None = None, bg_scribble: np.ndarray | None = None,
            settings: Mapping[str, Any] | None = None) -> np.ndarray:
    """The corrected binary mask of one organ (placeholder: balls of radius 3 voxels around each click)."""
    out = np.asarray(base, dtype=bool).copy()
    grid = np.indices(out.shape, sparse=True)
    for pts, value in ((foreground, True), (background, False)):
        for p in pts:
            ball = sum((g - int(c)) ** 2 for g, c in zip(grid, p)) <= 9
            out[ball] = value
    if fg_scribble is not None:
        out |= np.asarray(fg_scribble, dtype=bool)
    if bg_scribble is not None:
        out &= ~np.asarray(bg_scribble, dtype=bool)
    return out
