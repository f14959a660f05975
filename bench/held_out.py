"""Per-organ Dice of a trained nnU-Net model on held-out real cases: the score every nnU-Net bench reports.

Why one helper: the SSL accuracy and active-learning benches compare models by exactly this number,
so they must compute it the same way (metrics.dice, mean over cases, then over organs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_medsam2.io import load_label_for, load_volume
from ssl_medsam2.metrics import dice

ORGANS = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}


def organ_dice(model_dir: Path, images: Path, truth: Path, cases: list[str], device: str) -> dict:
    """{organ: mean Dice over ``cases``, "mean_organs": mean over organs}; images are
    ``images/<case>_0000.nii.gz``, ground truths ``truth/<case>.nii.gz``."""
    from ssl_medsam2.nnunet.predict import NnUNetModel

    model = NnUNetModel(model_dir, device=device)
    per = {c: [] for c in ORGANS}
    for case in cases:
        img = load_volume(Path(images) / f"{case}_0000.nii.gz", name=case)
        gt = load_label_for(img, Path(truth) / f"{case}.nii.gz").array
        pred, _ = model.predict_volume(img)
        for c in ORGANS:
            per[c].append(dice(pred == c, gt == c))
    out = {ORGANS[c]: float(np.mean(v)) for c, v in per.items()}
    out["mean_organs"] = float(np.mean([out[n] for n in ORGANS.values()]))
    return out
