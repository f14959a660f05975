"""OHIF + Orthanc + the app, end to end in a real headless Chromium (Debian's, never a downloaded one).

Orthanc (started here) holds three CHAOS MRI studies (128x128 in-plane, 12 slices) and two of them
have a DICOM-SEG (the labelled supports). The app runs on ``--studies http://127.0.0.1:PORT/dicom-web``.
The browser opens ``/ohif/``, sees the studies, opens the unlabelled one in the MONAI Label mode,
connects the panel, runs the few-shot model and we check from the screenshot's pixels that the
overlay appeared. OHIF 3.10's MONAI Label panel has a client ``save_label`` but no button wired to
it, so the page calls that same request (``PUT /datastore/label``, ``label.bin`` raw uint8, as the
panel's client builds it) with the labelmap OHIF holds; then a DICOM-SEG referencing the image
series must be in Orthanc, with the same voxels, and the image must count as labelled at once.
Screenshots go to tests/artifacts/ohif/.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, downsample_case, load_script
from ssl_medsam2 import dicom, dicom_seg, metrics, pacs

ARTIFACTS = REPO / "tests" / "artifacts" / "ohif"
CHROMIUM = "/usr/bin/chromium"
CASES = ["chaos_01", "chaos_02", "chaos_03", "chaos_05"]
LABELLED = ["chaos_01", "chaos_02"]
QUERY = "chaos_03"  # saved from the browser
REST_QUERY = "chaos_05"  # saved over REST (the DICOMweb path without a browser)


def _pacs_demo():
    return load_script("pacs_demo")


def small_cases(chaos_dir: Path, root: Path, cases) -> None:
    """CHAOS cases at half resolution, their 12 middle slices, into ``root``/images and ``root``/labels."""
    for case in cases:
        img = chaos_dir / "imagesTr" / f"{case}_0000.nii.gz"
        z = nib.load(str(img)).shape[2]
        downsample_case(img, chaos_dir / "labelsTr" / f"{case}.nii.gz", root / "images" / f"{case}_0000.nii.gz",
                        root / "labels" / f"{case}.nii.gz", factor=2, z_range=((z - 12) // 2, (z - 12) // 2 + 12))


@pytest.fixture(scope="module")
def stack(chaos_dir, tmp_path_factory):
    missing = [what for what, ok in (("Orthanc (apt: orthanc orthanc-dicomweb)", pacs.orthanc_binary()),
                                     ("dcmqi (pip: dcmqi)", dicom_seg.dcmqi_tool())) if not ok]
    if missing:
        pytest.skip("missing: " + ", ".join(missing))
    root = tmp_path_factory.mktemp("ohif")
    small_cases(chaos_dir, root, CASES)
    orthanc = pacs.Orthanc.start(root / "orthanc")
    server = None
    try:
        series = pacs.upload_folder(orthanc, root / "images", root / "dicom")
        for case in LABELLED:
            orthanc.upload([dicom_seg.label_to_dicom_seg(root / "labels" / f"{case}.nii.gz", root / "dicom" / case,
                                                     root / "dicom" / f"{case}_seg.dcm", class_names={1: "liver"})])
        server = _pacs_demo().start_monailabel(
            orthanc.dicomweb_url, root / "work",
            conf={"input.classes": "[1]", "app.retrain_after_labels": 0, "sam2.checkpoint": "none",
                  "sam2.image_size": 128, "sam2.n_inserts": 1, "sam2.n_supports": 1, "sam2.device": "cpu"},
            env={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"})})
        yield {"orthanc": orthanc, "url": server.url, "series": series, "root": root, "server": server}
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()


def _overlay_pixels(before: Path, after: Path, box: dict) -> int:
    """Pixels of the viewport that turned colour (segment colours are saturated; MRI is grey; the
    viewport's text overlays are the same in both shots)."""
    from PIL import Image

    x0, y0, x1, y1 = int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"])
    a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int)[y0:y1, x0:x1] for p in (before, after))
    changed = np.abs(b - a).sum(axis=2) > 60
    tinted = (b.max(axis=2) - b.min(axis=2)) > 60
    return int((changed & tinted).sum())


