"""The SAM2 engine on CUDA: the paper-order reference runs there, and the batched and run-by-run
engines agree with it in bfloat16 (the CUDA default) and float32. Skipped where CUDA is absent.

Tolerances (max abs difference of the mean probability, random-weight SAM2.1 Hiera-T at 64 px):
float32 ``CUDA_FP32_TOL``; bfloat16 ``CUDA_BF16_TOL`` — bf16 rounds every matmul, and the batched
engine runs other kernel shapes than batch 1, so the two drift apart by more than in float32. Each
test prints the measured value (``bench/gpu_check.sh`` collects them); docs/engine.md states both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import organ_crop
from sam2_helpers import (CUDA_BF16_TOL, CUDA_FP32_TOL, SMALL, deepest_point, load_case, make_tiny,
                          stock_window_track)
from ssl_medsam2 import interactive
from ssl_medsam2.config import load_config
from ssl_medsam2.engines.sam2_engine import SAM2Engine
from ssl_medsam2.protocol import RunningMean

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available on this machine (run bench/gpu_check.sh on a GPU)")

ON_CUDA = [o.replace("sam2.device=cpu", "sam2.device=cuda") for o in SMALL]


@pytest.fixture(scope="module")
def tiny(chaos_dir, tmp_path_factory):
    return make_tiny(chaos_dir, tmp_path_factory.mktemp("tiny_cuda"))


@pytest.mark.parametrize("dtype,tol", [("bfloat16", CUDA_BF16_TOL), ("float32", CUDA_FP32_TOL)])
def test_engines_equal_reference_on_cuda(tiny, dtype, tol):
    sup = [load_case(tiny, "chaos_01"), load_case(tiny, "chaos_02")]
    q = load_case(tiny, "chaos_03long", labelled=False)
    classes = [1, 2]
    cfg = ON_CUDA + [f"sam2.dtype={dtype}"]
    reference = SAM2Engine(load_config(overrides=cfg)).predict_reference(sup, q, classes)  # used to crash
    assert np.isfinite(reference.probs).all() and reference.meta["device"].startswith("cuda")
    for what, extra in {"batched": [], "run by run": ["sam2.batch_runs=false"]}.items():
        got = SAM2Engine(load_config(overrides=cfg + extra)).predict(sup, q, classes)
        diff = np.abs(got.probs - reference.probs)
        print(f"CUDA {dtype} {what} vs reference: max abs dprob {diff.max():.3g}, mean {diff.mean():.3g}")
        assert got.meta["insert_positions"] == reference.meta["insert_positions"]
        assert 0.0 <= got.probs.min() and got.probs.max() <= 1.0
        assert diff.max() <= tol, what


def test_campaign_on_cuda_equals_one_query_at_a_time(tiny):
    """Two queries (4 and 10 slices) in one batched track on CUDA (padded static shapes, memory chosen
    batch) give each query's own result, in float32."""
    sup = [load_case(tiny, "chaos_01"), load_case(tiny, "chaos_02")]
    queries = [load_case(tiny, "chaos_03short", labelled=False), load_case(tiny, "chaos_03long", labelled=False)]
    cfg = ON_CUDA + ["sam2.dtype=float32"]
    alone = [SAM2Engine(load_config(overrides=cfg)).predict(sup, q, [1, 2]) for q in queries]
    together = SAM2Engine(load_config(overrides=cfg + ["sam2.campaign_queries=2"])).predict_campaign(sup, queries, [1, 2])
    for a, b in zip(alone, together):
        diff = float(np.abs(a.probs - b.probs).max())
        print(f"CUDA float32 campaign vs one query: max abs dprob {diff:.3g}")
        assert diff <= CUDA_FP32_TOL


@pytest.mark.parametrize("dtype,tol", [("float32", CUDA_FP32_TOL), ("bfloat16", CUDA_BF16_TOL)])
def test_interactive_sam2_window_on_cuda_equals_sam2s_own_propagation(chaos_dir, dtype, tol):
    """The SAM2 correction engine (``interactive.engine: sam2``) on CUDA: mask + points on two clicked
    slices, tracked both ways through one window, give the stock predictor's probabilities in the same
    precision, and nothing outside the window changes (chaos_03's spleen, 96 x 96 x 13, random weights)."""
    from ssl_medsam2.interactive.sam2_prompts import correct_mask_sam2, sam2_engine
    from ssl_medsam2.interactive.settings import InteractiveSettings

    image, spacing, truth = organ_crop(chaos_dir, "chaos_03", 4, 6, 6)
    spleen = truth == 4
    prepared = interactive.prepare(image, spacing)
    fg = [deepest_point(spleen[:, :, 4]) + [4], deepest_point(spleen[:, :, 6]) + [6]]
    bg = [[2, 2, 6]]
    base = spleen.copy()
    base[:, :, 4] = False  # one clicked slice prompted by its points alone, the other by mask + points
    cfg = load_config(overrides=ON_CUDA + [f"sam2.dtype={dtype}", "interactive.engine=sam2",
                                           "interactive.sam2_window_slices=1"])  # window 3..7
    out, report = correct_mask_sam2(prepared.image, spacing, base, np.array(fg), np.array(bg), None, None,
                                    InteractiveSettings.from_config(cfg), cfg)
    engine = sam2_engine(cfg)[0]
    assert engine.device.type == "cuda"
    with torch.inference_mode(), engine.autocast():
        stock = stock_window_track(engine, prepared.image, base, fg, bg, 3, 7, [4, 6])
    assert list(report.probabilities) == list(stock) == list(range(3, 8))
    diff = max(float(np.abs(report.probabilities[z] - stock[z]).max()) for z in stock)
    print(f"CUDA {dtype} interactive SAM2 window vs stock propagation: max abs dprob {diff:.3g}")
    outside = np.ones(base.shape, bool)
    outside[:, :, 3:8] = False
    assert not (out != base)[outside].any(), "outside the window the base label stays"
    assert diff <= tol


def test_running_mean_sums_on_the_device_and_copies_once():
    acc = RunningMean((3, 4, 5), device="cuda")
    acc.add(torch.ones((3, 4, 5), device="cuda"))
    acc.add_slices([0, 2], torch.full((2, 4, 5), 3.0, device="cuda"))
    acc.count(1)
    assert acc.total.is_cuda
    mean = acc.mean
    assert isinstance(mean, np.ndarray)
    np.testing.assert_allclose(mean[[0, 2]], 2.0)
    np.testing.assert_allclose(mean[1], 0.5)
