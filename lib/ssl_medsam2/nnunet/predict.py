"""Run a trained nnU-Net model on volumes in memory or on a folder, keeping the source geometry.

Models are trained on canonical (RAS+) voxel arrays (see :mod:`.export`); nnU-Net's SimpleITK
reader hands the network an array in (z, y, x) order with the spacing reversed, so
:meth:`NnUNetModel.predict_volume` feeds it a :class:`~ssl_medsam2.io.Volume`'s canonical array in
exactly that layout: the model sees every volume the way it saw them in training, whatever the
file's storage orientation. (Stock ``nnUNetv2_predict`` works on RAS-stored files.)
Folder prediction writes every label through :func:`ssl_medsam2.io.save_like` (source affine, atomic).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..io import InputError, Volume, list_volumes, load_volume, save_like
from . import trainers
from .layout import RunLayout

log = logging.getLogger(__name__)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model folder (has plans.json) or a work dir of ``ssl-medsam2 run`` (its final.json names one)."""
    path = Path(path)
    layout = RunLayout(path)
    if layout.state_path.exists() or layout.final_path.exists():
        final = layout.read_final()
        if final is None:
            raise InputError(path, "nothing of this run is deployed yet (final.json is written once round 0's "
                                   "few-shot pseudo labels are done, then after each round); wait, or pass a "
                                   "model folder")
        if layout.deployed_model_dir() is None:
            raise InputError(path, f"round 0 is deployed: {final.get('warning') or final.get('note')}")
        path = layout.deployed_model_dir()
    if not (path / "plans.json").exists() or not (path / "dataset.json").exists():
        raise InputError(path, "not an nnU-Net model folder (no plans.json/dataset.json) and no final.json "
                               "of an ssl-medsam2 work dir")
    return path


