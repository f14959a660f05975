"""OHIF + Orthanc + the app, end to end in a real headless Chromium (Debian's, never a downloaded one).

Orthanc (started here) holds five CHAOS MRI studies (128x128 in-plane, 12 slices) and two of them
have a DICOM-SEG (the labelled supports). The app runs on ``--studies <PACS>/dicom-web`` behind a
recording stand-in PACS (what the app lets through). The browser goes through an annotator's loop:
Next Sample in the MONAI Label panel, a few-shot model, a brush stroke and *Save label* (the app's
tools, ``apps/ssl_medsam2/ohif/ssl_medsam2_tools.js``: OHIF's own Export DICOM SEG, a STOW-RS through
the app's guarded proxy); the final label must be in the datastore at once, saver recorded, on the
image's grid. Without a browser: every object but a checked SEG is refused on every proxy POST route,
the PACS sees no client header it does not need. Screenshots go to tests/artifacts/ohif/.
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

from conftest import NO_QUEUE, REPO, downsample_case, load_script
from ssl_medsam2 import dicom, dicom_seg, metrics, pacs

ARTIFACTS = REPO / "tests" / "artifacts" / "ohif"
CHROMIUM = "/usr/bin/chromium"
CASES = ["chaos_01", "chaos_02", "chaos_03", "chaos_05", "chaos_08"]
LABELLED = ["chaos_01", "chaos_02"]
QUERY = "chaos_03"  # saved from the browser
REST_QUERY = "chaos_05"  # saved over REST (the DICOMweb path without a browser)
STOW_QUERY = "chaos_08"  # a DICOM-SEG stored through the proxy (STOW-RS) without a browser
CHAOS_NAMES = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
CLASS_CONF = {"input.class_names": json.dumps(CHAOS_NAMES), "input.classes": "[1]", **NO_QUEUE}
EMPTY_SLICES = 3  # chaos_02's seed SEG leaves its first slices out (a SEG holds only frames with a segment)


class RecordingPacs:
    """Stands between the app and Orthanc as "the PACS": forwards every request and records the
    method, path and headers it received (what the app lets through to a PACS)."""

    def __init__(self, target: str):
        import http.client
        import threading
        import urllib.parse
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.requests = []
        host = urllib.parse.urlparse(target)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                conn = http.client.HTTPConnection(host.hostname, host.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", pacs.free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


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
    recorder = RecordingPacs(orthanc.url)
    server = None
    try:
        series = pacs.upload_folder(orthanc, root / "images", root / "dicom")
        blank = root / "labels" / "chaos_02.nii.gz"  # its truth without the first slices, as its SEG holds it
        img = nib.load(str(blank))
        arr = np.asarray(img.dataobj).copy()
        arr[:, :, :EMPTY_SLICES] = 0
        nib.save(nib.Nifti1Image(arr, img.affine, img.header), str(blank))
        for case in LABELLED:
            orthanc.upload([dicom_seg.label_to_dicom_seg(root / "labels" / f"{case}.nii.gz", root / "dicom" / case,
                                                     root / "dicom" / f"{case}_seg.dcm", class_names=CHAOS_NAMES)])
        server = _pacs_demo().start_monailabel(
            f"{recorder.url}/dicom-web", root / "work",
            conf={**CLASS_CONF, "app.retrain_after_labels": 100, "sam2.checkpoint": "none",  # counted, never due
                  "sam2.image_size": 128, "sam2.n_inserts": 1, "sam2.n_supports": 1, "sam2.device": "cpu"},
            env={"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"})})
        yield {"orthanc": orthanc, "url": server.url, "series": series, "root": root, "server": server,
               "recorder": recorder}
    finally:
        if server is not None:
            server.stop()
        recorder.close()
        orthanc.stop()


def _instances(orthanc) -> int:
    return int(orthanc.get_json("/statistics")["CountInstances"])


def _stow(url: str, dicom_bytes: bytes, route: str = "wado", headers: dict | None = None) -> httpx.Response:
    """OHIF's STOW-RS request (dicomweb-client storeInstances): multipart/related, one application/dicom part."""
    boundary = "ssl-medsam2-test-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + dicom_bytes
            + f"\r\n--{boundary}--\r\n".encode())
    path = f"/proxy/dicom/{route}/studies" if route else "/proxy/dicom/studies"
    return httpx.post(url + path, content=body, timeout=120, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', **(headers or {})})


def _seg_bytes(stack, case: str, label: np.ndarray | None = None, name: str = "seg") -> bytes:
    """A DICOM-SEG of ``case`` (its expert label, or ``label`` on its grid) made by dcmqi, as bytes."""
    root = stack["root"]
    src = root / "labels" / f"{case}.nii.gz"
    if label is not None:
        img = nib.load(str(src))
        src = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(label.astype(np.uint8), img.affine, img.header), str(src))
    return dicom_seg.label_to_dicom_seg(src, root / "dicom" / case, root / f"{name}.dcm",
                                        class_names=CHAOS_NAMES).read_bytes()


