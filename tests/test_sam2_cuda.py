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

from sam2_helpers import CUDA_BF16_TOL, CUDA_FP32_TOL, SMALL, load_case, make_tiny
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
