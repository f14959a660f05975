"""One FSL-nnUNet round, and round 0.

Round 0 (:func:`make_round0`): few-shot pseudo labels for every unlabelled case (or validated copies
of pseudo labels the user already has), plus leave-one-out few-shot pseudo labels of the quality
gate's held-out labelled case(s) (:mod:`.gate`).

Round k (:func:`run_round`): export ground truth + round k-1 pseudo labels as an nnU-Net dataset,
plan (round 1) / reuse round 1's plans, preprocess, train (resuming from ``checkpoint_latest.pth``
when a previous attempt was stopped mid-training), predict the pseudo-labelled and labelled cases
(:func:`predict_cases`), measure, apply the quality gate and write ``metrics.json`` last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..executors import LOCAL, CaseJob, CasesFailed, Executor
from ..io import (InputError, atomic_write, link_or_copy, list_volumes, load_label_for, load_volume, save_like,
                  write_text_atomic)
from ..metrics import mean_dice
from ..quality import failed_cases
from ..uncertainty import binary_entropy
from . import gate as gate_mod
from . import train as nn_train
from .export import export_dataset, verify
from .layout import RunLayout
from .reporting import plot_curves
from .settings import NnUNetSettings

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]
#: called after preprocessing with a speed probe; returns the nnunet settings with the schedule filled in
ScheduleFn = Callable[[Callable[[], float]], tuple[NnUNetSettings, float | None]]


def emit(progress: ProgressFn | None, **event) -> None:
    if progress is not None:
        progress(event)


# --- round 0 ------------------------------------------------------------------------------------

def _copy_given(src_dir: Path, layout: RunLayout, names: Sequence[str], images: Mapping[str, Path]) -> list[str]:
    """Validated copies of given pseudo labels (and entropy maps when present); returns the names not given."""
    lab_dir = src_dir / "labels" if (src_dir / "labels").is_dir() else src_dir
    given = list_volumes(lab_dir)
    ent_dir = src_dir / "entropy" if (src_dir / "entropy").is_dir() else None
    for n in [n for n in names if n in given]:
        image = load_volume(images[n], name=n)
        lab = load_label_for(image, given[n])
        if ent_dir is not None and (ent_dir / f"{n}.nii.gz").exists():
            atomic_write(layout.entropy(0) / f"{n}.nii.gz",
                         lambda tmp, src=ent_dir / f"{n}.nii.gz": shutil.copyfile(src, tmp))
        save_like(lab.array, image, layout.labels(0) / f"{n}.nii.gz", dtype=lab.array.dtype,
                  description="ssl-medsam2 round 0 (given)")
    return [n for n in names if n not in given]


def _gate_supports(layout: RunLayout, labels: Mapping[str, Path], gate: Sequence[str]) -> Path:
    """A folder of links to the labelled cases minus the gate cases: the gate cases' few-shot supports."""
    d = layout.gate_supports
    d.mkdir(parents=True, exist_ok=True)
    for n, p in labels.items():
        link = d / f"{n}.nii.gz"
        if n not in gate and not link.exists():
            link_or_copy(p, link)
    return d


def make_round0(layout: RunLayout, images_dir, labels_dir, images: Mapping[str, Path], labels: Mapping[str, Path],
                unlabelled: Sequence[str], gate: Sequence[str], cfg: dict, pseudo_labels_dir=None, engine=None,
                show_progress: bool = True, executor: Executor | None = None) -> None:
    """Round 0 pseudo labels: unlabelled cases from the engine (all labelled supports) or ``pseudo_labels_dir``;
    gate cases leave-one-out (the other labelled cases as supports) unless ``pseudo_labels_dir`` has them.
    The engine's cases run on ``executor`` (default: this process)."""
    from ..pseudo_label import pseudo_label_folder

    def missing(names):
        return [n for n in names if not (layout.labels(0) / f"{n}.nii.gz").exists()]

    todo = missing(unlabelled)
    if todo and pseudo_labels_dir is not None:
        absent = _copy_given(Path(pseudo_labels_dir), layout, todo, images)
        if absent:
            raise InputError(pseudo_labels_dir, f"no pseudo label for unlabelled case(s): {', '.join(absent)}")
    elif todo:
        log.info("round 0: few-shot pseudo labels for %d case(s)", len(todo))
        pseudo_label_folder(images_dir, labels_dir, layout.round(0), cfg, engine=engine,
                            show_progress=show_progress, names=todo, executor=executor)
    todo = missing(gate)
    if todo and pseudo_labels_dir is not None:
        todo = _copy_given(Path(pseudo_labels_dir), layout, todo, images)
    if todo:
        log.info("round 0: leave-one-out few-shot pseudo labels for the gate case(s) %s", ", ".join(todo))
        pseudo_label_folder(images_dir, _gate_supports(layout, labels, gate), layout.round(0), cfg, engine=engine,
                            show_progress=show_progress, names=todo, executor=executor)


