"""Per-image state of interactive correction: the image normalised once, with the memos its clicks fill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .cache import BoundedMemo
from .sam2_prompts import EncodedSlices


@dataclass(frozen=True)
class PreparedVolume:
    """Per-image state reused across clicks (cache it per client and image)."""

    image: np.ndarray  # canonical voxel order, float32, normalised for the engine (0..1)
    spacing: tuple[float, float, float]  # mm along the canonical axes
    extra: Mapping[str, Any] | None = None  # engine-specific precomputed data


def prepare(image: np.ndarray, spacing: Sequence[float], *, intensity=None) -> PreparedVolume:
    """Normalise one image for interactive correction: the project's input scaling (``input:`` section:
    MRI percentiles of the non-zero voxels, a CT window only for CT), mapped to 0..1.

    ``intensity``: a :class:`ssl_medsam2.preprocess.IntensityConfig` (default: the config's)."""
    from ..config import load_config
    from ..preprocess import IntensityConfig, scale_to_uint8_range

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {arr.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
    cfg = intensity if intensity is not None else IntensityConfig.from_config(load_config())
    norm = (scale_to_uint8_range(arr, cfg) / np.float32(255.0)).astype(np.float32)
    return PreparedVolume(norm, spacing, {"influence": BoundedMemo(MEMO_BYTES),  # type: ignore[arg-type]
                                          "shape": BoundedMemo(MEMO_BYTES), "sam2_slices": EncodedSlices(),
                                          "appearance": BoundedMemo(MEMO_BYTES)})


MEMO_BYTES = 48 << 20  # per prepared image and kind: clicks' geodesic influences (~0.5-2 MB each), base masks'
# signed distances (4 bytes a voxel), the organ looks' outputs (2 bytes a voxel); beyond the server's interactive.cache_mb, which counts them as built
