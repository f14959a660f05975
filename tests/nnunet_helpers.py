"""Tiny real CHAOS data for the nnU-Net tests: 4 cases at 32x32 in-plane (2 labelled, 2 pseudo-labelled)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from conftest import chaos_cases, downsample_case

#: a schedule that only proves the plumbing (seconds per round on CPU), never accuracy; the quality
#: gate is off because every 2-iteration model is worse than any pseudo label (tests turn it on)
TINY_SCHEDULE = ["nnunet.epochs=1", "nnunet.iterations_per_epoch=2", "nnunet.val_iterations=1",
                 "nnunet.device=cpu", "nnunet.num_workers=0", "nnunet.num_processes=1", "nnunet.cpu_threads=1",
                 "nnunet.quality_gate=off"]


def make_tiny_chaos(chaos_dir: Path, root: Path, n_cases: int = 4, n_labelled: int = 2) -> dict:
    """images/, labels/ (first n_labelled), pseudo/ (the others: ground truth eroded once), truth/ (all)."""
    cases = chaos_cases()[:n_cases]
    for c in cases:
        downsample_case(chaos_dir / "imagesTr" / f"{c}_0000.nii.gz", chaos_dir / "labelsTr" / f"{c}.nii.gz",
                        root / "images" / f"{c}_0000.nii.gz", root / "truth" / f"{c}.nii.gz", factor=8)
    (root / "labels").mkdir()
    (root / "pseudo").mkdir()
    for c in cases[:n_labelled]:
        shutil.copyfile(root / "truth" / f"{c}.nii.gz", root / "labels" / f"{c}.nii.gz")
    for c in cases[n_labelled:]:
        img = nib.load(str(root / "truth" / f"{c}.nii.gz"))
        a = np.asarray(img.dataobj)
        out = np.zeros_like(a)
        for k in np.unique(a)[1:]:
            out[ndimage.binary_erosion(a == k)] = k
        nib.save(nib.Nifti1Image(out, img.affine), str(root / "pseudo" / f"{c}.nii.gz"))
    return {"root": root, "cases": cases, "labelled": cases[:n_labelled], "unlabelled": cases[n_labelled:]}
