"""The simulated annotator of the CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical Image
Segmentation": where a person would click next, given the current prediction and the truth.

Rule (one organ at a time): error = prediction != truth; its largest 26-connected component; the voxel
of that component farthest from the component's border (Euclidean distance in voxels, the volume's edge
counting as border); ties broken by a seeded random choice; a foreground click where the truth is the
organ, else a background click. No error left: no click.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FULL_26 = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class Click:
    point: tuple[int, int, int]  # voxel index in the arrays' order
    foreground: bool


def largest_error_component(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray | None:
    """The largest 26-connected component of prediction != truth (None when they agree)."""
    error = np.asarray(prediction, bool) != np.asarray(truth, bool)
    if not error.any():
        return None
    lab, n = ndimage.label(error, structure=FULL_26)
    if n == 1:
        return lab == 1
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def next_click(prediction: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> Click | None:
    """The challenge's next click on one organ (see the module docstring)."""
    comp = largest_error_component(prediction, truth)
    if comp is None:
        return None
    box = ndimage.find_objects(comp.astype(np.uint8))[0]
    dist = ndimage.distance_transform_edt(np.pad(comp[box], 1))[1:-1, 1:-1, 1:-1]
    best = np.argwhere(dist == dist.max())
    p = best[rng.integers(len(best))] if len(best) > 1 else best[0]
    point = tuple(int(c + b.start) for c, b in zip(p, box))
    return Click(point, bool(np.asarray(truth, bool)[point]))  # type: ignore[arg-type]