SAVE_JS = """
async ([image, clientId]) => {
  // find the MONAI Label panel's props (servicesManager) through React's fiber of its server input
  const input = [...document.querySelectorAll('input')].find(i => (i.value || '').includes('127.0.0.1'));
  const key = Object.keys(input).find(k => k.startsWith('__reactFiber$'));
  let fiber = input[key];
  while (fiber && !(fiber.memoizedProps && fiber.memoizedProps.servicesManager)) fiber = fiber.return;
  const { segmentationService } = fiber.memoizedProps.servicesManager.services;
  const volume = segmentationService.getLabelmapVolume('1');
  const data = volume.voxelManager.getCompleteScalarDataArray();
  const label = new Uint8Array(data.length);
  label.set(data);
  const seg = segmentationService.getSegmentation('1');
  const labelInfo = Object.values(seg.segments || {}).filter(s => s && s.segmentIndex)
      .map(s => ({ name: s.label, idx: s.segmentIndex }));
  const counts = {};
  for (const v of label) if (v) counts[v] = (counts[v] || 0) + 1;
  // exactly what MonaiLabelClient.save_label sends: params + label.bin (raw uint8)
  const form = new FormData();
  form.append('params', JSON.stringify({ label_info: labelInfo, client_id: clientId }));
  form.append('label', new Blob([label]), 'label.bin');
  const url = new URL('datastore/label', window.location.origin + '/');
  url.searchParams.append('image', image);
  const r = await fetch(url.toString(), { method: 'PUT', body: form, headers: { accept: 'application/json' } });
  let bin = '';
  for (let i = 0; i < label.length; i += 8192) bin += String.fromCharCode.apply(null, label.subarray(i, i + 8192));
  return { status: r.status, body: await r.text(), counts, labelInfo, n: label.length, b64: btoa(bin) };
}
"""


