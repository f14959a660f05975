"""Interactive correction's edge, without a server: client points (file voxel order) -> canonical indices on
a volume that is not stored RAS, the checks every click passes, how a corrected organ joins the label
(other organs kept), and the per-client cache."""

from __future__ import annotations

import threading

import nibabel as nib
import numpy as np
import pytest

from ssl_medsam2.interactive import PreparedVolume
from ssl_medsam2.interactive import requests as rq
from ssl_medsam2.interactive.cache import ClientCache
from ssl_medsam2.interactive.compose import corrected_label, keep_other_organs, organ_mask
from ssl_medsam2.io import InputError, load_volume

ORGANS = rq.Organs.from_map({"liver": 1, "right kidney": 2, "left kidney": 3, "spleen": 4})


@pytest.fixture()
def odd_volume(tmp_path):
    """A 5x6x7 volume stored with permuted, flipped axes (codes P, I, L): voxel value = its file index code."""
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    aff = np.zeros((4, 4))
    aff[1, 0], aff[2, 1], aff[0, 2], aff[3, 3] = -2.0, -3.0, -1.5, 1.0
    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(path))
    vol = load_volume(path)
    assert nib.aff2axcodes(aff) == ("P", "I", "L") and vol.shape == (7, 5, 6)
    return vol, data


def test_points_land_on_the_voxel_the_client_placed_them_on(odd_volume):
    vol, data = odd_volume
    pts = [[0, 0, 0], [4, 5, 6], [2, 1, 3], [4, 0, 6]]
    c = rq.canonical_points(vol, pts, "foreground")
    assert np.array_equal(vol.array[tuple(c.T)], data[tuple(np.asarray(pts).T)])
    # the physical position is kept too (file affine vs canonical affine)
    phys_src = (vol.source_affine @ np.c_[np.asarray(pts), np.ones(4)].T)[:3]
    phys_can = (vol.affine @ np.c_[c, np.ones(4)].T)[:3]
    assert np.allclose(phys_src, phys_can)
    box = rq.canonical_box(vol, [4, 2, 0, 1, 6, 6])  # corners in any order, as Slicer's RAS->IJK gives them
    sub = vol.array[box]
    assert sorted(sub.ravel().tolist()) == sorted(data[2:5, 0:2, 6:7].ravel().tolist())


@pytest.mark.parametrize("points, reason", [
    ([[5, 0, 0]], "outside the image"), ([[-1, 0, 0]], "outside the image"), ([[1.5, 0, 0]], "whole voxel"),
    ([[float("inf"), 0, 0]], "whole voxel"), ([[float("nan"), 0, 0]], "whole voxel"), ([["1", 0, 0]], "numbers"),
    ([[True, 0, 0]], "numbers"), ([[1, 2]], r"\[i, j, k\]"), ("1,2,3", "list"),
])
def test_bad_points_are_refused_with_the_reason(odd_volume, points, reason):
    vol, _ = odd_volume
    with pytest.raises(InputError, match=reason):
        rq.canonical_points(vol, points, "foreground")


def test_names_ids_and_the_deepgrow_without_a_name(odd_volume):
    vol, _ = odd_volume
    assert ORGANS.positions() == {"liver": 1, "right kidney": 2, "left kidney": 3, "spleen": 4}
    with pytest.raises(InputError, match="point_prompts"):
        rq.deepgrow_edit(None, {"foreground": [[0, 0, 0]]}, ORGANS, vol)
    with pytest.raises(InputError, match="unknown label name '/etc/passwd'.*liver"):
        rq.deepgrow_edit("/etc/passwd", {"foreground": [[0, 0, 0]]}, ORGANS, vol)
    e = rq.deepgrow_edit("spleen", {"foreground": [[0, 0, 0]], "background": []}, ORGANS, vol)
    assert e.class_id == 4 and e.foreground.shape == (1, 3) and e.background.shape == (0, 3)
    # OHIF deepedit: another organ's points are negative for this one; background for all; "null" = no label picked
    edits = rq.deepedit_edits({"background": [[1, 1, 1]], "liver": [[0, 0, 0]], "spleen": [[4, 5, 6]]}, ORGANS, vol)
    assert [e.class_id for e in edits] == [1, 4, 0] and len(edits[0].background) == 2
    with pytest.raises(InputError, match="no label selected"):
        rq.deepedit_edits({"background": [], "null": [[0, 0, 0]]}, ORGANS, vol)
    # vista3d: one organ id per point request; OHIF's auto tab asks for all ids without points; 5 = background
    assert rq.vista_edit({"label_prompt": [1, 2, 3, 4, 5]}, ORGANS, vol) == ([1, 2, 3, 4], None)
    ids, e = rq.vista_edit({"label_prompt": [4], "points": [[0, 0, 0], [1, 1, 1]], "point_labels": [1, 0]}, ORGANS, vol)
    assert ids == [4] and len(e.foreground) == 1 and len(e.background) == 1
    for bad, reason in (({"label_prompt": [9]}, "unknown label id 9"),
                        ({"label_prompt": [1], "points": [[0, 0, 0]], "point_labels": []}, "one 1"),
                        ({"label_prompt": [1, 2], "points": [[0, 0, 0]], "point_labels": [1]}, "exactly one organ")):
        with pytest.raises(InputError, match=reason):
            rq.vista_edit(bad, ORGANS, vol)


