"""Interactive correction through the real server with the payloads the real clients send: 3D Slicer's
Smart Edit (deepgrow) and Scribbles through ``MONAILabelClient`` (the client Slicer's module ships), OHIF's
Point Prompts (deepedit, vista3d) as its bundled JS posts them.

Real CHAOS MRI at 64x64 in-plane, 10 slices: chaos_01/02 with final labels, chaos_03 with a pseudo label
that lacks the spleen, chaos_05 with none, and ``odd_03``: chaos_03 stored with permuted, flipped axes (not
RAS). No organ names are configured: /info names them from the final labels (class_1..class_4). What
must hold: a label changed only near the clicks, the click lands where it was placed on a non-RAS image,
bad input -> 422 with a reason and nothing changed, two clients never see each other's state, nothing
is saved until the annotator saves.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import NO_QUEUE, downsample_case, load_script
from ssl_medsam2.config import load_config
from ssl_medsam2.io import load_volume

SPLEEN, LIVER = "class_4", "class_1"
# the region a correction may change: the clicks' box grown by the engine's interactive.roi_margin_mm (mm),
# plus a voxel of these 5 x 5 x 7.7 mm volumes
MARGIN_MM = np.array(load_config()["interactive"]["roi_margin_mm"], float) + [5.0, 5.0, 7.7]


def _odd(src_img: Path, src_lab: Path, dst_img: Path, dst_lab: Path) -> None:
    """The same physical image with its voxels stored transposed (x <-> y) and z flipped."""
    for src, dst, dtype in ((src_img, dst_img, np.float32), (src_lab, dst_lab, np.uint8)):
        img = nib.load(str(src))
        data = np.asarray(img.dataobj).astype(dtype)
        z = data.shape[2]
        m = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, z - 1], [0, 0, 0, 1]], float)
        dst.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data.transpose(1, 0, 2)[:, :, ::-1]), img.affine @ m), str(dst))


@pytest.fixture(scope="module")
def server(chaos_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("interactive")
    studies, truth = root / "studies", root / "truth"
    for case in ("chaos_01", "chaos_02", "chaos_03", "chaos_05"):
        lab = np.asarray(nib.load(str(chaos_dir / "labelsTr" / f"{case}.nii.gz")).dataobj)
        z = int(np.nonzero((lab == 4).sum((0, 1)))[0].mean())
        dst = (studies / "labels" / "final" if case in ("chaos_01", "chaos_02") else truth) / f"{case}.nii.gz"
        downsample_case(chaos_dir / "imagesTr" / f"{case}_0000.nii.gz", chaos_dir / "labelsTr" / f"{case}.nii.gz",
                        studies / f"{case}.nii.gz", dst, factor=4, z_range=(z - 5, z + 5))
    t = nib.load(str(truth / "chaos_03.nii.gz"))
    pseudo = np.asarray(t.dataobj).copy()
    pseudo[pseudo == 4] = 0  # the pseudo label missed the spleen
    (studies / "labels" / "pseudo").mkdir(parents=True)
    nib.save(nib.Nifti1Image(pseudo, t.affine), str(studies / "labels" / "pseudo" / "chaos_03.nii.gz"))
    _odd(studies / "chaos_03.nii.gz", studies / "labels" / "pseudo" / "chaos_03.nii.gz",
         studies / "odd_03.nii.gz", studies / "labels" / "pseudo" / "odd_03.nii.gz")
    conf = {"app.retrain_after_labels": 0, "interactive.max_points": 20, **NO_QUEUE}
    srv = load_script("pacs_demo").start_monailabel(str(studies), root / "work", conf=conf)
    looks = _learned_looks(root / "work" / "state" / "appearance")  # learned in the background at start: wait for
    snapshot = _snapshot(studies)                                   # them, so every test sees the same engine
    try:
        yield {"url": srv.url, "studies": studies, "truth": truth, "root": root, "snapshot": snapshot, "looks": looks}
    finally:
        srv.stop()


def _learned_looks(folder: Path, timeout: float = 180.0) -> Path:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        got = sorted(folder.glob("*.npz"))
        if got:
            return got[0]
        time.sleep(0.5)
    raise AssertionError("the server learned no organ looks from its final labels")


def _snapshot(studies: Path) -> dict:
    """What a save would change: the datastore file and every label file (with its bytes)."""
    files = {str(p.relative_to(studies)): p.read_bytes() for p in sorted((studies / "labels").rglob("*")) if p.is_file()}
    return {"datastore": (studies / "datastore_v2.json").read_text(), "labels": files}


def _client(url: str, tmp: Path, client_id: str):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(url, tmpdir=str(tmp), client_id=client_id)


def _file_order(path: str) -> np.ndarray:
    """A result file (.nrrd from SimpleITK, or NIfTI) as an array in the image file's voxel order."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(path)).transpose(2, 1, 0)