def _seg_referencing(orthanc, image_series: str) -> list[dict]:
    return [s for s in orthanc.series("SEG")
            if json.loads(orthanc.request(f"/instances/{s['Instances'][0]}/tags?simplify"))
            ["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == image_series]


def _read_seg(orthanc, seg: dict, path: Path):
    import pydicom
    import pydicom_seg

    path.write_bytes(orthanc.request(f"/instances/{seg['Instances'][0]}/file"))
    return pydicom_seg.MultiClassReader().read(pydicom.dcmread(str(path))).image


def _dice_with_truth(seg_img, truth_path: Path) -> float:
    import SimpleITK as sitk

    truth = sitk.Resample(sitk.ReadImage(str(truth_path)), seg_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return metrics.dice(sitk.GetArrayFromImage(seg_img) > 0, sitk.GetArrayFromImage(truth) == 1)


def test_dicomweb_rest_infer_and_save_label_as_dicom_seg(stack):
    """No browser: the app on DICOMweb infers with the PACS's SEGs as supports and saves a DICOM-SEG."""
    url, orthanc, series = stack["url"], stack["orthanc"], stack["series"]
    image = series[REST_QUERY]
    info = httpx.get(f"{url}/info/", timeout=30).json()
    model = next(m for m in ("atlas_fewshot", "sam2_fewshot") if m in info["models"]
                 and m not in (info.get("unavailable_models") or {}))
    before = httpx.get(f"{url}/datastore/?output=stats", timeout=60).json()["completed"]
    r = httpx.post(f"{url}/infer/{model}", params={"image": image, "output": "image"}, data={"params": "{}"},
                   timeout=300)
    assert r.status_code == 200, r.text[:500]
    label_path = stack["root"] / "rest_label.nii.gz"
    label_path.write_bytes(r.content)
    assert np.asarray(nib.load(str(label_path)).dataobj).any()
    with open(label_path, "rb") as fh:
        r = httpx.put(f"{url}/datastore/label", params={"image": image, "tag": "final"},
                      files={"label": ("label.nii.gz", fh)},
                      data={"params": json.dumps({"client_id": "rest", "label_info": [{"name": "liver", "idx": 1}]})},
                      timeout=120)
    assert r.status_code == 200, r.text
    # at once: labelled in MONAI Label (no 2 h DICOMweb cache) and a SEG in the PACS on the right series
    assert httpx.get(f"{url}/datastore/?output=stats", timeout=60).json()["completed"] == before + 1
    segs = _seg_referencing(orthanc, image)
    assert len(segs) == 1
    seg_img = _read_seg(orthanc, segs[0], stack["root"] / "rest_seg.dcm")
    import SimpleITK as sitk

    sent = sitk.Resample(sitk.ReadImage(str(label_path)), seg_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sent) > 0, sitk.GetArrayFromImage(seg_img) > 0,
                                  err_msg="the SEG in Orthanc is not the label that was saved")
    dice = _dice_with_truth(seg_img, stack["root"] / "labels" / f"{REST_QUERY}.nii.gz")
    print(json.dumps({"rest_model": model, "rest_dice_vs_expert_liver": round(dice, 3)}))


def test_ohif_runs_the_model_on_an_orthanc_study_and_saves_a_dicom_seg(stack):
    if not Path(CHROMIUM).exists() or importlib.util.find_spec("playwright") is None:
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt: chromium) and playwright (pip: playwright)")
    from playwright.sync_api import sync_playwright

    url, orthanc, series = stack["url"], stack["orthanc"], stack["series"]
    study_uid = dicom.stable_uid(QUERY, "study")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS.parent / ".gitignore").write_text("*\n")
    info = httpx.get(f"{url}/info/", timeout=30).json()
    unavailable = info.get("unavailable_models") or {}
    model = next(m for m in ("atlas_fewshot", "sam2_fewshot") if m in info["models"] and m not in unavailable)
    completed = httpx.get(f"{url}/datastore/?output=stats", timeout=60).json()["completed"]
    assert completed >= len(LABELLED)

    logs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: logs.append(m.text))
            # 1. the study list, served by OHIF through MONAI Label's DICOMweb proxy from Orthanc
            page.goto(f"{url}/ohif/", wait_until="load", timeout=120_000)
            for case in CASES:
                page.get_by_text(case, exact=True).first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "1_study_list.png"))
            # 2. the unlabelled study in the MONAI Label mode
            page.goto(f"{url}/ohif/monai-label?StudyInstanceUIDs={study_uid}", wait_until="load", timeout=120_000)
            page.get_by_text("Confirm and Hide").click(timeout=60_000)
            page.wait_for_function("() => [...document.querySelectorAll('canvas')].some(c => c.width > 100)",
                                   timeout=60_000)
            page.wait_for_timeout(3000)
            axial = page.locator("canvas").first.bounding_box()
            before = ARTIFACTS / "2_study_loaded.png"
            page.screenshot(path=str(before))
            # 3. connect the panel to this server
            server_input = page.locator("input[value*='127.0.0.1']").first
            server_input.fill(url + "/")
            server_input.press("Tab")
            server_input.locator("xpath=following::button[1]").click()
            page.get_by_text("SSL-MedSAM2", exact=True).first.wait_for(timeout=60_000)
            # 4. run the model from the Auto-Segmentation section
            models = page.locator("select:visible", has=page.locator(f"option:text-is('{model}')")).first
            models.select_option(label=model)
            t0 = time.time()
            models.locator("xpath=following::button[1]").click()  # its Run button
            deadline = time.time() + 300
            while not any("updated the segmentation's scalar data" in m for m in logs):
                assert not any("Failed to Run Segmentation" in m for m in logs), logs[-20:]
                assert time.time() < deadline, "no segmentation after 300 s:\n" + "\n".join(logs[-20:])
                page.wait_for_timeout(500)
            infer_s = time.time() - t0
            page.wait_for_timeout(2000)
            after = ARTIFACTS / "3_overlay.png"
            page.screenshot(path=str(after))
            tinted_after = _overlay_pixels(before, after, axial)
            assert tinted_after > 300, f"overlay not visible: {tinted_after} pixels turned colour in the axial view"
            # 5. save the label OHIF holds, as the panel's client does
            saved = page.evaluate(SAVE_JS, [series[QUERY], "ohif-test"])
            page.screenshot(path=str(ARTIFACTS / "4_saved.png"))
        finally:
            browser.close()
    assert saved["status"] == 200, saved
    assert saved["counts"], "OHIF's labelmap is empty"

    # 6. a DICOM-SEG referencing the image series is in Orthanc, with the voxels OHIF held
    import SimpleITK as sitk

    new = _seg_referencing(orthanc, series[QUERY])
    assert len(new) == 1, "no DICOM-SEG references the saved image"
    seg_img = _read_seg(orthanc, new[0], stack["root"] / "saved_seg.dcm")
    seg_mask = sitk.GetArrayFromImage(seg_img) > 0  # (slices, rows, columns) in ITK's slice order
    assert int(seg_mask.sum()) == sum(saved["counts"].values())
    import base64

    ohif_mask = np.frombuffer(base64.b64decode(saved["b64"]), np.uint8) > 0  # columns fastest, then rows, slices
    assert ohif_mask.size == seg_mask.size
    np.testing.assert_array_equal(ohif_mask, seg_mask.ravel(), err_msg="the SEG in Orthanc is not OHIF's labelmap")
    # and it lies on the patient: overlap with the expert liver label of this case
    dice = _dice_with_truth(seg_img, stack["root"] / "labels" / f"{QUERY}.nii.gz")
    # 7. the labelled state changed at once (no 2 h DICOMweb cache), and the image is not handed out again
    stats = httpx.get(f"{url}/datastore/?output=stats", timeout=60).json()
    assert stats["completed"] == completed + 1, stats
    nxt = httpx.post(f"{url}/activelearning/first", json={"client_id": "someone-else"}, timeout=60).json()
    assert nxt.get("id") != series[QUERY]
    print(json.dumps({"model": model, "infer_s": round(infer_s, 1), "overlay_px": tinted_after,
                      "saved_voxels": saved["counts"], "dice_vs_expert_liver": round(float(dice), 3)}))
    if model == "atlas_fewshot":  # a real segmentation: it must sit on the liver (not mirrored or shifted)
        assert dice > 0.4, f"saved SEG does not overlap the liver (Dice {dice:.2f}): geometry lost on the way"


