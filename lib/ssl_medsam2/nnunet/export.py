"""Labelled + pseudo-labelled volumes -> an nnU-Net v2 raw dataset (imagesTr, labelsTr, dataset.json).

nnU-Net learns from voxel arrays, not from world coordinates, so a model trained on LAS-stored volumes
segments a RAS-stored copy of the same volume differently. Every volume is therefore written in
the project's canonical (RAS+) voxel order with its canonical affine (the same physical geometry),
and :class:`ssl_medsam2.nnunet.predict.NnUNetModel` feeds the model canonical arrays too: the
segmentation no longer depends on how a file happens to be stored, and outputs go back to each
file's own grid through :func:`ssl_medsam2.io.save_like`. nnU-Net
wants consecutive label values, so project class ids are mapped to 1..K and the mapping is kept in
``dataset.json`` (``ssl_medsam2_class_ids``) for prediction to map back.

Optional ignore label: in pseudo-labelled volumes, voxels whose pseudo-label entropy (max over
classes, bits) exceeds a threshold get nnU-Net's ``ignore`` label (K+1), so the loss skips the
voxels the pseudo labeller was unsure about. Ground-truth volumes never get it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

from ..io import InputError, Volume, load_label_for, load_volume, write_text_atomic
from ..preprocess import InputSettings, IntensityConfig
from .settings import NnUNetSettings

log = logging.getLogger(__name__)

DATASET_ID = 900
DATASET_NAME = f"Dataset{DATASET_ID:03d}_SSLMedSAM2"


def load_entropy_for(image: Volume, path: str | os.PathLike) -> np.ndarray:
    """Entropy map (3D, or 4D with classes last as pseudo_label writes it) -> max over classes, canonical."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "entropy file not found (needed for nnunet.ignore_entropy_threshold)")
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data.max(axis=3)
    if data.shape != image.source_shape:
        raise InputError(path, f"entropy shape {data.shape} does not match image {image.source_shape}")
    return image.in_canonical_order(data)


def save_canonical(array: np.ndarray, volume: Volume, path: Path, dtype) -> None:
    """Write a canonical-order array with the canonical affine (nnU-Net's training layout)."""
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), volume.affine)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    nib.save(img, str(path))


def detect_modality(image_paths: Sequence[Path], modality: str = "auto") -> str:
    """nnU-Net channel name: 'CT' (global intensity normalisation) or 'MRI' (per-image z-score)."""
    if modality and modality.lower() != "auto":
        return "CT" if modality.lower() == "ct" else "MRI"
    for p in image_paths:
        if float(np.asarray(nib.load(str(p)).dataobj).min()) < -500:
            return "CT"
    return "MRI"


def export_dataset(raw_root: str | os.PathLike, images: Mapping[str, Path], labels: Mapping[str, Path],
                   pseudo_labels: Mapping[str, Path], classes: Sequence[int], cfg: dict,
                   entropy: Mapping[str, Path] | None = None) -> Path:
    """Write ``raw_root/Dataset900_SSLMedSAM2``; returns its folder.

    ``labels``: ground truth by case name; ``pseudo_labels``: pseudo labels for the other cases;
    ``entropy``: entropy maps of the pseudo labels (only read when the ignore label is on).
    """
    threshold = NnUNetSettings.from_config(cfg).ignore_entropy_threshold
    both = sorted(set(labels) & set(pseudo_labels))
    if both:
        raise InputError(None, f"cases with both a label and a pseudo label: {', '.join(both)}")
    missing = sorted((set(labels) | set(pseudo_labels)) - set(images))
    if missing:
        raise InputError(None, f"labels without an image: {', '.join(missing)}")
    classes = sorted(int(c) for c in classes)
    if not classes:
        raise InputError(None, "no foreground class to train")
    lut = np.zeros(max(256, max(classes) + 1), dtype=np.uint8)
    for i, c in enumerate(classes, start=1):
        lut[c] = i
    ignore_value = len(classes) + 1
    use_ignore = threshold is not None and bool(pseudo_labels)

    out = Path(raw_root) / DATASET_NAME
    if out.exists():
        shutil.rmtree(out)
    staging = Path(raw_root) / f".{DATASET_NAME}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "imagesTr").mkdir(parents=True)
    (staging / "labelsTr").mkdir(parents=True)
    inputs = InputSettings.from_config(cfg)
    stats = {}
    for name in sorted(set(labels) | set(pseudo_labels)):
        img_path = Path(images[name])
        image = load_volume(img_path, name=name)
        save_canonical(image.array, image, staging / "imagesTr" / f"{name}_0000.nii.gz", np.float32)
        is_gt = name in labels
        label = load_label_for(image, labels[name] if is_gt else pseudo_labels[name])
        arr = label.array
        unknown = sorted(set(np.unique(arr).tolist()) - set(classes) - {0})
        if unknown:
            log.warning("%s: classes %s are not trained and become background", name, unknown)
        mapped = lut[np.clip(arr, 0, lut.size - 1)]
        n_ignored = 0
        if use_ignore and not is_gt:
            high = load_entropy_for(image, entropy[name]) > float(threshold) if entropy and name in entropy \
                else None
            if high is None:
                raise InputError(pseudo_labels[name], "no entropy map for this pseudo label "
                                                      "(needed for nnunet.ignore_entropy_threshold)")
            mapped[high] = ignore_value
            n_ignored = int(high.sum())
        save_canonical(mapped, image, staging / "labelsTr" / f"{name}.nii.gz", np.uint8)
        stats[name] = {"source": "ground_truth" if is_gt else "pseudo_label", "ignored_voxels": n_ignored}
    label_names = {"background": 0}
    for i, c in enumerate(classes, start=1):
        nm = inputs.class_name(c)
        label_names[nm if nm not in label_names else f"{nm}_{c}"] = i
    if use_ignore:
        label_names["ignore"] = ignore_value
    dataset_json = {
        "channel_names": {"0": detect_modality([Path(images[n]) for n in stats],
                                               IntensityConfig.from_config(cfg).modality)},
        "labels": label_names,
        "numTraining": len(stats),
        "file_ending": ".nii.gz",
        "name": "SSL-MedSAM2",
        "description": "ground-truth and pseudo-labelled volumes exported by ssl-medsam2",
        "ssl_medsam2_class_ids": classes,
        "ssl_medsam2_cases": stats,
    }
    write_text_atomic(json.dumps(dataset_json, indent=2), staging / "dataset.json")
    os.replace(staging, out)
    log.info("exported %d cases (%d ground truth, %d pseudo) to %s%s", len(stats), len(labels),
             len(pseudo_labels), out, f", ignore label where entropy > {threshold}" if use_ignore else "")
    return out


def verify(dataset_dir: str | os.PathLike, num_processes: int = 1) -> None:
    """nnU-Net's own integrity check (geometry, label values, file counts); raises on problems."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(dataset_dir), num_processes)