def _bad_objects(stack) -> dict[str, bytes]:
    """What the proxy must refuse: a SEG of an unknown series, on another grid, with a segment that is no
    class of the app, and an object that is no SEG (an MR slice of a new series)."""
    import io

    import pydicom

    good = _seg_bytes(stack, STOW_QUERY, name="good")

    def edited(fn) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(good))
        fn(ds)
        out = io.BytesIO()
        ds.save_as(out, write_like_original=False)
        return out.getvalue()

    def unknown_series(ds):
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.826.0.1.3680043.10.1467.999.1"

    def wrong_grid(ds):  # half a voxel off in-plane: every frame between the image's voxels
        for frame in ds.PerFrameFunctionalGroupsSequence:
            pos = frame.PlanePositionSequence[0]
            pos.ImagePositionPatient = [float(pos.ImagePositionPatient[0]) + 1.2, *pos.ImagePositionPatient[1:]]

    def unknown_segment(ds):
        ds.SegmentSequence[0].SegmentLabel = "tumour"

    files = sorted((stack["root"] / "dicom" / STOW_QUERY).glob("*.dcm"))
    mr = pydicom.dcmread(str(files[0]))
    mr.SeriesInstanceUID = mr.SOPInstanceUID = "1.2.826.0.1.3680043.10.1467.999.2"
    buf = io.BytesIO()
    mr.save_as(buf, write_like_original=False)
    return {"unknown series": edited(unknown_series), "wrong grid": edited(wrong_grid),
            "unknown segment": edited(unknown_segment), "not a SEG": buf.getvalue()}


ROUTES = ("wado", "stow", "qido", "")
REASONS = {"unknown series": "unknown image", "wrong grid": "grid", "unknown segment": "tumour",
           "not a SEG": "only a DICOM-SEG"}