def _slicer_config(info: dict, model: str) -> dict:
    """What Slicer adds to every request: the model's /info config, first item of a list."""
    return {k: v[0] if isinstance(v, list) else v for k, v in info["models"][model]["config"].items()}


def _spleen_point(server, case: str = "chaos_03") -> list[int]:
    """A voxel deep inside the true spleen (file index order), where the pseudo label has none."""
    from scipy import ndimage

    truth = np.asarray(nib.load(str(server["truth"] / f"{case}.nii.gz")).dataobj) == 4
    dist = ndimage.distance_transform_edt(truth)
    return [int(v) for v in np.unravel_index(np.argmax(dist), dist.shape)]


def _near(changed: np.ndarray, clicks, spacing) -> bool:
    """Every changed voxel (file order) lies within the clicks' box grown by MARGIN_MM."""
    where = np.argwhere(changed)
    if not len(where):
        return True
    c = np.asarray(clicks)
    lo, hi = c.min(0) - MARGIN_MM / spacing, c.max(0) + MARGIN_MM / spacing
    return bool(((where >= lo) & (where <= hi)).all())


def _spacing(server, case: str) -> np.ndarray:
    return np.asarray(nib.load(str(server["studies"] / f"{case}.nii.gz")).header.get_zooms()[:3])


def _pseudo(server, case: str) -> np.ndarray:
    return np.asarray(nib.load(str(server["studies"] / "labels" / "pseudo" / f"{case}.nii.gz")).dataobj)


def test_info_lists_the_interactive_models_and_organ_names(server):
    info = requests.get(server["url"] + "/info/", timeout=30).json()
    types = {m: info["models"][m]["type"] for m in ("smart_edit", "point_prompts", "point_prompts_vista", "scribbles")}
    assert types == {"smart_edit": "deepgrow", "point_prompts": "deepedit", "point_prompts_vista": "vista3d",
                     "scribbles": "scribbles"}
    # no dataset.json, no input.class_names: the names come from the final labels, so Slicer has segments
    assert {"class_1", "class_2", "class_3", "class_4", "background"} <= set(info["labels"]), info["labels"]
    assert info["models"]["point_prompts"]["labels"] == {"class_1": 1, "class_2": 2, "class_3": 3, "class_4": 4,
                                                         "background": 5}


def test_the_organ_looks_are_learned_from_the_final_labels_and_used_on_them(server, tmp_path):
    """The server learned each organ's look from its 2 final labels at start (saved without pickles) and a
    correction of a final label (a trusted base) says it used them."""
    from ssl_medsam2.interactive.appearance import AppearanceModel

    model = AppearanceModel.load(server["looks"])
    assert model.images == ("chaos_01", "chaos_02") and set(model.looks) == {1, 2, 3, 4}
    slicer = _client(server["url"], tmp_path, "slicer-looks")
    truth = np.asarray(nib.load(str(server["studies"] / "labels" / "final" / "chaos_01.nii.gz")).dataobj)
    liver = np.argwhere(truth == 1)[0].tolist()
    params = {"label": LIVER, "foreground": [], "background": [liver], **_slicer_config(slicer.info(), "smart_edit")}
    _, answer = slicer.infer("smart_edit", "chaos_01", params)
    assert answer["appearance_images"] == 2


