#!/usr/bin/env bash
# One-command GPU check of the TFFS-MedSAM2 engine: the CUDA tests and the speed benches,
# results under $OUT (or /tmp/gpu_check_out). Sized for < 9 minutes on one H100/H200 (its timeouts
# are estimates, not measured on a GPU yet; see docs/figures.md "TFFS engine speed").
#
# Install-free: it runs where `python3` has torch with CUDA, numpy, scipy, PyYAML and pytest (the
# lent device machines have these). What must travel with the repo (`carry` in the device tool):
#   .devbundle   sam2, hydra, omegaconf, antlr4, iopath, nibabel (pure Python, ~13 MB), built here with
#                  bash ../shared/tools/device_bundle.sh .devbundle sam2
#   .devdata     the CHAOS volumes the checks read (../shared does not travel):
#                  mkdir -p .devdata && cp -r ../shared/data/chaos_t2spir .devdata/
#   (echo /.devbundle/ >> .git/info/exclude; echo /.devdata/ >> .git/info/exclude)
# Then, on the device:  bash bench/gpu_check.sh
# Writes: gpu.txt, cuda_tests.log, bench_default.log, bench_paper.log, bench_compiled.log, bench_profile.log,
# bench_folder.log, summary.json (the benches' last-line JSON objects). The steps' timeouts add up to 560 s,
# under the device tool's 600 s per command.
#
# What it runs:
#  1. tests/test_sam2_cuda.py: reference on CUDA, the batched (one track per query, fixed-shape memory)
#     and run-by-run engines vs reference in bf16 and fp32 (prints the measured max abs dprob); the
#     interactive SAM2 correction's batched window vs SAM2's own propagation, bf16 and fp32.
#  2. bench/tffs_speed.py --device cuda --size 512: default protocol (2 supports x 2 inserts, liver),
#     reference / cached / batched side by side, bf16 -> batched_max_abs_dprob in bf16.
#  3. bench/tffs_speed.py --protocol paper --engines batched --campaign 8, 512 px: query chaos_13
#     (36 slices), 6 supports x 5 inserts x 4 classes = 120 runs in one track (goal <= 10 s, then <= 5 s;
#     batched_steps, mean_batch, peak_gpu_mb), then 8 queries (chaos_13, chaos_15 in turn) with warm
#     supports through predict_campaign (campaign.queries_per_hour; goal >= 500).
#  4. the same paper query with sam2.compile (CUDA graphs, torch.compile mode=reduce-overhead,
#     dynamic=False): a warm-up query, then the timed one; recompiles = graphs built during it (goal 0);
#     compare its batched_s with step 3's to see whether compile pays.
#  5. bench/tffs_speed.py --engines batched --profile, default protocol at 512 px: host and device
#     seconds per phase of the batched engine.
#  6. bench/folder_campaign.py, 512 px: after one warm-up query, the folder command's code
#     (pseudo_label_folder) over 4 queries
#     (chaos_13, chaos_15, twice each; supports chaos_01, chaos_02; 2 inserts; 4 classes) with
#     sam2.campaign_queries auto (groups from free device memory), then 1: queries_per_hour of each, the
#     groups the worker formed, labels identical.
#  Dry run of the plumbing on a CPU box (no figures): GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .devbundle ]; then
  if ls .devbundle/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devbundle/whl/*.whl 2>/dev/null
  fi
  export PYTHONPATH=/tmp/site:$PWD/.devbundle/site:$PWD/lib${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD/lib${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .devdata/chaos_t2spir ]; then export SSL_MEDSAM2_SHARED_DATA=$PWD/.devdata; fi
DATA=${SSL_MEDSAM2_SHARED_DATA:-$PWD/../shared/data}/chaos_t2spir
DEV=${GPU_CHECK_DEVICE:-cuda}
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then SIZE=(--quick); CAMPAIGN=2; FOLDER=2,1; else SIZE=(--size 512); CAMPAIGN=8; FOLDER=auto,1; fi

{ nvidia-smi -L; python3 -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, \
  'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"; } \
  > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

SUP=chaos_01,chaos_02,chaos_03,chaos_05,chaos_08,chaos_10
echo "== 1. CUDA tests"
timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_sam2_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== 2. default protocol, reference / cached / batched"
timeout 90 python3 bench/tffs_speed.py --data "$DATA" --device $DEV "${SIZE[@]}" 2>&1 | tee "$OUT/bench_default.log"

echo "== 3. paper protocol (6 supports x 5 inserts x 4 classes), batched, then a campaign of 8 queries"
timeout 125 python3 bench/tffs_speed.py --data "$DATA" --device $DEV "${SIZE[@]}" --protocol paper \
  --query chaos_13 --supports $SUP --engines batched --campaign $CAMPAIGN 2>&1 | tee "$OUT/bench_paper.log"

echo "== 4. paper protocol, batched, sam2.compile (CUDA graphs), recompiles after warm-up"
timeout 110 python3 bench/tffs_speed.py --data "$DATA" --device $DEV "${SIZE[@]}" --protocol paper \
  --query chaos_13 --supports $SUP --engines batched --compile 2>&1 | tee "$OUT/bench_compiled.log"

echo "== 5. where the batched engine's time goes (profiler), default protocol"
timeout 50 python3 bench/tffs_speed.py --data "$DATA" --device $DEV "${SIZE[@]}" --engines batched --profile \
  2>&1 | tee "$OUT/bench_profile.log"

echo "== 6. the folder command with campaign batching (sam2.campaign_queries $FOLDER)"
timeout 65 python3 bench/folder_campaign.py --device $DEV "${SIZE[@]}" --settings $FOLDER 2>&1 | tee "$OUT/bench_folder.log"

python3 - "$OUT" "$tests_rc" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {"cuda_tests_rc": int(sys.argv[2]), "gpu": (out / "gpu.txt").read_text().strip().splitlines()}
for name in ("bench_default", "bench_paper", "bench_compiled", "bench_profile", "bench_folder"):
    f = out / f"{name}.log"
    lines = [l for l in f.read_text().splitlines() if l.startswith("{")] if f.exists() else []
    summary[name] = json.loads(lines[-1]) if lines else None
tests_log = out / "cuda_tests.log"
summary["cuda_test_lines"] = [l for l in (tests_log.read_text().splitlines() if tests_log.exists() else [])
                              if any(w in l for w in ("vs reference", "vs one query", "vs stock propagation",
                                                      "passed", "failed", "skipped"))]
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: summary[k] for k in ("cuda_tests_rc", "cuda_test_lines")}))
print("batched phases", (summary["bench_profile"] or {}).get("batched_phases"))
for name in ("bench_default", "bench_paper", "bench_compiled"):
    s = summary[name] or {}
    print(name, {k: s.get(k) for k in ("reference_s", "cached_s", "batched_s", "batched_vs_reference",
                                      "batched_max_abs_dprob", "batched_steps", "mean_batch", "recompiles",
                                      "peak_gpu_mb")})
print("campaign", (summary["bench_paper"] or {}).get("campaign"))
print("folder campaign", {k: (summary["bench_folder"] or {}).get(k) for k in ("queries", "settings", "ratio_first_vs_last")})
EOF
