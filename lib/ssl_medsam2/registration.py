"""Support-to-query image registration with SimpleITK, for the weight-free atlas engine.

Inter-subject abdominal MRI differs in position, size, breathing state and intensity scale, so one
registration stage is not enough. The pipeline is multi-stage and multi-resolution, run on a
downsampled working copy for speed (the transform is resolution-free, so labels are warped onto the
query's full grid afterwards):

1. a multi-start initialisation: centre of mass (image moments) combined with each of the eight
   in-plane 90° rotations and flips (and, where the fields of view differ in length, with the
   support's slab flush with either end of the query's: :func:`slab_shifts`), each refined by a short coarse affine and scored by the
   normalised cross-correlation over the query's body within the support's organs
   (:func:`start_scores`); the engine picks one start per query from all supports' scores
   (:func:`choose_start`): the header's orientation (the plain start) wins unless another is
   clearly better for every support, so scans stored rotated or mirrored are found, ordinary ones
   are not disturbed, and a start in doubt is said (the case is then flagged); a second opinion that
   compares edges, not intensities, after the affine stage from every start (:func:`edge_scores`,
   :func:`check_start`) puts the start in doubt where it contradicts it;
2. an affine stage driven by Mattes mutual information (robust to the MRI intensity scale);
3. optionally per class, the affine refined around that organ (:func:`refine_affine`);
4. a deformable stage, either a multi-resolution B-spline (Mattes MI) or diffeomorphic demons on
   histogram-matched intensities (fast and dense; same-modality only).

Everything works in the canonical (RAS) voxel order of :class:`ssl_medsam2.io.Volume`; SimpleITK
images are built from the canonical affine so the physical geometry is that of the file.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, fields

import numpy as np
import SimpleITK as sitk

from .io import Volume
from .preprocess import IntensityConfig, scale_to_uint8_range

log = logging.getLogger(__name__)


def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A canonical-order (X, Y, Z) array with its 4x4 affine -> SimpleITK image (same physical space).

    Coordinates stay in the affine's RAS world; as long as every image of a registration is built
    the same way, the convention (RAS vs ITK's LPS) does not matter.
    """
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in a[:3, 3]))
    img.SetDirection(tuple(float(d) for d in (a[:3, :3] / spacing).ravel()))
    return img


def from_sitk(img: sitk.Image) -> np.ndarray:
    """SimpleITK image -> canonical-order (X, Y, Z) array (inverse of :func:`to_sitk`)."""
    return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)))


@dataclass
class RegistrationSettings:
    """What the registration stages do: the ``atlas:`` section's preset with its non-null keys over it.

    No defaults here: the presets in configs/ssl_medsam2.yaml are the one place the values live
    (what each key means is said there).
    """

    working_spacing: tuple[float, float, float]  # mm, 0 = keep that axis
    seed: int
    threads: int  # SimpleITK threads; 1 = bit-reproducible (see sitk_threads), 0 = all cores
    # affine stage
    affine_iterations: int
    affine_shrink: tuple[int, ...]
    affine_smooth_mm: tuple[float, ...]
    affine_sampling: float
    mi_bins: int
    # deformable stage
    deformable: str  # demons | bspline | none
    bspline_grid_mm: float
    bspline_iterations: int
    bspline_shrink: tuple[int, ...]
    bspline_smooth_mm: tuple[float, ...]
    bspline_sampling: float
    demons_iterations: tuple[int, ...]  # per level, coarse to fine
    demons_shrink: tuple[int, ...]
    demons_field_sigma: float  # voxels; regularisation of the update / displacement field
    histogram_levels: int
    focus_margin_mm: float | None  # metric only near the support's organs (None = whole image)
    # multi-start initialisation
    init_starts: str  # moments (one start) | dihedral (moments x the 8 in-plane 90° rotations/flips)
    init_iterations: int  # coarse affine iterations per start
    init_margin: float  # a start other than the header's must beat it by this much mean NCC (and be every support's best)
    init_doubt_margin: float  # the chosen start leading the next by less than this puts the case in doubt
    start_check: str  # edges (a second opinion on the start: edge alignment after the affine stage) | none
    start_check_margin: float  # another start aligning the edges better than the chosen one by this much: in doubt
    # per-class refinement
    refine_margin_mm: float | None  # per class: affine + deformable again within this margin of the organ (None/0 = off)
    refine_iterations: int

    @classmethod
    def from_dict(cls, d: dict) -> "RegistrationSettings":
        """From the merged preset + overrides; a key neither sets fails here, named ``atlas.<key>``."""
        missing = [f"atlas.{f.name}" for f in fields(cls) if f.name not in d]
        if missing:
            raise ValueError(f"{', '.join(missing)} set neither by the atlas preset nor directly")
        return cls(**{f.name: tuple(d[f.name]) if isinstance(d[f.name], list) else d[f.name] for f in fields(cls)})


