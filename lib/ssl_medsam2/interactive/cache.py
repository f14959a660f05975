"""Per-client, per-image state of interactive correction, bounded in memory.

Why: the first click on a volume pays for reading the image, its base label and the engine's
preparation; the next clicks should not. Entries are keyed by (client, image), so two annotators never
share or overwrite each other's state (unlike one global "current image"), and each entry carries a
fingerprint of the files it was built from, so a newly saved label or a replaced image is picked up
on the next click. The least recently used entries are dropped once the byte budget is exceeded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

import numpy as np


def nbytes(value: Any) -> int:
    """Bytes held by the arrays in ``value`` (arrays, tensors and objects with an integer ``nbytes``;
    dataclasses, mappings and sequences of them)."""
    seen: set[int] = set()

    def walk(v, depth=0) -> int:
        if id(v) in seen:
            return 0
        if isinstance(v, np.ndarray) or isinstance(getattr(v, "nbytes", None), int):  # arrays, tensors, stores
            seen.add(id(v))                                                          # that count their own
            return int(v.nbytes)
        if depth > 4:
            return 0
        seen.add(id(v))
        if isinstance(v, dict):
            return sum(walk(x, depth + 1) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x, depth + 1) for x in v)
        if hasattr(v, "__dict__"):
            return walk(vars(v), depth + 1)
        if hasattr(v, "__dataclass_fields__"):
            return sum(walk(getattr(v, f), depth + 1) for f in v.__dataclass_fields__)
        return 0

    return walk(value)


class BoundedMemo(OrderedDict):
    """Results by key within ``max_bytes`` of arrays; the least recently used go first, one always stays.

    The one byte-bounded LRU of interactive correction: a prepared image memoises its clicks' influences
    in one, and :class:`ClientCache` keeps its (client, image) entries in one."""

    def __init__(self, max_bytes: int):
        super().__init__()
        self.max_bytes = int(max_bytes)
        self._sizes: dict[Hashable, int] = {}

    def get(self, key, default=None):
        if key not in self:
            return default
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        self._sizes[key] = nbytes(value)
        self._evict()

    def remeasure(self) -> None:
        """Measure every entry again, then evict: an entry can grow after it was stored (a prepared image
        memoises clicks' influences and, with the SAM2 engine, encoded slices)."""
        self._sizes = {k: nbytes(v) for k, v in self.items()}
        self._evict()

    def _evict(self) -> None:
        while len(self) > 1 and self.total_bytes() > self.max_bytes:
            del self[next(iter(self))]

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._sizes.pop(key, None)

    def total_bytes(self) -> int:
        return sum(self._sizes.values())


class ClientCache:
    """LRU map ``(client, image) -> (fingerprint, value)`` within ``max_bytes`` (one entry always fits)."""

    def __init__(self, max_bytes: int):
        self._items = BoundedMemo(max_bytes)
        self._lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}

    @property
    def max_bytes(self) -> int:
        return self._items.max_bytes

    def get(self, client: str, image: str, fingerprint: Hashable, build: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, was it cached): the entry for ``(client, image)`` if it was built from ``fingerprint``,
        else ``build()`` stored in its place. Concurrent requests of one client for one image build once."""
        key = (client, image)
        with self._lock:
            gate = self._building.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                hit = self._items.get(key)
                if hit is not None and hit[0] == fingerprint:
                    self._items.remeasure()  # the entries grew with their clicks' memos
                    return hit[1], True
            value = build()
            with self._lock:
                self._items[key] = (fingerprint, value)
            return value, False

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._items)

    def size(self) -> int:
        with self._lock:
            return self._items.total_bytes()
