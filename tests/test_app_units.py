"""The app's pieces without a server: upload checks (OHIF raw, Slicer NRRD, NIfTI) on real CHAOS volumes,
model-version promotion and rollback, debounced continuous retraining, --conf overrides, make-studies."""

from __future__ import annotations

import sys
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "apps" / "ssl_medsam2"))
from lib.retrain import RetrainScheduler  # noqa: E402
from lib.trainers import should_promote  # noqa: E402
from lib.uploads import prepare_label  # noqa: E402
from lib.workspace import ModelRegistry, project_config  # noqa: E402

from ssl_medsam2.io import InputError  # noqa: E402
from ssl_medsam2.studies import make_studies  # noqa: E402


@pytest.fixture(scope="module")
def case(small_chaos):
    return small_chaos / "imagesTr" / "chaos_02_0000.nii.gz", small_chaos / "labelsTr" / "chaos_02.nii.gz"


def _saved(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine, img.get_data_dtype()


def test_label_uploads_ohif_raw_slicer_nrrd_and_nifti(case, tmp_path):
    import SimpleITK as sitk

    image, label = case
    ref = np.asarray(nib.load(str(label)).dataobj).astype(np.uint8)
    aff = nib.load(str(image)).affine
    # NIfTI (REST / Slicer)
    arr, a, dt = _saved(prepare_label(str(image), str(label), "l.nii.gz"))
    assert np.array_equal(arr, ref) and np.allclose(a, aff) and dt == np.uint8
    # OHIF: raw uint8 bytes, Fortran order (x fastest)
    raw = tmp_path / "label.bin"
    raw.write_bytes(ref.tobytes(order="F"))
    arr, a, _ = _saved(prepare_label(str(image), str(raw), "label.bin"))
    assert np.array_equal(arr, ref) and np.allclose(a, aff)
    # Slicer: NRRD written by SimpleITK from the label (same physical geometry)
    nrrd = tmp_path / "label.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(label)), str(nrrd))
    arr, a, _ = _saved(prepare_label(str(image), str(nrrd), "label.nrrd"))
    assert np.array_equal(arr, ref) and np.allclose(a, aff)
    # NRRD with a moved origin is refused with the reason
    moved = sitk.ReadImage(str(label))
    moved.SetOrigin(tuple(o + 5 for o in moved.GetOrigin()))
    sitk.WriteImage(moved, str(nrrd))
    with pytest.raises(InputError, match="origin"):
        prepare_label(str(image), str(nrrd), "label.nrrd")
    # a label with a class id that is not an integer
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(ref.astype(np.float32) * 0.5, aff), str(bad))
    with pytest.raises(InputError, match="non-integer"):
        prepare_label(str(image), str(bad), "bad.nii.gz")


def test_registry_promotion_and_rollback(tmp_path):
    reg = ModelRegistry(tmp_path)
    assert reg.current() is None and reg.current_model_dir() is None
    v1, v2, v3 = reg.next_id(), reg.next_id(), reg.next_id()
    assert (v1, v2, v3) == ("v001", "v002", "v003")
    for v in (v1, v2, v3):
        (tmp_path / v / "model").mkdir()
    reg.add({"id": v1, "model_dir": str(tmp_path / v1 / "model"), "dice": 0.80}, promote=should_promote(0.80, None, 0.0))
    assert reg.current()["id"] == v1
    assert should_promote(0.78, 0.80, 0.0) is False  # Dice dropped: keep v1
    reg.add({"id": v2, "model_dir": str(tmp_path / v2 / "model"), "dice": 0.78}, promote=should_promote(0.78, 0.80, 0.0))
    assert reg.current()["id"] == v1
    assert should_promote(0.80, 0.80, 0.0) is True and should_promote(0.79, 0.80, 0.02) is True
    reg.add({"id": v3, "model_dir": str(tmp_path / v3 / "model"), "dice": 0.85}, promote=should_promote(0.85, 0.80, 0.0))
    assert reg.current_model_dir() == str(tmp_path / v3 / "model")
    assert reg.set_current()["current"] == v1  # rollback: the previously deployed version
    assert reg.set_current(v2, why="manual")["current"] == v2
    with pytest.raises(KeyError, match="v009"):
        reg.set_current("v009")
    assert [v["promoted"] for v in reg.state()["versions"]] == [True, False, True]


