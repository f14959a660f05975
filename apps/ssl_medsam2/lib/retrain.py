"""Continuous retraining: every N new final labels schedule one ``ssl_nnunet`` run, debounced.

Annotators often save several labels in a row; starting a training run on each would queue runs that
are stale before they start. New final labels are counted in ``<state>/retrain.json`` (so a restart
does not forget them); once N have arrived, a timer starts and is pushed back by each further label,
and the run starts when the timer fires (queued behind a running one by MONAI Label).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

from filelock import FileLock

from ssl_medsam2.io import write_text_atomic

log = logging.getLogger(__name__)


class RetrainScheduler:
    def __init__(self, path, after_labels: int, debounce_s: float, start: Callable[[], object]):
        self.path = path
        self.after_labels = int(after_labels)
        self.debounce_s = float(debounce_s)
        self.start = start
        self._lock = FileLock(str(path) + ".lock")
        self._timer: threading.Timer | None = None
        self._tlock = threading.Lock()

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"pending": [], "scheduled_at": None, "runs": []}

    def state(self) -> dict:
        with self._lock:
            d = self._read()
        d.update({"after_labels": self.after_labels, "debounce_s": self.debounce_s})
        return d

    def label_saved(self, image_id: str) -> dict:
        """Count a new final label; returns the scheduler state (``scheduled_at`` when a run is due)."""
        if self.after_labels <= 0:
            return {"retrain": "off"}
        with self._lock:
            d = self._read()
            if image_id not in d["pending"]:
                d["pending"].append(image_id)
            due = len(d["pending"]) >= self.after_labels
            if due:
                d["scheduled_at"] = time.time() + self.debounce_s
            write_text_atomic(json.dumps(d, indent=2), self.path)
        if due:
            with self._tlock:
                if self._timer is not None:
                    self._timer.cancel()  # debounce: the latest label pushes the run back
                self._timer = threading.Timer(self.debounce_s, self._fire)
                self._timer.daemon = True
                self._timer.start()
        return {"retrain_pending": len(d["pending"]), "retrain_after_labels": self.after_labels,
                "retrain_scheduled_at": d.get("scheduled_at") if due else None}

    def _fire(self) -> None:
        with self._lock:
            d = self._read()
            labels = d["pending"]
            d.update(pending=[], scheduled_at=None)
            d.setdefault("runs", []).append({"ts": time.time(), "labels": labels})
            write_text_atomic(json.dumps(d, indent=2), self.path)
        log.info("continuous retraining: %d new final labels -> starting ssl_nnunet", len(labels))
        try:
            self.start()
        except Exception:
            log.exception("continuous retraining could not start the training task")
