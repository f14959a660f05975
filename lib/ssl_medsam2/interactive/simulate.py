"""The simulated annotator of the CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical Image
Segmentation": where a person would click next, given the current prediction and the truth.

Rule (one organ at a time): error = prediction != truth; its largest 26-connected component; the voxel
of that component farthest from the component's border (Euclidean distance in voxels, the volume's edge
counting as border); ties broken by a seeded random choice; a foreground click where the truth is the
organ, else a background click. No error left: no click.
"""

from __future__ import annotations

import time
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


HARMFUL_DROP = 0.005  # a click that lowers Dice by more than this counts as harmful (the measure)


@dataclass
class Session:
    """One organ clicked by the simulated annotator: Dice after 0, 1, ... clicks, where each click went, how
    long the engine (or server) took to answer it, and the last mask (the start when nothing was clicked)."""

    dice: list[float]
    clicks: list[Click]
    latency_s: list[float]
    prediction: np.ndarray

    def dice_at(self, k: int) -> float:
        """Dice after ``k`` clicks (the last one reached when the errors ran out earlier)."""
        return self.dice[min(k, len(self.dice) - 1)]

    def clicks_to(self, target: float, max_clicks: int) -> int:
        """Number of clicks until Dice >= ``target`` (``max_clicks`` when never reached: the NoC rule)."""
        for k, d in enumerate(self.dice):
            if d >= target:
                return k
        return max_clicks

    def harmful(self) -> int:
        return sum(1 for a, b in zip(self.dice, self.dice[1:]) if b < a - HARMFUL_DROP)


def click_session(predict, start: np.ndarray, truth: np.ndarray, max_clicks: int, seed: int = 0,
                  stop_at: float | None = None) -> Session:
    """Click one organ with :func:`next_click` until ``max_clicks`` (or Dice >= ``stop_at``, or no error).

    ``predict(foreground, background) -> mask``: the correction of ``start`` by every click so far (lists of
    voxel indices), as a client resends its full point list on each click."""
    from ..metrics import dice

    rng = np.random.default_rng(seed)
    truth = np.asarray(truth, bool)
    pred = np.asarray(start, bool)
    out = Session([dice(pred, truth)], [], [], pred)
    fg: list[list[int]] = []
    bg: list[list[int]] = []
    while len(out.clicks) < max_clicks and not (stop_at is not None and out.dice[-1] >= stop_at):
        click = next_click(pred, truth, rng)
        if click is None:
            break
        (fg if click.foreground else bg).append(list(click.point))
        t0 = time.perf_counter()
        pred = np.asarray(predict(list(fg), list(bg)), bool)
        out.latency_s.append(time.perf_counter() - t0)
        out.clicks.append(click)
        out.dice.append(dice(pred, truth))
        out.prediction = pred
    return out