def _balls(prepared, base, fg, bg, *, fg_scribble=None, bg_scribble=None, settings=None, base_trusted=False):
    """A stand-in engine: a ball of radius 2 around each click (the contract's shape, not its quality)."""
    out = np.asarray(base, bool).copy()
    grid = np.indices(out.shape, sparse=True)
    for pts, v in ((fg, True), (bg, False)):
        for p in pts:
            out[sum((g - c) ** 2 for g, c in zip(grid, p)) <= 4] = v
    if fg_scribble is not None:
        out |= fg_scribble
    if bg_scribble is not None:
        out &= ~bg_scribble
    return out


def test_other_organs_change_only_where_a_click_points_into_them():
    label = np.zeros((20, 20, 20), np.uint8)
    label[0:10] = 1  # liver: x < 10
    label[14:20, 0:5] = 2  # a kidney
    prepared = PreparedVolume(np.zeros(label.shape, np.float32), (1.0, 1.0, 1.0))
    # a spleen click at the liver's border: the ball reaches into the liver, which keeps it
    e = rq.Edit(4, np.array([[11, 10, 10]]))
    m = organ_mask(prepared, label, e, correct=_balls)
    assert m[11, 10, 10] and not m[9, 10, 10] and not (m & (label == 1)).any()
    # a click inside the liver: the annotator pointed there, that part joins the spleen
    e = rq.Edit(4, np.array([[8, 10, 10]]))
    m = organ_mask(prepared, label, e, correct=_balls)
    assert m[8, 10, 10] and m[9, 10, 10] and m.sum() == 33
    # the ROI bounds every change
    box = (slice(7, 9), slice(0, 20), slice(0, 20))
    m = organ_mask(prepared, label, e, box=box, correct=_balls)
    assert m[8, 10, 10] and not m[9, 10, 10]
    # composition: the kidney is untouched, a background click removes liver where it lands only
    out = corrected_label(prepared, label, [rq.Edit(4, np.array([[8, 10, 10]])),
                                            rq.Edit(0, background=np.array([[2, 2, 2]]))], correct=_balls)
    assert np.array_equal(out == 2, label == 2)
    assert out[8, 10, 10] == 4 and out[2, 2, 2] == 0 and out[5, 15, 15] == 1
    assert int((out != label).sum()) == 33 + 33  # one ball taken into the spleen, one ball of liver removed
    assert keep_other_organs(np.ones_like(label, bool), label, 1, np.zeros((0, 3)))[label == 2].sum() == 0


def test_the_cache_is_per_client_and_image_bounded_and_refreshed():
    cache = ClientCache(max_bytes=3 * 8000)
    builds = []

    def build(tag):
        def make():
            builds.append(tag)
            return {"a": np.zeros(1000)}  # 8000 bytes
        return make

    a1, hit = cache.get("alice", "img1", "fp1", build("a1"))
    assert not hit
    b1, hit = cache.get("bob", "img1", "fp1", build("b1"))
    assert not hit and b1 is not a1  # two clients never share state
    assert cache.get("alice", "img1", "fp1", build("x"))[1] is True
    assert cache.get("alice", "img1", "fp2", build("a1'"))[1] is False  # a new base label: rebuilt
    cache.get("carol", "img2", "fp1", build("c2"))
    cache.get("dave", "img3", "fp1", build("d3"))  # 4 entries of 8000 bytes > 24000: the oldest (bob) goes
    assert ("bob", "img1") not in cache.keys() and cache.size() <= 3 * 8000
    cache.get("alice", "img1", "fp2", build("x"))  # alice's entry is used again: now carol's is the oldest
    cache.get("frank", "img4", "fp1", build("f4"))
    assert ("carol", "img2") not in cache.keys() and ("alice", "img1") in cache.keys()
    # concurrent first clicks of one client on one image build once
    builds.clear()
    ts = [threading.Thread(target=cache.get, args=("erin", "img9", "fp", build("e"))) for _ in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert builds == ["e"]