def test_retraining_is_debounced_and_counts_labels(tmp_path):
    started = []
    sched = RetrainScheduler(tmp_path / "retrain.json", after_labels=2, debounce_s=0.6,
                             start=lambda: started.append(time.time()))
    assert sched.label_saved("a")["retrain_scheduled_at"] is None
    assert sched.label_saved("a")["retrain_pending"] == 1  # the same image twice counts once
    t0 = time.time()
    assert sched.label_saved("b")["retrain_scheduled_at"] is not None
    time.sleep(0.3)
    sched.label_saved("c")  # pushes the run back
    time.sleep(0.45)
    assert started == []  # 0.75 s after the 2nd label but only 0.45 s after the 3rd
    time.sleep(0.5)
    assert len(started) == 1 and started[0] - t0 >= 0.85
    st = sched.state()
    assert st["pending"] == [] and st["runs"][-1]["labels"] == ["a", "b", "c"]
    off = RetrainScheduler(tmp_path / "off.json", after_labels=0, debounce_s=0, start=lambda: started.append(0))
    assert off.label_saved("x") == {"retrain": "off"}
    assert threading.active_count() < 50


def test_conf_overrides_any_project_key_and_rejects_typos():
    cfg = project_config({"sam2.checkpoint": "/w/MedSAM2.pt", "nnunet.epochs": "2", "app.lease_hours": "0.5",
                          "models": "all"})  # plain keys belong to MONAI Label
    assert cfg["sam2"]["checkpoint"] == "/w/MedSAM2.pt" and cfg["nnunet"]["epochs"] == 2
    assert cfg["app"]["lease_hours"] == 0.5
    with pytest.raises(KeyError, match="app.lease_hour"):
        project_config({"app.lease_hour": "2"})


def test_make_studies_from_nnunet_layout(small_chaos, tmp_path):
    res = make_studies(small_chaos / "imagesTr", small_chaos / "labelsTr", tmp_path / "s", labelled=2)
    assert res["labelled"] == ["chaos_01", "chaos_02"] and len(res["images"]) == 8
    assert (tmp_path / "s" / "chaos_05.nii.gz").exists()
    assert sorted(p.name for p in (tmp_path / "s" / "labels" / "final").iterdir()) == \
        ["chaos_01.nii.gz", "chaos_02.nii.gz"]
    with pytest.raises(InputError, match="already holds"):
        make_studies(small_chaos / "imagesTr", small_chaos / "labelsTr", tmp_path / "s", labelled=1)


def test_app_without_sam2_weights_lists_task_unavailable_with_reason(small_chaos, tmp_path):
    from main import create_app

    make_studies(small_chaos / "imagesTr", small_chaos / "labelsTr", tmp_path / "studies", labelled=1)
    missing = tmp_path / "nowhere" / "MedSAM2_latest.pt"
    app = create_app(str(REPO / "apps" / "ssl_medsam2"), str(tmp_path / "studies"),
                     {"sam2.checkpoint": str(missing)})
    info = app.info()
    assert "sam2_fewshot" not in info["models"]
    assert str(missing) in info["unavailable_models"]["sam2_fewshot"]
    from lib.guards import public

    # complete reasons in the server's own terms, and what a client's 503 keeps of them
    sam2 = info["unavailable_models"]["sam2_fewshot"]
    assert "--conf sam2.checkpoint" in sam2 and "atlas_fewshot" in sam2 and "--checkpoint PATH" not in sam2
    assert "'MedSAM2_latest.pt' is not at the path sam2.checkpoint names (MedSAM2_latest.pt" in public(sam2)
    assert any(str(missing) in w for w in info["ssl_medsam2"]["startup_warnings"])  # said at start
    nnunet = info["unavailable_models"]["nnunet"]
    assert "train one with POST /train/ssl_nnunet" in public(nnunet)
    # after a training the quality gate refused, the reason says so (read anew, not frozen at start)
    warning = "QUALITY GATE: round 1 NOT deployed: held-out gate Dice 0.41 < round 0's 0.80"
    app.workspace.registry.add({"id": "v001", "model_dir": None, "round": 0,
                                "quality_gate": {"deployed_round": 0, "warning": warning}}, promote=False)
    nnunet = public(app.info()["unavailable_models"]["nnunet"])
    assert "the last training (v001, round 0) was not promoted: " + warning in nnunet
    assert nnunet.endswith("train again after more labels (POST /train/ssl_nnunet)")
    assert "atlas_fewshot" in info["models"] and "ssl_nnunet" in info["trainers"]  # the rest works
    assert info["datastore"] == {"total": 8, "completed": 1, "label_tags": {"final": 1}}
    assert (tmp_path / "studies" / ".ssl_medsam2").is_dir()


