"""The per-case quality gate on real CHAOS volumes: hard cases are usable or flagged, never a silent Dice
near 0; a flagged pseudo label never reaches nnU-Net's training set; class names come from the data."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import chaos_cases, downsample_case
from hard_cases import ALL_CASES, CHAOS_CLASS_NAMES, USABLE_DICE, build, run_case

from ssl_medsam2 import strategies
from ssl_medsam2.config import load_config
from ssl_medsam2.preprocess import InputSettings, dataset_class_names, with_dataset_class_names
from ssl_medsam2.quality import QualitySettings, assess, estimated_agreement, trusted_classes


@pytest.fixture(scope="module")
def hard_cases(chaos_dir, tmp_path_factory):
    """Every hard case at 128x128 in-plane (2.5 mm, the atlas working spacing): supports chaos_01 + chaos_02,
    query chaos_05."""
    return build(tmp_path_factory.mktemp("hard"), ALL_CASES, factor=2, data=chaos_dir)


@pytest.fixture(scope="module")
def hard_results(hard_cases):
    """The atlas engine + gate on each hard case (about 10 CPU-s each)."""
    cfg = load_config(overrides=[f"input.class_names={json.dumps(CHAOS_CLASS_NAMES)}"])
    return {name: run_case(paths, cfg) for name, paths in hard_cases.items()}


@pytest.mark.parametrize("case", ALL_CASES)
def test_hard_case_is_usable_or_flagged(hard_results, case):
    r = hard_results[case]
    usable = r["min_dice"] >= USABLE_DICE
    assert usable or r["failed"], (f"{case}: silent bad pseudo label: Dice {r['dice']} not flagged "
                                   f"(score {r['score']}, {r['per_class']})")


def test_clearly_usable_labels_are_not_flagged(hard_results):
    """No cry-wolf: a pseudo label whose every class reaches Dice 0.65 passes the gate. (CHAOS chaos_05
    from chaos_01 + chaos_02, cpu_fast: the query stored rotated 90 degrees gets lowest class Dice 0.77 and
    case score 0.29; the broken ones score 0.0, docs/atlas.md has the table). Supports that contradict each other on a class (pairwise Dice ~0) are flagged even when the
    fused label happens to be right: that case is worth a look.)"""
    clear = {k: r for k, r in hard_results.items() if r["min_dice"] >= 0.65}
    assert clear, "no hard case got a clearly usable label: the engine itself regressed"
    for case, r in clear.items():
        # the one false alarm allowed: a start in doubt (a wrong start makes every organ wrong at once and no
        # class score can tell; how often a correctly stored CHAOS query is flagged so: docs/atlas.md)
        other = [x for x in r["reasons"] if not x.startswith("start in doubt")]
        assert not other, f"{case}: a usable label (Dice {r['dice']}) was flagged: {r['reasons']}"


def test_corrupted_support_is_flagged(hard_results):
    """No registration can undo a support whose labels are wrong: flagged, whatever the Dice."""
    for case in ("support_classes_permuted", "support_labels_shifted"):
        assert hard_results[case]["failed"], f"{case}: {hard_results[case]}"


def test_failed_case_ranks_first_for_uncertainty_even_when_confident():
    """A confidently wrong label can have the lowest entropy: failed cases still come first."""
    unc = {"a": 0.30, "b": 0.05, "c": 0.20}
    assert strategies.rank_uncertainty(unc, unc) == ["a", "c", "b"]
    assert strategies.rank_uncertainty(unc, unc, failed=["b"]) == ["b", "a", "c"]
    assert strategies.rank_quality(["a", "b", "c"], {"a": 0.5, "b": 0.1, "c": None}) == ["b", "a", "c"]


def test_app_uncertainty_strategy_sends_the_failed_pseudo_label_first(hard_cases, totalseg_dir, tmp_path):
    """In the app: atlas few-shot infer from two MRI supports on a good MRI query and on a CT scan (put
    among the MRI studies by mistake: its organs look nothing like the supports'), then the strategy."""
    import shutil
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "apps" / "ssl_medsam2"))
    from main import create_app

    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    good = hard_cases["good"]
    for s in ("chaos_01", "chaos_02"):
        shutil.copyfile(good["images"] / f"{s}.nii.gz", studies / f"{s}.nii.gz")
        shutil.copyfile(good["labels"] / f"{s}.nii.gz", studies / "labels" / "final" / f"{s}.nii.gz")
    # the usable MRI query: chaos_05 stored rotated 90 degrees (the engine finds the start; every class's
    # Dice >= 0.7), while its unrotated copy loses the left kidney (flagged, rightly: docs/atlas.md)
    shutil.copyfile(hard_cases["rotated_90"]["images"] / "chaos_05.nii.gz", studies / "chaos_05.nii.gz")
    shutil.copyfile(totalseg_dir / "imagesTr" / "ct_sm_0000.nii.gz", studies / "ct_scan.nii.gz")
    app = create_app(str(REPO / "apps" / "ssl_medsam2"), str(studies),
                     {"sam2.checkpoint": "none", "app.retrain_after_labels": "0"})
    ds = app.datastore()
    task = app.infer_tasks["atlas_fewshot"]
    for i in ("chaos_05", "ct_scan"):
        task({"image": ds.get_image_uri(i), "image_id": i})
    infos = {i: ds.get_image_info(i) for i in ("chaos_05", "ct_scan")}
    assert infos["ct_scan"]["ssl_fewshot_failed"] is True, infos
    assert infos["chaos_05"]["ssl_fewshot_failed"] is False, infos
    assert app.info()["ssl_medsam2"]["failed_pseudo_labels"] == ["ct_scan"]
    picked = app.strategy_tasks["uncertainty"]({"client_id": "alice", "ssl_anonymous": False}, ds)
    assert picked["id"] == "ct_scan", (picked, infos)