class NnUNetModel:
    """A trained nnU-Net model (``model_dir`` as written by training) ready for prediction."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", use_mirroring: bool = False,
                 tile_step_size: float = 0.5, checkpoint_name: str = "checkpoint_final.pth",
                 num_threads: int | None = None):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from ..devices import resolve_device

        self.model_dir = resolve_model_dir(model_dir)
        if num_threads:
            torch.set_num_threads(int(num_threads))
        trainers.register()  # the checkpoint names our trainer class; nnU-Net looks it up by name
        os.environ.setdefault("nnUNet_compile", "false")
        dev = resolve_device(device)
        folds = sorted(p.name[len("fold_"):] for p in self.model_dir.glob("fold_*")
                       if (p / checkpoint_name).exists())
        if not folds:
            raise InputError(self.model_dir, f"no fold_*/{checkpoint_name} in this model folder")
        self.predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True,
                                         use_mirroring=use_mirroring,
                                         perform_everything_on_device=dev.type == "cuda", device=dev,
                                         verbose=False, allow_tqdm=False)
        self.predictor.initialize_from_trained_model_folder(str(self.model_dir), tuple(folds), checkpoint_name)
        dataset_json = json.loads((self.model_dir / "dataset.json").read_text())
        ids = dataset_json.get("ssl_medsam2_class_ids")
        n = self.predictor.label_manager.num_segmentation_heads - 1
        self.class_ids = tuple(int(c) for c in ids) if ids else tuple(range(1, n + 1))
        if len(self.class_ids) != n:
            raise InputError(self.model_dir / "dataset.json", f"{len(self.class_ids)} class ids for {n} classes")
        self._lut = np.array((0,) + self.class_ids, dtype=np.int64)

    def predict_volume(self, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
        """-> (label map in canonical order with project class ids, probabilities (C+1, X, Y, Z))."""
        arr = np.asarray(volume.array, dtype=np.float32)
        seg, probs = self.predictor.predict_single_npy_array(
            arr.transpose(2, 1, 0)[None], {"spacing": list(volume.spacing)[::-1]}, None, None, True)
        label = self._lut[np.asarray(seg).transpose(2, 1, 0).astype(np.int64)]
        dtype = np.uint8 if max(self.class_ids) < 256 else np.int16
        probs = np.ascontiguousarray(np.asarray(probs, dtype=np.float32).transpose(0, 3, 2, 1))
        return label.astype(dtype), probs


def predict_folder(model_dir: str | os.PathLike, images_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   device: str = "cpu", use_mirroring: bool = False, show_progress: bool = True,
                   names=None, progress: Callable[[int], None] | None = None, cfg: dict | None = None) -> list[Path]:
    """Label every NIfTI of ``images_dir`` into ``out_dir/<case>.nii.gz`` (source affine and header).

    ``model_dir``: a model folder or a run's work dir. A run whose quality gate kept round 0 (no
    nnU-Net round beat the few-shot pseudo labels) labels new images with that few-shot engine and the
    run's labelled cases as supports (``cfg`` configures the engine; default: the project config), and
    says so.
    """
    from tqdm.auto import tqdm

    run = RunLayout(model_dir) if RunLayout.is_run(model_dir) else None
    fewshot = run is not None and run.read_final() is not None and run.deployed_model_dir() is None
    if not fewshot:
        model_dir = resolve_model_dir(model_dir)  # a wrong --model fails before any image is read
    images = list_volumes(images_dir)
    if names is not None:
        images = {k: v for k, v in images.items() if k in set(names)}
    if not images:
        raise InputError(images_dir, "no NIfTI image (.nii / .nii.gz) to predict")
    vols = {n: load_volume(p, name=n) for n, p in images.items()}  # check every input before any work
    if fewshot:
        from ..config import load_config

        cfg = cfg if cfg is not None else load_config()  # the engine needs its sections (atlas:, sam2:, ...)
        return _predict_with_round0(run, vols, Path(out_dir), cfg, show_progress, progress)
    model = NnUNetModel(model_dir, device=device, use_mirroring=use_mirroring)
    out = []
    for name, vol in tqdm(vols.items(), desc="nnU-Net predict", unit="case", disable=not show_progress):
        label, _ = model.predict_volume(vol)
        out.append(save_like(label, vol, Path(out_dir) / f"{name}.nii.gz", dtype=label.dtype,
                             description="ssl-medsam2 nnU-Net"))
        if progress is not None:
            progress(1)
    log.info("predicted %d case(s) with %s into %s", len(out), model.model_dir, out_dir)
    return out


def _predict_with_round0(run: RunLayout, vols: dict, out_dir: Path, cfg: dict, show_progress: bool,
                         progress) -> list[Path]:
    """The deployed round is 0: label new volumes with the run's few-shot engine and labelled supports."""
    from tqdm.auto import tqdm

    from ..engines import build_engine
    from ..engines.base import Case
    from ..pseudo_label import load_cases, pseudo_label_case

    state = json.loads(run.state_path.read_text())
    engine_name = str(state["settings"].get("round0", ""))
    final = run.read_final()
    if engine_name.startswith(("given:", "none")):
        raise InputError(run.work, f"round 0 is deployed ({final.get('warning') or final.get('note')}) and its "
                                   f"pseudo labels were given, not made by an engine: there is no model to "
                                   f"predict with; train longer (nnunet.schedule) in a new --work")
    log.warning("deployed: round 0 (%s) -> labelling with the few-shot engine '%s' and the run's labelled cases",
                final.get("warning") or final.get("note"), engine_name)
    supports, _ = load_cases(state["inputs"]["images"], state["inputs"]["labels"], names=())  # labelled only
    engine = build_engine(engine_name, cfg)
    out = []
    for name, vol in tqdm(vols.items(), desc=f"round 0 ({engine_name}) predict", unit="case",
                          disable=not show_progress):
        label = pseudo_label_case(engine, supports, Case(vol), cfg)["label"]
        out.append(save_like(label, vol, out_dir / f"{name}.nii.gz", dtype=label.dtype,
                             description=f"ssl-medsam2 round 0 ({engine_name})"))
        if progress is not None:
            progress(1)
    return out
