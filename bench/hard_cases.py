"""Hard few-shot cases built from real CHAOS volumes, and what the atlas engine + quality gate make of them.

Why: a pseudo label must be usable or flagged ``failed``, never a silent Dice near 0. The cases are the
ones seen on unseen data: a query stored rotated 90 degrees in-plane, mirrored, with thick slices
(every second slice dropped), cropped to a smaller field of view, with another intensity scale, the
same voxels stored in another orientation (header and array both changed: must come out right), a
longer field of view than the supports (supports cropped in z, bench only); and a deliberately
corrupted support (its classes permuted, or its labels shifted off the organs).
Each transformed query keeps a consistent header (the image moved in the array, the affine kept,
as a scanner or a converter that mislabels orientation does); its ground truth moves with it.

Shared by the test (tests/test_quality_gate.py) and the calibration printout::

    python bench/hard_cases.py            # every case at 128x128 in-plane (2.5 mm): Dice, quality, verdict

Per case it prints the start chosen (``atlas_start``: the lead over the next start, what the best
rotated / mirrored start scores over the header's, each support's own best, and the edge check's second
opinion: the start whose edges line up best and the chosen start's lead there) and whether it was
flagged. The LAST line printed is a JSON summary (per case: mean Dice, lowest class Dice, score, failed,
start, its lead, whether the start was in doubt, the edge lead and whether the edges put it in doubt).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from shared_data import CHAOS, chaos_cases, downsample_case, organ_slab, work_folder

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


def _reoriented(a, aff, codes=("P", "R", "I")):
    """The same voxels stored in another axis order and direction, the affine saying so (a scanner or
    converter that writes another orientation): in canonical order nothing changed."""
    t = nib.orientations.ornt_transform(nib.orientations.io_orientation(aff), nib.orientations.axcodes2ornt(codes))
    return (np.ascontiguousarray(nib.orientations.apply_orientation(a, t)),
            aff @ nib.orientations.inv_ornt_aff(t, a.shape))


def _crop(a, aff):
    m0, m1 = a.shape[0] // 8, a.shape[1] // 8
    aff = aff.copy()
    aff[:3, 3] += aff[:3, 0] * m0 + aff[:3, 1] * m1
    return np.ascontiguousarray(a[m0:-m0, m1:-m1]), aff


#: query transforms: (image array, affine) -> (array, affine), applied the same way to the ground truth
QUERY_CASES = {"good": lambda a, aff: (a, aff), "rotated_90": _rot90, "flipped": _flip,
               "thick_slices": _thick, "cropped": _crop}
#: the bench's query cases beyond the gate test's (tests/test_atlas_hard_cases.py has a cheaper copy)
BENCH_QUERY_CASES = {"header_reoriented": _reoriented}
#: intensity-only change of the query (the label is untouched)
INTENSITY_CASES = {"intensity_rescaled": lambda a: a * 0.05 + 300.0}


def _permute(lab):
    lut = np.array([0, 4, 3, 2, 1] + [0] * 251, dtype=np.uint8)
    return lut[lab]


def _shift(lab):
    return np.roll(lab, lab.shape[0] // 4, axis=0)


#: corruptions of the second support's label
SUPPORT_CASES = {"support_classes_permuted": _permute, "support_labels_shifted": _shift}


def crop_z(a, aff, z: tuple[int, int]):
    """Slices z[0]:z[1] of a volume, the affine's origin moved so the anatomy stays where it was."""
    aff = aff.copy()
    aff[:3, 3] += aff[:3, 2] * z[0]
    return np.ascontiguousarray(a[:, :, z[0]:z[1]]), aff


#: every support cropped in z to its organs (1 slice either side): the query has the longer field of view
SUPPORT_FOV_CASES = ("longer_fov_query",)
ALL_CASES = tuple(QUERY_CASES) + tuple(INTENSITY_CASES) + tuple(SUPPORT_CASES)
BENCH_CASES = ALL_CASES + tuple(BENCH_QUERY_CASES) + SUPPORT_FOV_CASES


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
            iarr, aff = np.asarray(img.dataobj), img.affine
            if case in SUPPORT_CASES and s == SUPPORTS[1]:
                larr = SUPPORT_CASES[case](larr)
            if case in SUPPORT_FOV_CASES:
                z = organ_slab(larr)
                (iarr, aff), (larr, _) = crop_z(iarr, aff, z), crop_z(larr, aff, z)
            _save(iarr, aff, d / "images" / f"{s}.nii.gz", np.float32)
            _save(larr, aff, d / "labels" / f"{s}.nii.gz", np.uint8)
        img, lab = nib.load(str(base / f"{QUERY}.nii.gz")), nib.load(str(base / f"{QUERY}_label.nii.gz"))
        a, la = np.asarray(img.dataobj).astype(np.float32), np.asarray(lab.dataobj).astype(np.uint8)
        fn = {**QUERY_CASES, **BENCH_QUERY_CASES}.get(case, QUERY_CASES["good"])
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
            "start": out["summary"].get("atlas_start"),
            "per_class": {k: {kk: v[kk] for kk in ("score", "agreement", "entropy", "appearance", "volume_ratio")}
                          for k, v in q["per_class"].items()},
            "cpu_s": round(time.process_time() - t0, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=list(BENCH_CASES), choices=BENCH_CASES)
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
            st = r["start"] or {}
            print(f"{case:26s} Dice {r['dice']}  score {r['score']}  failed {r['failed']}  {r['reasons']}  "
                  f"{r['cpu_s']} CPU-s", flush=True)
            edge = st.get("edge_check") or {}
            print(f"    start {st.get('start')} (lead {st.get('lead')} over {st.get('runner_up')}, best other "
                  f"{st.get('over_header')} over the header's; per support {st.get('per_support')}); edges: best "
                  f"{edge.get('best')}, the start's lead {edge.get('lead')} (per support {edge.get('per_support_lead')}; "
                  f"{edge.get('seconds')} s)", flush=True)
            print("    " + json.dumps(r["per_class"]), flush=True)
    summary = {k: {"mean_dice": v["mean_dice"], "min_dice": v["min_dice"], "score": v["score"], "failed": v["failed"],
                   "start": (v["start"] or {}).get("start"), "start_lead": (v["start"] or {}).get("lead"),
                   "start_in_doubt": bool((v["start"] or {}).get("doubt")),
                   "edge_lead": ((v["start"] or {}).get("edge_check") or {}).get("lead"),
                   "edge_doubt": bool(((v["start"] or {}).get("edge_check") or {}).get("doubt"))}
               for k, v in result.items()}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
