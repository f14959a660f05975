"""The background queue that keeps stored pseudo labels current: one job at a time, in a daemon thread.

Why a queue of its own: a pseudo label takes a minute or more on a CPU (seconds on a GPU per query), and
every annotator would otherwise wait for one at each request. The queue computes them ahead, in the order
they will be asked for (``wanted()``: the images whose stored result is not current, first the one the
active-learning strategy hands out next), and only while no interactive request is running
(``may_start()``). A request for an image with no result yet jumps the queue (:meth:`PseudoQueue.request`)
and may wait for it (:meth:`PseudoQueue.wait`); if its client goes away the job still finishes into the
store, so the work is never lost and never done twice.

The queue's state file (``pending``, ``failed``) says what was left when the process stopped; a restarted
queue recomputes ``wanted()`` from the store, so unfinished work resumes and finished work is not redone.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from ..io import write_text_atomic

log = logging.getLogger(__name__)


def _describe(exc: Exception) -> str:
    """How a failed job reads in /info, the state file and a waiter's answer."""
    return f"{type(exc).__name__}: {exc}"


class PseudoQueue:
    """``compute(image_id)`` stores one image's result (raises on failure); ``wanted()`` lists, in order,
    the images whose stored result is not current; ``may_start()`` says a background job may start now."""

    def __init__(self, state_path: str | Path, compute: Callable[[str], None], wanted: Callable[[], list],
                 may_start: Callable[[], bool] = lambda: True, poll_s: float = 0.5, relist_s: float = 5.0):
        self.state_path = Path(state_path)
        self.compute, self.wanted, self.may_start, self.poll_s = compute, wanted, may_start, poll_s
        self.relist_s = relist_s  # changes nobody announced (a label put in by hand) are seen this late at most
        self._listed = 0.0
        self._cond = threading.Condition()
        self._urgent: collections.deque[str] = collections.deque()
        self._pending: list[str] = []
        self._failed: dict[str, Exception] = {}  # the exception itself: a waiter tells input from fault by it
        self._finished: collections.Counter = collections.Counter()
        self._running: tuple[str, float] | None = None
        self._durations: collections.deque[float] = collections.deque(maxlen=8)
        self._dirty = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.resumed = self._previous_pending()

    # ---------------------------------------------------------------- control
    def start(self) -> "PseudoQueue":
        if self._thread is None:
            if self.resumed:
                log.info("pseudo-label queue: %d image(s) were pending when the server stopped; resuming",
                         len(self.resumed))
            self._thread = threading.Thread(target=self._loop, name="pseudo-label-queue", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 0.0) -> None:
        """Take no new job; the running one (if any) is left to the process's end (nothing partial is
        written: the store writes atomically, and a restart recomputes what was not stored)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and timeout > 0:
            self._thread.join(timeout)

    def refresh(self, reason: str = "") -> None:
        """The supports or the images changed: list the wanted images again and retry the failed ones."""
        with self._cond:
            self._dirty = True
            self._failed.clear()
            self._cond.notify_all()
        if reason:
            log.info("pseudo-label queue refreshed: %s", reason)

    def request(self, image_id: str) -> int:
        """Put ``image_id`` first (a client waits for it); returns a ticket for :meth:`wait`."""
        with self._cond:
            ticket = self._finished[image_id]
            running = self._running and self._running[0] == image_id
            if not running and image_id not in self._urgent:
                self._urgent.append(image_id)
            self._cond.notify_all()
            return ticket

    def wait(self, image_id: str, ticket: int, timeout: float | None = None) -> str | None:
        """Block until the job for ``image_id`` after ``ticket`` finished; returns None when it stored a
        result, else why not (its error, "stopping", or "timeout")."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._finished[image_id] <= ticket:
                if self._stop:
                    return "stopping"
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return "timeout"
                self._cond.wait(left if left is not None else 1.0)
            failure = self._failed.get(image_id)
            return _describe(failure) if failure is not None else None

    def error(self, image_id: str) -> Exception | None:
        """The exception of ``image_id``'s last failed job (None when it did not fail): a waiter raises the
        request's own problem (an input error) as such, not as a fault of the server."""
        with self._cond:
            return self._failed.get(image_id)

    # ---------------------------------------------------------------- what /info shows
    def status(self) -> dict:
        with self._cond:
            running = self._running
            pending = [i for i in list(self._urgent) + self._pending if not running or i != running[0]]
            pending = list(dict.fromkeys(pending))
            mean = sum(self._durations) / len(self._durations) if self._durations else None
            eta = None
            if mean is not None:
                left_running = max(0.0, mean - (time.time() - running[1])) if running else 0.0
                eta = round(left_running + mean * len(pending), 1)
            return {"running": running[0] if running else None, "pending": len(pending),
                    "pending_images": pending, "failed": {i: _describe(e) for i, e in self._failed.items()},
                    "mean_job_s": round(mean, 2) if mean is not None else None,
                    "eta_s": eta if (pending or running) else 0.0,
                    "stopped": self._stop}

    # ---------------------------------------------------------------- the worker thread
    def _previous_pending(self) -> list[str]:
        try:
            return list(json.loads(self.state_path.read_text()).get("pending", []))
        except (OSError, ValueError):
            return []

    def _save(self) -> None:
        st = self.status()
        pending = ([st["running"]] if st["running"] else []) + st["pending_images"]
        try:
            write_text_atomic(json.dumps({"pending": pending, "failed": st["failed"], "ts": time.time()}),
                              self.state_path)
        except OSError as exc:  # the state file is a record, not a requirement
            log.warning("pseudo-label queue: cannot write %s: %s", self.state_path.name, exc)

    def _next(self) -> str | None:
        """The next job, or None (wait): an urgent request first; background work only when allowed."""
        with self._cond:
            if self._urgent:
                return self._urgent.popleft()
            dirty = self._dirty or time.monotonic() - self._listed > self.relist_s
        if dirty:
            try:
                wanted = list(self.wanted())
            except Exception as exc:  # noqa: BLE001 - a broken listing must not end the queue
                log.warning("pseudo-label queue: listing the wanted images failed: %s", exc)
                wanted = []
            with self._cond:
                self._pending = [i for i in wanted if i not in self._failed]
                self._dirty = False
                self._listed = time.monotonic()
            self._save()
        with self._cond:
            if self._pending and self.may_start():
                return self._pending.pop(0)
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
            image_id = self._next()
            if image_id is None:
                with self._cond:
                    if not self._stop and not self._urgent:
                        self._cond.wait(self.poll_s)
                continue
            t0 = time.time()
            with self._cond:
                self._running = (image_id, t0)
            self._save()
            failure = None
            try:
                self.compute(image_id)
            except Exception as exc:  # noqa: BLE001 - reported per image, the queue goes on
                failure = exc
                log.warning("pseudo label of %s failed: %s", image_id, _describe(exc))
            with self._cond:
                self._running = None
                if failure is None:
                    self._durations.append(time.time() - t0)
                    self._failed.pop(image_id, None)
                else:
                    self._failed[image_id] = failure
                self._finished[image_id] += 1
                self._dirty = True  # what is wanted is listed again (a save may have come meanwhile)
                self._cond.notify_all()
            self._save()
