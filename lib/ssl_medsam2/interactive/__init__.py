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

from functools import partial
from typing import Any, Mapping, Sequence

import numpy as np

from .appearance import crop_logit, organ_reference
from .engine import click_roi, correct_mask
from .prepared import MEMO_BYTES, PreparedVolume, prepare
from .settings import ENGINES, InteractiveSettings

Point = Sequence[int]

__all__ = ["ENGINES", "MEMO_BYTES", "InteractiveSettings", "Point", "PreparedVolume", "click_roi", "correct", "prepare"]




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
            settings: Mapping[str, Any] | InteractiveSettings | None = None, base_trusted: bool = False,
            look=None) -> np.ndarray:
    """The corrected binary mask of one organ: ``base`` plus every click / scribble, recomputed from scratch.

    ``base_trusted``: the base is a final label, or a pseudo label that passed the quality gate for this organ
    (:func:`ssl_medsam2.quality.trusted_classes`); it is then held to more firmly
    (:meth:`InteractiveSettings.for_base`). Unknown quality: leave it False.

    ``look``: the organ's :class:`.appearance.OrganLook` learned from the labelled images (None: none yet);
    the weight-free engine uses it where ``appearance_weight`` > 0 (a trusted base, by default).

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
    term = None
    ref = organ_reference(volume.image, base) if look is not None and s.appearance_weight > 0 else None
    if ref is not None:  # the organ's look, relative to the base organ's own intensity
        term = partial(crop_logit, look, volume.image, volume.spacing, ref, memo=extra.get("appearance"))
    return correct_mask(volume.image, volume.spacing, base.astype(bool), fg, bg, fg_sc, bg_sc, s, memo=extra,
                        appearance=term)


def _whole_config(settings) -> Mapping[str, Any]:
    """The config the other sections (``sam2:``, ``input:``) come from: ``settings`` when it is a whole
    config, else the loaded one."""
    if isinstance(settings, Mapping) and isinstance(settings.get(InteractiveSettings.SECTION), Mapping):
        return settings
    from ..config import load_config

    return load_config()
