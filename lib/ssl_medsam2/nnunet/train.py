"""Plan, preprocess and train one nnU-Net model through nnunetv2's Python API.

Each training gets its own ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` under one
root folder (:func:`nnunet_env`), so rounds, work dirs and tests never see each other's datasets.
nnU-Net reads these variables lazily, so setting them in ``os.environ`` before each call is enough.

Training runs in this process (single device) so the epoch callback can drive progress bars; with
``nnunet.num_gpus > 1`` it runs ``nnUNetv2_train -num_gpus N`` in a subprocess instead (DDP needs
its own processes), which finds the same trainer by name through ``nnUNet_extTrainer``.
The trained folder (``dataset.json``, ``plans.json``, ``fold_<f>/checkpoint_final.pth``) is moved
into place only once complete, so its presence means training finished.

Mid-round resume: nnU-Net writes ``checkpoint_latest.pth`` every ``nnunet.checkpoint_every`` epochs
(its own default is 50, longer than a short schedule; :func:`nnunet_env` passes it to our trainer
class through the environment, so the DDP subprocess gets it too); :func:`latest_checkpoint` finds it and
:func:`train_model` ``resume=True`` continues from it the way ``nnUNetv2_train --c`` does
(``load_checkpoint``: weights, optimizer, epoch count, logs), so the epoch count goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from . import trainers
from .export import DATASET_ID, DATASET_NAME
from .settings import NnUNetSettings

log = logging.getLogger(__name__)

PLANS_NAME = "nnUNetPlans"


@contextlib.contextmanager
def nnunet_env(root: str | os.PathLike, settings: NnUNetSettings):
    """Point nnU-Net's three folders at ``root/{raw,preprocessed,results}`` for the duration (with the
    augmentation workers, compile and checkpoint interval of ``settings``)."""
    root = Path(root)
    new = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"),
           "nnUNet_n_proc_DA": str(settings.num_workers),
           trainers.CHECKPOINT_EVERY_ENV: str(settings.checkpoint_every)}
    if settings.torch_device().type == "cpu" or not settings.compile:
        new["nnUNet_compile"] = "false"
    for k in ("raw", "preprocessed", "results"):
        (root / k).mkdir(parents=True, exist_ok=True)
    with _env(**new):
        trainers.register()
        yield root


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _OnlyRootLogger(logging.Filter):
    def __init__(self, keep: bool):
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.name == "root") == self.keep


@contextlib.contextmanager
def nnunet_output(log_path: Path | None):
    """nnU-Net prints a lot (and logs through the root logger); send both to a log file so the one
    progress line stays readable."""
    if log_path is None:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    drop = _OnlyRootLogger(keep=False)
    with open(log_path, "a") as fh, contextlib.redirect_stdout(fh):
        to_file = logging.StreamHandler(fh)
        to_file.addFilter(_OnlyRootLogger(keep=True))
        handlers = list(root.handlers)
        for h in handlers:
            h.addFilter(drop)
        root.addHandler(to_file)
        try:
            yield
        finally:
            root.removeHandler(to_file)
            for h in handlers:
                h.removeFilter(drop)


def plan_and_preprocess(settings: NnUNetSettings, reuse_from: str | os.PathLike | None = None,
                        log_path: Path | None = None) -> Path:
    """Fingerprint + plan (or reuse a trained model's plans) and preprocess the exported dataset.

    ``reuse_from``: a model folder from an earlier round; its plans.json and dataset_fingerprint.json
    are reused so every round trains the identical network (fine-tuning needs that) and planning
    is not repeated. Returns the preprocessed dataset folder. Call inside :func:`nnunet_env`.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)

    nproc = max(1, settings.num_processes)
    conf = settings.configuration
    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which must then be >= 1
    with nnunet_output(log_path), _env(nnUNet_n_proc_DA=str(max(1, settings.num_workers))):
        if reuse_from is not None:
            reuse_from = Path(reuse_from)
            pre.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(reuse_from / "dataset_fingerprint.json", pre / "dataset_fingerprint.json")
            shutil.copyfile(reuse_from / "plans.json", pre / f"{PLANS_NAME}.json")
            shutil.copyfile(Path(os.environ["nnUNet_raw"]) / DATASET_NAME / "dataset.json", pre / "dataset.json")
        else:
            extract_fingerprints([DATASET_ID], num_processes=nproc, check_dataset_integrity=True,
                                 verbose=False, show_progress_bar=False)
            gpu_mem = settings.gpu_memory_target
            plan_experiments([DATASET_ID], gpu_memory_target_in_gb=float(gpu_mem) if gpu_mem else None)
        plans = json.loads((pre / f"{PLANS_NAME}.json").read_text())
        if conf not in plans["configurations"]:
            raise ValueError(f"nnU-Net did not plan configuration '{conf}' for this dataset "
                             f"(planned: {', '.join(plans['configurations'])}); set nnunet.configuration")
        preprocess([DATASET_ID], PLANS_NAME, configurations=(conf,), num_processes=(nproc,),
                   show_progress_bar=False)
    return pre


