"""NIfTI -> DICOM keeps geometry, and a local Orthanc (started here) serves the cases over DICOMweb."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ssl_medsam2 import dicom, dicom_seg, pacs
from ssl_medsam2.io import InputError, load_volume


def _roundtrip(src, tmp_path):
    files = dicom.nifti_to_dicom_series(src, tmp_path / "dcm")
    back = dicom.dicom_series_to_nifti(tmp_path / "dcm", tmp_path / "back.nii.gz")
    return files, back


def test_roundtrip_ras_ct_keeps_affine_and_hu_exactly(totalseg_dir, tmp_path):
    src = totalseg_dir / "imagesTr" / "ct_sm_0000.nii.gz"
    files, back = _roundtrip(src, tmp_path)
    a, b = nib.load(str(src)), nib.load(str(back))
    assert len(files) == a.shape[2]
    # positive-determinant grid: SimpleITK sorts slices in the file's own k order -> same affine
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and float(ds.RescaleSlope) == 1.0
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([3.0, 3.0])
    assert float(ds.SliceThickness) == pytest.approx(3.0)


def test_roundtrip_las_mri_keeps_every_voxel_in_place(chaos_dir, tmp_path):
    src = chaos_dir / "imagesTr" / "chaos_01_0000.nii.gz"
    files, back = _roundtrip(src, tmp_path)
    va, vb = load_volume(src), load_volume(back)
    # same grid in the patient: canonical affine and voxels identical
    np.testing.assert_allclose(vb.affine, va.affine, atol=1e-3)
    np.testing.assert_array_equal(vb.array, va.array)
    # LAS has a negative determinant: DICOM readers order slices along row x column, so the file's
    # k axis comes back reversed (same voxels, same world positions)
    a, b = nib.load(str(src)), nib.load(str(back))
    flipped = a.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, a.shape[2] - 1], [0, 0, 0, 1]])
    np.testing.assert_allclose(b.affine, flipped, atol=1e-3)
    ds0, ds1 = pydicom.dcmread(files[0]), pydicom.dcmread(files[1])
    assert ds0.Modality == "MR" and ds0.Rows == 256 and ds0.Columns == 256
    step = np.array(ds1.ImagePositionPatient, float) - np.array(ds0.ImagePositionPatient, float)
    assert np.linalg.norm(step) == pytest.approx(7.7, abs=1e-3)
    assert ds0.StudyInstanceUID != ds0.SeriesInstanceUID
    # UIDs depend on the case only: converting again gives the same instances (PACS dedup)
    again = dicom.nifti_to_dicom_series(src, tmp_path / "dcm2")
    assert pydicom.dcmread(again[0]).SOPInstanceUID == ds0.SOPInstanceUID


def test_non_integer_intensities_use_rescale_within_half_a_step(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(100, 30, size=(16, 12, 5)).astype(np.float32)
    aff = np.array([[0, 0, 2.5, -10], [-0.8, 0, 0, 20], [0, 0.9, 0, 5], [0, 0, 0, 1]], float)  # oblique-free, permuted
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "x.nii.gz"))
    files, back = _roundtrip(tmp_path / "x.nii.gz", tmp_path)
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    va, vb = load_volume(tmp_path / "x.nii.gz"), load_volume(back)
    np.testing.assert_allclose(vb.affine, va.affine, atol=1e-3)
    assert np.abs(vb.array - va.array).max() <= slope * 0.51 + 1e-3


def test_bad_input_is_named_and_leaves_nothing(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="bad.nii.gz"):
        dicom.nifti_to_dicom_series(tmp_path / "bad.nii.gz", tmp_path / "out")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), str(tmp_path / "v4d.nii.gz"))
    with pytest.raises(InputError, match="3D"):
        dicom.nifti_to_dicom_series(tmp_path / "v4d.nii.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_series_into_a_missing_parent_is_built_beside_it(tmp_path, monkeypatch):
    """The temp folder lies beside out_dir even when its parent does not exist yet (os.replace across
    filesystems fails with EXDEV otherwise)."""
    nib.save(nib.Nifti1Image(np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3), np.eye(4)),
             str(tmp_path / "x.nii.gz"))
    made = []
    real = dicom.tempfile.mkdtemp
    monkeypatch.setattr(dicom.tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])
    out = tmp_path / "new" / "deeper" / "dcm"
    files = dicom.nifti_to_dicom_series(tmp_path / "x.nii.gz", out)
    assert [Path(m).parent for m in made] == [out.parent] and len(files) == 3 and all(f.exists() for f in files)


def test_series_to_nifti_writes_atomically(tmp_path, monkeypatch):
    nib.save(nib.Nifti1Image(np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3), np.eye(4)),
             str(tmp_path / "x.nii.gz"))
    dicom.nifti_to_dicom_series(tmp_path / "x.nii.gz", tmp_path / "dcm")
    written = []
    real = dicom.atomic_write
    monkeypatch.setattr(dicom, "atomic_write", lambda path, w: written.append(path) or real(path, w))
    back = dicom.dicom_series_to_nifti(tmp_path / "dcm", tmp_path / "back" / "x.nii.gz")
    assert written == [back]
    src = nib.load(str(tmp_path / "x.nii.gz"))
    assert np.array_equal(np.asarray(nib.load(str(back)).dataobj), np.asarray(src.dataobj))
    assert not [p for p in back.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("bad, problem", [(np.float32("nan"), "NaN"), (1.5, "non-integer"), (-1, "negative")])
def test_dicom_seg_refuses_bad_label_values_naming_the_file(tmp_path, bad, problem):
    if dicom_seg.dcmqi_tool() is None:
        pytest.skip("dcmqi not installed (pip install dcmqi)")
    lab = np.zeros((4, 4, 3), np.float32)
    lab[1, 1, 1] = 1
    lab[2, 2, 2] = bad
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    with pytest.raises(InputError, match=f"lab.nii.gz.*{problem}"):
        dicom_seg.label_to_dicom_seg(tmp_path / "lab.nii.gz", tmp_path, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_segment_names_map_to_class_ids_strictly_on_save_and_leniently_on_read():
    """A save must name the app's classes; a label the PACS already holds (a seed SEG with more organs, or
    named 'liver' where the app knows only class id 1) is read for the classes the app segments."""
    segments = {1: "Liver", 2: "class_2", 3: "left kidney"}
    names = {1: "liver", 3: "left_kidney"}
    assert dicom_seg.segment_label_ids(segments, names, {0, 1, 2, 3}) == {1: 1, 2: 2, 3: 3}
    assert dicom_seg.segment_label_ids({1: "Background", 2: "liver"}, names, {0, 1}) == {1: 0, 2: 1}  # OHIF's
    with pytest.raises(InputError, match="2 'class_2', 3 'left kidney'"):
        dicom_seg.segment_label_ids(segments, names, {0, 1})
    assert dicom_seg.segment_label_ids(segments, names, {0, 1}, reading=True) == {1: 1, 2: 0, 3: 0}
    assert dicom_seg.segment_label_ids(segments, {}, {0, 1}, reading=True) == {1: 1, 2: 0, 3: 0}  # by number
    with pytest.raises(InputError):
        dicom_seg.segment_label_ids({5: "heart"}, names, {0, 1}, reading=True)  # nothing left


def test_dicom_seg_failure_leaves_no_file(tmp_path):
    if dicom_seg.dcmqi_tool() is None:
        pytest.skip("dcmqi not installed (pip install dcmqi)")
    lab = np.zeros((4, 4, 3), np.uint8)
    lab[1, 1, 1] = 1
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    (tmp_path / "empty_series").mkdir()
    with pytest.raises(InputError, match="itkimage2segimage failed"):
        dicom_seg.label_to_dicom_seg(tmp_path / "lab.nii.gz", tmp_path / "empty_series", tmp_path / "out" / "seg.dcm")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if pacs.orthanc_binary() is None:
        pytest.skip("Orthanc not installed (Debian packages: orthanc orthanc-dicomweb)")
    server = pacs.Orthanc.start(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


def test_orthanc_dicomweb_lists_uploaded_cases_and_labels(orthanc, chaos_dir, tmp_path):
    if dicom_seg.dcmqi_tool() is None:
        pytest.skip("dcmqi not installed (pip install dcmqi)")
    # loopback only, DICOMweb Host carries the port (retrieve URLs would lose it otherwise)
    cfg = json.loads((orthanc.work_dir / "config" / "orthanc.json").read_text())
    assert cfg["RemoteAccessAllowed"] is False and cfg["DicomServerEnabled"] is False
    assert str(orthanc.work_dir) in cfg["StorageDirectory"]
    cases = ["chaos_01", "chaos_02"]
    series = pacs.upload_folder(orthanc, chaos_dir / "imagesTr", tmp_path / "dcm", cases=cases)
    seg = dicom_seg.label_to_dicom_seg(chaos_dir / "labelsTr" / "chaos_01.nii.gz", tmp_path / "dcm" / "chaos_01",
                                   tmp_path / "seg.dcm", class_names={1: "liver", 2: "right kidney",
                                                                      3: "left kidney", 4: "spleen"})
    orthanc.upload([seg])
    orthanc.upload((tmp_path / "dcm" / "chaos_02").iterdir())  # re-upload: no duplicates
    qido = json.loads(orthanc.request("/dicom-web/series?Modality=MR"))
    uids = sorted(s["0020000E"]["Value"][0] for s in qido)
    assert uids == sorted(series.values())
    retrieve = qido[0]["00081190"]["Value"][0]
    assert retrieve.startswith(f"http://127.0.0.1:{orthanc.http_port}/dicom-web/studies/")
    n_slices = {s["0020000E"]["Value"][0]: s["00201209"]["Value"][0] for s in qido}
    assert n_slices[series["chaos_01"]] == nib.load(str(chaos_dir / "imagesTr" / "chaos_01_0000.nii.gz")).shape[2]
    segs = json.loads(orthanc.request("/dicom-web/series?Modality=SEG"))
    assert len(segs) == 1
    meta = json.loads(orthanc.request(f"/dicom-web/studies/{segs[0]['0020000D']['Value'][0]}/series/"
                                      f"{segs[0]['0020000E']['Value'][0]}/metadata"))
    ref = meta[0]["00081115"]["Value"][0]["0020000E"]["Value"][0]  # ReferencedSeriesSequence
    assert ref == series["chaos_01"]
    assert len(meta[0]["00620002"]["Value"]) == 4  # liver, kidneys, spleen segments


def _non_loopback_ipv4() -> str | None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_orthanc_refuses_requests_from_other_addresses(orthanc):
    import urllib.error
    import urllib.request

    ip = _non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to test from")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{ip}:{orthanc.http_port}/system", timeout=10)
    assert err.value.code in (401, 403)
    assert orthanc.get_json("/system")["Name"]  # loopback still works


def test_a_series_read_while_it_arrives_is_read_again_whole(orthanc, chaos_dir, tmp_path):
    """The app's DICOMweb datastore (MONAI Label 0.8.5 + apps/ssl_medsam2/monailabel_085.py): a study read in
    the seconds it takes to arrive in the PACS is not kept half (0.8.5 kept its first slice for good: an atlas
    pseudo label of Dice 0.02 in tests/test_deploy.py); callers at the same moment all get the whole series."""
    import sys
    import threading

    from conftest import REPO
    from test_ohif_browser import small_cases

    sys.path.insert(0, str(REPO / "apps" / "ssl_medsam2"))
    import monailabel_085
    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore

    monailabel_085.install()
    small_cases(chaos_dir, tmp_path, ["chaos_03", "chaos_05"])
    files = dicom.convert_folder(tmp_path / "images", tmp_path / "dcm")
    ds = DICOMWebDatastore(DICOMwebClient(url=orthanc.dicomweb_url), {"Modality": "MR"}, str(tmp_path / "cache"),
                           False, True)
    arriving = dicom.stable_uid("chaos_03", "series", "1")
    orthanc.upload(files["chaos_03"][:1])  # the first instance is in; the others are on their way
    assert nib.load(ds.get_image_uri(arriving)).shape[2] == 1
    orthanc.upload(files["chaos_03"][1:])
    assert nib.load(ds.get_image_uri(arriving)).shape[2] == 12, "read again once the rest arrived"

    whole = dicom.stable_uid("chaos_05", "series", "1")
    orthanc.upload(files["chaos_05"])
    shapes: list = []
    callers = [threading.Thread(target=lambda: shapes.append(nib.load(ds.get_image_uri(whole)).shape))
               for _ in range(3)]
    for c in callers:
        c.start()
    for c in callers:
        c.join(120)
    assert shapes == [(128, 128, 12)] * 3
    assert not list((tmp_path / "cache").rglob("*.part-*")), "no partial download left behind"


def test_callers_at_the_same_moment_all_get_the_final_label(orthanc, chaos_dir, tmp_path):
    """The server's background learner of the organ looks reads the final labels while a client asks for one:
    every caller at the same moment gets the label on its image's grid (they shared one temp file before,
    and one caller's clean-up made another's answer a 500)."""
    import sys
    import threading

    from conftest import REPO
    from test_ohif_browser import small_cases

    if dicom_seg.dcmqi_tool() is None:
        pytest.skip("dcmqi not installed (pip install dcmqi)")
    sys.path.insert(0, str(REPO / "apps" / "ssl_medsam2"))
    import monailabel_085
    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore

    monailabel_085.install()
    small_cases(chaos_dir, tmp_path, ["chaos_08"])
    files = dicom.convert_folder(tmp_path / "images", tmp_path / "dcm")
    orthanc.upload(files["chaos_08"])
    small = nib.as_closest_canonical(nib.load(str(tmp_path / "labels" / "chaos_08.nii.gz")))
    orthanc.upload([dicom_seg.label_to_dicom_seg(tmp_path / "labels" / "chaos_08.nii.gz", tmp_path / "dcm" / "chaos_08",
                                                 tmp_path / "seg.dcm",
                                                 class_names={1: "liver", 2: "right kidney", 3: "left kidney",
                                                              4: "spleen"})])
    ds = DICOMWebDatastore(DICOMwebClient(url=orthanc.dicomweb_url), {"Modality": "MR"}, str(tmp_path / "cache"),
                           False, True)
    image = dicom.stable_uid("chaos_08", "series", "1")
    got: list = []

    def read():
        try:
            got.append(np.asarray(nib.as_closest_canonical(nib.load(ds.get_label_uri(image, "final"))).dataobj))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            got.append(exc)

    callers = [threading.Thread(target=read) for _ in range(4)]
    for c in callers:
        c.start()
    for c in callers:
        c.join(120)
    assert len(got) == 4 and all(isinstance(g, np.ndarray) for g in got), got
    for g in got:
        np.testing.assert_array_equal(g, np.asarray(small.dataobj).astype(g.dtype))


def test_the_newest_final_labels_come_from_the_pacs_dates_and_only_they_are_downloaded(orthanc, chaos_dir, tmp_path):
    """On a PACS the organ looks learn from the most recently saved final labels (``appearance.max_images``):
    which ones those are comes from the DICOM-SEGs' own dates and times (a local copy's file time is only
    when this server converted it), and only the chosen images and labels are downloaded."""
    import sys

    import pydicom

    from conftest import REPO
    from test_ohif_browser import small_cases

    if dicom_seg.dcmqi_tool() is None:
        pytest.skip("dcmqi not installed (pip install dcmqi)")
    sys.path.insert(0, str(REPO / "apps" / "ssl_medsam2"))
    import monailabel_085
    from dicomweb_client.api import DICOMwebClient
    from lib.workspace import Workspace
    from monailabel.datastore.dicom import DICOMWebDatastore

    monailabel_085.install()
    cases = {"chaos_13": "20990101", "chaos_10": "20990102"}  # later than any SEG the other tests made today
    small_cases(chaos_dir, tmp_path, list(cases))
    files = dicom.convert_folder(tmp_path / "images", tmp_path / "dcm")
    for case, day in cases.items():
        orthanc.upload(files[case])
        seg = dicom_seg.label_to_dicom_seg(tmp_path / "labels" / f"{case}.nii.gz", tmp_path / "dcm" / case,
                                           tmp_path / f"{case}_seg.dcm",
                                           class_names={1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"})
        ds = pydicom.dcmread(str(seg))
        ds.SeriesDate = ds.ContentDate = day
        ds.SeriesTime = ds.ContentTime = "120000"
        ds.save_as(str(seg))
        orthanc.upload([seg])
    ds = DICOMWebDatastore(DICOMwebClient(url=orthanc.dicomweb_url), {"Modality": "MR"}, str(tmp_path / "cache"),
                           False, True)
    ws = Workspace(str(REPO / "apps" / "ssl_medsam2"), orthanc.dicomweb_url, {"app.state_dir": str(tmp_path / "state")},
                   datastore=ds)
    older, newer = (dicom.stable_uid(c, "series", "1") for c in cases)
    stamps = ds.final_label_stamps()
    assert stamps[newer] > stamps[older]
    assert list(ws.newest_final_labelled(1)) == [newer]
    cached = {p.name.split(".nii")[0] for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".nii.gz")}
    assert older not in cached and newer in cached, "only the chosen image and label are downloaded"
    assert set(ws.newest_final_labelled(2)) == {newer, older}