def prepare(volume: Volume, settings: RegistrationSettings,
            intensity: IntensityConfig) -> sitk.Image:
    """Intensity-normalised (0..1) working copy of a volume on a coarser grid."""
    scaled = scale_to_uint8_range(volume.array, intensity) / 255.0
    img = to_sitk(scaled.astype(np.float32), volume.affine)
    spacing = np.array(img.GetSpacing())
    size = np.array(img.GetSize())
    target = np.array([t if t and t > 0 else s for t, s in zip(settings.working_spacing, spacing)], dtype=float)
    target = np.maximum(target, spacing)
    if np.allclose(target, spacing):
        return img
    new_size = np.maximum(1, np.round(size * spacing / target)).astype(int)
    new_spacing = size * spacing / new_size
    # Gaussian anti-aliasing before subsampling, only along the axes that shrink.
    sigma = [float(np.sqrt(max(0.0, (ns / s) ** 2 - 1)) * s / 2) for ns, s in zip(new_spacing, spacing)]
    if any(s > 0 for s in sigma):
        img = sitk.SmoothingRecursiveGaussian(img, [max(s, 1e-3) for s in sigma])
    origin = np.array(img.GetOrigin())
    direction = np.array(img.GetDirection()).reshape(3, 3)
    # keep the physical extent: first voxel centre moves by half the difference in voxel size
    new_origin = origin + direction @ ((new_spacing - spacing) / 2)
    return sitk.Resample(img, [int(s) for s in new_size], sitk.Transform(), sitk.sitkLinear,
                         tuple(new_origin), tuple(new_spacing), tuple(direction.ravel()), 0.0, sitk.sitkFloat32)


@contextlib.contextmanager
def sitk_threads(settings: RegistrationSettings):
    """SimpleITK's thread count for the duration (restored afterwards).

    Why 1 is the default: SimpleITK's multi-threaded metrics and filters (Mattes MI, demons,
    smoothing) split work dynamically and add per-thread partial results in whatever order the
    threads finish, so the same inputs and seed gave different pseudo labels from run to run (two
    atlas runs on CHAOS chaos_15 differed by thousands of liver voxels). With one thread every run is
    byte-identical; it costs wall time only where idle cores exist (CPU time is the same).
    ``threads: 0`` uses every core and gives up bit-reproducibility.
    """
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    n = int(settings.threads or 0)
    if n > 0:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


def focus_mask(label: Volume, classes, reference: sitk.Image, margin_mm: float) -> sitk.Image:
    """The support's organs (union of ``classes``) dilated by ``margin_mm``, on ``reference``'s grid.

    Restricting the metric to this region makes registration align the organs to segment rather
    than the body wall, arms or bowel, which vary more between subjects.
    """
    fg = np.isin(label.array, [int(c) for c in classes]).astype(np.uint8)
    img = to_sitk(fg, label.affine)
    mask = sitk.Resample(img, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    radius = [max(0, int(round(margin_mm / sp))) for sp in reference.GetSpacing()]
    if any(radius):
        mask = sitk.BinaryDilate(mask, radius, sitk.sitkBall)
    return mask


def private(img: sitk.Image) -> sitk.Image:
    """A copy of ``img`` that no other handle shares, for one filter or registration to consume.

    Why: an ITK filter sets the requested region of its input image, and that region stays on the
    shared image: ``Resample`` asks only for the part of its input that maps into the output grid,
    ``RegionOfInterest`` and ``Shrink`` for their crop. Every later registration on that image then
    sampled its metric inside the stale region, so a support's or organ's registration depended on
    what had run before it (measured on CHAOS: a support's kidney Dice 0.65 -> 0.0 after another
    registration's demons crop). A copy taken after the damage keeps it, so the prepared query,
    support and mask images never enter a pipeline themselves: every use gets its own copy.
    """
    copy = sitk.Image(img)
    copy.MakeUnique()
    return copy


def _mattes_mi_registration(s: "RegistrationSettings", sampling: float,
                            moving_mask: sitk.Image | None = None) -> sitk.ImageRegistrationMethod:
    """Mattes MI with seeded random sampling (optionally only within the moving mask), linear interpolation."""
    reg = sitk.ImageRegistrationMethod()
    if moving_mask is not None:
        reg.SetMetricMovingMask(private(moving_mask))
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=s.mi_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, int(s.seed) + 1)  # seed 0 would mean "wall clock"
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def _moments_start(fixed: sitk.Image, moving: sitk.Image) -> sitk.AffineTransform:
    """Centre of rotation at the query's intensity centre of mass, shifted onto the support's."""
    return sitk.AffineTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS))


