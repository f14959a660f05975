"""How well each intensity term tells an organ from its neighbours where a pseudo label's border is doubtful.

Why: the engine's intensity term decides where a corrected border goes inside a click's region. It is
either the region's own histogram learned from the base label (``_intensity_llr``) or the organ's look
learned from the labelled images (``interactive.appearance``, relative to the base organ's intensity).
For each of the 6 unlabelled CHAOS volumes and organ: the atlas pseudo label (2 supports,
``bench/interactive_cases.py``) is the base; in the band within ``--band-mm`` of its border (inside the
organ's box grown by 20 x 20 x 8 mm) the AUC of each term against the true label. The looks are learned from
the 2 supports' true labels, as the server learns them from its final labels. Last line: JSON.

    PYTHONPATH=$PWD/lib python bench/interactive_appearance.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interactive_cases import passed_classes, pseudo_label_dir, support_appearance  # noqa: E402
from shared_data import CHAOS, chaos_cases  # noqa: E402

ORGANS = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (rank form; ties by position)."""
    rank = np.empty(len(score))
    rank[np.argsort(score, kind="stable")] = np.arange(len(score))
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((rank[positive].sum() - n1 * (n1 - 1) / 2) / (n1 * n0)) if n1 and n0 else float("nan")


def main(argv=None) -> int:
    from ssl_medsam2 import interactive
    from ssl_medsam2.config import load_config
    from ssl_medsam2.interactive.appearance import crop_logit, organ_reference
    from ssl_medsam2.interactive.engine import _intensity_llr, click_roi, signed_distance_mm
    from ssl_medsam2.interactive.settings import InteractiveSettings
    from ssl_medsam2.io import load_label_for, load_volume

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--band-mm", type=float, default=10.0)
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. appearance.hidden=32")
    args = ap.parse_args(argv)
    cfg = load_config(overrides=args.set)
    bins = InteractiveSettings.from_config(cfg).intensity_bins
    pseudo = pseudo_label_dir(cfg)
    t0 = time.time()
    looks = support_appearance(cfg)
    learn_s = time.time() - t0
    rows = []
    for case in [c for c in chaos_cases() if (pseudo / "labels" / f"{c}.nii.gz").exists()]:
        vol = load_volume(CHAOS / "imagesTr" / f"{case}_0000.nii.gz", name=case)
        truth = load_label_for(vol, CHAOS / "labelsTr" / f"{case}.nii.gz").array
        base = load_label_for(vol, pseudo / "labels" / f"{case}.nii.gz").array
        image = interactive.prepare(vol.array, vol.spacing).image
        trusted = passed_classes(pseudo, case)
        for cid, organ in ORGANS.items():
            b, t = base == cid, truth == cid
            if not b.any() or not t.any():
                continue
            roi = click_roi(b.shape, vol.spacing, np.argwhere(b), (20.0, 20.0, 8.0))
            band = np.abs(signed_distance_mm(b[roi], vol.spacing)) <= args.band_mm
            hist = _intensity_llr(image[roi], b[roi], ~b[roi], bins)
            look = crop_logit(looks.looks[cid], image, vol.spacing, organ_reference(image, b), roi)
            row = {"case": case, "organ": organ, "trusted": cid in trusted,
                   "auc_histogram": round(auc(hist[band], t[roi][band]), 4),
                   "auc_look": round(auc(look[band], t[roi][band]), 4)}
            rows.append(row)
            print(f"{case} {organ:13s} histogram {row['auc_histogram']:.3f}  look {row['auc_look']:.3f}"
                  + ("" if row["trusted"] else "  (base not trusted: the engine keeps the histogram)"), flush=True)
    summary = {o: {k: round(float(np.mean([r[k] for r in rows if r["organ"] == o and r["trusted"]])), 4)
                   for k in ("auc_histogram", "auc_look")} for o in ORGANS.values()}
    print(json.dumps({"trusted_bases_mean": summary, "rows": rows, "band_mm": args.band_mm,
                      "learn_s": round(learn_s, 1), "overrides": args.set, "machine": "2-core CPU"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