def test_guards_names_params_and_public_reasons():
    from fastapi import HTTPException
    from lib.guards import check_name, parse_params, public

    for ok in ("chaos_03", "1.2.826.0.1.3680043.2", "case-7.v2"):
        assert check_name(ok, "image id") == ok
    for bad in ("../x", "..", "a/b", "/etc/x", ".hidden", "-x", "", "a\\b", "x..y", None, 3):
        with pytest.raises(HTTPException) as err:
            check_name(bad, "image id")
        assert err.value.status_code == 422
    assert parse_params('{"a": 1}') == {"a": 1} and parse_params("") == {}
    for bad in ("null", "[]", "123", '"x"', "{"):
        with pytest.raises(HTTPException):
            parse_params(bad)
    assert public("/tmp/x/ssl_medsam2_upload_1.nii.gz: unreadable") == "ssl_medsam2_upload_1.nii.gz: unreadable"
    assert public("see http://127.0.0.1:8000/datastore/image") == "see http://127.0.0.1:8000/datastore/image"
    assert public("run POST /train/ssl_nnunet now") == "run POST /train/ssl_nnunet now"  # a route, not a file
    assert public("at /tmp/train/x.pt and /train/ssl_nnunet") == "at x.pt and /train/ssl_nnunet"


def test_lease_book_one_image_per_holder_and_anonymous_limit(tmp_path):
    from ssl_medsam2.leases import LeaseBook, LeaseLimitError

    book = LeaseBook(tmp_path / "leases.json", ttl_s=60)
    assert book.acquire_first(["a", "b", "c"], "x", anonymous=True, anonymous_limit=2, now=0).image == "a"
    assert book.acquire_first(["b", "c"], "x", anonymous=True, anonymous_limit=2, now=1).image == "b"
    assert set(book.active(now=2)) == {"b"}  # asking again moved x's lease
    assert book.acquire_first(["a", "c"], "y", anonymous=True, anonymous_limit=2, now=2).image == "a"
    with pytest.raises(LeaseLimitError, match="limit 2"):
        book.acquire_first(["c"], "z", anonymous=True, anonymous_limit=2, now=3)
    assert book.acquire_first(["c"], "token-user", now=3).image == "c"  # identified users are not capped
    assert book.acquire_first(["c"], "z", anonymous=True, anonymous_limit=2, now=100).image == "c"  # expired


def test_datastore_file_atomic_with_last_good_copy_and_recovery(small_chaos, tmp_path):
    import json

    import monailabel_085 as fixes
    from main import create_app

    studies = tmp_path / "studies"
    make_studies(small_chaos / "imagesTr", small_chaos / "labelsTr", studies, labelled=1)
    app = create_app(str(REPO / "apps" / "ssl_medsam2"), str(studies), {})
    app.datastore().update_image_info("chaos_02", {"marker": 42})
    good = studies / ".datastore_v2.json.last_good"
    assert json.loads(good.read_text()) == json.loads((studies / "datastore_v2.json").read_text())
    (studies / "datastore_v2.json").write_text('{"name": "new-dataset", "objects": {"chaos_0')  # torn
    app = create_app(str(REPO / "apps" / "ssl_medsam2"), str(studies), {})
    assert "restored the last good copy" in app.info()["ssl_medsam2"]["datastore_recovery"]
    assert app.datastore().get_image_info("chaos_02")["marker"] == 42
    # no good copy either: start from the files on disk, and say so
    (studies / "datastore_v2.json").write_text("")
    good.unlink()
    msg = fixes.recover_datastore_file(studies)
    assert "no good copy" in msg and not (studies / "datastore_v2.json").exists()
    assert len(list(studies.glob("datastore_v2.json.damaged-*"))) >= 1


