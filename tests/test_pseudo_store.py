"""The library behind pseudo labels computed ahead (ssl_medsam2.pseudo_store) and the in-process folder resume.

The queue and the store are checked with a stand-in computation (what they promise does not depend on the
engine); the folder resume runs the real atlas engine on real CHAOS MRI (32x32 in-plane, 8 slices).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import downsample_case
from ray_helpers import ATLAS
from ssl_medsam2 import pseudo_label as pl
from ssl_medsam2.config import load_config
from ssl_medsam2.pseudo_store import PseudoQueue, PseudoStore, file_fingerprint, producer_digest, stored_pseudo_label


def test_store_keeps_results_with_provenance_and_digest(tmp_path):
    store = PseudoStore(tmp_path / "store")
    d1 = producer_digest("atlas", {"a": 1}, {"chaos_01": "x"})
    assert d1 == producer_digest("atlas", {"a": 1}, {"chaos_01": "x"})
    assert d1 != producer_digest("atlas", {"a": 1}, {"chaos_01": "x", "chaos_02": "y"})  # a new support
    assert d1 != producer_digest("atlas", {"a": 2}, {"chaos_01": "x"}) != producer_digest("sam2", {"a": 1}, {})
    assert store.record("atlas", "img") is None
    rec = store.put("atlas", "img", lambda tmp: Path(tmp).write_bytes(b"label"), {"digest": d1, "supports": ["chaos_01"]})
    assert Path(rec["path"]).read_bytes() == b"label" and rec["digest"] == d1 and rec["computed_at"] > 0
    assert store.record("atlas", "img")["supports"] == ["chaos_01"]
    assert stored_pseudo_label(tmp_path / "store", "img")["path"] == rec["path"]
    (tmp_path / "store" / "atlas" / ".img.nii.gz.partial").write_bytes(b"half")
    assert store.clean_partial() == 1 and store.record("atlas", "img") is not None


def test_fingerprint_of_a_dicom_series_folder_follows_its_files(tmp_path):
    """A DICOMweb datastore hands out an image as a folder of DICOM files (the container test found a 500)."""
    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        (series / f"{i}.dcm").write_bytes(bytes([i]) * 10)
    first = file_fingerprint(series)
    assert first == file_fingerprint(series)
    (series / "1.dcm").write_bytes(b"other slice")
    assert file_fingerprint(series) != first


def test_queue_order_urgent_first_waits_while_busy_and_reports_failures(tmp_path):
    done, wanted = [], ["a", "b", "c", "bad"]
    allowed = threading.Event()

    def compute(i):
        if i == "bad":
            raise ValueError("no organ")
        time.sleep(0.05)
        done.append(i)

    q = PseudoQueue(tmp_path / "queue.json", compute, lambda: [i for i in wanted if i not in done],
                    may_start=allowed.is_set, poll_s=0.02, relist_s=0.1).start()
    try:
        time.sleep(0.3)
        assert done == [] and q.status()["pending"] == 4  # interactive work runs: background waits
        assert json.loads((tmp_path / "queue.json").read_text())["pending"] == wanted
        ticket = q.request("c")  # someone waits for c: it runs even now
        assert q.wait("c", ticket, timeout=10) is None and done == ["c"]
        allowed.set()
        deadline = time.time() + 10
        while (q.status()["pending"] or q.status()["running"]) and time.time() < deadline:
            time.sleep(0.02)
        st = q.status()
        assert done == ["c", "a", "b"] and list(st["failed"]) == ["bad"] and "no organ" in st["failed"]["bad"]
        assert st["eta_s"] == 0.0 and st["mean_job_s"] > 0
        assert q.wait("bad", q.request("bad"), timeout=10).startswith("ValueError")
        assert isinstance(q.error("bad"), ValueError) and q.error("c") is None  # a waiter can tell input from fault
    finally:
        q.stop(timeout=5)
    assert PseudoQueue(tmp_path / "queue.json", compute, lambda: []).resumed == []  # nothing was left


def _folder(chaos_dir: Path, root: Path) -> tuple[Path, Path]:
    images, labels = root / "images", root / "labels"
    for case, z in (("chaos_01", (12, 20)), ("chaos_03", (12, 20)), ("chaos_05", (10, 18))):
        downsample_case(chaos_dir / "imagesTr" / f"{case}_0000.nii.gz", chaos_dir / "labelsTr" / f"{case}.nii.gz",
                        images / f"{case}_0000.nii.gz", root / "truth" / f"{case}.nii.gz", factor=8, z_range=z)
    labels.mkdir()
    (labels / "chaos_01.nii.gz").write_bytes((root / "truth" / "chaos_01.nii.gz").read_bytes())
    return images, labels


def test_in_process_folder_run_resumes_and_says_so(chaos_dir, tmp_path, monkeypatch, caplog):
    images, labels = _folder(chaos_dir, tmp_path)
    out = tmp_path / "out"
    cfg = load_config(overrides=ATLAS)
    ran: list[str] = []
    real = pl.predict_queries

    def counting(engine, supports, queries, classes, progress=None):
        ran.extend(q.name for q in queries)
        return real(engine, supports, queries, classes, progress=progress)

    monkeypatch.setattr(pl, "predict_queries", counting)
    pl.pseudo_label_folder(images, labels, out, cfg, show_progress=False)
    assert sorted(ran) == ["chaos_03", "chaos_05"]
    mtime = (out / "labels" / "chaos_03.nii.gz").stat().st_mtime_ns

    # stopped before its last case: that case's outputs are incomplete (the summary goes in last)
    (out / "summaries" / "chaos_05.json").unlink()
    ran.clear()
    with caplog.at_level("INFO", logger="ssl_medsam2"):
        summaries = pl.pseudo_label_folder(images, labels, out, cfg, show_progress=False)
    assert ran == ["chaos_05"] and len(summaries) == 2
    assert (out / "labels" / "chaos_03.nii.gz").stat().st_mtime_ns == mtime
    said = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
    assert said and "skipped: chaos_03" in said[0] and "same engine, settings and supports" in said[0]
    assert json.loads((out / "run.json").read_text())["skipped"] == ["chaos_03"]

    # other settings: nothing is skipped
    ran.clear()
    pl.pseudo_label_folder(images, labels, out, load_config(overrides=ATLAS + ["protocol.threshold=0.6"]),
                           show_progress=False)
    assert sorted(ran) == ["chaos_03", "chaos_05"]
