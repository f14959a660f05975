"""FSL-nnUNet: few-shot pseudo labels, then nnU-Net rounds that refine them while they get better.

Round 0 is the few-shot engine's pseudo labels (or labels the user already has). Round k exports
ground truth + round k-1 pseudo labels, trains nnU-Net, and predicts every pseudo-labelled volume to
get round k's pseudo labels (:mod:`.one_round`). A round is deployed only if the quality gate
(:mod:`.gate`) finds it not worse than the deployed one on a held-out labelled case; a worse round
stops the refinement. Otherwise the loop stops when the change (1 - mean Dice between a round's
pseudo labels and the previous round's) falls below ``nnunet.min_change`` or after
``nnunet.max_rounds``. How long a round trains is ``nnunet.schedule`` (:mod:`.schedule`).

Every round stays on disk as a version (:class:`.layout.RunLayout`); ``final.json`` names the
deployed one and is written after every round. Resumable (:mod:`.runstate`): finished steps (round 0
per case, each round's model, each predicted case) are never recomputed, a round stopped mid-training
continues from nnU-Net's latest checkpoint, raising ``max_rounds`` continues the history, another
schedule applies from the round in progress, and other changed training settings are refused.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..io import InputError, list_volumes, load_label_for, load_volume
from ..preprocess import InputSettings, with_dataset_class_names
from . import gate as gate_mod
from . import one_round, runstate
from . import schedule as schedule_mod
from .layout import RunLayout
from .reporting import ProgressLine, Ticker, loud
from .settings import NnUNetSettings

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]
#: seconds between progress ticks (the console's elapsed time, the app's total_time and ETA count down)
TICK_S = 1.0


def should_stop(changes: list[float], min_change: float | None, max_rounds: int) -> tuple[bool, str]:
    """The convergence rule on the history of round changes (round 1 first)."""
    if changes and min_change is not None and changes[-1] < float(min_change):
        return True, f"converged: change {changes[-1]:.4f} < min_change {float(min_change)}"
    if len(changes) >= int(max_rounds):
        return True, f"reached max_rounds={int(max_rounds)}"
    return False, ""


def _classes(cfg: dict, labels: dict[str, Path]) -> list[int]:
    want = InputSettings.from_config(cfg).classes
    if want:
        return sorted(int(c) for c in want)
    import nibabel as nib

    found: set[int] = set()
    for p in labels.values():
        found |= set(int(v) for v in np.unique(np.asarray(nib.load(str(p)).dataobj))) - {0}
    if not found:
        raise InputError(None, "the ground-truth labels contain no foreground class")
    return sorted(found)


def _engine_name(cfg, engine, pseudo_labels_dir, pseudo_labelled) -> str:
    """What makes round 0's pseudo labels of ``pseudo_labelled`` (the unlabelled and gate cases); state.json
    records it and ``predict`` uses it when round 0 is deployed. ``cfg``: with the engine chosen."""
    if not pseudo_labelled:
        return "none (every image has a label)"
    if pseudo_labels_dir is not None:
        return "given:" + str(Path(pseudo_labels_dir).resolve())
    if engine is not None:
        return engine.name
    return str(cfg["protocol"]["engine"])


def _schedule_hook(state: dict, layout: RunLayout, settings: NnUNetSettings):
    """The schedule for every round: resolved once (after round 1's preprocessing, from a measured speed),
    said in one line, recorded in state.json; later rounds and resumed runs reuse it. Returns the settings
    with it filled in and its training-time estimate (the round's ETA until an epoch measures one)."""
    def schedule_for(probe: Callable[[], float]) -> tuple[NnUNetSettings, float | None]:
        if state.get("schedule") is None:
            sched = schedule_mod.resolve(settings, settings.torch_device().type, it_per_s=probe())
            state["schedule"] = sched.as_dict()
            runstate.save(layout, state)
            log.info("%s", sched.describe(settings.max_rounds))
        sched = schedule_mod.Schedule.from_dict(state["schedule"])
        return settings.with_schedule(sched), sched.seconds()

    return schedule_for


def run_ssl(images_dir, labels_dir, work_dir, cfg: dict, pseudo_labels_dir=None,
            progress: ProgressFn | None = None, engine=None, show_progress: bool = True, executor=None,
            label_origins: Mapping[str, Sequence[Path]] | None = None, gate_turn: int = 0) -> dict:
    """The whole SSL-MedSAM2 pipeline on a folder; resumable. Returns the final state dict.

    ``images_dir``: every volume (nnU-Net names like ``case_0000.nii.gz`` work); ``labels_dir``:
    ground truth for some of them (the rest get pseudo labels). ``pseudo_labels_dir``: use these
    as round 0 instead of running the few-shot engine (a labels folder, or a pseudo-label output
    folder with labels/ and entropy/). ``engine``: a few-shot engine object (default: the config's).
    ``progress`` gets every event (stage, round, epoch, ...); ``show_progress`` draws the console line.
    ``executor``: where round 0's few-shot cases and each round's predictions run (default: the one the
    config names, :func:`ssl_medsam2.cluster.executor_for`).
    ``label_origins``: labelled case -> stored pseudo label(s) its label may have been saved from (the
    labelled cases' files in ``pseudo_labels_dir`` count too); a label identical to one never gates.
    ``gate_turn``: which person-made labelled case gates (rotate it between trainings, :mod:`.gate`).
    """
    if executor is None:
        from ..cluster import executor_for

        executor = executor_for(cfg)
    layout = RunLayout(work_dir)
    cfg = with_dataset_class_names(cfg, images_dir)
    settings = NnUNetSettings.from_config(cfg)  # a bad nnunet setting (schedule, ...) fails before any work
    images = list_volumes(images_dir)
    if not images:
        raise InputError(images_dir, "no NIfTI image (.nii / .nii.gz) in this folder")
    labels = list_volumes(labels_dir)
    unknown = sorted(set(labels) - set(images))
    if unknown:
        raise InputError(labels_dir, f"labels without an image: {', '.join(unknown)}")
    if not labels:
        raise InputError(labels_dir, "no ground-truth label: at least one labelled volume is needed")
    for n, p in labels.items():  # every input checked before any work
        load_label_for(load_volume(images[n], name=n), p)
    unlabelled = sorted(set(images) - set(labels))
    classes = _classes(cfg, labels)
    origins = {n: list(v) for n, v in (label_origins or {}).items()}
    if pseudo_labels_dir is not None:
        given = Path(pseudo_labels_dir) / "labels" if (Path(pseudo_labels_dir) / "labels").is_dir() \
            else Path(pseudo_labels_dir)
        for n, p in list_volumes(given).items():
            if n in labels:
                origins.setdefault(n, []).append(p)
    edits = gate_mod.unchanged_pseudo_labels(images, labels, origins) if settings.gate_mode != "off" else {}
    gate, gate_why = gate_mod.pick_gate_cases(sorted(labels), settings, edits, gate_turn)
    if engine is None and pseudo_labels_dir is None and unlabelled + gate:
        from ..engines import with_engine_chosen

        cfg = with_engine_chosen(cfg)  # says once which engine round 0 uses, and why
    engine_name = _engine_name(cfg, engine, pseudo_labels_dir, unlabelled + gate)
    state = runstate.open_state(layout, runstate.settings(settings, engine_name), sorted(labels), unlabelled, classes,
                                gate, gate_why, {"images": str(Path(images_dir).resolve()),
                                                 "labels": str(Path(labels_dir).resolve())})
    state["max_rounds"] = settings.max_rounds
    state["min_change"] = settings.min_change
    runstate.save(layout, state)
    log.info("%s", state["gate"]["why"])

    line = ProgressLine(show_progress)
    lock = threading.Lock()  # events come from this thread and from the ticker's

    def report(event: dict) -> None:
        with lock:
            line(event)
            if progress is not None:
                progress(event)

    t_start = time.perf_counter()
    ticker = Ticker(lambda ev: _locked(lock, line, ev), TICK_S).start()  # the console's clock; callers tick theirs
    try:
        if not state["round0"]["done"]:
            t = time.perf_counter()
            report({"stage": "pseudo_label", "round": 0, "max_rounds": state["max_rounds"]})
            one_round.make_round0(layout, images_dir, labels_dir, images, labels, unlabelled, gate, cfg,
                                  pseudo_labels_dir, engine, show_progress, executor)
            state["round0"].update(done=True, seconds=round(time.perf_counter() - t, 1))
            log.info("round 0 done (%s) in %.0fs", engine_name, time.perf_counter() - t)
        if state.get("deployed") is None:
            s0 = gate_mod.gate_score(layout.labels(0), gate, images, labels, classes)
            state["deployed"] = {"round": 0, "gate_dice": None if s0 is None else s0["dice"],
                                 "message": "round 0 (few-shot pseudo labels)"
                                 + ("" if s0 is None else f": held-out gate Dice {s0['dice']:.4f}")}
            runstate.write_final(layout, state)  # round 0 is deployed: `predict` serves it from now on
            runstate.save(layout, state)

        history = layout.finished_rounds(state["max_rounds"])  # rounds finished by an earlier run
        # their gate decisions: state.json may predate the last metrics.json (a run stopped between the two),
        # and the next round is gated against the round really deployed
        for h in history:
            _deploy(state, h)
        schedule_for = _schedule_hook(state, layout, settings)
        if state.get("schedule") is not None:
            log.info("%s (recorded in state.json)", schedule_mod.Schedule.from_dict(state["schedule"])
                     .describe(state["max_rounds"]))
        stop, reason = _verdict(history, state)
        while not stop:
            k = len(history) + 1
            t = time.perf_counter()
            log.info("round %d/%d: train on %d labelled + %d pseudo-labelled volumes", k, state["max_rounds"],
                     len(labels) - len(gate), len(unlabelled) + len(gate))
            metrics = one_round.run_round(k, layout, cfg, images, labels, unlabelled, gate, classes, history,
                                          state["deployed"], schedule_for, report, executor)
            history.append(metrics)
            state["rounds"] = [runstate.round_summary(h) for h in history]
            _deploy(state, metrics)
            runstate.write_final(layout, state)
            runstate.save(layout, state)
            log.info("round %d done in %.0fs (%s): change %.4f, labelled fit %s, %s", k, time.perf_counter() - t,
                     _split(metrics.get("seconds") or {}), metrics["change"], _f(metrics["labelled_dice"]),
                     metrics["gate_message"])
            report({"stage": "round_done", "round": k, "max_rounds": state["max_rounds"], "change": metrics["change"],
                    "best_metric": metrics["gate_dice"] if metrics["gate_dice"] is not None
                    else metrics["labelled_dice"], "deployed": metrics["deployed"],
                    "gate_message": metrics["gate_message"]})
            stop, reason = _verdict(history, state)
    finally:
        ticker.stop()
        line.close()
    state["rounds"] = [runstate.round_summary(h) for h in history]
    state["stop_reason"] = reason
    state["converged"] = reason.startswith("converged")
    state["gate_refused"] = [h["round"] for h in history if h.get("deployed") is False]
    runstate.write_final(layout, state)
    runstate.save(layout, state)
    if state["gate_refused"]:
        loud(state["final"]["warning"])
    log.info("FSL-nnUNet finished: %s (%d round(s), this run %.0fs); deployed: round %d", reason, len(history),
             time.perf_counter() - t_start, state["deployed"]["round"])
    event = {"stage": "done", "round": len(history), "max_rounds": state["max_rounds"],
             "change": history[-1]["change"] if history else None, "deployed_round": state["deployed"]["round"],
             "best_metric": state["deployed"].get("gate_dice"), "gate_refused": state["gate_refused"]}
    if progress is not None:
        progress(event)
    return state


def _locked(lock: threading.Lock, fn: Callable[[dict], object], event: dict) -> None:
    with lock:
        fn(event)


def _split(seconds: dict) -> str:
    """Where a round's time went: training, and what a ``minutes:N`` schedule does not count."""
    words = {"export_s": "export", "plan_preprocess_s": "plan + preprocess", "train_s": "training",
             "predict_s": "predict"}
    return ", ".join(f"{w} {seconds[k]:.0f}s" for k, w in words.items() if seconds.get(k) is not None)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _deploy(state: dict, metrics: dict) -> None:
    """Apply a finished round's gate decision to ``state['deployed']`` (idempotent)."""
    if metrics.get("deployed", True) and int(metrics["round"]) >= int(state["deployed"]["round"]):
        state["deployed"] = {"round": int(metrics["round"]), "gate_dice": metrics.get("gate_dice"),
                             "message": metrics.get("gate_message")}


def _verdict(history: list[dict], state: dict) -> tuple[bool, str]:
    refused = [h for h in history if h.get("deployed") is False]
    if refused:
        return True, refused[0]["gate_message"]
    return should_stop([h["change"] for h in history], state["min_change"], state["max_rounds"])
