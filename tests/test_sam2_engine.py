"""TFFS-MedSAM2 engine on real CHAOS MRI (downsampled, z-cropped) with RANDOM-weight SAM2.1 Hiera-T.

Random weights say nothing about accuracy; these tests check the mechanics: the engine (batched and
run by run) equals the paper-order reference, prompts are respected, the support cache evicts whole
supports, geometry is kept, seeds reproduce, bad input fails cleanly. CUDA: tests/test_sam2_cuda.py.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import outputs_on_source_grid
from sam2_helpers import CUDA_BF16_TOL, SMALL, load_case, make_tiny
from ssl_medsam2.config import load_config
from ssl_medsam2.engines import sam2_batch, sam2_cond_kv
from ssl_medsam2.engines.sam2_batch import BatchedTracker, logits_to_prob
from ssl_medsam2.engines.sam2_context import Features, SupportCache
from ssl_medsam2.engines.sam2_engine import SAM2Engine
from ssl_medsam2.engines.sam2_model import CheckpointNotFound, checkpoint_status
from ssl_medsam2.io import InputError
from ssl_medsam2.pseudo_label import pseudo_label_folder


@pytest.fixture(scope="module")
def tiny(chaos_dir, tmp_path_factory):
    return make_tiny(chaos_dir, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine():
    return SAM2Engine(load_config(overrides=SMALL))


@pytest.mark.parametrize("query,max_cond", [("chaos_03short", 2), ("chaos_03long", -1)])
def test_batched_and_run_by_run_engines_equal_reference_order(tiny, query, max_cond, monkeypatch):
    """Both fast paths give the paper-order reference's probabilities (float32, CPU): 2 supports,
    2 classes, both directions, a query shorter (4 slices) and one longer (10) than the supports;
    all prompted frames in attention (the paper) and at most 2 (SAM2 then picks the closest per frame
    and attends to the others as recent memories). The batched engine runs its CPU attention (split
    softmax over 64-channel memories) and the fused one CUDA uses; each in one and in several chunks;
    all runs of the query in one track (steps = longest support block + longest query run) and in
    chunks of 3 sequences."""
    sup = [load_case(tiny, "chaos_01"), load_case(tiny, "chaos_02")]
    q = load_case(tiny, query, labelled=False)
    classes = [1, 2]
    cfg = SMALL + [f"sam2.max_cond_frames_in_attn={max_cond}"]
    reference = SAM2Engine(load_config(overrides=cfg)).predict_reference(sup, q, classes)
    n_q = q.image.shape[2]
    positions = [p for ps in reference.meta["insert_positions"].values() for p in ps]
    assert any(0 < p < n_q for p in positions)  # some run tracks query frames in both directions
    variants = {"batched": [], "batched, 3 per step": ["sam2.max_batch=3"], "run by run": ["sam2.batch_runs=false"],
                "batched, fused attention": [], "batched, split attention in chunks": [],
                "batched, fused attention, CUDA's padded shapes": []}
    for what, extra in variants.items():
        monkeypatch.setattr(sam2_batch, "SPLIT_ON_CPU", "fused" not in what)
        monkeypatch.setattr(sam2_cond_kv, "SPLIT_CHUNK_ELEMENTS", 1 if "chunks" in what else 2 ** 24)
        engine = SAM2Engine(load_config(overrides=cfg + extra + (["sam2.max_batch=64"] if what == "batched" else [])))
        if "padded" in what:  # batch padded to powers of two, memory capacities to multiples of 8, chunks of 3
            engine._tracker = BatchedTracker(engine.predictor, 3, static_shapes=True, compile=False, stats=engine.stats)
        got = engine.predict(sup, q, classes)
        assert got.probs.shape == (2,) + q.image.shape, what
        assert got.meta["insert_positions"] == reference.meta["insert_positions"], what
        assert np.abs(got.probs - reference.probs).max() <= 1e-4, what
        assert got.meta["random_weights"] is True and got.n_runs == 4, what
        assert 0.0 <= got.probs.min() and got.probs.max() <= 1.0, what
        if extra != ["sam2.batch_runs=false"]:  # several runs really went through one step together
            assert 0 < engine.stats["batched_steps"] < engine.stats["frames_tracked"], what
        if what == "batched":  # one track for blocks, one for runs: steps = longest block + longest run
            assert engine.stats["batched_steps"] <= max(len(s.image.array[0, 0]) for s in sup) + n_q, what


def test_campaign_batches_queries_and_equals_one_query_at_a_time(tiny):
    """Several queries (4 and 10 slices) in one batched track give each query's own result, with the
    supports encoded once and fewer steps than the queries one by one."""
    sup = [load_case(tiny, "chaos_01"), load_case(tiny, "chaos_02")]
    queries = [load_case(tiny, "chaos_03short", labelled=False), load_case(tiny, "chaos_03long", labelled=False)]
    cfg = SMALL + ["sam2.max_cond_frames_in_attn=2", "sam2.max_batch=64"]
    one = SAM2Engine(load_config(overrides=cfg))
    alone = [one.predict(sup, q, [1, 3]) for q in queries]
    campaign = SAM2Engine(load_config(overrides=cfg + ["sam2.campaign_queries=2"]))
    together = campaign.predict_campaign(sup, queries, [1, 3])
    for a, b in zip(alone, together):
        assert a.meta["insert_positions"] == b.meta["insert_positions"]
        assert np.abs(a.probs - b.probs).max() <= 1e-5
    assert campaign.stats["frames_tracked"] == one.stats["frames_tracked"]
    assert campaign.stats["batched_steps"] < one.stats["batched_steps"]
    assert campaign.stats["frames_encoded"] == one.stats["frames_encoded"]


def test_bfloat16_autocast_engines_stay_close_to_reference(tiny):
    """sam2.dtype=bfloat16 (CUDA's default) runs through the same code on CPU autocast: the batched
    engine (its fused attention: the split form is float32 only) and the run-by-run engine stay within
    the bf16 tolerance the CUDA tests use of the paper-order reference; the drift is printed."""
    sup = [load_case(tiny, "chaos_01"), load_case(tiny, "chaos_02")]
    q = load_case(tiny, "chaos_03short", labelled=False)
    cfg = SMALL + ["sam2.dtype=bfloat16"]
    reference = SAM2Engine(load_config(overrides=cfg)).predict_reference(sup, q, [1])
    for what, extra in {"batched": [], "run by run": ["sam2.batch_runs=false"]}.items():
        got = SAM2Engine(load_config(overrides=cfg + extra)).predict(sup, q, [1])
        diff = float(np.abs(got.probs - reference.probs).max())
        print(f"CPU bf16 autocast, {what} vs reference: max abs dprob {diff:.3g}")
        assert got.meta["dtype"] == "bfloat16" and diff <= CUDA_BF16_TOL, what


def test_support_masks_are_respected_on_prompted_frames(tiny, engine):
    s = load_case(tiny, "chaos_01")
    q = engine.query_context(load_case(tiny, "chaos_03", labelled=False), axis=2, encode=False)
    sctx = engine.support_context(s, q, cached=True)
    mask = sctx.mask(1)
    prompts = engine._prompts(q, sctx, 1, mask)
    prompted = set(np.flatnonzero(mask.reshape(len(mask), -1).any(1)).tolist())
    assert set(prompts) == prompted and prompted
    for j, out in prompts.items():
        prob = logits_to_prob(out["pred_masks"], q.hw)[0].numpy()
        # SAM2 keeps mask outputs at 1/4 of the model size: compare away from the boundary
        inside = ndimage.binary_erosion(mask[j], iterations=3)
        outside = ~ndimage.binary_dilation(mask[j], iterations=3)
        assert (prob[inside] > 0.9).all() and (prob[outside] < 0.1).all()
        assert out["maskmem_features"] is not None  # its memory was encoded for tracking


def test_support_cache_evicts_least_recent_support_with_its_outputs():
    cache = SupportCache(limit_frames=10)
    encoded = []

    def enc(name, n):
        return lambda: encoded.append(name) or Features([None] * n, [], [])

    a = cache.entry("a", enc("a", 4))
    a.prompts[(1, (8, 8))] = {0: "out"}
    a.blocks[(1, (8, 8), 5, False)] = {1: "out"}
    cache.entry("b", enc("b", 4))
    assert cache.entry("a", enc("a", 4)) is a and encoded == ["a", "b"]  # hit: not re-encoded
    cache.entry("c", enc("c", 4))  # 12 frames > 10: "b" (least recent) goes, "a" stays
    assert "a" in cache and "b" not in cache and "c" in cache and cache.frames == 8
    cache.entry("d", enc("d", 12))  # larger than the limit alone: kept, all others go
    assert len(cache) == 1 and "d" in cache
    assert cache.entry("a", enc("a", 4)).prompts == {}  # "a" came back fresh: no stale outputs


def test_same_seed_same_result_other_seed_other_positions(tiny):
    sup = [load_case(tiny, "chaos_01")]
    q = load_case(tiny, "chaos_03", labelled=False)
    a = SAM2Engine(load_config(overrides=SMALL + ["sam2.seed=3"])).predict(sup, q, [1])
    b = SAM2Engine(load_config(overrides=SMALL + ["sam2.seed=3"])).predict(sup, q, [1])
    c = SAM2Engine(load_config(overrides=SMALL + ["sam2.seed=4"])).predict(sup, q, [1])
    np.testing.assert_array_equal(a.probs, b.probs)
    assert a.meta["insert_positions"] == b.meta["insert_positions"]
    assert a.meta["insert_positions"] != c.meta["insert_positions"] or not np.array_equal(a.probs, c.probs)


def test_pseudo_label_folder_multilabel_geometry_and_summary(tiny, tmp_path):
    cfg = load_config(overrides=SMALL + ["sam2.n_inserts=1"])
    out = tmp_path / "out"
    summaries = pseudo_label_folder(tiny / "imagesTr", tiny / "labelsTr", out, cfg, show_progress=False)
    assert [s["case"] for s in summaries] == ["chaos_03"]
    lab, prob, ent = outputs_on_source_grid(out, "chaos_03", tiny / "imagesTr" / "chaos_03_0000.nii.gz", atol=1e-6)
    assert prob.shape[3] == ent.shape[3] == 4  # liver, right kidney, left kidney, spleen
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, 1, 2, 3, 4}
    p = np.asarray(prob.dataobj)
    e = np.asarray(ent.dataobj)
    assert 0 <= p.min() and p.max() <= 1 and 0 <= e.min() and e.max() <= 1
    summary = json.loads((out / "summaries" / "chaos_03.json").read_text())
    assert summary["classes"] == [1, 2, 3, 4] and summary["random_weights"] is True
    assert summary["weights"] == "RANDOM" and summary["n_runs"] == 2
    assert set(summary["per_class"]) == {"class_1", "class_2", "class_3", "class_4"}  # neutral: no dataset.json
    assert "mean_entropy_boundary" in summary and "timings" in summary
    assert b"RANDOM" in lab.header["descrip"].tobytes()
    assert not [p for p in out.rglob(".staging*")]


def test_folder_campaign_groups_queries_writes_every_case_and_resumes(tiny, tmp_path, monkeypatch):
    """`pseudo-label` over a folder with sam2.campaign_queries=2 hands the engine two queries per call
    (their runs share its steps) and finalises each alone: the labels of one query per call, every case
    written. A group whose call fails is run case by case: its good query is written, the bad one stops
    the run."""
    images = tmp_path / "images"
    images.mkdir()
    for f in [*(tiny / "imagesTr").iterdir(), *(tiny / "extra").iterdir()]:  # 3 queries: 7, 10 and 4 slices
        (images / f.name).write_bytes(f.read_bytes())
    cfg = SMALL + ["sam2.n_inserts=1", "sam2.max_cond_frames_in_attn=2"]
    calls, fail_on = [], set()
    predict_campaign = SAM2Engine.predict_campaign

    def spy(self, supports, queries, classes, progress=None):
        calls.append([q.name for q in queries])
        if fail_on & set(calls[-1]):
            raise RuntimeError("simulated engine failure")
        return predict_campaign(self, supports, queries, classes, progress)

    monkeypatch.setattr(SAM2Engine, "predict_campaign", spy)

    def run(out, extra=()):
        calls.clear()
        return pseudo_label_folder(images, tiny / "labelsTr", out, load_config(overrides=cfg + list(extra)),
                                   show_progress=False)

    one = run(tmp_path / "one")
    names = [s["case"] for s in one]
    assert len(names) == 3 and calls == [[n] for n in names]  # auto on CPU: one query per call
    two = run(tmp_path / "two", ["sam2.campaign_queries=2"])
    assert calls == [names[:2], names[2:]]
    assert [s["case"] for s in two] == names
    assert [s["timings"].get("campaign_queries") for s in two] == [2, 2, None]

    def same(out):
        for n in names:
            for kind in ("labels", "probabilities"):
                a = np.asarray(nib.load(str(tmp_path / "one" / kind / f"{n}.nii.gz")).dataobj)
                b = np.asarray(nib.load(str(out / kind / f"{n}.nii.gz")).dataobj)
                if kind == "labels":
                    np.testing.assert_array_equal(a, b, err_msg=n)
                else:
                    assert np.abs(a - b).max() <= 1e-4, n

    same(tmp_path / "two")
    assert sorted(json.loads((tmp_path / "two" / "run.json").read_text())["queries"]) == sorted(names)

    fail_on.add(names[1])  # the first group fails; run case by case, its first query is written
    with pytest.raises(RuntimeError, match="simulated"):
        run(tmp_path / "three", ["sam2.campaign_queries=2"])
    assert calls == [names[:2], names[:1], names[1:2]]
    assert [(tmp_path / "three" / "summaries" / f"{n}.json").exists() for n in names] == [True, False, False]
    fail_on.clear()
    run(tmp_path / "three", ["sam2.campaign_queries=2"])  # the re-run resumes: the finished first query is skipped
    assert calls == [names[1:]]
    same(tmp_path / "three")
    assert not [p for p in (tmp_path / "three").rglob(".staging*")]


# --- bad input: clear error naming the file, nothing partial written -------------------------------

def _write(path, data, affine=np.diag([4.0, 4.0, 7.7, 1.0])):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _bad_folder(tiny, tmp_path, mutate):
    """A copy of the tiny folder (2 supports + 1 query) with one thing broken by ``mutate``."""
    root = tmp_path / "bad"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for f in (tiny / sub).iterdir():
            (root / sub / f.name).write_bytes(f.read_bytes())
    mutate(root)
    return root


def _label(root, name="chaos_01"):
    img = nib.load(str(root / "labelsTr" / f"{name}.nii.gz"))
    return np.asarray(img.dataobj), img.affine


BAD_INPUTS = {
    "label shape mismatch": (lambda r: _write(r / "labelsTr" / "chaos_01.nii.gz", _label(r)[0][:-1], _label(r)[1]),
                             "chaos_01.nii.gz", "does not match image shape"),
    "label affine mismatch": (lambda r: _write(r / "labelsTr" / "chaos_01.nii.gz", _label(r)[0],
                                               _label(r)[1] @ np.diag([1, 1, 1.5, 1])),
                              "chaos_01.nii.gz", "affine differs"),
    "empty support mask": (lambda r: _write(r / "labelsTr" / "chaos_02.nii.gz", np.zeros_like(_label(r, "chaos_02")[0]),
                                            _label(r, "chaos_02")[1]), "chaos_02.nii.gz", "empty"),
    "2D image": (lambda r: _write(r / "imagesTr" / "chaos_03_0000.nii.gz", np.ones((16, 16), np.float32)),
                 "chaos_03_0000.nii.gz", "expected a 3D volume"),
    "4D image": (lambda r: _write(r / "imagesTr" / "chaos_03_0000.nii.gz", np.ones((16, 16, 8, 2), np.float32)),
                 "chaos_03_0000.nii.gz", "expected a 3D volume"),
    "NaN voxels": (lambda r: _write(r / "imagesTr" / "chaos_03_0000.nii.gz",
                                    np.where(np.arange(64 * 64 * 7).reshape(64, 64, 7) == 5, np.nan, 1.0).astype(np.float32)),
                   "chaos_03_0000.nii.gz", "NaN"),
    "unreadable file": (lambda r: (r / "imagesTr" / "chaos_03_0000.nii.gz").write_bytes(b"not a nifti at all"),
                        "chaos_03_0000.nii.gz", "unreadable"),
    "no support": (lambda r: [p.unlink() for p in (r / "labelsTr").iterdir()], None, "no support"),
}


@pytest.mark.parametrize("what", list(BAD_INPUTS))
def test_bad_input_clear_error_and_nothing_written(tiny, tmp_path, what):
    mutate, fname, words = BAD_INPUTS[what]
    root = _bad_folder(tiny, tmp_path, mutate)
    out = tmp_path / "out"
    cfg = load_config(overrides=SMALL)
    with pytest.raises(InputError) as err:
        pseudo_label_folder(root / "imagesTr", root / "labelsTr", out, cfg, show_progress=False)
    msg = str(err.value)
    assert words.lower() in msg.lower()
    if fname:
        assert fname in msg
    assert not out.exists() or not any(out.rglob("*"))


def test_missing_checkpoint_names_file_and_remedy(tmp_path):
    cfg = load_config(overrides=[f"sam2.cache_dir={tmp_path}", "sam2.download=false", "sam2.device=cpu"])
    ok, reason = checkpoint_status(cfg)
    assert not ok and "MedSAM2_latest.pt" in reason and str(tmp_path) in reason and "--checkpoint" in reason
    with pytest.raises(CheckpointNotFound) as err:
        SAM2Engine(cfg).predictor
    assert "MedSAM2_latest.pt" in str(err.value) and "huggingface.co" in str(err.value)
    assert checkpoint_status(load_config(overrides=["sam2.checkpoint=none"]))[0]


def test_cli_pseudo_label_end_to_end_and_bad_input(tiny, tmp_path, capsys):
    from ssl_medsam2.cli import main

    out = tmp_path / "cli_out"
    rc = main(["pseudo-label", "--images", str(tiny / "imagesTr"), "--labels", str(tiny / "labelsTr"),
               "--out", str(out), "--checkpoint", "none", "--device", "cpu",
               "--set", "sam2.image_size=64", "--set", "sam2.n_inserts=1"])
    assert rc == 0
    assert (out / "labels" / "chaos_03.nii.gz").exists() and (out / "run.json").exists()
    rc = main(["pseudo-label", "--images", str(tiny / "imagesTr"), "--labels", str(tmp_path / "nope"),
               "--out", str(tmp_path / "o2"), "--checkpoint", "none"])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
    rc = main(["pseudo-label", "--images", str(tiny / "imagesTr"), "--labels", str(tiny / "labelsTr"),
               "--out", str(tmp_path / "o3"), "--set", "sam2.n_insert=1"])
    assert rc == 2 and "unknown config key" in capsys.readouterr().err
