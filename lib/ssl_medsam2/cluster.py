"""Scale out on a Ray cluster: the Ray executor (:class:`RayExecutor`) runs any per-case job
(:class:`ssl_medsam2.executors.CaseJob`: few-shot pseudo labels, nnU-Net round predictions) on workers.

The folder logic never imports this module; the CLI, ``run_ssl`` and the app pick the executor once
(:func:`executor_for`) and pass it down. Optional: Ray is imported only when an address is given (``--ray
ADDRESS`` or ``cluster.ray_address``); without one everything runs in-process. Addresses: ``local`` (start Ray
on this machine, loopback only), ``auto`` (the cluster this machine belongs to, e.g. inside a Slurm allocation
after ``ray start``), ``ray://host:10001`` (Ray Client, e.g. a KubeRay head service) or ``host:6379``.

How the work is spread:

- **Workers are Ray actors** (``cluster.cpus_per_worker`` CPUs, ``cluster.gpus_per_worker`` GPUs each),
  each building the job's worker once and keeping it: a pseudo-label worker its few-shot engine, whose caches
  (support features, prompt memories, registered supports) serve every query it gets; an nnU-Net worker its
  ``nnUNetPredictor``, loaded once for all its cases. A worker whose engine gains from several queries in
  one call (the batched SAM2 engine, ``sam2.campaign_queries``) gets them in groups of that size after its
  first case; every other worker gets one case at a time.
- **Inputs and outputs travel through Ray, not through a shared filesystem.** The driver reads and
  checks every input and ships it to a worker; the worker returns the finished files (compressed
  NIfTI / JSON bytes, encoded by the same code as in-process) and the driver writes them
  all-or-nothing. Workers therefore need no access to the driver's disks (KubeRay pods, cloud
  nodes), a case is written exactly once by one process, and a worker that dies mid-case never
  leaves a half-written file.
- **Fault tolerance.** A worker that dies mid-case (node lost, OOM kill) is restarted by Ray
  (``cluster.max_restarts``) and its cases are resubmitted at once to another live worker, up to
  ``cluster.max_case_attempts`` attempts. A case that fails on its input (or with any error inside
  the engine) is reported once, with its reason, and never retried; the other cases go on (a group
  that fails is run again case by case on its worker, so only the bad case fails).
- **Resumable.** Cases whose outputs are complete are skipped on a re-run.
- **Progress.** One tqdm bar on the driver over all cases; each finished case and, at the end, each
  worker's throughput (cases, cases/min, node) are logged.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import Section
from .executors import CaseJob, CasesFailed, Executor, LocalExecutor, group_size, run_group

__all__ = ["CasesFailed", "ClusterSettings", "RayExecutor", "cluster_address", "executor_for", "ray_session",
           "run_cases"]

log = logging.getLogger(__name__)

#: environment defaults for Ray processes this module starts (usage stats off, small footprint)
RAY_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


@dataclass(frozen=True)
class ClusterSettings(Section):
    """The ``cluster:`` section of the config, typed (what each key means: configs/ssl_medsam2.yaml)."""

    SECTION = "cluster"
    ray_address: str | None
    num_workers: int | None
    cpus_per_worker: float
    gpus_per_worker: float
    max_restarts: int
    max_case_attempts: int
    stall_timeout_s: float
    local_num_cpus: int | None
    local_num_gpus: int | None
    object_store_mb: int

    def __post_init__(self):
        addr = self.ray_address
        self._set(ray_address=str(addr) if addr not in (None, "", False) else None,
                  cpus_per_worker=float(self.cpus_per_worker or 0), gpus_per_worker=float(self.gpus_per_worker or 0),
                  max_restarts=int(self.max_restarts or 0), max_case_attempts=int(self.max_case_attempts or 0),
                  stall_timeout_s=float(self.stall_timeout_s or 0), object_store_mb=int(self.object_store_mb or 0),
                  **{n: int(getattr(self, n)) for n in ("num_workers", "local_num_cpus", "local_num_gpus")
                     if getattr(self, n) is not None})


def cluster_cfg(cfg: dict) -> ClusterSettings:
    return ClusterSettings.from_config(cfg)


def cluster_address(cfg: dict) -> str | None:
    """The configured Ray address, or None to run in-process."""
    return cluster_cfg(cfg).ray_address


def _import_ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError("a Ray address was given (--ray / cluster.ray_address) but Ray is not installed: "
                         "pip install -r requirements.txt (it pins ray), or leave the address unset to run "
                         "in-process") from exc
    return ray


@contextlib.contextmanager
def ray_session(address: str, ccfg: ClusterSettings):
    """Connect to Ray at ``address`` (or start a local one) for the duration; reuse an existing connection.

    ``local`` starts a private single-node Ray bound to 127.0.0.1 with ``cluster.local_num_cpus`` CPUs,
    a ``cluster.object_store_mb`` object store and no dashboard, and stops it at the end.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if address == "local":
        ncpu = ccfg.local_num_cpus or os.cpu_count() or 1
        ray.init(num_cpus=int(ncpu), num_gpus=ccfg.local_num_gpus,
                 object_store_memory=ccfg.object_store_mb * 2**20,
                 include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
                 log_to_driver=True)
    else:
        ray.init(address=address, configure_logging=False, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def _n_workers(ray, ccfg: ClusterSettings) -> int:
    """``cluster.num_workers``, or as many as the cluster's CPUs / GPUs allow right now."""
    if ccfg.num_workers:
        return ccfg.num_workers
    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // max(ccfg.cpus_per_worker, 1e-9))
    gpw = ccfg.gpus_per_worker
    if gpw > 0:
        n = min(n, int(res.get("GPU", 0) // gpw))
    if n < 1:
        raise ValueError(f"the Ray cluster ({res}) cannot hold one worker of {ccfg.cpus_per_worker} "
                         f"CPU(s) and {gpw} GPU(s); lower cluster.cpus_per_worker / gpus_per_worker")
    return n


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _limit_threads(cpus: float) -> None:
    """Keep a worker to its share of the node: torch and SimpleITK default to every core otherwise."""
    n = max(1, int(cpus))
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)  # atlas.threads > 0 still wins
    except ImportError:  # pragma: no cover
        pass


def _failure(case: str, exc: BaseException, input_error: bool) -> dict:
    return {"ok": False, "case": case, "input_error": input_error, "worker": _worker_id(),
            "error": f"{type(exc).__name__}: {exc}" if input_error else "".join(traceback.format_exception(exc))}


# --- the dispatcher: cases over actors, retried elsewhere when a worker dies ----------------------------

@dataclass
class _Stats:
    cases: int = 0
    busy_s: float = 0.0
    first: float = field(default_factory=time.perf_counter)
    last: float = 0.0


def run_cases(ray, make_actor: Callable[[], Any], n_workers: int, cases: Sequence[str],
              submit: Callable[[Any, list[str]], tuple[Any, dict[str, dict]]], on_result: Callable[[dict], None],
              ccfg: ClusterSettings, desc: str, show_progress: bool = True, initial: int = 0) -> dict[str, str]:
    """Run ``submit(actor, group)`` for groups of cases on ``n_workers`` actors; returns {case: reason} of failures.

    Each actor has one group in flight: one case until it answers, then as many as its last answer's
    ``group_size`` asks for (a worker that batches queries), at most an even share of what is left.
    ``submit`` returns (the actor's task ref, or None, and {case: failure result} of the group's cases it
    could not send, e.g. bad input); the ref's value is ``{"results": [one dict per case], "group_size": n}``.
    A case's result dict with ``ok`` goes to ``on_result`` (the driver writes it); ``ok: False`` is a
    reported failure (not retried). A dead worker (``RayActorError``) puts its group back at the front of
    the queue for the next live worker (at most ``cluster.max_case_attempts`` attempts per case); the actor
    itself is restarted by Ray (or replaced when out of restarts) and rejoins once its ``ready()`` answers.
    At most ``4 * n_workers`` actors are replaced in all (a worker that can never start, e.g.
    ``ssl_medsam2`` not importable on the nodes, must not be replaced forever); once every worker is gone,
    a ``RuntimeError`` names why.
    """
    from ray.exceptions import RayActorError, RayError
    from tqdm.auto import tqdm

    max_attempts = max(1, ccfg.max_case_attempts)
    stall_s = ccfg.stall_timeout_s
    todo = collections.deque(cases)
    attempts: dict[str, int] = collections.Counter()
    failed: dict[str, str] = {}
    idle: list = []  # (actor, cases per group it asked for)
    starting: dict = {}  # ready() ref -> actor
    busy: dict = {}  # task ref -> (actor, cases, t0, group size)
    stats: dict[str, _Stats] = collections.defaultdict(_Stats)
    max_replacements = n_workers * 4
    replacements = 0
    start_error = ""  # the last reason a worker could not start

    def start(actor=None):
        actor = actor or make_actor()
        starting[actor.ready.remote()] = actor

    for _ in range(min(n_workers, len(todo))):
        start()
    last_progress = time.perf_counter()
    with tqdm(total=initial + len(cases), initial=initial, desc=desc, unit="case",
              disable=not show_progress) as bar:

        def finish(case: str, result: dict, seconds: float, group: int) -> None:
            if result.get("ok"):
                on_result(result)
                s = stats[result.get("worker", "?")]
                rate = 60.0 * s.cases / max(s.last - s.first, 1e-9)
                log.info("%s done on %s in %.1fs%s (attempt %d; this worker: %d case(s), %.2f cases/min)",
                         case, result.get("worker"), seconds, f" (a group of {group})" if group > 1 else "",
                         attempts[case], s.cases, rate)
            else:
                failed[case] = result.get("error", "unknown error")
                log.error("%s failed on %s (%s, not retried): %s", case, result.get("worker"),
                          "bad input" if result.get("input_error") else "error", failed[case].strip())
            bar.update(1)

        while todo or busy:
            while idle and todo:
                actor, size = idle.pop()
                group = [todo.popleft() for _ in range(min(size, max(1, -(-len(todo) // n_workers))))]
                for case in group:
                    attempts[case] += 1
                ref, unsent = submit(actor, group)
                for case, result in unsent.items():
                    finish(case, result, 0.0, 1)
                if ref is None:
                    idle.append((actor, size))
                else:
                    busy[ref] = (actor, [c for c in group if c not in unsent], time.perf_counter(), size)
            refs = list(busy) + list(starting)
            if not refs:
                if todo:  # every worker failed to start and the replacements are spent
                    raise RuntimeError(f"no Ray worker left: {replacements} worker start(s) failed (at most "
                                       f"{max_replacements} are replaced); {len(todo)} case(s) left; the last "
                                       f"error: {start_error}")
                break  # the last group's cases were all unsent (bad input)
            done, _ = ray.wait(refs, num_returns=1, timeout=5.0)
            if not done:
                if not busy and time.perf_counter() - last_progress > stall_s:
                    raise RuntimeError(f"no Ray worker could be scheduled for {stall_s:.0f}s (each needs "
                                       f"{ccfg.cpus_per_worker} CPU(s), "
                                       f"{ccfg.gpus_per_worker} GPU(s); cluster has "
                                       f"{ray.available_resources()} free); {len(todo)} case(s) left")
                continue
            ref = done[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                    idle.append((actor, 1))
                    last_progress = time.perf_counter()
                except RayActorError as exc:  # out of restarts: replace it, up to max_replacements in all
                    replacements += 1
                    start_error = str(exc).strip()
                    log.warning("a worker could not start (%s)%s", type(exc).__name__,
                                "; starting a replacement" if replacements <= max_replacements else "")
                    if replacements <= max_replacements:
                        start()
                continue
            actor, group, t0, size = busy.pop(ref)
            try:
                answer = ray.get(ref)
            except RayActorError as exc:
                for case in reversed(group):
                    n = attempts[case]
                    log.warning("worker died while on %s (attempt %d/%d): %s", case, n, max_attempts,
                                type(exc).__name__)
                    if n >= max_attempts:
                        failed[case] = f"worker died on each of {n} attempts ({type(exc).__name__})"
                        log.error("%s: %s", case, failed[case])
                        bar.update(1)
                    else:
                        todo.appendleft(case)  # the next free worker takes it
                start(actor)  # Ray restarts it (max_restarts); it rejoins when ready() answers
                continue
            except RayError as exc:  # e.g. the result could not be transferred: report each case, do not loop
                answer = {"results": [{"ok": False, "case": c, "input_error": False, "worker": "?",
                                       "error": f"{type(exc).__name__}: {exc}"} for c in group]}
            idle.append((actor, max(1, int(answer.get("group_size") or size))))
            last_progress = time.perf_counter()
            seconds = time.perf_counter() - t0
            s = stats[answer.get("worker", "?")]
            s.cases += len(group)
            s.busy_s += seconds
            s.last = time.perf_counter()
            by_case = {r["case"]: r for r in answer["results"]}
            for case in group:
                finish(case, by_case.get(case) or {"ok": False, "worker": answer.get("worker", "?"),
                                                   "error": "the worker returned no result for it"},
                       seconds, len(group))
    for a in [a for a, _ in idle] + [b[0] for b in busy.values()] + list(starting.values()):
        with contextlib.suppress(Exception):
            ray.kill(a, no_restart=True)
    for w, s in sorted(stats.items()):
        log.info("worker %s: %d case(s), %.2f cases/min (busy %.0fs)", w, s.cases,
                 60.0 * s.cases / max(s.last - s.first, 1e-9), s.busy_s)
    return failed


def _actor_options(ccfg: ClusterSettings) -> dict:
    return {"num_cpus": ccfg.cpus_per_worker, "num_gpus": ccfg.gpus_per_worker,
            "max_restarts": ccfg.max_restarts, "max_task_retries": 0}


# --- the executor: a job's workers as Ray actors -----------------------------------------------------

class CaseActor:
    """A Ray actor: builds the job's worker (engine / predictor) on its first case and keeps it for all."""

    def __init__(self, spec, cpus: float):
        _limit_threads(cpus)
        self.spec = spec
        self.worker = None

    def ready(self) -> str:
        return _worker_id()

    def run_group(self, cases: list[str], *payloads) -> dict:
        """A group of cases (one call where the worker takes groups; a failed group case by case) ->
        ``{"results": [one dict per case], "group_size": how many the next group should hold}``."""
        from .io import InputError

        t0 = time.perf_counter()
        try:
            if self.worker is None:
                self.worker = self.spec.build()
        except Exception as exc:  # noqa: BLE001 - reported for each case of the group
            return {"results": [_failure(c, exc, isinstance(exc, InputError)) for c in cases], "worker": _worker_id()}
        outcomes = run_group(self.worker, payloads)
        seconds = round(time.perf_counter() - t0, 3)
        results = [_failure(c, exc, isinstance(exc, InputError)) if exc is not None else
                   {"ok": True, "case": c, "result": result, "worker": _worker_id(), "seconds": seconds}
                   for c, (result, exc) in zip(cases, outcomes)]
        return {"results": results, "group_size": group_size(self.worker), "worker": _worker_id()}


class RayExecutor(Executor):
    """A :class:`~ssl_medsam2.executors.CaseJob` over Ray actors (see the module docstring).

    The driver reads every input as a worker frees up (a bad one is a failed case, reported once and
    never sent) and writes every result; the job's worker recipe goes once to the object store, made
    :meth:`portable` (no driver paths, no live objects). Ray is connected for each job that has cases.
    """

    skips_finished = True

    def __init__(self, cfg: dict):
        self.ccfg = cluster_cfg(cfg)
        self.address = self.ccfg.ray_address

    def run_info(self) -> dict:
        return {"ray_address": self.address}

    def run(self, job: CaseJob, cases: Sequence[str], show_progress: bool = True, initial: int = 0) -> dict[str, str]:
        from .io import InputError

        if not cases:
            return {}
        ccfg = self.ccfg
        with ray_session(self.address, ccfg) as ray:
            n_workers = min(_n_workers(ray, ccfg), len(cases))
            log.info("%s %d case(s) on %d Ray worker(s)", job.doing, len(cases), n_workers)
            spec_ref = ray.put(job.worker.portable())
            Worker = ray.remote(CaseActor).options(**_actor_options(ccfg))
            loaded: dict[str, Any] = {}  # read + checked once here; kept for a resubmission

            def submit(actor, names):
                unsent = {}
                for name in names:
                    try:
                        if name not in loaded:
                            loaded[name] = ray.put(job.read(name))
                    except InputError as exc:  # bad input: a failed result, never sent to a worker
                        unsent[name] = _failure(name, exc, True)
                sent = [n for n in names if n not in unsent]
                return (actor.run_group.remote(sent, *[loaded[n] for n in sent]) if sent else None), unsent

            def on_result(res):
                loaded.pop(res["case"], None)
                job.write(res["case"], res["result"])

            return run_cases(ray, lambda: Worker.remote(spec_ref, ccfg.cpus_per_worker), n_workers, list(cases),
                             submit, on_result, ccfg, f"{job.desc} (Ray)", show_progress, initial=initial)


def executor_for(cfg: dict) -> Executor:
    """The executor the config names: Ray at ``cluster.ray_address``, else this process."""
    return RayExecutor(cfg) if cluster_address(cfg) else LocalExecutor()
