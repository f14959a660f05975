"""Annotation leases: an image handed to one annotator is not handed to another while the lease holds.

The lease book is one JSON file guarded by a file lock, so the MONAI Label server, its training and
scoring child processes and several worker threads all see the same leases. Leases expire on their
own (default one hour) so an annotator who walks away does not block an image forever. Choosing and
leasing happen under the same lock, so two clients asking at the same moment can never be handed the
same image.

Who may end a lease: its holder (``release(image, holder=...)``), whoever labels the image for good
(the app's final save calls ``release(image)``), and time. A holder works on one image at a time:
asking for another releases their previous lease, so nobody can collect leases by asking repeatedly.
Clients with no verified identity (no token) are ``anonymous``: at most ``anonymous_limit`` distinct
anonymous holders hold a lease at once, so self-declared names cannot lock every image; a holder
that already holds one may always move it (skipping is never refused).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from filelock import FileLock

from .io import write_text_atomic

DEFAULT_TTL_S = 3600.0


@dataclass
class Lease:
    image: str
    holder: str
    since: float
    expires: float
    strategy: str = ""
    anonymous: bool = False

    def active(self, now: float) -> bool:
        return self.expires > now


class LeaseLimitError(RuntimeError):
    """Anonymous clients already hold as many leases as allowed."""


class LeaseBook:
    """File-backed leases: ``acquire_first`` picks and leases atomically, ``release`` frees an image."""

    def __init__(self, path: str | os.PathLike, ttl_s: float = DEFAULT_TTL_S):
        self.path = Path(path)
        self.ttl_s = float(ttl_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path) + ".lock")

    # -- file access (always under the lock) --
    def _read(self) -> dict[str, Lease]:
        if not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text() or "{}")
        except json.JSONDecodeError:
            return {}  # a torn file cannot happen (atomic writes); an edited one must not break the server
        return {k: Lease(**v) for k, v in raw.get("leases", {}).items()}

    def _write(self, leases: dict[str, Lease]) -> None:
        write_text_atomic(json.dumps({"leases": {k: asdict(v) for k, v in sorted(leases.items())}}, indent=2),
                          self.path)

    def _active(self, leases: dict[str, Lease], now: float) -> dict[str, Lease]:
        return {k: v for k, v in leases.items() if v.active(now)}

    # -- public API --
    def active(self, now: float | None = None) -> dict[str, Lease]:
        """Leases that have not expired (image id -> lease)."""
        now = time.time() if now is None else now
        with self._lock:
            return self._active(self._read(), now)

    def held_by_others(self, holder: str, now: float | None = None) -> set[str]:
        return {k for k, v in self.active(now).items() if v.holder != holder}

    def acquire(self, image: str, holder: str, ttl_s: float | None = None, strategy: str = "",
                now: float | None = None, **kw) -> Lease | None:
        """Lease ``image`` to ``holder`` (renewing their own lease); None if someone else holds it."""
        return self.acquire_first([image], holder, ttl_s=ttl_s, strategy=strategy, now=now, **kw)

    def acquire_first(self, ranked: Sequence[str], holder: str, ttl_s: float | None = None,
                      strategy: str = "", exclude: Iterable[str] = (), now: float | None = None,
                      anonymous: bool = False, anonymous_limit: int | None = None) -> Lease | None:
        """Lease the first image of ``ranked`` nobody else holds (and not in ``exclude``), atomically.

        The holder's other leases end (one image at a time), and the image they hold now is tried last:
        asking again means "skip", so it is renewed only when no other image is free. An ``anonymous`` holder gets
        :class:`LeaseLimitError` when anonymous clients already hold ``anonymous_limit`` leases.
        """
        now = time.time() if now is None else now
        ttl = self.ttl_s if ttl_s is None else float(ttl_s)
        skip = set(exclude)
        with self._lock:
            leases = self._active(self._read(), now)
            mine = [i for i in ranked if i in leases and leases[i].holder == holder]
            # asking again is a skip: the holder's current image comes last (renewed only if nothing else is free)
            for image in [i for i in ranked if i not in mine] + mine:
                if image in skip:
                    continue
                cur = leases.get(image)
                if cur is not None and cur.holder != holder:
                    continue
                others = {k: v for k, v in leases.items() if v.holder != holder}
                if anonymous and anonymous_limit is not None and cur is None:
                    holders = {v.holder for v in others.values() if v.anonymous}
                    if len(holders) >= anonymous_limit:
                        raise LeaseLimitError(f"{len(holders)} other clients without a token already hold a "
                                              f"lease (limit {anonymous_limit} holders)")
                lease = Lease(image, holder, cur.since if cur else now, now + ttl, strategy, anonymous)
                others[image] = lease
                self._write(others)
                return lease
            self._write(leases)  # drops expired leases
            return None

    def release(self, image: str, holder: str | None = None) -> bool:
        """Free ``image`` (only if ``holder`` holds it, when given). True if a lease was removed."""
        with self._lock:
            leases = self._read()
            cur = leases.get(image)
            if cur is None or (holder is not None and cur.holder != holder):
                return False
            del leases[image]
            self._write(leases)
            return True
