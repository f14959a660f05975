"""The weight-free correction engine: a base label, the image's own intensities and the clicks, cut in a region.

Why this shape (docs/interactive.md has the measurements):
- *Shape prior*: a pseudo label is mostly right, so the base label's signed distance (mm) is the prior
  log-odds; far inside / outside it saturates (``shape_cap``), near its border it is weak.
- *Clicks*: a click says "the label is wrong here, and in the region around here that looks like here".
  Its influence is exp(-geodesic distance / ``click_range_mm``), the distance growing with the
  intensity difference to the click's own neighbourhood and measured in mm (CHAOS slices are 7.7 mm
  apart, pixels 1.25 mm: a click reaches far in-plane and one or two slices through-plane). Where a
  click has influence the shape prior fades and the click's side (fg / bg) is added; a disc around it
  is a hard seed. The influence stops where the base lies deeper on the click's side than the click
  (``click_depth_limit``: a background click in a false shell does not carve the organ's core), and its
  geodesic search runs on a 2x coarser in-plane grid (``geodesic_step``: latency, same Dice).
- *Shell shift* (optional, off by default): a click also moves the shape prior's zero level by its depth
  in a patch around it (:func:`shell_shift`, :func:`shell_warp`; measured in docs/interactive.md).
- *Intensities*: a log-likelihood ratio of foreground / background histograms learned in the region
  from the base label and the click neighbourhoods (the volume's own MR intensities, percentile-scaled).
- *Regulariser*: a graph cut (MONAI Label's ``numpymaxflow``) by default; a random walker (skimage,
  spacing-aware) and the plain unary (``geodesic``) are the alternatives it was measured against.
- *Bounded change*: only the clicks' bounding box grown by ``roi_margin_mm`` is recomputed; its faces
  keep the base label as hard seeds, so the result joins the untouched outside without a seam.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Sequence

import numpy as np
from scipy import ndimage

from .settings import InteractiveSettings

EPS = 1e-6


def click_roi(shape: Sequence[int], spacing: Sequence[float], points: np.ndarray,
              margin_mm: Sequence[float]) -> tuple[slice, slice, slice]:
    """The bounding box of ``points`` (N, 3) grown by ``margin_mm`` on every side, clipped to the volume."""
    lo = points.min(axis=0)
    hi = points.max(axis=0)
    grow = [int(np.ceil(m / s)) for m, s in zip(margin_mm, spacing)]
    return tuple(slice(max(0, int(a) - g), min(int(n), int(b) + g + 1))
                 for a, b, g, n in zip(lo, hi, grow, shape))  # type: ignore[return-value]


def signed_distance_mm(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) to the mask's border: positive inside, negative outside."""
    if not mask.any():
        return np.full(mask.shape, -1e3, np.float32)
    if mask.all():
        return np.full(mask.shape, 1e3, np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return (inside - outside).astype(np.float32)


def organ_radius_mm(base: np.ndarray, spacing: Sequence[float]) -> float:
    """The radius (mm) of the sphere with the base mask's volume: how far an organ-scaled effect reaches."""
    return (3.0 * float(base.sum()) * float(np.prod(spacing)) / (4.0 * np.pi)) ** (1.0 / 3.0)


def organ_scaled(s: InteractiveSettings, base: np.ndarray, spacing: Sequence[float]) -> InteractiveSettings:
    """``s`` with the click range set to ``click_range_fraction`` x the base organ's equivalent-sphere radius
    (clipped to ``click_range_min_mm``..``click_range_mm``): a click on a kidney should not reach as far as
    one on the liver. An empty base (nothing known of the organ's size) keeps ``click_range_mm``."""
    if s.click_range_fraction <= 0 or not base.any():
        return s
    reach = float(np.clip(s.click_range_fraction * organ_radius_mm(base, spacing), s.click_range_min_mm,
                          s.click_range_mm))
    return replace(s, click_range_mm=round(reach, 1))


def _base_distance(base: np.ndarray, spacing: Sequence[float], memo: dict | None) -> np.ndarray:
    """:func:`signed_distance_mm` of the whole base mask, remembered by its content (every click on an organ
    starts from the same base)."""
    key = (hashlib.blake2b(np.packbits(base).tobytes(), digest_size=16).hexdigest(), base.shape, tuple(spacing))
    got = memo.get(key) if memo is not None else None
    if got is None:
        got = signed_distance_mm(base, spacing)
        if memo is not None:
            memo[key] = got
    return got


def _patch_stats(img: np.ndarray, p: Sequence[int]) -> float:
    sl = tuple(slice(max(0, c - r), c + r + 1) for c, r in zip(p, (2, 2, 0)))
    return float(np.median(img[sl]))


def geodesic_influence(image: np.ndarray, spacing: Sequence[float], p: Sequence[int], s: InteractiveSettings,
                       range_mm: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """(box, exp(-geodesic distance / ``range_mm``) within it) from one click: the cost per mm grows with the
    intensity difference to the click's neighbourhood, so the influence fills the click's own region and
    stops at its edges. Depends only on the image, the click and the settings (memoised per prepared volume)."""
    from skimage.graph import MCP_Geometric

    ref = _patch_stats(image, p)
    reach = 3.0 * range_mm  # beyond this the influence is < 5 %: the search stops there
    box = tuple(slice(max(0, int(c) - int(np.ceil(reach / sp))), int(c) + int(np.ceil(reach / sp)) + 1)
                for c, sp in zip(p, spacing))
    # the search runs on a grid ``geodesic_step`` x coarser along the fine axes (CHAOS: 2.5 mm in-plane, still
    # finer than its 7.7 mm slices), a quarter of the voxels; the distance is then read back at full resolution
    step = [1 if sp >= max(spacing) or s.geodesic_step <= 1 else int(s.geodesic_step) for sp in spacing]
    local = tuple(int(c) - b.start for c, b in zip(p, box))
    coarse = tuple(slice(lc % st, None, st) for lc, st in zip(local, step))
    cost = 1.0 + s.intensity_contrast * ((image[box][coarse] - ref) / s.intensity_tolerance) ** 2
    dist, _ = MCP_Geometric(cost, sampling=tuple(sp * st for sp, st in zip(spacing, step))).find_costs(
        [tuple(lc // st for lc, st in zip(local, step))])
    if any(st > 1 for st in step):
        full = [b.stop - b.start if b.stop <= n else n - b.start for b, n in zip(box, image.shape)]
        pos = [(np.arange(n) - lc % st) / st for n, lc, st in zip(full, local, step)]
        dist = ndimage.map_coordinates(dist, np.meshgrid(*pos, indexing="ij"), order=1, mode="nearest")
    return box, np.exp(-dist / range_mm).astype(np.float32)


def slice_axis(spacing: Sequence[float]) -> int:
    """The axis across the slices: the coarsest one (seed discs and the organ looks' features are in-plane)."""
    return int(np.argmax(spacing))


def _seed_discs(shape: Sequence[int], spacing: Sequence[float], points: np.ndarray, radius_mm: float) -> np.ndarray:
    """In-plane discs (the slice axis is the coarsest one) of ``radius_mm`` around each point."""
    out = np.zeros(shape, bool)
    through = slice_axis(spacing)
    r = [0 if a == through else int(np.floor(radius_mm / sp)) for a, sp in enumerate(spacing)]
    for p in points:
        sl = tuple(slice(max(0, c - ri), min(n, c + ri + 1)) for c, ri, n in zip(p, r, shape))
        grid = np.indices([b.stop - b.start for b in sl], dtype=np.float32)
        d2 = sum(((g + b.start - c) * sp) ** 2 for g, b, c, sp in zip(grid, sl, p, spacing))
        out[sl] |= d2 <= radius_mm ** 2 + EPS
    return out


def _intensity_llr(img: np.ndarray, fg: np.ndarray, bg: np.ndarray, bins: int) -> np.ndarray:
    """log p(I | fg) / p(I | bg) from smoothed histograms of the two samples (0 where one is empty)."""
    if not fg.any() or not bg.any():
        return np.zeros(img.shape, np.float32)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(img, edges) - 1, 0, bins - 1)
    hf = ndimage.gaussian_filter1d(np.bincount(idx[fg], minlength=bins).astype(np.float64), 1.5) + 1.0
    hb = ndimage.gaussian_filter1d(np.bincount(idx[bg], minlength=bins).astype(np.float64), 1.5) + 1.0
    llr = np.log(hf / hf.sum()) - np.log(hb / hb.sum())
    return np.clip(llr, -4.0, 4.0).astype(np.float32)[idx]


def change_region(shape: Sequence[int], spacing: Sequence[float], marks: Sequence[np.ndarray],
                  margin_mm: Sequence[float]) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """(crop, region inside the crop): the union of a box of ``margin_mm`` around every click (and one
    around each scribble's extent), and the crop that holds it. Only the region may change."""
    boxes = [click_roi(shape, spacing, np.asarray(m).reshape(-1, 3), margin_mm) for m in marks]
    crop = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))
    region = np.zeros([c.stop - c.start for c in crop], bool)
    for b in boxes:
        region[tuple(slice(x.start - c.start, x.stop - c.start) for x, c in zip(b, crop))] = True
    return crop, region  # type: ignore[return-value]


def _click_range(s: InteractiveSettings, looks_other: float) -> float:
    """A click's range: ``click_range_mm`` shrunk by ``click_similar_shrink`` x how much the click's intensity
    looks like the other side (0..1), rounded so that the memo finds it again."""
    return round(s.click_range_mm * (1.0 - s.click_similar_shrink * float(looks_other)), 1)


def _influences(image, spacing, points, ranges, roi, s: InteractiveSettings, memo: dict | None,
                depth_sd: tuple[np.ndarray, float] | None = None) -> np.ndarray:
    """The largest influence of any of ``points`` (each with its range, mm) at each voxel of the crop ``roi``.

    ``depth_sd``: (the base's signed distance, +1 for background clicks / -1 for foreground ones). With
    ``click_depth_limit`` > 0 a click's influence fades (over ``shape_scale_mm``) where the base is deeper on
    the click's side than ``click_depth_limit`` x the click's own depth + ``click_depth_slack_mm``: a
    background click at depth d in the base does not carve the organ's core, a foreground click d outside
    does not flood what lies far beyond."""
    out = np.zeros([r.stop - r.start for r in roi], np.float32)
    limit_on = depth_sd is not None and s.click_depth_limit > 0
    if limit_on:
        side = depth_sd[1] * depth_sd[0][tuple(roi)]
    for p, reach in zip(points, ranges):
        key = (tuple(int(c) for c in p), float(reach), s.intensity_contrast, s.intensity_tolerance, s.geodesic_step)
        got = memo.get(key) if memo is not None else None
        if got is None:
            got = geodesic_influence(image, spacing, p, s, float(reach))
            if memo is not None:
                memo[key] = got
        box, g = got
        inter = [slice(max(x.start, r.start), min(x.stop, r.stop)) for x, r in zip(box, roi)]
        if any(i.stop <= i.start for i in inter):
            continue
        dst = tuple(slice(i.start - r.start, i.stop - r.start) for i, r in zip(inter, roi))
        src = tuple(slice(i.start - x.start, i.stop - x.start) for i, x in zip(inter, box))
        g = g[src]
        if limit_on:
            depth = max(0.0, depth_sd[1] * float(depth_sd[0][tuple(p)]))
            g = g * np.exp(-np.maximum(side[dst] - s.click_depth_limit * depth - s.click_depth_slack_mm, 0.0)
                           / s.shape_scale_mm)
        np.maximum(out[dst], g, out=out[dst])
    return out


def correct_mask(image: np.ndarray, spacing: Sequence[float], base: np.ndarray, fg_points: np.ndarray,
                 bg_points: np.ndarray, fg_scribble: np.ndarray | None, bg_scribble: np.ndarray | None,
                 s: InteractiveSettings, *, memo: dict | None = None, appearance=None) -> np.ndarray:
    """The corrected mask (see the module docstring); ``image`` normalised to 0..1, points (N, 3) int.
    ``memo``: dicts kept with the prepared image (``influence``: each click's geodesic influence; ``shape``: the
    base mask's signed distance), so that the next click on the same image only pays for what is new.
    ``appearance``: roi -> the organ's learned look over that crop (log-odds; :func:`.appearance.crop_logit`);
    given, ``appearance_weight`` x it replaces the histogram term."""
    spacing = tuple(float(v) for v in spacing)
    marks = [np.asarray(p) for p in fg_points] + [np.asarray(p) for p in bg_points]
    marks += [np.argwhere(m) for m in (fg_scribble, bg_scribble) if m is not None and m.any()]
    if not marks:
        return base.copy()
    roi, region = change_region(base.shape, spacing, marks, s.roi_margin_mm)
    origin = np.array([r.start for r in roi])
    img, b = image[roi], base[roi]
    fg, bg = fg_points - origin, bg_points - origin
    fg_sc = np.zeros(b.shape, bool) if fg_scribble is None else fg_scribble[roi].astype(bool)
    bg_sc = np.zeros(b.shape, bool) if bg_scribble is None else bg_scribble[roi].astype(bool)

    memo = memo or {}
    s = organ_scaled(s, base, spacing)
    # a click whose intensity looks like the other side says "not here" rather than "this whole region":
    # its range shrinks (e.g. a background click on a false part as bright as the kidney itself); off by
    # default (``click_similar_shrink: 0``), and then the histogram it needs is not learned
    looks_fg = (1.0 / (1.0 + np.exp(-_intensity_llr(img, b, ~b, s.intensity_bins))) if s.click_similar_shrink > 0
                else np.zeros(b.shape, np.float32))
    ranges_fg = [_click_range(s, 1.0 - looks_fg[tuple(p)]) for p in fg]
    ranges_bg = [_click_range(s, looks_fg[tuple(p)]) for p in bg]
    base_sd = _base_distance(base, spacing, memo.get("shape"))
    infl_fg = _influences(image, spacing, fg_points, ranges_fg, roi, s, memo.get("influence"),
                          depth_sd=(base_sd, -1.0))
    infl_bg = _influences(image, spacing, bg_points, ranges_bg, roi, s, memo.get("influence"),
                          depth_sd=(base_sd, 1.0))
    seeds_fg = _seed_discs(b.shape, spacing, fg, s.click_seed_radius_mm) | fg_sc
    seeds_bg = _seed_discs(b.shape, spacing, bg, s.click_seed_radius_mm) | bg_sc
    seeds_fg &= ~seeds_bg  # a voxel marked both ways: the background mark wins

    if s.shell_mode == "warp":
        sd = shell_warp(base_sd, fg_points, bg_points, roi, spacing, base, s)
    else:
        sd = base_sd[roi] - shell_shift(base_sd, fg_points, bg_points, roi, spacing, base, s)
    if appearance is not None:
        llr = s.appearance_weight * appearance(roi)
    else:
        llr = _intensity_llr(img, (b & (infl_bg < 0.5)) | (infl_fg > 0.5) | seeds_fg,
                             (~b & (infl_fg < 0.5)) | (infl_bg > 0.5) | seeds_bg, s.intensity_bins)
    logit = unary_logit(shape_prior(sd, s), llr, infl_fg, infl_bg, s)

    # outside the region and on the crop's inner faces the base label stays (hard seeds): no seam
    fixed = ~region
    for axis, (r, n) in enumerate(zip(roi, base.shape)):
        lo = [slice(None)] * 3
        if r.start > 0:
            lo[axis] = slice(0, 1)
            fixed[tuple(lo)] = True
        if r.stop < n:
            lo[axis] = slice(-1, None)
            fixed[tuple(lo)] = True
    seeds_fg |= fixed & b & ~seeds_bg
    seeds_bg |= fixed & ~b & ~seeds_fg

    if s.engine == "graphcut":
        cut = _graph_cut(img, logit, seeds_fg, seeds_bg, s)
    elif s.engine == "random_walker":
        cut = _random_walker(img, logit, seeds_fg, seeds_bg, spacing, s)
    else:
        cut = ((logit > 0) | seeds_fg) & ~seeds_bg
    cut = np.where(region, cut, b)
    cut = _drop_new_islands(cut, b, region, fg, fg_sc)
    if s.keep_changes == "connected":
        cut = _changes_at_marks(cut, b, seeds_fg & ~fixed, seeds_bg & ~fixed)
    out = base.copy()
    out[roi] = cut
    return out


def _gaussian_around(roi: Sequence[slice], p: Sequence[int], spacing: Sequence[float], sigma: float) -> np.ndarray:
    """exp(-|x - p|^2 / 2 sigma^2) (mm) over the crop ``roi``, built from three 1-D factors."""
    axes = [np.exp(-0.5 * ((np.arange(r.start, r.stop) - c) * sp / sigma) ** 2).astype(np.float32)
            for r, c, sp in zip(roi, p, spacing)]
    return axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]


def _shell_sigma(base: np.ndarray, spacing: Sequence[float], s: InteractiveSettings) -> float:
    """How far (mm, a Gaussian's sigma) one click's shell correction reaches: organ-scaled, within bounds."""
    return float(np.clip(s.shell_range_fraction * organ_radius_mm(base, spacing), s.shell_range_min_mm,
                         s.shell_range_max_mm))


def _wrong_side_clicks(base_sd: np.ndarray, fg_points: np.ndarray, bg_points: np.ndarray):
    """(point, sign, depth mm) of each click on the base's wrong side: a background click inside the base
    (sign +1) or a foreground click outside it (sign -1), ``depth`` > 0 its distance to the base's border."""
    for points, sign in ((bg_points, 1.0), (fg_points, -1.0)):
        for p in np.asarray(points).reshape(-1, 3):
            depth = sign * float(base_sd[tuple(p)])
            if depth > 0:
                yield p, sign, depth


def shell_shift(base_sd: np.ndarray, fg_points: np.ndarray, bg_points: np.ndarray, roi: Sequence[slice],
                spacing: Sequence[float], base: np.ndarray, s: InteractiveSettings) -> np.ndarray:
    """How far (mm, positive = inwards) the base label's border moves in the crop ``roi``, from the clicks.

    A pseudo label's errors are thin shells around the organ: a background click inside the base at depth d
    says the border is ~d too far out around there, a foreground click outside at distance d that it is ~d
    too far in. Each click moves the border by ``shell_shift_factor`` x its signed depth (at most
    ``shell_shift_max_mm``), fading as a Gaussian of the distance to the click (sigma = ``shell_range_fraction``
    x the base organ's equivalent-sphere radius, within ``shell_range_min_mm``..``shell_range_max_mm``), so
    that one click corrects a patch of the shell; the graph cut's intensity and edge terms snap the moved
    border to the image. A click on the side the base already has right (a background click outside it)
    moves nothing. Several clicks: their weighted mean where they overlap."""
    out = np.zeros([r.stop - r.start for r in roi], np.float32)
    if s.shell_shift_factor <= 0 or not base.any():
        return out
    sigma = _shell_sigma(base, spacing, s)
    total = np.zeros_like(out)
    for p, sign, depth in _wrong_side_clicks(base_sd, fg_points, bg_points):
        shift = sign * min(s.shell_shift_factor * depth, s.shell_shift_max_mm)
        w = _gaussian_around(roi, p, spacing, sigma)
        out += w * shift
        total += w
    return out / np.maximum(total, 1.0)


def shell_warp(base_sd: np.ndarray, fg_points: np.ndarray, bg_points: np.ndarray, roi: Sequence[slice],
               spacing: Sequence[float], base: np.ndarray, s: InteractiveSettings) -> np.ndarray:
    """The base label's signed distance in the crop ``roi``, its border dragged by the clicks (mm).

    A click on the base's wrong side at depth d drags the nearest stretch of the border past itself: a
    displacement of ``shell_shift_factor`` x d along the distance gradient (at most ``shell_shift_max_mm``),
    fading as a Gaussian of the distance to the click (sigma as :func:`shell_shift`). Unlike a pure offset
    this also moves the far side of a displaced organ (a pseudo label sitting a few mm beside the organ)."""
    crop = base_sd[tuple(roi)]
    if s.shell_shift_factor <= 0 or not base.any():
        return crop
    sigma = _shell_sigma(base, spacing, s)
    shape = [r.stop - r.start for r in roi]
    disp = np.zeros([3] + shape, np.float32)
    total = np.zeros(shape, np.float32)
    for p, sign, depth in _wrong_side_clicks(base_sd, fg_points, bg_points):
        grad = np.array([(base_sd[tuple(np.minimum(p + e, np.array(base.shape) - 1))]
                          - base_sd[tuple(np.maximum(p - e, 0))]) / (2.0 * sp)
                         for e, sp in zip(np.eye(3, dtype=int), spacing)])
        norm = float(np.linalg.norm(grad))
        if norm < EPS:
            continue
        # inwards (along the gradient) for a background click inside, outwards for a foreground click outside
        move = (sign * grad / norm) * min(s.shell_shift_factor * depth, s.shell_shift_max_mm)
        w = _gaussian_around(roi, p, spacing, sigma)
        disp += w[None] * move[:, None, None, None].astype(np.float32)
        total += w
    if not total.any():
        return crop
    disp /= np.maximum(total, 1.0)[None]
    grid = np.indices(shape, dtype=np.float32)
    coords = [g + r.start - d / sp for g, r, d, sp in zip(grid, roi, disp, spacing)]
    return ndimage.map_coordinates(base_sd, coords, order=1, mode="nearest").astype(np.float32)


def shape_prior(sd: np.ndarray, s: InteractiveSettings) -> np.ndarray:
    """The base label's log-odds: its signed distance (mm) / ``shape_scale_mm``, clipped to +- ``shape_cap``."""
    return np.clip(sd / s.shape_scale_mm, -s.shape_cap, s.shape_cap)


def unary_logit(shape: np.ndarray, llr: np.ndarray, infl_fg: np.ndarray, infl_bg: np.ndarray,
                s: InteractiveSettings) -> np.ndarray:
    """Foreground log-odds per voxel: where a click has influence its side replaces the shape prior and the
    intensity term weighs ``intensity_weight``; elsewhere the shape prior and ``region_intensity_weight``
    (with zero influences: the region's own terms, which ``bench/interactive_fixed_point.py`` measures)."""
    influence = np.maximum(infl_fg, infl_bg)
    return ((1.0 - influence) * shape + s.click_weight * (infl_fg - infl_bg)
            + (s.region_intensity_weight + (s.intensity_weight - s.region_intensity_weight) * influence) * llr)


def _graph_cut(img, logit, seeds_fg, seeds_bg, s: InteractiveSettings) -> np.ndarray:
    import numpymaxflow

    p_fg = 1.0 / (1.0 + np.exp(-np.clip(logit, -20, 20)))
    prob = np.clip(np.stack([1.0 - p_fg, p_fg]), EPS, 1 - EPS).astype(np.float32)
    seed = np.stack([seeds_bg, seeds_fg]).astype(np.float32)
    out = numpymaxflow.maxflow_interactive(img[None].astype(np.float32), prob, seed, s.smoothness, s.edge_sigma, 6)
    return out.astype(bool)


def _random_walker(img, logit, seeds_fg, seeds_bg, spacing, s: InteractiveSettings) -> np.ndarray:
    """skimage's random walker with the confident part of the unary as extra seeds (it takes no prior)."""
    from skimage.segmentation import random_walker

    labels = np.zeros(img.shape, np.int32)
    labels[(logit > 3.0) | seeds_fg] = 1
    labels[(logit < -3.0) | seeds_bg] = 2
    labels[seeds_fg & ~seeds_bg] = 1
    if not (labels == 0).any() or not (labels == 1).any() or not (labels == 2).any():
        return labels == 1
    rw = random_walker(img, labels, beta=s.rw_beta, mode="cg_j", spacing=spacing, tol=1e-2)
    return rw == 1


def _changes_at_marks(cut: np.ndarray, base: np.ndarray, marks_fg: np.ndarray, marks_bg: np.ndarray) -> np.ndarray:
    """``cut`` where it differs from ``base`` in a piece (26-connected) that holds a mark, ``base`` elsewhere:
    a change no click asked for is not made."""
    added, removed = cut & ~base, base & ~cut
    out = base.copy()
    for diff, marks, value in ((added, marks_fg, True), (removed, marks_bg, False)):
        lab, n = ndimage.label(diff, structure=np.ones((3, 3, 3), bool))
        if n:
            out[_pieces_holding(lab, n, marks)] = value
    return out


def _pieces_holding(lab: np.ndarray, n: int, holders: np.ndarray) -> np.ndarray:
    """The union of the labelled pieces (``lab``, 1..``n``) that hold at least one ``holders`` voxel."""
    keep = np.zeros(n + 1, bool)
    keep[np.unique(lab[holders])] = True
    keep[0] = False
    return keep[lab]


def _drop_new_islands(cut: np.ndarray, base: np.ndarray, region: np.ndarray, fg_points: np.ndarray,
                      fg_scribble: np.ndarray) -> np.ndarray:
    """Foreground pieces (in the crop) that touch neither the base label, a foreground mark nor anything
    outside the region are intensity look-alikes, not the organ: they go."""
    lab, n = ndimage.label(cut)
    if n <= 1:
        return cut
    holders = base | ~region | fg_scribble
    holders[tuple(np.asarray(fg_points, np.int64).reshape(-1, 3).T)] = True
    return _pieces_holding(lab, n, holders)
