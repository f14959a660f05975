"""OHIF's Point Prompts tab drives the app's ``point_prompts`` model in a real headless Chromium.

The stack of tests/test_ohif_browser.py (Orthanc with CHAOS studies, the app on its DICOMweb URL). The
browser opens the unlabelled study in the MONAI Label mode, connects the panel, opens the Point Prompts
tab, picks the model and the organ, places a point on the liver in the axial view and presses Run: the request OHIF
sends must be the deepedit payload (``background`` + the organ's name with the point, as the cornerstone
volume's voxel indices, ``result_extension=.nrrd``...), the answer 200, and the segment must show up in
the viewport. The same payload over REST answers the organ at the clicked voxel.
Screenshots go to tests/artifacts/ohif/.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ssl_medsam2 import dicom
from test_ohif_browser import ARTIFACTS, CHAOS_NAMES, CHROMIUM, QUERY, _overlay_pixels, stack  # noqa: F401  (module fixture)

ORGAN = CHAOS_NAMES[1]  # the stack names its classes (test_ohif_browser.CLASS_CONF): "liver"


def _params_of(post_data: str) -> dict:
    """The ``params`` field of OHIF's multipart infer request."""
    m = re.search(r'name="params"\r?\n\r?\n(.*?)\r?\n--', post_data, re.S)
    assert m, post_data[:400]
    return json.loads(m.group(1))


def test_ohif_point_prompts_place_a_point_and_the_segment_updates(stack):  # noqa: F811
    if not Path(CHROMIUM).exists() or importlib.util.find_spec("playwright") is None:
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt: chromium) and playwright (pip: playwright)")
    from playwright.sync_api import sync_playwright

    url, series = stack["url"], stack["series"]
    info = httpx.get(f"{url}/info/", timeout=30).json()
    assert info["models"]["point_prompts"]["type"] == "deepedit" and ORGAN in info["labels"]
    study_uid = dicom.stable_uid(QUERY, "study")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS.parent / ".gitignore").write_text("*\n")
    logs: list[str] = []
    sent: list[dict] = []
    answers: list[int] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: logs.append(m.text))
            page.on("request", lambda r: sent.append(_params_of(r.post_data)) if "/infer/point_prompts" in r.url
                    and r.method == "POST" else None)
            page.on("response", lambda r: answers.append(r.status) if "/infer/point_prompts" in r.url else None)
            page.goto(f"{url}/ohif/monai-label?StudyInstanceUIDs={study_uid}", wait_until="load", timeout=120_000)
            page.get_by_text("Confirm and Hide").click(timeout=60_000)
            page.wait_for_function("() => [...document.querySelectorAll('canvas')].some(c => c.width > 100)",
                                   timeout=60_000)
            page.wait_for_timeout(3000)
            server_input = page.locator("input[value*='127.0.0.1']").first
            server_input.fill(url + "/")
            server_input.press("Tab")
            server_input.locator("xpath=following::button[1]").click()
            page.get_by_text("SSL-MedSAM2", exact=True).first.wait_for(timeout=60_000)
            # the Point Prompts tab, its model, the organ; then one point on the liver (the patient's right)
            page.get_by_text("Point Prompts", exact=True).first.click()
            models = page.locator("select:visible", has=page.locator("option:text-is('point_prompts')")).first
            models.select_option(label="point_prompts")
            page.locator("tr.clickable-row", has_text=ORGAN).first.click()
            axial = page.locator("canvas").first.bounding_box()
            page.mouse.click(axial["x"] + axial["width"] * 0.25, axial["y"] + axial["height"] * 0.5)  # the liver
            page.wait_for_timeout(1500)
            before = ARTIFACTS / "pp_1_point_placed.png"
            page.screenshot(path=str(before))
            t0 = time.time()
            models.locator("xpath=following::button[1]").click()  # Run
            deadline = time.time() + 180
            while not any("updated the segmentation's scalar data" in m for m in logs):
                assert not any("Failed to Run Inference for Point Prompts" in m for m in logs), (answers, logs[-20:])
                assert time.time() < deadline, "no segment update after 180 s:\n" + "\n".join(logs[-20:])
                page.wait_for_timeout(300)
            click_s = time.time() - t0
            page.wait_for_timeout(1500)
            after = ARTIFACTS / "pp_2_segment_updated.png"
            page.screenshot(path=str(after))
            tinted = _overlay_pixels(before, after, axial)
        finally:
            browser.close()
    assert answers == [200], answers
    assert len(sent) == 1, sent
    params = sent[0]
    # OHIF's exact deepedit payload: background + the organ's points (cornerstone voxel indices, rounded)
    assert params["background"] == [] and len(params[ORGAN]) == 1 and all(isinstance(v, int) for v in params[ORGAN][0])
    assert (params["result_extension"], params["result_dtype"], params["result_compress"],
            params["restore_label_idx"]) == (".nrrd", "uint8", False, False)
    assert tinted > 20, f"the segment did not show: {tinted} pixels turned colour in the axial view"
    # the same request over REST: the organ (answer value 1 = the first organ) is at the clicked voxel
    r = httpx.post(f"{url}/infer/point_prompts", params={"image": series[QUERY], "output": "image"},
                   data={"params": json.dumps(params)}, timeout=120)
    assert r.status_code == 200, r.text
    path = stack["root"] / "pp_answer.nrrd"
    path.write_bytes(r.content)
    import SimpleITK as sitk

    ans = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)  # (i, j, k)
    i, j, k = params[ORGAN][0]
    assert ans[i, j, k] == 1, "the organ is not where OHIF placed the point"
    print(json.dumps({"point": params[ORGAN][0], "click_s": round(click_s, 2), "overlay_px": tinted}))
