"""Does the `uncertainty` strategy point annotators at the worst pseudo labels?

On real CHAOS MRI: the first N cases are the labelled supports, every other case is pseudo-labelled
by a few-shot engine (atlas by default: no weights needed); each query gets the app's uncertainty
score (mean entropy inside and around the mask) and its true error (1 - mean Dice vs the real label).
Prints the Spearman correlation between score and error, and how much of the error the first pick of
`uncertainty` vs `random` / `first` would fix. Last line: one JSON object.

    python bench/app_uncertainty_ranking.py [--engine atlas|sam2] [--labelled 2] [--factor 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

from shared_data import CHAOS, chaos_cases, downsample_case, work_folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(CHAOS))
    ap.add_argument("--engine", default="atlas")
    ap.add_argument("--labelled", type=int, default=2)
    ap.add_argument("--factor", type=int, default=2, help="in-plane downsampling (1 = full 256x256)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from ssl_medsam2 import strategies as st
    from ssl_medsam2.config import load_config
    from ssl_medsam2.engines import build_engine
    from ssl_medsam2.io import load_label_for
    from ssl_medsam2.protocol import ProtocolSettings
    from ssl_medsam2.pseudo_label import load_cases, pseudo_label_case

    data = Path(args.data)
    cases = chaos_cases(data)
    with work_folder(None, "bench_unc_") as tmp:
        for i, c in enumerate(cases):
            downsample_case(data / "imagesTr" / f"{c}_0000.nii.gz", data / "labelsTr" / f"{c}.nii.gz",
                            tmp / "images" / f"{c}_0000.nii.gz",
                            (tmp / "labels" if i < args.labelled else tmp / "gt") / f"{c}.nii.gz", factor=args.factor)
        cfg = load_config(overrides=args.overrides)
        supports, queries = load_cases(tmp / "images", tmp / "labels")
        engine = build_engine(args.engine, cfg)
        band = ProtocolSettings.from_config(cfg).boundary_band
        rows = []
        t0 = time.time()
        for q in queries:
            out = pseudo_label_case(engine, supports, q, cfg)
            u = st.uncertainty_score(out["entropy"], out["label"], out["summary"]["classes"], band)
            gt = load_label_for(q.image, tmp / "gt" / f"{q.name}.nii.gz").array
            err = st.disagreement_score(gt, out["label"], out["summary"]["classes"])  # 1 - mean Dice vs the truth
            rows.append({"case": q.name, "uncertainty": round(u, 4), "error": round(err, 4)})
            print(json.dumps(rows[-1]), flush=True)
    u = np.array([r["uncertainty"] for r in rows])
    e = np.array([r["error"] for r in rows])
    rho = float(stats.spearmanr(u, e).statistic) if len(rows) > 2 else None
    ids = [r["case"] for r in rows]
    err = {r["case"]: r["error"] for r in rows}
    pick_unc = st.rank_uncertainty(ids, {r["case"]: r["uncertainty"] for r in rows})[0]
    result = {
        "bench": "app_uncertainty_ranking", "engine": args.engine, "supports": [s.name for s in supports],
        "queries": len(rows), "in_plane": 256 // args.factor, "spearman_uncertainty_vs_error": rho,
        "first_pick_error": {"uncertainty": err[pick_unc], "first": err[st.rank_first(ids)[0]],
                             "random_mean": round(float(np.mean(e)), 4), "worst_possible": float(e.max())},
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
