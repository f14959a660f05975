"""Score label maps against ground truth: per case and per class Dice and HD95 (mm), as CSV + JSON.

Why: pseudo labels are only useful if we know how good they are; this is how every engine (SAM2,
atlas, ensemble) and every nnU-Net round is compared on real data. The metrics are MONAI's
(:mod:`ssl_medsam2.metrics`, with the voxel spacing and its empty-mask rule: a class absent from both
the prediction and the ground truth scores Dice 1 and HD95 0 mm; absent from only one of them,
Dice 0 and HD95 null).
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .io import InputError, Volume, list_volumes, load_volume, write_text_atomic
from .preprocess import class_name
from .metrics import dice_hd95

if TYPE_CHECKING:
    from .preprocess import IntensityConfig

log = logging.getLogger(__name__)

CSV_FIELDS = ("case", "class_id", "class_name", "dice", "hd95_mm", "gt_voxels", "pred_voxels")


def evaluate_pair(pred: Volume, gt: Volume, classes: Sequence[int], class_names: dict | None = None) -> list[dict]:
    """One case's rows (one per class)."""
    if pred.source_shape != gt.source_shape:
        raise InputError(pred.path, f"prediction shape {pred.source_shape} does not match ground truth "
                                    f"{gt.source_shape} ({gt.path})")
    if not np.allclose(pred.source_affine, gt.source_affine, atol=1e-3):
        raise InputError(pred.path, f"prediction affine differs from the ground truth affine ({gt.path})")
    rows = []
    for c in classes:
        p, g = pred.array == c, gt.array == c
        d, hd = dice_hd95(p, g, gt.spacing)
        rows.append({"case": gt.name, "class_id": int(c), "class_name": class_name(class_names, c),
                     "dice": round(d, 6), "hd95_mm": None if hd is None else round(hd, 4),
                     "gt_voxels": int(g.sum()), "pred_voxels": int(p.sum())})
    return rows


def _stats(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "median": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "median": float(np.median(v)), "max": float(v.max()), "n": int(v.size)}


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                     classes: Sequence[int] | None = None, class_names: dict | None = None,
                     images_dir: str | os.PathLike | None = None, report: bool = True,
                     intensity: IntensityConfig | None = None) -> dict:
    """Score every prediction in ``pred_dir`` that has a ground truth of the same case name in ``gt_dir``.

    Writes ``metrics.csv``, ``metrics.json`` and (``report=True``) ``report.png`` to ``out_dir``.
    ``classes`` defaults to every foreground id found in the ground truths. ``images_dir`` (optional)
    gives the report's overlays an image background, windowed by ``intensity`` (the run's config;
    needed with ``images_dir``).
    """
    preds = list_volumes(pred_dir)
    gts = list_volumes(gt_dir)
    common = sorted(set(preds) & set(gts))
    if not common:
        raise InputError(pred_dir, f"no prediction has a ground truth of the same case name in {gt_dir} "
                                   f"(predictions: {', '.join(sorted(preds)[:5]) or 'none'}; "
                                   f"ground truths: {', '.join(sorted(gts)[:5]) or 'none'})")
    missing = sorted(set(gts) - set(preds))
    extra = sorted(set(preds) - set(gts))
    if missing:
        log.warning("%d ground truth case(s) without a prediction: %s", len(missing), ", ".join(missing))
    pairs = {}
    for name in common:
        gt = load_volume(gts[name], is_label=True, name=name)
        pred = load_volume(preds[name], is_label=True, name=name)
        pairs[name] = (pred, gt)
    if classes is None:
        found: set[int] = set()
        for _, gt in pairs.values():
            found |= set(int(v) for v in np.unique(gt.array)) - {0}
        classes = sorted(found)
    classes = [int(c) for c in classes]
    rows: list[dict] = []
    for name in common:
        rows.extend(evaluate_pair(*pairs[name], classes, class_names))
    per_class = {}
    for c in classes:
        cr = [r for r in rows if r["class_id"] == c]
        per_class[class_name(class_names, c)] = {"class_id": c, "dice": _stats([r["dice"] for r in cr]),
                                                  "hd95_mm": _stats([r["hd95_mm"] for r in cr])}
    per_case = {}
    for name in common:
        cr = [r for r in rows if r["case"] == name]
        per_case[name] = {"mean_dice": float(np.mean([r["dice"] for r in cr])),
                          "classes": {r["class_name"]: {"dice": r["dice"], "hd95_mm": r["hd95_mm"]} for r in cr}}
    result = {"pred_dir": str(Path(pred_dir).resolve()), "gt_dir": str(Path(gt_dir).resolve()),
              "classes": classes, "class_names": {str(c): class_name(class_names, c) for c in classes},
              "n_cases": len(common), "missing_predictions": missing, "predictions_without_gt": extra,
              "per_class": per_class, "per_case": per_case, "rows": rows}
    if out_dir is not None:
        out = Path(out_dir)
        buf = _io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS})
        write_text_atomic(buf.getvalue(), out / "metrics.csv")
        write_text_atomic(json.dumps(result, indent=2), out / "metrics.json")
        if report:
            from .report import write_report

            images = list_volumes(images_dir) if images_dir else {}
            result["report"] = str(write_report(result, pairs, out / "report.png", images=images,
                                                intensity=intensity))
    return result
