"""The app's side of pseudo labels computed ahead (library: ``ssl_medsam2.pseudo_store``): which few-shot
model the queue runs, what makes a stored result current, the order of the work, and the server's
shutdown. Only in the server process (child processes rebuild the app and leave ``ws.pseudo_ahead`` None).

- An infer of the queue's model on a datastore image answers with the stored result when there is one
  (``pseudo_label.source = "store"``, with ``computed_at``, ``supports``, ``current`` and
  ``newer_supports_pending``); ``fresh=true`` waits for a recomputation; an image with no result yet
  jumps the queue and the request waits for it (if its client goes away, the result still lands in the
  store). A result that is not current is served marked so, and its image jumps the queue.
- A result is current when its digest equals the digest of the engine, its settings, the content of every
  final label and the image file now (``ssl_medsam2.pseudo_store.producer_digest``).
- Background jobs run one at a time, only when no interactive request ran for ``pseudo_store.idle_s``,
  images leased to someone first, then in the order ``pseudo_store.strategy`` hands them out. With
  ``cluster.ray_address`` each job's engine runs on a Ray worker (same supports and settings); its label
  goes only to this store (``ran_on: ray``), never to the datastore's pseudo tag.
- SIGTERM: the queue takes no new job and the process exits within ``pseudo_store.shutdown_grace_s``
  even when a computation or a request is still running (all writes are atomic, so nothing is partial;
  the restarted queue recomputes what was not stored).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np

from ssl_medsam2.cluster import RayExecutor, cluster_address
from ssl_medsam2.config import Section
from ssl_medsam2.io import InputError, load_volume, save_like
from ssl_medsam2.pseudo_store import PseudoQueue, PseudoStore, file_fingerprint, producer_digest, producer_settings

from .infers import FewShotInfer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PseudoStoreSettings(Section):
    """The ``pseudo_store:`` section (meanings: configs/ssl_medsam2.yaml)."""

    SECTION = "pseudo_store"
    enabled: bool
    model: str
    strategy: str
    idle_s: float
    relist_s: float
    shutdown_grace_s: float


def _when(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None


class PseudoAhead:
    def __init__(self, app):
        self.app = app
        self.ws = app.workspace
        self.settings = PseudoStoreSettings.from_config(self.ws.cfg)
        self.store = PseudoStore(self.ws.pseudo_store_dir)
        partial = self.store.clean_partial()
        if partial:
            log.warning("pseudo-label store: removed %d partial file(s) a stopped server left", partial)
        self.queue = PseudoQueue(self.store.root / "queue.json", self._compute, self._wanted, self._may_start,
                                 relist_s=self.settings.relist_s)
        self._lock = threading.Lock()
        self._interactive = 0
        self._last_interactive = 0.0
        self._request = threading.local()  # per request thread: was it only served from the store?

    # ---------------------------------------------------------------- which model, what is current
    def task(self) -> FewShotInfer | None:
        """The few-shot task the queue runs (``pseudo_store.model``; auto: SAM2 when available, else atlas)."""
        names = ("sam2_fewshot", "atlas_fewshot") if self.settings.model == "auto" else (self.settings.model,)
        for n in names:
            t = self.app.infer_tasks.get(n)
            if isinstance(t, FewShotInfer) and t.availability()[0]:
                return t
        return None

    def serves(self, task: FewShotInfer, top_k: int) -> bool:
        mine = self.task()
        return mine is not None and task.engine_name == mine.engine_name and top_k == self._top_k(mine)

    @staticmethod
    def _top_k(task: FewShotInfer) -> int:
        return int(task.config()["top_k"] or 0)

    def _supports_digest(self, task: FewShotInfer) -> str:
        settings = producer_settings(self.ws.cfg) | {"top_k": self._top_k(task)}
        finals = {i: file_fingerprint(lab) for i, (_, lab) in self.ws.final_labelled().items()}
        return producer_digest(task.engine_name, settings, finals)

    def _digest(self, supports_digest: str, image_id: str) -> str:
        image = file_fingerprint(self.ws.datastore.get_image_uri(image_id))
        return hashlib.sha1(f"{supports_digest}:{image}".encode()).hexdigest()[:16]

    def is_current(self, task: FewShotInfer, image_id: str, supports_digest: str | None = None) -> bool:
        rec = self.store.record(task.engine_name, image_id)
        if not rec:
            return False
        try:
            return rec.get("digest") == self._digest(supports_digest or self._supports_digest(task), image_id)
        except (InputError, OSError) as exc:  # the image cannot be read now (e.g. a series still arriving)
            log.info("pseudo label of %s: its image cannot be read now: %s", image_id, exc)
            return False

    # ---------------------------------------------------------------- the queue's callbacks
    def _candidates(self) -> list[str]:
        ids = self.ws.unlabelled()
        if not str(self.ws.studies).startswith(("http://", "https://")):
            ids = [i for i in ids if str(self.ws.datastore.get_image_uri(i)).endswith((".nii.gz", ".nii"))]
        return ids

    def _wanted(self) -> list[str]:
        task = self.task()
        if task is None or not self.ws.final_labelled():
            return []
        cands = self._candidates()
        strategy = self.app.strategy_tasks.get(self.settings.strategy)
        ranked = strategy.rank(list(cands), {}) if strategy is not None else sorted(cands)
        leased = [i for i in sorted(self.ws.leases.active()) if i in cands]  # someone is looking at these now
        sd = self._supports_digest(task)
        return [i for i in dict.fromkeys(leased + list(ranked)) if not self.is_current(task, i, sd)]

    def _may_start(self) -> bool:
        with self._lock:
            return self._interactive == 0 and time.time() - self._last_interactive >= self.settings.idle_s

    def _compute(self, image_id: str) -> None:
        task = self.task()
        if task is None:
            raise RuntimeError("no few-shot model is available")
        digest = self._digest(self._supports_digest(task), image_id)  # before the supports are read
        t0 = time.time()
        image = self.ws.datastore.get_image_uri(image_id)
        query = load_volume(image, name=image_id)
        executor = RayExecutor(self.ws.cfg) if cluster_address(self.ws.cfg) else None  # one job, one image
        outputs, u = task.compute(query, image_id, self._top_k(task), executor=executor)
        label = np.asarray(outputs["label"], dtype=np.uint8)
        ran_on = {"ran_on": "ray", **executor.run_info()} if executor else {"ran_on": "server"}
        self.store.put(task.engine_name, image_id,
                       lambda tmp: save_like(label, query, tmp, dtype=np.uint8,
                                             description=f"ssl-medsam2 {task.engine_name} pseudo label"),
                       {"digest": digest, "image_fingerprint": file_fingerprint(image),
                        "seconds": round(time.time() - t0, 2), **ran_on,
                        **task.describe(outputs["summary"], u)})
        log.info("pseudo label of %s stored (%s on %s, %.1f s)", image_id, task.engine_name, ran_on["ran_on"],
                 time.time() - t0)

    # ---------------------------------------------------------------- requests
    @contextlib.contextmanager
    def interactive(self):
        """Around every client infer: background jobs wait until it is over, and for ``idle_s`` after one
        that computed (one only served from the store takes milliseconds and does not hold them back)."""
        self._request.from_store = False
        with self._lock:
            self._interactive += 1
        try:
            yield
        finally:
            with self._lock:
                self._interactive -= 1
                if not self._request.from_store:
                    self._last_interactive = time.time()

    def answer(self, task: FewShotInfer, image_id: str, fresh: bool = False) -> tuple[str, dict]:
        """(stored label path, response fields) for ``image_id``: the stored result, or (none yet, or
        ``fresh``) one computed now by the queue, ahead of its other work."""
        rec = self.store.record(task.engine_name, image_id)
        if rec is not None and rec.get("image_fingerprint") not in (
                None, file_fingerprint(self.ws.datastore.get_image_uri(image_id))):
            rec = None  # made from another copy of the image (e.g. a series read while it arrived): never served
        waited = False
        if fresh or rec is None:
            ticket = self.queue.request(image_id)
            error = self.queue.wait(image_id, ticket)
            failure = self.queue.error(image_id) if error else None
            if isinstance(failure, InputError):  # the request's own problem (e.g. no support yet): a 4xx
                raise InputError(None, failure.problem)  # the problem only: no server path in the answer
            if error:
                raise RuntimeError(f"the pseudo label of '{image_id}' could not be computed: {error}")
            rec, waited = self.store.record(task.engine_name, image_id), True
            if rec is None:
                raise RuntimeError(f"the pseudo label of '{image_id}' was computed but is not in the store")
        self._request.from_store = not waited
        current = rec.get("digest") == self._digest(self._supports_digest(task), image_id)
        if not current and image_id not in self.ws.final_labelled():  # a labelled image needs none any more
            self.queue.request(image_id)  # served as it is (said so), recomputed first
        fields = {k: rec.get(k) for k in ("engine", "supports", "uncertainty", "quality", "failed", "passed_classes",
                                          "mean_entropy_inside", "mean_entropy_boundary", "random_weights")}
        fields["pseudo_label"] = {"source": "computed" if waited else "store", "current": current,
                                  "newer_supports_pending": not current, "computed_at": _when(rec.get("computed_at")),
                                  "computed_s": rec.get("seconds"), "supports": rec.get("supports"),
                                  "ran_on": rec.get("ran_on", "server"),
                                  "digest": rec.get("digest")}
        return rec["path"], fields

    def status(self) -> dict:
        """/info: how many stored pseudo labels are current, pending, failed; the queue and its ETA."""
        q = self.queue.status()
        task = self.task()
        cands = self._candidates()
        current = 0
        if task is not None and self.ws.final_labelled():
            sd = self._supports_digest(task)
            current = sum(self.is_current(task, i, sd) for i in cands)
        return {"model": f"{task.engine_name}_fewshot" if task else None, "unlabelled": len(cands),
                "current": current, "pending": q["pending"] + (1 if q["running"] else 0), "running": q["running"],
                "failed": len(q["failed"]), "failed_reasons": q["failed"], "eta_s": q["eta_s"],
                "mean_job_s": q["mean_job_s"], "resumed_from_last_run": len(self.queue.resumed)}

    # ---------------------------------------------------------------- server life
    def start(self) -> "PseudoAhead":
        self.queue.start()
        self._on_sigterm()
        return self

    def _on_sigterm(self) -> None:
        """Chain a SIGTERM handler in front of the server's (uvicorn's graceful stop): stop the queue, and
        end the process after the grace period if a request or a computation still holds it."""
        grace = self.settings.shutdown_grace_s
        try:
            previous = signal.getsignal(signal.SIGTERM)
        except ValueError:
            return

        def on_term(sig, frame):
            log.warning("SIGTERM: the pseudo-label queue stops; exiting within %.0f s", grace)
            self.queue.stop()
            timer = threading.Timer(grace, lambda: os._exit(0))
            timer.daemon = True
            timer.start()
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL:
                os._exit(0)

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread: the server's own handling stays
            log.warning("pseudo-label queue: SIGTERM handler not installed (not the main thread)")