def _trained_dir(settings: NnUNetSettings) -> Path:
    """nnU-Net's output folder of this trainer/plans/configuration (inside :func:`nnunet_env`)."""
    return (Path(os.environ["nnUNet_results"]) / DATASET_NAME
            / f"{settings.trainer_name}__{PLANS_NAME}__{settings.configuration}")


def latest_checkpoint(settings: NnUNetSettings) -> Path | None:
    """The ``checkpoint_latest.pth`` an interrupted training of this schedule left behind, if any."""
    p = _trained_dir(settings) / f"fold_{settings.fold_id}" / "checkpoint_latest.pth"
    return p if p.exists() else None


def train_model(settings: NnUNetSettings, model_dir: str | os.PathLike,
                init_checkpoint: str | os.PathLike | None = None, progress: Callable[[dict], None] | None = None,
                log_path: Path | None = None, resume: bool = False) -> Path:
    """Train on the preprocessed dataset; the finished model folder lands at ``model_dir``.

    ``init_checkpoint``: start from these weights (fine-tuning from the previous round) instead of
    from scratch. ``resume``: continue from :func:`latest_checkpoint` when there is one (epoch count,
    optimizer and logs included). ``progress`` gets {"stage": "train", "epoch", "total_epochs",
    "best_metric", "pseudo_dice", "train_loss", "epoch_s", "iterations_per_epoch"} after every epoch.
    Call inside :func:`nnunet_env`.
    """
    model_dir = Path(model_dir)
    name = settings.trainer_name
    conf = settings.configuration
    fold = settings.fold_id
    device = settings.torch_device()
    if model_dir.exists():
        shutil.rmtree(model_dir)
    trained = _trained_dir(settings)
    resume_from = latest_checkpoint(settings) if resume else None
    if resume_from is None:  # a fresh start: no folder of an earlier attempt (or of another schedule) stays
        for old in trained.parent.glob(f"*__{PLANS_NAME}__{conf}") if trained.parent.is_dir() else []:
            shutil.rmtree(old)
    t0 = time.perf_counter()
    if settings.num_gpus > 1:
        _train_ddp(settings, init_checkpoint, log_path, resume_from is not None)
    else:
        _train_in_process(settings, device, init_checkpoint, progress, log_path, resume_from)
    ckpt = trained / f"fold_{fold}" / "checkpoint_final.pth"
    if not ckpt.exists():
        raise RuntimeError(f"nnU-Net finished without writing {ckpt}; see {log_path or 'its log'}")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(trained), str(model_dir))
    log.info("trained %s (%s, fold %s, %s) in %.0fs -> %s", name, conf, fold, device,
             time.perf_counter() - t0, model_dir)
    return model_dir


def _seed_and_threads(settings: NnUNetSettings) -> None:
    """What the speed probe and the training both set first: torch threads and the seed."""
    import numpy as np
    import torch

    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
        np.random.seed(settings.seed)


