"""The organ looks interactive corrections use, learned in the background from the datastore's final labels
(a thin shell over ``ssl_medsam2.interactive.appearance``).

Why in the background: learning takes seconds per organ and listing a PACS's labels can take longer; a
click must never wait for either. The clicks use the newest model learned so far (none at first: the
engine then uses its histogram term, as it does for a base nobody vouches for). A model is named by what it
learned from (the final labels' ids and file fingerprints, and the settings), is saved under
``<state>/appearance/<digest>.npz`` (atomic, no pickles) so that a restart reads it back, and a changed set of
final labels learns a new one, one at a time.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from pathlib import Path

from ssl_medsam2.interactive.appearance import (AppearanceModel, AppearanceSettings, examples_digest, fit_appearance,
                                                labelled_examples)
from ssl_medsam2.preprocess import IntensityConfig

from .workspace import Workspace

log = logging.getLogger(__name__)

RECHECK_S = 10.0  # how often (at most) the final labels are listed again for a change
SHUTDOWN_S = 5.0  # at exit, how long a stopping fit is waited for


class AppearanceStore:
    """The current :class:`AppearanceModel` of one app, kept fresh by one background thread."""

    def __init__(self, ws: Workspace, class_ids):
        self.ws, self.class_ids = ws, tuple(int(c) for c in class_ids if c)
        self.settings = AppearanceSettings.from_config(ws.cfg)
        self.folder = Path(ws.state_dir) / "appearance"
        self._model: AppearanceModel | None = None
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._checked = float("-inf")
        self._stop = threading.Event()
        atexit.register(self._shutdown)  # a fit in flight stops (daemon threads inside torch abort at exit)

    def _shutdown(self) -> None:
        self._stop.set()
        worker = self._worker
        if worker is not None:
            worker.join(SHUTDOWN_S)

    def current(self) -> AppearanceModel | None:
        """The newest model learned (None before the first); starts a background check of the final labels
        when the last one is older than :data:`RECHECK_S`."""
        with self._lock:
            due = time.monotonic() - self._checked >= RECHECK_S
            if due and (self._worker is None or not self._worker.is_alive()) and self.class_ids:
                self._checked = time.monotonic()
                self._worker = threading.Thread(target=self._refresh, name="appearance", daemon=True)
                self._worker.start()
            return self._model

    def changed(self) -> None:
        """The final labels may have changed (a server start, a saved label): check them now."""
        with self._lock:
            self._checked = float("-inf")
        self.current()

    def wait(self, timeout: float | None = None) -> AppearanceModel | None:
        """The model once the running check (and fit) has finished (tests, benches)."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        return self._model

    def _wanted(self):
        chosen = self.ws.newest_final_labelled(self.settings.max_images)  # id -> (image path, label path)
        names = sorted(chosen)
        prints = [(st.st_mtime_ns, st.st_size) for st in (os.stat(chosen[n][1]) for n in names)]
        return examples_digest(names, prints, self.settings), [(n, *chosen[n]) for n in names]

    def _refresh(self) -> None:
        try:
            digest, items = self._wanted()
            if not items or (self._model is not None and self._model.digest == digest):
                return
            path = self.folder / f"{digest}.npz"
            if path.is_file():
                try:
                    self._model = AppearanceModel.load(path)
                    return
                except (OSError, ValueError, KeyError) as exc:
                    log.warning("appearance model %s unreadable (%s): learning it again", path.name, exc)
            t0 = time.time()
            model = fit_appearance(labelled_examples(items, intensity=IntensityConfig.from_config(self.ws.cfg)),
                                   self.class_ids, self.settings, digest=digest, should_stop=self._stop.is_set)
            model.save(path)
            self._model = model
            log.info("organ looks learned from %d final label(s) in %.1f s", len(items), time.time() - t0)
        except InterruptedError:
            log.info("learning the organ looks stopped: the server is shutting down")
        except Exception:  # a bad label must not stop the clicks: they go on with the histogram term
            log.exception("learning the organ looks failed; interactive corrections use the histogram term")