def in_plane_starts(fixed: sitk.Image, moving: sitk.Image) -> list[tuple[str, sitk.AffineTransform]]:
    """The moments start composed with the 8 in-plane 90° rotations and flips (the dihedral group).

    "In-plane" is the query's slice plane: the axis of rotation is the world direction of its
    largest-spacing voxel axis, so a scan stored rotated or mirrored within its slices is covered
    whatever its orientation. The first entry is the plain moments start.
    """
    base = _moments_start(fixed, moving)
    d = np.array(fixed.GetDirection()).reshape(3, 3)
    sp = np.array(fixed.GetSpacing())
    k = int(np.flatnonzero(np.isclose(sp, sp.max(), rtol=1e-3))[-1])
    n = _slice_normal(fixed)
    u = d[:, (k + 1) % 3] / np.linalg.norm(d[:, (k + 1) % 3])
    cross = np.array([[0, -n[2], n[1]], [n[2], 0, -n[0]], [-n[1], n[0], 0]])
    flip = np.eye(3) - 2 * np.outer(u, u)  # mirror one in-plane axis
    starts = []
    for mirrored in (False, True):
        for quarter in range(4):
            a = quarter * np.pi / 2
            rot = np.eye(3) + np.sin(a) * cross + (1 - np.cos(a)) * (cross @ cross)  # Rodrigues
            m = rot @ flip if mirrored else rot
            tx = sitk.AffineTransform(base)
            tx.SetMatrix(tuple(float(v) for v in np.round(m, 12).ravel()))
            starts.append((f"{'flip+' if mirrored else ''}rot{quarter * 90}", tx))
    return starts


def body_mask(img: sitk.Image) -> sitk.Image:
    """The imaged body (Otsu foreground of the intensities), where similarity is measured."""
    return sitk.OtsuThreshold(img, 0, 1, 128)


def similarity(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
               mask: sitk.Image | None = None) -> float:
    """NCC of the query and the support warped onto it, over ``mask`` (the query's body) or everywhere.

    Support voxels outside its field of view count as 0, so a transform that maps the body out of
    the support's image scores low. In [-1, 1]; comparable between supports and starts.
    """
    # copies, not views: a view of a temporary SimpleITK image reads freed memory once it is collected
    q = sitk.GetArrayFromImage(fixed).astype(np.float64)
    w = sitk.GetArrayFromImage(
        sitk.Resample(private(moving), fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)).astype(np.float64)
    sel = sitk.GetArrayFromImage(mask).astype(bool) if mask is not None else np.ones(q.shape, bool)
    if sel.sum() < 2:
        return -1.0
    a, b = q[sel] - q[sel].mean(), w[sel] - w[sel].mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def _affine_registration(s: RegistrationSettings, moving_mask: sitk.Image | None, iterations: int,
                         shrink, smooth, fixed: sitk.Image) -> sitk.ImageRegistrationMethod:
    """Mattes-MI affine; shrink factors capped so a level keeps >= 32 voxels across the slice plane.

    A small query (a low-resolution scan, a cropped field of view) shrunk 4x would leave a dozen
    voxels per side, too few to tell a mirrored abdomen from a rotated one.
    """
    sp, size = np.array(fixed.GetSpacing()), np.array(fixed.GetSize())
    k = int(np.flatnonzero(np.isclose(sp, sp.max(), rtol=1e-3))[-1])
    cap = max(1, int(np.delete(size, k).min()) // 32)
    shrink = [min(int(f), cap) for f in shrink]
    reg = _mattes_mi_registration(s, s.affine_sampling, moving_mask)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                 numberOfIterations=int(iterations),
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(smooth))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _slice_normal(img: sitk.Image) -> np.ndarray:
    """World direction of the image's largest-spacing voxel axis (the slice normal; the last of equals)."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    sp = np.array(img.GetSpacing())
    k = int(np.flatnonzero(np.isclose(sp, sp.max(), rtol=1e-3))[-1])
    return d[:, k] / np.linalg.norm(d[:, k])


def _extent_along(img: sitk.Image, n: np.ndarray) -> tuple[float, float]:
    """The image's extent (voxel centres) projected on the world direction ``n``: (low, high) in mm."""
    size = np.array(img.GetSize()) - 1
    corners = [img.TransformContinuousIndexToPhysicalPoint([float(c) for c in np.array(ix) * size])
               for ix in np.ndindex(2, 2, 2)]
    proj = [float(np.dot(c, n)) for c in corners]
    return min(proj), max(proj)


