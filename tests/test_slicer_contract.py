"""The REST contract of 3D Slicer's MONAI Label module, replayed against the real app.

The Slicer module talks to the server through ``MONAILabelClient`` (its MONAILabelLib ships the same
client as ``monailabel.client``), plus a plain GET of ``/datastore/image?image=ID`` to load the
volume. We replay that sequence: info -> next sample -> download image -> infer (label downloaded from
the multipart answer) -> save label (``label_info`` names, as Slicer sends them) -> train (start,
status, stop) and check what Slicer relies on in each answer.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from conftest import NO_QUEUE, REPO, downsample_case, fewshot_model

CASES = ["chaos_01", "chaos_02", "chaos_03", "chaos_05"]
LABELLED = CASES[:2]


def _pacs_demo():
    spec = importlib.util.spec_from_file_location("pacs_demo", REPO / "scripts" / "pacs_demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pacs_demo"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def _mid_slices(path: Path, n: int) -> tuple[int, int]:
    z = nib.load(str(path)).shape[2]
    return (z - n) // 2, (z - n) // 2 + n


@pytest.fixture(scope="module")
def server(chaos_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("slicer")
    studies = root / "studies"
    for case in CASES:
        img = chaos_dir / "imagesTr" / f"{case}_0000.nii.gz"
        lab_dst = (studies / "labels" / "final" if case in LABELLED else root / "truth") / f"{case}.nii.gz"
        downsample_case(img, chaos_dir / "labelsTr" / f"{case}.nii.gz", studies / f"{case}.nii.gz", lab_dst,
                        factor=4, z_range=_mid_slices(img, 10))
    conf = {"sam2.checkpoint": "none", "sam2.image_size": 128, "sam2.n_inserts": 1, "sam2.n_supports": 1,
            "sam2.device": "cpu", "input.classes": "[1]", "app.retrain_after_labels": 0,
            "nnunet.epochs": 1, "nnunet.iterations_per_epoch": 2, "nnunet.val_iterations": 1,
            "nnunet.quality_gate": "off", **NO_QUEUE}  # plumbing: a 2-iteration model would (rightly) fail the gate
    srv = _pacs_demo().start_monailabel(str(studies), root / "work", conf=conf)
    yield {"url": srv.url, "studies": studies, "root": root, "server": srv, "chaos": chaos_dir}
    srv.stop()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(server["url"], tmpdir=str(tmp_path_factory.mktemp("slicer_client")), client_id="slicer-1")


def test_slicer_session(server, client, tmp_path):
    url = server["url"]
    # the app installs its MONAI Label 0.8.5 fixes (token check, DICOMweb; apps/ssl_medsam2/monailabel_085.py)
    log = server["server"].log_path.read_text(errors="replace")
    assert "ssl_medsam2: MONAI Label 0.8.5 fixes installed" in log and "ssl_medsam2 dicomweb:" in log
    # 1. connect: /info drives the module's model, strategy and trainer lists and its label names
    info = client.info()
    model = fewshot_model(info)
    assert "ssl_nnunet" in info["trainers"] and "random" in info["strategies"]
    assert info["models"][model]["type"] == "segmentation"
    assert info["models"][model]["labels"], "Slicer names segments from the model's labels"
    assert info["datastore"]["total"] == len(CASES) and info["datastore"]["completed"] == len(LABELLED)

    # 2. next sample: an unlabelled image; Slicer then downloads it by id
    sample = client.next_sample("first", {})
    image_id = sample["id"]
    assert image_id in set(CASES) - set(LABELLED)
    r = httpx.get(f"{url}/datastore/image", params={"image": image_id}, timeout=60)
    assert r.status_code == 200
    (tmp_path / "image.nii.gz").write_bytes(r.content)
    img = nib.load(str(tmp_path / "image.nii.gz"))
    src = nib.load(str(server["studies"] / f"{image_id}.nii.gz"))
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(src.dataobj))
    # a second Slicer asking for the next sample does not get the same image (lease)
    from monailabel.client import MONAILabelClient

    other = MONAILabelClient(url, tmpdir=str(tmp_path), client_id="slicer-2").next_sample("first", {})
    assert other["id"] != image_id

    # 3. infer: the label comes back as a file in the multipart answer, params as JSON
    t0 = time.time()
    label_file, params = client.infer(model, image_id, {})
    infer_s = time.time() - t0
    assert label_file and Path(label_file).exists(), params
    lab = nib.load(label_file)
    assert lab.shape == img.shape, "the label must lie on the image grid Slicer loaded"
    np.testing.assert_allclose(lab.affine, img.affine, atol=1e-3)
    values = set(np.unique(np.asarray(lab.dataobj)).astype(int).tolist())
    label_names = params.get("label_names") or info["models"][model]["labels"]
    assert values <= {0} | set(int(v) for v in label_names.values())
    assert len(values - {0}) >= 1, "expected a non-empty segmentation"

    # 4. save the (edited) segmentation as final, with Slicer's label_info
    label_info = [{"name": name, "idx": int(idx)} for name, idx in label_names.items()]
    res = client.save_label(image_id, label_file, tag="final", params={"label_info": label_info})
    assert res.get("image") in (image_id, None) and res.get("label") or res, res
    ds = client.datastore()
    labels = ds["objects"][image_id]["labels"]
    assert "final" in labels, labels
    assert httpx.get(f"{url}/datastore/?output=stats").json()["completed"] == len(LABELLED) + 1
    # the saved label can be downloaded back (Slicer's "load label" path)
    back = client.download_label(image_id, "final")
    np.testing.assert_array_equal(np.asarray(nib.load(back).dataobj), np.asarray(lab.dataobj))
    nxt = client.next_sample("first", {})
    assert nxt.get("id") != image_id

    # 5. Slicer's "upload volume" (a scan loaded in Slicer, not on the server): PUT /datastore/?image=ID
    new_img = server["root"] / "upload" / "chaos_08.nii.gz"
    downsample_case(server["chaos"] / "imagesTr" / "chaos_08_0000.nii.gz", None, new_img, None, factor=4,
                    z_range=(0, 10))
    up = client.upload_image(str(new_img), image_id="chaos_08")
    assert up.get("image") == "chaos_08", up
    assert httpx.get(f"{url}/datastore/?output=stats").json()["total"] == len(CASES) + 1

    # 6. train: start, see it running in /train/, stop (the tiny schedule is exercised by the app's tests)
    started = client.train_start("ssl_nnunet", {"max_epochs": 1})
    assert started, started
    running = client.train_status(check_if_running=True)
    status = client.train_status()
    assert status and (status.get("status") in ("RUNNING", "DONE", "QUEUED") or "id" in status), status
    stopped = client.train_stop()
    print(json.dumps({"model": model, "infer_s": round(infer_s, 1), "running": running, "stopped": stopped}))


def test_slicer_upload_route_rejects_a_corrupt_file(server, tmp_path):
    """Slicer uploads through PUT /datastore/ (MONAI Label's older alias of PUT /datastore/image):
    the app guards it like the other upload routes."""
    url = server["url"]
    total = httpx.get(f"{url}/datastore/?output=stats").json()["total"]
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    r = httpx.put(f"{url}/datastore/", params={"image": "broken"}, files={"file": ("broken.nii.gz", bad.read_bytes())},
                  data={"params": "{}"})
    assert 400 <= r.status_code < 500, f"corrupt upload through Slicer's route: {r.status_code} {r.text[:200]}"
    assert httpx.get(f"{url}/datastore/?output=stats").json()["total"] == total
