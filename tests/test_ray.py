"""Scale-out on Ray (issue 11), on real CHAOS MRI, CPU only, Ray bound to 127.0.0.1.

- ``--ray local`` gives the in-process result: labels byte for byte, probabilities within 1e-6
  (atlas engine and random-weight SAM2 engine); a bad query is reported once and not retried, the
  others are written; a re-run skips finished cases.
- Two Ray nodes on this machine (each ``ray start --block`` in its own process group): the worker
  node is killed mid-run; its case is retried on the other node and every case is written once,
  equal to the in-process result.
Each test starts and stops its own Ray; the atlas engine runs with ``atlas.threads=1`` so that
in-process and worker registrations use the same thread count (deterministic sums).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import downsample_case
from ray_helpers import ATLAS, ray_env  # noqa: F401 - ray_env: autouse, applies to this module
from ssl_medsam2 import cluster
from ssl_medsam2.cli import main
from ssl_medsam2.config import load_config
from ssl_medsam2.pseudo_label import pseudo_label_folder

if importlib.util.find_spec("ray") is None:
    pytest.skip("Ray is optional and not installed (pip install -r requirements.txt pins it)", allow_module_level=True)

SUPPORTS = ("chaos_01", "chaos_02")
QUERIES = ("chaos_03", "chaos_05", "chaos_08", "chaos_10")
SAM2 = ["protocol.engine=sam2", "sam2.checkpoint=none", "sam2.image_size=64", "sam2.n_inserts=1", "sam2.device=cpu"]
CROPS = {"chaos_01": (14, 22), "chaos_02": (10, 17), "chaos_03": (12, 19), "chaos_05": (10, 17)}
LOCAL = ["cluster.local_num_cpus=2", "cluster.object_store_mb=200", "cluster.stall_timeout_s=120"]


def _folder(chaos_dir, root: Path, queries, crops: dict | None = None) -> Path:
    for c in SUPPORTS + tuple(queries):
        zr = crops.get(c) if crops else None
        downsample_case(chaos_dir / "imagesTr" / f"{c}_0000.nii.gz", chaos_dir / "labelsTr" / f"{c}.nii.gz",
                        root / "images" / f"{c}_0000.nii.gz", root / "truth" / f"{c}.nii.gz", factor=4, z_range=zr)
    (root / "labels").mkdir()
    for c in SUPPORTS:
        shutil.copyfile(root / "truth" / f"{c}.nii.gz", root / "labels" / f"{c}.nii.gz")
    return root


@pytest.fixture(scope="module")
def atlas_data(chaos_dir, tmp_path_factory):
    root = _folder(chaos_dir, tmp_path_factory.mktemp("ray_atlas"), QUERIES)
    ref = root / "in_process"
    pseudo_label_folder(root / "images", root / "labels", ref, load_config(overrides=ATLAS), show_progress=False)
    return root, ref


def _assert_same(ref: Path, out: Path, cases) -> None:
    for c in cases:
        a, b = ref / "labels" / f"{c}.nii.gz", out / "labels" / f"{c}.nii.gz"
        assert a.read_bytes() == b.read_bytes(), f"{c}: label file differs from the in-process one"
        for kind in ("probabilities", "entropy"):
            pa = np.asarray(nib.load(str(ref / kind / f"{c}.nii.gz")).dataobj)
            pb = np.asarray(nib.load(str(out / kind / f"{c}.nii.gz")).dataobj)
            assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 1e-6, f"{c}: {kind} differ"
        sa = json.loads((ref / "summaries" / f"{c}.json").read_text())
        sb = json.loads((out / "summaries" / f"{c}.json").read_text())
        assert sa["per_class"] == sb["per_class"] and sa["supports"] == sb["supports"]
    assert not list(out.glob(".staging-*")), "staging folders left behind"
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temp files left behind"


def _bad_copy(src: Path, dst: Path) -> None:
    img = nib.load(str(src))
    a = np.asarray(img.dataobj).astype(np.float32)
    a[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(a, img.affine), str(dst))


def test_local_ray_equals_in_process_atlas_bad_input_once_and_resume(atlas_data, tmp_path, caplog):
    root, ref = atlas_data
    images = tmp_path / "images"
    shutil.copytree(root / "images", images)
    _bad_copy(images / "chaos_03_0000.nii.gz", images / "chaos_99_0000.nii.gz")  # one NaN voxel
    out = tmp_path / "ray_out"
    sets = [a for kv in ATLAS + LOCAL for a in ("--set", kv)]
    t0 = time.perf_counter()
    with caplog.at_level("INFO", logger="ssl_medsam2"):
        rc = main(["pseudo-label", "--images", str(images), "--labels", str(root / "labels"), "--out", str(out),
                   "--ray", "local", *sets])
    took = time.perf_counter() - t0
    assert rc == 2  # one case failed: reported, the others written
    _assert_same(ref, out, QUERIES)
    assert not (out / "labels" / "chaos_99.nii.gz").exists()
    errors = [r for r in caplog.records if "chaos_99" in r.getMessage() and r.levelname == "ERROR"]
    assert len(errors) == 1 and "NaN" in errors[0].getMessage() and "not retried" in errors[0].getMessage()
    run = json.loads((out / "run.json").read_text())
    assert set(run["failed"]) == {"chaos_99"} and run["ray_address"] == "local"
    assert sorted(s["case"] for s in run["summaries"]) == sorted(QUERIES)
    done = [r.getMessage().split()[0] for r in caplog.records if " done on " in r.getMessage()]
    assert sorted(done) == sorted(QUERIES), "every case written exactly once"
    assert len({r.getMessage().split(" done on ")[1].split()[0] for r in caplog.records
                if " done on " in r.getMessage()}) == 2, "both workers took cases"

    # resume: finished cases are skipped (Ray is not even started when nothing is left but the bad one)
    (images / "chaos_99_0000.nii.gz").unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "labels").iterdir()}
    caplog.clear()
    with caplog.at_level("INFO", logger="ssl_medsam2"):
        rc = main(["pseudo-label", "--images", str(images), "--labels", str(root / "labels"), "--out", str(out),
                   "--ray", "local", *sets])
    assert rc == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "labels").iterdir()} == mtimes
    assert any("already finished" in r.getMessage() for r in caplog.records)
    print(f"local Ray, atlas, {len(QUERIES)} queries + 1 bad on 2 workers: {took:.1f}s")


def test_local_ray_equals_in_process_random_weight_sam2(chaos_dir, tmp_path):
    root = _folder(chaos_dir, tmp_path, ("chaos_03", "chaos_05"), CROPS)
    cfg = load_config(overrides=SAM2)
    import torch

    # each worker runs torch on its cluster.cpus_per_worker (1) thread(s): the in-process reference does too.
    # (At another thread count float sums round differently: probabilities move by ~1e-7 and a voxel
    # sitting exactly at the threshold can flip, so labels would not be byte-identical.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pseudo_label_folder(root / "images", root / "labels", root / "in_process", cfg, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    out = root / "ray_out"
    ray_cfg = load_config(overrides=SAM2 + LOCAL + ["cluster.ray_address=local"])
    summaries = pseudo_label_folder(root / "images", root / "labels", out, ray_cfg, show_progress=False,
                                    executor=cluster.executor_for(ray_cfg))
    assert sorted(s["case"] for s in summaries) == ["chaos_03", "chaos_05"]
    assert all(s["random_weights"] for s in summaries)
    _assert_same(root / "in_process", out, ("chaos_03", "chaos_05"))


def test_local_ray_campaign_groups_queries_equal_and_resume(chaos_dir, tmp_path, caplog):
    """sam2.campaign_queries=2 on one Ray worker: its first query alone (the worker loads), then the two
    left in one engine call; each written as by one query per call in-process; a re-run redoes only
    the case whose outputs are incomplete."""
    queries = ("chaos_03", "chaos_05", "chaos_08")
    root = _folder(chaos_dir, tmp_path, queries, {**CROPS, "chaos_08": (12, 18)})
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the worker (cluster.cpus_per_worker = 1)
    try:
        pseudo_label_folder(root / "images", root / "labels", root / "in_process", load_config(overrides=SAM2),
                            show_progress=False)
    finally:
        torch.set_num_threads(threads)
    out = root / "ray_out"
    ray_cfg = load_config(overrides=SAM2 + LOCAL + ["cluster.ray_address=local", "cluster.num_workers=1",
                                                    "sam2.campaign_queries=2"])

    def run():
        caplog.clear()
        with caplog.at_level("INFO", logger="ssl_medsam2"):
            pseudo_label_folder(root / "images", root / "labels", out, ray_cfg, show_progress=False,
                                executor=cluster.executor_for(ray_cfg))
        return [r.getMessage() for r in caplog.records if " done on " in r.getMessage()]

    done = run()
    assert sorted(m.split()[0] for m in done) == sorted(queries)
    assert sum("(a group of 2)" in m for m in done) == 2, done
    for c in queries:
        a = np.asarray(nib.load(str(root / "in_process" / "labels" / f"{c}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(out / "labels" / f"{c}.nii.gz")).dataobj)
        np.testing.assert_array_equal(a, b, err_msg=c)
        pa = np.asarray(nib.load(str(root / "in_process" / "probabilities" / f"{c}.nii.gz")).dataobj)
        pb = np.asarray(nib.load(str(out / "probabilities" / f"{c}.nii.gz")).dataobj)
        assert np.abs(pa - pb).max() <= 1e-4, c

    (out / "summaries" / "chaos_05.json").unlink()  # incomplete: redone; the others are skipped
    mtimes = {c: (out / "labels" / f"{c}.nii.gz").stat().st_mtime_ns for c in queries}
    assert [m.split()[0] for m in run()] == ["chaos_05"]
    assert [c for c in queries if (out / "labels" / f"{c}.nii.gz").stat().st_mtime_ns != mtimes[c]] == ["chaos_05"]
    assert sorted(s["case"] for s in json.loads((out / "run.json").read_text())["summaries"]) == sorted(queries)


def test_no_address_means_in_process_without_ray(atlas_data, monkeypatch):
    """No cluster.ray_address: Ray is never imported or started."""
    from ssl_medsam2 import cluster

    assert cluster.cluster_address(load_config()) is None
    monkeypatch.setattr(cluster, "_import_ray", lambda: (_ for _ in ()).throw(AssertionError("Ray used")))
    root, _ = atlas_data
    cfg = load_config(overrides=ATLAS + ["input.classes=[1]"])
    out = pseudo_label_folder(root / "images", root / "labels", root / "no_ray", cfg, show_progress=False,
                              names=["chaos_03"])
    assert [s["case"] for s in out] == ["chaos_03"]


def test_worker_that_never_starts_is_replaced_a_bounded_number_of_times():
    """A worker whose constructor always fails (as when ssl_medsam2 is not importable on the nodes) is
    replaced at most 4 * n_workers times, then run_cases stops with that error instead of looping."""
    from ssl_medsam2 import cluster

    class Broken:
        def __init__(self):
            raise ImportError("No module named 'ssl_medsam2' (simulated)")

        def ready(self):
            return "never"

    ccfg = cluster.cluster_cfg(load_config(overrides=LOCAL + ["cluster.max_restarts=0"]))
    made = []
    with cluster.ray_session("local", ccfg) as ray:
        Worker = ray.remote(Broken).options(**cluster._actor_options(ccfg))

        def make():
            made.append(Worker.remote())
            return made[-1]

        with pytest.raises(RuntimeError, match="(?s)no Ray worker left: 10 worker start.*3 case.*simulated"):
            cluster.run_cases(ray, make, 2, ["a", "b", "c"], lambda actor, group: (actor.run_group.remote(group), {}),
                              lambda res: None, ccfg, "never starts", show_progress=False)
    assert len(made) == 2 + 2 * 4


def test_groups_grow_to_the_workers_size_and_a_dead_workers_group_goes_back_whole(tmp_path):
    """run_cases hands a worker one case, then groups of the size it answers with; a worker that dies on
    a group puts every case of it back (none dropped), and a case that fails in a group fails alone."""
    marker = tmp_path / "died"

    class Grouping:
        def ready(self):
            return "w"

        def run_group(self, cases):
            if len(cases) > 1 and not marker.exists():  # dies once, on its first group of several
                marker.write_text("x")
                os._exit(1)
            return {"results": [{"ok": c != "bad", "case": c, "worker": "w", "result": c, "error": "boom"}
                                for c in cases], "group_size": 3, "worker": "w"}

    ccfg = cluster.cluster_cfg(load_config(overrides=LOCAL + ["cluster.max_restarts=1", "cluster.max_case_attempts=2"]))
    groups, written = [], []

    def submit(actor, group):
        groups.append(list(group))
        return actor.run_group.remote(group), {}

    with cluster.ray_session("local", ccfg) as ray:
        Worker = ray.remote(Grouping).options(**cluster._actor_options(ccfg))
        failed = cluster.run_cases(ray, Worker.remote, 1, ["a", "b", "bad", "c", "d"], submit,
                                   lambda res: written.append(res["case"]), ccfg, "groups", show_progress=False)
    assert groups == [["a"], ["b", "bad", "c"], ["b"], ["bad", "c", "d"]]
    assert set(failed) == {"bad"} and sorted(written) == ["a", "b", "c", "d"]


# --- two nodes on one machine ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own process group (stopped by killing that group)."""
    exe = Path(sys.executable).with_name("ray")
    cmd = [str(exe) if exe.exists() else "ray", "start", "--block", "--node-ip-address", "127.0.0.1",
           "--num-cpus", "1", "--object-store-memory", str(150 * 2**20), "--disable-usage-stats", *args]
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, wait: float = 20) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _wait_nodes(address: str, n: int, timeout: float = 60) -> None:
    code = ("import ray,sys,time; ray.init(address=sys.argv[1], configure_logging=False, log_to_driver=False); "
            "t=time.time()\nwhile len([x for x in ray.nodes() if x['Alive']])<int(sys.argv[2]):\n"
            " assert time.time()-t<float(sys.argv[3]); time.sleep(0.5)\nray.shutdown()")
    subprocess.run([sys.executable, "-c", code, address, str(n), str(timeout)], check=True, timeout=timeout + 30,
                   capture_output=True)