SLAB_STEP_MM = 20.0  # the start scoring's short affine recovers about ±10 mm along the slice normal (CHAOS)
SLAB_MAX_SHIFTS = 9


def slab_shifts(fixed: sitk.Image, moving: sitk.Image, start: sitk.AffineTransform) -> list[float]:
    """Shifts (mm, along the query's slice normal) to try on top of a start: 0 (the centres of mass
    aligned) and a grid every <= 20 mm from the support's slab flush with one end of the query's to
    flush with the other.

    Why: with fields of view of different length the centre of mass is no anatomical landmark (a
    query reaching further into the chest or pelvis than its supports moves it), and the short affine
    of the start scoring does not recover tens of millimetres: measured on CHAOS at 5 mm (a support
    cropped in z to its organs, the query whole) the header's start scored 0.28 from the centres of
    mass, 0.47 40 mm lower, and a mirrored start won (0.37).
    """
    n = _slice_normal(fixed)
    qa, qb = _extent_along(fixed, n)
    sa, sb = _extent_along(moving, n)
    t = float(np.dot(np.array(start.GetTranslation()), n))
    lo, hi = sorted((sb - qb - t, sa - qa - t))  # support's top on the query's top .. bottoms together
    count = min(SLAB_MAX_SHIFTS, int(np.ceil((hi - lo) / SLAB_STEP_MM)) + 1)
    grid = np.linspace(lo, hi, count) if count > 1 else np.array([])
    return [0.0] + [round(float(g), 2) for g in grid if abs(g) >= SLAB_STEP_MM / 2]


def shifted(start: sitk.AffineTransform, fixed: sitk.Image, shift_mm: float) -> sitk.AffineTransform:
    """``start`` with its translation moved by ``shift_mm`` along the query's slice normal."""
    tx = sitk.AffineTransform(start)
    if shift_mm:
        tx.SetTranslation(tuple(float(v) for v in np.array(tx.GetTranslation()) + shift_mm * _slice_normal(fixed)))
    return tx


def start_scores(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings,
                 moving_mask: sitk.Image | None = None, slabs: bool = False) -> list[dict]:
    """NCC of each in-plane start after a short affine on the coarsest level, from the centres of mass
    aligned or (``slabs``) at each of the :func:`slab_shifts` too: rows ``{"start", "shift_mm", "score"}``
    (empty with one start).

    The score is measured on the working grid over the query's body within the support's focus
    region mapped onto the query (the organs, where a mirrored abdomen differs; the body outline is
    nearly symmetric). :func:`best_shifts` keeps each start's best shift.
    """
    s = settings
    if s.init_starts == "moments":
        return []
    if s.init_starts != "dihedral":
        raise ValueError(f"unknown atlas.init_starts '{s.init_starts}' (moments or dihedral)")
    with sitk_threads(s):
        body = body_mask(fixed)
        rows = []
        starts = in_plane_starts(fixed, moving)
        shifts = slab_shifts(fixed, moving, starts[0][1]) if slabs else [0.0]
        for name, start in starts:
            for shift in shifts:
                reg = _affine_registration(s, moving_mask, s.init_iterations, s.affine_shrink[:1],
                                           s.affine_smooth_mm[:1], fixed)
                reg.SetInitialTransform(shifted(start, fixed, shift), inPlace=False)
                try:
                    tx = reg.Execute(private(fixed), private(moving))
                except RuntimeError:  # ITK: this start maps every sample outside the support: it cannot be the one
                    rows.append({"start": name, "shift_mm": shift, "score": -1.0})
                    continue
                region = body
                if moving_mask is not None:
                    region = sitk.And(sitk.Resample(private(moving_mask), fixed, tx, sitk.sitkNearestNeighbor, 0,
                                                    sitk.sitkUInt8), body)
                rows.append({"start": name, "shift_mm": shift, "score": round(similarity(fixed, moving, tx, region), 4)})
    return rows


