"""Schedules that fit the machine, progress fields, mid-round resume and the quality gate.

Schedule and progress arithmetic is tested with given speeds (no stopwatch). The two integration
tests run nnU-Net on tiny real CHAOS (4 cases at 32x32 in-plane, tests/nnunet_helpers.py): they prove
the mechanics (resume from checkpoint_latest.pth, a worse round kept out), not segmentation quality.
"""

from __future__ import annotations

import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest

from nnunet_helpers import TINY_SCHEDULE, make_tiny_chaos
from ssl_medsam2.config import load_config
from ssl_medsam2.nnunet import gate, schedule
from ssl_medsam2.nnunet.layout import RunLayout
from ssl_medsam2.nnunet.reporting import RunProgress
from ssl_medsam2.nnunet.rounds import run_ssl
from ssl_medsam2.nnunet.settings import NnUNetSettings


def _ncfg(*overrides):
    return NnUNetSettings.from_config(load_config(overrides=list(overrides)))


# --- schedules (pure) -------------------------------------------------------------------------------

def test_auto_picks_short_on_cpu_and_full_on_cuda_and_says_so():
    cpu = schedule.resolve(_ncfg(), "cpu", it_per_s=0.4)
    assert (cpu.name, cpu.epochs, cpu.iterations_per_epoch, cpu.val_iterations) == ("short", 20, 25, 5)
    line = cpu.describe(max_rounds=3)
    assert "nnU-Net schedule short (schedule auto on CPU" in line and "500 training iterations per round" in line
    # 20 x (25 + 0.5 x 5) = 550 iteration-equivalents at 0.4 it/s = 1375 s = ~23 min per round
    assert cpu.seconds() == pytest.approx(1375.0) and "~23 min of training per round" in line
    assert "~69 min for 3 rounds" in line
    gpu = schedule.resolve(_ncfg(), "cuda", it_per_s=12.0)
    assert (gpu.name, gpu.epochs, gpu.iterations_per_epoch, gpu.val_iterations) == ("full", 100, 250, 50)
    assert "schedule auto on CUDA" in gpu.reason
    assert schedule.resolve(_ncfg("nnunet.schedule=full"), "cpu").name == "full"
    assert schedule.resolve(_ncfg("nnunet.schedule=short"), "cuda").epochs == 20


def test_minutes_turns_a_measured_speed_into_epochs():
    # CPU: 25 iterations + 5 validation (x0.5) per epoch = 27.5 iteration-equivalents; at 0.5 it/s = 55 s/epoch
    s = schedule.resolve(_ncfg("nnunet.schedule=minutes:30"), "cpu", it_per_s=0.5)
    assert s.name == "minutes:30" and s.iterations_per_epoch == 25 and s.epochs == 32  # floor(1800 / 55)
    assert s.seconds() <= 30 * 60 < s.seconds() + 55
    # CUDA: 250 + 25 = 275 per epoch; at 10 it/s = 27.5 s/epoch -> 60 min = 130 epochs
    g = schedule.resolve(_ncfg("nnunet.schedule=minutes:60"), "cuda", it_per_s=10.0)
    assert g.iterations_per_epoch == 250 and g.epochs == 130
    assert schedule.resolve(_ncfg("nnunet.schedule=minutes:1"), "cpu", it_per_s=0.01).epochs == 1  # at least one
    assert schedule.resolve(_ncfg("nnunet.schedule=minutes:30", "nnunet.epochs=3"), "cpu", it_per_s=0.5).epochs == 3
    with pytest.raises(ValueError, match="measured training speed"):
        schedule.resolve(_ncfg("nnunet.schedule=minutes:30"), "cpu", it_per_s=None)
    for bad in ("fast", "minutes:0", "minutes:x", "minutes"):
        with pytest.raises(ValueError, match="auto, short, full or minutes:N"):
            schedule.parse(bad)
    d = s.as_dict()
    assert schedule.Schedule.from_dict(d) == s and d["estimated_minutes_per_round"] == pytest.approx(29.3, abs=0.1)


