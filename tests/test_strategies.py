"""Strategies, scores and leases: pure functions on real CHAOS volumes and a real lease file."""

from __future__ import annotations

import multiprocessing as mp

import nibabel as nib
import numpy as np
import pytest

from ssl_medsam2 import strategies as st
from ssl_medsam2.leases import LeaseBook
from ssl_medsam2.metrics import mean_dice

GRID = (8, 8, 4)  # the thumbnail grid of the embedding (app.embedding_grid in the config)


def _load(root, case):
    img = np.asarray(nib.load(str(root / "imagesTr" / f"{case}_0000.nii.gz")).dataobj, dtype=np.float32)
    lab = np.asarray(nib.load(str(root / "labelsTr" / f"{case}.nii.gz")).dataobj).astype(np.uint8)
    return img, lab


def test_rankings_put_unscored_last_and_respect_direction():
    scores = {"a": 0.1, "b": 0.9, "c": None, "d": 0.5, "e": float("nan")}
    assert st.rank_uncertainty(scores, scores) == ["b", "d", "a", "c", "e"]
    assert st.rank_most_confident(scores, scores) == ["a", "d", "b", "c", "e"]
    assert st.rank_first(["c", "a", "b"]) == ["a", "b", "c"]
    assert st.rank_random(["a", "b", "c", "d"], seed=1) == st.rank_random(["d", "c", "b", "a"], seed=1)
    assert st.choose_next(["b", "d", "a"], {"b"}) == "d"
    assert st.choose_next(["b"], {"b"}) is None


def test_dice_uncertainty_and_disagreement_on_real_labels(small_chaos):
    img, lab = _load(small_chaos, "chaos_01")
    assert mean_dice(lab, lab) == 1.0
    assert st.disagreement_score(lab, lab) == 0.0
    shifted = np.roll(lab, 3, axis=0)
    d = mean_dice(lab, shifted)
    assert 0.2 < d < 0.99
    assert st.disagreement_score(lab, shifted) == pytest.approx(1 - d)
    assert st.disagreement_score(lab, np.zeros_like(lab)) == 1.0
    # entropy high only at organ 1 -> its class scores high, a class with no voxels is skipped
    classes = (1, 2)
    ent = np.zeros((2,) + lab.shape, np.float32)
    ent[0][lab == 1] = 0.8
    u = st.uncertainty_score(ent, lab, classes, band=0)
    assert u == pytest.approx(0.4)  # mean of 0.8 (liver) and 0 (right kidney)
    assert st.uncertainty_score(ent, np.zeros_like(lab), classes, band=2) is None


def test_embeddings_and_k_center_on_real_volumes(small_chaos):
    cases = ["chaos_01", "chaos_02", "chaos_03", "chaos_05", "chaos_08"]
    emb = {c: st.image_embedding(_load(small_chaos, c)[0], GRID) for c in cases}
    assert all(e.shape == (8 * 8 * 4 + 16,) and np.isfinite(e).all() for e in emb.values())
    # a volume is its own nearest neighbour; a flipped copy is farther than itself
    img = _load(small_chaos, "chaos_02")[0]
    assert st.most_similar(emb["chaos_02"], emb, 1) == ["chaos_02"]
    flipped = st.image_embedding(img[::-1, ::-1], GRID)
    assert np.linalg.norm(flipped - emb["chaos_02"]) > 0
    labelled = {"chaos_01": emb["chaos_01"]}
    cands = {c: emb[c] for c in cases[1:]}
    order = st.k_center(cands, labelled)
    assert sorted(order) == sorted(cands)
    # first pick is the candidate farthest from the labelled image
    far = max(cands, key=lambda c: np.sum((cands[c] - emb["chaos_01"]) ** 2))
    assert order[0] == far
    # a near-duplicate of a labelled image is picked last
    cands["dup"] = emb["chaos_01"] + 1e-4
    assert st.k_center(cands, labelled)[-1] == "dup"


def test_leases_hold_expire_release(tmp_path):
    book = LeaseBook(tmp_path / "leases.json", ttl_s=3600)
    ranked = ["a", "b", "c"]
    t0 = 1000.0
    la = book.acquire_first(ranked, "alice", now=t0)
    lb = book.acquire_first(ranked, "bob", now=t0 + 1)
    assert (la.image, lb.image) == ("a", "b")
    assert book.acquire_first(["a", "b"], "alice", now=t0 + 2).image == "a"  # nothing else free: renews her own
    assert book.acquire("a", "carol", now=t0 + 3) is None
    assert book.held_by_others("carol", now=t0 + 3) == {"a", "b"}
    assert book.release("a", holder="bob") is False
    assert book.release("a") is True
    assert book.acquire_first(ranked, "carol", now=t0 + 4).image == "a"
    # expiry: an hour later bob's lease is gone
    assert set(book.active(now=t0 + 3602)) == {"a"}
    assert book.acquire("b", "dave", now=t0 + 3602).holder == "dave"
    # a second LeaseBook on the same file (another process) sees the same state
    assert set(LeaseBook(tmp_path / "leases.json").active(now=t0 + 3602)) == {"a", "b"}


def _grab(path, holder, q):
    q.put(LeaseBook(path).acquire_first([f"img{i}" for i in range(20)], holder).image)


def test_leases_concurrent_processes_never_share(tmp_path):
    ctx = mp.get_context("fork")  # separate processes, without re-importing everything
    q = ctx.Queue()
    procs = [ctx.Process(target=_grab, args=(tmp_path / "l.json", f"user{i}", q)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = [q.get(timeout=5) for _ in procs]
    assert len(set(got)) == 4
