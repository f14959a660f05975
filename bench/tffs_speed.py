"""Speed of the TFFS engines side by side in one run: paper-order reference, cached (run by run), batched.

All run the same protocol on the same inputs with the same seed. The reference uses the stock
predictor calls in the paper's order (init_state, add_new_mask on every prompted frame, propagate
forward; reset; again backward); the cached engine reuses image features, prompt memories and the
tracked support block and tracks each run's query frames alone (``sam2.batch_runs: false``); the
batched engine does the same but advances all runs of a support together (``sam2.batch_runs: true``).

Protocols:
  default  CHAOS chaos_01 + chaos_02 as supports, chaos_03 as the query, 2 inserts each, liver.
  paper    every labelled case but the query as a support (up to 10), 5 inserts, every class (1-4).
Random weights: the timing does not depend on the weights, the probabilities are not segmentations.

Per engine: seconds per query, SAM2 tracking steps per second (frames tracked; for the reference
counted by its own propagation calls), peak RSS during its run (sampled), peak CUDA memory
(``torch.cuda.max_memory_allocated``). The LAST line printed is one JSON object with reference_s,
cached_s, batched_s, max_abs_dprob (cached vs reference), batched_max_abs_dprob (batched vs reference),
batched_vs_cached_max_abs_dprob, ratios, and per-engine details.

    python bench/tffs_speed.py                             # ~5 min on 2 idle CPU cores (256 px)
    python bench/tffs_speed.py --quick                     # < 1 min: 64x64 in-plane, 8 slices, 64 px
    python bench/tffs_speed.py --engines cached,batched --warm-supports   # a campaign query: supports already encoded
    python bench/tffs_speed.py --protocol paper --quick    # paper protocol, 64 px, 8 slices per case
    python bench/tffs_speed.py --protocol paper --engines cached,batched --size 512 --device cuda
    python bench/tffs_speed.py --protocol paper --quick --engines batched --max-batch 256   # steps, mean batch
    python bench/tffs_speed.py --protocol paper --quick --engines batched --campaign 4      # queries per hour

The batched engine's details add ``batched_steps`` and ``mean_batch`` (tracked frames / steps), and on
CUDA ``recompiles`` (torch.compile graphs built during the timed run; with ``--compile`` a warm-up run
comes first) and ``peak_gpu_mb``. ``--campaign N``: after the timed runs, N queries (the cases that are
not supports, in turn) through ``predict_campaign`` with the supports already encoded: queries per hour.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from shared_data import CHAOS, downsample_case  # noqa: E402
from ssl_medsam2.config import load_config  # noqa: E402
from ssl_medsam2.engines.base import Case  # noqa: E402
from ssl_medsam2.engines.sam2_engine import SAM2Engine, resolve_dtype  # noqa: E402
from ssl_medsam2.io import load_label_for, load_volume  # noqa: E402
from ssl_medsam2.preprocess import resolve_slice_axis  # noqa: E402

QUICK_CROPS = {"chaos_01": (14, 22), "chaos_02": (10, 17), "chaos_03": (12, 20)}
QUICK_SLICES = 8
ENGINES = ("reference", "cached", "batched")


class PeakRSS:
    """Peak resident set size (MB) of this process while the block runs, sampled every 20 ms."""

    def __init__(self):
        self.peak = self.start = 0.0
        self._stop = threading.Event()

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self.start = self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def timed(fn, cuda: bool):
    """(result, wall seconds, PeakRSS) of ``fn()``; on CUDA the device is synchronised on both sides and
    its peak-memory counter reset, so ``torch.cuda.max_memory_allocated`` afterwards is this call's."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return out, seconds, rss


