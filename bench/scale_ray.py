"""Pseudo-labelling throughput on Ray with 1 and 2 workers, side by side in one run (atlas engine).

The shared CHAOS T2-SPIR folder: chaos_01 + chaos_02 are the supports, the 6 other volumes the
queries (``--repeat N`` pseudo-labels each query N times under distinct names, which evens out
per-case differences between workers). One local Ray (127.0.0.1, ``--cpus`` CPUs, no dashboard) is
started once and serves every run; each run starts its own workers (``cluster.num_workers``, 1 CPU
each) and writes into a fresh folder, so worker start and engine build are inside the timing, Ray's
own start is not. Outputs of the runs are compared file by file (labels must be byte-identical).

Target (issue 11): >= 1.7x cases/min with 2 workers vs 1 on an idle 2-core machine.
The LAST line printed is one JSON object: cases, cases_per_min per worker count, speedup, target met,
wall seconds, identical outputs, conditions.

    python bench/scale_ray.py                      # full resolution, 6 queries: ~4-5 min on 2 idle cores
    python bench/scale_ray.py --repeat 2           # 12 cases: a steadier ratio, ~9 min
    python bench/scale_ray.py --quick              # 64x64 in-plane, reduced atlas: < 1 min (mechanics only)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path

from shared_data import CHAOS, chaos_cases, downsample_case, work_folder  # noqa: E402

QUICK_ATLAS = ["atlas.demons_iterations=[20,10]", "atlas.demons_shrink=[2,1]", "atlas.affine_iterations=50",
               "atlas.affine_shrink=[2,1]", "atlas.affine_smooth_mm=[2.0,1.0]"]


def make_folder(root: Path, supports: list[str], queries: list[str], repeat: int, factor: int) -> Path:
    """images/ (supports + repeat x queries, symlinks or downsampled copies) and labels/ (supports)."""
    from ssl_medsam2.io import link_or_copy

    for c in supports + queries:
        img, lab = CHAOS / "imagesTr" / f"{c}_0000.nii.gz", CHAOS / "labelsTr" / f"{c}.nii.gz"
        names = [c] if c in supports else [c if r == 0 else f"{c}r{r}" for r in range(repeat)]
        for n in names:
            dst_img = root / "images" / f"{n}_0000.nii.gz"
            dst_lab = root / "labels" / f"{n}.nii.gz" if c in supports else None
            if factor > 1:
                downsample_case(img, lab, dst_img, dst_lab, factor=factor)
            else:
                link_or_copy(img, dst_img)
                if dst_lab is not None:
                    link_or_copy(lab, dst_lab)
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: max(--workers))")
    ap.add_argument("--supports", nargs="+", default=["chaos_01", "chaos_02"])
    ap.add_argument("--queries", nargs="*", help="default: every other CHAOS case")
    ap.add_argument("--repeat", type=int, default=1, help="pseudo-label each query this many times")
    ap.add_argument("--factor", type=int, default=1, help="in-plane downsampling of the copies (1 = full res)")
    ap.add_argument("--quick", action="store_true", help="--factor 4, 4 queries, reduced atlas iterations")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    ap.add_argument("--keep", help="keep the inputs and outputs in this folder (emptied first)")
    args = ap.parse_args(argv)
    if not (CHAOS / "imagesTr").is_dir():
        print(f"CHAOS data not found at {CHAOS} (set SSL_MEDSAM2_SHARED_DATA)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # loopback Ray with a throwaway token, no usage stats (set before Ray is imported)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token":
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from ssl_medsam2.cluster import RayExecutor, cluster_cfg, ray_session
    from ssl_medsam2.config import load_config
    from ssl_medsam2.pseudo_label import pseudo_label_folder

    queries = args.queries or [c for c in chaos_cases() if c not in args.supports]
    factor, overrides = args.factor, list(args.overrides)
    if args.quick:
        factor, queries, overrides = max(factor, 4), queries[:4], QUICK_ATLAS + overrides
    n_cases = len(queries) * args.repeat
    cpus = args.cpus or max(args.workers)
    base = load_config(overrides=["protocol.engine=atlas", "cluster.ray_address=local",
                                  f"cluster.local_num_cpus={cpus}", "cluster.cpus_per_worker=1",
                                  "cluster.object_store_mb=300"] + overrides)
    results = {}
    with work_folder(args.keep, "scale_ray_", fresh=True) as root:
        make_folder(root / "data", args.supports, queries, args.repeat, factor)
        with ray_session("local", cluster_cfg(base)):
            print(f"Ray {ray.__version__}: {ray.cluster_resources()}; {n_cases} case(s), supports "
                  f"{args.supports}, factor {factor}, atlas preset {base['atlas']['preset']}", flush=True)
            for w in args.workers:
                cfg = {**base, "cluster": {**base["cluster"], "num_workers": w}}
                out = root / f"out_{w}w"
                t0 = time.perf_counter()
                pseudo_label_folder(root / "data" / "images", root / "data" / "labels", out, cfg,
                                    show_progress=True, executor=RayExecutor(cfg))
                wall = time.perf_counter() - t0
                results[w] = {"wall_s": round(wall, 1), "cases_per_min": round(60.0 * n_cases / wall, 3)}
                print(f"{w} worker(s): {n_cases} cases in {wall:.1f}s = {results[w]['cases_per_min']:.2f} "
                      f"cases/min", flush=True)
        outs = [root / f"out_{w}w" for w in args.workers]
        identical = all((outs[0] / "labels" / p.name).read_bytes() == p.read_bytes()
                        for o in outs[1:] for p in (o / "labels").iterdir())
    w0, w1 = args.workers[0], args.workers[-1]
    speedup = results[w1]["cases_per_min"] / results[w0]["cases_per_min"]
    print("\n| workers | wall s | cases/min |\n|---|---|---|")
    for w in args.workers:
        print(f"| {w} | {results[w]['wall_s']} | {results[w]['cases_per_min']} |")
    print(f"speedup {w1} vs {w0} worker(s): {speedup:.2f}x (target >= 1.7x); labels identical across runs: "
          f"{identical}")
    print(json.dumps({"bench": "scale_ray", "engine": "atlas", "cases": n_cases, "queries": queries,
                      "repeat": args.repeat, "factor": factor, "cpus": cpus, "os_cpus": os.cpu_count(),
                      "cases_per_min": {str(w): results[w]["cases_per_min"] for w in args.workers},
                      "wall_s": {str(w): results[w]["wall_s"] for w in args.workers},
                      "speedup": round(speedup, 3), "target": 1.7, "target_met": speedup >= 1.7,
                      "identical_labels": identical, "quick": args.quick, "overrides": overrides}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