def test_datastore_lists_every_pacs_image(stack):
    """``/datastore/?output=all`` lists the PACS's images, not only those the server downloaded so far."""
    listed = httpx.get(f"{stack['url']}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    assert set(stack["series"].values()) <= set(listed), listed.keys()


def test_seed_labels_are_served_on_their_images_grid(stack):
    """A seed label read back from its DICOM-SEG has its image's grid (all slices, same affine) and the
    expert's values, though the SEG holds only the frames with a segment."""
    import SimpleITK as sitk

    url, series, root = stack["url"], stack["series"], stack["root"]
    for case in LABELLED:
        img_path, lab_path = root / f"served_{case}_image.nii.gz", root / f"served_{case}_label.nii.gz"
        img_path.write_bytes(httpx.get(f"{url}/datastore/image", params={"image": series[case]}, timeout=120).content)
        r = httpx.get(f"{url}/datastore/label", params={"label": series[case], "tag": "final"}, timeout=120)
        assert r.status_code == 200, r.text
        lab_path.write_bytes(r.content)
        image, label = nib.load(str(img_path)), nib.load(str(lab_path))
        assert label.shape == image.shape, (case, label.shape, image.shape)
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
        served = sitk.ReadImage(str(lab_path))
        truth = sitk.Resample(sitk.ReadImage(str(root / "labels" / f"{case}.nii.gz")), served, sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(served), sitk.GetArrayFromImage(truth),
                                      err_msg=f"{case}: the served label is not the expert label on the image grid")
        info = httpx.get(f"{url}/datastore/label/info", params={"label": series[case], "tag": "final"}, timeout=60)
        assert "RetrieveURL" not in info.json() and stack["recorder"].url.split("//")[1] not in info.text


def test_proxy_refuses_every_object_but_a_checked_seg(stack):
    """Auth off (MONAI Label: everyone is admin): on every POST route, a SEG of an unknown series, on
    another grid, with a segment outside the label set, and a non-SEG are each a 4xx with a reason;
    nothing new in Orthanc, nothing new labelled."""
    url, orthanc = stack["url"], stack["orthanc"]
    bad = _bad_objects(stack)
    before, stats = _instances(orthanc), httpx.get(f"{url}/datastore/?output=stats", timeout=60).json()
    for route in ROUTES:
        for what, data in bad.items():
            r = _stow(url, data, route)
            assert 400 <= r.status_code < 500 and REASONS[what] in r.json()["detail"], (route, what, r.text)
        r = httpx.post(f"{url}/proxy/dicom/{route + '/' if route else ''}studies", content=b"{}", timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "multipart/related" in r.json()["detail"], r.text
    assert _instances(orthanc) == before, "a refused object reached the PACS"
    assert httpx.get(f"{url}/datastore/?output=stats", timeout=60).json()["completed"] == stats["completed"]


def test_proxy_sends_the_pacs_only_what_it_needs_and_hides_its_address(stack):
    """Reads: the PACS receives no Authorization / Cookie / other client headers; answers name the proxy,
    never the PACS's address."""
    url, recorder = stack["url"], stack["recorder"]
    study = dicom.stable_uid(QUERY, "study")
    n = len(recorder.requests)
    secrets = {"Authorization": "Bearer user-secret-token", "Cookie": "session=user-cookie",
               "X-Api-Key": "user-key", "Accept": "application/dicom+json"}
    for path in ("qido/studies", f"qido/studies/{study}/series", f"wado/studies/{study}/series/"
                 f"{stack['series'][QUERY]}/metadata"):
        r = httpx.get(f"{url}/proxy/dicom/{path}", headers=secrets, timeout=60)
        assert r.status_code == 200, (path, r.text[:300])
        for pacs_address in (recorder.url.split("//")[1], stack["orthanc"].url.split("//")[1]):
            assert pacs_address not in r.text, f"{path}: the answer shows the PACS's address"
    sent = recorder.requests[n:]
    assert len(sent) == 3
    for method, path, headers in sent:
        assert "authorization" not in headers and "cookie" not in headers and "x-api-key" not in headers, headers
        assert headers.get("accept") == "application/dicom+json"
    assert "RetrieveURL" not in httpx.get(f"{url}/datastore/image/info", params={"image": stack["series"][QUERY]},
                                          timeout=60).json()


def _retrain_pending(url: str, headers: dict | None = None) -> list[str]:
    return httpx.get(f"{url}/info/", timeout=30, headers=headers).json()["ssl_medsam2"]["retrain"]["pending"]


def _lease(url: str, image: str, holder: str) -> None:
    """Lease ``image`` to ``holder`` through the strategy an annotator uses: stand-ins take the images
    handed out before it, then give them back."""
    def ask(name: str) -> str:
        return httpx.post(f"{url}/activelearning/first", json={"client_id": name}, timeout=60).json().get("id")

    def give_back(name: str, what: str) -> None:
        httpx.delete(f"{url}/ssl_medsam2/leases/{what}", params={"client_id": name}, timeout=30)

    held = []
    for k in range(len(CASES)):
        got = ask(f"{holder}-stand-in-{k}")
        if got == image:
            give_back(f"{holder}-stand-in-{k}", got)
            break
        held.append((f"{holder}-stand-in-{k}", got))
    assert ask(holder) == image, f"{image} was not handed out"
    for name, what in held:
        give_back(name, what)
    assert httpx.get(f"{url}/ssl_medsam2/leases", timeout=30).json()[image]["holder"] == holder


def test_stow_of_a_seg_becomes_the_final_label(stack):
    """OHIF's Export DICOM SEG, as a request: the SEG becomes the image's final label at once, through the
    same save path as PUT /datastore/label (saver, grid, label values; the app writes the SEG itself)."""
    import SimpleITK as sitk

    url, orthanc, series, root = stack["url"], stack["orthanc"], stack["series"], stack["root"]
    image = series[STOW_QUERY]
    truth = nib.load(str(root / "labels" / f"{STOW_QUERY}.nii.gz"))
    edited = np.asarray(truth.dataobj).astype(np.uint8)
    edited[edited == 3] = 0  # a person's correction: one organ removed
    _lease(url, image, "alice")
    before = httpx.get(f"{url}/datastore/?output=stats", timeout=60).json()["completed"]
    pending = _retrain_pending(url)
    n_instances = _instances(orthanc)
    r = _stow(url, _seg_bytes(stack, STOW_QUERY, edited, name="edited"))
    assert r.status_code == 200, r.text
    assert r.json()["user"] == "anonymous@127.0.0.1" and r.json()["image"] == image  # auth off: the client
    # at once: counted as labelled, the lease ended (a final label ends anyone's), retraining counted
    assert httpx.get(f"{url}/datastore/?output=stats", timeout=60).json()["completed"] == before + 1
    assert r.json()["lease_released"] and image not in httpx.get(f"{url}/ssl_medsam2/leases", timeout=30).json()
    assert _retrain_pending(url) == pending + [image] and r.json()["retrain_pending"] == len(pending) + 1
    assert _instances(orthanc) == n_instances + 1, "the app's own SEG of the saved label is in the PACS"
    lab = root / "stowed_label.nii.gz"
    lab.write_bytes(httpx.get(f"{url}/datastore/label", params={"label": image, "tag": "final"}, timeout=120).content)
    info = httpx.get(f"{url}/datastore/label/info", params={"label": image, "tag": "final"}, timeout=60).json()
    assert info["user"] == r.json()["user"]
    served = sitk.ReadImage(str(lab))
    ref = root / "edited.nii.gz"
    sent = sitk.Resample(sitk.ReadImage(str(ref)), served, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(served), sitk.GetArrayFromImage(sent))
    assert set(np.unique(sitk.GetArrayFromImage(served))) == set(np.unique(edited)) and 3 not in np.unique(edited)


def _overlay_pixels(before: Path, after: Path, box: dict) -> int:
    """Pixels of the viewport that turned colour (segment colours are saturated; MRI is grey; the
    viewport's text overlays are the same in both shots)."""
    from PIL import Image

    x0, y0, x1, y1 = int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"])
    a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int)[y0:y1, x0:x1] for p in (before, after))
    changed = np.abs(b - a).sum(axis=2) > 60
    tinted = (b.max(axis=2) - b.min(axis=2)) > 60
    return int((changed & tinted).sum())


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


