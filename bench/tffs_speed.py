"""Speed of the cached TFFS engine against the paper-order reference, side by side in one run.

Both run the same protocol on the same inputs with the same seed (default: CHAOS chaos_01 and
chaos_02 as supports, chaos_03 as the query, 2 inserts each, liver, random-weight SAM2.1 Hiera-T at
256 px, all prompted frames in attention). The reference uses the stock predictor calls in the paper's
order (init_state, add_new_mask on every prompted frame, propagate forward; reset; again backward);
the cached engine reuses image features, prompt memories and the tracked support block.

Random weights: the timing does not depend on the weights, the probabilities are not segmentations.
The LAST line printed is one JSON object: reference_s, cached_s, ratio, max_abs_dprob, peak_rss_mb.

    python bench/tffs_speed.py            # ~5-10 min on 2 CPU cores
    python bench/tffs_speed.py --quick    # < 1 min: 64x64 in-plane, 8 slices, 64 px model
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared_data import CHAOS, downsample_case  # noqa: E402
from ssl_medsam2.config import load_config  # noqa: E402
from ssl_medsam2.engines.base import Case  # noqa: E402
from ssl_medsam2.engines.sam2_engine import SAM2Engine  # noqa: E402
from ssl_medsam2.io import load_label_for, load_volume  # noqa: E402

QUICK_CROPS = {"chaos_01": (14, 22), "chaos_02": (10, 17), "chaos_03": (12, 20)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(CHAOS), help="CHAOS folder (imagesTr/, labelsTr/)")
    ap.add_argument("--supports", default="chaos_01,chaos_02")
    ap.add_argument("--query", default="chaos_03")
    ap.add_argument("--inserts", type=int, default=2)
    ap.add_argument("--classes", default="1", help="comma-separated class ids (1 = liver)")
    ap.add_argument("--size", type=int, default=256, help="model input size")
    ap.add_argument("--max-cond", type=int, default=-1, help="sam2.max_cond_frames_in_attn")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="downsampled, z-cropped inputs at 64 px (< 1 min)")
    args = ap.parse_args(argv)

    data = Path(args.data)
    if not (data / "imagesTr").is_dir():
        print(f"CHAOS data not found at {data}", file=sys.stderr)
        return 2
    names = args.supports.split(",") + [args.query]
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="tffs_bench_"))
        for n in names:
            downsample_case(data / "imagesTr" / f"{n}_0000.nii.gz", data / "labelsTr" / f"{n}.nii.gz",
                            tmp / "imagesTr" / f"{n}_0000.nii.gz", tmp / "labelsTr" / f"{n}.nii.gz",
                            factor=4, z_range=QUICK_CROPS.get(n))
        data, args.size = tmp, 64

    def case(n, labelled):
        im = load_volume(data / "imagesTr" / f"{n}_0000.nii.gz")
        return Case(im, load_label_for(im, data / "labelsTr" / f"{n}.nii.gz") if labelled else None)

    supports = [case(n, True) for n in args.supports.split(",")]
    query = case(args.query, False)
    classes = [int(c) for c in args.classes.split(",")]
    cfg = load_config(overrides=["sam2.checkpoint=none", f"sam2.image_size={args.size}",
                                 f"sam2.n_inserts={args.inserts}", f"sam2.device={args.device}",
                                 f"sam2.max_cond_frames_in_attn={args.max_cond}"])
    print(f"query {query.name} {query.image.shape}, supports {[s.name for s in supports]}, "
          f"{args.inserts} inserts, classes {classes}, {args.size} px, RANDOM weights, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    ref_engine = SAM2Engine(cfg)
    ref_engine.predictor  # model build is not part of either timing
    t0 = time.perf_counter()
    ref = ref_engine.predict_reference(supports, query, classes)
    reference_s = time.perf_counter() - t0
    print(f"reference (paper order, stock predictor): {reference_s:.1f} s", flush=True)

    engine = SAM2Engine(cfg)
    engine.predictor
    t0 = time.perf_counter()
    cached = engine.predict(supports, query, classes)
    cached_s = time.perf_counter() - t0
    print(f"cached engine: {cached_s:.1f} s ({engine.stats['frames_encoded']} frames encoded, "
          f"{engine.stats['frames_tracked']} frames tracked)", flush=True)

    result = {
        "reference_s": round(reference_s, 2),
        "cached_s": round(cached_s, 2),
        "ratio": round(reference_s / cached_s, 2),
        "max_abs_dprob": float(np.abs(ref.probs - cached.probs).max()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "image_size": args.size,
        "quick": args.quick,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
