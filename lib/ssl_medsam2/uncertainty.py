"""Voxel uncertainty of an ensemble: binary entropy of the mean probability, and per-case summaries.

Entropy is in bits, so 0 means every run agreed with certainty and 1 means p = 0.5. The summaries
(mean entropy inside the mask and in a band around its boundary) are what active learning ranks
volumes by: a confident interior with an uncertain boundary is normal, an uncertain interior is not.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_EPS = 1e-7


def binary_entropy(prob: np.ndarray) -> np.ndarray:
    """H(p) = -p log2 p - (1-p) log2 (1-p), elementwise, with H(0) = H(1) = 0."""
    p = np.clip(np.asarray(prob, dtype=np.float64), _EPS, 1.0 - _EPS)
    h = -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))
    h[(np.asarray(prob) <= 0) | (np.asarray(prob) >= 1)] = 0.0
    return h.astype(np.float32)


def boundary_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Voxels within ``width`` voxels of the mask boundary, on either side (in-plane and through-plane)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or width <= 0:
        return np.zeros_like(mask)
    st = ndimage.generate_binary_structure(3, 1)
    dil = ndimage.binary_dilation(mask, st, iterations=width)
    ero = ndimage.binary_erosion(mask, st, iterations=width, border_value=0)
    return dil & ~ero


def summarize(entropy: np.ndarray, mask: np.ndarray, band_width: int) -> dict:
    """Mean entropy inside the mask, in the boundary band, and over the whole volume."""
    mask = np.asarray(mask, dtype=bool)
    band = boundary_band(mask, band_width)

    def _mean(sel):
        return float(entropy[sel].mean()) if sel.any() else None

    return {
        "mean_entropy_inside": _mean(mask),
        "mean_entropy_boundary": _mean(band),
        "mean_entropy_volume": float(entropy.mean()),
        "voxels": int(mask.sum()),
        "boundary_band_voxels": int(band.sum()),
    }
