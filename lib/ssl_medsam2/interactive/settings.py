"""The ``interactive:`` section: how clicks and scribbles correct a label (defaults in the YAML only)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from ..config import Section, load_config

ENGINES = ("graphcut", "random_walker", "geodesic", "sam2")
SHELL_MODES = ("offset", "warp")
KEEP_CHANGES = ("all", "connected")


@dataclass(frozen=True)
class InteractiveSettings(Section):
    """Typed view of ``interactive:``; :meth:`resolve` lays a request's overrides over the config's values."""

    SECTION = "interactive"
    engine: str                      # graphcut | random_walker | geodesic (weight-free) | sam2 (needs weights; docs/interactive.md)
    roi_margin_mm: tuple[float, float, float]   # the region that may change: the clicks' bounding box grown by this
    shape_scale_mm: float            # base label as a prior: log-odds = signed distance to its border / this
    shape_cap: float                 # ... clipped to +- this (far inside / outside count alike)
    click_range_mm: float            # a click's influence decays as exp(-geodesic distance / range); the largest range
    click_range_fraction: float      # range = this x the base organ's equivalent-sphere radius (0: always click_range_mm)
    click_range_min_mm: float        # ... but at least this
    click_similar_shrink: float      # a click whose intensity looks like the other side (fg / bg histograms of the base) reaches (1 - this x that likelihood) as far
    click_depth_limit: float         # a click's influence fades where the base is deeper on its side than this x the click's depth (0: off)
    click_depth_slack_mm: float      # ... + this (mm); beyond it the influence fades over shape_scale_mm
    click_weight: float              # log-odds a click adds where its influence is 1
    shell_mode: str                  # offset (the border moves along its normal) | warp (dragged, far side too)
    shell_shift_factor: float        # a click moves the base border by this x its depth on the wrong side (0: off)
    shell_shift_max_mm: float        # ... by at most this
    shell_range_fraction: float      # ... fading as a Gaussian of the distance to the click, sigma = this x the organ's radius
    shell_range_min_mm: float        # ... within these bounds
    shell_range_max_mm: float
    keep_changes: str                # all | connected: only the added / removed pieces that hold a mark of their kind change
    click_seed_radius_mm: float      # in-plane disc around each click that is a hard seed
    geodesic_step: int               # a click's geodesic distance is searched on a grid this x coarser in-plane (1: full)
    intensity_contrast: float        # geodesic cost per mm = 1 + this x ((intensity - the click's) / tolerance)^2
    intensity_tolerance: float       # intensity difference (0..1 scale) a click's region tolerates
    intensity_weight: float          # weight of the intensity log-likelihood ratio (fg / bg histograms in the ROI) where a click has full influence
    region_intensity_weight: float   # ... and everywhere else in the region (the base label's boundary snaps to the image)
    intensity_bins: int
    appearance_weight: float         # > 0: the organ's learned look (:mod:`.appearance`) x this replaces the histogram term
    smoothness: float                # graph cut: pairwise weight (numpymaxflow lamda)
    edge_sigma: float                # graph cut: intensity difference that halves an edge (numpymaxflow sigma)
    rw_beta: float                   # random walker: skimage beta
    max_points: int                  # more clicks than this in one request is refused (ValueError; the server: 422)
    cache_mb: float                  # the server's per-(client, image) cache of prepared images and base labels
    sam2_window_slices: int          # sam2: slices each side of a clicked slice that SAM2 propagates through (the only ones that change)
    trusted_base: Any                # the keys above that change for an organ whose base someone vouches for (:meth:`for_base`)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"interactive.engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.shell_mode not in SHELL_MODES:
            raise ValueError(f"interactive.shell_mode must be one of {', '.join(SHELL_MODES)}, got {self.shell_mode!r}")
        if self.keep_changes not in KEEP_CHANGES:
            raise ValueError(f"interactive.keep_changes must be one of {', '.join(KEEP_CHANGES)}, got {self.keep_changes!r}")
        margin = tuple(float(m) for m in self.roi_margin_mm)
        if len(margin) != 3 or min(margin) < 0:
            raise ValueError(f"interactive.roi_margin_mm must be 3 non-negative numbers, got {self.roi_margin_mm!r}")
        if int(self.sam2_window_slices) < 0:
            raise ValueError(f"interactive.sam2_window_slices must be >= 0, got {self.sam2_window_slices!r}")
        try:
            trusted = dict(self.trusted_base or {})
        except (TypeError, ValueError):
            raise ValueError(f"interactive.trusted_base must be a mapping of interactive settings, "
                             f"got {self.trusted_base!r}") from None
        bad = sorted(set(trusted) - (set(f.name for f in fields(self)) - {"engine", "trusted_base"}))
        if bad:
            raise ValueError(f"interactive.trusted_base may set the engine's settings, not {', '.join(map(str, bad))}")
        ints = ("max_points", "intensity_bins", "sam2_window_slices", "geodesic_step")
        self._set(roi_margin_mm=margin, trusted_base=tuple(sorted(trusted.items())),
                  **{name: int(getattr(self, name)) for name in ints},
                  **{f.name: float(getattr(self, f.name)) for f in fields(self)
                     if f.name not in ("engine", "shell_mode", "keep_changes", "roi_margin_mm", "trusted_base") + ints})

    def for_base(self, trusted: bool) -> "InteractiveSettings":
        """The settings for one organ's base: a trusted one (a final label, or a pseudo label that passed the
        quality gate for this organ) gets ``trusted_base``'s values (e.g. a sharper shape prior, so a click
        leaves more of its right border alone); any other, whose quality nobody vouches for, these
        (measured in docs/interactive.md)."""
        return replace(self, **dict(self.trusted_base)) if trusted and self.trusted_base else self

    @classmethod
    def resolve(cls, settings: "InteractiveSettings | Mapping[str, Any] | None") -> "InteractiveSettings":
        """``settings`` as given (a typed section), or the config's section with a mapping's keys laid over it
        (a whole loaded config, with an ``interactive:`` key, is taken as that config)."""
        if isinstance(settings, cls):
            return settings
        settings = dict(settings or {})
        if isinstance(settings.get(cls.SECTION), Mapping):
            return cls.from_config(settings)
        cfg = load_config()
        unknown = sorted(set(settings) - set(cfg[cls.SECTION]))
        if unknown:
            raise ValueError(f"unknown interactive setting(s): {', '.join(unknown)}")
        return cls.from_config({cls.SECTION: {**cfg[cls.SECTION], **settings}})