def test_quality_scores_from_probabilities():
    """Agreement is the Dice of the supports' labels under mean fusion; an empty class fails the case."""
    a = np.zeros((1, 20, 20, 4), np.float32)
    a[0, 2:10, 2:10] += 0.5  # support 1
    a[0, 6:14, 2:10] += 0.5  # support 2, shifted: overlap 4 of 8 rows
    assert estimated_agreement(a[0]) == pytest.approx(0.5)
    cfg = load_config()
    q = QualitySettings.from_config(cfg)
    label = np.zeros((20, 20, 4), np.uint8)
    out = assess(a, np.zeros_like(a), label, (1,), (1.0, 1.0, 1.0), {1: [256.0]}, {}, q)
    assert out["failed"] and "class_1: empty" in out["reasons"][0] and out["score"] == 0.0


def test_only_organs_that_passed_every_bar_are_trusted_as_a_corrections_base():
    """An interactive correction holds a pseudo label firmly only for the organs the gate passed, and for none
    when the case as a whole is in doubt (a mirrored start makes every organ wrong at once)."""
    q = QualitySettings.from_config(load_config())
    probs = np.zeros((2, 20, 20, 4), np.float32)
    probs[:, 2:10, 2:10] = 1.0  # class 1: both supports agree, certain
    probs[1] = 0.0
    probs[1, 12:18, 12:18] = 0.5  # class 2: the supports disagree (half of the mass each)
    label = np.zeros((20, 20, 4), np.uint8)
    label[2:10, 2:10] = 1
    label[12:18, 12:18] = 2
    entropy = np.zeros_like(probs)
    entropy[1][label == 2] = 1.0
    volumes = {1: [256.0], 2: [144.0]}
    out = assess(probs, entropy, label, (1, 2), (1.0, 1.0, 1.0), volumes, {}, q)
    assert out["failed"] and trusted_classes(out) == {1}, out
    doubt = assess(probs, entropy, label, (1, 2), (1.0, 1.0, 1.0), volumes, {"doubts": ["start in doubt"]}, q)
    assert trusted_classes(doubt) == frozenset()
    both = assess(probs[:1], entropy[:1], label * (label == 1), (1,), (1.0, 1.0, 1.0), volumes, {}, q)
    assert not both["failed"] and trusted_classes(both) == {1}
    for unknown in (None, 0.42, {"per_class": "x"}, {"per_class": {"class_1": {"score": "?"}}}):
        assert trusted_classes(unknown) == frozenset(), unknown