def test_progress_fields_from_given_epoch_times():
    p = RunProgress()
    p.update({"stage": "train", "round": 1, "max_rounds": 3, "epoch": 1, "total_epochs": 20, "train_loss": -0.2,
              "pseudo_dice": 0.31, "epoch_s": 50.0, "iterations_per_epoch": 25})
    f = p.update({"stage": "train", "round": 1, "max_rounds": 3, "epoch": 5, "total_epochs": 20, "train_loss": -0.4,
                  "pseudo_dice": 0.52, "epoch_s": 50.0, "iterations_per_epoch": 25})
    assert f["it_per_s"] == 0.5 and f["eta_s"] == 15 * 50.0 and f["eta_run_s"] == 15 * 50.0 + 2 * 20 * 50.0
    assert (f["round"], f["max_rounds"], f["epoch"], f["total_epochs"]) == (1, 3, 5, 20)
    assert f["train_loss"] == -0.4 and f["pseudo_dice"] == 0.52
    # between events the clock ticks: the ETAs count down (never frozen, never null once known)
    p._eta_at = (p._eta_at[0] - 100.0,) + p._eta_at[1:]  # 100 s since the last epoch, without waiting them
    t = p.update({"tick": True})
    assert t["eta_s"] == 15 * 50.0 - 100 and t["eta_run_s"] == 15 * 50.0 + 2 * 20 * 50.0 - 100
    # a stage's counts are its own: predict starts at 0 of its total, not at a previous stage's numbers
    q = p.update({"stage": "predict", "round": 1, "done": 0, "total": 6})
    assert (q["done"], q["total"]) == (0, 6)


# --- quality gate (pure) ----------------------------------------------------------------------------

def test_gate_case_choice_and_decision():
    assert gate.pick_gate_cases(["a", "b"], _ncfg())[0] == ["b"]
    cases, why = gate.pick_gate_cases(["a"], _ncfg())
    assert cases == [] and "quality gate off" in why and "no ground truth" in why
    assert gate.pick_gate_cases(["a", "b", "c"], _ncfg("nnunet.gate_cases=2"))[0] == ["b", "c"]
    assert gate.pick_gate_cases(["a", "b"], _ncfg("nnunet.quality_gate=off"))[0] == []
    ok = gate.decide(2, 0.70, 1, 0.70)
    assert ok.deploy and "round 2 deployed" in ok.message
    bad = gate.decide(2, 0.40, 1, 0.70)
    assert not bad.deploy and "round 2 NOT deployed" in bad.message and "keeping round 1" in bad.message
    assert gate.decide(2, 0.68, 1, 0.70, tolerance=0.05).deploy
    assert gate.decide(1, 0.1, 0, None).deploy  # no gate score: deployed, as without a gate
    # rotation over the person-made cases; an unchanged pseudo label (0 voxels edited) never gates
    assert gate.pick_gate_cases(["a", "b", "c"], _ncfg(), turn=1)[0] == ["b"]
    assert gate.pick_gate_cases(["a", "b", "c"], _ncfg(), turn=3)[0] == ["c"]
    cases, why = gate.pick_gate_cases(["a", "b", "c"], _ncfg(), {"c": 0, "a": 12}, turn=0)
    assert cases == ["b"] and "not c: saved unchanged" in why and "turn 0 of the 2 person-made" in why
    assert gate.pick_gate_cases(["a", "b", "c"], _ncfg(), {"c": 0, "a": 12}, turn=1)[0] == ["a"]
    cases, why = gate.pick_gate_cases(["a", "b"], _ncfg(), {"a": 0, "b": 0})
    assert cases == [] and "quality gate off: 0 of 2 labelled case(s) were made or edited by a person" in why


