"""Turn an nnU-Net-style dataset (imagesTr/, labelsTr/) into a MONAI Label studies folder.

MONAI Label's local datastore wants the images at the top of one folder and human labels in
``labels/final/`` under the image's own file name; nnU-Net raw data names images ``case_0000.nii.gz``
and labels ``case.nii.gz``. Copying (never linking: the studies folder is written to, the source may
be read-only) with those renames lets a new user start the server on real data in one command, with
a chosen number of cases already labelled.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from .io import InputError, case_name, list_volumes, load_label_for, load_volume


def make_studies(images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None, out_dir: str | os.PathLike,
                 labelled: int | Sequence[str] = 0) -> dict:
    """Copy images to ``out_dir/<case>.nii.gz`` and the labels of the chosen cases to ``labels/final/``.

    ``labelled``: how many cases (first by name) keep their label, or their case names. Every copied
    label is checked against its image (shape and affine) first; nothing is written if one is bad.
    """
    images = list_volumes(images_dir)
    if not images:
        raise InputError(images_dir, "no NIfTI image in this folder")
    labels = list_volumes(labels_dir) if labels_dir else {}
    names = sorted(images)
    chosen = names[:int(labelled)] if isinstance(labelled, int) else [case_name(c) for c in labelled]
    missing = [c for c in chosen if c not in labels]
    if missing:
        raise InputError(labels_dir, f"no label for {', '.join(missing)}")
    for c in chosen:  # validate before writing anything
        load_label_for(load_volume(images[c]), labels[c])
    out = Path(out_dir)
    clash = [c for c in names if (out / f"{c}.nii.gz").exists()]
    if clash:
        raise InputError(out, f"already holds {', '.join(clash[:5])}: choose an empty folder")
    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for c in names:
        ext = ".nii.gz" if images[c].name.endswith(".nii.gz") else ".nii"
        shutil.copyfile(images[c], out / f"{c}{ext}")
    for c in chosen:
        ext = ".nii.gz" if labels[c].name.endswith(".nii.gz") else ".nii"
        shutil.copyfile(labels[c], out / "labels" / "final" / f"{c}{ext}")
    for d in (Path(images_dir), Path(images_dir).parent):  # the class names go with the images (app: /info)
        if (d / "dataset.json").is_file():
            shutil.copyfile(d / "dataset.json", out / "dataset.json")
            break
    return {"studies": str(out), "images": names, "labelled": chosen}
