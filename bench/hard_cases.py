"""Hard few-shot cases built from real CHAOS volumes, and what the atlas engine + quality gate make of them.

Why: a pseudo label must be usable or flagged ``failed``, never a silent Dice near 0. The cases are the
ones seen on unseen data: a query stored rotated 90 degrees in-plane, mirrored, with thick slices
(every second slice dropped), cropped to a smaller field of view, with another intensity scale; and
a deliberately corrupted support (its classes permuted, or its labels shifted off the organs).
Each transformed query keeps a consistent header (the image moved in the array, the affine kept,
as a scanner or a converter that mislabels orientation does); its ground truth moves with it.

Shared by the test (tests/test_quality_gate.py) and the calibration printout::

    python bench/hard_cases.py            # every case at 128x128 in-plane (2.5 mm): Dice, quality, verdict

The LAST line printed is a JSON summary (per case: mean Dice, lowest class Dice, score, failed).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from shared_data import CHAOS, chaos_cases, downsample_case, work_folder

CHAOS_CLASS_NAMES = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
SUPPORTS = ("chaos_01", "chaos_02")
QUERY = "chaos_05"
#: a pseudo label whose every class reaches this Dice is "usable"
USABLE_DICE = 0.5


def _rot90(a, aff):
    return np.ascontiguousarray(np.rot90(a, 1, axes=(0, 1))), aff


def _flip(a, aff):
    return np.ascontiguousarray(a[::-1]), aff


def _thick(a, aff):
    aff = aff.copy()
    aff[:3, 2] *= 2
    return np.ascontiguousarray(a[:, :, ::2]), aff


def _crop(a, aff):
    m0, m1 = a.shape[0] // 8, a.shape[1] // 8
    aff = aff.copy()
    aff[:3, 3] += aff[:3, 0] * m0 + aff[:3, 1] * m1
    return np.ascontiguousarray(a[m0:-m0, m1:-m1]), aff


#: query transforms: (image array, affine) -> (array, affine), applied the same way to the ground truth
QUERY_CASES = {"good": lambda a, aff: (a, aff), "rotated_90": _rot90, "flipped": _flip,
               "thick_slices": _thick, "cropped": _crop}
#: intensity-only change of the query (the label is untouched)
INTENSITY_CASES = {"intensity_rescaled": lambda a: a * 0.05 + 300.0}


def _permute(lab):
    lut = np.array([0, 4, 3, 2, 1] + [0] * 251, dtype=np.uint8)
    return lut[lab]


def _shift(lab):
    return np.roll(lab, lab.shape[0] // 4, axis=0)


#: corruptions of the second support's label
SUPPORT_CASES = {"support_classes_permuted": _permute, "support_labels_shifted": _shift}
ALL_CASES = tuple(QUERY_CASES) + tuple(INTENSITY_CASES) + tuple(SUPPORT_CASES)


def _save(arr, aff, path: Path, dtype):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=dtype), aff), str(path))


def build(root: Path, cases=ALL_CASES, factor: int = 2, data: Path = CHAOS) -> dict[str, dict]:
    """Write every case under ``root/<case>/`` (images/, labels/ for the two supports, truth/ for the query).

    Returns case -> {"images", "labels", "truth": path of the query's ground truth}."""
    base = root / "_base"
    for c in SUPPORTS + (QUERY,):
        if not (base / f"{c}.nii.gz").exists():
            downsample_case(data / "imagesTr" / f"{c}_0000.nii.gz", data / "labelsTr" / f"{c}.nii.gz",
                            base / f"{c}.nii.gz", base / f"{c}_label.nii.gz", factor=factor)
    out = {}
    for case in cases:
        d = root / case
        for s in SUPPORTS:
            img, lab = nib.load(str(base / f"{s}.nii.gz")), nib.load(str(base / f"{s}_label.nii.gz"))
            larr = np.asarray(lab.dataobj).astype(np.uint8)
            if case in SUPPORT_CASES and s == SUPPORTS[1]:
                larr = SUPPORT_CASES[case](larr)
            _save(np.asarray(img.dataobj), img.affine, d / "images" / f"{s}.nii.gz", np.float32)
            _save(larr, lab.affine, d / "labels" / f"{s}.nii.gz", np.uint8)
        img, lab = nib.load(str(base / f"{QUERY}.nii.gz")), nib.load(str(base / f"{QUERY}_label.nii.gz"))
        a, la = np.asarray(img.dataobj).astype(np.float32), np.asarray(lab.dataobj).astype(np.uint8)
        fn = QUERY_CASES.get(case, QUERY_CASES["good"])
        a2, aff = fn(a, img.affine)
        la2, _ = fn(la, img.affine)
        if case in INTENSITY_CASES:
            a2 = INTENSITY_CASES[case](a2)
        _save(a2, aff, d / "images" / f"{QUERY}.nii.gz", np.float32)
        _save(la2, aff, d / "truth" / f"{QUERY}.nii.gz", np.uint8)
        out[case] = {"images": d / "images", "labels": d / "labels", "truth": d / "truth" / f"{QUERY}.nii.gz"}
    return out


def run_case(paths: dict, cfg: dict, engine=None) -> dict:
    """Pseudo-label the case's query with its two supports; Dice per class against its ground truth."""
    from ssl_medsam2.engines import build_engine
    from ssl_medsam2.io import load_label_for
    from ssl_medsam2.metrics import dice
    from ssl_medsam2.pseudo_label import load_cases, pseudo_label_case

    supports, queries = load_cases(paths["images"], paths["labels"])
    (query,) = queries
    engine = engine or build_engine("atlas", cfg)
    t0 = time.process_time()
    out = pseudo_label_case(engine, supports, query, cfg)
    truth = load_label_for(query.image, paths["truth"]).array
    d = {CHAOS_CLASS_NAMES[c]: round(float(dice(out["label"] == c, truth == c)), 4) for c in out["summary"]["classes"]}
    q = out["summary"]["quality"]
    return {"dice": d, "mean_dice": round(float(np.mean(list(d.values()))), 4), "min_dice": min(d.values()),
            "score": q["score"], "failed": out["summary"]["failed"], "reasons": q["reasons"],
            "per_class": {k: {kk: v[kk] for kk in ("score", "agreement", "entropy", "appearance", "volume_ratio")}
                          for k, v in q["per_class"].items()},
            "cpu_s": round(time.process_time() - t0, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=list(ALL_CASES), choices=ALL_CASES)
    ap.add_argument("--factor", type=int, default=2, help="in-plane downsampling of the CHAOS volumes (2: 2.5 mm)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", default=None, help="keep the cases here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from ssl_medsam2.config import load_config

    cfg = load_config(overrides=[f"input.class_names={json.dumps(CHAOS_CLASS_NAMES)}"] + args.overrides)
    result = {}
    with work_folder(args.work, "hard_cases_") as root:
        for case, paths in build(root, args.cases, args.factor).items():
            r = run_case(paths, cfg)
            result[case] = r
            print(f"{case:26s} Dice {r['dice']}  score {r['score']}  failed {r['failed']}  {r['reasons']}  "
                  f"{r['cpu_s']} CPU-s", flush=True)
            print("    " + json.dumps(r["per_class"]), flush=True)
    summary = {k: {"mean_dice": v["mean_dice"], "min_dice": v["min_dice"], "score": v["score"], "failed": v["failed"]}
               for k, v in result.items()}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