def test_two_nodes_worker_node_killed_mid_run(atlas_data, tmp_path):
    root, ref = atlas_data
    port = _free_port()
    address = f"127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay short
    head = _ray_start(["--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", str(tmp / "h")],
                      tmp_path / "head.log")
    worker = None
    driver = None
    try:
        _wait_nodes(address, 1)
        worker = _ray_start(["--address", address], tmp_path / "worker.log")
        _wait_nodes(address, 2)
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "ssl_medsam2.cli", "pseudo-label", "--images", str(root / "images"),
               "--labels", str(root / "labels"), "--out", str(out), "--ray", address,
               *[a for kv in ATLAS + ["cluster.num_workers=2", "cluster.stall_timeout_s=120"]
                 for a in ("--set", kv)]]
        driver_log = tmp_path / "driver.log"
        with open(driver_log, "w") as fh:
            driver = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while not (out / "summaries").is_dir() or not any((out / "summaries").iterdir()):
            assert driver.poll() is None, driver_log.read_text()[-3000:]
            assert time.time() - t0 < 300, "no case finished in 300 s"
            time.sleep(0.2)
        _stop(worker, signal.SIGKILL)  # the worker node dies mid-run (both workers are busy now)
        rc = driver.wait(600)
        text = driver_log.read_text()
        assert rc == 0, text[-3000:]
        assert "worker died while on" in text, "the killed node was not mid-case: " + text[-3000:]
        _assert_same(ref, out, QUERIES)
        done = [ln.split(" done on ")[0].split()[-1] for ln in text.splitlines() if " done on " in ln]
        assert sorted(done) == sorted(QUERIES), f"each case written exactly once: {done}"
        print("\n".join(ln for ln in text.splitlines() if " done on " in ln or "died" in ln or "cases/min" in ln))
    finally:
        if driver is not None and driver.poll() is None:
            _stop(driver, signal.SIGKILL)
        if worker is not None:
            _stop(worker, signal.SIGKILL)
        _stop(head)
        shutil.rmtree(tmp, ignore_errors=True)