LABELMAP_JS = """
() => {
  // voxels per segment name of the labelmap OHIF holds (OHIF's own services: window.sslMedsam2)
  const { segmentationService } = window.sslMedsam2.servicesManager.services;
  const segs = segmentationService.getSegmentations() || [];
  if (!segs.length) return null;
  const seg = segs[segs.length - 1];
  const data = segmentationService.getLabelmapVolume(seg.segmentationId).voxelManager.getCompleteScalarDataArray();
  const counts = {};
  for (const v of data) if (v) counts[v] = (counts[v] || 0) + 1;
  const named = {};
  for (const [i, n] of Object.entries(counts)) named[seg.segments[i].label] = n;
  return named;
}
"""


def _browser():
    if not Path(CHROMIUM).exists() or importlib.util.find_spec("playwright") is None:
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt: chromium) and playwright (pip: playwright)")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def _open_monai_label(page, url: str, study_uid: str) -> None:
    """The study in OHIF's MONAI Label mode, its panel connected to this server (as a person does it)."""
    page.goto(f"{url}/ohif/monai-label?StudyInstanceUIDs={study_uid}", wait_until="load", timeout=120_000)
    _connect_panel(page, url)


def _connect_panel(page, url: str, first_visit: bool = True) -> None:
    if first_visit:  # OHIF's "investigational use" notice, once per browser session
        page.get_by_text("Confirm and Hide").click(timeout=60_000)
    page.wait_for_function("() => [...document.querySelectorAll('canvas')].some(c => c.width > 100)", timeout=60_000)
    server_input = page.locator("input[value*='127.0.0.1']").first
    server_input.fill(url + "/")
    server_input.press("Tab")
    server_input.locator("xpath=following::button[1]").click()
    page.get_by_text("SSL-MedSAM2", exact=True).first.wait_for(timeout=60_000)
    page.locator("#ssl-medsam2-save").wait_for(timeout=30_000)  # the app's tools are on the page
    page.wait_for_timeout(2000)


