"""FSL-nnUNet: few-shot pseudo labels, then nnU-Net rounds that refine them until they stop changing.

Round 0 is the few-shot engine's pseudo labels (or labels the user already has). Round k exports
ground truth + round k-1 pseudo labels, trains nnU-Net, and predicts every unlabelled volume to
get round k's pseudo labels. The change of a round is 1 - mean Dice between its pseudo labels and
the previous round's; the loop stops when it falls below ``nnunet.min_change`` or after
``nnunet.max_rounds``. Every round stays on disk as a version::

    work/round_000/labels/ (+ probabilities/ entropy/ summaries/ from the few-shot engine)
    work/round_001/model/      nnU-Net model folder (nnUNetPredictor loads it)
    work/round_001/labels/     refined pseudo labels      work/round_001/entropy/ (max over classes, bits)
    work/round_001/metrics.json, curves.png
    work/state.json            what is finished, with the settings it was made with
    work/final.json            {"round": k, "model_dir": ...}: the deployed model

Resumable: every finished step is recorded (round 0 per case, each round's model and each
predicted case) and never recomputed; re-running the same command continues where it stopped.
Raising ``max_rounds`` later continues the same history; changing training settings is refused.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..devices import resolve_device
from ..io import InputError, atomic_write, list_volumes, load_label_for, load_volume, save_like, write_text_atomic
from ..metrics import mean_dice
from ..uncertainty import binary_entropy
from . import train as nn_train
from .export import export_dataset, verify

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]

#: settings that change what a finished round contains; a work dir refuses to continue with others
FINGERPRINT_KEYS = ("configuration", "fold", "epochs", "iterations_per_epoch", "val_iterations", "fine_tune",
                    "ignore_entropy_threshold", "gpu_memory_target")


def round_dir(work_dir: Path, k: int) -> Path:
    return Path(work_dir) / f"round_{k:03d}"


def should_stop(changes: list[float], min_change: float | None, max_rounds: int) -> tuple[bool, str]:
    """The convergence rule on the history of round changes (round 1 first)."""
    if changes and min_change is not None and changes[-1] < float(min_change):
        return True, f"converged: change {changes[-1]:.4f} < min_change {float(min_change)}"
    if len(changes) >= int(max_rounds):
        return True, f"reached max_rounds={int(max_rounds)}"
    return False, ""


def _emit(progress: ProgressFn | None, **event) -> None:
    if progress is not None:
        progress(event)


def _load_state(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _save_state(path: Path, state: dict) -> None:
    write_text_atomic(json.dumps(state, indent=2), path)


def _settings(cfg: dict, engine_name: str) -> dict:
    ncfg = cfg.get("nnunet", {})
    return {**{k: ncfg.get(k) for k in FINGERPRINT_KEYS}, "round0": engine_name}


def _classes(cfg: dict, labels: dict[str, Path]) -> list[int]:
    want = cfg.get("input", {}).get("classes")
    if want:
        return sorted(int(c) for c in want)
    import nibabel as nib

    found: set[int] = set()
    for p in labels.values():
        found |= set(int(v) for v in np.unique(np.asarray(nib.load(str(p)).dataobj))) - {0}
    if not found:
        raise InputError(None, "the ground-truth labels contain no foreground class")
    return sorted(found)


def _round0(images_dir, labels_dir, work_dir: Path, cfg: dict, unlabelled: list[str], images: dict,
            pseudo_labels_dir, engine, show_progress: bool) -> None:
    """Round 0 pseudo labels: from the few-shot engine, or validated copies of ``pseudo_labels_dir``."""
    r0 = round_dir(work_dir, 0)
    missing = [n for n in unlabelled if not (r0 / "labels" / f"{n}.nii.gz").exists()]
    if not missing:
        return
    if pseudo_labels_dir is not None:
        src = Path(pseudo_labels_dir)
        lab_dir = src / "labels" if (src / "labels").is_dir() else src
        given = list_volumes(lab_dir)
        absent = [n for n in missing if n not in given]
        if absent:
            raise InputError(lab_dir, f"no pseudo label for unlabelled case(s): {', '.join(absent)}")
        ent_dir = src / "entropy" if (src / "entropy").is_dir() else None
        for n in missing:
            image = load_volume(images[n], name=n)
            lab = load_label_for(image, given[n])
            if ent_dir is not None and (ent_dir / f"{n}.nii.gz").exists():
                (r0 / "entropy").mkdir(parents=True, exist_ok=True)
                atomic_write(r0 / "entropy" / f"{n}.nii.gz",
                             lambda tmp, src=ent_dir / f"{n}.nii.gz": shutil.copyfile(src, tmp))
            save_like(lab.array, image, r0 / "labels" / f"{n}.nii.gz", dtype=lab.array.dtype,
                      description="ssl-medsam2 round 0 (given)")
        return
    from ..pseudo_label import pseudo_label_folder

    log.info("round 0: few-shot pseudo labels for %d case(s)", len(missing))
    pseudo_label_folder(images_dir, labels_dir, r0, cfg, engine=engine, show_progress=show_progress, names=missing)


def _predict_round(get_model, out_dir: Path, k: int, images: dict, names: list[str],
                   show_progress: bool, progress) -> None:
    """Predict ``names`` into out_dir/labels and out_dir/entropy; cases already there are skipped."""
    from tqdm.auto import tqdm

    todo = [n for n in names if not ((out_dir / "labels" / f"{n}.nii.gz").exists()
                                     and (out_dir / "entropy" / f"{n}.nii.gz").exists())]
    if not todo:
        return
    model = get_model()
    for i, n in enumerate(tqdm(todo, desc=f"round {k}: predict", unit="case", disable=not show_progress)):
        vol = load_volume(images[n], name=n)
        label, probs = model.predict_volume(vol)
        entropy = binary_entropy(probs[1:]).max(axis=0) if probs.shape[0] > 1 else np.zeros(vol.shape, np.float32)
        save_like(entropy, vol, out_dir / "entropy" / f"{n}.nii.gz", dtype=np.float32,
                  description="ssl-medsam2 nnU-Net entropy (bits)")
        save_like(label, vol, out_dir / "labels" / f"{n}.nii.gz", dtype=label.dtype,
                  description=f"ssl-medsam2 round {k}")
        _emit(progress, stage="predict", round=k, case=n, done=i + 1, total=len(todo))


def _predictions_dir(rdir: Path) -> Path:
    """Where a round's predictions of the labelled cases go (for its validation Dice)."""
    return rdir / "labelled_predictions"


