"""Few-shot pseudo-label accuracy and speed on real CHAOS T2-SPIR MRI (full resolution).

Two fixed labelled volumes are the supports (default chaos_01 and chaos_02, the first two by name);
every other volume of ../shared/data/chaos_t2spir is a query. For each engine this prints per-query
Dice of the four organs and seconds per query, then the engine's mean and minimum liver Dice. The
pseudo labels of each engine are scored with `ssl_medsam2.evaluate` (CSV, JSON, PNG report under
--out). Seconds are wall time on this machine; the CPU seconds of the process are printed beside them
because the machine may be shared.

`--leave-one-out` instead uses, for each query, every other labelled volume as a support (all 7
others on the 8 CHAOS volumes; the atlas engine picks the most similar ones itself, `atlas.max_supports`);
every labelled volume is then a query.

The accuracy bar (printed as "bar": liver mean >= 0.85 and no case below 0.6; kidneys and spleen
means >= 0.78; <= 60 CPU-seconds per query with 2 supports) is checked and reported, not asserted.

Engines: atlas (default). `sam2` and `ensemble` are run only if named with --engines AND real SAM2
weights are present (random weights give no meaningful accuracy; they are skipped with a message).

The LAST line printed is one JSON object for the first engine: engine, liver_dice_mean,
liver_dice_min, sec_per_query (plus per-organ means, cpu_sec_per_query, queries, supports, and the
other engines' figures under "engines").

    python bench/fewshot_accuracy.py                    # atlas, 6 queries, ~5-10 min on 2 CPU cores
    python bench/fewshot_accuracy.py --queries chaos_03 --set atlas.preset=fine
    python bench/fewshot_accuracy.py --leave-one-out  # 8 queries, 7 supports each
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from held_out import ORGANS
from shared_data import CHAOS as DEFAULT_DATA, work_folder


def main(argv=None) -> int:
    from ssl_medsam2.config import load_config
    from ssl_medsam2.engines import build_engine
    from ssl_medsam2.engines.base import Case
    from ssl_medsam2.evaluate import evaluate_folders
    from ssl_medsam2.metrics import dice
    from ssl_medsam2.io import list_volumes, load_label_for, load_volume
    from ssl_medsam2.preprocess import IntensityConfig
    from ssl_medsam2.pseudo_label import pseudo_label_case

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="nnU-Net raw layout folder (imagesTr/, labelsTr/)")
    ap.add_argument("--supports", nargs="+", default=["chaos_01", "chaos_02"])
    ap.add_argument("--queries", nargs="*", help="default: every other case")
    ap.add_argument("--leave-one-out", action="store_true",
                    help="every labelled volume is a query, every other labelled volume a support")
    ap.add_argument("--engines", nargs="+", default=["atlas"], choices=["atlas", "sam2", "ensemble"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", help="keep pseudo labels and evaluation reports here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    data = Path(args.data)
    images = list_volumes(data / "imagesTr")
    labels = list_volumes(data / "labelsTr")
    if args.leave_one_out:
        args.supports = [c for c in images if c in labels]
        queries = args.queries or list(args.supports)
    else:
        queries = args.queries or [c for c in images if c not in args.supports and c in labels]
    cfg = load_config(overrides=args.overrides)

    supports = []
    for name in args.supports:
        im = load_volume(images[name], name=name)
        supports.append(Case(im, load_label_for(im, labels[name])))

    engines = []
    for name in args.engines:
        if name in ("sam2", "ensemble"):
            from ssl_medsam2.engines.sam2_engine import checkpoint_status

            ok, reason = checkpoint_status(cfg)
            if not ok:
                print(f"skipping engine {name}: no SAM2 weights ({reason})", flush=True)
                continue
        engines.append(build_engine(name, cfg))
    if not engines:
        print(json.dumps({"engine": None, "liver_dice_mean": None, "liver_dice_min": None, "sec_per_query": None,
                          "skipped": args.engines}))
        return 1

    print(f"supports: {', '.join(args.supports)}; queries: {', '.join(queries)}; cpu cores: {os.cpu_count()}; "
          f"load average: {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    with work_folder(args.out, "fewshot_accuracy_") as out_root:
        for engine in engines:
            out = out_root / engine.name
            per_query = []
            for q in queries:
                query_img = load_volume(images[q], name=q)
                truth = load_label_for(query_img, labels[q])
                t0, c0 = time.perf_counter(), time.process_time()
                res = pseudo_label_case(engine, [s for s in supports if s.name != q], Case(query_img), cfg,
                                        out_dir=out / "pseudo")
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                d = {ORGANS.get(c, str(c)): dice(res["label"] == c, truth.array == c)
                     for c in res["summary"]["classes"]}
                chosen = res["summary"].get("atlas_supports")
                per_query.append({"query": q, "dice": d, "seconds": wall, "cpu_seconds": cpu,
                                  "init": res["summary"].get("atlas_init"),
                                  "supports_used": [c["support"] for c in chosen] if chosen else None})
                print(f"[{engine.name}] {q}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items())
                      + f"; {wall:.1f} s wall, {cpu:.1f} s CPU"
                      + (f"; start {per_query[-1]['init']}, supports {', '.join(per_query[-1]['supports_used'])}"
                         if chosen else ""), flush=True)
            ev = evaluate_folders(out / "pseudo" / "labels", data / "labelsTr", out / "evaluation",
                                  class_names=ORGANS, images_dir=data / "imagesTr",
                                  intensity=IntensityConfig.from_config(cfg))
            liver = [p["dice"]["liver"] for p in per_query]
            organs = {o: float(np.mean([p["dice"][o] for p in per_query])) for o in per_query[0]["dice"]}
            r = {"engine": engine.name, "liver_dice_mean": round(float(np.mean(liver)), 4),
                 "liver_dice_min": round(float(np.min(liver)), 4),
                 "sec_per_query": round(float(np.mean([p["seconds"] for p in per_query])), 1),
                 "cpu_sec_per_query": round(float(np.mean([p["cpu_seconds"] for p in per_query])), 1),
                 "organ_dice_mean": {k: round(v, 4) for k, v in organs.items()},
                 "liver_hd95_mm_mean": ev["per_class"]["liver"]["hd95_mm"]["mean"],
                 "queries": queries, "supports": "leave-one-out" if args.leave_one_out else args.supports,
                 "report": ev.get("report") if args.out else None}  # a temp folder is gone after the run
            r["bar"] = {"liver_mean_0.85": r["liver_dice_mean"] >= 0.85, "liver_min_0.6": r["liver_dice_min"] >= 0.6,
                        **{f"{o}_0.78": organs.get(o, 0.0) >= 0.78 for o in ("right_kidney", "left_kidney", "spleen")},
                        "cpu_60s_per_query": r["cpu_sec_per_query"] <= 60 if len(args.supports) == 2 else None}
            results[engine.name] = r
            print(f"[{engine.name}] liver Dice mean {r['liver_dice_mean']:.3f}, min {r['liver_dice_min']:.3f}; "
                  f"{r['sec_per_query']:.1f} s per query ({r['cpu_sec_per_query']:.1f} s CPU); report {r['report']}",
                  flush=True)
    first = dict(results[engines[0].name])
    first["engines"] = {k: {kk: v[kk] for kk in ("liver_dice_mean", "liver_dice_min", "sec_per_query")}
                        for k, v in results.items()}
    print(json.dumps(first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
