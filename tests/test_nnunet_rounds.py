"""FSL-nnUNet rounds on tiny real CHAOS: two versions, crash + resume, convergence stop, predict CLI.

The round-0 pseudo labels are the ground truth eroded once (fine for plumbing tests; the accuracy
claim lives in bench/ssl_accuracy.py). The schedule is 1 epoch x 2 iterations: these tests prove
the mechanics, not the segmentation quality.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_helpers import TINY_SCHEDULE, make_tiny_chaos
from ssl_medsam2.config import load_config
from ssl_medsam2.nnunet import one_round
from ssl_medsam2.nnunet import train as nn_train
from ssl_medsam2.nnunet.layout import RunLayout
from ssl_medsam2.nnunet.rounds import run_ssl, should_stop


class SimulatedCrash(RuntimeError):
    pass


def _mtimes(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipeline(chaos_dir, tmp_path_factory):
    """Run A: max_rounds=2, crashes while predicting round 2. Run B: the same command, resumed."""
    tiny = make_tiny_chaos(chaos_dir, tmp_path_factory.mktemp("tiny_rounds"))
    root, work = tiny["root"], tiny["root"] / "work"
    cfg = load_config(overrides=TINY_SCHEDULE + ["nnunet.max_rounds=2", "nnunet.min_change=0.0"])
    calls = {"train": [], "predict": []}
    real_train, real_predict = nn_train.train_model, one_round.predict_cases
    events = []

    def counting_train(ncfg, model_dir, *a, **kw):
        calls["train"].append(Path(model_dir).parent.name)
        return real_train(ncfg, model_dir, *a, **kw)

    def crashing_predict(model_dir, ncfg, images, names, out_dir, k, *a, **kw):
        calls["predict"].append((k, Path(out_dir).name))
        if k == 2 and crash["on"]:
            raise SimulatedCrash("power cut while predicting round 2")
        return real_predict(model_dir, ncfg, images, names, out_dir, k, *a, **kw)

    crash = {"on": True}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn_train, "train_model", counting_train)
        mp.setattr(one_round, "predict_cases", crashing_predict)
        with pytest.raises(SimulatedCrash):
            run_ssl(root / "images", root / "labels", work, cfg, pseudo_labels_dir=root / "pseudo",
                    progress=events.append, show_progress=False)
        after_a = {"train": list(calls["train"]), "round1": _mtimes(RunLayout(work).round(1)),
                   "round2_model": _mtimes(RunLayout(work).round(2) / "model"),
                   "round2_metrics": (RunLayout(work).round(2) / "metrics.json").exists(),
                   "state": json.loads((work / "state.json").read_text())}
        calls["train"].clear()
        calls["predict"].clear()
        crash["on"] = False
        state = run_ssl(root / "images", root / "labels", work, cfg, pseudo_labels_dir=root / "pseudo",
                        progress=events.append, show_progress=False)
        after_b = {"train": list(calls["train"]), "predict": list(calls["predict"])}
    return {"tiny": tiny, "work": work, "cfg": cfg, "a": after_a, "b": after_b, "state": state, "events": events}


def test_interrupted_run_keeps_finished_round_and_partial_model(pipeline):
    a = pipeline["a"]
    assert a["train"] == ["round_001", "round_002"]
    assert "metrics.json" in a["round1"] and "model/fold_all/checkpoint_final.pth" in a["round1"]
    assert "fold_all/checkpoint_final.pth" in a["round2_model"]  # trained before the crash
    assert not a["round2_metrics"]
    assert [r["round"] for r in a["state"]["rounds"]] == [1]


def test_resume_recomputes_nothing_finished(pipeline):
    b, work = pipeline["b"], pipeline["work"]
    assert b["train"] == []  # neither round 1 nor the already trained round 2 is retrained
    assert {k for k, _ in b["predict"]} == {2}  # only round 2's predictions are (re)done
    assert _mtimes(RunLayout(work).round(1)) == pipeline["a"]["round1"]  # round 1 untouched, byte for byte
    # the trained round 2 is reused as it was, less the checkpoint_best.pth nothing uses (removed once deployed)
    before = {k: v for k, v in pipeline["a"]["round2_model"].items() if not k.endswith("checkpoint_best.pth")}
    assert _mtimes(RunLayout(work).round(2) / "model") == before


def test_two_rounds_are_two_versions_on_disk(pipeline):
    work, tiny, state = pipeline["work"], pipeline["tiny"], pipeline["state"]
    assert [r["round"] for r in state["rounds"]] == [1, 2]
    assert state["stop_reason"] == "reached max_rounds=2" and not state["converged"]
    ckpts = []
    for k in (1, 2):
        rd = RunLayout(work).round(k)
        m = json.loads((rd / "metrics.json").read_text())
        assert m["round"] == k and 0.0 <= m["change"] <= 1.0 and 0.0 <= m["labelled_dice"] <= 1.0
        assert set(m["dice_to_previous"]) == set(tiny["unlabelled"])
        assert (rd / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert {p.name for p in (rd / "model").iterdir()} >= {"plans.json", "dataset.json", "fold_all"}
        ckpts.append((rd / "model" / "fold_all" / "checkpoint_final.pth").read_bytes())
        assert not (rd / "model" / "fold_all" / "checkpoint_best.pth").exists()  # never used: not kept
        for case in tiny["unlabelled"]:
            src = nib.load(str(tiny["root"] / "images" / f"{case}_0000.nii.gz"))
            lab = nib.load(str(rd / "labels" / f"{case}.nii.gz"))
            assert np.allclose(lab.affine, src.affine) and lab.shape == src.shape
        assert not (rd / "nnunet").exists()  # intermediates cleaned
    assert ckpts[0] != ckpts[1]
    final = json.loads((work / "final.json").read_text())
    assert final["round"] == 2 and final["model_dir"] == str((RunLayout(work).round(2) / "model").resolve())
    # the schedule: auto on this CPU -> short (the tiny test values override its lengths), recorded
    sched = json.loads((work / "state.json").read_text())["schedule"]
    assert final["schedule"] == sched and sched["spec"] == "auto" and sched["name"] == "short"
    assert sched["epochs"] == 1 and sched["iterations_per_epoch"] == 2 and sched["it_per_s"] > 0
    assert "schedule auto on CPU" in sched["reason"] and "overridden: epochs=1" in sched["reason"]
    stages = {e["stage"] for e in pipeline["events"]}
    assert {"export", "plan", "train", "predict", "round_done", "done"} <= stages
    starts = [e for e in pipeline["events"] if e["stage"] == "train" and "epoch_s" not in e]
    assert [(e["epoch"], e["total_epochs"]) for e in starts] == [(0, 1), (0, 1)]  # a bar at once, per round
    train_ev = [e for e in pipeline["events"] if e["stage"] == "train" and "epoch_s" in e]
    assert all(e["total_epochs"] == 1 and "best_metric" in e for e in train_ev)
    # what the progress line and MONAI Label's train_stats show: speed, loss, pseudo Dice, round k/K
    assert all(e["epoch_s"] > 0 and e["iterations_per_epoch"] == 2 and e["round"] in (1, 2) and e["max_rounds"] == 2
               and isinstance(e["train_loss"], float) and "pseudo_dice" in e for e in train_ev)


def test_convergence_rule_stops_the_loop(pipeline, capsys):
    assert should_stop([0.3, 0.2], 0.05, 5) == (False, "")
    assert should_stop([0.3, 0.01], 0.05, 5)[0] and "converged" in should_stop([0.3, 0.01], 0.05, 5)[1]
    assert should_stop([0.3, 0.2], 0.05, 2) == (True, "reached max_rounds=2")
    # the CLI on the same work dir with max_rounds=5: round 2 changed less than min_change=1.0,
    # so the loop stops at once, trains nothing, and says why
    from ssl_medsam2.cli import main

    tiny, work = pipeline["tiny"], pipeline["work"]
    sets = [a for o in TINY_SCHEDULE for a in ("--set", o)]
    rc = main(["run", "--images", str(tiny["root"] / "images"), "--labels", str(tiny["root"] / "labels"),
               "--work", str(work), "--pseudo-labels", str(tiny["root"] / "pseudo"), "--max-rounds", "5",
               "--set", "nnunet.min_change=1.0", *sets])
    assert rc == 0
    state = json.loads((work / "state.json").read_text())
    assert state["converged"] and state["stop_reason"].startswith("converged")
    assert [r["round"] for r in state["rounds"]] == [1, 2] and not RunLayout(work).round(3).exists()
    assert "converged" in capsys.readouterr().out


def test_changed_training_settings_are_refused(pipeline):
    from ssl_medsam2.io import InputError

    tiny, work = pipeline["tiny"], pipeline["work"]
    for change, what in ((["nnunet.configuration=3d_fullres"], "configuration"),
                         (["nnunet.quality_gate=holdout"], "quality_gate")):  # the schedule may change
        cfg = load_config(overrides=TINY_SCHEDULE + change)
        with pytest.raises(InputError, match=what):
            run_ssl(tiny["root"] / "images", tiny["root"] / "labels", work, cfg,
                    pseudo_labels_dir=tiny["root"] / "pseudo", show_progress=False)


def test_predict_cli_writes_labels_with_the_source_affine(pipeline, tmp_path):
    """A volume stored LAS and the same volume stored RAS get the same segmentation, each on its own grid."""
    from ssl_medsam2.cli import main

    tiny = pipeline["tiny"]
    case = tiny["unlabelled"][0]
    src = nib.load(str(tiny["root"] / "images" / f"{case}_0000.nii.gz"))
    ras = nib.as_closest_canonical(src)
    assert nib.aff2axcodes(src.affine) != nib.aff2axcodes(ras.affine)
    (tmp_path / "in").mkdir()
    nib.save(src, str(tmp_path / "in" / "vol_las.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(ras.dataobj), ras.affine), str(tmp_path / "in" / "vol_ras.nii.gz"))
    rc = main(["predict", "--model", str(pipeline["work"]), "--images", str(tmp_path / "in"),
               "--out", str(tmp_path / "out"), "--device", "cpu", *[a for o in TINY_SCHEDULE for a in ("--set", o)]])
    assert rc == 0
    las = nib.load(str(tmp_path / "out" / "vol_las.nii.gz"))
    r = nib.load(str(tmp_path / "out" / "vol_ras.nii.gz"))
    assert np.allclose(las.affine, src.affine) and las.shape == src.shape
    assert np.allclose(r.affine, ras.affine) and r.shape == ras.shape
    a = np.asarray(nib.as_closest_canonical(las).dataobj)
    b = np.asarray(r.dataobj)
    assert np.array_equal(a, b)
    assert sorted(os.listdir(tmp_path / "out")) == ["vol_las.nii.gz", "vol_ras.nii.gz"]


def test_resumed_run_gates_the_next_round_against_the_round_really_deployed(chaos_dir, tmp_path, monkeypatch):
    """Stopped after round 1 wrote metrics.json but before state.json recorded its deployment: the resumed
    run's round 2 is compared with round 1, not with the stale round 0 (rounds faked: no nnU-Net)."""
    from ssl_medsam2.nnunet import rounds, runstate

    tiny = make_tiny_chaos(chaos_dir, tmp_path / "tiny")
    root, work = tiny["root"], tmp_path / "work"
    layout = RunLayout(work)
    cfg = load_config(overrides=TINY_SCHEDULE + ["nnunet.max_rounds=2", "nnunet.min_change=0.0"])
    replaced = []

    def fake_round(k, layout, cfg, images, labels, unlabelled, gate, classes, history, deployed, *a):
        replaced.append(int(deployed["round"]))
        metrics = {"round": k, "change": 0.5, "labelled_dice": None, "gate_dice": None, "deployed": True,
                   "gate_message": f"round {k} deployed (no quality gate)", "model_dir": str(layout.model(k))}
        layout.metrics(k).parent.mkdir(parents=True, exist_ok=True)
        layout.metrics(k).write_text(json.dumps(metrics))
        return metrics

    real_write_final = runstate.write_final

    def stopped(layout, state):
        if not state["rounds"]:  # round 0's deployment is written as before
            return real_write_final(layout, state)
        raise SimulatedCrash("stopped after round 1's metrics.json, before state.json")

    monkeypatch.setattr(one_round, "run_round", fake_round)
    with monkeypatch.context() as mp:
        mp.setattr(runstate, "write_final", stopped)
        with pytest.raises(SimulatedCrash):
            rounds.run_ssl(root / "images", root / "labels", work, cfg, pseudo_labels_dir=root / "pseudo",
                           show_progress=False)
    assert json.loads(layout.state_path.read_text())["deployed"]["round"] == 0 and layout.metrics(1).exists()
    state = rounds.run_ssl(root / "images", root / "labels", work, cfg, pseudo_labels_dir=root / "pseudo",
                           show_progress=False)
    assert replaced == [0, 1] and state["deployed"]["round"] == 2