def test_uploads_naming_another_file_are_refused(case, tmp_path):
    """A detached NRRD header or a MetaImage with an ElementDataFile path would make SimpleITK read a
    server file (its bytes then shown in the label-set message): refused from the header, naming no path."""
    import SimpleITK as sitk
    from lib.uploads import check_image, declared_shape

    image, label = case
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"ABCD" * 1000)
    nrrd = tmp_path / "label.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(label)), str(nrrd))
    size = sitk.ReadImage(str(label)).GetSize()
    for field in ("data file", "datafile", "DATA FILE"):
        evil = tmp_path / "evil.nrrd"
        evil.write_bytes(f"NRRD0004\ntype: unsigned char\ndimension: 3\nsizes: {size[0]} {size[1]} {size[2]}\n"
                         f"encoding: raw\n{field}: {secret}\n".encode())
        with pytest.raises(InputError, match="separate data file") as err:
            prepare_label(str(image), str(evil), "evil.nrrd")
        assert str(secret) not in str(err.value) and "65" not in str(err.value)
    mhd = tmp_path / "evil.mhd"
    mhd.write_bytes(f"ObjectType = Image\nNDims = 3\nDimSize = 10 10 10\nElementType = MET_UCHAR\n"
                    f"ElementDataFile = {secret}\n".encode())
    for name in ("evil.mhd", "evil.mha", "evil.nrrd"):
        with pytest.raises(InputError, match="separate data file"):
            declared_shape(str(mhd), name)
        with pytest.raises(InputError, match="separate data file"):
            check_image(str(mhd), name)
    with pytest.raises(InputError, match="unsupported image format"):
        declared_shape(str(secret), "x.spr")
    # self-contained files still pass: NRRD (also under another name) and MetaImage with LOCAL data
    mha = tmp_path / "label.mha"
    sitk.WriteImage(sitk.ReadImage(str(label)), str(mha))
    assert declared_shape(str(nrrd), "label.nrrd") == declared_shape(str(mha), "label.mha") == size
    assert _saved(prepare_label(str(image), str(mha), "label.mha"))[2] == np.uint8


def test_datastore_sees_writes_from_another_process(small_chaos, tmp_path):
    """The datastore file is replaced by a rename: the server's watcher must reload on that "moved"
    event (child processes, e.g. scoring, write scores this way), every time, and keep them."""
    import json

    import monailabel_085 as fixes

    studies = tmp_path / "studies"
    make_studies(small_chaos / "imagesTr", small_chaos / "labelsTr", studies, labelled=1)
    exts = ["*.nii.gz", "*.nii"]
    server = fixes.local_datastore(str(studies), extensions=exts, auto_reload=True)
    try:
        for n in range(2):  # twice: the server's own write in between must not stop the next reload
            server.update_image_info("chaos_02", {f"own_{n}": n})
            child = fixes.local_datastore(str(studies), extensions=exts, auto_reload=False)
            child.update_image_info("chaos_03", {f"score_{n}": n})
            deadline = time.time() + 10
            while server.get_image_info("chaos_03").get(f"score_{n}") != n and time.time() < deadline:
                time.sleep(0.05)
            assert server.get_image_info("chaos_03").get(f"score_{n}") == n
        server.update_image_info("chaos_02", {"own_2": 2})
        saved = json.loads((studies / "datastore_v2.json").read_text())["objects"]
        assert saved["chaos_03"]["image"]["info"]["score_1"] == 1 and saved["chaos_02"]["image"]["info"]["own_0"] == 0
    finally:
        server._observer.stop()