def _run_model(page, model: str, logs: list[str]) -> float:
    """Auto-Segmentation: pick the model, press its Run button, wait until OHIF shows the result."""
    seen = len(logs)
    models = page.locator("select:visible", has=page.locator(f"option:text-is('{model}')")).first
    models.select_option(label=model)
    t0 = time.time()
    models.locator("xpath=following::button[1]").click()  # its Run button
    deadline = time.time() + 300
    while not any("updated the segmentation's scalar data" in m for m in logs[seen:]):
        assert not any("Failed to Run Segmentation" in m for m in logs[seen:]), logs[-20:]
        assert time.time() < deadline, "no segmentation after 300 s:\n" + "\n".join(logs[-20:])
        page.wait_for_timeout(500)
    page.wait_for_timeout(2000)
    return time.time() - t0


def _brush_stroke(page, box: dict, segment: str) -> None:
    """The app's segment picker and Brush button, then one stroke with the left mouse button in the axial
    viewport, from inside the liver outwards."""
    page.select_option("#ssl-medsam2-segment", label=segment)
    page.click("#ssl-medsam2-brush")
    page.get_by_text("brush: paint with the left button").wait_for(timeout=10_000)
    x, y = box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.50
    page.mouse.move(x, y)
    page.mouse.down()
    for k in range(1, 9):
        page.mouse.move(x + k * box["width"] * 0.025, y, steps=2)
    page.mouse.up()
    page.wait_for_timeout(1000)


def _save_from_ohif(page, name: str, shot: str) -> str:
    """The app's Save label button: OHIF's own Export DICOM SEG (its report dialog), then the status line."""
    page.click("#ssl-medsam2-save")
    page.get_by_text("Create Report").wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / f"{shot}_save_dialog.png"))
    page.get_by_text("Enter the report name").locator("xpath=following::input[1]").fill(name)
    page.get_by_role("button", name="Save", exact=True).click()
    page.wait_for_function("() => /saved as|not saved/.test(document.getElementById('ssl-medsam2-status')"
                           ".textContent)", timeout=120_000)
    return page.locator("#ssl-medsam2-status").text_content()


def _model(url: str, headers: dict | None = None) -> str:
    info = httpx.get(f"{url}/info/", timeout=30, headers=headers).json()
    unavailable = info.get("unavailable_models") or {}
    return next(m for m in ("atlas_fewshot", "sam2_fewshot") if m in info["models"] and m not in unavailable)