def test_gate_never_scores_a_label_saved_unchanged_from_its_pseudo_label(chaos_dir, tmp_path, caplog):
    """The last labelled case by name (chaos_02) was saved unchanged from its stored pseudo label: the gate
    takes the person-made chaos_01 instead, says why in the log, and round 0 is scored on chaos_01 (the
    atlas from chaos_02 alone), not the ~1.0 an engine scores against its own output."""
    tiny = make_tiny_chaos(chaos_dir, tmp_path / "tiny", n_cases=3, n_labelled=2)
    root, work = tiny["root"], tmp_path / "work"
    made, saved_unchanged = tiny["labelled"]
    stored = tmp_path / "stored_pseudo"
    stored.mkdir()
    shutil.copyfile(root / "labels" / f"{saved_unchanged}.nii.gz", stored / f"{saved_unchanged}.nii.gz")
    cfg = load_config(overrides=TINY_SCHEDULE + ["nnunet.quality_gate=holdout", "nnunet.max_rounds=0",
                                                 "protocol.engine=atlas", "atlas.demons_iterations=[20,10]",
                                                 "atlas.demons_shrink=[2,1]", "atlas.organ_matched_pass=false"])
    with caplog.at_level(logging.INFO, logger="ssl_medsam2"):
        state = run_ssl(root / "images", root / "labels", work, cfg, show_progress=False,
                        pseudo_labels_dir=root / "pseudo",
                        label_origins={saved_unchanged: [stored / f"{saved_unchanged}.nii.gz"]})
    assert state["gate"]["cases"] == [made]
    why = state["gate"]["why"]
    assert f"not {saved_unchanged}: saved unchanged" in why and f"{made}: no stored pseudo label" in why
    assert any(why in r.getMessage() for r in caplog.records)
    r0 = json.loads((RunLayout(work).round(0) / "summaries" / f"{made}.json").read_text())
    assert r0["supports"] == [saved_unchanged]
    assert 0 < state["deployed"]["gate_dice"] < 0.99
    # round 0 is deployed from the start: final.json says so (predict serves it)
    assert RunLayout(work).read_final()["round"] == 0 and "no nnU-Net round has finished" in state["final"]["note"]


# --- integration on tiny real CHAOS ------------------------------------------------------------------

class Stop(RuntimeError):
    pass


def test_run_stopped_mid_round_resumes_from_its_checkpoint(chaos_dir, tmp_path, caplog):
    """Stopped after epoch 1 of 3: the re-run continues at epoch 2 (nnU-Net's checkpoint_latest.pth), not 0."""
    tiny = make_tiny_chaos(chaos_dir, tmp_path / "tiny")
    root, work = tiny["root"], tiny["root"] / "work"
    cfg = load_config(overrides=TINY_SCHEDULE + ["nnunet.epochs=3", "nnunet.max_rounds=1"])
    seen = []

    def stop_after_first_epoch(ev):
        if ev["stage"] == "train" and "epoch_s" in ev:  # an epoch ended
            seen.append(("a", ev["epoch"]))
            if ev["epoch"] == 1:
                raise Stop("stopped during round 1, epoch 1 of 3")

    with pytest.raises(Stop):
        run_ssl(root / "images", root / "labels", work, cfg, pseudo_labels_dir=root / "pseudo",
                progress=stop_after_first_epoch, show_progress=False)
    layout = RunLayout(work)
    latest = list(layout.nnunet_root(1).rglob("checkpoint_latest.pth"))
    assert len(latest) == 1 and not layout.metrics(1).exists() and not layout.model(1).exists()
    with caplog.at_level(logging.INFO, logger="ssl_medsam2"):
        state = run_ssl(root / "images", root / "labels", work, cfg, pseudo_labels_dir=root / "pseudo",
                        progress=lambda ev: "epoch_s" in ev and seen.append(("b", ev["epoch"])),
                        show_progress=False)
    assert seen == [("a", 1), ("b", 2), ("b", 3)]  # the epoch count goes on
    assert any("resuming training from" in r.getMessage() and "at epoch 1/3" in r.getMessage()
               for r in caplog.records)
    assert [r["round"] for r in state["rounds"]] == [1] and state["final"]["round"] == 1
    assert (layout.model(1) / "fold_all" / "checkpoint_final.pth").exists()
    log_text = layout.nnunet_log(1).read_text()
    assert "Epoch 2" in log_text  # nnU-Net's own chatter went to its log


