"""The SAM2 correction engine (``interactive.engine: sam2``): the clicks and the base label's mask prompt
SAM2 on each clicked slice, and SAM2's video propagation carries the result through a window of slices.

What one correction computes (everything from the base mask plus every click: no state between requests):

1. The clicked slices (along the slice axis SAM2 uses for this volume: ``input.slice_axis``, the
   through-plane one for CHAOS) are grouped into *windows*: ``interactive.sam2_window_slices`` slices on
   each side of a clicked slice; windows that touch merge into one. Only slices inside a window change.
2. Each clicked slice is a SAM2 conditioning frame prompted by the base mask on that slice **and** the
   clicks on it (foreground label 1, background 0). SAM2's video predictor takes a mask or points per frame,
   not both in one call, so the mask goes first (``add_new_mask``: on a fresh frame SAM2 outputs the mask
   itself as low-resolution logits) and the points second (``add_new_points_or_box`` feeds the frame's
   previous logits to the mask decoder with the points: SAM's own interactive-refinement step, the one
   it was trained on). A mask-derived box instead would throw the base label's shape away, and the mask
   alone would ignore the clicks. A slice whose base mask is empty is prompted by its points alone.
3. Each window is tracked forward from its first clicked slice to its end and, from a fresh state,
   backward from its last clicked slice to its start, as the few-shot engine does; every direction of every
   window advances in one batched track (:class:`ssl_medsam2.engines.sam2_batch.BatchedTracker`). Where
   both directions reach a slice (between two clicked slices) their probabilities are averaged;
   probability > 0.5 is the new mask there.
4. Image features: one encoder pass per slice, batched (``sam2.feature_batch``), kept with the prepared
   volume (:class:`EncodedSlices`), so further clicks on the same image encode only slices not seen yet.

The model (``sam2:`` section: model, checkpoint, device, dtype) is built once per process by the few-shot
engine's own builder and device resolver (:class:`ssl_medsam2.engines.sam2_engine.SAM2Engine`); a missing
checkpoint raises :class:`~ssl_medsam2.engines.sam2_model.CheckpointNotFound` with where to put it (the
server reports it as the model's unavailability: a 503 with the reason). ``sam2.checkpoint: none`` runs
random weights: tests of the mechanics only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .settings import InteractiveSettings

#: scribble voxels taken as points, per scribble and slice (evenly spread along the scribble)
SCRIBBLE_POINTS_PER_SLICE = 5
#: a prepared volume keeps the features of at most this many windows' slices (~4 MB a slice at 512 px, fp32)
MAX_SLICES_WINDOWS = 4

_ENGINES: dict = {}
_ENGINES_LOCK = threading.Lock()


def sam2_engine(cfg: Mapping[str, Any]):
    """The process-wide SAM2 model holder for the config's ``sam2:`` section (built on first use, with the
    few-shot engine's builder: random weights only where ``sam2.checkpoint: none`` asks for them), and
    the lock its users take (the batched tracker keeps per-track attributes)."""
    from ..engines.sam2_engine import SAM2Engine
    from ..engines.sam2_model import SAM2Settings

    key = SAM2Settings.from_config(cfg)
    with _ENGINES_LOCK:
        got = _ENGINES.get(key)
        if got is None:
            got = _ENGINES[key] = (SAM2Engine(dict(cfg)), threading.Lock())
    return got


class EncodedSlices:
    """One prepared volume's SAM2 image features, per (model, slice axis) and slice, least recently used
    first out past the bound :meth:`take` is given. ``nbytes`` counts the tensors, so the server's
    per-client cache (:mod:`.cache`) counts them against ``interactive.cache_mb``."""

    def __init__(self):
        self._frames: OrderedDict = OrderedDict()  # (key, slice) -> per-level feature tensors
        self.shared: dict = {}                     # key -> (positional encodings, feature sizes)
        self.nbytes = 0
        self.lock = threading.Lock()

    def missing(self, key, slices) -> list[int]:
        return [z for z in slices if (key, z) not in self._frames]

    def put(self, key, slices, per_frame, pos, sizes) -> None:
        self.shared[key] = (pos, sizes)
        for z, feats in zip(slices, per_frame):
            self._frames[(key, z)] = feats
            self.nbytes += sum(int(t.nbytes) for t in feats)

    def take(self, key, slices, max_frames: int) -> list:
        """The features of ``slices`` (all present), marked recently used; then the oldest beyond
        ``max_frames`` go (never one of ``slices``)."""
        out = []
        for z in slices:
            self._frames.move_to_end((key, z))
            out.append(self._frames[(key, z)])
        keep = {(key, z) for z in slices}
        while len(self._frames) > max_frames:
            oldest = next(iter(self._frames))
            if oldest in keep:
                break
            self.nbytes -= sum(int(t.nbytes) for t in self._frames.pop(oldest))
        return out


@dataclass
class Report:
    """What a SAM2 correction did (for tests and logs): the windows (first, last slice), the clicked
    slices, the slices each direction tracked, how many slices this call encoded, and the foreground
    probability of every slice in a window (in-plane, by slice)."""

    axis: int
    windows: list = field(default_factory=list)
    clicked: list = field(default_factory=list)
    forward: list = field(default_factory=list)
    backward: list = field(default_factory=list)
    encoded: int = 0
    probabilities: dict = field(default_factory=dict)


def windows(clicked: list[int], reach: int, n: int) -> list[tuple[int, int, list[int]]]:
    """(first, last, clicked slices inside) of the windows of ``reach`` slices around each clicked slice,
    clipped to 0..n-1; windows that overlap or touch merge."""
    out: list = []
    for z in sorted(set(clicked)):
        lo, hi = max(0, z - reach), min(n - 1, z + reach)
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], hi, out[-1][2] + [z])
        else:
            out.append((lo, hi, [z]))
    return out


def _scribble_points(mask: np.ndarray | None, axis: int) -> np.ndarray:
    """A few voxels of a scribble per slice along ``axis``, spread evenly along it (SAM2 takes points)."""
    if mask is None or not mask.any():
        return np.zeros((0, 3), np.int64)
    pts = np.argwhere(mask)
    out = []
    for z in np.unique(pts[:, axis]):
        on = pts[pts[:, axis] == z]
        idx = np.unique(np.linspace(0, len(on) - 1, min(len(on), SCRIBBLE_POINTS_PER_SLICE)).round().astype(int))
        out.append(on[idx])
    return np.concatenate(out).astype(np.int64)


def correct_mask_sam2(image: np.ndarray, spacing, base: np.ndarray, fg_points: np.ndarray, bg_points: np.ndarray,
                      fg_scribble: np.ndarray | None, bg_scribble: np.ndarray | None, s: InteractiveSettings,
                      cfg: Mapping[str, Any], *, memo: dict | None = None) -> tuple[np.ndarray, Report]:
    """(corrected mask, :class:`Report`): see the module docstring. ``image`` is the prepared volume's
    (0..1 after the project's input scaling), points (N, 3) int canonical indices; ``cfg`` the whole config
    (``sam2:`` and ``input:`` sections); ``memo`` the prepared volume's extra dict (holds
    :class:`EncodedSlices` under ``sam2_slices``)."""
    import torch

    from ..engines.sam2_batch import TrackSequence, logits_to_prob
    from ..engines.sam2_context import Features, SupportOnly
    from ..preprocess import resolve_slice_axis, to_slices

    engine, lock = sam2_engine(cfg)
    axis = resolve_slice_axis(engine.slice_axis, spacing)
    report = Report(axis)
    fg = np.concatenate([np.asarray(fg_points, np.int64).reshape(-1, 3), _scribble_points(fg_scribble, axis)])
    bg = np.concatenate([np.asarray(bg_points, np.int64).reshape(-1, 3), _scribble_points(bg_scribble, axis)])
    if not len(fg) and not len(bg):
        return base.copy(), report
    n = base.shape[axis]
    wins = windows([int(p[axis]) for p in np.concatenate([fg, bg])], s.sam2_window_slices, n)
    report.windows = [(lo, hi) for lo, hi, _ in wins]
    report.clicked = sorted({z for _, _, zs in wins for z in zs})
    inplane = [a for a in range(3) if a != axis]
    base_slices = to_slices(base, axis)                    # (n, H, W) views of the base along the slice axis
    hw = tuple(int(base.shape[a]) for a in inplane)

    with lock:
        predictor = engine.predictor                       # built here: a missing checkpoint fails before any work
        store = memo.get("sam2_slices") if memo is not None else None
        store = store if store is not None else EncodedSlices()  # no prepared volume's store: this call only
        key = (engine.settings, axis, engine.image_size)
        needed = sorted({z for lo, hi, _ in wins for z in range(lo, hi + 1)})
        with store.lock:
            todo = store.missing(key, needed)
            if todo:  # one batched encoder pass over the slices not seen yet
                scaled = to_slices(image, axis)[todo] * np.float32(255.0)
                feats = engine.encode_slices(scaled)
                store.put(key, todo, feats.per_frame, feats.pos, feats.sizes)
                report.encoded = len(todo)
            per_slice = dict(zip(needed, store.take(key, needed, max(len(needed), MAX_SLICES_WINDOWS * (
                2 * s.sam2_window_slices + 1)))))
            pos, sizes = store.shared[key]

        sequences, cond_probs, rows = [], [], {}
        with torch.inference_mode(), engine.autocast():
            for lo, hi, clicked in wins:
                feats = Features([per_slice[z] for z in range(lo, hi + 1)], pos, sizes)
                state = engine.new_state(SupportOnly(feats, hi - lo + 1), hw)
                for z in clicked:
                    f = z - lo
                    mask = base_slices[z]
                    if mask.any():
                        predictor.add_new_mask(state, f, 1, torch.from_numpy(np.ascontiguousarray(mask)))
                    pts = [(p, 1) for p in fg if p[axis] == z] + [(p, 0) for p in bg if p[axis] == z]
                    xy = [[float(p[inplane[1]]), float(p[inplane[0]])] for p, _ in pts]  # SAM2: (x = column, y = row)
                    predictor.add_new_points_or_box(state, f, 1, points=xy, labels=[lab for _, lab in pts])
                predictor.propagate_in_video_preflight(state)
                cond = dict(state["output_dict_per_obj"][0]["cond_frame_outputs"])
                for f, out in cond.items():
                    cond_probs.append((lo + f, logits_to_prob(out["pred_masks"], hw)[0]))
                first, last = min(cond), max(cond)
                for reverse, frames in ((False, range(first, hi - lo + 1)), (True, range(last, -1, -1))):
                    frames = [f for f in frames if f not in cond]
                    acc_rows = []
                    for f in frames:
                        rows.setdefault(lo + f, len(rows))
                        acc_rows.append(rows[lo + f])
                    (report.backward if reverse else report.forward).extend(lo + f for f in frames)
                    sequences.append(TrackSequence(reverse=reverse, frames=frames,
                                                   features=lambda f, feats=feats: (feats, f), cond=cond,
                                                   non_cond={}, num_frames=hi - lo + 1, acc_rows=acc_rows))
            acc = torch.zeros((len(rows) + 1,) + hw, dtype=torch.float64, device=engine.device)
            if rows:
                engine.tracker.track(sequences, acc=acc)
        count = np.zeros(len(rows) + 1)
        for seq in sequences:
            np.add.at(count, seq.acc_rows, 1)

    probs = {z: (acc[row] / count[row]).float().cpu().numpy() for z, row in rows.items()}
    probs.update({z: prob.float().cpu().numpy() for z, prob in cond_probs})
    report.probabilities = dict(sorted(probs.items()))
    out = base.copy()
    out_slices = np.moveaxis(out, axis, 0)                 # a view: writing a slice writes ``out``
    for z, prob in probs.items():
        out_slices[z] = prob > 0.5
    return out, report