# --- predicting -----------------------------------------------------------------------------------

def load_model(model_dir: Path, settings: NnUNetSettings, log_path: Path | None = None):
    """The model for prediction; nnU-Net's loading chatter goes to ``log_path`` (the round's nnunet.log)."""
    from .predict import NnUNetModel

    with nn_train.nnunet_output(log_path):
        return NnUNetModel(model_dir, device=settings.torch_device(), use_mirroring=settings.use_mirroring,
                           num_threads=settings.cpu_threads)


def is_predicted(out_dir: Path, name: str) -> bool:
    """Both of a case's prediction files are there (labels are written last, so this means finished)."""
    return all((Path(out_dir) / kind / f"{name}.nii.gz").exists() for kind in ("labels", "entropy"))


#: what a worker on another machine needs of a model folder besides the checkpoints
MODEL_FILES = ("dataset.json", "plans.json", "dataset_fingerprint.json")


def model_files(model_dir: Path, checkpoint_name: str = "checkpoint_final.pth") -> dict[str, bytes]:
    """A trained model folder as {relative path: bytes} (for a worker that cannot read this disk)."""
    model_dir = Path(model_dir)
    files = {n: (model_dir / n).read_bytes() for n in MODEL_FILES if (model_dir / n).exists()}
    for ck in sorted(model_dir.glob(f"fold_*/{checkpoint_name}")):
        files[str(ck.relative_to(model_dir))] = ck.read_bytes()
    return files


class NnUNetPredictWorker:
    """A loaded nnU-Net model: one volume in, its label and entropy files (bytes) out."""

    def __init__(self, model, round_no: int, keep=None):
        self.model, self.round_no = model, round_no
        self._keep = keep  # the scratch model folder of a portable worker lives as long as the worker

    def units(self, volume) -> int:
        return 1

    def run(self, volume, progress: Callable[[int], None] | None = None) -> dict[str, bytes]:
        label, probs = self.model.predict_volume(volume)
        entropy = (binary_entropy(probs[1:]).max(axis=0) if probs.shape[0] > 1
                   else np.zeros(volume.shape, np.float32))
        with tempfile.TemporaryDirectory(prefix="ssl_medsam2_case_") as tmp:
            save_like(entropy, volume, Path(tmp) / "entropy.nii.gz", dtype=np.float32,
                      description="ssl-medsam2 nnU-Net entropy (bits)")
            save_like(label, volume, Path(tmp) / "labels.nii.gz", dtype=label.dtype,
                      description=f"ssl-medsam2 round {self.round_no}")
            files = {kind: (Path(tmp) / f"{kind}.nii.gz").read_bytes() for kind in ("entropy", "labels")}
        if progress is not None:
            progress(1)
        return files