def test_slicer_smart_edit_adds_the_clicked_spleen_near_the_clicks_only(server, tmp_path):
    url = server["url"]
    slicer = _client(url, tmp_path, "slicer-a")
    info = slicer.info()
    p = _spleen_point(server)
    params = {"label": SPLEEN, "foreground": [p], "background": [], **_slicer_config(info, "smart_edit")}
    out, answer = slicer.infer("smart_edit", "chaos_03", params)
    got = _file_order(out)
    pseudo = _pseudo(server, "chaos_03")
    assert got.shape == pseudo.shape and set(np.unique(got)) <= {0, 1}
    assert got[tuple(p)] == 1, "the clicked voxel is spleen"
    assert _near(got != (pseudo == 4), [p], _spacing(server, "chaos_03"))
    assert not (got.astype(bool) & (pseudo != 0)).any(), "the spleen took no voxel of another organ"
    assert answer["label_names"] == {SPLEEN: 1} and answer["changed_voxels"] > 0
    # a background click removes what the foreground click added there; deleting the point undoes it
    out2, _ = slicer.infer("smart_edit", "chaos_03", {**params, "foreground": [], "background": [p],
                                                      "reset_state": True})
    assert _file_order(out2)[tuple(p)] == 0
    # a liver click with Slicer's ROI: nothing changes outside the ROI
    liver = np.argwhere(pseudo == 1)[0].tolist()
    roi = [liver[0] + 2, liver[0] - 2, liver[1] - 2, liver[1] + 2, liver[2], liver[2]]  # corners in any order
    out3, _ = slicer.infer("smart_edit", "chaos_03", {**params, "label": LIVER, "foreground": [], "background": [liver],
                                                      "roi": roi})
    got3 = _file_order(out3).astype(bool)
    diff = np.argwhere(got3 != (pseudo == 1))
    assert len(diff) and got3[tuple(liver)] == 0
    assert (diff[:, 0] >= liver[0] - 2).all() and (diff[:, 0] <= liver[0] + 2).all() and (diff[:, 2] == liver[2]).all()


def test_slicer_scribbles_upload_corrects_the_selected_organ(server, tmp_path):
    import SimpleITK as sitk

    url, studies = server["url"], server["studies"]
    slicer = _client(url, tmp_path, "slicer-a")
    info = slicer.info()
    pseudo = _pseudo(server, "chaos_03")
    p = _spleen_point(server)
    # Slicer's export: one value per segment in segment order (label_info ids); scribbles painted last win
    seg = pseudo.astype(np.uint8).copy()
    seg[p[0] - 1:p[0] + 2, p[1] - 1:p[1] + 2, p[2]] = 5  # a foreground scribble stroke in the spleen
    liver = np.argwhere(pseudo == 1)[0]
    seg[liver[0], liver[1], liver[2]] = 6  # a background scribble on the liver
    label_info = [{"name": n, "id": i} for i, n in enumerate(["class_1", "class_2", "class_3", "class_4",
                                                                "foreground_scribbles", "background_scribbles"], 1)]
    ref = sitk.ReadImage(str(studies / "chaos_03.nii.gz"))
    up = sitk.GetImageFromArray(seg.transpose(2, 1, 0))
    up.CopyInformation(ref)
    path = tmp_path / "scribbles.nrrd"
    sitk.WriteImage(up, str(path))
    params = {**_slicer_config(info, "scribbles"), "roi": [], "label_info": label_info, "selected_label_name": SPLEEN}
    out, answer = slicer.infer("scribbles", "chaos_03", params, label_in=str(path))
    got = _file_order(out)
    assert set(np.unique(got)) <= {0, 1} and got[tuple(p)] == 1 and answer["label_names"] == {SPLEEN: 1}
    assert _near(got != (pseudo == 4), [p], _spacing(server, "chaos_03"))
    # the same scribble layers now correct the liver (Slicer's scribbles belong to the selected label)
    out, _ = slicer.infer("scribbles", "chaos_03", {**params, "selected_label_name": LIVER}, label_in=str(path))
    got = _file_order(out).astype(bool)
    assert not got[tuple(liver)] and _near(got != (pseudo == 1), [liver, p], _spacing(server, "chaos_03"))
    # a segmentation on another grid (one slice short) is refused with the reason
    small = sitk.GetImageFromArray(seg[:, :, :-1].transpose(2, 1, 0))
    small.SetSpacing(ref.GetSpacing()), small.SetOrigin(ref.GetOrigin()), small.SetDirection(ref.GetDirection())
    sitk.WriteImage(small, str(path))
    from monailabel.client.client import MONAILabelClientException

    with pytest.raises(MONAILabelClientException, match="422") as err:
        slicer.infer("scribbles", "chaos_03", params, label_in=str(path))
    assert "does not match image shape" in str(err.value)


