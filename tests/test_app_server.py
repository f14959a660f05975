"""The MONAI Label app over HTTP: a real `monailabel start_server` on 127.0.0.1 and a free port, on a copy of
real CHAOS MRI (5 cases, 2 with final labels; 64x64 in-plane and 10 slices around the organs to keep CPU
time low), SAM2 with random weights at 64 px, nnU-Net on a tiny 2d schedule (1 epoch x 2 iterations).
The tests run in order and share the server: few-shot infer, leases, scoring, batch pseudo labels,
training v001, continuous retraining (final labels saved -> debounce -> v002 served) and rollback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import NO_QUEUE, REPO, chaos_cases, downsample_case

APP = REPO / "apps" / "ssl_medsam2"
CASES = 5  # first 2 get final labels, the other 3 are unlabelled
LABELLED = 2
CONF = {
    "sam2.checkpoint": "none", "sam2.image_size": "64", "sam2.n_inserts": "1", "sam2.n_supports": "1",
    "sam2.device": "cpu", "sam2.max_cond_frames_in_attn": "2", "app.fewshot_top_k": "1",
    # continuous retraining: the 2nd new final label (the lease test saves the 1st) starts a run 3 s later;
    # every new version is deployed (tiny schedules make Dice noise), so "new version served" is testable
    "app.retrain_after_labels": "2", "app.retrain_debounce_s": "3", "app.promote_tolerance": "1.0",
    "nnunet.epochs": "1", "nnunet.iterations_per_epoch": "2", "nnunet.val_iterations": "1", "nnunet.max_rounds": "1",
    "nnunet.configuration": "2d", "nnunet.device": "cpu", "nnunet.num_workers": "0", "nnunet.num_processes": "1",
    "nnunet.quality_gate": "off",  # plumbing: a 2-iteration model would (rightly) fail the run's quality gate
    **NO_QUEUE,
}
NNUNET_TINY = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1, "max_rounds": 1,
               "configuration": "2d", "device": "cpu", "num_workers": 0, "num_processes": 1,
               "quality_gate": "off"}  # plumbing: a 2-iteration model would (rightly) fail the gate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_studies(chaos_dir: Path, root: Path) -> tuple[Path, Path]:
    studies, gt = root / "studies", root / "gt"
    for i, case in enumerate(chaos_cases()[:CASES]):
        lab = np.asarray(nib.load(str(chaos_dir / "labelsTr" / f"{case}.nii.gz")).dataobj)
        z = int(np.nonzero((lab > 0).sum((0, 1)))[0].mean())
        dst_lab = (studies / "labels" / "final" if i < LABELLED else gt) / f"{case}.nii.gz"
        downsample_case(chaos_dir / "imagesTr" / f"{case}_0000.nii.gz", chaos_dir / "labelsTr" / f"{case}.nii.gz",
                        studies / f"{case}.nii.gz", dst_lab, factor=4, z_range=(z - 5, z + 5))
    return studies, gt


@pytest.fixture(scope="module")
def server(chaos_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("app_server")
    studies, gt = _build_studies(chaos_dir, root)
    port = _free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    for k, v in CONF.items():
        cmd += ["--conf", k, v]
    env = dict(os.environ, MONAI_LABEL_AUTO_UPDATE_SCORING="false", PYTHONUNBUFFERED="1")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(root / 'server.log').read_text()[-3000:]}")
        try:
            if requests.get(url + "/info/", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"server did not start: {(root / 'server.log').read_text()[-3000:]}")
    yield {"url": url, "studies": studies, "gt": gt, "root": root, "state": {}}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def _wait_task(url: str, kind: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = requests.get(f"{url}/{kind}/", timeout=10)
        if r.status_code == 200 and r.json().get("status") in ("DONE", "ERROR", "STOPPED"):
            return r.json()
        time.sleep(2)
    raise TimeoutError(f"{kind} task did not finish in {timeout}s")


def test_info_lists_tasks_trainer_strategies(server):
    info = requests.get(server["url"] + "/info/", timeout=30).json()
    assert "sam2_fewshot" in info["models"]
    assert set(info["models"]) | set(info["unavailable_models"]) >= {"sam2_fewshot", "atlas_fewshot", "nnunet"}
    assert "train" in info["unavailable_models"]["nnunet"]  # no model version yet, says how to make one
    assert "ssl_nnunet" in info["trainers"]
    assert {"uncertainty", "disagreement", "diversity", "random", "first", "most_confident"} <= set(info["strategies"])
    assert {"uncertainty", "disagreement"} <= set(info["scoring"])
    assert info["datastore"]["total"] == CASES and info["datastore"]["completed"] == LABELLED


def test_bad_requests_get_4xx_and_leave_datastore_unchanged(server, tmp_path):
    url, studies = server["url"], server["studies"]
    before = (studies / "datastore_v2.json").read_bytes()
    img = nib.load(str(studies / "chaos_03.nii.gz"))
    gt = server["gt"] / "chaos_03.nii.gz"

    def put_label(name, data, image="chaos_03"):
        return requests.put(f"{url}/datastore/label", params={"image": image, "tag": "final"},
                            files={"label": (name, data)}, data={"params": json.dumps({"user": "mallory"})}, timeout=60)

    checks = {
        "unknown model": (requests.post(f"{url}/infer/nope", params={"image": "chaos_03"}, timeout=30), 404, "nope"),
        "unknown image": (requests.post(f"{url}/infer/sam2_fewshot", params={"image": "ghost"}, timeout=30), 404, "ghost"),
        "unknown strategy": (requests.post(f"{url}/activelearning/nope", json={}, timeout=30), 404, "nope"),
        "unknown trainer": (requests.post(f"{url}/train/nope", json={}, timeout=30), 404, "nope"),
        "unknown scoring": (requests.post(f"{url}/scoring/nope", json={}, timeout=30), 404, "nope"),
        "unknown batch model": (requests.post(f"{url}/batch/infer/nope", json={}, timeout=30), 404, "nope"),
        "unavailable model": (requests.post(f"{url}/infer/nnunet", params={"image": "chaos_03"}, timeout=30), 503,
                              "train"),
        "label for unknown image": (put_label("l.nii.gz", gt.read_bytes(), image="ghost"), 404, "ghost"),
        "image info unknown": (requests.get(f"{url}/datastore/image/info", params={"image": "ghost"}, timeout=30),
                               404, "ghost"),
        "rollback unknown version": (requests.post(f"{url}/ssl_medsam2/models/rollback", params={"version": "v999"},
                                                   timeout=30), 404, "v999"),
    }
    # corrupt label file
    checks["corrupt label"] = (put_label("l.nii.gz", b"not a nifti at all" * 10), 422, "unreadable")
    # wrong shape: one slice fewer
    p = tmp_path / "short.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape[:2] + (img.shape[2] - 1,), np.uint8), img.affine), str(p))
    checks["label shape"] = (put_label("short.nii.gz", p.read_bytes()), 422, "shape")
    # right shape, shifted affine
    aff = img.affine.copy()
    aff[:3, 3] += 10
    p = tmp_path / "moved.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), aff), str(p))
    checks["label affine"] = (put_label("moved.nii.gz", p.read_bytes()), 422, "affine")
    # OHIF raw label of the wrong size
    checks["raw label size"] = (put_label("label.bin", b"\0" * 100), 422, "bytes")
    # corrupt image upload
    checks["corrupt image"] = (requests.put(f"{url}/datastore/image", params={"image": "junk"},
                                            files={"file": ("junk.nii.gz", b"\x1f\x8b garbage")}, timeout=30),
                               422, "junk")
    # the same through Slicer's upload route (MONAI Label's deprecated alias PUT /datastore/)
    checks["corrupt image (Slicer route)"] = (requests.put(f"{url}/datastore/", params={"image": "junk"},
                                                          files={"file": ("junk.nii.gz", b"\x1f\x8b garbage")},
                                                          timeout=30), 422, "junk")
    for what, (r, code, word) in checks.items():
        assert r.status_code == code, f"{what}: {r.status_code} {r.text}"
        assert word in r.json()["detail"], f"{what}: reason missing in {r.text}"
    assert (studies / "datastore_v2.json").read_bytes() == before
    assert not (studies / "junk.nii.gz").exists()
    assert not (studies / "labels" / "final" / "chaos_03.nii.gz").exists()


def test_sam2_fewshot_returns_label_on_image_grid_ohif_contract(server):
    import SimpleITK as sitk

    url, studies = server["url"], server["studies"]
    params = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}
    r = requests.post(f"{url}/infer/sam2_fewshot", params={"image": "chaos_03", "output": "image"},
                      data={"params": json.dumps(params)}, timeout=600)
    assert r.status_code == 200, r.text
    out = server["root"] / "result.nrrd"
    out.write_bytes(r.content)
    lab, ref = sitk.ReadImage(str(out)), sitk.ReadImage(str(studies / "chaos_03.nii.gz"))
    assert lab.GetSize() == ref.GetSize()
    assert np.allclose(lab.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    assert np.allclose(lab.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    assert np.allclose(lab.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert b"gzip" not in r.content[:400]  # result_compress=false -> raw nrrd
    # the uncertainty is stored: few-shot outputs on disk and a score in the datastore
    state = studies / ".ssl_medsam2" / "fewshot"
    for kind in ("labels", "probabilities", "entropy"):
        assert (state / kind / "chaos_03.nii.gz").exists()
    info = requests.get(f"{url}/datastore/image/info", params={"image": "chaos_03"}, timeout=30).json()
    assert 0.0 <= info["ssl_uncertainty"] <= 1.0 and info["ssl_fewshot_random_weights"] is True
    server["state"]["uncertainty_ts"] = info["ssl_scores_ts"]


def test_leases_different_images_and_saved_label_records_user(server):
    url, gt = server["url"], server["gt"]

    def ask(who):
        r = requests.post(f"{url}/activelearning/uncertainty", json={"client_id": who}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["id"]

    a, b = ask("alice"), ask("bob")
    assert a == "chaos_03"  # the only scored image is the most uncertain one
    assert a != b
    again = ask("alice")  # asking again is a skip: the next free image, her lease moves with her
    assert again not in (a, b)
    assert a not in requests.get(f"{url}/ssl_medsam2/leases", timeout=30).json()
    assert ask("alice") == a  # and again: the most uncertain image, free once more, is hers again
    leases = requests.get(f"{url}/ssl_medsam2/leases", timeout=30).json()
    assert leases[a]["holder"] == "alice" and leases[b]["holder"] == "bob"
    r = requests.put(f"{url}/datastore/label", params={"image": a, "tag": "final"},
                     files={"label": (f"{a}.nii.gz", (gt / f"{a}.nii.gz").read_bytes())},
                     data={"params": json.dumps({"user": "alice"})}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["lease_released"] is True
    info = requests.get(f"{url}/datastore/label/info", params={"label": a, "tag": "final"}, timeout=30).json()
    assert info["user"] == "alice" and info["saved_at"].endswith("Z") and info["ts"] > 0
    assert a not in requests.get(f"{url}/ssl_medsam2/leases", timeout=30).json()
    c = ask("carol")
    assert c not in (a, b)
    assert requests.get(f"{url}/info/", timeout=30).json()["datastore"]["completed"] == LABELLED + 1
    # the saved label is exactly the uploaded one, on the image grid
    saved = nib.load(str(server["studies"] / "labels" / "final" / f"{a}.nii.gz"))
    ref = nib.load(str(gt / f"{a}.nii.gz"))
    assert np.array_equal(np.asarray(saved.dataobj), np.asarray(ref.dataobj))
    assert np.allclose(saved.affine, ref.affine)


def test_scoring_writes_scores_into_datastore(server):
    url = server["url"]
    time.sleep(1.1)  # scores carry a second-resolution timestamp
    r = requests.post(f"{url}/scoring/uncertainty", params={"run_sync": True}, json={}, timeout=300)
    assert r.status_code == 200, r.text
    assert "chaos_03" in r.json()["scored"]
    info = requests.get(f"{url}/datastore/image/info", params={"image": "chaos_03"}, timeout=30).json()
    assert info["ssl_scores_ts"] > server["state"]["uncertainty_ts"]
    assert 0.0 <= info["ssl_uncertainty"] <= 1.0
    stored = json.loads((server["studies"] / "datastore_v2.json").read_text())
    assert stored["objects"]["chaos_03"]["image"]["info"]["ssl_uncertainty"] == info["ssl_uncertainty"]


def test_batch_pseudo_labels_train_new_version_then_nnunet_infer(server):
    url, studies = server["url"], server["studies"]
    # batch pseudo-labelling on CPU (the atlas engine: same task class as sam2_fewshot, cheaper on CPU)
    r = requests.post(f"{url}/batch/infer/atlas_fewshot", params={"images": "unlabeled"}, json={}, timeout=60)
    assert r.status_code == 200, r.text
    task = _wait_task(url, "batch/infer", 600)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    unlabelled = [c for c in chaos_cases()[:CASES] if not (studies / "labels" / "final" / f"{c}.nii.gz").exists()]
    for c in unlabelled:
        assert (studies / "labels" / "pseudo" / f"{c}.nii.gz").exists(), c
    r = requests.post(f"{url}/train/ssl_nnunet", json=NNUNET_TINY, timeout=60)
    assert r.status_code == 200, r.text
    task = _wait_task(url, "train", 900)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    info = requests.get(f"{url}/info/", timeout=30).json()
    stats = info["train_stats"]["ssl_nnunet"]
    assert stats["status"] == "DONE" and stats["current_version"] == "v001"
    assert stats["epoch"] >= 1 and stats["total_epochs"] >= 1 and stats["best_metric"] is not None
    assert "nnunet" in info["models"]  # picked up without a restart
    models = requests.get(f"{url}/ssl_medsam2/models", timeout=30).json()
    assert models["current"] == "v001" and models["versions"][0]["promoted"] is True
    r = requests.post(f"{url}/infer/nnunet", params={"image": unlabelled[0], "output": "image"}, timeout=300)
    assert r.status_code == 200, r.text
    out = server["root"] / "nnunet.nii.gz"
    out.write_bytes(r.content)
    pred, ref = nib.load(str(out)), nib.load(str(studies / f"{unlabelled[0]}.nii.gz"))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
    info = requests.get(f"{url}/datastore/image/info", params={"image": unlabelled[0]}, timeout=30).json()
    assert info["ssl_nnunet_version"] == "v001" and 0.0 <= info["ssl_disagreement"] <= 1.0
    # disagreement scoring: every image with a few-shot label is compared with v001's prediction
    r = requests.post(f"{url}/scoring/disagreement", params={"run_sync": True}, json={}, timeout=600)
    assert r.status_code == 200, r.text
    scored = r.json()["scored"]
    assert set(unlabelled) | {"chaos_03"} <= set(scored) and all(0.0 <= v <= 1.0 for v in scored.values())
    ds = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    assert all(ds[i]["image"]["info"]["ssl_disagreement"] == v for i, v in scored.items())
    # nothing earlier to roll back to yet
    r = requests.post(f"{url}/ssl_medsam2/models/rollback", timeout=30)
    assert r.status_code == 404 and "earlier" in r.json()["detail"]


def _served_version(url: str, image: str) -> str:
    r = requests.post(f"{url}/infer/nnunet", params={"image": image, "output": "json"}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def test_continuous_retraining_serves_a_new_version(server):
    """Final labels saved -> debounce -> ssl_nnunet run (no request to /train) -> v002 served, no restart."""
    url, gt, studies = server["url"], server["gt"], server["studies"]
    before = requests.get(f"{url}/ssl_medsam2/models", timeout=30).json()
    assert before["current"] == "v001"
    image = next(c for c in chaos_cases()[LABELLED:CASES] if not (studies / "labels" / "final" / f"{c}.nii.gz").exists())
    r = requests.put(f"{url}/datastore/label", params={"image": image, "tag": "final"},
                     files={"label": (f"{image}.nii.gz", (gt / f"{image}.nii.gz").read_bytes())}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["retrain_pending"] == 2 and r.json()["retrain_scheduled_at"], r.json()
    deadline = time.time() + 900
    while time.time() < deadline:
        models = requests.get(f"{url}/ssl_medsam2/models", timeout=30).json()
        task = requests.get(f"{url}/train/", timeout=30).json()
        if len(models["versions"]) == 2 and task.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(3)
    else:
        raise TimeoutError("no second model version within 900 s")
    assert task["status"] == "DONE", "\n".join(task.get("details", [])[-30:])
    retrain = requests.get(f"{url}/info/", timeout=30).json()["ssl_medsam2"]["retrain"]
    assert retrain["runs"] and image in retrain["runs"][-1]["labels"] and retrain["pending"] == []
    assert models["current"] == "v002" and models["versions"][-1]["labelled"] == sorted(
        set(chaos_cases()[:LABELLED]) | {"chaos_03", image})
    query = next(c for c in chaos_cases()[:CASES] if not (studies / "labels" / "final" / f"{c}.nii.gz").exists())
    assert _served_version(url, query) == "v002"


def test_rollback_between_two_versions(server):
    url, studies = server["url"], server["studies"]
    query = next(c for c in chaos_cases()[:CASES] if not (studies / "labels" / "final" / f"{c}.nii.gz").exists())
    r = requests.post(f"{url}/ssl_medsam2/models/rollback", timeout=30)
    assert r.status_code == 200 and r.json()["current"] == "v001", r.text
    assert _served_version(url, query) == "v001"  # the next request uses the rolled-back version
    r = requests.post(f"{url}/ssl_medsam2/models/rollback", params={"version": "v002"}, timeout=30)
    assert r.status_code == 200 and r.json()["current"] == "v002", r.text
    assert _served_version(url, query) == "v002"
    history = [h["current"] for h in requests.get(f"{url}/ssl_medsam2/models", timeout=30).json()["history"]]
    assert history[-3:] == ["v002", "v001", "v002"]
    r = requests.post(f"{url}/ssl_medsam2/models/rollback", params={"version": "../v001"}, timeout=30)
    assert r.status_code == 422, r.text