def quick_z_range(label_path: Path, n: int) -> tuple[int, int]:
    """``n`` slices around the middle of the labelled (liver) z extent."""
    import nibabel as nib

    lab = np.asarray(nib.load(str(label_path)).dataobj)
    z = np.flatnonzero(lab.reshape(-1, lab.shape[2]).any(0))
    mid = int((z.min() + z.max()) // 2) if len(z) else lab.shape[2] // 2
    lo = max(0, min(mid - n // 2, lab.shape[2] - n))
    return lo, lo + n


def count_reference_steps(engine: SAM2Engine) -> dict:
    """Count the reference's SAM2 tracking steps (propagation calls that encode a memory)."""
    pred = engine.predictor
    counter = {"frames_tracked": 0}
    orig = pred._run_single_frame_inference

    def counted(*a, **k):
        if k.get("run_mem_encoder"):
            counter["frames_tracked"] += 1
        return orig(*a, **k)

    pred._run_single_frame_inference = counted
    return counter


def profile_phases(engine: SAM2Engine, supports, query, classes, cuda: bool) -> dict:
    """Host and device seconds spent in each phase of one batched run (torch.profiler record_function
    around the engine's and SAM2's own methods; the profiler slows the run, so these are shares, not times).
    ``prompts`` includes the heads and memory encoder of the prompted frames, which ``sam_heads`` and
    ``memory_encoder`` count too, and ``track`` (both batched tracks) contains ``schedule`` (the host
    plan), ``memory_attention``, ``sam_heads`` and ``memory_encoder``: the phases overlap."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from ssl_medsam2.engines import sam2_batch

    model = engine.predictor
    targets = {"encode": (engine, "encode_slices"), "prompts": (engine, "_prompts"),
               "track": (sam2_batch.BatchedTracker, "track"), "schedule": (sam2_batch.BatchedTracker, "_plan"),
               "memory_attention": (sam2_batch, "attend"), "sam_heads": (model, "_forward_sam_heads"),
               "memory_encoder": (model, "_encode_new_memory")}
    saved = []
    for label, (owner, name) in targets.items():
        fn = getattr(owner, name)
        saved.append((owner, name, owner.__dict__.get(name)))

        def wrapped(*a, _fn=fn, _label=label, **k):
            with record_function(f"phase:{_label}"):
                return _fn(*a, **k)
        setattr(owner, name, wrapped)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            engine.predict(supports, query, classes)
            if cuda:
                torch.cuda.synchronize()
        total = time.perf_counter() - t0
    finally:
        for owner, name, original in saved:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
    phases = {"profiled_run_s": round(total, 2)}
    for e in prof.key_averages():
        if e.key.startswith("phase:"):
            device_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0
            phases[e.key[6:]] = {"host_s": round(e.cpu_time_total / 1e6, 3), "calls": e.count,
                                 "device_s": round(device_us / 1e6, 3) if cuda else None}
    return phases


def dynamo_graphs() -> int:
    """Graphs torch.compile has built in this process so far (its recompiles show up here)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return 0
    return int(counters["stats"]["unique_graphs"])


def warm_support_cache(engine: SAM2Engine, supports, query) -> None:
    """Encode the supports into the engine's support cache (what a campaign's earlier queries leave)."""
    q = engine.query_context(query, resolve_slice_axis(engine.slice_axis, query.image.spacing), encode=False)
    for s in supports:
        engine.support_context(s, q, cached=True)
    engine.stats["frames_encoded"] = 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(CHAOS), help="CHAOS folder (imagesTr/, labelsTr/)")
    ap.add_argument("--protocol", choices=("default", "paper"), default="default")
    ap.add_argument("--supports", default=None, help="comma-separated (default: protocol's)")
    ap.add_argument("--query", default="chaos_03")
    ap.add_argument("--inserts", type=int, default=None, help="default: 2, paper: 5")
    ap.add_argument("--classes", default=None, help="comma-separated class ids (default: 1 = liver; paper: 1,2,3,4)")
    ap.add_argument("--size", type=int, default=256, help="model input size")
    ap.add_argument("--max-cond", type=int, default=-1, help="sam2.max_cond_frames_in_attn")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="sam2.dtype (auto = bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)}")
    ap.add_argument("--max-batch", default="auto", help="sam2.max_batch of the batched engine")
    ap.add_argument("--compile", action="store_true", help="sam2.compile (CUDA only) for the batched engine")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: comparable on a shared box)")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed runs, one more batched run under torch.profiler: host and device "
                         "seconds per phase (encode, prompts, memory prepare / attention, heads, memory encoder) "
                         "in the JSON as batched_phases (a diagnosis for the GPU, where batch 1 was latency-bound)")
    ap.add_argument("--warm-supports", action="store_true",
                    help="supports' image features in the support cache before timing (cached/batched), as for "
                         "every query after the first in a campaign; the query is still encoded")
    ap.add_argument("--quick", action="store_true", help=f"downsampled, {QUICK_SLICES}-slice inputs at 64 px")
    ap.add_argument("--campaign", type=int, default=0, metavar="N",
                    help="also time N queries through the batched engine's predict_campaign, supports warm")
    ap.add_argument("--campaign-queries", default="auto", help="sam2.campaign_queries for --campaign")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    engines = [e for e in args.engines.split(",") if e]
    if not engines or set(engines) - set(ENGINES):
        ap.error(f"--engines must be a subset of {','.join(ENGINES)}")

    data = Path(args.data)
    if not (data / "imagesTr").is_dir():
        print(f"CHAOS data not found at {data}", file=sys.stderr)
        return 2
    paper = args.protocol == "paper"
    if args.supports:
        support_names = args.supports.split(",")
    elif paper:
        labelled = sorted(p.name[:-len(".nii.gz")] for p in (data / "labelsTr").glob("*.nii.gz"))
        support_names = [n for n in labelled if n != args.query][:10]
    else:
        support_names = ["chaos_01", "chaos_02"]
    inserts = args.inserts or (5 if paper else 2)
    classes = [int(c) for c in (args.classes or ("1,2,3,4" if paper else "1")).split(",")]
    others = sorted(p.name[:-len("_0000.nii.gz")] for p in (data / "imagesTr").glob("*_0000.nii.gz"))
    others = [n for n in others if n not in support_names] or [args.query]
    campaign_names = [others[i % len(others)] for i in range(args.campaign)]
    names = list(dict.fromkeys(support_names + [args.query] + campaign_names))
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="tffs_bench_"))
        for n in names:
            lab = data / "labelsTr" / f"{n}.nii.gz"
            zr = QUICK_CROPS.get(n) if not paper else None
            if not lab.exists():  # an unlabelled campaign query: the middle slices
                n_z = int(load_volume(data / "imagesTr" / f"{n}_0000.nii.gz").shape[2])
                zr, lab = zr or ((n_z - QUICK_SLICES) // 2, (n_z + QUICK_SLICES) // 2), None
            downsample_case(data / "imagesTr" / f"{n}_0000.nii.gz", lab, tmp / "imagesTr" / f"{n}_0000.nii.gz",
                            tmp / "labelsTr" / f"{n}.nii.gz", factor=4, z_range=zr or quick_z_range(lab, QUICK_SLICES))
        data, args.size = tmp, 64

    def case(n, labelled):
        im = load_volume(data / "imagesTr" / f"{n}_0000.nii.gz")
        return Case(im, load_label_for(im, data / "labelsTr" / f"{n}.nii.gz") if labelled else None)

    supports = [case(n, True) for n in support_names]
    query = case(args.query, False)
    base = ["sam2.checkpoint=none", f"sam2.image_size={args.size}", f"sam2.n_inserts={inserts}",
            f"sam2.device={args.device}", f"sam2.dtype={args.dtype}", f"sam2.max_cond_frames_in_attn={args.max_cond}",
            f"sam2.n_supports={max(10, len(supports))}"]
    overrides = {"reference": base, "cached": base + ["sam2.batch_runs=false"],
                 "batched": base + ["sam2.batch_runs=true", f"sam2.max_batch={args.max_batch}",
                                    f"sam2.compile={str(args.compile).lower()}",
                                    f"sam2.campaign_queries={args.campaign_queries}"]}
    n_runs = len(supports) * inserts * len(classes)
    print(f"protocol {args.protocol}: query {query.name} {query.image.shape}, {len(supports)} supports "
          f"{support_names}, {inserts} inserts, classes {classes} ({n_runs} runs), {args.size} px, "
          f"device {args.device}, RANDOM weights, torch threads {torch.get_num_threads()}", flush=True)

    cuda = torch.device(args.device).type == "cuda"
    results, details = {}, {}
    for name in engines:
        engine = SAM2Engine(load_config(overrides=overrides[name]))
        engine.predictor  # model build is not part of any timing
        counter = count_reference_steps(engine) if name == "reference" else engine.stats
        if args.warm_supports and name != "reference":
            warm_support_cache(engine, supports, query)
        if name == "batched" and args.compile:  # compilation and graph capture are not part of the timing
            SAM2Engine.predict(engine, supports, query, classes)
            engine.stats.update(frames_tracked=0, batched_steps=0, frames_encoded=0)
        graphs0 = dynamo_graphs()
        method = engine.predict_reference if name == "reference" else engine.predict
        results[name], seconds, rss = timed(lambda: method(supports, query, classes), cuda)
        tracked = int(counter["frames_tracked"])
        details[name] = {"s_per_query": round(seconds, 2), "frames_tracked": tracked,
                         "tracked_frames_per_s": round(tracked / seconds, 1),
                         "frames_encoded": int(engine.stats["frames_encoded"]),
                         "peak_rss_mb": round(rss.peak, 1), "rss_growth_mb": round(rss.peak - rss.start, 1),
                         "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None}
        if name == "batched":
            steps = int(engine.stats["batched_steps"])
            details[name].update(batched_steps=steps, mean_batch=round(tracked / max(1, steps), 1),
                                 max_batch=engine.max_batch or "auto (free memory)",
                                 compiled=bool(engine.model_info.get("compiled")),
                                 recompiles=dynamo_graphs() - graphs0 if cuda else None)
        print(f"{name}: {seconds:.1f} s, {tracked} frames tracked ({tracked / seconds:.1f}/s), "
              f"peak RSS {rss.peak:.0f} MB" + (f", peak GPU {details[name]['peak_gpu_mb']:.0f} MB" if cuda else ""),
              flush=True)
        del engine

    campaign = None
    if args.campaign:
        queries = [case(n, False) for n in campaign_names]
        engine = SAM2Engine(load_config(overrides=overrides["batched"]))
        engine.predictor
        warm_support_cache(engine, supports, query)
        if args.compile:
            engine.predict_campaign(supports, queries[:1], classes)
        engine.stats.update(frames_tracked=0, batched_steps=0, frames_encoded=0)
        graphs0 = dynamo_graphs()
        out, seconds, rss = timed(lambda: engine.predict_campaign(supports, queries, classes), cuda)
        steps, tracked = int(engine.stats["batched_steps"]), int(engine.stats["frames_tracked"])
        campaign = {"queries": len(out), "names": campaign_names, "s_total": round(seconds, 2),
                    "s_per_query": round(seconds / len(out), 2), "queries_per_hour": round(3600 * len(out) / seconds, 1),
                    "frames_tracked": tracked, "batched_steps": steps, "mean_batch": round(tracked / max(1, steps), 1),
                    "campaign_queries": engine.campaign_queries or "auto (free memory)",
                    "peak_rss_mb": round(rss.peak, 1),
                    "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                    "recompiles": dynamo_graphs() - graphs0 if cuda else None}
        print("campaign:", json.dumps(campaign), flush=True)
        del engine

    phases = None
    if args.profile:
        engine = SAM2Engine(load_config(overrides=overrides["batched"]))
        engine.predictor
        if args.warm_supports:
            warm_support_cache(engine, supports, query)
        phases = profile_phases(engine, supports, query, classes, cuda)
        print("batched phases:", json.dumps(phases), flush=True)
        del engine

    def dprob(a, b):
        if a in results and b in results:
            return float(np.abs(results[a].probs - results[b].probs).max())
        return None

    def secs(name):
        return details[name]["s_per_query"] if name in details else None

    def ratio(a, b):
        return round(secs(a) / secs(b), 2) if a in details and b in details else None

    out = {
        "reference_s": secs("reference"), "cached_s": secs("cached"), "batched_s": secs("batched"),
        "ratio": ratio("reference", "cached"), "batched_vs_cached": ratio("cached", "batched"),
        "batched_vs_reference": ratio("reference", "batched"),
        "max_abs_dprob": dprob("reference", "cached"), "batched_max_abs_dprob": dprob("reference", "batched"),
        "batched_vs_cached_max_abs_dprob": dprob("cached", "batched"),
        "batched_steps": details.get("batched", {}).get("batched_steps"),
        "mean_batch": details.get("batched", {}).get("mean_batch"),
        "recompiles": details.get("batched", {}).get("recompiles"),
        "peak_gpu_mb": max((d["peak_gpu_mb"] or 0 for d in details.values()), default=None) if cuda else None,
        "campaign": campaign,
        "peak_rss_mb": max(d["peak_rss_mb"] for d in details.values()), "batched_phases": phases,
        "engines": details, "protocol": args.protocol, "runs": n_runs, "query_slices": int(query.image.shape[2]),
        "image_size": args.size, "quick": args.quick, "warm_supports": args.warm_supports, "device": args.device,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "dtype": str(resolve_dtype(args.dtype, torch.device(args.device))).replace("torch.", ""),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