def test_schedule_changed_on_a_resumed_run_applies_from_the_round_in_progress(chaos_dir, tmp_path, caplog):
    """Stopped in round 1 (epoch 1 of 3), resumed with 2 epochs: accepted, the log says round 1's training
    starts over with the new schedule, and the round trains 2 epochs from epoch 0."""
    tiny = make_tiny_chaos(chaos_dir, tmp_path / "tiny")
    root, work = tiny["root"], tiny["root"] / "work"
    seen = []

    def stop_after_first_epoch(ev):
        if ev["stage"] == "train" and "epoch_s" in ev:  # an epoch ended
            seen.append(("a", ev["epoch"], ev["total_epochs"]))
            raise Stop("stopped during round 1, epoch 1 of 3")

    cfg = load_config(overrides=TINY_SCHEDULE + ["nnunet.epochs=3", "nnunet.max_rounds=1"])
    with pytest.raises(Stop):
        run_ssl(root / "images", root / "labels", work, cfg, pseudo_labels_dir=root / "pseudo",
                progress=stop_after_first_epoch, show_progress=False)
    cfg = load_config(overrides=TINY_SCHEDULE + ["nnunet.epochs=2", "nnunet.max_rounds=1"])
    with caplog.at_level(logging.INFO, logger="ssl_medsam2"):
        state = run_ssl(root / "images", root / "labels", work, cfg, pseudo_labels_dir=root / "pseudo",
                        progress=lambda ev: "epoch_s" in ev and seen.append(("b", ev["epoch"],
                                                                                     ev["total_epochs"])),
                        show_progress=False)
    assert seen == [("a", 1, 3), ("b", 1, 2), ("b", 2, 2)]
    said = [r.getMessage() for r in caplog.records if "schedule changed on resume" in r.getMessage()]
    assert len(said) == 1 and "epochs: 3 -> 2" in said[0] and "round 1's training starts over from epoch 0" in said[0]
    assert state["schedule"]["epochs"] == 2 and state["settings"]["epochs"] == 2
    assert state["schedule_changes"][0]["from_round"] == 1 and state["final"]["round"] == 1
    assert json.loads(RunLayout(work).metrics(1).read_text())["trainer"] == "nnUNetTrainerSSL_2ep_2it_1val"


def test_round_trained_on_corrupted_pseudo_labels_is_not_deployed(chaos_dir, tmp_path, capsys):
    """Pseudo labels corrupted on purpose (organs swapped and moved): round 1 must not replace round 0.

    The gate case (chaos_02, the last labelled case) is scored against its ground truth, which never
    trains nnU-Net; round 0's score is its leave-one-out atlas pseudo label. The CLI, final.json and
    state.json say why; `predict` on the run refuses with the reason (round 0 was given pseudo labels,
    so there is no model to label new images with; a round 0 made by an engine would use that engine).
    """
    from ssl_medsam2.cli import main

    tiny = make_tiny_chaos(chaos_dir, tmp_path / "tiny")
    root = tiny["root"]
    bad = root / "corrupted"
    bad.mkdir()
    for case in tiny["unlabelled"]:
        img = nib.load(str(root / "truth" / f"{case}.nii.gz"))
        lab = np.asarray(img.dataobj)
        swapped = np.roll(np.array([0, 4, 3, 2, 1], dtype=np.uint8)[lab], 8, axis=0)  # wrong organ, wrong place
        nib.save(nib.Nifti1Image(swapped, img.affine), str(bad / f"{case}.nii.gz"))
    sets = [a for o in TINY_SCHEDULE + ["nnunet.quality_gate=holdout", "nnunet.max_rounds=2",
                                        "nnunet.min_change=0", "atlas.demons_iterations=[20,10]",
                                        "atlas.demons_shrink=[2,1]", "atlas.organ_matched_pass=false"]
            for a in ("--set", o)]
    work = tmp_path / "work"
    rc = main(["run", "--images", str(root / "images"), "--labels", str(root / "labels"), "--work", str(work),
               "--pseudo-labels", str(bad), *sets])
    out = capsys.readouterr().out
    assert rc == 0
    layout = RunLayout(work)
    final = layout.read_final()
    state = json.loads(layout.state_path.read_text())
    m1 = json.loads(layout.metrics(1).read_text())
    assert state["gate"]["cases"] == ["chaos_02"] and m1["gate_cases"] == ["chaos_02"]
    assert m1["deployed"] is False and m1["gate_dice"] < m1["replaces"]["gate_dice"]
    assert final["round"] == 0 and final["model_dir"] is None and final["not_deployed"][0]["round"] == 1
    assert "QUALITY GATE: round 1 NOT deployed" in final["warning"] and "stopping refinement" in final["warning"]
    assert state["gate_refused"] == [1] and not layout.round(2).exists()  # refinement stopped
    # a refused round keeps no checkpoint (never deployed, nothing to roll back to); the rest stays readable
    assert not list(layout.model(1).rglob("*.pth")) and (layout.model(1) / "plans.json").exists()
    assert m1["disk"].startswith("refused by the quality gate: no checkpoint kept; removed 2 checkpoint(s)")
    assert "QUALITY GATE: round 1 NOT deployed" in out and "deployed: round 0" in out
    # the gate case's ground truth never reached nnU-Net; its round-0 label came from the other labelled case
    r0 = json.loads((layout.round(0) / "summaries" / "chaos_02.json").read_text())
    assert r0["supports"] == ["chaos_01"]
    # predict with the run: nothing better than the given round 0 exists, and it says so
    new = tmp_path / "new"
    new.mkdir()
    shutil.copyfile(root / "images" / "chaos_03_0000.nii.gz", new / "chaos_03_0000.nii.gz")
    rc = main(["predict", "--model", str(work), "--images", str(new), "--out", str(tmp_path / "pred"), *sets])
    err = capsys.readouterr().err
    assert rc == 2 and "round 0 is deployed" in err and "QUALITY GATE: round 1 NOT deployed" in err
    assert not (tmp_path / "pred").exists()


