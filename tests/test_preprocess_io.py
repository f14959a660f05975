"""Intensity preprocessing and geometry round trips on real MRI (CHAOS, LAS) and CT/MR (TotalSegmentator)."""

import nibabel as nib
import numpy as np
import pytest
import torch

from ssl_medsam2.config import load_config
from ssl_medsam2.io import InputError, load_label_for, load_volume, save_like
from ssl_medsam2.preprocess import (IMAGENET_MEAN, IMAGENET_STD, IntensityConfig, frames_for_model,
                                    resize_mask_nearest, resolve_modality, resolve_slice_axis,
                                    scale_to_uint8_range, through_plane_axis)


def test_mri_percentile_clip_of_nonzero_voxels(chaos_dir):
    vol = load_volume(chaos_dir / "imagesTr" / "chaos_01_0000.nii.gz")
    assert resolve_modality(vol.array) == "mri"
    nz = vol.array[vol.array != 0]
    lo, hi = np.percentile(nz, [0.5, 99.5])
    out = scale_to_uint8_range(vol.array, IntensityConfig.from_config(load_config()))
    assert out.min() == 0.0 and out.max() == pytest.approx(255.0)
    mid = (vol.array > lo) & (vol.array < hi)
    np.testing.assert_allclose(out[mid], (vol.array[mid] - lo) / (hi - lo) * 255, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(out[vol.array >= hi], 255.0)
    np.testing.assert_allclose(out[vol.array <= lo], 0.0)


def test_ct_window(totalseg_dir):
    vol = load_volume(totalseg_dir / "imagesTr" / "ct_sm_0000.nii.gz")
    assert resolve_modality(vol.array) == "ct"
    cfg = IntensityConfig(modality="auto", mri_percentiles=(0.5, 99.5), ct_level=40, ct_width=400)
    out = scale_to_uint8_range(vol.array, cfg)
    assert np.all(out[vol.array <= -160] == 0) and np.all(out[vol.array >= 240] == 255)
    mid = (vol.array > -100) & (vol.array < 200)
    np.testing.assert_allclose(out[mid], (vol.array[mid] + 160) / 400 * 255, rtol=1e-5)


def test_frames_are_imagenet_normalised_3ch_at_model_size():
    sl = np.stack([np.zeros((20, 30)), np.full((20, 30), 255.0)])
    f = frames_for_model(sl, 32)
    assert f.shape == (2, 3, 32, 32)
    for c in range(3):
        assert torch.allclose(f[0, c], torch.tensor(-IMAGENET_MEAN[c] / IMAGENET_STD[c]), atol=1e-6)
        assert torch.allclose(f[1, c], torch.tensor((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]), atol=1e-6)


def test_slice_axis_is_through_plane(chaos_dir):
    vol = load_volume(chaos_dir / "imagesTr" / "chaos_01_0000.nii.gz")
    assert through_plane_axis(vol.spacing) == 2 == resolve_slice_axis("auto", vol.spacing)
    assert resolve_slice_axis(0, vol.spacing) == 0
    with pytest.raises(ValueError):
        resolve_slice_axis(3, vol.spacing)


def test_nearest_mask_resize_keeps_labels():
    m = np.zeros((1, 8, 8), np.uint8)
    m[0, 2:6, 2:6] = 3
    r = resize_mask_nearest(m, (16, 16))
    assert set(np.unique(r)) == {0, 3} and r.sum() == 3 * 64


@pytest.mark.parametrize("name", ["mr_sm", "ct_sm"])
def test_canonical_round_trip_keeps_source_geometry(totalseg_dir, tmp_path, name):
    """LPS (mr_sm) and RAS (ct_sm) files: canonical in memory, written back identical on disk."""
    src = totalseg_dir / "imagesTr" / f"{name}_0000.nii.gz"
    vol = load_volume(src)
    lab = load_label_for(vol, totalseg_dir / "labelsTr" / f"{name}.nii.gz")
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    out = save_like(lab.array, vol, tmp_path / "lab.nii.gz", dtype=np.uint8)
    written, orig = nib.load(str(out)), nib.load(str(totalseg_dir / "labelsTr" / f"{name}.nii.gz"))
    np.testing.assert_allclose(written.affine, nib.load(str(src)).affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(orig.dataobj))
    assert not list(tmp_path.glob(".*"))  # no temp file left


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(InputError) as e:
        load_volume(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(e.value) and "not found" in str(e.value)