def test_ohif_annotator_loop_next_sample_model_brush_save(stack):
    """A person's loop in OHIF on Orthanc, in a real Chromium: Next Sample (MONAI Label panel), a few-shot
    model (Auto-Segmentation), a brush stroke (the app's Brush), Save label (the app's button: OHIF's own
    Export DICOM SEG, STOW through the proxy). The final label is in the datastore at once: the client
    recorded as saver, on the image's grid, CHAOS's liver id, OHIF's voxels, the lease ended."""
    import SimpleITK as sitk

    url, orthanc, series, root = stack["url"], stack["orthanc"], stack["series"], stack["root"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS.parent / ".gitignore").write_text("*\n")
    model = _model(url)
    completed = httpx.get(f"{url}/datastore/?output=stats", timeout=60).json()["completed"]
    study_case = {dicom.stable_uid(c, "study"): c for c in CASES}
    logs: list[str] = []
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: logs.append(m.text))
            page.on("dialog", lambda d: d.accept())  # Next Sample's "This action will reload current page"
            # 1. a labelled study open in the MONAI Label mode; Next Sample hands out an unlabelled one
            _open_monai_label(page, url, dicom.stable_uid(LABELLED[0], "study"))
            page.get_by_role("button", name="Next Sample").click()
            page.get_by_text("Active Learning - Next Sample").wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "loop_1_next_sample.png"))
            page.get_by_role("button", name="OK", exact=True).click()
            page.wait_for_url(lambda u: dicom.stable_uid(LABELLED[0], "study") not in u, timeout=60_000)
            case = study_case[page.url.rsplit("=", 1)[1]]
            image = series[case]
            assert case not in LABELLED, case
            lease = httpx.get(f"{url}/ssl_medsam2/leases", timeout=30).json().get(image)
            assert lease, f"Next Sample did not lease {case}"
            _connect_panel(page, url, first_visit=False)
            axial = page.locator("canvas").first.bounding_box()
            before = ARTIFACTS / "loop_0_study.png"
            page.screenshot(path=str(before))
            # 2. the few-shot model
            infer_s = _run_model(page, model, logs)
            page.screenshot(path=str(ARTIFACTS / "loop_2_model.png"))
            overlay_px = _overlay_pixels(before, ARTIFACTS / "loop_2_model.png", axial)
            assert overlay_px > 300, f"overlay not visible: {overlay_px} pixels turned colour in the axial view"
            model_counts = page.evaluate(LABELMAP_JS)
            # 3. a correction with the brush
            _brush_stroke(page, axial, "liver")
            edited_counts = page.evaluate(LABELMAP_JS)
            page.screenshot(path=str(ARTIFACTS / "loop_3_brush.png"))
            assert edited_counts["liver"] > model_counts["liver"], (model_counts, edited_counts)
            # 4. Save label: OHIF's Export DICOM SEG through the proxy
            t0 = time.time()
            status = _save_from_ohif(page, "liver corrected", "loop_4")
            save_s = time.time() - t0
            page.screenshot(path=str(ARTIFACTS / "loop_4_saved.png"))
        finally:
            browser.close()
    assert status == "saved as the final label", (status, logs[-20:])

    # 5. at once: the final label, who saved it, on the image's grid, OHIF's voxels with CHAOS's ids
    stats = httpx.get(f"{url}/datastore/?output=stats", timeout=60).json()
    assert stats["completed"] == completed + 1, stats
    info = httpx.get(f"{url}/datastore/label/info", params={"label": image, "tag": "final"}, timeout=60).json()
    assert info["user"] == lease["holder"] == "anonymous@127.0.0.1", (info, lease)
    assert info["source"] == "DICOM-SEG (STOW)"
    assert image not in httpx.get(f"{url}/ssl_medsam2/leases", timeout=30).json(), "the lease did not end"
    img_path, lab_path = root / f"loop_{case}_image.nii.gz", root / f"loop_{case}_label.nii.gz"
    img_path.write_bytes(httpx.get(f"{url}/datastore/image", params={"image": image}, timeout=120).content)
    lab_path.write_bytes(httpx.get(f"{url}/datastore/label", params={"label": image, "tag": "final"},
                                   timeout=120).content)
    img, lab = nib.load(str(img_path)), nib.load(str(lab_path))
    assert lab.shape == img.shape
    np.testing.assert_allclose(lab.affine, img.affine, atol=1e-4)
    values, counts = np.unique(np.asarray(lab.dataobj), return_counts=True)
    saved = {int(v): int(n) for v, n in zip(values, counts) if v}
    chaos_id = {name: i for i, name in CHAOS_NAMES.items()}  # OHIF numbers its segments its own way:
    assert saved == {chaos_id[name]: n for name, n in edited_counts.items()}, (saved, edited_counts)  # by name
    dice = _dice_with_truth(sitk.ReadImage(str(lab_path)), root / "labels" / f"{case}.nii.gz")
    print(json.dumps({"case": case, "model": model, "infer_s": round(infer_s, 1), "save_s": round(save_s, 1),
                      "overlay_px": overlay_px, "model_voxels": model_counts, "saved_voxels": saved,
                      "dice_vs_expert_liver": round(float(dice), 3)}))
    if model == "atlas_fewshot":  # a real segmentation: it must sit on the liver (not mirrored or shifted)
        assert dice > 0.4, f"saved label does not overlap the liver (Dice {dice:.2f}): geometry lost on the way"
    nxt = httpx.post(f"{url}/activelearning/first", json={"client_id": "someone-else"}, timeout=60).json()
    assert nxt.get("id") != image, "a labelled image was handed out again"


