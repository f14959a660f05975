"""Intensity and slice preprocessing of the paper, shared by every engine.

MRI is clipped to the 0.5 / 99.5 percentiles of its non-zero voxels, CT to a window; both are scaled
to 0..255 (what SAM2 saw in training: 8-bit video frames), turned into 3 channels, normalised with
ImageNet statistics and resized to the model's square input size. Slices are taken along one axis
of the canonical volume (default: the through-plane axis, i.e. the one with the largest spacing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import Section

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class IntensityConfig(Section):
    """How intensities are clipped before scaling (the ``input:`` section; defaults in the YAML only)."""

    SECTION = "input"
    modality: str  # "mri", "ct" or "auto" (CT when the volume has values below -500)
    mri_percentiles: tuple[float, float]
    ct_level: float
    ct_width: float

    def __post_init__(self):
        self._set(modality=str(self.modality), mri_percentiles=tuple(float(p) for p in self.mri_percentiles),
                  ct_level=float(self.ct_level), ct_width=float(self.ct_width))


@dataclass(frozen=True)
class InputSettings(Section):
    """The ``input:`` section's other keys: which classes, their names, the slice axis (defaults in the YAML only).

    ``classes``: a tuple of ids, or None (every class found in the supports). ``class_names``: id -> name,
    ids as ints whichever way the config spelt them (YAML ``1:`` or an override's ``"1":``).
    """

    SECTION = "input"
    slice_axis: int | str
    classes: tuple[int, ...] | None
    class_names: dict[int, str]

    def __post_init__(self):
        if str(self.slice_axis) != "auto" and str(self.slice_axis) not in ("0", "1", "2"):
            raise ValueError(f"input.slice_axis must be 0, 1, 2 or auto, got {self.slice_axis!r}")
        try:
            classes = None if self.classes is None else tuple(int(c) for c in self.classes)
            names = {int(k): str(v) for k, v in (self.class_names or {}).items()}
        except (TypeError, ValueError, AttributeError):
            raise ValueError(f"input.classes must be a list of class ids and input.class_names a map id -> name, "
                             f"got {self.classes!r} and {self.class_names!r}") from None
        self._set(classes=classes, class_names=names)

    def class_name(self, c: int, unnamed: str | None = None) -> str:
        """The configured name of class ``c``; ``unnamed`` (default: the neutral ``class_<id>``) when it has none."""
        return class_name(self.class_names, c) if unnamed is None else self.class_names.get(int(c), unnamed)

    @property
    def label_ids(self) -> set[int] | None:
        """Class ids a label map may hold: background, the named classes and ``classes``; None (any id)
        when neither names nor classes are configured."""
        if not self.class_names and not self.classes:
            return None
        return {0} | set(self.class_names) | set(self.classes or ())


def class_name(names: dict | None, c: int) -> str:
    """The name of class ``c`` in ``names`` (keys int or str), else the neutral ``class_<id>``: never another
    dataset's organ names."""
    names = names or {}
    return str(names.get(int(c), names.get(str(c), f"class_{int(c)}")))


def dataset_class_names(folder) -> dict[int, str]:
    """Class id -> name from an nnU-Net ``dataset.json`` (``labels``: name -> id) in ``folder`` or its parent
    (beside imagesTr/ labelsTr/); {} when there is none. Background and ``ignore`` are not classes."""
    import json
    from pathlib import Path

    for d in (Path(folder), Path(folder).parent):
        p = d / "dataset.json"
        if p.is_file():
            try:
                labels = json.loads(p.read_text()).get("labels") or {}
            except (ValueError, AttributeError):
                raise ValueError(f"{p.name} beside the images is not a JSON object with a 'labels' map") from None
            out = {}
            for name, value in labels.items():
                if isinstance(value, (int, str)) and str(value).isdigit() and int(value) > 0 and name != "ignore":
                    out[int(value)] = str(name)
            return out
    return {}


def with_dataset_class_names(cfg: dict, folder) -> dict:
    """``cfg`` with ``input.class_names`` from the data's ``dataset.json`` when the config names none
    (an explicit ``--set input.class_names`` wins); unchanged otherwise."""
    from .config import merge

    if InputSettings.from_config(cfg).class_names:
        return cfg
    import json

    names = dataset_class_names(folder)
    return merge(cfg, [f"input.class_names={json.dumps(names)}"]) if names else cfg


def resolve_modality(array: np.ndarray, modality: str = "auto") -> str:
    if modality in ("mri", "mr", "MRI", "MR"):
        return "mri"
    if modality in ("ct", "CT"):
        return "ct"
    if modality != "auto":
        raise ValueError(f"unknown modality '{modality}' (use mri, ct or auto)")
    return "ct" if float(array.min()) < -500 else "mri"


def scale_to_uint8_range(array: np.ndarray, cfg: IntensityConfig) -> np.ndarray:
    """Clip (MRI percentiles of non-zero voxels, or CT window) and scale to float32 0..255."""
    a = np.asarray(array, dtype=np.float32)
    if resolve_modality(a, cfg.modality) == "ct":
        lo = cfg.ct_level - cfg.ct_width / 2.0
        hi = cfg.ct_level + cfg.ct_width / 2.0
    else:
        nz = a[a != 0]
        if nz.size == 0:
            return np.zeros_like(a)
        lo, hi = np.percentile(nz, cfg.mri_percentiles)
    if hi <= lo:
        return np.zeros_like(a)
    out = (np.clip(a, lo, hi) - lo) / (hi - lo) * 255.0
    return out.astype(np.float32)


def through_plane_axis(spacing: tuple[float, float, float]) -> int:
    """The axis with the largest voxel spacing; ties go to the last axis (axial in RAS)."""
    sp = np.asarray(spacing, dtype=np.float64)
    best = np.flatnonzero(np.isclose(sp, sp.max(), rtol=1e-3))
    return int(best[-1])


def resolve_slice_axis(axis, spacing) -> int:
    if axis in (None, "auto"):
        return through_plane_axis(spacing)
    axis = int(axis)
    if axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1, 2 or 'auto', got {axis}")
    return axis


def to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """(X, Y, Z) -> (N, H, W) with the slice axis first."""
    return np.ascontiguousarray(np.moveaxis(volume, axis, 0))


def from_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`to_slices` (extra leading channel axes are kept in front)."""
    return np.ascontiguousarray(np.moveaxis(slices, -3, axis + slices.ndim - 3))


def frames_for_model(scaled_slices: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W) in 0..255 -> (N, 3, size, size) float32, ImageNet-normalised (SAM2's input)."""
    t = torch.from_numpy(np.asarray(scaled_slices, dtype=np.float32) / 255.0)[:, None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    t = t.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((t - mean) / std).contiguous()


def resize_mask_nearest(mask_slices: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(N, h, w) label/bool slices -> (N, H, W) with nearest neighbour (support masks to query grid)."""
    if tuple(mask_slices.shape[-2:]) == tuple(hw):
        return mask_slices
    t = torch.from_numpy(np.ascontiguousarray(mask_slices).astype(np.float32))[:, None]
    t = F.interpolate(t, size=tuple(hw), mode="nearest-exact")
    return t[:, 0].numpy().astype(mask_slices.dtype)


def resize_prob(prob_slices: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) probabilities / logits -> (N, H, W), bilinear."""
    if tuple(prob_slices.shape[-2:]) == tuple(hw):
        return prob_slices
    return F.interpolate(prob_slices[:, None], size=tuple(hw), mode="bilinear", align_corners=False)[:, 0]
