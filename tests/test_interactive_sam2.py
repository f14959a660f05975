"""The SAM2 correction engine (``interactive.engine: sam2``) on real CHAOS MRI with RANDOM-weight SAM2.1
Hiera-T at 64 px on CPU (``sam2.checkpoint=none``, asked for explicitly): mechanics only, never accuracy.

What must hold: the answer has the volume's shape and differs from the base only inside the window of
slices around the clicked ones; both directions reach the window's ends; a second click on the same
prepared image encodes no slice again (encoder calls counted); the library entry and the app's composition
use it with a whole config; a missing checkpoint is a clear error, and the app names it as the models'
unavailability (the route's 503).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from conftest import REPO, organ_crop
from sam2_helpers import SMALL, deepest_point, stock_window_track
from ssl_medsam2 import interactive
from ssl_medsam2.config import load_config
from ssl_medsam2.engines.sam2_model import CheckpointNotFound
from ssl_medsam2.interactive.compose import corrected_label
from ssl_medsam2.interactive.requests import Edit
from ssl_medsam2.interactive.sam2_prompts import _scribble_points, correct_mask_sam2, sam2_engine, windows
from ssl_medsam2.interactive.settings import InteractiveSettings

SPLEEN, WINDOW = 4, 2
CFG = SMALL + ["interactive.engine=sam2", f"interactive.sam2_window_slices={WINDOW}"]


@pytest.fixture(scope="module")
def crop(chaos_dir):
    """chaos_03 around the spleen: 96 x 96 in-plane at full resolution, 13 slices (z = the last axis)."""
    image, spacing, truth = organ_crop(chaos_dir, "chaos_03", SPLEEN, 6, 6)
    return image, spacing, truth == SPLEEN


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides=CFG)


def _count_encoded(engine, monkeypatch) -> list:
    """Frames through SAM2's image encoder, one entry per batched call."""
    calls, predictor = [], engine.predictor
    original = predictor.forward_image
    monkeypatch.setattr(predictor, "forward_image", lambda batch: calls.append(len(batch)) or original(batch))
    return calls


def test_only_the_window_changes_and_both_directions_reach_its_ends(crop, cfg):
    image, spacing, spleen = crop
    prepared = interactive.prepare(image, spacing)
    s = InteractiveSettings.from_config(cfg)
    z = 6
    base = spleen.copy()
    base[:, :, z] = False  # a missed slice: the click says the spleen is there
    fg = [deepest_point(spleen[:, :, z]) + [z]]
    bg = [[2, 2, z]]
    out, report = correct_mask_sam2(prepared.image, spacing, base, np.array(fg), np.array(bg), None, None, s, cfg)
    assert out.shape == base.shape and out.dtype == bool
    assert report.axis == 2 and report.windows == [(z - WINDOW, z + WINDOW)] and report.clicked == [z]
    outside = np.ones(base.shape, bool)
    outside[:, :, z - WINDOW:z + WINDOW + 1] = False
    assert not (out != base)[outside].any(), "outside the window the base label stays"
    assert (out != base)[~outside].any(), "random weights: SAM2's answer differs from the base in the window"
    assert report.forward == list(range(z + 1, z + WINDOW + 1)), "forward: from the clicked slice to the end"
    assert report.backward == list(range(z - 1, z - WINDOW - 1, -1)), "backward: to the window's start"
    # the library entry (what the app's composition calls) gives the same mask
    again = interactive.correct(prepared, base, fg, bg, settings=cfg)
    assert np.array_equal(again, out)


def test_clicked_slices_close_together_share_one_window_tracked_both_ways(crop, cfg):
    assert windows([3, 5, 12], 2, 13) == [(1, 7, [3, 5]), (10, 12, [12])]
    assert windows([0], 2, 13) == [(0, 2, [0])]
    image, spacing, spleen = crop
    prepared = interactive.prepare(image, spacing)
    fg = [deepest_point(spleen[:, :, z]) + [z] for z in (4, 6)]
    _, report = correct_mask_sam2(prepared.image, spacing, spleen, np.array(fg), np.zeros((0, 3), int), None, None,
                                  InteractiveSettings.from_config(cfg), cfg)
    assert report.windows == [(2, 8)] and report.clicked == [4, 6]
    assert report.forward == [5, 7, 8] and report.backward == [5, 3, 2], "the slice between is reached both ways"


def test_batched_window_equals_sam2s_own_propagation(crop, cfg):
    """Mask + points on two clicked slices, both directions through one window: the engine's batched track
    gives the stock predictor's probabilities (float32, CPU)."""
    image, spacing, spleen = crop
    prepared = interactive.prepare(image, spacing)
    fg = [deepest_point(spleen[:, :, 4]) + [4], deepest_point(spleen[:, :, 6]) + [6]]
    bg = [[2, 2, 6]]
    base = spleen.copy()
    base[:, :, 4] = False  # one clicked slice prompted by its points alone, the other by mask + points
    one = replace(InteractiveSettings.from_config(cfg), sam2_window_slices=1)  # window 3..7: a cheaper oracle
    _, report = correct_mask_sam2(prepared.image, spacing, base, np.array(fg), np.array(bg), None, None, one, cfg)
    stock = stock_window_track(sam2_engine(cfg)[0], prepared.image, base, fg, bg, 3, 7, [4, 6])
    assert list(report.probabilities) == list(stock) == list(range(3, 8))
    for z in stock:
        assert np.abs(report.probabilities[z] - stock[z]).max() <= 1e-4, z