def test_predict_with_a_run_that_kept_round0_needs_no_cfg(chaos_dir, tmp_path):
    """A work dir whose deployed round is 0 (engine: atlas) labels new images with that engine and the run's
    labelled cases; without ``cfg`` the engine reads the project config (it was given an empty dict)."""
    from ssl_medsam2.nnunet.predict import predict_folder

    tiny = make_tiny_chaos(chaos_dir, tmp_path / "tiny")
    root, work = tiny["root"], tmp_path / "work"
    work.mkdir()
    layout = RunLayout(work)
    layout.state_path.write_text(json.dumps({
        "settings": {"round0": "atlas"}, "labelled": tiny["labelled"],
        "inputs": {"images": str(root / "images"), "labels": str(root / "labels")}}))
    layout.final_path.write_text(json.dumps({"round": 0, "model_dir": None, "warning": "QUALITY GATE: kept round 0"}))
    new = tmp_path / "new"
    new.mkdir()
    case = tiny["unlabelled"][0]
    shutil.copyfile(root / "images" / f"{case}_0000.nii.gz", new / f"{case}_0000.nii.gz")
    out = predict_folder(work, new, tmp_path / "pred", show_progress=False)
    assert [p.name for p in out] == [f"{case}.nii.gz"]
    lab = np.asarray(nib.load(str(out[0])).dataobj)
    assert lab.shape == nib.load(str(new / f"{case}_0000.nii.gz")).shape and lab.any()


def test_every_image_labelled_round0_still_names_the_gate_cases_engine(chaos_dir, tmp_path):
    """No unlabelled image but a gate case: round 0 runs the engine for the gate case, so state.json names
    that engine (not "none") and ``predict`` on a run that kept round 0 labels with it instead of refusing."""
    from ssl_medsam2.nnunet.predict import predict_folder

    tiny = make_tiny_chaos(chaos_dir, tmp_path / "tiny", n_cases=2, n_labelled=2)
    root, work = tiny["root"], tmp_path / "work"
    cfg = load_config(overrides=TINY_SCHEDULE + ["nnunet.quality_gate=holdout", "nnunet.max_rounds=0",
                                                 "protocol.engine=atlas", "atlas.demons_iterations=[20,10]",
                                                 "atlas.demons_shrink=[2,1]", "atlas.organ_matched_pass=false"])
    state = run_ssl(root / "images", root / "labels", work, cfg, show_progress=False)
    assert state["gate"]["cases"] == [tiny["labelled"][-1]] and state["settings"]["round0"] == "atlas"
    assert state["final"]["round"] == 0
    new = tmp_path / "new"
    new.mkdir()
    shutil.copyfile(root / "images" / f"{tiny['cases'][0]}_0000.nii.gz", new / "query_0000.nii.gz")
    out = predict_folder(work, new, tmp_path / "pred", cfg=cfg, show_progress=False)
    assert [p.name for p in out] == ["query.nii.gz"]


def test_checkpoint_every_reaches_the_trainer_through_the_environment(tmp_path, monkeypatch):
    """nnunet.checkpoint_every is read by our trainer class from the environment nnunet_env sets, so the
    in-process training and nnUNetv2_train's DDP processes use the same interval; 0 is refused."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from ssl_medsam2.nnunet import train, trainers

    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        _ncfg("nnunet.checkpoint_every=0")
    monkeypatch.setattr(nnUNetTrainer, "__init__", lambda self, *a, **kw: None)  # no plans needed here
    for every in (1, 3):
        with train.nnunet_env(tmp_path, _ncfg(f"nnunet.checkpoint_every={every}", "nnunet.device=cpu")):
            cls = trainers.find_trainer("nnUNetTrainerSSL_1ep_2it_1val")
            assert cls({}, "2d", 0, {}).save_every == every
