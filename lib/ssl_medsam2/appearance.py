"""Atlas-guided appearance refinement: the query's own intensities correct a registered label prior.

Why: registration places a support's organ roughly (a few millimetres to a centimetre off where
organs differ in shape or breathing state), but the organ's boundary is usually visible in the query
itself. An expectation-maximisation over the query's intensities, with the fused atlas
probabilities as a spatial prior, moves the boundary onto the query's edges. The intensity model of
every class is learned from the query alone (weighted by the current posterior), so it holds where
a subject's organs look unlike the supports' (a dark liver and spleen on T2-SPIR, measured on CHAOS),
where histogram matching between subjects cannot.

Model per voxel: posterior(k) ∝ prior(k) × p(intensity | k) over background and each class, with
- prior(class) = max(P, Gaussian blur of P over ``sigma_mm``): the registered probability, widened so
  that a misplaced boundary can move; prior(background) = 1 - the classes' widened prior (floored);
- p(intensity, texture | k): a smoothed joint histogram of the query's intensity and its local
  in-plane standard deviation (``texture_sigma_vox``; 0 = intensity alone), weighted by the
  posterior, within ``roi_mm`` of any organ (outside that region everything is background). The
  texture axis tells a smooth parenchyma from a structure of the same mean brightness that is
  patchy (stomach and bowel beside the liver, measured on CHAOS: local std ~8 vs ~15 grey levels);
A light in-plane smoothing of the posterior each iteration keeps the result from speckling.
Deterministic: no sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .preprocess import through_plane_axis

BACKGROUND_FLOOR = 0.02  # background prior never below this, so any voxel can leave an organ
TEXTURE_MAX = 40.0  # local standard deviations (0..255 grey levels) above this share the last bin


@dataclass(frozen=True)
class AppearanceSettings:
    """The ``atlas.appearance_*`` keys (values only in configs/ssl_medsam2.yaml)."""

    iterations: int  # EM iterations; 0 = off
    sigma_mm: float  # widening of the registered prior
    roi_mm: float  # region around the organs where intensities are modelled
    bins: int  # intensity histogram bins (intensities in 0..255)
    smooth_vox: float  # in-plane Gaussian smoothing of the posterior per iteration (voxels)
    texture_sigma_vox: float  # in-plane window of the local standard deviation (voxels); 0 = intensity only
    texture_bins: int  # bins of the local standard deviation (0..TEXTURE_MAX grey levels)


def refine(probs: np.ndarray, intensity: np.ndarray, spacing, s: AppearanceSettings) -> np.ndarray:
    """(C, X, Y, Z) fused class probabilities + the query's 0..255 intensities -> refined (C, X, Y, Z)."""
    if s.iterations <= 0 or probs.shape[0] == 0:
        return probs
    probs = probs.astype(np.float32, copy=False)
    spacing = np.asarray(spacing, dtype=float)
    sigma = [s.sigma_mm / sp for sp in spacing]
    prior = np.stack([np.maximum(p, ndimage.gaussian_filter(p, sigma)) for p in probs])
    prior = np.concatenate([np.clip(1.0 - prior.sum(0), BACKGROUND_FLOOR, 1.0)[None], prior])
    prior /= prior.sum(0, keepdims=True)
    roi = ndimage.distance_transform_edt(probs.max(0) < 0.1, sampling=spacing) <= s.roi_mm
    if not roi.any():
        return probs
    in_plane = np.ones(3)  # "in-plane" windows leave the through-plane axis (largest spacing) alone
    in_plane[through_plane_axis(tuple(spacing))] = 0.0
    bins, shape = feature_bins(np.asarray(intensity, dtype=np.float32), s, in_plane)
    b_roi = bins[roi]
    # start: each class where the registration says so (>= 0.5), background elsewhere
    post = np.concatenate([(probs.max(0) < 0.5)[None], probs >= 0.5]).astype(np.float32)
    for _ in range(int(s.iterations)):
        joint = np.empty_like(prior)
        for k in range(prior.shape[0]):
            hist = np.bincount(b_roi, weights=post[k][roi], minlength=int(np.prod(shape))) + 1e-3
            hist = ndimage.gaussian_filter(hist.reshape(shape), 1.0).ravel()
            joint[k] = prior[k] * (hist / hist.sum())[bins]
        if s.smooth_vox:
            joint = np.stack([ndimage.gaussian_filter(j, list(s.smooth_vox * in_plane)) for j in joint])
        post = joint / np.maximum(joint.sum(0, keepdims=True), 1e-20)
        post[:, ~roi] = 0.0
        post[0, ~roi] = 1.0
    out = np.clip(post[1:], 0.0, 1.0).astype(np.float32)
    for k in range(out.shape[0]):  # refine, never erase: a class the EM emptied keeps its registered probability
        if not (out[k] >= 0.5).any() and (probs[k] >= 0.5).any():
            out[k] = probs[k]
    return out


def feature_bins(intensity: np.ndarray, s: AppearanceSettings,
                 in_plane: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Each voxel's joint (intensity, local std) histogram bin, and the histogram's shape.

    ``in_plane``: per axis 1, or 0 for the through-plane axis (the local std is taken within slices).
    """
    bins = np.clip((intensity * (s.bins / 256.0)).astype(np.int32), 0, s.bins - 1)
    if not s.texture_sigma_vox or s.texture_bins <= 1:
        return bins, (s.bins,)
    window = list(s.texture_sigma_vox * np.asarray(in_plane, dtype=float))
    mean = ndimage.gaussian_filter(intensity, window)
    std = np.sqrt(np.maximum(ndimage.gaussian_filter(intensity * intensity, window) - mean * mean, 0.0))
    tex = np.clip((std * (s.texture_bins / TEXTURE_MAX)).astype(np.int32), 0, s.texture_bins - 1)
    return bins * s.texture_bins + tex, (s.bins, s.texture_bins)
