"""The MONAI Label app hands batch few-shot pseudo-labelling to Ray (``--conf cluster.ray_address local``).

Real CHAOS at 64x64 in-plane, 2 final labels, 4 unlabelled images, the atlas engine at reduced settings;
the result must equal the library's in-process pseudo labels byte for byte and land where the per-image
task puts it (datastore label under the pseudo tag, few-shot outputs, uncertainty score).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from ray_helpers import ATLAS, FAST_ATLAS, ray_env  # noqa: F401 - ray_env: autouse, applies to this module

if importlib.util.find_spec("ray") is None:
    pytest.skip("Ray is optional and not installed (pip install -r requirements.txt pins it)", allow_module_level=True)

sys.path.insert(0, str(REPO / "apps" / "ssl_medsam2"))

from ssl_medsam2.config import load_config
from ssl_medsam2.pseudo_label import pseudo_label_folder
from ssl_medsam2.studies import make_studies

CASES = ("chaos_01", "chaos_02", "chaos_03", "chaos_05", "chaos_08", "chaos_10")


def test_batch_fewshot_goes_to_ray_and_lands_like_the_per_image_task(small_chaos, tmp_path):
    from main import create_app

    src = tmp_path / "src"
    for c in CASES:
        (src / "images").mkdir(parents=True, exist_ok=True)
        (src / "labels").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(small_chaos / "imagesTr" / f"{c}_0000.nii.gz", src / "images" / f"{c}_0000.nii.gz")
        shutil.copyfile(small_chaos / "labelsTr" / f"{c}.nii.gz", src / "labels" / f"{c}.nii.gz")
    make_studies(src / "images", src / "labels", tmp_path / "studies", labelled=2)
    conf = {**FAST_ATLAS, "cluster.ray_address": "local", "cluster.local_num_cpus": "2", "cluster.object_store_mb": "200"}
    app = create_app(str(REPO / "apps" / "ssl_medsam2"), str(tmp_path / "studies"), conf)
    result = app.batch_infer({"model": "atlas_fewshot", "images": "unlabeled"})
    queries = sorted(CASES[2:])
    assert sorted(result) == queries and all("label" in r for r in result.values()), result

    # the same pseudo labels as the library in-process
    lab = tmp_path / "sup"
    lab.mkdir()
    for c in CASES[:2]:
        shutil.copyfile(src / "labels" / f"{c}.nii.gz", lab / f"{c}.nii.gz")
    ref = tmp_path / "ref"
    cfg = load_config(overrides=ATLAS)
    pseudo_label_folder(src / "images", lab, ref, cfg, show_progress=False)
    ds = app.datastore()
    ws = app.workspace
    for c in queries:
        stored = ds.get_label_uri(c, ws.pseudo_tag)
        assert stored and os.path.exists(stored), f"{c}: no pseudo label in the datastore"
        assert Path(stored).read_bytes() == (ref / "labels" / f"{c}.nii.gz").read_bytes()
        assert (ws.fewshot_dir / "summaries" / f"{c}.json").exists()
        assert ws.image_info(c).get("ssl_uncertainty") is not None
    assert not (ws.state_dir / "batch").exists() or not any((ws.state_dir / "batch").iterdir())


def test_pseudo_label_queue_job_runs_on_ray_and_lands_only_in_the_store(chaos_dir, tmp_path, caplog, monkeypatch):
    """With ``cluster.ray_address`` the background queue's job (lib/pseudo_ahead.py) runs on a Ray worker with
    the supports the in-process path picks; its label equals the in-process one and goes only to the
    pseudo-label store (the datastore's pseudo tag, where the trainer publishes refined labels, is untouched).
    Real CHAOS, 4 cases at 32x32 in-plane, 10 slices, 2 final labels."""
    from lib.pseudo_ahead import PseudoAhead
    from main import create_app
    from ssl_medsam2.cluster import cluster_cfg, ray_session
    from ssl_medsam2.io import load_label_for, load_volume
    from ssl_medsam2.metrics import dice
    from test_team_server import CONF, build_studies

    studies = build_studies(chaos_dir, tmp_path, cases=4)
    conf = {**CONF, **FAST_ATLAS, "cluster.ray_address": "local", "cluster.local_num_cpus": "1",
            "cluster.object_store_mb": "100"}
    app = create_app(str(REPO / "apps" / "ssl_medsam2"), str(studies), conf)
    ws, ds, image = app.workspace, app.datastore(), "chaos_03"
    ahead = ws.pseudo_ahead = PseudoAhead(app)  # the server's store and queue (the queue is not started)
    task = ahead.task()
    try:
        with ray_session("local", cluster_cfg(ws.cfg)), caplog.at_level("INFO", logger="ssl_medsam2"):
            with monkeypatch.context() as m:  # a job that fails on the worker: its reason reaches the queue
                m.setattr(task, "engine_name", "no_such_engine")
                with pytest.raises(RuntimeError, match="no_such_engine"):
                    ahead._compute(image)
            assert ws.stored_pseudo_label(image) is None
            ahead._compute(image)  # what the queue runs for one image
        rec = ws.stored_pseudo_label(image)
        assert rec and rec["ran_on"] == "ray" and rec["ray_address"] == "local" and rec["current"] is True, rec
        done = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{image} done on ")]
        assert done and f":{os.getpid()} " not in done[0], done  # a Ray worker's process, not this one
        assert not ds.get_label_uri(image, ws.pseudo_tag)  # the datastore's pseudo tag is untouched
        assert ws.image_info(image).get("ssl_uncertainty") is not None  # scores as in-process

        query = load_volume(ds.get_image_uri(image), name=image)
        here, _ = task.compute(query, image, ahead._top_k(task))  # in this process, the same inputs
        stored = load_label_for(query, rec["path"]).array
        assert stored.any() and dice(stored > 0, here["label"] > 0) >= 0.99
        assert np.array_equal(stored, here["label"])
    finally:
        ws.pseudo_ahead = None