def plot_curves(history: list[dict], path: Path) -> Path:
    """Round-to-round change and labelled-case Dice per round, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # nnU-Net imports seaborn, which restyles matplotlib globally (huge fonts): draw with the defaults
    with matplotlib.rc_context(rc=matplotlib.rcParamsDefault):
        rounds = [h["round"] for h in history]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        axes[0].plot(rounds, [h["change"] for h in history], "o-", label="change")
        if history and history[-1].get("min_change") is not None:
            axes[0].axhline(history[-1]["min_change"], color="grey", ls="--", label="min_change (stop below)")
        axes[0].set(xlabel="round", ylabel="1 - mean Dice to previous round", title="pseudo-label change",
                    ylim=(0, 1.02))
        axes[0].legend(fontsize=8)
        axes[1].plot(rounds, [h["labelled_dice"] for h in history], "o-",
                     label="labelled cases (in the training set)")
        ema = [h.get("nnunet_ema_pseudo_dice") for h in history]
        if any(e is not None for e in ema):
            axes[1].plot(rounds, [np.nan if e is None else e for e in ema], "s--", label="nnU-Net EMA pseudo Dice")
        axes[1].set(xlabel="round", ylabel="Dice", ylim=(0, 1.02), title="validation Dice")
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.set_xticks(rounds)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
        plt.close(fig)
    return path


def run_round(k: int, work_dir: Path, images: dict, labels: dict, unlabelled: list[str], classes: list[int],
              cfg: dict, history: list[dict], show_progress: bool = True,
              progress: ProgressFn | None = None) -> dict:
    """Train round ``k`` on ground truth + round k-1 pseudo labels, predict, measure; returns its metrics."""
    ncfg = cfg.get("nnunet", {})
    max_rounds = int(ncfg.get("max_rounds", 3))
    rdir = round_dir(work_dir, k)
    prev = round_dir(work_dir, k - 1)
    model_dir = rdir / "model"
    nn_root = rdir / "nnunet"
    nn_log = rdir / "nnunet.log"
    fold = nn_train._fold(ncfg)
    times: dict[str, float] = {}
    first_model = round_dir(work_dir, 1) / "model"
    if not (model_dir / f"fold_{fold}" / "checkpoint_final.pth").exists():
        if nn_root.exists():
            shutil.rmtree(nn_root)  # leftovers of an interrupted attempt
        with nn_train.nnunet_env(nn_root, ncfg):
            t = time.perf_counter()
            _emit(progress, stage="export", round=k, max_rounds=max_rounds)
            pseudo = {n: prev / "labels" / f"{n}.nii.gz" for n in unlabelled}
            entropy = {n: prev / "entropy" / f"{n}.nii.gz" for n in unlabelled}
            ds = export_dataset(nn_root / "raw", images, labels, pseudo, classes, cfg, entropy=entropy)
            if k == 1:
                verify(ds, max(1, int(ncfg.get("num_processes", 2))))
            times["export_s"] = time.perf_counter() - t
            t = time.perf_counter()
            _emit(progress, stage="plan", round=k, max_rounds=max_rounds)
            reuse = first_model if k > 1 and first_model.exists() else None
            nn_train.plan_and_preprocess(ncfg, reuse_from=reuse, log_path=nn_log)
            times["plan_preprocess_s"] = time.perf_counter() - t
            t = time.perf_counter()
            init = None
            if ncfg.get("fine_tune") and k > 1:
                init = round_dir(work_dir, k - 1) / "model" / f"fold_{fold}" / "checkpoint_final.pth"

            def _train_progress(ev):
                _emit(progress, **ev, round=k, max_rounds=max_rounds)

            nn_train.train_model(ncfg, model_dir, init_checkpoint=init, progress=_train_progress, log_path=nn_log)
            times["train_s"] = time.perf_counter() - t
        if not ncfg.get("keep_intermediate", False):
            shutil.rmtree(nn_root, ignore_errors=True)
        log.info("round %d: trained in %.0fs (export %.0fs, plan+preprocess %.0fs)", k, times["train_s"],
                 times["export_s"], times["plan_preprocess_s"])
    else:
        log.info("round %d: model already trained, reusing %s", k, model_dir)
    t = time.perf_counter()
    _emit(progress, stage="predict", round=k, max_rounds=max_rounds)
    loaded = []

    def get_model():  # loaded at most once per round, and only when something is left to predict
        if not loaded:
            from .predict import NnUNetModel

            loaded.append(NnUNetModel(model_dir, device=resolve_device(ncfg.get("device")),
                                      use_mirroring=bool(ncfg.get("use_mirroring", False)),
                                      num_threads=ncfg.get("cpu_threads")))
        return loaded[0]

    _predict_round(get_model, rdir, k, images, unlabelled, show_progress, progress)
    _predict_round(get_model, _predictions_dir(rdir), k, images, sorted(labels), show_progress, None)
    times["predict_s"] = time.perf_counter() - t

    per_case_change = {}
    for n in unlabelled:
        img = load_volume(images[n], name=n)
        a = load_label_for(img, rdir / "labels" / f"{n}.nii.gz").array
        b = load_label_for(img, prev / "labels" / f"{n}.nii.gz").array
        per_case_change[n] = mean_dice(a, b, classes)
    labelled_dice = {}
    for n in sorted(labels):
        img = load_volume(images[n], name=n)
        a = load_label_for(img, _predictions_dir(rdir) / "labels" / f"{n}.nii.gz").array
        labelled_dice[n] = mean_dice(a, load_label_for(img, labels[n]).array, classes)
    ckpt = model_dir / f"fold_{fold}" / "checkpoint_final.pth"
    ema = None
    try:
        import torch

        ema = torch.load(str(ckpt), map_location="cpu", weights_only=False).get("_best_ema")
        ema = None if ema is None else float(ema)
    except Exception:  # the metric is informative only
        pass
    metrics = {
        "round": k,
        "change": float(1.0 - np.mean(list(per_case_change.values()))) if per_case_change else 0.0,
        "min_change": ncfg.get("min_change"),
        "dice_to_previous": per_case_change,
        "labelled_dice": float(np.mean(list(labelled_dice.values()))),
        "labelled_dice_per_case": labelled_dice,
        "labelled_dice_note": "labelled cases are in nnU-Net's training set (fit to ground truth, not held out)",
        "nnunet_ema_pseudo_dice": ema,
        "model_dir": str(model_dir.resolve()),
        "trainer": nn_train.trainers.trainer_name_from_config(ncfg),
        "configuration": ncfg.get("configuration", "2d"),
        "fold": fold,
        "fine_tuned_from": str(round_dir(work_dir, k - 1) / "model") if ncfg.get("fine_tune") and k > 1 else None,
        "seconds": {k2: round(v, 1) for k2, v in times.items()},
    }
    plot_curves(history + [metrics], rdir / "curves.png")
    write_text_atomic(json.dumps(metrics, indent=2), rdir / "metrics.json")  # written last: round done
    return metrics


def run_ssl(images_dir, labels_dir, work_dir, cfg: dict, pseudo_labels_dir=None,
            progress: ProgressFn | None = None, engine=None, show_progress: bool = True) -> dict:
    """The whole SSL-MedSAM2 pipeline on a folder; resumable. Returns the final state dict.

    ``images_dir``: every volume (nnU-Net names like ``case_0000.nii.gz`` work); ``labels_dir``:
    ground truth for some of them (the rest get pseudo labels). ``pseudo_labels_dir``: use these
    as round 0 instead of running the few-shot engine (a labels folder, or a pseudo-label output
    folder with labels/ and entropy/). ``engine``: a few-shot engine object (default: the config's).
    """
    from tqdm.auto import tqdm

    work_dir = Path(work_dir).resolve()
    ncfg = cfg.get("nnunet", {})
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
    if not unlabelled:
        engine_name = "none (every image has a label)"
    elif pseudo_labels_dir is not None:
        engine_name = "given:" + str(Path(pseudo_labels_dir).resolve())
    else:
        engine_name = getattr(engine, "name", None) or cfg.get("protocol", {}).get("engine", "sam2")
    settings = _settings(cfg, engine_name)

    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / "state.json"
    state = _load_state(state_path)
    if state is not None:
        diff = {k: (state["settings"].get(k), v) for k, v in settings.items()
                if k != "round0" and state["settings"].get(k) != v}
        if diff:
            raise InputError(work_dir, "this work dir was made with other settings "
                                       + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                                       + "; use a new --work folder (or the old settings)")
        if state["labelled"] != sorted(labels) or state["unlabelled"] != unlabelled:
            raise InputError(work_dir, "this work dir was made with other images/labels; use a new --work folder")
    else:
        state = {"settings": settings, "labelled": sorted(labels), "unlabelled": unlabelled,
                 "classes": classes, "round0": {"done": False, "source": engine_name}, "rounds": []}
    state["max_rounds"] = int(ncfg.get("max_rounds", 3))
    state["min_change"] = ncfg.get("min_change")
    _save_state(state_path, state)

    t_start = time.perf_counter()
    if not state["round0"]["done"]:
        t = time.perf_counter()
        _emit(progress, stage="pseudo_label", round=0, max_rounds=state["max_rounds"])
        _round0(images_dir, labels_dir, work_dir, cfg, unlabelled, images, pseudo_labels_dir, engine,
                show_progress)
        state["round0"].update(done=True, seconds=round(time.perf_counter() - t, 1))
        _save_state(state_path, state)
        log.info("round 0 done (%s) in %.0fs", engine_name, time.perf_counter() - t)
    else:
        log.info("round 0 already done (%s)", state["round0"]["source"])

    history = []
    for k in range(1, state["max_rounds"] + 1):  # pick up rounds finished by an earlier run
        m = round_dir(work_dir, k) / "metrics.json"
        if not m.exists():
            break
        history.append(json.loads(m.read_text()))
    stop, reason = should_stop([h["change"] for h in history], state["min_change"], state["max_rounds"])
    with tqdm(total=state["max_rounds"], initial=len(history), desc="FSL-nnUNet rounds", unit="round",
              disable=not show_progress) as bar:
        while not stop:
            k = len(history) + 1
            t = time.perf_counter()
            log.info("round %d/%d: train on %d labelled + %d pseudo-labelled volumes", k, state["max_rounds"],
                     len(labels), len(unlabelled))
            metrics = run_round(k, work_dir, images, labels, unlabelled, classes, cfg, history, show_progress,
                                progress)
            history.append(metrics)
            state["rounds"] = [{kk: h[kk] for kk in ("round", "change", "labelled_dice", "model_dir")}
                               for h in history]
            _save_state(state_path, state)
            bar.update(1)
            log.info("round %d done in %.0fs: change %.4f, labelled Dice %.4f", k, time.perf_counter() - t,
                     metrics["change"], metrics["labelled_dice"])
            _emit(progress, stage="round_done", round=k, max_rounds=state["max_rounds"], change=metrics["change"],
                  best_metric=metrics["labelled_dice"])
            stop, reason = should_stop([h["change"] for h in history], state["min_change"], state["max_rounds"])
    state["rounds"] = [{kk: h[kk] for kk in ("round", "change", "labelled_dice", "model_dir")} for h in history]
    state["stop_reason"] = reason
    state["converged"] = reason.startswith("converged")
    if history:
        final = {"round": history[-1]["round"], "model_dir": history[-1]["model_dir"]}
        write_text_atomic(json.dumps(final, indent=2), work_dir / "final.json")
        state["final"] = final
    _save_state(state_path, state)
    log.info("FSL-nnUNet finished: %s (%d round(s), this run %.0fs)", reason, len(history),
             time.perf_counter() - t_start)
    _emit(progress, stage="done", round=len(history), max_rounds=state["max_rounds"],
          change=history[-1]["change"] if history else None,
          best_metric=history[-1]["labelled_dice"] if history else None)
    return state