@dataclass
class NnUNetPredictSpec:
    """How to build an :class:`NnUNetPredictWorker`: the model folder here (loaded once into ``cache``), or,
    made :meth:`portable`, its files as bytes unpacked into a scratch folder by the worker."""

    model_dir: Path
    settings: NnUNetSettings
    round_no: int
    log_path: Path | None = None
    cache: dict | None = None
    files: dict[str, bytes] | None = None

    def build(self) -> NnUNetPredictWorker:
        if self.files is not None:
            tmp = tempfile.TemporaryDirectory(prefix="ssl_medsam2_nnunet_worker_")
            model_dir = Path(tmp.name) / "model"
            for rel, data in self.files.items():
                (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                (model_dir / rel).write_bytes(data)
            return NnUNetPredictWorker(load_model(model_dir, self.settings), self.round_no, keep=tmp)
        cache = {} if self.cache is None else self.cache
        if str(self.model_dir) not in cache:
            cache[str(self.model_dir)] = load_model(self.model_dir, self.settings, self.log_path)
        return NnUNetPredictWorker(cache[str(self.model_dir)], self.round_no)

    def portable(self) -> "NnUNetPredictSpec":
        return dataclasses.replace(self, files=model_files(self.model_dir), log_path=None, cache=None)


def predict_cases(model_dir: Path, settings: NnUNetSettings, images: Mapping[str, Path], names: Sequence[str],
                  out_dir: Path, round_no: int, progress: ProgressFn | None = None, cache: dict | None = None,
                  log_path: Path | None = None, executor: Executor | None = None, count_from: int = 0,
                  total: int | None = None) -> list[str]:
    """Predict these cases with this model: ``out_dir/labels/<case>`` + ``out_dir/entropy/<case>`` (max over
    classes, bits), each on its source grid. Cases already there are skipped; returns the ones predicted.

    ``cache``: a dict that keeps the loaded model between calls of one round (it is loaded only when
    something is left to predict). ``executor``: where the cases run (default: this process). Progress
    events count ``count_from + i`` of ``total`` (default: this call's).
    """
    out_dir = Path(out_dir)
    todo = [n for n in names if not is_predicted(out_dir, n)]
    if not todo:
        return []
    done = [0]

    def write(name: str, files: dict[str, bytes]) -> None:
        for kind in ("entropy", "labels"):  # labels last: both present = done
            atomic_write(out_dir / kind / f"{name}.nii.gz", lambda tmp, b=files[kind]: Path(tmp).write_bytes(b))
        done[0] += 1
        emit(progress, stage="predict", round=round_no, case=name, done=count_from + done[0],
             total=total if total is not None else len(todo))

    job = CaseJob(desc=f"round {round_no}: predict", doing=f"round {round_no}: predicting",
                  worker=NnUNetPredictSpec(Path(model_dir), settings, round_no, log_path, cache),
                  read=lambda name: load_volume(images[name], name=name), write=write)
    failed = (executor or LOCAL).run(job, todo, show_progress=False)
    if failed:
        raise CasesFailed(failed, len(todo) - len(failed))
    return todo


# --- training -------------------------------------------------------------------------------------

def train_round(k: int, layout: RunLayout, cfg: dict, images: Mapping[str, Path], train_labels: Mapping[str, Path],
                pseudo_names: Sequence[str], classes: Sequence[int], schedule_for: ScheduleFn,
                progress: ProgressFn | None = None) -> dict:
    """Export, plan/preprocess and train round ``k`` (or resume it); returns the seconds spent per step.

    A folder ``round_k/nnunet/`` with ``prepared.json`` means export + preprocessing finished; with a
    ``checkpoint_latest.pth`` inside, training continues from it (the epoch count goes on).
    """
    settings = NnUNetSettings.from_config(cfg)
    max_rounds = settings.max_rounds
    root, nn_log, model_dir = layout.nnunet_root(k), layout.nnunet_log(k), layout.model(k)
    marker = root / "prepared.json"
    times: dict[str, float] = {}
    prepared = marker.exists()
    if root.exists() and not prepared:
        shutil.rmtree(root)  # an attempt stopped before preprocessing finished: start the round over
    with nn_train.nnunet_env(root, settings):
        if not prepared:
            t = time.perf_counter()
            emit(progress, stage="export", round=k, max_rounds=max_rounds)
            prev = layout.round(k - 1)
            # a round-0 pseudo label that failed the quality gate trains no round (its case is left out)
            excluded = failed_cases(layout.round(0) / "summaries", pseudo_names)
            if excluded:
                log.warning("round %d: %d pseudo label(s) failed the quality gate and stay out of training: %s",
                            k, len(excluded), ", ".join(excluded))
            pseudo = {n: prev / "labels" / f"{n}.nii.gz" for n in pseudo_names if n not in excluded}
            entropy = {n: prev / "entropy" / f"{n}.nii.gz" for n in pseudo_names}
            ds = export_dataset(root / "raw", images, train_labels, pseudo, classes, cfg, entropy=entropy)
            if k == 1:
                with nn_train.nnunet_output(nn_log):
                    verify(ds, max(1, settings.num_processes))
            times["export_s"] = time.perf_counter() - t
            t = time.perf_counter()
            emit(progress, stage="plan", round=k, max_rounds=max_rounds)
            first = layout.model(1)
            nn_train.plan_and_preprocess(settings, reuse_from=first if k > 1 and first.exists() else None,
                                         log_path=nn_log)
            write_text_atomic(json.dumps({"round": k}), marker)
            times["plan_preprocess_s"] = time.perf_counter() - t

        def probe() -> float:
            emit(progress, stage="speed", round=k, max_rounds=max_rounds)
            return nn_train.measure_speed(settings, log_path=nn_log)

        scheduled, estimate_s = schedule_for(probe)

        def on_train(ev: dict) -> None:
            if ev.get("epoch_s") is None and estimate_s:  # before the first epoch: the schedule's estimate
                ev = {**ev, "eta_s": round(estimate_s * (1 - ev["epoch"] / max(1, ev["total_epochs"])), 1)}
            emit(progress, **ev, round=k, max_rounds=max_rounds)
        init = None
        if settings.fine_tune and k > 1:
            init = layout.model(k - 1) / f"fold_{settings.fold_id}" / "checkpoint_final.pth"
        t = time.perf_counter()
        nn_train.train_model(scheduled, model_dir, init_checkpoint=init, log_path=nn_log, resume=True,
                             progress=on_train)
        times["train_s"] = time.perf_counter() - t
    if not settings.keep_intermediate:
        shutil.rmtree(root, ignore_errors=True)
    log.info("round %d: trained in %.0fs", k, times["train_s"])
    return times


def _checkpoint_info(ckpt: Path) -> tuple[float | None, str | None]:
    """(nnU-Net's best EMA pseudo Dice, trainer class name) from a checkpoint; informative only."""
    try:
        import torch

        c = torch.load(str(ckpt), map_location="cpu", weights_only=False)
        ema = c.get("_best_ema")
        return (None if ema is None else float(ema)), c.get("trainer_name")
    except Exception:
        return None, None


# --- one round ------------------------------------------------------------------------------------

def run_round(k: int, layout: RunLayout, cfg: dict, images: Mapping[str, Path], labels: Mapping[str, Path],
              unlabelled: Sequence[str], gate: Sequence[str], classes: Sequence[int], history: list[dict],
              deployed: dict, schedule_for: ScheduleFn, progress: ProgressFn | None = None,
              executor: Executor | None = None) -> dict:
    """Train round ``k`` on ground truth (minus the gate cases) + round k-1 pseudo labels, predict (on
    ``executor``, default this process), measure, decide deployment against ``deployed``
    ({"round", "gate_dice"}); writes and returns its metrics."""
    settings = NnUNetSettings.from_config(cfg)
    max_rounds = settings.max_rounds
    fold = settings.fold_id
    model_dir = layout.model(k)
    ckpt = model_dir / f"fold_{fold}" / "checkpoint_final.pth"
    train_labels = {n: p for n, p in labels.items() if n not in gate}
    pseudo_names = sorted(unlabelled) + sorted(gate)
    times: dict[str, float] = {}
    if not ckpt.exists():
        times.update(train_round(k, layout, cfg, images, train_labels, pseudo_names, classes, schedule_for,
                                 progress))
    else:
        log.info("round %d: model already trained, reusing %s", k, model_dir)
    t = time.perf_counter()
    n_pseudo = sum(not is_predicted(layout.round(k), n) for n in pseudo_names)
    n_all = n_pseudo + sum(not is_predicted(layout.labelled_predictions(k), n) for n in train_labels)
    emit(progress, stage="predict", round=k, max_rounds=max_rounds, done=0, total=n_all)
    cache: dict = {}  # the model loads once for both calls (in this process)
    nn_log = layout.nnunet_log(k)
    predict_cases(model_dir, settings, images, pseudo_names, layout.round(k), k, progress, cache, nn_log, executor,
                  total=n_all)
    predict_cases(model_dir, settings, images, sorted(train_labels), layout.labelled_predictions(k), k, progress,
                  cache, nn_log, executor, count_from=n_pseudo, total=n_all)
    times["predict_s"] = time.perf_counter() - t

    change = {}
    for n in pseudo_names:
        img = load_volume(images[n], name=n)
        a = load_label_for(img, layout.labels(k) / f"{n}.nii.gz").array
        b = load_label_for(img, layout.labels(k - 1) / f"{n}.nii.gz").array
        change[n] = mean_dice(a, b, classes)
    fit = {}
    for n in sorted(train_labels):
        img = load_volume(images[n], name=n)
        a = load_label_for(img, layout.labelled_predictions(k) / "labels" / f"{n}.nii.gz").array
        fit[n] = mean_dice(a, load_label_for(img, labels[n]).array, classes)
    ema, trainer_name = _checkpoint_info(ckpt)
    score = gate_mod.gate_score(layout.labels(k), gate, images, labels, classes)
    decision = gate_mod.decide(k, None if score is None else score["dice"], int(deployed["round"]),
                               deployed.get("gate_dice"), settings.gate_tolerance)
    metrics = {
        "round": k,
        "change": float(1.0 - np.mean(list(change.values()))) if change else 0.0,
        "min_change": settings.min_change,
        "dice_to_previous": change,
        "labelled_dice": float(np.mean(list(fit.values()))) if fit else None,
        "labelled_dice_per_case": fit,
        "labelled_dice_note": "labelled cases are in nnU-Net's training set (fit to ground truth, not held out)",
        "gate_dice": None if score is None else score["dice"],
        "gate_dice_per_case": None if score is None else score["per_case"],
        "gate_cases": list(gate),
        "deployed": decision.deploy,
        "gate_message": decision.message,
        "replaces": {"round": int(deployed["round"]), "gate_dice": deployed.get("gate_dice")},
        "nnunet_ema_pseudo_dice": ema,
        "model_dir": str(model_dir),
        "trainer": trainer_name,
        "configuration": settings.configuration,
        "fold": fold,
        "fine_tuned_from": str(layout.model(k - 1)) if settings.fine_tune and k > 1 else None,
        "seconds": {k2: round(v, 1) for k2, v in times.items()},
    }
    metrics["disk"] = keep_what_a_rollback_needs(model_dir, decision.deploy)
    plot_curves(history + [metrics], layout.curves(k), round0_gate=_round0_gate(history, deployed))
    write_text_atomic(json.dumps(metrics, indent=2), layout.metrics(k))  # written last: round done
    return metrics


def keep_what_a_rollback_needs(model_dir: Path, deployed: bool) -> str:
    """A round's model folder after the gate: ``checkpoint_final.pth`` stays for a deployed round (it is what
    ``predict`` loads and what a rollback returns to); ``checkpoint_best.pth`` (by nnU-Net's pseudo Dice on
    pseudo labels, never used here) goes, and so does every checkpoint of a round the gate refused (never
    deployed, and refinement stops after it). Returns what was done, in words (metrics.json ``disk``)."""
    gone = [p for p in Path(model_dir).glob("fold_*/checkpoint_*.pth")
            if p.name == "checkpoint_best.pth" or not deployed]
    freed = sum(p.stat().st_size for p in gone)
    for p in gone:
        p.unlink()
    kept = sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())
    what = "kept checkpoint_final.pth" if deployed else "refused by the quality gate: no checkpoint kept"
    return f"{what}; removed {len(gone)} checkpoint(s), {freed / 2**20:.0f} MB; model folder {kept / 2**20:.0f} MB"


def _round0_gate(history: list[dict], deployed: dict) -> float | None:
    if history:
        return history[0].get("replaces", {}).get("gate_dice")
    return deployed.get("gate_dice") if int(deployed["round"]) == 0 else None

