"""The TFFS insert protocol: where supports go in the pseudo-video, how runs are averaged, how the
mean probability becomes a label map.

A pseudo-video for insert position ``p`` is ``query[:p] + support[:] + query[p:]``. The support's
frames carry the mask prompts; the query frames are tracked. :class:`PseudoVideo` holds the index
bookkeeping both ways so engines never do slice arithmetic themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .config import Section


@dataclass(frozen=True)
class ProtocolSettings(Section):
    """The ``protocol:`` section: which engine, and how the mean probability becomes outputs."""

    SECTION = "protocol"
    engine: str
    threshold: float
    keep_largest_component: bool
    boundary_band: int

    def __post_init__(self):
        self._set(engine=str(self.engine), threshold=float(self.threshold),
                  keep_largest_component=bool(self.keep_largest_component), boundary_band=int(self.boundary_band))


def insert_positions(n_query: int, n_inserts: int, rng: np.random.Generator) -> list[int]:
    """``n_inserts`` distinct random insert positions in 0..n_query (inclusive: after the last slice).

    Positions are drawn without replacement while there are enough of them, so a short query still
    gets different contexts; sorted, for readable logs.
    """
    n_slots = n_query + 1
    if n_inserts <= n_slots:
        pos = rng.choice(n_slots, size=n_inserts, replace=False)
    else:
        pos = rng.choice(n_slots, size=n_inserts, replace=True)
    return sorted(int(p) for p in pos)


@dataclass(frozen=True)
class PseudoVideo:
    """Index mapping of one support volume inserted into one query at ``position``."""

    n_query: int
    n_support: int
    position: int

    def __post_init__(self):
        if not 0 <= self.position <= self.n_query:
            raise ValueError(f"insert position {self.position} outside 0..{self.n_query}")

    @property
    def length(self) -> int:
        return self.n_query + self.n_support

    def source(self, frame: int) -> tuple[str, int]:
        """Video frame -> ("query" | "support", slice index in that volume)."""
        if not 0 <= frame < self.length:
            raise IndexError(frame)
        p = self.position
        if frame < p:
            return "query", frame
        if frame < p + self.n_support:
            return "support", frame - p
        return "query", frame - self.n_support

    def support_frame(self, support_slice: int) -> int:
        return self.position + support_slice

    def query_frame(self, query_slice: int) -> int:
        return query_slice if query_slice < self.position else query_slice + self.n_support

    def query_frames(self) -> np.ndarray:
        """Video frame index of every query slice, in query order (used to rebuild the query)."""
        q = np.arange(self.n_query)
        return np.where(q < self.position, q, q + self.n_support)

    def assemble(self, query_items, support_items):
        """Interleave two sequences (lists, arrays, tensors) into video order."""
        p = self.position
        if hasattr(query_items, "shape") and hasattr(query_items, "__getitem__") and not isinstance(query_items, list):
            cat = np.concatenate if isinstance(query_items, np.ndarray) else _torch_cat
            return cat([query_items[:p], support_items, query_items[p:]])
        return list(query_items[:p]) + list(support_items) + list(query_items[p:])


def _torch_cat(parts):
    import torch

    return torch.cat(parts, dim=0)


def combine_directions(forward: np.ndarray | None, backward: np.ndarray | None,
                       fwd_valid: np.ndarray, bwd_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average forward and backward probabilities where both exist, else take the one that does.

    Arrays are (N, H, W); ``*_valid`` are (N,) booleans telling which frames each pass reached.
    Returns (probability, valid) where ``valid`` marks frames reached by at least one pass.
    """
    shape = (forward if forward is not None else backward).shape
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape[0], dtype=np.float64)
    if forward is not None:
        total[fwd_valid] += forward[fwd_valid]
        count += fwd_valid
    if backward is not None:
        total[bwd_valid] += backward[bwd_valid]
        count += bwd_valid
    valid = count > 0
    total[valid] /= count[valid, None, None]
    return total.astype(np.float32), valid


class RunningMean:
    """Mean of per-run probability maps without keeping the runs (memory does not grow with runs).

    The sum lives on ``device`` (float64), so an engine on a GPU adds there and copies to the host
    once, when :attr:`mean` is read. A run is added whole (:meth:`add`) or slice by slice
    (:meth:`add_slices`, then :meth:`count` once per run).
    """

    def __init__(self, shape: tuple[int, ...], device=None):
        import torch

        self.total = torch.zeros(shape, dtype=torch.float64, device=device)
        self.n = 0

    def _on_device(self, prob):
        import torch

        return torch.as_tensor(prob).to(device=self.total.device, dtype=torch.float64)

    def add(self, prob) -> None:
        """One whole run (numpy array or tensor of the accumulator's shape)."""
        if tuple(prob.shape) != tuple(self.total.shape):
            raise ValueError(f"run shape {tuple(prob.shape)} != accumulator shape {tuple(self.total.shape)}")
        self.total += self._on_device(prob)
        self.n += 1

    def add_slices(self, index, probs) -> None:
        """Part of a run: ``probs[k]`` is added at ``total[index[k]]`` (no run is counted). Indexes
        with host integers, so a GPU accumulator never waits for an index copy."""
        probs = self._on_device(probs)
        for k, i in enumerate(index):
            self.total[int(i)] += probs[k]

    def count(self, runs: int = 1) -> None:
        self.n += int(runs)

    @property
    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no run was added")
        return (self.total / self.n).float().cpu().numpy()


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of a boolean 3D mask."""
    if not mask.any():
        return mask
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def probabilities_to_label(probs: np.ndarray, classes, threshold: float,
                           keep_largest_component: bool) -> np.ndarray:
    """Per-class probabilities (C, X, Y, Z) -> label map.

    A voxel is foreground when its most probable class reaches ``threshold``; several classes are
    resolved by argmax (as in the paper); then the largest connected component of each class is kept.
    """
    probs = np.asarray(probs)
    classes = np.asarray(list(classes), dtype=np.int64)
    if probs.shape[0] != len(classes):
        raise ValueError(f"{probs.shape[0]} probability maps for {len(classes)} classes")
    best = probs.argmax(axis=0)
    fg = probs.max(axis=0) >= threshold
    dtype = np.uint8 if classes.max(initial=0) < 256 else np.int16
    label = np.where(fg, classes[best], 0).astype(dtype)
    if keep_largest_component:
        for c in classes:
            m = label == c
            label[m & ~largest_component(m)] = 0
    return label
