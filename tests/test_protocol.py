"""Insert/rebuild index mapping, ensembling, entropy and label post-processing (pure numpy)."""

import numpy as np
import pytest

from ssl_medsam2.protocol import (PseudoVideo, RunningMean, combine_directions, insert_positions,
                                  largest_component, probabilities_to_label)
from ssl_medsam2.uncertainty import binary_entropy, boundary_band, summarize


@pytest.mark.parametrize("n_q,n_s,p", [(5, 3, 0), (5, 3, 2), (5, 3, 5), (1, 4, 1)])
def test_pseudo_video_rebuilds_query_and_support(n_q, n_s, p):
    v = PseudoVideo(n_q, n_s, p)
    q = np.arange(n_q) + 100
    s = np.arange(n_s) + 200
    video = v.assemble(q, s)
    assert len(video) == v.length == n_q + n_s
    # rebuild: every query slice comes back, in order, from its video frame
    np.testing.assert_array_equal(video[v.query_frames()], q)
    for j in range(n_s):
        assert video[v.support_frame(j)] == s[j]
        assert v.source(v.support_frame(j)) == ("support", j)
    for i in range(n_q):
        assert v.source(v.query_frame(i)) == ("query", i)
    # the support block is contiguous, starting at p
    np.testing.assert_array_equal(video[p:p + n_s], s)
    assert v.assemble(list(q), list(s)) == list(video)


def test_pseudo_video_rejects_bad_position():
    with pytest.raises(ValueError):
        PseudoVideo(5, 3, 6)


def test_insert_positions_seeded_distinct_in_range():
    a = insert_positions(30, 5, np.random.default_rng(7))
    b = insert_positions(30, 5, np.random.default_rng(7))
    assert a == b and len(set(a)) == 5 and all(0 <= p <= 30 for p in a)
    assert insert_positions(2, 5, np.random.default_rng(0)).__len__() == 5  # more inserts than slots


def test_combine_directions_averages_where_both_exist():
    f = np.full((4, 2, 2), 0.8, np.float32)
    b = np.full((4, 2, 2), 0.2, np.float32)
    fv = np.array([False, True, True, True])
    bv = np.array([True, True, False, False])
    p, valid = combine_directions(f, b, fv, bv)
    assert valid.all()
    np.testing.assert_allclose(p[0], 0.2)
    np.testing.assert_allclose(p[1], 0.5)
    np.testing.assert_allclose(p[2:], 0.8)


def test_running_mean_equals_mean_of_runs():
    rng = np.random.default_rng(0)
    runs = rng.random((6, 3, 4, 5)).astype(np.float32)
    acc = RunningMean((3, 4, 5))
    for r in runs:
        acc.add(r)
    assert acc.n == 6
    np.testing.assert_allclose(acc.mean, runs.mean(0), atol=1e-6)


def test_running_mean_of_runs_added_slice_by_slice():
    """A run added in parts (slices in any order, as batched tracking delivers them) counts once."""
    rng = np.random.default_rng(1)
    runs = rng.random((3, 4, 2, 2)).astype(np.float32)
    acc = RunningMean((4, 2, 2))
    for r in runs:
        acc.add_slices([3, 1], r[[3, 1]])
        acc.add_slices([0, 2], r[[0, 2]])
        acc.count()
    assert acc.n == 3
    np.testing.assert_allclose(acc.mean, runs.mean(0), atol=1e-6)
    with pytest.raises(ValueError):
        acc.add(np.zeros((4, 2, 3)))


def test_binary_entropy_values():
    p = np.array([0.0, 0.5, 1.0, 0.25])
    h = binary_entropy(p)
    expected = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
    np.testing.assert_allclose(h, [0.0, 1.0, 0.0, expected], atol=1e-6)


def test_ensemble_entropy_is_high_where_runs_disagree():
    agree = np.stack([np.ones((4, 4, 4))] * 4)
    disagree = np.stack([np.ones((4, 4, 4)), np.zeros((4, 4, 4))] * 2)
    assert binary_entropy(agree.mean(0)).max() == 0.0
    assert binary_entropy(disagree.mean(0)).min() == pytest.approx(1.0)


def test_label_threshold_argmax_and_largest_component():
    probs = np.zeros((2, 10, 10, 3), np.float32)
    probs[0, 1:5, 1:5, :] = 0.9          # class 1, big blob
    probs[0, 8:9, 8:9, 0] = 0.9          # class 1, small island (removed by LCC)
    probs[1, 3:7, 3:7, :] = 0.6          # class 2 overlaps class 1: argmax decides
    probs[1, 0, 9, 0] = 0.4              # below threshold
    lab = probabilities_to_label(probs, [1, 2], 0.5, True)
    assert lab[2, 2, 1] == 1 and lab[4, 4, 1] == 1       # 0.9 > 0.6
    assert lab[6, 6, 1] == 2
    assert lab[8, 8, 0] == 0                              # island dropped
    assert lab[0, 9, 0] == 0
    lab_all = probabilities_to_label(probs, [1, 2], 0.5, False)
    assert lab_all[8, 8, 0] == 1


def test_largest_component_keeps_biggest():
    m = np.zeros((6, 6, 6), bool)
    m[0:2, 0:2, 0:2] = True
    m[4:6, 4:6, 3:6] = True
    kept = largest_component(m)
    assert kept.sum() == 12 and not kept[0, 0, 0]


def test_summary_inside_and_boundary():
    mask = np.zeros((12, 12, 12), bool)
    mask[3:9, 3:9, 3:9] = True
    ent = np.zeros(mask.shape, np.float32)
    band = boundary_band(mask, 1)
    ent[band] = 1.0
    s = summarize(ent, mask, 1)
    assert s["mean_entropy_boundary"] == pytest.approx(1.0)
    assert 0 < s["mean_entropy_inside"] < 1
    assert s["voxels"] == 216