def test_a_click_on_a_non_ras_image_lands_where_it_was_placed(server, tmp_path):
    """odd_03 is chaos_03 with voxels stored transposed and z flipped: the same physical click gives the
    same physical answer, and the clicked file voxel is the organ."""
    url = server["url"]
    slicer = _client(url, tmp_path, "slicer-odd")
    cfg = _slicer_config(slicer.info(), "smart_edit") | {"result_extension": ".nii.gz"}
    p = _spleen_point(server)
    z = nib.load(str(server["studies"] / "chaos_03.nii.gz")).shape[2]
    q = [p[1], p[0], z - 1 - p[2]]  # the same voxel in odd_03's file order
    studies = server["studies"]
    assert np.allclose(nib.load(str(studies / "chaos_03.nii.gz")).affine @ [*p, 1],
                       nib.load(str(studies / "odd_03.nii.gz")).affine @ [*q, 1])
    ras, _ = slicer.infer("smart_edit", "chaos_03", {**cfg, "label": SPLEEN, "foreground": [p], "background": []})
    odd, _ = slicer.infer("smart_edit", "odd_03", {**cfg, "label": SPLEEN, "foreground": [q], "background": []})
    assert np.asarray(nib.load(odd).dataobj)[tuple(q)] == 1
    a, b = load_volume(ras, is_label=True), load_volume(odd, is_label=True)
    assert np.allclose(a.affine, b.affine) and np.array_equal(a.array, b.array) and a.array.sum() > 0
    assert np.allclose(nib.load(odd).affine, nib.load(str(studies / "odd_03.nii.gz")).affine)


def _post(url: str, model: str, image: str, params, files=None):
    return requests.post(f"{url}/infer/{model}", params={"image": image, "output": "image"},
                         data={"params": params if isinstance(params, str) else json.dumps(params)},
                         files=files, timeout=60)


OHIF = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}


def test_ohif_point_prompts_answer_a_label_map_and_keep_other_organs(server, tmp_path):
    url = server["url"]
    p = _spleen_point(server)
    pseudo = _pseudo(server, "chaos_03")
    # deepedit, as OHIF's PointPrompts tab posts it: background + one key per clicked label
    r = _post(url, "point_prompts", "chaos_03", {"background": [], SPLEEN: [p], **OHIF})
    assert r.status_code == 200, r.text
    (tmp_path / "a.nrrd").write_bytes(r.content)
    got = _file_order(str(tmp_path / "a.nrrd"))
    assert got[tuple(p)] == 4 and np.array_equal(got[got != 4], pseudo[got != 4]), "other organs unchanged"
    assert _near((got == 4) != (pseudo == 4), [p], _spacing(server, "chaos_03"))
    # vista3d: points + point_labels + label_prompt [id]; OHIF's auto tab: every id, no points -> the base label
    r = _post(url, "point_prompts_vista", "chaos_03", {"points": [p], "point_labels": [1], "label_prompt": [4], **OHIF})
    assert r.status_code == 200, r.text
    (tmp_path / "v.nrrd").write_bytes(r.content)
    v = _file_order(str(tmp_path / "v.nrrd"))
    assert set(np.unique(v)) == {0, 4} and np.array_equal(v == 4, got == 4)
    r = _post(url, "point_prompts_vista", "chaos_03", {"label_prompt": [1, 2, 3, 4, 5], **OHIF})
    (tmp_path / "auto.nrrd").write_bytes(r.content)
    assert r.status_code == 200 and np.array_equal(_file_order(str(tmp_path / "auto.nrrd")), pseudo)


@pytest.mark.parametrize("model, params, reason", [
    ("smart_edit", {"foreground": [[1, 1, 1]], "background": [], **OHIF}, "choose the point_prompts model"),
    ("smart_edit", {"label": SPLEEN, "foreground": [[64, 1, 1]], "background": []}, "outside the image"),
    ("smart_edit", {"label": SPLEEN, "foreground": [[1, -1, 1]], "background": []}, "outside the image"),
    ("smart_edit", {"label": SPLEEN, "foreground": [[1.5, 1, 1]], "background": []}, "whole voxel"),
    ("smart_edit", '{"label": "class_4", "foreground": [[NaN, 1, 1]]}', "not valid JSON"),
    ("smart_edit", '{"label": "class_4", "foreground": [[1e400, 1, 1]]}', "not valid JSON"),
    ("smart_edit", {"label": SPLEEN, "foreground": [[1, 1, 1]] * 21, "background": []}, "interactive.max_points"),
    ("smart_edit", {"label": "pancreas", "foreground": [[1, 1, 1]]}, "unknown label name 'pancreas'"),
    ("smart_edit", {"label": "/etc/passwd", "foreground": [[1, 1, 1]]}, "unknown label name"),
    ("smart_edit", {"label": SPLEEN, "image": "/etc/passwd"}, "may not set image"),
    ("point_prompts", {"background": [], "pancreas": [[1, 1, 1]], **OHIF}, "unknown params or label names 'pancreas'"),
    ("point_prompts", {"background": [], "null": [[1, 1, 1]], **OHIF}, "no label selected"),
    ("point_prompts", {"label": "../../x", SPLEEN: [[1, 1, 1]]}, "unknown label name"),
    ("point_prompts_vista", {"points": [[1, 1, 1]], "point_labels": [1], "label_prompt": [9], **OHIF}, "unknown label id 9"),
    ("scribbles", {"selected_label_name": SPLEEN, "label_info": []}, "uploaded as the label file"),
    ("scribbles", {"selected_label_name": SPLEEN, "label": "/etc/passwd"}, "may not set label"),
])
def test_bad_input_is_refused_with_a_reason(server, model, params, reason):
    r = _post(server["url"], model, "chaos_03", params)
    assert r.status_code == 422 and reason in r.text, (r.status_code, r.text)
    assert "/etc" not in r.text.replace("'/etc/passwd'", "") and str(server["root"]) not in r.text