def test_failed_pseudo_label_never_reaches_nnunet_training(chaos_dir, tmp_path, monkeypatch):
    """Round k's nnU-Net dataset (what nnU-Net trains on) holds no case whose round-0 summary says failed."""
    from nnunet_helpers import TINY_SCHEDULE, make_tiny_chaos

    from ssl_medsam2.nnunet import one_round
    from ssl_medsam2.nnunet import train as nn_train
    from ssl_medsam2.nnunet.layout import RunLayout
    from ssl_medsam2.nnunet.settings import NnUNetSettings

    data = make_tiny_chaos(chaos_dir, tmp_path / "data")
    layout = RunLayout(tmp_path / "work")
    for n in data["unlabelled"]:
        (layout.labels(0)).mkdir(parents=True, exist_ok=True)
        (layout.round(0) / "summaries").mkdir(parents=True, exist_ok=True)
        (layout.labels(0) / f"{n}.nii.gz").write_bytes((data["root"] / "pseudo" / f"{n}.nii.gz").read_bytes())
    bad, good = data["unlabelled"]
    (layout.round(0) / "summaries" / f"{bad}.json").write_text(json.dumps({"case": bad, "failed": True}))
    (layout.round(0) / "summaries" / f"{good}.json").write_text(json.dumps({"case": good, "failed": False}))
    seen = {}

    def fake_plan(settings, reuse_from=None, log_path=None):  # what nnU-Net would plan and train on
        import os
        from pathlib import Path

        ds = next(Path(os.environ["nnUNet_raw"]).glob("Dataset*"))
        seen["cases"] = json.loads((ds / "dataset.json").read_text())["ssl_medsam2_cases"]
        seen["files"] = sorted(p.name for p in (ds / "labelsTr").iterdir())

    monkeypatch.setattr(nn_train, "plan_and_preprocess", fake_plan)
    monkeypatch.setattr(nn_train, "train_model", lambda *a, **k: None)
    cfg = load_config(overrides=TINY_SCHEDULE)
    images = {c: data["root"] / "images" / f"{c}_0000.nii.gz" for c in data["cases"]}
    labels = {c: data["root"] / "labels" / f"{c}.nii.gz" for c in data["labelled"]}
    settings = NnUNetSettings.from_config(cfg)
    one_round.train_round(1, layout, cfg, images, labels, data["unlabelled"], [1, 2, 3, 4], lambda probe: (settings, None))
    assert bad not in seen["cases"] and f"{bad}.nii.gz" not in seen["files"]
    assert seen["cases"][good]["source"] == "pseudo_label"
    assert {c for c, v in seen["cases"].items() if v["source"] == "ground_truth"} == set(data["labelled"])


# --- class names ------------------------------------------------------------------------------------

def test_class_names_default_neutral_never_another_datasets_organs():
    cfg = load_config()
    inputs = InputSettings.from_config(cfg)
    assert inputs.class_names == {} and inputs.class_name(1) == "class_1" and inputs.label_ids is None
    assert "liver" not in json.dumps(cfg["input"]) and "kidney" not in json.dumps(cfg["input"])


def test_class_names_from_dataset_json_and_explicit_set_wins(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "RV": 1, "MYO": 2, "LV": 3, "ignore": 4}, "channel_names": {"0": "MRI"}}))
    assert dataset_class_names(tmp_path / "imagesTr") == {1: "RV", 2: "MYO", 3: "LV"}
    cfg = with_dataset_class_names(load_config(), tmp_path / "imagesTr")
    assert InputSettings.from_config(cfg).class_name(2) == "MYO"
    given = load_config(overrides=["input.class_names={1: cavity}"])
    explicit = with_dataset_class_names(given, tmp_path / "imagesTr")
    assert InputSettings.from_config(explicit).class_names == {1: "cavity"}
    assert dataset_class_names(tmp_path / "x" / "nowhere") == {}


def test_pseudo_label_summary_uses_dataset_json_names(chaos_dir, tmp_path):
    """A folder run names classes from the data's dataset.json; without one, class_<id>."""
    from ssl_medsam2.pseudo_label import pseudo_label_folder

    root = tmp_path / "ds"
    for c in chaos_cases()[:3]:
        downsample_case(chaos_dir / "imagesTr" / f"{c}_0000.nii.gz", chaos_dir / "labelsTr" / f"{c}.nii.gz",
                        root / "imagesTr" / f"{c}_0000.nii.gz", root / "all" / f"{c}.nii.gz", factor=8)
    (root / "labelsTr").mkdir()
    for c in chaos_cases()[:2]:
        (root / "labelsTr" / f"{c}.nii.gz").write_bytes((root / "all" / f"{c}.nii.gz").read_bytes())
    cfg = load_config(overrides=["protocol.engine=atlas"])
    (s,) = pseudo_label_folder(root / "imagesTr", root / "labelsTr", tmp_path / "neutral", cfg, show_progress=False)
    assert set(s["per_class"]) == {"class_1", "class_2", "class_3", "class_4"}
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2, "c": 3, "d": 4}}))
    (s,) = pseudo_label_folder(root / "imagesTr", root / "labelsTr", tmp_path / "named", cfg, show_progress=False)
    assert set(s["per_class"]) == {"a", "b", "c", "d"} and s["class_names"]["1"] == "a"
    run = json.loads((tmp_path / "named" / "run.json").read_text())
    assert "failed_quality" in run and "quality" in s and isinstance(s["failed"], bool)
    assert nib.load(str(tmp_path / "named" / "labels" / f"{s['case']}.nii.gz")).shape[:3] == \
        nib.load(str(root / "imagesTr" / f"{s['case']}_0000.nii.gz")).shape