# ------------------------------------------------------------------------------- OHIF with auth on
@pytest.fixture(scope="module")
def auth_stack(stack):
    """A second app server on the same Orthanc, with Keycloak-style auth on (the issuer of test_auth.py)."""
    from test_auth import Issuer

    issuer = Issuer()
    server = None
    try:
        server = _pacs_demo().start_monailabel(
            stack["orthanc"].dicomweb_url, stack["root"] / "work_auth",
            conf={"input.classes": "[1]", "app.retrain_after_labels": 0, "sam2.checkpoint": "none",
                  "sam2.image_size": 128, "sam2.device": "cpu"},
            env={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"}),
                 "MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": issuer.realm})
        yield {**stack, "url": server.url, "server": server, "issuer": issuer}
    finally:
        if server is not None:
            server.stop()
        issuer.close()


SAVE_WITH_PAGE_FETCH_JS = """
async ([image, n]) => {
  // the request MonaiLabelClient.save_label builds (label.bin, raw uint8), sent by the page's own fetch
  const label = new Uint8Array(n);
  for (let i = n / 2; i < n / 2 + 500; i++) label[i] = 1;
  const form = new FormData();
  form.append('params', JSON.stringify({ client_id: 'someone-else', user: 'admin' }));
  form.append('label', new Blob([label]), 'label.bin');
  const url = new URL('datastore/label', window.location.origin + '/');
  url.searchParams.append('image', image);
  const r = await fetch(url.toString(), { method: 'PUT', body: form });
  return { status: r.status, body: await r.text() };
}
"""


def test_ohif_with_auth_logs_in_and_sends_the_token(auth_stack):
    """Auth on: /ohif/ asks for a login first; after it, every request OHIF makes (DICOMweb through the
    proxy, the MONAI Label panel, a save) carries the token, and the server records the token's user."""
    if not Path(CHROMIUM).exists() or importlib.util.find_spec("playwright") is None:
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt: chromium) and playwright (pip: playwright)")
    from playwright.sync_api import sync_playwright

    url, series = auth_stack["url"], auth_stack["series"]
    assert httpx.get(f"{url}/info/", timeout=30).status_code == 401  # the API itself still needs a token
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    study_uid = dicom.stable_uid(QUERY, "study")
    shape = nib.load(str(auth_stack["root"] / "images" / f"{QUERY}_0000.nii.gz")).shape
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/ohif/", wait_until="load", timeout=120_000)
            page.locator("#ssl-medsam2-login-user").wait_for(timeout=60_000)  # sent to the login page
            assert "ssl_medsam2_login.html" in page.url
            page.fill("#ssl-medsam2-login-user", "annotator")
            page.fill("#ssl-medsam2-login-password", "wrong")
            page.click("#ssl-medsam2-login-submit")
            page.get_by_text("Wrong user name or password").wait_for(timeout=30_000)
            page.fill("#ssl-medsam2-login-password", "annotator-pw")
            page.click("#ssl-medsam2-login-submit")
            for case in CASES:  # the study list comes through the DICOMweb proxy, which needs the token
                page.get_by_text(case, exact=True).first.wait_for(timeout=90_000)
            page.screenshot(path=str(ARTIFACTS / "auth_1_study_list.png"))
            page.goto(f"{url}/ohif/monai-label?StudyInstanceUIDs={study_uid}", wait_until="load", timeout=120_000)
            page.get_by_text("Confirm and Hide").click(timeout=60_000)
            server_input = page.locator("input[value*='127.0.0.1']").first
            server_input.fill(url + "/")
            server_input.press("Tab")
            server_input.locator("xpath=following::button[1]").click()
            page.get_by_text("SSL-MedSAM2", exact=True).first.wait_for(timeout=60_000)  # the panel's /info/
            page.screenshot(path=str(ARTIFACTS / "auth_2_panel_connected.png"))
            saved = page.evaluate(SAVE_WITH_PAGE_FETCH_JS, [series[QUERY], int(np.prod(shape))])
        finally:
            browser.close()
    assert saved["status"] == 200, saved
    assert json.loads(saved["body"])["user"] == "annotator", "the save records the token's user, not the body's"