def _new_trainer(settings: NnUNetSettings, device, log_path: Path | None):
    """A trainer of ``settings.trainer_name`` on the preprocessed dataset (plans, dataset.json), not initialised."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    with nnunet_output(log_path):  # nnU-Net's class search prints
        trainer_cls = trainers.find_trainer(settings.trainer_name)
    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    plans = load_json(str(pre / f"{PLANS_NAME}.json"))
    plans["continue_training"] = False
    dataset_json = load_json(str(pre / "dataset.json"))
    with nnunet_output(log_path):
        return trainer_cls(plans=plans, configuration=settings.configuration, fold=settings.fold_id,
                           dataset_json=dataset_json, device=device)


def _train_in_process(settings: NnUNetSettings, device, init_checkpoint, progress, log_path, resume_from=None):
    import torch

    _seed_and_threads(settings)
    trainer = _new_trainer(settings, device, log_path)
    with nnunet_output(log_path):
        trainer.initialize()
        if resume_from is not None:
            trainer.load_checkpoint(str(resume_from))  # what nnUNetv2_train --c does
            done = getattr(trainer, "resumed_iterations", 0)
            log.info("resuming training from %s at epoch %d/%d%s", resume_from, trainer.current_epoch,
                     trainer.num_epochs, f", iteration {done}/{trainer.num_iterations_per_epoch}" if done else "")
        elif init_checkpoint is not None:
            state = torch.load(str(init_checkpoint), map_location="cpu", weights_only=False)["network_weights"]
            net = trainer.network.module if hasattr(trainer.network, "module") else trainer.network
            net = getattr(net, "_orig_mod", net)
            net.load_state_dict(state)  # same plans and labels -> every key and shape matches
        if progress is not None:
            def _cb(tr):
                lg = tr.logger
                ema = float(tr._best_ema) if tr._best_ema is not None else None
                last = lg.get_value("ema_fg_dice", step=-1)
                epoch_s = lg.get_value("epoch_end_timestamps", step=-1) - lg.get_value("epoch_start_timestamps",
                                                                                          step=-1)
                progress({"stage": "train", "epoch": tr.current_epoch, "total_epochs": tr.num_epochs,
                          "best_metric": ema, "pseudo_dice": None if last is None else float(last),
                          "train_loss": float(lg.get_value("train_losses", step=-1)),
                          "epoch_s": float(epoch_s), "iterations_per_epoch": tr.num_iterations_per_epoch})
            trainer.epoch_callback = _cb
            # the bar shows at once where training starts (epoch 0, or where a resumed one stands)
            progress({"stage": "train", "epoch": trainer.current_epoch, "total_epochs": trainer.num_epochs,
                      "iterations_per_epoch": trainer.num_iterations_per_epoch})
        trainer.run_training()


def measure_speed(settings: NnUNetSettings, log_path: Path | None = None, warmup: int = 2) -> float:
    """Training iterations per second on the preprocessed dataset, over ``settings.speed_probe_iterations``
    after ``warmup``.

    The same trainer, network, batch and augmentation workers as the real training; nothing is kept
    (its output folder is removed). Call inside :func:`nnunet_env`, after preprocessing.
    """
    import torch

    iterations = settings.speed_probe_iterations
    probe = dataclasses.replace(settings, epochs=1, iterations_per_epoch=max(1, iterations + warmup), val_iterations=1)
    _seed_and_threads(probe)
    trainer = _new_trainer(probe, probe.torch_device(), log_path)
    with nnunet_output(log_path):
        try:
            trainer.on_train_start()
            trainer.on_train_epoch_start()
            for _ in range(max(0, warmup)):
                trainer.train_step(next(trainer.dataloader_train))
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(max(1, iterations)):
                trainer.train_step(next(trainer.dataloader_train))
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            speed = max(1, iterations) / (time.perf_counter() - t)
        finally:
            for dl in (getattr(trainer, "dataloader_train", None), getattr(trainer, "dataloader_val", None)):
                if dl is not None and hasattr(dl, "_finish"):
                    dl._finish()
            shutil.rmtree(_trained_dir(probe), ignore_errors=True)
    log.info("measured %.3f training iterations/s (%d iterations after %d warm-up)", speed, iterations, warmup)
    return speed


def _train_ddp(settings: NnUNetSettings, init_checkpoint, log_path, resume=False):
    cmd = [sys.executable, "-c", "from nnunetv2.run.run_training import run_training_entry as m; m()",
           str(DATASET_ID), settings.configuration, str(settings.fold_id), "-tr", settings.trainer_name,
           "-num_gpus", str(settings.num_gpus)]
    if resume:
        cmd += ["--c"]
    elif init_checkpoint is not None:
        cmd += ["-pretrained_weights", str(init_checkpoint)]
    log.info("multi-GPU training: %s", " ".join(cmd[3:]))
    with open(log_path or os.devnull, "a") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ))
