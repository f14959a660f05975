"""A server a team can rely on, over HTTP with MONAI Label's own client (issue 27).

Pseudo labels computed ahead of the annotators: stored results are served at once with their provenance,
a new final label makes them not current (and the queue recomputes them), a client that goes away hands
its result to the store, SIGTERM with work in flight ends the server within 10 s and a restart resumes
the queue. Status that stays true: a stopped training shows stopped in /info and leaves no unlisted
version folder; a saved label's source_file is a base name. Only real-valued voxel types are accepted.

Real CHAOS MRI: 6 cases at 32x32 in-plane, 10 slices (2 with final labels); the atlas engine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import chaos_cases, downsample_case, load_script

LABELLED = ["chaos_01", "chaos_02"]
CASES = 6
CONF = {"app.retrain_after_labels": 0, "pseudo_store.model": "atlas_fewshot",
        "pseudo_store.idle_s": 0.5, "pseudo_store.relist_s": 2}


def build_studies(chaos_dir: Path, root: Path, cases: int = CASES, factor: int = 8) -> Path:
    studies = root / "studies"
    for case in chaos_cases()[:cases]:
        img = chaos_dir / "imagesTr" / f"{case}_0000.nii.gz"
        z = nib.load(str(img)).shape[2]
        dst = (studies / "labels" / "final" if case in LABELLED else root / "truth") / f"{case}.nii.gz"
        downsample_case(img, chaos_dir / "labelsTr" / f"{case}.nii.gz", studies / f"{case}.nii.gz", dst,
                        factor=factor, z_range=((z - 10) // 2, (z - 10) // 2 + 10))
    return studies


def start(studies: Path, root: Path, conf: dict | None = None):
    return load_script("pacs_demo").start_monailabel(str(studies), root / "work", conf={**CONF, **(conf or {})})


def info(url: str) -> dict:
    import requests

    return requests.get(url + "/info/", timeout=30).json()


def wait_queue_done(url: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = info(url)["ssl_medsam2"]["pseudo_labels"]
        if p["current"] == p["unlabelled"] and not p["pending"]:
            return p
        time.sleep(0.5)
    raise TimeoutError(f"pseudo-label queue not done in {timeout} s: {p}")


def client(url: str, tmp: Path, client_id: str):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(url, tmpdir=str(tmp), client_id=client_id)


def infer(c, image: str, **params) -> dict:
    _, res = c.infer("atlas_fewshot", image, params)
    return json.loads(res) if isinstance(res, str) else res


def computations(server, image: str) -> int:
    return server.log_tail(10**7).count(f"pseudo label of {image} stored")


@pytest.fixture(scope="module")
def team(chaos_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo_ahead")
    studies = build_studies(chaos_dir, root)
    server = start(studies, root)
    state = {"server": server}
    try:
        yield {"url": server.url, "root": root, "studies": studies, "state": state}
    finally:
        state["server"].stop()


def test_stored_pseudo_label_served_without_recomputation_with_provenance(team, tmp_path):
    url, server = team["url"], team["state"]["server"]
    status = wait_queue_done(url)
    assert status["unlabelled"] == CASES - len(LABELLED) and status["failed"] == 0, status
    c = client(url, tmp_path, "ann1")
    image = client(url, tmp_path, "ann1").next_sample("first", {})["id"]
    before = computations(server, image)
    assert before == 1
    t0 = time.time()
    res = infer(c, image)
    took = time.time() - t0
    p = res["pseudo_label"]
    assert p["source"] == "store" and p["current"] is True and p["newer_supports_pending"] is False, p
    assert sorted(p["supports"]) == LABELLED and p["computed_at"] and p["digest"]
    assert computations(server, image) == before  # served, not recomputed
    assert took < 5, took
    # fresh=true waits for a recomputation
    res = infer(c, image, fresh=True)
    assert res["pseudo_label"]["source"] == "computed" and computations(server, image) == before + 1


def test_new_final_label_makes_stored_labels_not_current(team, tmp_path):
    url, root = team["url"], team["root"]
    wait_queue_done(url)
    c = client(url, tmp_path, "ann2")
    saved = "chaos_03"
    old = infer(c, "chaos_05")["pseudo_label"]
    before = computations(team["state"]["server"], saved)
    c.save_label(saved, str(root / "truth" / f"{saved}.nii.gz"), tag="final")
    res = infer(c, "chaos_05")["pseudo_label"]  # right after the save: still the old result, said so
    if res["digest"] == old["digest"]:
        assert res["current"] is False and res["newer_supports_pending"] is True, res
    # the saved image's own old result is served said so, and not recomputed (it is labelled now)
    assert infer(c, saved)["pseudo_label"]["current"] is False
    status = wait_queue_done(url)
    assert computations(team["state"]["server"], saved) == before
    assert status["unlabelled"] == CASES - len(LABELLED) - 1
    res = infer(c, "chaos_05")["pseudo_label"]
    assert res["current"] is True and res["digest"] != old["digest"] and saved in res["supports"], res


def test_disconnected_client_hands_its_result_to_the_store(team, chaos_dir, tmp_path):
    url, server = team["url"], team["state"]["server"]
    wait_queue_done(url)
    scan = tmp_path / "new_scan.nii.gz"
    z = nib.load(str(chaos_dir / "imagesTr" / "chaos_13_0000.nii.gz")).shape[2]
    downsample_case(chaos_dir / "imagesTr" / "chaos_13_0000.nii.gz", None, scan, None, factor=8,
                    z_range=(z // 2 - 5, z // 2 + 5))
    c = client(url, tmp_path, "ann3")
    c.upload_image(str(scan), "new_scan")
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # ask, then go away at once
        body = b"params=%7B%7D"
        s.sendall(b"POST /infer/atlas_fewshot?image=new_scan HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
        time.sleep(0.3)
    wait_queue_done(url)
    assert computations(server, "new_scan") == 1
    res = infer(c, "new_scan")["pseudo_label"]
    assert res["source"] == "store" and res["current"] is True
    assert computations(server, "new_scan") == 1


def test_saved_label_source_file_is_a_base_name(team, tmp_path):
    import requests

    url, root = team["url"], team["root"]
    with open(root / "truth" / "chaos_10.nii.gz", "rb") as fh:  # MONAILabelClient sends its local path
        r = requests.put(f"{url}/datastore/label", params={"image": "chaos_10", "tag": "draft"},
                         files={"label": ("C:\\Users\\alice\\tmp/x/label_chaos_10.nii.gz", fh)},
                         data={"params": "{}"}, timeout=60)
    assert r.status_code == 200, r.text
    info = requests.get(f"{url}/datastore/label/info", params={"label": "chaos_10", "tag": "draft"}, timeout=30).json()
    assert info["source_file"] == "label_chaos_10.nii.gz", info
    everything = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).text
    assert "alice" not in everything and str(root) not in everything


@pytest.mark.parametrize("what", ["image", "label"])
def test_complex_voxels_get_422_with_a_reason(team, tmp_path, what):
    import requests

    url, studies = team["url"], team["studies"]
    ref = nib.load(str(studies / "chaos_10.nii.gz"))
    data = (np.asarray(ref.dataobj) + 1j).astype(np.complex64)
    path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(data, ref.affine), str(path))
    before = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
    with open(path, "rb") as fh:
        if what == "image":
            r = requests.put(f"{url}/datastore/image", params={"image": "complex_scan"},
                             files={"file": ("complex.nii.gz", fh)}, data={"params": "{}"}, timeout=60)
        else:
            r = requests.put(f"{url}/datastore/label", params={"image": "chaos_10", "tag": "final"},
                             files={"label": ("complex.nii.gz", fh)}, data={"params": "{}"}, timeout=60)
    assert r.status_code == 422, r.text
    assert "complex" in r.json()["detail"] and "real-valued" in r.json()["detail"], r.text
    assert requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json() == before


def test_stopped_training_shows_stopped_and_leaves_no_version_folder(team):
    import requests

    url, root = team["url"], team["root"]
    r = requests.post(f"{url}/train/ssl_nnunet", json={"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1,
                                                       "quality_gate": "off"}, timeout=30)
    assert r.status_code == 200, r.text
    deadline = time.time() + 120
    while time.time() < deadline:
        stats = info(url)["train_stats"]["ssl_nnunet"]
        if stats.get("status") == "RUNNING":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"training never reported RUNNING: {stats}")
    assert requests.delete(f"{url}/train/", timeout=30).status_code == 200
    t0 = time.time()
    while time.time() - t0 < 5:
        stats = info(url)["train_stats"]["ssl_nnunet"]
        if stats.get("status") != "RUNNING":
            break
        time.sleep(0.2)
    assert stats["status"] == "STOPPED" and "stopped" in stats["reason"], stats
    assert requests.get(f"{url}/train/", timeout=30).json()["status"] == "STOPPED"
    models = root / "work" / "state" / "models"
    listed = {v["id"] for v in requests.get(f"{url}/ssl_medsam2/models", timeout=30).json()["versions"]}
    assert {p.name for p in models.glob("v[0-9]*") if p.is_dir()} <= listed


def test_sigterm_with_work_in_flight_exits_fast_and_restart_resumes(team, tmp_path):
    url, root, studies = team["url"], team["root"], team["studies"]
    wait_queue_done(url)
    c = client(url, tmp_path, "ann4")
    c.save_label("chaos_08", str(root / "truth" / "chaos_08.nii.gz"), tag="final")  # every result is stale now
    deadline = time.time() + 60
    while time.time() < deadline and not info(url)["ssl_medsam2"]["pseudo_labels"]["running"]:
        time.sleep(0.05)
    server = team["state"]["server"]
    t0 = time.time()
    os.killpg(server.process.pid, signal.SIGTERM)
    server.process.wait(30)
    took = time.time() - t0
    assert took <= 10, f"server took {took:.1f} s to stop after SIGTERM"
    store = root / "work" / "state" / "pseudo_store"
    partial = [p.name for p in store.rglob(".*") if p.is_file()]
    assert not partial, partial
    for rec in store.glob("*/*.json"):
        assert rec.with_name(rec.name[: -len(".json")] + ".nii.gz").exists(), rec
    queue = json.loads((store / "queue.json").read_text())
    assert queue["pending"], queue  # work was left
    server.stop()
    team["state"]["server"] = restarted = start(studies, root)
    p = info(restarted.url)["ssl_medsam2"]["pseudo_labels"]
    assert p["resumed_from_last_run"] >= 1, p
    done = wait_queue_done(restarted.url)
    assert done["current"] == done["unlabelled"] == 3, done


def test_current_pseudo_label_path_is_the_base_of_a_correction_only_while_current(chaos_dir, tmp_path, monkeypatch):
    """In-process (what an interactive model calls): the stored label's path while it is current, else None."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "apps" / "ssl_medsam2"))
    from lib.pseudo_ahead import PseudoAhead
    from main import create_app

    studies = build_studies(chaos_dir, tmp_path, cases=4)
    app = create_app(str(REPO / "apps" / "ssl_medsam2"), str(studies), CONF)
    ws, image = app.workspace, "chaos_03"
    assert ws.current_pseudo_label_path(image) is None  # nothing stored yet
    ahead = ws.pseudo_ahead = PseudoAhead(app)  # the server's store and queue (the queue is not started)
    task = ahead.task()
    monkeypatch.setattr(task, "compute", lambda query, image_id, top_k, executor=None: (  # a stand-in engine
        {"label": (query.array > np.percentile(query.array, 90)).astype(np.uint8), "summary": {"supports": LABELLED}},
        None))
    ahead._compute(image)  # what the queue runs for one image
    path = ws.current_pseudo_label_path(image)
    assert path and path == ws.stored_pseudo_label(image)["path"] and nib.load(path).get_fdata().any()
    assert np.allclose(nib.load(path).affine, nib.load(str(studies / f"{image}.nii.gz")).affine)
    # a new final label: the stored result is not current any more, so it is not a base
    app.datastore().save_label("chaos_05", str(tmp_path / "truth" / "chaos_05.nii.gz"), "final", {})
    assert ws.current_pseudo_label_path(image) is None and ws.stored_pseudo_label(image)["current"] is False
    # a child process (no queue) cannot tell: None, while stored_pseudo_label still finds the file
    ws.pseudo_ahead = None
    assert ws.current_pseudo_label_path(image) is None and ws.stored_pseudo_label(image)["path"] == path
