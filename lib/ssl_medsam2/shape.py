"""Trim thin protrusions off an organ's fused mask, relative to the organ's own thickness.

Why: where a registered organ reaches into a neighbour of the same brightness (the liver into the
stomach, the bowel or the body wall on T2-SPIR MRI), it does so in thin tongues that the organ itself
does not have, and neither the registration nor the intensity EM removes them. An in-plane
morphological opening whose radius is a fraction of the organ's thickness (its largest in-plane
distance to its own boundary) cuts them off and leaves the organ: a liver keeps its lobes, a kidney
is hardly touched. The radius follows the organ, not a class name, so it means the same on any data.
Measured on CHAOS (2 supports, 6 queries, ``bench/fewshot_accuracy.py``): docs/atlas.md.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .preprocess import through_plane_axis

#: what a trimmed voxel's probability becomes at most: just under the 0.5 label threshold, so it leaves
#: the label but stays uncertain (entropy near 1 bit), which is what it is
TRIMMED_PROBABILITY = np.float32(0.499)


def trim_protrusions(probs: np.ndarray, spacing, fraction: float) -> np.ndarray:
    """(C, X, Y, Z) class probabilities -> the same, with each class's thin parts below the threshold.

    Per class: the mask p >= 0.5 is opened within each slice (the plane across the largest spacing)
    by a disk of radius ``fraction`` x the mask's largest in-plane distance to its boundary, in mm;
    voxels the opening removes get at most :data:`TRIMMED_PROBABILITY`. ``fraction`` 0: unchanged.
    """
    if fraction <= 0:
        return probs
    spacing = np.asarray(spacing, dtype=float)
    through = through_plane_axis(tuple(spacing))
    in_plane = [float(s) for i, s in enumerate(spacing) if i != through]
    out = probs.copy()
    for k in range(out.shape[0]):
        mask = np.moveaxis(out[k] >= 0.5, through, -1)  # (a, b, slices) view order
        if not mask.any():
            continue
        slices = [z for z in range(mask.shape[-1]) if mask[..., z].any()]
        depth = {z: ndimage.distance_transform_edt(np.pad(mask[..., z], 1), sampling=in_plane)[1:-1, 1:-1]
                 for z in slices}
        radius = fraction * max(float(d.max()) for d in depth.values())
        if radius < min(in_plane):  # thinner than a voxel: nothing to open
            continue
        removed = np.zeros_like(mask)
        for z in slices:
            core = depth[z] > radius  # erosion by the disk
            if core.any():
                kept = ndimage.distance_transform_edt(~core, sampling=in_plane) <= radius  # dilation back
            else:
                kept = np.zeros_like(core)
            removed[..., z] = mask[..., z] & ~kept
        view = np.moveaxis(out[k], through, -1)  # writes through to out[k]
        view[removed] = np.minimum(view[removed], TRIMMED_PROBABILITY)
    return out
