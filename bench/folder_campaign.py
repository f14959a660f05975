"""Folder pseudo-labelling with campaign batching: ``pseudo_label_folder`` (the code of ``ssl-medsam2
pseudo-label``) over N queries with the batched SAM2 engine, ``sam2.campaign_queries`` at each of the given
settings (default: auto, then 1), side by side in one run.

The shared CHAOS T2-SPIR folder: ``--supports`` are labelled, ``--queries`` (each ``--repeat`` times under
distinct names) are not. After one untimed warm-up query, each setting builds its engine (model build and
support encoding are inside the timing, as for a real run) and writes into a fresh folder; the worker
hands the engine groups of its campaign size (auto: 1 on CPU; on CUDA 1 for the first query, then from
free device memory). Random weights: the timing does not depend on them; labels of every setting are
compared with the first one's.

After each setting one JSON line (cumulative); the LAST line printed is the whole result: per setting
s_total, cpu_s (this process's CPU seconds: the steadier figure on a shared CPU), queries_per_hour,
groups (queries per engine call, in order), engine_s_per_query, peak_gpu_mb, and from the second setting
on labels_identical and max_abs_dprob vs the first; ratio_first_vs_last (queries per hour).

    python bench/folder_campaign.py --quick --settings 2,1            # CPU, 64 px, mechanics (< 2 min)
    python bench/folder_campaign.py --device cuda --size 512          # one GPU: auto vs 1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from shared_data import CHAOS, downsample_case, work_folder  # noqa: E402
from tffs_speed import quick_z_range  # noqa: E402


#: --quick: 8 slices of each case (the supports' with liver in every slice, the queries' middle ones)
QUICK_SLICES = 8


def make_folder(root: Path, supports: list[str], queries: list[str], repeat: int, quick: bool) -> list[str]:
    """images/ (supports + repeat x queries) and labels/ (supports) under ``root``; returns the query names."""
    names = []
    for c in supports + queries:
        img, lab = CHAOS / "imagesTr" / f"{c}_0000.nii.gz", CHAOS / "labelsTr" / f"{c}.nii.gz"
        copies = [c] if c in supports else [c if r == 0 else f"{c}r{r}" for r in range(repeat)]
        z = None
        if quick:
            n_z = int(nib.load(str(img)).shape[2])
            z = quick_z_range(lab, QUICK_SLICES) if c in supports else ((n_z - QUICK_SLICES) // 2,
                                                                          (n_z + QUICK_SLICES) // 2)
        for n in copies:
            downsample_case(img, lab if c in supports else None, root / "images" / f"{n}_0000.nii.gz",
                            root / "labels" / f"{n}.nii.gz" if c in supports else None,
                            factor=4 if quick else 1, z_range=z)
            if c not in supports:
                names.append(n)
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="auto,1", help="sam2.campaign_queries values, comma-separated")
    ap.add_argument("--supports", default="chaos_01,chaos_02")
    ap.add_argument("--queries", default="chaos_13,chaos_15")
    ap.add_argument("--repeat", type=int, default=2, help="pseudo-label each query this many times")
    ap.add_argument("--inserts", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="model input size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: comparable on a shared box)")
    ap.add_argument("--quick", action="store_true", help="64x64 in-plane, 8-slice copies, 64 px, liver only, 1 insert")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    ap.add_argument("--keep", help="keep the inputs and outputs in this folder (emptied first)")
    args = ap.parse_args(argv)
    if not (CHAOS / "imagesTr").is_dir():
        print(f"CHAOS data not found at {CHAOS} (set SSL_MEDSAM2_SHARED_DATA)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    import torch

    from ssl_medsam2.config import load_config
    from ssl_medsam2.pseudo_label import pseudo_label_folder

    torch.set_num_threads(args.threads)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    size, inserts, extra = (64, 1, ["input.classes=[1]"]) if args.quick else (args.size, args.inserts, [])
    base = ["protocol.engine=sam2", "sam2.checkpoint=none", f"sam2.image_size={size}", f"sam2.n_inserts={inserts}",
            f"sam2.device={args.device}", "sam2.batch_runs=true", *extra, *args.overrides]
    cuda = torch.device(args.device).type == "cuda"
    result = {"device": args.device, "gpu": torch.cuda.get_device_name() if cuda else None,
              "threads": torch.get_num_threads(), "size": size,
              "inserts": inserts, "supports": args.supports.split(","), "random_weights": True, "settings": {}}
    with work_folder(args.keep, "folder_campaign_", fresh=True) as root:
        names = make_folder(root, args.supports.split(","), args.queries.split(","), args.repeat, args.quick)
        result["queries"] = len(names)
        print(f"{len(names)} queries {names}, supports {args.supports}, {size} px, {inserts} insert(s), "
              f"{args.device}, RANDOM weights", flush=True)
        # untimed: one query first, so that no setting pays the process's one-time costs (CUDA context,
        # kernel loading, allocator growth)
        pseudo_label_folder(root / "images", root / "labels", root / "warmup", load_config(overrides=base),
                            show_progress=False, names=names[:1])
        first = None
        for setting in settings:
            out = root / f"out_{setting}"
            cfg = load_config(overrides=base + [f"sam2.campaign_queries={setting}"])
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            summaries = pseudo_label_folder(root / "images", root / "labels", out, cfg, show_progress=False)
            if cuda:
                torch.cuda.synchronize()
            seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            groups, i = [], 0
            while i < len(summaries):  # consecutive cases of one engine call share its campaign size
                n = summaries[i]["timings"].get("campaign_queries", 1)
                groups.append(n)
                i += n
            r = {"s_total": round(seconds, 2), "cpu_s": round(cpu_s, 2),
                 "queries_per_hour": round(3600 * len(summaries) / seconds, 1),
                 "groups": groups,
                 "engine_s_per_query": round(float(np.mean([s["timings"]["engine_s"] for s in summaries])), 2),
                 "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None}
            if first is None:
                first = out
            else:
                same, dprob = True, 0.0
                for n in names:
                    la, lb = (np.asarray(nib.load(str(o / "labels" / f"{n}.nii.gz")).dataobj) for o in (first, out))
                    pa, pb = (np.asarray(nib.load(str(o / "probabilities" / f"{n}.nii.gz")).dataobj)
                              for o in (first, out))
                    same &= bool(np.array_equal(la, lb))
                    dprob = max(dprob, float(np.abs(pa - pb).max()))
                r.update(labels_identical=same, max_abs_dprob=dprob)
            result["settings"][setting] = r
            print(json.dumps(result), flush=True)
    rates = [r["queries_per_hour"] for r in result["settings"].values()]
    result["ratio_first_vs_last"] = round(rates[0] / rates[-1], 2) if len(rates) > 1 else None
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
