"""What the SAM2 engine knows about one query and one support, and the one cache of supports.

* :class:`QueryContext` / :class:`SupportContext`: the per-query and per-support inputs every run of
  the protocol reads (slice axis, scaled slices, in-plane size, label slices, features), typed.
* :class:`Features` and the two feature sources SAM2's predictor reads frames from
  (:class:`VideoFeatures` for a pseudo-video, :class:`SupportOnly` for the support block alone).
* :class:`SupportCache`: everything kept per support volume across runs and queries — its image
  features, its prompted frames' outputs per (class, in-plane size) and its tracked block per
  (class, in-plane size, query length, direction) — in ONE least-recently-used store bounded in
  frames. Evicting a support drops all three together, so they can never disagree.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..protocol import PseudoVideo
from .base import Case


@dataclass
class Features:
    """Per-slice image features of one volume (list indexed by slice), shared positional encodings
    and feature sizes (as SAM2's ``_prepare_backbone_features`` returns them, batch 1)."""

    per_frame: list
    pos: list
    sizes: list

    def __len__(self) -> int:
        return len(self.per_frame)


class VideoFeatures:
    """Feature source of one pseudo-video: frame index -> the query's or the support's slice features."""

    def __init__(self, video: PseudoVideo, query: Features, support: Features):
        self.video, self.query, self.support = video, query, support
        self.num_frames = video.length

    def __call__(self, frame_idx: int):
        kind, i = self.video.source(frame_idx)
        feats = self.query if kind == "query" else self.support
        return feats.per_frame[i], feats.pos, feats.sizes


class SupportOnly:
    """Feature source of the support block alone, in a video of ``num_frames`` frames (the full
    pseudo-video length, so SAM2's pointer-count and normalisation constants are the same)."""

    def __init__(self, support: Features, num_frames: int):
        self.support, self.num_frames = support, num_frames

    def __call__(self, frame_idx: int):
        return self.support.per_frame[frame_idx], self.support.pos, self.support.sizes


Outputs = dict  # SAM2's compact per-frame output dicts, keyed by support slice


@dataclass
class SupportEntry:
    """One support volume's cached work (see :class:`SupportCache`)."""

    features: Features
    prompts: dict = field(default_factory=dict)  # (class, hw) -> {support slice: output}
    blocks: dict = field(default_factory=dict)   # (class, hw, n_query, reverse) -> {support slice: output}


class SupportCache:
    """Supports' features and derived SAM2 outputs, least recently used first out, bounded in frames.

    ``entry(key, encode)`` returns the entry of a support, encoding it with ``encode()`` on a miss;
    the entry returned is never the one evicted, so a support larger than the limit still works.
    """

    def __init__(self, limit_frames: int):
        self.limit_frames = int(limit_frames)
        self._entries: OrderedDict[Any, SupportEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    @property
    def frames(self) -> int:
        return sum(len(e.features) for e in self._entries.values())

    def entry(self, key, encode: Callable[[], Features]) -> SupportEntry:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        entry = SupportEntry(encode())
        self._entries[key] = entry
        while self.frames > self.limit_frames and len(self._entries) > 1:
            self._entries.popitem(last=False)
        return entry


@dataclass
class QueryContext:
    """One query volume as every run of the protocol sees it."""

    axis: int
    scaled: np.ndarray               # (n_slices, H, W) intensities scaled to 0..255
    features: Features | None = None  # image features per slice (engines that encode once per query)

    @property
    def n_slices(self) -> int:
        return int(self.scaled.shape[0])

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.scaled.shape[1]), int(self.scaled.shape[2])


@dataclass
class SupportContext:
    """One support volume as every run of the protocol sees it (label already on the query's grid)."""

    case: Case
    scaled: np.ndarray          # (n_slices, h, w) intensities scaled to 0..255
    label: np.ndarray           # (n_slices, H, W) label slices resized to the query's in-plane size
    entry: SupportEntry | None = None  # cached features and outputs (engines that use the cache)

    @property
    def n_slices(self) -> int:
        return int(self.scaled.shape[0])

    def mask(self, cls: int) -> np.ndarray:
        return self.label == cls

    @staticmethod
    def prompted_slices(mask: np.ndarray) -> list[int]:
        """Support slices where the class is present (they get the mask prompts)."""
        return [int(j) for j in np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))]