def test_multi_gpu_training_command(monkeypatch, tmp_path):
    """nnunet.num_gpus > 1 runs nnUNetv2_train -num_gpus N (DDP) in a subprocess: the command it builds.

    Never run on several GPUs here (none were lent); this checks the command only.
    """
    from ssl_medsam2.nnunet import train
    from ssl_medsam2.nnunet.settings import NnUNetSettings

    seen = {}

    def fake_run(cmd, check, stdout, stderr, env):
        seen["cmd"], seen["env"] = cmd, env
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(train.subprocess, "run", fake_run)
    ckpt = tmp_path / "prev.pth"
    settings = NnUNetSettings.from_config(load_config(overrides=[
        "nnunet.num_gpus=4", "nnunet.configuration=3d_fullres", "nnunet.fold=all", "nnunet.epochs=2",
        "nnunet.iterations_per_epoch=3", "nnunet.val_iterations=1"]))
    train._train_ddp(settings, ckpt, tmp_path / "nnunet.log")
    cmd = seen["cmd"]
    assert cmd[0] == sys.executable and "run_training_entry" in cmd[2]
    args = cmd[3:]
    from ssl_medsam2.nnunet.export import DATASET_ID

    assert args[:3] == [str(DATASET_ID), "3d_fullres", "all"]
    assert args[args.index("-tr") + 1] == "nnUNetTrainerSSL_2ep_3it_1val"
    assert args[args.index("-num_gpus") + 1] == "4"
    assert args[args.index("-pretrained_weights") + 1] == str(ckpt)

    # train_model takes that path (and only that one) when num_gpus > 1
    called = []

    class Stop(Exception):
        pass

    def fake_ddp(*a):
        called.append("ddp")
        raise Stop

    monkeypatch.setattr(train, "_train_ddp", fake_ddp)
    monkeypatch.setattr(train, "_train_in_process", lambda *a: called.append("in_process"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    with pytest.raises(Stop):
        train.train_model(dataclasses.replace(settings, num_gpus=2, device="cpu"), tmp_path / "model")
    assert called == ["ddp"]


def test_round_predictions_on_ray_equal_in_process(chaos_dir, tmp_path, caplog):
    """`run --ray local`: a round's nnU-Net predictions spread over workers holding the predictor give the
    in-process files byte for byte (the model trained once in-process; the Ray run resumes after training)."""
    from nnunet_helpers import TINY_SCHEDULE, make_tiny_chaos
    from ssl_medsam2.nnunet.rounds import run_ssl

    tiny = make_tiny_chaos(chaos_dir, tmp_path / "tiny")
    root = tiny["root"]
    cfg = load_config(overrides=TINY_SCHEDULE + ["nnunet.max_rounds=1"])
    work_a = tmp_path / "work_a"
    run_ssl(root / "images", root / "labels", work_a, cfg, pseudo_labels_dir=root / "pseudo", show_progress=False)
    r1 = work_a / "round_001"
    work_b = tmp_path / "work_b"
    shutil.copytree(work_a, work_b, symlinks=True)
    for p in ("labels", "entropy", "labelled_predictions"):
        shutil.rmtree(work_b / "round_001" / p)
    for p in [work_b / "round_001" / "metrics.json", work_b / "final.json"]:
        p.unlink(missing_ok=True)
    with caplog.at_level("INFO", logger="ssl_medsam2"):
        rc = main(["run", "--images", str(root / "images"), "--labels", str(root / "labels"), "--work", str(work_b),
                   "--pseudo-labels", str(root / "pseudo"), "--ray", "local",
                   *[a for kv in TINY_SCHEDULE + ["nnunet.max_rounds=1"] + LOCAL for a in ("--set", kv)]])
    assert rc == 0
    assert any("on 2 Ray worker(s)" in r.getMessage() and "round 1: predicting" in r.getMessage()
               for r in caplog.records), "round 1 was not predicted on Ray"
    compared = 0
    for sub in ("labels", "entropy", "labelled_predictions/labels", "labelled_predictions/entropy"):
        for a in sorted((r1 / sub).glob("*.nii.gz")):
            assert a.read_bytes() == (work_b / "round_001" / sub / a.name).read_bytes(), f"{sub}/{a.name}"
            compared += 1
    assert compared == 2 * len(tiny["cases"]), compared
