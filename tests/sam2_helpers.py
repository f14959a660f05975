"""Tiny real CHAOS volumes for the SAM2 engine tests (CPU and CUDA): 64x64 in-plane, a few slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import downsample_case
from ssl_medsam2.engines.base import Case
from ssl_medsam2.io import load_label_for, load_volume

#: name -> (CHAOS case, z range). chaos_01/02 are the supports (8 and 7 slices, all four organs);
#: chaos_03 is the query of imagesTr/; extra/ holds it shorter (4 slices) and longer (10 slices)
#: than the supports, as queries for the equivalence tests only.
CROPS = {"chaos_01": ("chaos_01", (14, 22)), "chaos_02": ("chaos_02", (10, 17)),
         "chaos_03": ("chaos_03", (12, 19))}
EXTRA = {"chaos_03short": ("chaos_03", (13, 17)), "chaos_03long": ("chaos_03", (9, 19))}
SUPPORTS = ("chaos_01", "chaos_02")

#: random-weight SAM2.1 Hiera-T at 64 px, all prompted frames in attention (mechanics only)
SMALL = ["sam2.checkpoint=none", "sam2.image_size=64", "sam2.n_inserts=2", "sam2.device=cpu",
         "sam2.max_cond_frames_in_attn=-1"]

#: max abs difference of the mean probability allowed between engines and the reference on CUDA
CUDA_FP32_TOL = 1e-3
#: bf16 (CUDA's default, or CPU autocast): the drift measured so far is 7.4e-4 (cached vs reference,
#: H200, 512 px; issue 10) and 6.1e-4 (batched vs reference under CPU bf16 autocast, 64 px;
#: tests/test_sam2_engine.py); ~13x headroom
CUDA_BF16_TOL = 1e-2


def make_tiny(chaos_dir: Path, root: Path) -> Path:
    """imagesTr/ (CROPS), extra/ (EXTRA), all_labels/ (all), labelsTr/ (the supports only) under ``root``."""
    for crops, images in ((CROPS, root / "imagesTr"), (EXTRA, root / "extra")):
        for name, (src, zr) in crops.items():
            downsample_case(chaos_dir / "imagesTr" / f"{src}_0000.nii.gz", chaos_dir / "labelsTr" / f"{src}.nii.gz",
                            images / f"{name}_0000.nii.gz", root / "all_labels" / f"{name}.nii.gz",
                            factor=4, z_range=zr)
    (root / "labelsTr").mkdir()
    for name in SUPPORTS:
        (root / "labelsTr" / f"{name}.nii.gz").write_bytes((root / "all_labels" / f"{name}.nii.gz").read_bytes())
    return root


def load_case(root: Path, name: str, labelled: bool = True) -> Case:
    folder = root / ("extra" if name in EXTRA else "imagesTr")
    im = load_volume(folder / f"{name}_0000.nii.gz")
    return Case(im, load_label_for(im, root / "all_labels" / f"{name}.nii.gz") if labelled else None)


def deepest_point(mask2d: np.ndarray) -> list[int]:
    """The in-plane index farthest inside a 2-D mask (where a simulated annotator clicks)."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(mask2d)
    return [int(v) for v in np.unravel_index(np.argmax(d), d.shape)]


def stock_window_track(engine, image01, base, fg, bg, lo, hi, clicked) -> dict:
    """The same prompts through SAM2's own predictor calls, batch 1, no caches (the oracle): a fresh state
    per direction, ``propagate_in_video`` forward from the first clicked slice and backward from the last
    over the window's frames (z = the last axis), probabilities averaged where both reach."""
    import torch

    from ssl_medsam2.preprocess import frames_for_model, to_slices

    predictor = engine.predictor
    frames = frames_for_model(to_slices(image01, 2)[lo:hi + 1] * 255.0, engine.image_size)
    h, w = base.shape[:2]
    seen: dict = {}
    for reverse in (False, True):
        state = predictor.init_state_from_frames(frames, h, w)
        for z in clicked:
            if base[:, :, z].any():
                predictor.add_new_mask(state, z - lo, 1, torch.from_numpy(base[:, :, z]))
            pts = [(p, 1) for p in fg if p[2] == z] + [(p, 0) for p in bg if p[2] == z]
            predictor.add_new_points_or_box(state, z - lo, 1, points=[[p[1], p[0]] for p, _ in pts],
                                            labels=[lab for _, lab in pts])
        start = (max(clicked) if reverse else min(clicked)) - lo
        for f, _, masks in predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
            seen.setdefault(lo + f, []).append(torch.sigmoid(masks[0, 0].float()).cpu().numpy())
    return {z: np.mean(v, axis=0) for z, v in sorted(seen.items())}
