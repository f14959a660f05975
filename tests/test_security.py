"""The server as an attacker and a careless client would use it (issue 9), replayed against real servers.

Two real MONAI Label servers with the real app on 127.0.0.1, on real CHAOS MRI (5 cases at 64x64 in-plane,
10 slices; chaos_01 and chaos_02 with final labels): one with Keycloak-style auth on (the local token
issuer of ``test_auth.py``; annotators ``annotator`` and ``bob``, an ``admin``), one with auth off.
Every refused request must get a 4xx whose reason names no server path and must change nothing: the
studies folder, a sibling folder and the folder above are checksummed around the attacks, the
server's temp folder and the app's scratch folder must be empty afterwards, and the server's peak
memory must not grow by a gzip bomb. No inference or training runs here (refusals come first).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from conftest import NO_QUEUE, downsample_case, load_script
from test_auth import ROLES, Issuer

CASES = ["chaos_01", "chaos_02", "chaos_03", "chaos_05", "chaos_08"]
LABELLED = CASES[:2]
BOB_ROLES = ROLES["annotator"]
BODIES: list[str] = []  # every 4xx body seen, checked for server paths at the end


def _build(chaos_dir: Path, root: Path) -> Path:
    studies = root / "studies"
    for case in CASES:
        img = chaos_dir / "imagesTr" / f"{case}_0000.nii.gz"
        z = nib.load(str(img)).shape[2]
        dst = (studies / "labels" / "final" if case in LABELLED else root / "truth") / f"{case}.nii.gz"
        downsample_case(img, chaos_dir / "labelsTr" / f"{case}.nii.gz", studies / f"{case}.nii.gz", dst,
                        factor=4, z_range=((z - 10) // 2, (z - 10) // 2 + 10))
    (root / "outside").mkdir()
    (root / "outside" / "canary.txt").write_text("must never change")
    (root / "tmp").mkdir()
    return studies


def _start(studies: Path, work: Path, root: Path, conf: dict, env: dict | None = None):
    conf = {"app.retrain_after_labels": 0, "app.max_upload_mb": 4, **NO_QUEUE, **conf}
    return load_script("pacs_demo").start_monailabel(str(studies), work, conf=conf,
                                                     env={"TMPDIR": str(root / "tmp"), **(env or {})})


@pytest.fixture(scope="module")
def srv(chaos_dir, tmp_path_factory):
    """Auth on: the attacks run with real tokens (annotator role is enough for uploads and saves)."""
    root = tmp_path_factory.mktemp("security")
    studies = _build(chaos_dir, root)
    issuer = Issuer()
    server = None
    try:
        server = _start(studies, root / "work", root, {},
                        env={"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": issuer.realm})
        tok = {u: issuer.token(u) for u in ("annotator", "admin", "viewer")}
        tok["bob"] = issuer.token("bob", roles=BOB_ROLES)
        yield {"url": server.url, "studies": studies, "root": root, "server": server, "tok": tok,
               "state": root / "work" / "state", "truth": root / "truth"}
    finally:
        if server is not None:
            server.stop()
        issuer.close()


def _h(srv, who: str) -> dict:
    return {"Authorization": f"Bearer {srv['tok'][who]}"}


def _digest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not any(s in p.parts for s in skip)}


def _snapshot(srv) -> dict:
    root = srv["root"]
    return {"studies": _digest(srv["studies"]), "outside": _digest(root / "outside"),
            "top": sorted(p.name for p in root.iterdir()), "tmp": sorted(p.name for p in (root / "tmp").iterdir()),
            "scratch": sorted(p.name for p in (srv["state"] / "scratch").glob("*"))}


def _refused(r: httpx.Response, code: int, *words: str) -> str:
    BODIES.append(r.text)
    assert r.status_code == code, f"expected {code}, got {r.status_code}: {r.text[:300]}"
    detail = r.json().get("detail", "")
    for w in words:
        assert w in str(detail), f"reason should mention {w!r}: {detail}"
    return str(detail)


def _nifti(path: Path, shape=(16, 16, 4), affine=None, dtype=np.float32, fill=None) -> bytes:
    data = np.random.default_rng(0).random(shape).astype(dtype) if fill is None else fill
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path.read_bytes()


def test_path_traversal_and_label_overwrite_are_refused(srv, tmp_path):
    """Issue 9, cases 1-2: ids are names, never paths, on every upload/delete route (Slicer's too)."""
    url, root = srv["url"], srv["root"]
    h = _h(srv, "annotator")
    blob = _nifti(tmp_path / "x.nii.gz")
    before = _snapshot(srv)
    attempts = ["../x", "..%2fx", str(root / "outside" / "x"), "labels/final/chaos_01", "/etc/x", ".hidden", ""]
    for image in attempts[:-1]:
        for route in ("/datastore/image", "/datastore/"):
            r = httpx.put(f"{url}{route}", params={"image": image}, files={"file": ("x.nii.gz", blob)},
                          headers=h, timeout=60)
            _refused(r, 422, "plain name")
    # percent-encoded traversal exactly as sent by the attacker (the server decodes it to ../x)
    r = httpx.put(f"{url}/datastore/image?image=%2e%2e%2fx", files={"file": ("x.nii.gz", blob)}, headers=h, timeout=60)
    _refused(r, 422, "plain name")
    for image in ("../x", "%2e%2e%2fx", str(root / "studies" / "chaos_03")):
        r = httpx.delete(f"{url}/datastore/image", params={"id": image}, headers=_h(srv, "admin"), timeout=60)
        assert r.status_code in (404, 422), r.text
        BODIES.append(r.text)
    for sid in ("..", "...", "../../work"):  # session ids are joined to the session folder, then rmtree'd
        quoted = sid.replace(".", "%2e").replace("/", "%2f")  # sent encoded: clients normalise a literal ..
        r = httpx.delete(f"{url}/session/{quoted}", headers=h, timeout=60)
        assert r.status_code in (404, 405, 422), r.text
        assert r.status_code == 422 or "/" in sid, r.text
        BODIES.append(r.text)
        r = httpx.post(f"{url}/infer/atlas_fewshot", params={"session_id": sid}, headers=h, timeout=60)
        _refused(r, 422, "session id")
    assert (root / "work" / "state").is_dir()
    assert _snapshot(srv) == before, "a refused request wrote, replaced or deleted a file"
    assert not (root / "x.nii.gz").exists() and not (root / "outside" / "x.nii.gz").exists()


def test_reupload_needs_overwrite_and_then_rechecks_labels(srv, tmp_path):
    """Issue 9, case 2: an existing (labelled) image is replaced only on request; labels that no longer
    fit the new grid are removed, labels that fit are kept with their info."""
    url, studies = srv["url"], srv["studies"]
    h = _h(srv, "annotator")
    ref = nib.load(str(studies / "chaos_02.nii.gz"))
    same = (studies / "chaos_02.nii.gz").read_bytes()
    r = httpx.put(f"{url}/datastore/image", params={"image": "chaos_02"}, files={"file": ("c.nii.gz", same)},
                  headers=h, timeout=60)
    assert r.status_code == 200 and r.json().get("unchanged") is True, r.text  # identical: a no-op
    other = _nifti(tmp_path / "big.nii.gz", shape=ref.shape[:2] + (ref.shape[2] + 3,), affine=ref.affine)
    before = _snapshot(srv)
    for route in ("/datastore/image", "/datastore/"):  # REST and Slicer's route
        r = httpx.put(f"{url}{route}", params={"image": "chaos_02"}, files={"file": ("c.nii.gz", other)},
                      headers=h, timeout=60)
        _refused(r, 409, "overwrite=true")
    assert _snapshot(srv) == before
    # same grid, new intensities: the label still fits and is kept, with who saved it
    lab_before = (studies / "labels" / "final" / "chaos_01.nii.gz").read_bytes()
    ref1 = nib.load(str(studies / "chaos_01.nii.gz"))
    regrid = _nifti(tmp_path / "same_grid.nii.gz", shape=ref1.shape, affine=ref1.affine)
    r = httpx.put(f"{url}/datastore/image", params={"image": "chaos_01", "overwrite": "true"},
                  files={"file": ("c.nii.gz", regrid)}, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["labels_kept"] == ["final"] and r.json()["labels_removed"] == []
    assert (studies / "labels" / "final" / "chaos_01.nii.gz").read_bytes() == lab_before
    # another grid: the label would lie on a mismatched grid, so it goes
    r = httpx.put(f"{url}/datastore/image", params={"image": "chaos_02", "overwrite": "true"},
                  files={"file": ("c.nii.gz", other)}, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["labels_removed"] == ["final"], r.json()
    assert not (studies / "labels" / "final" / "chaos_02.nii.gz").exists()
    stats = httpx.get(f"{url}/datastore/?output=all", headers=h, timeout=30).json()
    assert "final" not in stats["objects"]["chaos_02"]["labels"] and "final" in stats["objects"]["chaos_01"]["labels"]
    assert nib.load(str(studies / "chaos_02.nii.gz")).shape == ref.shape[:2] + (ref.shape[2] + 3,)


def test_infer_params_cannot_redirect_the_task(srv):
    """Issue 9, case 3 (and case 6's result_dtype): refused before anything is computed or stored."""
    url = srv["url"]
    h = _h(srv, "viewer")
    before = _snapshot(srv)
    bad = [({"image": "/etc/hostname", "image_id": "chaos_05"}, "image, image_id"),
           ({"image": str(srv["studies"] / "chaos_05.nii.gz")}, "image"),
           ({"save_label": True, "label_tag": "../../x"}, "label_tag, save_label"),
           ({"result_dtype": "xyz"}, "result_dtype"),
           ({"result_extension": ".exe"}, "result_extension")]
    for params, words in bad:
        r = httpx.post(f"{url}/infer/atlas_fewshot", params={"image": "chaos_03", "output": "image"},
                       data={"params": json.dumps(params)}, headers=h, timeout=60)
        _refused(r, 422, words)
    for image in ("/etc/hostname", "../chaos_03", str(srv["studies"] / "chaos_03.nii.gz")):
        r = httpx.post(f"{url}/infer/atlas_fewshot", params={"image": image}, headers=h, timeout=60)
        assert r.status_code in (404, 422), r.text
        BODIES.append(r.text)
    assert not (srv["state"] / "fewshot").exists(), "a refused infer computed something"
    assert _snapshot(srv) == before


def test_non_object_params_unknown_ids_and_wrong_password_are_4xx(srv, tmp_path):
    """Issue 9, case 6: JSON that is not an object, unknown ids, a wrong password: 4xx, never 500."""
    url, truth = srv["url"], srv["truth"]
    h = _h(srv, "annotator")
    label = (truth / "chaos_03.nii.gz").read_bytes()
    img = (srv["studies"] / "chaos_03.nii.gz").read_bytes()
    before = _snapshot(srv)
    for params in ("null", "[]", "123", '"x"', "{bad json"):
        r = httpx.put(f"{url}/datastore/label", params={"image": "chaos_03", "tag": "final"},
                      files={"label": ("l.nii.gz", label)}, data={"params": params}, headers=h, timeout=60)
        _refused(r, 422, "params")
        r = httpx.post(f"{url}/infer/atlas_fewshot", params={"image": "chaos_03"}, data={"params": params},
                       headers=h, timeout=60)
        _refused(r, 422, "params")
        r = httpx.put(f"{url}/datastore/image", params={"image": "new_case"}, files={"file": ("n.nii.gz", img)},
                      data={"params": params}, headers=h, timeout=60)
        _refused(r, 422, "params")
        r = httpx.put(f"{url}/datastore/image/info", params={"image": "chaos_03"}, data={"info": params}, headers=h)
        _refused(r, 422, "info")
    assert _snapshot(srv)["studies"] == before["studies"]
    _refused(httpx.put(f"{url}/datastore/image/info", params={"image": "ghost"}, data={"info": "{}"}, headers=h),
             404, "ghost")
    r = httpx.put(f"{url}/datastore/image/info", params={"image": "chaos_03"},
                  data={"info": json.dumps({"note": "ok", "user": "admin"})}, headers=h)
    assert r.status_code == 200, r.text
    info = httpx.get(f"{url}/datastore/image/info", params={"image": "chaos_03"}, headers=h).json()
    assert info["note"] == "ok" and info["user"] == "annotator"  # the token's user, not the body's
    _refused(httpx.get(f"{url}/datastore/image/info", params={"image": "ghost"}, headers=h), 404, "ghost")
    _refused(httpx.get(f"{url}/datastore/label/info", params={"label": "ghost", "tag": "final"}, headers=h), 404,
             "ghost")
    _refused(httpx.get(f"{url}/datastore/label/info", params={"label": "chaos_05", "tag": "final"}, headers=h), 404,
             "no label")
    r = httpx.post(f"{url}/auth/token", data={"username": "annotator", "password": "wrong"})
    _refused(r, 401, "invalid user name or password")
    r = httpx.post(f"{url}/auth/token", data={"username": "annotator", "password": "annotator-pw"})
    assert r.status_code == 200 and r.json()["access_token"]


def test_label_values_outside_the_label_set_are_named(srv, tmp_path):
    url, studies = srv["url"], srv["studies"]
    ref = nib.load(str(studies / "chaos_03.nii.gz"))
    arr = np.zeros(ref.shape, np.uint8)
    arr[2:5, 2:5, 1], arr[8, 8, 2] = 7, 255
    arr[10, 10, 3] = 1
    before = _snapshot(srv)
    r = httpx.put(f"{url}/datastore/label", params={"image": "chaos_03", "tag": "final"},
                  files={"label": ("l.nii.gz", _nifti(tmp_path / "l.nii.gz", fill=arr, affine=ref.affine))},
                  headers=_h(srv, "annotator"), timeout=60)
    _refused(r, 422, "[7, 255]", "label set")
    # OHIF's raw label.bin goes through the same check
    r = httpx.put(f"{url}/datastore/label", params={"image": "chaos_03"},
                  files={"label": ("label.bin", arr.tobytes(order="F"))}, headers=_h(srv, "annotator"), timeout=60)
    _refused(r, 422, "[7, 255]")
    assert _snapshot(srv) == before


def _blank_label(studies: Path, image: str, tmp: Path) -> bytes:
    """A valid liver-only label on the image's current grid (images may have been replaced above)."""
    ref = nib.load(str(studies / f"{image}.nii.gz"))
    arr = np.zeros(ref.shape, np.uint8)
    arr[ref.shape[0] // 4: ref.shape[0] // 2, ref.shape[1] // 4: ref.shape[1] // 2, :] = 1
    return _nifti(tmp / f"{image}_label.nii.gz", fill=arr, affine=ref.affine)


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def test_uploads_leave_no_temp_files_and_bombs_stay_small(srv, tmp_path):
    """Issue 9, case 6: rejected uploads leave nothing behind; a gzip bomb is not inflated."""
    url = srv["url"]
    h = _h(srv, "annotator")
    ref = nib.load(str(srv["studies"] / "chaos_03.nii.gz"))
    body = gzip.decompress(_nifti(tmp_path / "small.nii.gz", shape=ref.shape, affine=ref.affine))
    bomb = tmp_path / "bomb.nii.gz"  # a valid small NIfTI followed by 1 GiB of zeros: ~1 MB on the wire
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        fh.write(body)
        zeros = bytes(1 << 24)
        for _ in range(64):
            fh.write(zeros)
    huge = nib.Nifti1Header()  # a header declaring 2048^3 voxels
    huge.set_data_shape((2048, 2048, 2048))
    huge.set_data_dtype(np.float32)
    huge_file = tmp_path / "huge.nii.gz"
    with gzip.open(huge_file, "wb") as fh:
        fh.write(huge.binaryblock + b"\0" * 4 + bytes(1 << 16))
    before = _snapshot(srv)
    pid = srv["server"].process.pid
    hwm0 = _hwm_mb(pid)
    _refused(httpx.put(f"{url}/datastore/image", params={"image": "bomb"},
                       files={"file": ("bomb.nii.gz", bomb.read_bytes())}, headers=h, timeout=120),
             422, "more than", "declares")
    _refused(httpx.put(f"{url}/datastore/image", params={"image": "huge"},
                       files={"file": ("huge.nii.gz", huge_file.read_bytes())}, headers=h, timeout=120),
             422, "max_upload_voxels")
    _refused(httpx.put(f"{url}/datastore/label", params={"image": "chaos_03"},
                       files={"label": ("bomb.nii.gz", bomb.read_bytes())}, headers=h, timeout=120),
             422, "more than")
    hwm1 = _hwm_mb(pid)
    assert hwm1 - hwm0 < 150, f"server peak memory grew by {hwm1 - hwm0:.0f} MB on a gzip bomb"
    # a 5 MB blob over the 4 MB limit (app.max_upload_mb), a corrupt image, a corrupt label
    blob = np.random.default_rng(1).bytes(5 << 20)
    _refused(httpx.put(f"{url}/datastore/image", params={"image": "blob"}, files={"file": ("blob.nii.gz", blob)},
                       headers=h, timeout=120), 413, "max_upload_mb")
    _refused(httpx.put(f"{url}/datastore/image", params={"image": "junk"},
                       files={"file": ("junk.nii.gz", b"\x1f\x8b junk" * 1000)}, headers=h, timeout=60), 422)
    _refused(httpx.put(f"{url}/datastore/label", params={"image": "chaos_03"},
                       files={"label": ("l.nii.gz", b"junk" * 1000)}, headers=h, timeout=60), 422)
    after = _snapshot(srv)
    assert after == before, "a rejected upload left a file (temp folder, scratch folder or datastore)"
    assert after["tmp"] == [] or set(after["tmp"]) == set(before["tmp"])


def test_uploads_naming_a_server_file_or_damaged_are_refused(srv, tmp_path):
    """A detached NRRD header / MetaImage naming a server file would be read by SimpleITK (its bytes
    then shown as class ids); damaged gzip data raised zlib.error (500). All 422, nothing changed."""
    url, studies = srv["url"], srv["studies"]
    h = _h(srv, "annotator")
    shape = nib.load(str(studies / "chaos_03.nii.gz")).shape
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"ABCD" * (int(np.prod(shape)) // 4 + 1))
    nrrd = (f"NRRD0004\ntype: unsigned char\ndimension: 3\nsizes: {shape[0]} {shape[1]} {shape[2]}\n"
            f"encoding: raw\ndata file: {secret}\n").encode()
    mhd = (f"ObjectType = Image\nNDims = 3\nDimSize = {shape[0]} {shape[1]} {shape[2]}\nElementType = MET_UCHAR\n"
           f"ElementDataFile = {secret}\n").encode()
    good = (studies / "chaos_03.nii.gz").read_bytes()
    flipped = bytearray(good)
    for i in range(len(good) // 2, len(good) // 2 + 64):
        flipped[i] ^= 0xFF
    before = _snapshot(srv)
    for name, blob, why in (("evil.nrrd", nrrd, "separate data file"), ("evil.mhd", mhd, "separate data file"),
                            ("evil.mha", mhd, "separate data file"), ("l.nii.gz", bytes(flipped), "damaged gzip")):
        detail = _refused(httpx.put(f"{url}/datastore/label", params={"image": "chaos_03"},
                                    files={"label": (name, blob)}, headers=h, timeout=60), 422, why)
        assert "65" not in detail and "secret" not in detail, detail
    for name, blob, why in (("evil.nrrd", nrrd, "separate data file"), ("x.nii.gz", bytes(flipped), "damaged gzip"),
                            ("y.nii.gz", good + b"\x1f\x8b" + b"junk" * 64, "damaged gzip")):
        _refused(httpx.put(f"{url}/datastore/image", params={"image": "evil"}, files={"file": (name, blob)},
                           headers=h, timeout=60), 422, why)
    assert _snapshot(srv) == before


def test_image_replaced_only_by_the_same_file_type(srv, tmp_path):
    """A .nii over a stored .nii.gz left both files (the old one back after a delete); a .nrrd raised
    InputError outside any handler (500). Both 422, nothing changed."""
    import SimpleITK as sitk

    url, studies = srv["url"], srv["studies"]
    h = _h(srv, "annotator")
    ref = nib.load(str(studies / "chaos_03.nii.gz"))
    plain = tmp_path / "c.nii"
    _nifti(plain, shape=ref.shape, affine=ref.affine)
    nrrd = tmp_path / "c.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(plain)), str(nrrd))
    before = _snapshot(srv)
    for f in (plain, nrrd):
        for route in ("/datastore/image", "/datastore/"):
            _refused(httpx.put(f"{url}{route}", params={"image": "chaos_03", "overwrite": "true"},
                               files={"file": (f.name, f.read_bytes())}, headers=h, timeout=60), 422, "stored as .nii.gz")
    assert _snapshot(srv) == before


def test_label_info_updates_on_both_routes(srv):
    """The deprecated /datastore/updatelabelinfo reads the form field ``params`` (as upstream and MONAI
    Label Reviewer do); /datastore/label/info reads ``info``. Both record the token's user."""
    url = srv["url"]
    h = _h(srv, "annotator")
    for route, field, value in (("/datastore/updatelabelinfo", "params", "approved"),
                                ("/datastore/label/info", "info", "flagged")):
        r = httpx.put(f"{url}{route}", params={"label": "chaos_01", "tag": "final"},
                      data={field: json.dumps({"review": value, "user": "admin"})}, headers=h, timeout=60)
        assert r.status_code == 200, r.text
        info = httpx.get(f"{url}/datastore/label/info", params={"label": "chaos_01", "tag": "final"},
                         headers=h, timeout=30).json()
        assert info["review"] == value and info["user"] == "annotator", info


def test_infer_uploads_have_the_upload_limits(srv, tmp_path):
    """/infer/{model} with an uploaded image or label: the same size and gzip-bomb limits as every upload."""
    url = srv["url"]
    h = _h(srv, "annotator")
    ref = nib.load(str(srv["studies"] / "chaos_03.nii.gz"))
    body = gzip.decompress(_nifti(tmp_path / "small.nii.gz", shape=ref.shape, affine=ref.affine))
    bomb = tmp_path / "bomb.nii.gz"  # a valid small NIfTI followed by 256 MiB of zeros
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        fh.write(body)
        for _ in range(16):
            fh.write(bytes(1 << 24))
    blob = np.random.default_rng(1).bytes(5 << 20)
    before = _snapshot(srv)
    for field in ("file", "label"):
        files = {field: ("bomb.nii.gz", bomb.read_bytes())}
        if field == "label":
            files["file"] = ("small.nii.gz", (tmp_path / "small.nii.gz").read_bytes())
        _refused(httpx.post(f"{url}/infer/atlas_fewshot", files=files, headers=h, timeout=120), 422, "more than")
        _refused(httpx.post(f"{url}/infer/atlas_fewshot", files={field: ("blob.nii.gz", blob)}, params={"image": "chaos_03"},
                            headers=h, timeout=120), 413, "max_upload_mb")
    after = _snapshot(srv)
    assert after == before and (after["tmp"] == [] or set(after["tmp"]) == set(before["tmp"]))


def test_identity_comes_from_the_token_and_leases_end_only_as_allowed(srv, tmp_path):
    """Issue 9, case 4: who saved, who holds a lease, and who may end it, come from the token."""
    url, studies = srv["url"], srv["studies"]
    a, b = _h(srv, "annotator"), _h(srv, "bob")

    def ask(h, body):
        r = httpx.post(f"{url}/activelearning/first", json=body, headers=h, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["id"]

    img_a = ask(a, {"client_id": "bob"})  # a body name is ignored: the lease is the token's user's
    leases = httpx.get(f"{url}/ssl_medsam2/leases", headers=a).json()
    assert leases[img_a]["holder"] == "annotator" and leases[img_a]["anonymous"] is False
    expires = leases[img_a]["expires"]
    img_b = ask(b, {"client_id": "annotator"})  # claiming to be the annotator renews nothing of hers
    assert img_b != img_a
    leases = httpx.get(f"{url}/ssl_medsam2/leases", headers=a).json()
    assert leases[img_a]["holder"] == "annotator" and leases[img_a]["expires"] == expires
    assert leases[img_b]["holder"] == "bob"
    # bob saves a pseudo label on her image, and tries to give back her lease: both leave it held
    lab = _blank_label(studies, img_a, tmp_path)
    r = httpx.put(f"{url}/datastore/label", params={"image": img_a, "tag": "pseudo"},
                  files={"label": ("l.nii.gz", lab)}, data={"params": json.dumps({"user": "admin"})}, headers=b)
    assert r.status_code == 200 and r.json()["user"] == "bob" and r.json()["lease_released"] is False, r.text
    info = httpx.get(f"{url}/datastore/label/info", params={"label": img_a, "tag": "pseudo"}, headers=a).json()
    assert info["user"] == "bob", "the saved label records the token's user, not the body's"
    _refused(httpx.delete(f"{url}/ssl_medsam2/leases/{img_a}", headers=b), 404, "bob")
    _refused(httpx.delete(f"{url}/ssl_medsam2/leases/{img_a}", params={"client_id": "annotator"}, headers=b), 404)
    assert httpx.get(f"{url}/ssl_medsam2/leases", headers=a).json()[img_a]["holder"] == "annotator"
    # she gives back her own; bob's ends with a final save of his image (by anyone: it is labelled now)
    assert httpx.delete(f"{url}/ssl_medsam2/leases/{img_a}", headers=a).status_code == 200
    r = httpx.put(f"{url}/datastore/label", params={"image": img_b, "tag": "final"},
                  files={"label": ("l.nii.gz", _blank_label(studies, img_b, tmp_path))}, headers=a)
    assert r.status_code == 200 and r.json()["lease_released"] is True and r.json()["user"] == "annotator", r.text
    assert httpx.get(f"{url}/ssl_medsam2/leases", headers=a).json() == {}


# ------------------------------------------------------------------ issue 17: MONAI Label's own routes
def _tar(members) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, kind, data in members:
            ti = tarfile.TarInfo(name)
            if kind == "link":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_session_archives_are_never_unpacked(srv, tmp_path):
    """Issue 17, case 1: a tar with absolute, ``..`` and link members wrote outside (viewer token, 200)."""
    import io
    import zipfile

    url, root = srv["url"], srv["root"]
    target = root / "outside" / "written.txt"
    tars = [_tar([(str(target), "file", b"x")]), _tar([("../../../outside/written.txt", "file", b"x")]),
            _tar([("link", "link", str(root / "outside")), ("link/written.txt", "file", b"x")])]
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("../../outside/written.txt", b"x")
    before = _snapshot(srv)
    for name, blob in [("a.tar", t) for t in tars] + [("a.zip", zbuf.getvalue())]:
        r = httpx.put(f"{url}/session/", params={"uncompress": "true"}, files={"files": (name, blob)},
                      headers=_h(srv, "viewer"), timeout=60)
        _refused(r, 422, "archives are not unpacked")
        r = httpx.put(f"{url}/session/", files={"files": (name, blob)}, headers=_h(srv, "viewer"), timeout=60)
        _refused(r, 422, "unsupported file type")
    assert not target.exists() and not list(root.rglob("written.txt"))
    assert _snapshot(srv) == before


def test_session_uploads_have_the_upload_limits(srv, tmp_path):
    """Issue 17, case 4: a 325 KB gzip declaring 700^3 voxels was a session (+2.6 GB RSS to infer on it)."""
    url = srv["url"]
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((700, 700, 700))
    hdr.set_data_dtype(np.uint8)
    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4)
        zeros = b"\0" * (1 << 20)
        for _ in range(300):
            fh.write(zeros)
    before = _snapshot(srv)
    _refused(httpx.put(f"{url}/session/", files={"files": ("bomb.nii.gz", bomb.read_bytes())},
                       headers=_h(srv, "viewer"), timeout=120), 422, "max_upload_voxels")
    big = b"\0" * (5 << 20)  # over app.max_upload_mb (4) while it is received
    _refused(httpx.put(f"{url}/session/", files={"files": ("big.nii.gz", big)}, headers=_h(srv, "viewer"),
                       timeout=120), 413, "max_upload_mb")
    assert _snapshot(srv) == before


def test_infer_reads_only_datastore_images_and_sessions(srv):
    """Issue 17, case 2: ``image=/any/file&session_id=nosuch`` segmented a file outside the studies, and
    the answer told whether a path exists."""
    url, root = srv["url"], srv["root"]
    h = _h(srv, "viewer")
    answers = []
    for path in (str(root / "studies" / "chaos_03.nii.gz"), "/no/such/file.nii.gz"):
        r = httpx.post(f"{url}/infer/atlas_fewshot", params={"image": path, "session_id": "nosuch"}, headers=h,
                       timeout=60)
        answers.append(_refused(r, 404, "unknown session"))
    assert answers[0] == answers[1], "the answer must not tell whether a server path exists"
    img = (srv["studies"] / "chaos_03.nii.gz").read_bytes()
    sid = httpx.put(f"{url}/session/", files={"files": ("s.nii.gz", img)}, headers=h, timeout=60).json()["session_id"]
    for path in (str(root / "studies" / "chaos_03.nii.gz"), "/no/such/file.nii.gz"):
        r = httpx.post(f"{url}/infer/atlas_fewshot", params={"image": path, "session_id": sid}, headers=h, timeout=60)
        _refused(r, 422, "plain name")
    info = httpx.get(f"{url}/session/{sid}", headers=h).json()
    assert "path" not in info and str(root) not in json.dumps(info), info
    assert httpx.delete(f"{url}/session/{sid}", headers=h).status_code == 200


def _wait_listed(srv, image: str, present: bool) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        r = httpx.get(f"{srv['url']}/datastore/image/info", params={"image": image}, headers=_h(srv, "admin"))
        if (r.status_code != 404) == present:  # a listed link out of the studies folder answers 409
            return
        time.sleep(0.5)
    raise AssertionError(f"the datastore did not {'list' if present else 'drop'} {image}")


def test_links_out_of_the_studies_folder_are_not_followed(srv, tmp_path):
    """Issue 17, case 3: DELETE /datastore/image deleted a link's target (a whole folder for a folder
    link); saving a label, replacing an image and a linked tag folder wrote through the link."""
    url, root, studies = srv["url"], srv["root"], srv["studies"]
    victims = root / "victims"
    (victims / "tagdir").mkdir(parents=True)
    (victims / "scan.nii.gz").write_bytes((studies / "chaos_03.nii.gz").read_bytes())
    (victims / "label.nii.gz").write_bytes((srv["truth"] / "chaos_05.nii.gz").read_bytes())
    wanted = _digest(victims)
    link_img = studies / "linked.nii.gz"
    link_tag = studies / "labels" / "linktag"
    link_lab = studies / "labels" / "final" / "chaos_05.nii.gz"
    link_img.symlink_to(victims / "scan.nii.gz")
    link_tag.symlink_to(victims / "tagdir", target_is_directory=True)
    link_lab.symlink_to(victims / "label.nii.gz")
    adm, ann = _h(srv, "admin"), _h(srv, "annotator")
    lab = (srv["truth"] / "chaos_05.nii.gz").read_bytes()
    try:
        _wait_listed(srv, "linked", True)
        for route, params in (("/datastore/image", {"image": "linked"}), ("/datastore/image/info", {"image": "linked"})):
            _refused(httpx.get(f"{url}{route}", params=params, headers=ann), 409, "leaves the studies")
        _refused(httpx.post(f"{url}/infer/atlas_fewshot", params={"image": "linked"}, headers=ann), 409, "leaves")
        _refused(httpx.delete(f"{url}/datastore/image", params={"id": "linked"}, headers=adm), 409, "leaves the studies")
        _refused(httpx.put(f"{url}/datastore/image", params={"image": "linked", "overwrite": "true"},
                           files={"file": ("x.nii.gz", (studies / "chaos_08.nii.gz").read_bytes())}, headers=ann,
                           timeout=60), 409, "leaves the studies")
        _refused(httpx.put(f"{url}/datastore/label", params={"image": "chaos_03", "tag": "linktag"},
                           files={"label": ("l.nii.gz", _blank_label(studies, "chaos_03", tmp_path))}, headers=ann,
                           timeout=60), 409, "leaves the studies")
        _refused(httpx.put(f"{url}/datastore/label", params={"image": "chaos_05", "tag": "final"},
                           files={"label": ("l.nii.gz", lab)}, headers=ann, timeout=60), 409, "leaves the studies")
        r = httpx.delete(f"{url}/datastore/label", params={"id": "chaos_05", "tag": "final"}, headers=adm)
        assert r.status_code in (404, 409), r.text
        BODIES.append(r.text)
        assert _digest(victims) == wanted and (victims / "tagdir").is_dir() and not list((victims / "tagdir").iterdir())
    finally:
        for link in (link_img, link_tag, link_lab):
            link.unlink()
        _wait_listed(srv, "linked", False)


def test_model_files_are_not_uploaded_or_deleted_over_http(srv):
    """Issue 17, case 6: an annotator got 500 on PUT /model/nnunet (the upload kept) and 404 on DELETE."""
    url = srv["url"]
    before = _snapshot(srv)
    for who, code in (("annotator", 403), ("admin", 405)):
        r = httpx.put(f"{url}/model/nnunet", files={"file": ("m.pt", b"\0" * 4096)}, headers=_h(srv, who), timeout=60)
        assert r.status_code == code, r.text
        r = httpx.delete(f"{url}/model/nnunet", headers=_h(srv, who), timeout=60)
        assert r.status_code == code, r.text
    assert "training runs" in r.json()["detail"] or "ssl_nnunet" in r.json()["detail"]
    assert _snapshot(srv) == before


def test_names_with_control_characters_are_refused(srv, tmp_path):
    """Issue 17, case 7: ``image=x%0A`` created ``x\\n.nii.gz``; tag ``x%0A`` a folder with a newline."""
    url, studies = srv["url"], srv["studies"]
    h = _h(srv, "annotator")
    before = _snapshot(srv)
    _refused(httpx.put(f"{url}/datastore/image?image=x%0A", files={"file": ("x.nii.gz", _nifti(tmp_path / "x.nii.gz"))},
                       headers=h, timeout=60), 422, "plain name")
    _refused(httpx.put(f"{url}/datastore/label?image=chaos_03&tag=x%0A",
                       files={"label": ("l.nii.gz", _blank_label(studies, "chaos_03", tmp_path))}, headers=h,
                       timeout=60), 422, "plain name")
    assert _snapshot(srv) == before
    assert not [p for p in studies.rglob("*") if "\n" in p.name]


def test_float_labels_only_when_their_values_are_exact_ids(srv, tmp_path):
    """Issue 17, case 8: 65537.0 was stored as class 1 and 1e30 as 0 (200)."""
    url, studies = srv["url"], srv["studies"]
    ref = nib.load(str(studies / "chaos_03.nii.gz"))
    before = _snapshot(srv)
    for value in (65537.0, 1e30, 1.5):
        fill = np.zeros(ref.shape, np.float32)
        fill[0, 0, 0] = value
        blob = _nifti(tmp_path / "f.nii.gz", shape=ref.shape, affine=ref.affine, fill=fill)
        _refused(httpx.put(f"{url}/datastore/label", params={"image": "chaos_03", "tag": "floaty"},
                           files={"label": ("f.nii.gz", blob)}, headers=_h(srv, "annotator"), timeout=60), 422, "class id"
                 if value != 1.5 else "non-integer")
    assert _snapshot(srv) == before
    fill = np.zeros(ref.shape, np.float32)
    fill[0, 0, 0] = 1.0  # a float volume of exact ids is a label
    blob = _nifti(tmp_path / "f.nii.gz", shape=ref.shape, affine=ref.affine, fill=fill)
    r = httpx.put(f"{url}/datastore/label", params={"image": "chaos_03", "tag": "floaty"},
                  files={"label": ("f.nii.gz", blob)}, headers=_h(srv, "annotator"), timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.delete(f"{url}/datastore/label", params={"id": "chaos_03", "tag": "floaty"},
                        headers=_h(srv, "admin")).status_code == 200


def test_bad_input_is_a_4xx_naming_the_problem(srv, tmp_path):
    """Issue 17, cases 9-11: each of these was a 500 or a reset connection, or a task that failed later."""
    url = srv["url"]
    v, adm = _h(srv, "viewer"), _h(srv, "admin")
    before = _snapshot(srv)

    def infer(params: str, **files):
        return httpx.post(f"{url}/infer/atlas_fewshot", params={"image": "chaos_03"}, data={"params": params},
                          files=files or None, headers=v, timeout=60)

    _refused(infer("[" * 5000 + "]" * 5000), 422, "nested deeper")
    _refused(infer('{"top_k": ' + "9" * 5000 + "}"), 422, "params")
    for bad in ('"abc"', "NaN", "Infinity", "1e400", "[1]", "-1", "true"):
        _refused(infer('{"top_k": %s}' % bad), 422)
    _refused(infer('{"result_extension": ".mhd"}'), 422, "result_extension")
    _refused(infer('{"nosuch": 1}'), 422, "nosuch")
    _refused(infer("{}", label=("label.bin", b"\1" * 7)), 422, "raw label")
    _refused(httpx.post(f"{url}/activelearning/random", json={"seed": [1]}, headers=_h(srv, "annotator")), 422, "seed")
    _refused(httpx.post(f"{url}/scoring/uncertainty", json={"method": "x"}, headers=adm), 422, "method")
    for body, key in (({"epochs": -1}, "epochs"), ({"configuration": "../../x"}, "configuration"),
                      ({"num_workers": -5}, "num_workers"), ({"model": "nosuch"}, "model"), ({"nosuch": 1}, "nosuch")):
        for sync in ("true", "false"):
            _refused(httpx.post(f"{url}/train/ssl_nnunet", params={"run_sync": sync}, json=body, headers=adm,
                                timeout=60), 422, key)
    r = httpx.get(f"{url}/ohif/x%00")
    assert r.status_code == 404, r.text
    _refused(httpx.get(f"{url}/proxy/dicom/qido/studies", headers=v), 404, "local folder")
    # an RGB24 image upload
    rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    _refused(httpx.put(f"{url}/datastore/image", params={"image": "rgb"}, files={"file": ("rgb.nii.gz", path.read_bytes())},
                       headers=_h(srv, "annotator"), timeout=60), 422)
    # case 11: removing a label that does not exist
    _refused(httpx.delete(f"{url}/datastore/label", params={"id": "chaos_03", "tag": "nosuch"}, headers=adm), 404, "nosuch")
    _refused(httpx.delete(f"{url}/datastore/label", params={"id": "ghost", "tag": "final"}, headers=adm), 404, "ghost")
    assert _snapshot(srv) == before


def test_nrrd_images_are_refused_and_every_strategy_answers(srv, tmp_path):
    """Issue 17, case 12: after an NRRD image upload, diversity answered 500 for everyone while random
    handed out an image that labels and infer refused."""
    import SimpleITK as sitk

    url, studies = srv["url"], srv["studies"]
    nrrd = tmp_path / "scan.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(studies / "chaos_08.nii.gz")), str(nrrd))
    _refused(httpx.put(f"{url}/datastore/image", params={"image": "scan_nrrd"}, files={"file": ("scan.nrrd", nrrd.read_bytes())},
                       headers=_h(srv, "annotator"), timeout=60), 422, "NIfTI")
    for strategy in ("diversity", "random"):
        r = httpx.post(f"{url}/activelearning/{strategy}", json={}, headers=_h(srv, "annotator"), timeout=120)
        assert r.status_code == 200, r.text
        assert "path" not in r.json(), "a sample names no server path"
    httpx.delete(f"{url}/ssl_medsam2/leases/{r.json()['id']}", headers=_h(srv, "annotator"))


def test_dataset_export_leaves_no_temp_file(srv):
    """Issue 17, case 5: every GET /datastore/dataset left a zip of the whole dataset in the temp folder."""
    url, root = srv["url"], srv["root"]
    before = sorted(p.name for p in (root / "tmp").iterdir())
    for _ in range(3):
        r = httpx.get(f"{url}/datastore/dataset", headers=_h(srv, "annotator"), timeout=120)
        assert r.status_code == 200 and r.content[:2] == b"PK", r.text[:200]
    time.sleep(1)
    assert sorted(p.name for p in (root / "tmp").iterdir()) == before
    _refused(httpx.get(f"{url}/datastore/dataset", params={"limit_cases": 0}, headers=_h(srv, "annotator")), 422)


def test_datastore_file_is_never_seen_torn(srv):
    """Issue 9, case 5: a reader hammering datastore_v2.json during saves only ever sees valid JSON."""
    url, studies, truth = srv["url"], srv["studies"], srv["truth"]
    path = studies / "datastore_v2.json"
    stop, seen, bad = threading.Event(), [0], []

    def reader():
        deadline = time.time() + 300
        while not stop.is_set() and time.time() < deadline:
            text = path.read_text()
            try:
                assert "objects" in json.loads(text)
            except (ValueError, AssertionError):
                bad.append(text[:80])
            seen[0] += 1

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    lab = (truth / "chaos_05.nii.gz").read_bytes()
    try:
        for i in range(20):
            r = httpx.put(f"{url}/datastore/label", params={"image": "chaos_05", "tag": f"rev{i % 3}"},
                          files={"label": ("l.nii.gz", lab)}, headers=_h(srv, "annotator"), timeout=60)
            assert r.status_code == 200, r.text
    finally:
        stop.set()
        t.join(30)
    assert seen[0] > 100 and not bad, f"{len(bad)} of {seen[0]} reads saw a torn file: {bad[:3]}"
    good = studies / ".datastore_v2.json.last_good"
    assert json.loads(good.read_text()) == json.loads(path.read_text())


def test_no_refusal_names_a_server_path(srv):
    assert BODIES, "no refusals collected"
    secrets = [str(srv["root"]), "/tmp/", str(Path.home()), "site-packages", "/work/"]
    for body in BODIES:
        assert not any(s in body for s in secrets), f"a 4xx body names a server path: {body[:300]}"


# ------------------------------------------------------------------------------------- auth off
@pytest.fixture(scope="module")
def open_srv(chaos_dir, tmp_path_factory):
    """Auth off, at most 2 anonymous leases; stopped once to damage its datastore file."""
    root = tmp_path_factory.mktemp("security_open")
    studies = _build(chaos_dir, root)
    server = _start(studies, root / "work", root, {"app.anonymous_leases": 2})
    holder = {"server": server}
    try:
        yield {"url": server.url, "studies": studies, "root": root, "holder": holder, "truth": root / "truth"}
    finally:
        holder["server"].stop()


def test_anonymous_clients_cannot_lock_every_image(open_srv):
    """Issue 9, case 4: without auth, self-declared clients together hold at most app.anonymous_leases."""
    url = open_srv["url"]
    got = []
    for i in range(3):
        r = httpx.post(f"{url}/activelearning/first", json={"client_id": f"anon-{i}"}, timeout=60)
        got.append(r)
    assert [r.status_code for r in got] == [200, 200, 429], [r.text for r in got]
    _refused(got[2], 429, "anonymous_leases")
    leases = httpx.get(f"{url}/ssl_medsam2/leases").json()
    assert len(leases) == 2 and all(v["anonymous"] for v in leases.values())
    # asking again moves a client's lease instead of adding one (one image at a time)
    again = httpx.post(f"{url}/activelearning/random", json={"client_id": "anon-0", "seed": 3}).json()["id"]
    held = [k for k, v in httpx.get(f"{url}/ssl_medsam2/leases").json().items() if v["holder"] == "anon-0"]
    assert held == [again]


def test_damaged_datastore_starts_from_the_last_good_copy(open_srv):
    """Issue 9, case 5: kill -9 during saves leaves a valid datastore file; a file emptied anyway (as
    upstream's in-place rewrite would leave it) is replaced by the last good copy at start, and said so."""
    url, studies, truth = open_srv["url"], open_srv["studies"], open_srv["truth"]
    r = httpx.put(f"{url}/datastore/label", params={"image": "chaos_03", "tag": "final"},
                  files={"label": ("l.nii.gz", (truth / "chaos_03.nii.gz").read_bytes())},
                  data={"params": json.dumps({"user": "alice"})}, timeout=60)
    assert r.status_code == 200, r.text
    # kill -9 while saves are in flight: the file on disk is still a whole, valid datastore
    server = open_srv["holder"]["server"]
    lab = (truth / "chaos_05.nii.gz").read_bytes()
    saved, errors = [0], []

    def save_forever():
        for i in range(200):
            try:
                httpx.put(f"{url}/datastore/label", params={"image": "chaos_05", "tag": f"rev{i % 3}"},
                          files={"label": ("l.nii.gz", lab)}, timeout=30)
                saved[0] += 1
            except httpx.HTTPError as exc:  # the server is gone
                errors.append(type(exc).__name__)
                return

    t = threading.Thread(target=save_forever, daemon=True)
    t.start()
    deadline = time.time() + 120
    while saved[0] < 5 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(server.process.pid, signal.SIGKILL)
    t.join(60)
    server.process.wait(30)
    server.stop()
    assert saved[0] >= 5 and errors, (saved, errors)
    from monailabel.datastore.local import LocalDatastoreModel

    LocalDatastoreModel.model_validate_json((studies / "datastore_v2.json").read_text())
    (studies / "datastore_v2.json").write_text("")  # what upstream's truncate-then-write leaves on a crash
    # what a killed server leaves (issue 17, case 5): request scratch folders, atomic-write temp files
    stale = [open_srv["root"] / "work" / "state" / "scratch" / "req_killed" / "upload.nii.gz",
             studies / ".datastore_v2.json.k1ll3d.json", studies / "..datastore_v2.json.last_good.k1ll3d.json.last_good"]
    for f in stale:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"left behind")
    server = _start(studies, open_srv["root"] / "work", open_srv["root"], {"app.anonymous_leases": 2})
    assert not any(f.exists() for f in stale) and not stale[0].parent.exists(), "stale files survived a restart"
    assert (studies / ".datastore_v2.json.last_good").exists()
    open_srv["holder"]["server"] = server
    info = httpx.get(f"{server.url}/info/", timeout=30).json()
    msg = info["ssl_medsam2"]["datastore_recovery"]
    assert msg and "restored the last good copy" in msg, msg
    assert "DATASTORE RECOVERY" in server.log_path.read_text(errors="replace")
    label = httpx.get(f"{server.url}/datastore/label/info", params={"label": "chaos_03", "tag": "final"}).json()
    assert label["user"] == "alice", "the label's info came back from the last good copy"
    assert list(studies.glob("datastore_v2.json.damaged-*")), "the damaged file is kept for inspection"
    assert info["datastore"]["completed"] == len(LABELLED) + 1