def test_a_label_file_for_a_click_model_is_refused(server, tmp_path):
    path = server["studies"] / "labels" / "pseudo" / "chaos_03.nii.gz"
    with open(path, "rb") as fh:
        r = _post(server["url"], "smart_edit", "chaos_03", {"label": SPLEEN, "foreground": [[1, 1, 1]]},
                  files={"label": ("l.nii.gz", fh)})
    assert r.status_code == 422 and "takes no label file" in r.text, r.text
    with open(path, "rb") as fh:
        r = _post(server["url"], "scribbles", "chaos_03", {"selected_label_name": "pancreas", "label_info": []},
                  files={"label": ("l.nii.gz", fh)})
    assert r.status_code == 422 and "unknown selected_label_name 'pancreas'" in r.text, r.text


def test_two_clients_on_two_images_never_see_each_others_state(server, tmp_path):
    url = server["url"]
    alice, bob = _client(url, tmp_path / "a", "alice"), _client(url, tmp_path / "b", "bob")
    cfg = _slicer_config(alice.info(), "smart_edit")
    p3, p5 = _spleen_point(server, "chaos_03"), _spleen_point(server, "chaos_05")
    a1, r1 = alice.infer("smart_edit", "chaos_03", {**cfg, "label": SPLEEN, "foreground": [p3], "background": []})
    first = _file_order(a1)
    b1, _ = bob.infer("smart_edit", "chaos_05", {**cfg, "label": SPLEEN, "foreground": [p5], "background": []})
    b2, rb = bob.infer("smart_edit", "chaos_03", {**cfg, "label": SPLEEN, "foreground": [], "background": []})
    a2, r2 = alice.infer("smart_edit", "chaos_03", {**cfg, "label": SPLEEN, "foreground": [p3], "background": []})
    assert np.array_equal(_file_order(a2), first) and r2["cached"] is True
    assert rb["cached"] is False, "bob's first click on chaos_03 built his own state"
    assert not _file_order(b2).any(), "bob sees the base (no spleen), not alice's click"
    assert _file_order(b1)[tuple(p5)] == 1


def test_nothing_is_saved_until_the_annotator_saves(server):
    assert _snapshot(server["studies"]) == server["snapshot"]


def test_slicer_deepedit_sends_every_label_and_reads_the_answer_by_position(server, tmp_path):
    """Slicer's Smart Edit on a deepedit model: one key per /info label (its segments' points, the
    'background' segment's too) plus 'label'; the answer's value n is the n-th non-background name."""
    slicer = _client(server["url"], tmp_path, "slicer-de")
    info = slicer.info()
    p = _spleen_point(server)
    params = {name: [] for name in info["labels"]}
    params.update({SPLEEN: [p], "label": SPLEEN, **_slicer_config(info, "point_prompts")})
    out, answer = slicer.infer("point_prompts", "chaos_03", params)
    names = [k for k, _ in sorted(answer["label_names"].items(), key=lambda kv: kv[1]) if k != "background"]
    got, pseudo = _file_order(out), _pseudo(server, "chaos_03")
    assert names[got[tuple(p)] - 1] == SPLEEN
    for i, name in enumerate(names, start=1):  # every other organ comes back as the base has it
        if name != SPLEEN:
            assert np.array_equal(got == i, pseudo == int(name.split("_")[1])), name