def test_unnamed_anonymous_callers_are_one_holder_per_address(tmp_path):
    """Auth off and no client_id: the holder is the client's address, so its skips move its own lease
    (a holder per request made one client collect leases until the anonymous cap refused everyone);
    named clients keep their name; a name with control characters is refused."""
    from fastapi import HTTPException
    from lib.guards import identity
    from ssl_medsam2.leases import LeaseBook

    first, second = identity({}, None, False, "10.0.0.7"), identity({"client_id": None}, None, False, "10.0.0.7")
    assert first == second == ("anonymous@10.0.0.7", True)
    assert identity({}, None, False, "10.0.0.8")[0] != first[0]
    assert identity({"client_id": "anon-0"}, None, False, "10.0.0.7") == ("anon-0", True)
    with pytest.raises(HTTPException):
        identity({"client_id": "x\n"}, None, False)
    book = LeaseBook(tmp_path / "leases.json", ttl_s=60)
    got = [book.acquire_first(["a", "b", "c"], first[0], anonymous=True, anonymous_limit=1).image for _ in range(4)]
    assert all(x != y for x, y in zip(got, got[1:])) and len(book.active()) == 1  # each ask is a skip, never refused


def test_damaged_gzip_upload_is_an_input_error(case, tmp_path):
    """Flipped bytes inside the gzip stream, or trailing garbage, raised zlib.error (a 500)."""
    from lib.uploads import check_declared_size

    image, label = case
    data = label.read_bytes()
    flipped = bytearray(data)
    for i in range(len(data) // 2, len(data) // 2 + 64):
        flipped[i] ^= 0xFF
    for name, blob in (("flipped.nii.gz", bytes(flipped)), ("trailing.nii.gz", data + b"\x1f\x8b" + b"junk" * 64)):
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(InputError, match="damaged gzip data"):
            check_declared_size(str(path), name, 10 ** 9)
    assert check_declared_size(str(label), "label.nii.gz", 10 ** 9) == nib.load(str(label)).shape


def test_cluster_batch_removes_its_work_folder_when_the_run_fails(case, tmp_path, monkeypatch):
    """The Ray batch's work folder (image links/copies, outputs) was removed only on success."""
    from types import SimpleNamespace

    import lib.cluster_batch as cb

    image, label = case

    def fail(*args, **kwargs):
        raise RuntimeError("cluster gone")

    monkeypatch.setattr(cb, "pseudo_label_folder", fail)
    ws = SimpleNamespace(state_dir=tmp_path / "state", cfg=project_config({}), pseudo_tag="pseudo",
                         final_labelled=lambda: {"chaos_01": (str(image), str(label))})
    datastore = SimpleNamespace(get_image_uri=lambda i: str(image))
    with pytest.raises(RuntimeError, match="cluster gone"):
        cb.batch_fewshot_on_cluster(ws, "atlas", {"images": ["chaos_02"]}, datastore)
    assert (tmp_path / "state" / "batch").is_dir() and not any((tmp_path / "state" / "batch").iterdir())


def test_a_study_missing_from_the_cached_list_is_looked_up_afresh():
    """A PACS datastore's series list is cached (MONAI Label: 2 h): a study sent after it was read must
    be found when a request names it, and an unknown one still is not."""
    from lib.workspace import Workspace

    class Pacs:
        def __init__(self):
            self.cached, self.live, self.refreshed = ["old"], ["old", "new"], 0

        def list_images(self):
            return self.cached

        def refresh_image_list(self):
            self.cached, self.refreshed = list(self.live), self.refreshed + 1

    ws = type("W", (), {"datastore": Pacs(), "has_image": Workspace.has_image})()
    assert ws.has_image("old") and ws.datastore.refreshed == 0  # a hit asks nothing
    assert ws.has_image("new") and ws.datastore.refreshed == 1
    assert not ws.has_image("ghost") and ws.datastore.refreshed == 2
    local = type("Local", (), {"list_images": lambda self: ["a"]})()  # a folder: its list is never stale
    assert not type("W", (), {"datastore": local, "has_image": Workspace.has_image})().has_image("b")


def test_a_queued_input_error_comes_back_as_the_request_s_problem_without_server_paths(tmp_path):
    """A pseudo label the queue could not compute because of the request (e.g. a broken image) is a 4xx
    with the problem; any other failure stays a server error."""
    from lib.pseudo_ahead import PseudoAhead
    from ssl_medsam2.pseudo_store import PseudoQueue

    def compute(image_id):
        if image_id == "broken":
            raise InputError(tmp_path / "studies" / "broken.nii.gz", "not a NIfTI image")
        raise OSError("disk full")

    ahead = object.__new__(PseudoAhead)  # only the queue and the store are needed to answer
    ahead.store = type("EmptyStore", (), {"record": staticmethod(lambda engine, image_id: None)})()
    ahead.queue = PseudoQueue(tmp_path / "queue.json", compute, lambda: [], poll_s=0.02).start()
    task = type("Task", (), {"engine_name": "atlas"})()
    try:
        with pytest.raises(InputError) as err:
            ahead.answer(task, "broken")
        assert str(err.value) == "not a NIfTI image" and str(tmp_path) not in str(err.value)
        with pytest.raises(RuntimeError, match="could not be computed: OSError: disk full"):
            ahead.answer(task, "other")
    finally:
        ahead.queue.stop(timeout=5)


def test_a_corrections_base_is_trusted_only_where_a_person_or_the_quality_gate_vouches(tmp_path):
    """base_label: a final label is trusted for every organ; a pseudo label for the organs its quality record
    passed (the stored result, a batch label's info, the few-shot output's summary); anything else, or a
    label info a client edited into nonsense, for none."""
    import json
    from types import SimpleNamespace

    from lib.interactive import base_label

    files = {n: tmp_path / f"{n}.nii.gz" for n in ("final", "stored", "tagged", "few")}
    for p in files.values():
        p.write_bytes(b"x")
    uris, infos, stored = {}, {}, {}
    few_dir = tmp_path / "fewshot"
    ds = SimpleNamespace(get_label_uri=lambda i, tag: uris.get((i, tag)),
                         get_label_info=lambda i, tag: infos.get((i, tag)))
    ws = SimpleNamespace(datastore=ds, pseudo_tag="pseudo", fewshot_dir=few_dir,
                         stored_pseudo_label=lambda i: stored.get(i))
    assert base_label(ws, "img") == (None, frozenset()) and base_label(ws, None).path is None
    (few_dir / "labels").mkdir(parents=True)
    (few_dir / "summaries").mkdir()
    (few_dir / "labels" / "img.nii.gz").write_bytes(b"x")
    quality = {"per_class": {"liver": {"class_id": 1, "score": 0.5, "entropy": 0.1, "volume_ratio": 1.0},
                             "spleen": {"class_id": 4, "score": 0.01, "entropy": 0.6, "volume_ratio": 1.0}},
               "reasons": ["spleen: score 0.010 < 0.08"], "bars": {"min_score": 0.08}}
    (few_dir / "summaries" / "img.json").write_text(json.dumps({"quality": quality}))
    assert base_label(ws, "img").trusted == {1}
    uris[("img", "pseudo")] = str(files["tagged"])
    infos[("img", "pseudo")] = {"source": "ssl_nnunet", "round": 2}  # nnU-Net rounds: no per-organ quality
    assert base_label(ws, "img") == (str(files["tagged"]), frozenset())
    infos[("img", "pseudo")] = {"passed_classes": "1,2,3"}  # edited through /datastore/label/info
    assert base_label(ws, "img").trusted == frozenset()
    infos[("img", "pseudo")] = {"passed_classes": [2, 3]}
    assert base_label(ws, "img").trusted == {2, 3}
    stored["img"] = {"path": str(files["stored"]), "current": False, "passed_classes": [1]}
    assert base_label(ws, "img").path == str(files["tagged"]), "a stale stored result is not the base"
    stored["img"]["current"] = True
    assert base_label(ws, "img") == (str(files["stored"]), frozenset({1}))
    uris[("img", "final")] = str(files["final"])
    got = base_label(ws, "img")
    assert got.path == str(files["final"]) and got.trusted_ids([1, 2, 3, 4]) == {1, 2, 3, 4}
