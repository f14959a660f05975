"""Trimming thin protrusions off an organ mask (ssl_medsam2.shape): synthetic shapes with known answers."""

from __future__ import annotations

import numpy as np

from ssl_medsam2.shape import TRIMMED_PROBABILITY, trim_protrusions


def _organ_with_tongue(n_slices=5):
    """A disk of radius 30 voxels with a 3-voxel-wide, 25-voxel-long tongue (the liver reaching into the
    stomach), on 1 x 1 mm pixels, 5 mm slices; probability 0.9 inside."""
    yy, xx = np.mgrid[:128, :128]
    disk = (xx - 50) ** 2 + (yy - 64) ** 2 <= 30 ** 2
    tongue = (np.abs(yy - 64) <= 1) & (xx > 78) & (xx <= 105)
    mask = np.repeat((disk | tongue)[:, :, None], n_slices, axis=2)
    return disk, tongue, (0.9 * mask).astype(np.float32)[None]


def test_a_thin_tongue_leaves_the_label_and_the_organ_stays():
    disk, tongue, probs = _organ_with_tongue()
    out = trim_protrusions(probs, (1.0, 1.0, 5.0), 0.1)  # radius 0.1 x 30 mm = 3 mm
    kept = out[0] >= 0.5
    xx = np.mgrid[:128, :128][1]
    assert not (kept[..., 2] & tongue & (xx > 83)).any()  # the tongue is gone (but for its root at the organ)
    assert (kept[..., 2] & tongue & ~disk).sum() <= 6
    assert (kept[..., 2] & disk).sum() >= 0.99 * disk.sum()  # the organ is not (a few digital-disk corners)
    # a trimmed voxel stays uncertain (just under the threshold), it does not become sure background
    assert np.allclose(out[0][tongue & (xx > 83)], TRIMMED_PROBABILITY)
    assert np.array_equal(out[0][~(disk | tongue)], probs[0][~(disk | tongue)])  # nothing is added


def test_the_radius_follows_the_organ_and_zero_is_off():
    disk, tongue, probs = _organ_with_tongue()
    assert trim_protrusions(probs, (1.0, 1.0, 5.0), 0.0) is probs
    # the same shape at a tenth of the size: a 3-voxel disk has no 'thin part' at that scale
    small = np.zeros_like(probs)
    yy, xx = np.mgrid[:128, :128]
    small[0][((xx - 20) ** 2 + (yy - 20) ** 2 <= 3 ** 2)] = 0.9
    assert np.array_equal(trim_protrusions(small, (1.0, 1.0, 5.0), 0.1), small)


def test_slices_are_taken_across_the_largest_spacing_whatever_the_axis():
    """A sagittal stack (slices along the first axis): the opening works within those slices."""
    _, tongue, probs = _organ_with_tongue()
    axial = trim_protrusions(probs, (1.0, 1.0, 5.0), 0.1)
    sagittal = trim_protrusions(np.moveaxis(probs, 3, 1).copy(), (5.0, 1.0, 1.0), 0.1)
    assert np.array_equal(np.moveaxis(sagittal, 1, 3), axial)
