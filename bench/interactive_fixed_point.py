"""The weight-free engine's ceiling: how far its own region terms move a label that is already right.

Why: inside a click's region the engine redraws the base label's border from its shape prior, the
region's intensity histograms and the graph cut's edges, also where no click reaches. Given the true
label as the base and no click influence, the cut should keep it; how much Dice it loses there is a
ceiling that no number of clicks gets past. Each organ of each volume: the true label's box grown by
``--margin-mm``, the engine's terms with no click (shape prior + ``region_intensity_weight`` x the
intensity log-likelihood ratio, graph cut), Dice against the true label. The true label is what a final
label is, a trusted base (``interactive.trusted_base``; ``--base doubtful``: the section's own values, as for a
pseudo label that failed the quality gate). Settings as ``--variant name=key=value,key=value`` overrides,
run side by side. Last line: JSON.

    PYTHONPATH=$PWD/lib python bench/interactive_fixed_point.py --variant shape3=interactive.trusted_base.shape_scale_mm=3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared_data import CHAOS, chaos_cases  # noqa: E402

ORGANS = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}


def fixed_point(image: np.ndarray, spacing, truth: np.ndarray, s, margin_mm) -> float:
    """Dice of the engine's cut with ``truth`` as the base and no click, over the truth's grown box."""
    from ssl_medsam2.interactive.engine import (_graph_cut, _intensity_llr, click_roi, shape_prior,
                                                signed_distance_mm, unary_logit)
    from ssl_medsam2.metrics import dice

    roi = click_roi(truth.shape, spacing, np.argwhere(truth), margin_mm)
    img, base = image[roi], truth[roi]
    no_click = np.zeros(base.shape, np.float32)
    logit = unary_logit(shape_prior(signed_distance_mm(base, spacing), s),
                        _intensity_llr(img, base, ~base, s.intensity_bins), no_click, no_click, s)
    return dice(_graph_cut(img, logit, no_click > 0, no_click > 0, s), base)


def main(argv=None) -> int:
    from ssl_medsam2 import interactive
    from ssl_medsam2.config import load_config
    from ssl_medsam2.interactive.settings import InteractiveSettings
    from ssl_medsam2.io import load_label_for, load_volume

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[],
                    help="name=key=value[,key=value]: config overrides measured beside the defaults")
    ap.add_argument("--cases", nargs="*", default=None, help="volumes (default: every CHAOS volume)")
    ap.add_argument("--margin-mm", nargs=3, type=float, default=[20.0, 20.0, 8.0])
    ap.add_argument("--base", choices=("trusted", "doubtful"), default="trusted",
                    help="hold the base as a final label (trusted) or as a gate-failed pseudo label")
    args = ap.parse_args(argv)

    variants = {"default": []}
    for item in args.variant:
        name, _, sets = item.partition("=")
        variants[name] = sets.split(",")
    settings = {k: InteractiveSettings.from_config(load_config(overrides=v)).for_base(args.base == "trusted")
                for k, v in variants.items()}
    if any(s.engine != "graphcut" for s in settings.values()):
        ap.error("the fixed point is measured for the graph cut (interactive.engine=graphcut)")
    cases = args.cases or chaos_cases()
    rows = []
    for case in cases:
        vol = load_volume(CHAOS / "imagesTr" / f"{case}_0000.nii.gz", name=case)
        truth = load_label_for(vol, CHAOS / "labelsTr" / f"{case}.nii.gz").array
        image = interactive.prepare(vol.array, vol.spacing).image
        for cid, organ in ORGANS.items():
            if not (truth == cid).any():
                continue
            got = {k: round(fixed_point(image, vol.spacing, truth == cid, s, args.margin_mm), 4)
                   for k, s in settings.items()}
            rows.append({"case": case, "organ": organ, **got})
            print(case, f"{organ:13s}", " ".join(f"{k} {v:.3f}" for k, v in got.items()), flush=True)
    summary = {k: {o: round(float(np.mean([r[k] for r in rows if r["organ"] == o])), 4) for o in ORGANS.values()}
               for k in variants}
    print(json.dumps({"fixed_point_dice": summary, "variants": variants, "base": args.base, "cases": cases,
                      "margin_mm": args.margin_mm, "machine": "2-core CPU"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
