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


class ClientCache:
    """LRU map ``(client, image) -> (fingerprint, value)`` within ``max_bytes`` (one entry always fits)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, tuple[Hashable, Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}

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
                    self._items.move_to_end(key)
                    self._trim()
                    return hit[1], True
            value = build()
            with self._lock:
                self._items[key] = (fingerprint, value, 0)
                self._items.move_to_end(key)
                self._trim()
            return value, False

    def _trim(self) -> None:
        """Every entry re-measured (an entry grows after it is built: the SAM2 engine keeps encoded slices
        in it), then the least recently used go while the total exceeds the budget (the newest stays)."""
        for k, (fp, v, _) in list(self._items.items()):
            self._items[k] = (fp, v, nbytes(v))
        total = sum(s for _, _, s in self._items.values())
        while total > self.max_bytes and len(self._items) > 1:
            _, (_, _, s) = self._items.popitem(last=False)
            total -= s

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._items)

    def size(self) -> int:
        with self._lock:
            return sum(s for _, _, s in self._items.values())