def best_shifts(rows: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """(score, shift) of each start at its best shift (the smaller shift on a tie): what :func:`choose_start`
    compares and where :func:`affine_stage` then starts."""
    scores: dict[str, float] = {}
    shifts: dict[str, float] = {}
    for r in sorted(rows, key=lambda r: abs(r["shift_mm"])):
        if r["start"] not in scores or r["score"] > scores[r["start"]]:
            scores[r["start"]], shifts[r["start"]] = r["score"], r["shift_mm"]
    return scores, shifts


HEADER_START = "rot0"  # the query as its header says it is oriented (volumes are in canonical RAS)


@dataclass
class StartChoice:
    """The in-plane start of one query, why, and whether it is in doubt (see :func:`choose_start`).

    ``lead``: mean score of the chosen start minus that of the best other start (how clearly it won);
    ``over_header``: mean score of the best other start minus the header's (what a rotated or mirrored
    start claims); ``per_support``: each support's own best start; ``doubt``: why the start, and so the
    case, is in doubt (None when it is not).
    """

    start: str
    lead: float
    runner_up: str | None
    over_header: float | None
    per_support: list[str]
    doubt: str | None

    def summary(self) -> dict:
        return {"start": self.start, "lead": round(self.lead, 4), "runner_up": self.runner_up,
                "over_header": None if self.over_header is None else round(self.over_header, 4),
                "per_support": list(self.per_support), "doubt": self.doubt}


def _best(scores: dict[str, float]) -> str:
    return max(scores, key=lambda n: (scores[n], n == HEADER_START))


def choose_start(scores_per_support: list[dict[str, float]], margin: float, doubt_margin: float) -> StartChoice:
    """The header's start unless another is clearly better for every support; in doubt when that is unclear.

    The header (the image affine, ``rot0``) says how a scan is oriented; the rotated and mirrored starts
    exist for scans stored wrongly. Another start is taken only when its mean score over the supports
    beats the header's by ``margin`` AND it is every support's own best: a scan stored rotated or
    mirrored is so relative to every (consistently stored) support, while one support can prefer a
    mirror by chance where organ intensities differ between subjects (CHAOS: a bright stomach where the
    other subject's bright spleen would land). The start is in doubt when the supports' own bests
    differ, when a rotated or mirrored start was better than the header's but not taken, or when the
    chosen start leads the next by less than ``doubt_margin`` (``bench/start_margins.py`` measures
    both margins on the shared CHAOS volumes; docs/atlas.md).
    """
    scores_per_support = [sc for sc in scores_per_support if sc]
    if not scores_per_support:
        return StartChoice(HEADER_START, 0.0, None, None, [], None)
    mean = {n: float(np.mean([sc[n] for sc in scores_per_support])) for n in scores_per_support[0]}
    own = [_best(sc) for sc in scores_per_support]
    best = _best(mean)
    header = mean[HEADER_START]
    other = max((n for n in mean if n != HEADER_START), key=lambda n: mean[n])
    over_header = mean[other] - header
    agreed = len(set(own)) == 1
    start = best if best != HEADER_START and over_header >= margin and agreed and own[0] == best else HEADER_START
    runner_up = max((n for n in mean if n != start), key=lambda n: mean[n])
    lead = mean[start] - mean[runner_up]
    doubts = []
    if not agreed:
        doubts.append(f"the supports' best starts differ ({', '.join(own)})")
    if start == HEADER_START and best != HEADER_START:
        doubts.append(f"{best} scores {over_header:.3f} over the header's start, not taken")
    elif lead < doubt_margin:
        doubts.append(f"{start} leads {runner_up} by only {lead:.3f} (< {doubt_margin})")
    return StartChoice(start, lead, runner_up, over_header, own, "; ".join(doubts) or None)


def _in_plane_gradients(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """The two in-plane intensity gradients (per mm, after a 1-voxel in-plane Gaussian) of an image's array."""
    from scipy import ndimage

    a = sitk.GetArrayFromImage(img).astype(np.float64)  # (z, y, x): numpy axis 2 - k is ITK axis k
    sp = np.array(img.GetSpacing())
    k = int(np.flatnonzero(np.isclose(sp, sp.max(), rtol=1e-3))[-1])
    plane = [ax for ax in range(3) if ax != k]
    sigma = [0.0 if ax == k else 1.0 for ax in (2, 1, 0)]
    a = ndimage.gaussian_filter(a, sigma, mode="nearest")
    return tuple(np.gradient(a, axis=2 - ax) / sp[ax] for ax in plane)


def edge_alignment(query_gradients, fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                   region: np.ndarray) -> float:
    """How well the edges of the query and the support warped onto it line up: the mean over ``region``
    (a (z, y, x) mask of the query's working grid) of the squared cosine of the angle between their
    in-plane intensity gradients (normalised gradient fields), in [0, 1] (0.5 for unrelated images).

    Why: it ignores the sign and size of a contrast, only where the edges run. The start scores (NCC
    within the organs) assume the query's organs look like the support's; where they do not (CHAOS
    chaos_15: liver and spleen as dark as muscle on T2-SPIR) a mirrored query scored its wrong,
    unmirrored start best for every support, while the organ outlines still line up better the right way.
    """
    warped = sitk.Resample(private(moving), fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    gq, gw = query_gradients, _in_plane_gradients(warped)
    dot2 = (gq[0] * gw[0] + gq[1] * gw[1]) ** 2
    cos2 = dot2 / ((gq[0] ** 2 + gq[1] ** 2 + 1e-6) * (gw[0] ** 2 + gw[1] ** 2 + 1e-6))
    return float(cos2[region].mean()) if region.any() else 0.0


def query_edges(fixed: sitk.Image, settings: RegistrationSettings) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """(the query's body mask, its in-plane gradients): what :func:`edge_scores` needs of the query, the same
    for every support, so an engine computes it once per query."""
    with sitk_threads(settings):
        return sitk.GetArrayFromImage(body_mask(fixed)).astype(bool), _in_plane_gradients(fixed)


def edge_scores(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings,
                moving_mask: sitk.Image | None, shifts: dict[str, float] | None = None,
                only: set[str] | None = None, query: tuple[np.ndarray, tuple[np.ndarray, ...]] | None = None
                ) -> dict[str, float]:
    """The second opinion on the start: every in-plane start registered through the affine stage (from its
    slab shift in ``shifts``, else the centres of mass) and scored by :func:`edge_alignment` over the
    query's body within the support's focus region mapped onto it (``only``: just these starts;
    ``query``: :func:`query_edges` of ``fixed``, computed here when not given).

    Independent of :func:`start_scores` in both halves: a longer affine (the engine's own), and a
    similarity that does not compare intensities (see :func:`check_start`).
    """
    shifts = shifts or {}
    body, grads = query if query is not None else query_edges(fixed, settings)
    with sitk_threads(settings):
        out = {}
        for name, _ in in_plane_starts(fixed, moving):
            if only is not None and name not in only:
                continue
            try:
                tx, _ = affine_stage(fixed, moving, settings, moving_mask, name, shifts.get(name, 0.0))
            except RuntimeError:  # ITK: this start maps every sample outside the support
                out[name] = 0.0
                continue
            region = body
            if moving_mask is not None:
                region = body & sitk.GetArrayFromImage(sitk.Resample(
                    private(moving_mask), fixed, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)).astype(bool)
            out[name] = round(edge_alignment(grads, fixed, moving, tx, region), 4)
    return out


def check_start(start: str, edge_scores_per_support: list[dict[str, float]], margin: float,
                names: list[str] | None = None) -> dict:
    """Whether the edges agree with the chosen start: ``{"best", "lead", "scores", "per_support_lead", "doubt"}``.

    ``scores``: each start's mean :func:`edge_alignment` over the supports, ``best`` the highest, ``lead``
    the chosen start's mean minus the best other's; ``per_support_lead``: the same per support. ``doubt``
    (else None) when any support's edges line up better from another start than from the chosen one by
    more than ``margin``: one support, like one support's own best start in :func:`choose_start`, is
    enough to doubt. Per support, not on the mean: on the shared CHAOS volumes (2 supports, replayed by
    ``bench/start_margins.py``) a correctly stored query's support prefers another start by at most
    0.008 and each of the 9 silently wrong mirrored cases has a support that prefers the right start by
    0.016 or more, while the mean leaves no such gap (docs/atlas.md).
    """
    names = names or [f"support {i + 1}" for i in range(len(edge_scores_per_support))]
    names = [n for n, sc in zip(names, edge_scores_per_support) if sc]
    per_support = [sc for sc in edge_scores_per_support if sc]
    if not per_support:
        return {"best": None, "lead": None, "scores": {}, "per_support_lead": [], "doubt": None}

    def lead_of(scores: dict[str, float]) -> tuple[float, str]:
        other = max((n for n in scores if n != start), key=lambda n: scores[n])
        return scores[start] - scores[other], other

    mean = {n: float(np.mean([sc[n] for sc in per_support])) for n in per_support[0]}
    leads = [lead_of(sc) for sc in per_support]
    worst = min(range(len(leads)), key=lambda i: leads[i][0])
    doubt = None
    if -leads[worst][0] > margin:
        doubt = (f"{names[worst]}'s edges line up better from {leads[worst][1]} than from {start} "
                 f"(by {-leads[worst][0]:.3f})")
    return {"best": _best(mean), "lead": round(lead_of(mean)[0], 4),
            "scores": {n: round(v, 4) for n, v in mean.items()},
            "per_support_lead": [round(lead, 4) for lead, _ in leads], "doubt": doubt}


def _bspline_stage(fixed, moving, affine: sitk.Transform, s: RegistrationSettings,
                   moving_mask: sitk.Image | None = None) -> sitk.Transform:
    extent = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    mesh = [max(1, int(round(e / s.bspline_grid_mm))) for e in extent]
    bs = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = _mattes_mi_registration(s, s.bspline_sampling, moving_mask)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=s.bspline_iterations,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=1000,
                             costFunctionConvergenceFactor=1e7)
    reg.SetShrinkFactorsPerLevel(list(s.bspline_shrink))
    reg.SetSmoothingSigmasPerLevel(list(s.bspline_smooth_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bs, inPlace=True)
    reg.Execute(private(fixed), private(moving))
    return sitk.CompositeTransform([affine, bs])


def _crop_to_mask(fixed: sitk.Image, affine: sitk.Transform, moving_mask: sitk.Image | None,
                  pad_vox: int = 2) -> sitk.Image:
    """``fixed`` cropped to the bounding box of the support's focus region mapped into it (speed + focus)."""
    if moving_mask is None:
        return fixed
    m = sitk.Resample(private(moving_mask), fixed, affine, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(m)
    if 1 not in stats.GetLabels():
        return fixed
    bb = stats.GetBoundingBox(1)  # (x, y, z, sx, sy, sz)
    size = np.array(fixed.GetSize())
    lo = np.maximum(0, np.array(bb[:3]) - pad_vox)
    hi = np.minimum(size, np.array(bb[:3]) + np.array(bb[3:]) + pad_vox)
    return sitk.RegionOfInterest(private(fixed), [int(v) for v in hi - lo], [int(v) for v in lo])


ORGAN_MATCH_PERCENTILES = (2, 10, 25, 50, 75, 90, 98)
ORGAN_MATCH_MIN_VOXELS = 50  # an organ with fewer voxels on either side keeps the histogram match


def match_organ_intensities(moved: sitk.Image, matched: sitk.Image, region: sitk.Image,
                            moving_labels: sitk.Image, fixed_labels: sitk.Image, classes) -> sitk.Image:
    """The histogram-matched support with each organ's intensities mapped onto the query's same organ.

    ``moved``: the support resampled into ``region`` (the query's grid), ``matched``: the same after
    global histogram matching, ``moving_labels`` / ``fixed_labels``: the support's label and the
    query's first-pass label on that grid. Per class, the support's intensity percentiles inside the
    organ are mapped piecewise-linearly onto the query's inside its first-pass organ. Why: global
    histogram matching assumes both subjects have the same tissue proportions and brightness order;
    where a subject's liver and spleen are as dark as muscle (CHAOS chaos_15) it hands demons a support
    whose organs look like the wrong tissue, and a loose field then follows them off the organs.
    """
    m = sitk.GetArrayFromImage(moved).astype(np.float64)
    out = sitk.GetArrayFromImage(matched).astype(np.float64)
    f = sitk.GetArrayFromImage(region).astype(np.float64)
    sl, ql = sitk.GetArrayFromImage(moving_labels), sitk.GetArrayFromImage(fixed_labels)
    for c in classes:
        sm, qm = sl == int(c), ql == int(c)
        if sm.sum() < ORGAN_MATCH_MIN_VOXELS or qm.sum() < ORGAN_MATCH_MIN_VOXELS:
            continue
        x = m[sm]
        src = np.percentile(x, ORGAN_MATCH_PERCENTILES)
        src = np.maximum.accumulate(src + np.arange(src.size) * 1e-6)  # strictly increasing for interp
        dst = np.percentile(f[qm], ORGAN_MATCH_PERCENTILES)
        out[sm] = np.interp(x, src, dst) + np.minimum(x - src[0], 0) + np.maximum(x - src[-1], 0)
    img = sitk.GetImageFromArray(out.astype(np.float32))
    img.CopyInformation(region)
    return img


def _demons_stage(fixed, moving, affine: sitk.Transform, s: RegistrationSettings,
                  moving_mask: sitk.Image | None = None, organ_labels=None) -> sitk.Transform:
    """Multi-resolution diffeomorphic demons on the affinely resampled, histogram-matched support.

    Runs inside the bounding box of the support's focus region (if any); the displacement is zero
    outside it. ``organ_labels`` = (support label, query first-pass label, classes): the organs are
    intensity-matched one by one on top (:func:`match_organ_intensities`).
    """
    region = private(_crop_to_mask(fixed, affine, moving_mask))
    moved = sitk.Resample(private(moving), region, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    matched = sitk.HistogramMatching(moved, region, numberOfHistogramLevels=s.histogram_levels,
                                     numberOfMatchPoints=7, thresholdAtMeanIntensity=True)
    if organ_labels is not None:
        support_label, query_label, classes = organ_labels
        matched = match_organ_intensities(
            moved, matched, region,
            sitk.Resample(private(support_label), region, affine, sitk.sitkNearestNeighbor, 0, sitk.sitkInt16),
            sitk.Resample(private(query_label), region, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16),
            classes)
    moved = matched
    field = None
    z_ratio = region.GetSpacing()[2] / region.GetSpacing()[0]
    for shrink, iters in zip(s.demons_shrink, s.demons_iterations):
        zs = max(1, int(round(shrink / z_ratio)))  # anisotropic voxels: shrink z less
        f = sitk.Shrink(private(region), [shrink, shrink, zs]) if shrink > 1 else private(region)
        m = sitk.Resample(private(moved), f, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(int(iters))
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(s.demons_field_sigma)
        demons.SetSmoothUpdateField(True)
        demons.SetUpdateFieldStandardDeviations(1.0)
        if field is None:
            field = demons.Execute(f, m)
        else:
            init = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
            field = demons.Execute(f, m, init)
    field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    disp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    # query point -> displaced point in the affinely resampled frame -> support point
    return sitk.CompositeTransform([affine, disp])


def affine_stage(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings,
                 moving_mask: sitk.Image | None = None, start: str = "rot0",
                 shift_mm: float = 0.0) -> tuple[sitk.Transform, float]:
    """Multi-resolution affine (Mattes MI) from the named in-plane start (see :func:`in_plane_starts`),
    shifted along the slice normal by ``shift_mm`` (:func:`slab_shifts`).

    Returns the transform and the final metric value.
    """
    with sitk_threads(settings):
        init = shifted(dict(in_plane_starts(fixed, moving))[start], fixed, shift_mm)
        reg = _affine_registration(settings, moving_mask, settings.affine_iterations, settings.affine_shrink,
                                   settings.affine_smooth_mm, fixed)
        reg.SetInitialTransform(init, inPlace=False)
        tx = reg.Execute(private(fixed), private(moving))
        return tx, float(reg.GetMetricValue())


def refine_affine(fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform,
                  settings: RegistrationSettings, class_mask: sitk.Image) -> sitk.Transform:
    """The global affine refined around one organ (metric only within ``class_mask``).

    Organs move relative to each other between subjects (breathing, posture); one affine for the
    whole abdomen is a compromise that fits the liver and leaves small organs beside their place.
    Runs on the finest affine level and the working grid.
    """
    s = settings
    with sitk_threads(s):
        reg = _affine_registration(s, class_mask, s.refine_iterations, [s.affine_shrink[-1], 1],
                                   [s.affine_smooth_mm[-1], 0.0], fixed)
        reg.SetInitialTransform(affine, inPlace=False)
        try:
            return reg.Execute(private(fixed), private(moving))
        except RuntimeError:  # ITK: the organ's region maps outside the support (a small scan): keep the global fit
            log.warning("per-class affine refinement found no overlap; the global affine is kept for this organ")
            return affine


def deformable_stage(fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform,
                     settings: RegistrationSettings, moving_mask: sitk.Image | None = None,
                     organ_labels=None) -> sitk.Transform:
    """The deformable stage on top of ``affine``; returns the full query -> support transform.

    ``organ_labels`` (demons only; see :func:`_demons_stage`): (support label image, query first-pass
    label image, classes).
    """
    if settings.deformable in ("none", None, False):
        return affine
    if settings.deformable not in ("bspline", "demons"):
        raise ValueError(f"unknown deformable stage '{settings.deformable}' (bspline, demons or none)")
    with sitk_threads(settings):
        if settings.deformable == "bspline":
            return _bspline_stage(fixed, moving, affine, settings, moving_mask)
        return _demons_stage(fixed, moving, affine, settings, moving_mask, organ_labels)


def warp_label_probabilities(label: Volume, classes, query: Volume, transform: sitk.Transform) -> np.ndarray:
    """Each class of a support label as a 0/1 image, warped linearly onto the query's full grid.

    Returns (C, X, Y, Z) float32 in [0, 1] in the query's canonical order.
    """
    ref = to_sitk(np.zeros(query.shape, dtype=np.float32), query.affine)
    out = np.zeros((len(classes),) + query.shape, dtype=np.float32)
    for i, c in enumerate(classes):
        onehot = to_sitk((label.array == c).astype(np.float32), label.affine)
        warped = sitk.Resample(onehot, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out[i] = np.clip(from_sitk(warped), 0.0, 1.0)
    return out


def warp_array(array: np.ndarray, affine: np.ndarray, query: Volume, transform: sitk.Transform) -> np.ndarray:
    """A support-grid array (canonical order) warped linearly onto the query's full canonical grid."""
    ref = to_sitk(np.zeros(query.shape, dtype=np.float32), query.affine)
    img = to_sitk(np.asarray(array, dtype=np.float32), affine)
    return from_sitk(sitk.Resample(img, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