def test_a_second_click_on_the_same_image_encodes_no_slice_again(crop, cfg, monkeypatch):
    image, spacing, spleen = crop
    calls = _count_encoded(sam2_engine(cfg)[0], monkeypatch)
    prepared = interactive.prepare(image, spacing)
    z = 6
    click = deepest_point(spleen[:, :, z]) + [z]
    interactive.correct(prepared, spleen, [click], [], settings=cfg)
    assert sum(calls) == 2 * WINDOW + 1 and len(calls) == 1, "the window's slices, in one batched pass"
    interactive.correct(prepared, spleen, [click], [[2, 2, z]], settings=cfg)
    assert sum(calls) == 2 * WINDOW + 1, "the second click on the image encodes nothing"
    interactive.correct(prepared, spleen, [click[:2] + [z + 1]], [], settings=cfg)
    assert sum(calls) == 2 * WINDOW + 2, "a click one slice further encodes the one new slice only"
    assert prepared.extra["sam2_slices"].nbytes > 0  # the server's cache counts them (cache.nbytes)
    from ssl_medsam2.interactive.cache import nbytes

    assert nbytes(prepared) >= prepared.extra["sam2_slices"].nbytes + prepared.image.nbytes


def test_the_apps_composition_corrects_one_organ_keeps_the_others_and_takes_scribbles(crop, cfg):
    image, spacing, spleen = crop
    prepared = interactive.prepare(image, spacing)
    label = np.where(spleen, SPLEEN, 0).astype(np.uint8)
    label[:10, :10, :] = 1  # another organ in a corner
    z = 6
    edit = Edit(SPLEEN, foreground=np.array([deepest_point(spleen[:, :, z]) + [z]]))
    out = corrected_label(prepared, label, [edit], settings=cfg)
    assert out.shape == label.shape and np.array_equal(out[:, :, :z - WINDOW], label[:, :, :z - WINDOW])
    assert (out[:10, :10, :] == 1).all(), "the other organ is never relabelled"
    # Slicer's scribbles: a few points per scribble and slice prompt SAM2 the same way
    scribble = np.zeros(spleen.shape, bool)
    scribble[30:60, 48, z] = True
    assert len(_scribble_points(scribble, 2)) == 5 and (_scribble_points(scribble, 2)[:, 2] == z).all()
    by_scribble = interactive.correct(prepared, spleen, [], [], fg_scribble=scribble, settings=cfg)
    assert np.array_equal(by_scribble[:, :, :z - WINDOW], spleen[:, :, :z - WINDOW])


def _app():
    sys.path.insert(0, str(REPO / "apps" / "ssl_medsam2"))
    import lib.interactive as app

    return app


def test_slicer_smart_edit_runs_the_sam2_engine_when_configured(crop, cfg, tmp_path):
    """The app's deepgrow model (Slicer's Smart Edit) with ``interactive.engine: sam2``: the click in the
    image file's indices, the answer a binary label on the image's grid that changed in the window only."""
    import nibabel as nib

    from ssl_medsam2.interactive.cache import ClientCache

    image, spacing, spleen = crop
    path = tmp_path / "crop.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([*spacing, 1.0])), str(path))
    app = _app()
    task = app.InteractiveInfer(SimpleNamespace(cfg=cfg, label_ids={1, 4}), app.DEEPGROW, "test", ClientCache(1 << 30))
    assert task.availability() == (True, "ok")
    z = 6
    click = deepest_point(spleen[:, :, z]) + [z]
    result, meta = task({"image": str(path), app.LABEL_NAME: "class_4", app.OWNER: "annotator",
                         "foreground": [click], "background": [], "result_extension": ".nii.gz"})
    try:
        out = np.asarray(nib.load(result).dataobj)
    finally:
        os.unlink(result)
    assert out.shape == image.shape and set(np.unique(out)) <= {0, 1} and meta["label_names"] == {"class_4": 1}
    changed = np.flatnonzero(out.any(axis=(0, 1)))  # the base is empty (no datastore label): all change is new
    assert meta["changed_voxels"] > 0 and changed.min() >= z - WINDOW and changed.max() <= z + WINDOW


def test_a_missing_checkpoint_is_a_clear_error_and_the_app_says_so(crop, tmp_path):
    image, spacing, spleen = crop
    missing = load_config(overrides=CFG[1:] + [f"sam2.checkpoint={tmp_path / 'absent.pt'}"])
    prepared = interactive.prepare(image, spacing)
    with pytest.raises(CheckpointNotFound, match="SAM2 checkpoint not found"):
        interactive.correct(prepared, spleen, [[40, 40, 6]], [], settings=missing)

    from ssl_medsam2.interactive.cache import ClientCache

    app = _app()
    task = app.InteractiveInfer(SimpleNamespace(cfg=missing, label_ids={1, 4}), app.DEEPGROW, "test",
                                ClientCache(1 << 20))
    ok, reason = task.availability()
    assert not ok and "interactive.engine is sam2" in reason and "absent.pt" in reason and "graphcut" in reason
    weightfree = app.InteractiveInfer(SimpleNamespace(cfg=load_config(), label_ids={1, 4}), app.DEEPGROW, "test",
                                      ClientCache(1 << 20))
    assert weightfree.availability() == (True, "ok")