# ------------------------------------------------------------------------------- OHIF with auth on
@pytest.fixture(scope="module")
def auth_stack(stack):
    """A second app server on the same Orthanc, with Keycloak-style auth on (the issuer of test_auth.py)."""
    from test_auth import Issuer

    issuer = Issuer()
    server = None
    try:
        server = _pacs_demo().start_monailabel(  # no class names or ids configured: the label set is the seeds'
            f"{stack['recorder'].url}/dicom-web", stack["root"] / "work_auth",
            conf={"app.retrain_after_labels": 0, "sam2.checkpoint": "none", "sam2.image_size": 128,
                  "sam2.device": "cpu", **NO_QUEUE},
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


def _login(page, url: str, user: str) -> None:
    page.goto(f"{url}/ohif/", wait_until="load", timeout=120_000)
    page.locator("#ssl-medsam2-login-user").wait_for(timeout=60_000)
    page.fill("#ssl-medsam2-login-user", user)
    page.fill("#ssl-medsam2-login-password", f"{user}-pw")
    page.click("#ssl-medsam2-login-submit")
    page.get_by_text(QUERY, exact=True).first.wait_for(timeout=90_000)


def test_ohif_viewer_cannot_save_a_label(auth_stack):
    """Auth on, a viewer (role monailabel-user) in OHIF: may look and run a model, but Save label (OHIF's
    Export DICOM SEG through the proxy) is refused with the reason shown; nothing new in Orthanc, the image
    stays unlabelled."""
    url, orthanc, series = auth_stack["url"], auth_stack["orthanc"], auth_stack["series"]
    token = {"Authorization": f"Bearer {auth_stack['issuer'].token('viewer')}"}
    model = _model(url, token)
    before = _instances(orthanc)
    labelled = httpx.get(f"{url}/datastore/?output=stats", timeout=60, headers=token).json()["completed"]
    logs: list[str] = []
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: logs.append(m.text + " " + " ".join(str(a) for a in m.args)))
            _login(page, url, "viewer")
            _open_monai_label(page, url, dicom.stable_uid(REST_QUERY, "study"))
            _run_model(page, model, logs)
            status = _save_from_ohif(page, "viewer's try", "auth_3")
            page.screenshot(path=str(ARTIFACTS / "auth_3_viewer_refused.png"))
        finally:
            browser.close()
    assert status.startswith("not saved: 403") and "monailabel-annotator" in status, \
        (status, [m for m in logs if "ssl-medsam2" in m])
    assert _instances(orthanc) == before, "a viewer's SEG reached the PACS"
    assert httpx.get(f"{url}/datastore/?output=stats", timeout=60, headers=token).json()["completed"] == labelled


def test_viewer_cannot_store_through_the_proxy(auth_stack):
    """Auth on: a viewer's STOW is refused (403) on every route, even a valid SEG; an annotator's bad SEG
    is still checked (4xx with a reason); nothing new in Orthanc."""
    url, orthanc, issuer = auth_stack["url"], auth_stack["orthanc"], auth_stack["issuer"]
    viewer = {"Authorization": f"Bearer {issuer.token('viewer')}"}
    annotator = {"Authorization": f"Bearer {issuer.token('annotator')}"}
    objects = {"valid SEG": _seg_bytes(auth_stack, REST_QUERY, name="viewer_try"), **_bad_objects(auth_stack)}
    before = _instances(orthanc)
    for route in ROUTES:
        for what, data in objects.items():
            r = _stow(url, data, route, headers=viewer)
            assert r.status_code == 403, (route, what, r.status_code, r.text)
        r = _stow(url, objects["wrong grid"], route, headers=annotator)
        assert r.status_code == 422 and "grid" in r.json()["detail"], r.text
    assert _instances(orthanc) == before, "a refused object reached the PACS"
    # an annotator's valid SEG is saved as the token's user; the PACS never sees the user's token
    recorder = auth_stack["recorder"]
    n = len(recorder.requests)
    r = _stow(url, objects["valid SEG"], headers=annotator)
    assert r.status_code == 200 and r.json()["user"] == "annotator", r.text
    assert _instances(orthanc) == before + 1
    sent = recorder.requests[n:]
    assert any(method == "POST" for method, _, _ in sent), "the app did not write its SEG to the PACS"
    for method, path, headers in sent:
        assert annotator["Authorization"].split()[1] not in json.dumps(headers), (method, path)


def test_label_set_on_dicomweb_comes_from_the_first_labels(auth_stack):
    """No class names or ids configured: on DICOMweb the seeds' classes (1-4) are the label set, so a
    label holding class 7 is refused, naming it (before: any id was accepted)."""
    url, series = auth_stack["url"], auth_stack["series"]
    shape = nib.load(str(auth_stack["root"] / "images" / f"{REST_QUERY}_0000.nii.gz")).shape
    label = np.zeros(int(np.prod(shape)), np.uint8)
    label[:50] = 7
    r = httpx.put(f"{url}/datastore/label", params={"image": series[REST_QUERY], "tag": "final"},
                  files={"label": ("label.bin", label.tobytes())}, timeout=120,
                  headers={"Authorization": f"Bearer {auth_stack['issuer'].token('annotator')}"})
    assert r.status_code == 422 and "[7]" in r.json()["detail"], r.text
