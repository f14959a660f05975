"""Interactive correction: an annotator's clicks and scribbles turn a base label into a better one.

The contract between the library and the app (the app converts client coordinates once, at the edge):
every array here is in the canonical (RAS+) voxel order of :class:`ssl_medsam2.io.Volume`, and points
are integer voxel indices into it. The result is recomputed from the base mask plus every click in the
request (no hidden state between requests: deleting a point in the client is the undo).

- :func:`prepare` does the per-image work once (normalisation, spacing); the app caches its result per
  client and image.
- :func:`correct` returns the corrected binary mask of one organ; only voxels within a bounded region
  around the clicks / scribbles may differ from ``base``.

The engine (``interactive.engine`` in configs/ssl_medsam2.yaml: the weight-free :mod:`.engine`, or SAM2
prompts with weights, :mod:`.sam2_prompts`) and the click simulator of the benches (:mod:`.simulate`)
live beside this file; docs/interactive.md tells how they were chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .cache import BoundedMemo
from .engine import click_roi, correct_mask
from .sam2_prompts import EncodedSlices
from .settings import ENGINES, InteractiveSettings

Point = Sequence[int]

__all__ = ["ENGINES", "InteractiveSettings", "Point", "PreparedVolume", "click_roi", "correct", "prepare"]


@dataclass(frozen=True)
class PreparedVolume:
    """Per-image state reused across clicks (cache it per client and image)."""

    image: np.ndarray  # canonical voxel order, float32, normalised for the engine (0..1)
    spacing: tuple[float, float, float]  # mm along the canonical axes
    extra: Mapping[str, Any] | None = None  # engine-specific precomputed data


def prepare(image: np.ndarray, spacing: Sequence[float], *, intensity=None) -> PreparedVolume:
    """Normalise one image for interactive correction: the project's input scaling (``input:`` section:
    MRI percentiles of the non-zero voxels, a CT window only for CT), mapped to 0..1.

    ``intensity``: a :class:`ssl_medsam2.preprocess.IntensityConfig` (default: the config's)."""
    from ..config import load_config
    from ..preprocess import IntensityConfig, scale_to_uint8_range

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {arr.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
    cfg = intensity if intensity is not None else IntensityConfig.from_config(load_config())
    norm = (scale_to_uint8_range(arr, cfg) / np.float32(255.0)).astype(np.float32)
    return PreparedVolume(norm, spacing, {"influence": BoundedMemo(MEMO_BYTES),  # type: ignore[arg-type]
                                          "shape": BoundedMemo(MEMO_BYTES), "sam2_slices": EncodedSlices()})


MEMO_BYTES = 48 << 20  # per prepared image and kind: clicks' geodesic influences (~0.5-2 MB each), base masks'
# signed distances (4 bytes a voxel); beyond the server's interactive.cache_mb, which counts them as built


def _points(points: Sequence[Point], shape: Sequence[int], what: str) -> np.ndarray:
    arr = np.asarray(list(points), dtype=np.float64).reshape(-1, 3) if len(points) else np.zeros((0, 3))
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        raise ValueError(f"{what} points must be integer voxel indices")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= np.asarray(shape))
    if bad.any():
        raise ValueError(f"{what} point {arr[bad.any(axis=1)][0].tolist()} lies outside the volume {tuple(shape)}")
    return arr


def correct(volume: PreparedVolume, base: np.ndarray, foreground: Sequence[Point], background: Sequence[Point], *,
            fg_scribble: np.ndarray | None = None, bg_scribble: np.ndarray | None = None,
            settings: Mapping[str, Any] | InteractiveSettings | None = None, base_trusted: bool = False) -> np.ndarray:
    """The corrected binary mask of one organ: ``base`` plus every click / scribble, recomputed from scratch.

    ``base_trusted``: the base is a final label, or a pseudo label that passed the quality gate for this organ
    (:func:`ssl_medsam2.quality.trusted_classes`); it is then held to more firmly
    (:meth:`InteractiveSettings.for_base`). Unknown quality: leave it False.

    ``settings``: an :class:`InteractiveSettings`, or a mapping of ``interactive:`` keys laid over the
    config's (None: the config's); a whole config (with an ``interactive:`` key) also gives the ``sam2:``
    section ``interactive.engine: sam2`` uses. Raises ValueError on points outside the volume, non-integer
    points, more than ``max_points`` points, or a base / scribble whose grid is not the image's; with the
    sam2 engine, CheckpointNotFound when its weights are not on this machine."""
    s = InteractiveSettings.resolve(settings).for_base(base_trusted)
    shape = volume.image.shape
    extra = dict(volume.extra or {})
    base = np.asarray(base)
    if base.shape != shape:
        raise ValueError(f"base label grid {base.shape} is not the image's {shape}")
    for name, m in (("foreground scribble", fg_scribble), ("background scribble", bg_scribble)):
        if m is not None and np.shape(m) != shape:
            raise ValueError(f"{name} grid {np.shape(m)} is not the image's {shape}")
    fg = _points(foreground, shape, "foreground")
    bg = _points(background, shape, "background")
    if len(fg) + len(bg) > s.max_points:
        raise ValueError(f"{len(fg) + len(bg)} points in one request; at most {s.max_points}")
    fg_sc = None if fg_scribble is None else np.asarray(fg_scribble, bool)
    bg_sc = None if bg_scribble is None else np.asarray(bg_scribble, bool)
    if s.engine == "sam2":
        from .sam2_prompts import correct_mask_sam2

        return correct_mask_sam2(volume.image, volume.spacing, base.astype(bool), fg, bg, fg_sc, bg_sc, s,
                                 _whole_config(settings), memo=extra)[0]
    return correct_mask(volume.image, volume.spacing, base.astype(bool), fg, bg, fg_sc, bg_sc, s, memo=extra)


def _whole_config(settings) -> Mapping[str, Any]:
    """The config the other sections (``sam2:``, ``input:``) come from: ``settings`` when it is a whole
    config, else the loaded one."""
    if isinstance(settings, Mapping) and isinstance(settings.get(InteractiveSettings.SECTION), Mapping):
        return settings
    from ..config import load_config

    return load_config()
