"""Where per-case work runs: the folder logic (pseudo labels, nnU-Net round predictions) hands its cases to
an executor and never asks where they go.

A :class:`CaseJob` splits one kind of per-case work where a process boundary may go:

- ``read(case)`` on the driver: the case's input, read and checked (an :class:`~ssl_medsam2.io.InputError`
  is bad input: reported once, never retried);
- ``worker``: a picklable :class:`WorkerSpec` whose ``build()`` loads what every case needs (the few-shot
  engine with its caches, the nnU-Net predictor) once per worker, and whose worker turns one input into its
  result (the finished files as bytes);
- ``write(case, result)`` on the driver: puts the result in place, all-or-nothing.

A worker that gains from several cases in one call (a :class:`GroupWorker`: the batched SAM2 engine, whose
queries then share its steps) gets groups of :func:`group_size` cases; every other worker gets one case at a
time. A group that fails is run again case by case (:func:`run_group`), so one bad case fails only itself.

:class:`LocalExecutor` runs everything in this process with one progress bar (every input is read and
checked before any work; the first error stops the run). The Ray executor
(:class:`ssl_medsam2.cluster.RayExecutor`) runs the workers as actors on a cluster with retries and a
per-worker log; the CLI, ``run_ssl`` and the app choose one (``ssl_medsam2.cluster.executor_for``) and pass
it down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


class CasesFailed(ValueError):
    """Some cases failed (each reported once with its reason); the others were written."""

    def __init__(self, failed: dict[str, str], written: int):
        self.failed = dict(failed)
        lines = "; ".join(f"{k}: {v.strip().splitlines()[-1] if v.strip() else v}" for k, v in failed.items())
        super().__init__(f"{len(failed)} case(s) failed (not retried), {written} written: {lines}")


class CaseWorker(Protocol):
    """What :meth:`WorkerSpec.build` returns: holds the loaded engine / model for every case it gets."""

    def units(self, payload: Any) -> int:
        """Progress units one case counts (the bar of :class:`LocalExecutor`)."""

    def run(self, payload: Any, progress: Callable[[int], None] | None = None) -> Any:
        """One case's input -> its result (picklable; what the job's ``write`` takes)."""


@runtime_checkable
class GroupWorker(Protocol):
    """Optional for a :class:`CaseWorker`: several cases in one call."""

    def group_size(self) -> int:
        """How many cases the next call should get (it may change once the worker has seen a case)."""

    def run_group(self, payloads: Sequence[Any], progress: Callable[[int], None] | None = None) -> list:
        """Each case's result, in order, as :meth:`CaseWorker.run` gives it."""


def group_size(worker: CaseWorker) -> int:
    """Cases per call for this worker: its :meth:`GroupWorker.group_size`, else 1."""
    return max(1, int(worker.group_size())) if isinstance(worker, GroupWorker) else 1


def run_group(worker: CaseWorker, payloads: Sequence[Any],
              progress: Callable[[int], None] | None = None) -> list[tuple[Any, Exception | None]]:
    """(result, None) or (None, error) for each payload, in order: one call for the group; if that fails
    and the group holds several cases, each case alone (its own result or its own error)."""
    try:
        if isinstance(worker, GroupWorker):
            return [(r, None) for r in worker.run_group(payloads, progress=progress)]
        return [(worker.run(p, progress=progress), None) for p in payloads]
    except Exception as exc:  # noqa: BLE001 - the caller reports it for its case
        if len(payloads) == 1:
            return [(None, exc)]
    return [o for p in payloads for o in run_group(worker, [p], progress)]


class WorkerSpec(Protocol):
    """A picklable recipe for a worker."""

    def build(self) -> CaseWorker:
        """The worker, loaded (called once per worker, in the process that runs the cases)."""

    def portable(self) -> "WorkerSpec":
        """This recipe for a machine that shares none of this one's disks or memory (e.g. model files as
        bytes instead of a path; no live objects)."""


@dataclass
class CaseJob:
    """One kind of per-case work, split for an executor (see the module docstring)."""

    desc: str  # the progress bar's label
    doing: str  # what the log says is done, before "<n> case(s) on <w> worker(s)"
    worker: WorkerSpec
    read: Callable[[str], Any]
    write: Callable[[str, Any], None]
    #: in this process, read and check every input before any work (and count progress in the worker's
    #: units); otherwise one input at a time, which keeps one volume in memory
    read_ahead: bool = False


class Executor:
    """Runs a :class:`CaseJob` over cases. Subclasses decide where; the folder logic decides what."""

    #: a re-run skips cases whose outputs are complete (the folder logic asks)
    skips_finished = False

    def run(self, job: CaseJob, cases: Sequence[str], show_progress: bool = True, initial: int = 0) -> dict[str, str]:
        """Every case read, run and written; returns {case: reason} of the cases that failed and were
        skipped (an executor that stops at the first error raises it instead)."""
        raise NotImplementedError

    def run_info(self) -> dict:
        """What a run's record (``run.json``) says about where it ran."""
        return {}

    def close(self) -> None:
        """Release what the executor holds (a cluster connection)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """In this process, one case (or one group of a :class:`GroupWorker`) after the other, under one progress
    bar; the first error stops the run (after the group's other cases are written).

    A re-run skips the cases whose outputs are complete and made by the same engine, settings and supports
    (``skips_finished``), as the Ray executor does: a stopped run resumes where it stopped.

    The worker is built once, and only when a case is left. With ``job.read_ahead`` every input is read
    and checked before any work (a bad one stops the run before anything is written) and the bar counts
    the worker's units; otherwise inputs are read a group at a time and the bar counts cases.
    """

    skips_finished = True

    def run(self, job: CaseJob, cases: Sequence[str], show_progress: bool = True, initial: int = 0) -> dict[str, str]:
        from tqdm.auto import tqdm

        if not cases:
            return {}
        inputs = {c: job.read(c) for c in cases} if job.read_ahead else {}
        worker = job.worker.build() if job.read_ahead else None
        if job.read_ahead:
            bar = tqdm(total=sum(worker.units(p) for p in inputs.values()), desc=job.desc, unit="run",
                       disable=not show_progress)
        else:
            bar = tqdm(total=initial + len(cases), initial=initial, desc=job.desc, unit="case",
                       disable=not show_progress)
        todo = list(cases)
        with bar:
            while todo:
                worker = worker or job.worker.build()
                n = group_size(worker)
                group, todo = todo[:n], todo[n:]
                bar.set_postfix_str(group[0] if len(group) == 1 else f"{group[0]} +{len(group) - 1}")
                payloads = [inputs.pop(c) if job.read_ahead else job.read(c) for c in group]
                outcomes = run_group(worker, payloads, progress=bar.update if job.read_ahead else None)
                for c, (result, exc) in zip(group, outcomes):
                    if exc is None:
                        job.write(c, result)
                errors = [exc for _, exc in outcomes if exc is not None]
                if errors:
                    raise errors[0]
                if not job.read_ahead:
                    bar.update(len(group))
        return {}


LOCAL = LocalExecutor()
