"""Per-case, per-class quality of a few-shot pseudo label, and the gate that marks a case ``failed``.

Why: a wrong pseudo label that looks like a right one is the worst outcome. It trains nnU-Net and no
annotator ever sees it. Every engine's output already tells a lot about its own reliability, with no
ground truth:

- ``agreement``: how much the supports agree on where the organ is. Taken from the engine when it
  measured it (``meta["support_agreement"]``: mean pairwise Dice of the supports' warped labels), else
  estimated from the fused probability: the Dice between the voxels most supports call organ
  (p >= 0.75) and those some support calls organ (p >= 0.25). Two supports that put the organ in
  different places agree on nothing.
- ``entropy``: mean binary entropy (bits) in and around the mask (the uncertainty strategies' score).
- ``appearance``: the overlap (histogram intersection, 0..1) of the normalised intensities inside the
  mask with those inside the same class in the supports. A label that landed beside the organ covers
  other tissue, and every support can agree on that wrong place.
- ``volume_ratio``: the class volume (mm^3) over the median volume of that class in the supports.
  An organ that vanished or shrank to a sliver is not a usable pseudo label.
- ``similarity``: the engine's post-registration image similarity per support (higher = better), when
  it reports one (``meta["atlas_supports"][i]["similarity"]``); gated only when a bar is set.
- ``doubts``: what the engine says it doubts itself (``meta["doubts"]``: the atlas engine's in-plane
  start in doubt). Each is a reason: a start that may be mirrored makes every organ wrong at once, and
  no class score can tell, since the supports then agree on the mirrored place.

The class score is ``agreement * (1 - entropy) * appearance`` (each in [0, 1]; 0 for an empty class), the case score
is its lowest class score. A case is ``failed`` when its score, a volume ratio or the similarity is below
the bars of the ``quality:`` section (configs/ssl_medsam2.yaml), or when the engine doubts its output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from .config import Section
from .preprocess import class_name


@dataclass(frozen=True)
class QualitySettings(Section):
    """The ``quality:`` section: the bars of the per-case gate (defaults in the YAML only)."""

    SECTION = "quality"
    gate: bool               # false: scores are still reported, no case is marked failed
    min_score: float         # lowest class score (agreement x (1 - entropy)) a usable case has
    min_volume_ratio: float  # class volume / median support volume of that class
    max_volume_ratio: float
    min_similarity: float | None  # mean post-registration similarity of the supports (None: not gated)
    band: int                # voxels around the mask where entropy is averaged
    appearance_bins: int     # histogram bins of the normalised intensities (0..255) inside a class

    def __post_init__(self):
        self._set(gate=bool(self.gate), min_score=float(self.min_score), appearance_bins=int(self.appearance_bins),
                  min_volume_ratio=float(self.min_volume_ratio), max_volume_ratio=float(self.max_volume_ratio),
                  min_similarity=None if self.min_similarity is None else float(self.min_similarity),
                  band=int(self.band))


def class_volumes_mm3(label: np.ndarray, spacing: Sequence[float], classes: Sequence[int]) -> dict[int, float]:
    """Volume of each class of a label map, in mm^3."""
    voxel = float(np.prod(spacing))
    counts = np.bincount(np.asarray(label).ravel().astype(np.int64), minlength=max(classes) + 1)
    return {int(c): float(counts[c]) * voxel for c in classes}


def intensity_histogram(norm: np.ndarray, mask: np.ndarray, bins: int) -> np.ndarray | None:
    """Normalised histogram (sums to 1) of 0..255 intensities inside ``mask``; None for an empty mask."""
    vals = np.asarray(norm)[np.asarray(mask, dtype=bool)]
    if vals.size == 0:
        return None
    h, _ = np.histogram(vals, bins=bins, range=(0.0, 255.0))
    return h / h.sum()


def support_histograms(supports_norm_and_labels, classes: Sequence[int], bins: int) -> dict[int, np.ndarray]:
    """Class id -> mean intensity histogram of that class over the supports that have it.

    ``supports_norm_and_labels``: (normalised image 0..255, label map) pairs on the same grid."""
    acc: dict[int, list[np.ndarray]] = {}
    for norm, label in supports_norm_and_labels:
        for c in classes:
            h = intensity_histogram(norm, np.asarray(label) == c, bins)
            if h is not None:
                acc.setdefault(int(c), []).append(h)
    return {c: np.mean(hs, axis=0) for c, hs in acc.items()}


def estimated_agreement(prob: np.ndarray) -> float:
    """Dice between where most supports put the organ (p >= 0.75) and where any does (p >= 0.25).

    For two supports fused by their mean this is the Dice of their two warped labels; 0 when nothing
    reaches 0.25."""
    core = int((prob >= 0.75).sum())
    union = int((prob >= 0.25).sum())
    return 0.0 if union == 0 else 2.0 * core / (core + union)


def _entropy_near(entropy: np.ndarray, mask: np.ndarray, band: int) -> float | None:
    if not mask.any():
        return None
    if band > 0:
        mask = ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 1), iterations=band)
    return float(entropy[mask].mean())


def assess(probs: np.ndarray, entropy: np.ndarray, label: np.ndarray, classes: Sequence[int],
           spacing: Sequence[float], support_volumes: Mapping[int, Sequence[float]], meta: Mapping,
           settings: QualitySettings, class_names: Mapping[int, str] | None = None,
           query_norm: np.ndarray | None = None, support_hist: Mapping[int, np.ndarray] | None = None) -> dict:
    """The quality record of one case (what its summary's ``quality`` holds, with ``failed`` and why).

    ``probs`` / ``entropy``: (C, X, Y, Z), channel i for ``classes[i]``; ``label``: the final label map;
    ``support_volumes``: class id -> that class's volumes (mm^3) in the supports that have it;
    ``meta``: the engine's ``EngineResult.meta`` (``support_agreement``, ``atlas_supports``, when there).
    """
    names = class_names or {}
    given = {int(k): float(v) for k, v in (meta.get("support_agreement") or {}).items() if v is not None}
    volumes = class_volumes_mm3(label, spacing, classes)
    per_class: dict[str, dict] = {}
    reasons: list[str] = []
    for i, c in enumerate(classes):
        name = class_name(names, c)
        ref = [v for v in support_volumes.get(int(c), []) if v > 0]
        ratio = volumes[int(c)] / float(np.median(ref)) if ref else None
        agreement = given.get(int(c))
        source = "engine"
        if agreement is None:
            agreement, source = estimated_agreement(probs[i]), "estimated_from_probability"
        ent = _entropy_near(entropy[i], np.asarray(label) == c, settings.band)
        look = None
        if query_norm is not None and support_hist and int(c) in support_hist:
            h = intensity_histogram(query_norm, np.asarray(label) == c, settings.appearance_bins)
            look = None if h is None else float(np.minimum(h, support_hist[int(c)]).sum())
        score = 0.0 if ent is None else float(agreement) * (1.0 - ent) * (1.0 if look is None else look)
        per_class[name] = {"class_id": int(c), "score": round(score, 4), "agreement": round(float(agreement), 4),
                           "agreement_source": source, "entropy": None if ent is None else round(ent, 4),
                           "appearance": None if look is None else round(look, 4),
                           "volume_ratio": None if ratio is None else round(ratio, 4)}
        if ent is None and ref:
            reasons.append(f"{name}: empty (the supports have it)")
        elif score < settings.min_score:
            reasons.append(f"{name}: score {score:.3f} < {settings.min_score}")
        in_range = ratio is None or settings.min_volume_ratio <= ratio <= settings.max_volume_ratio
        if ent is not None and not in_range:
            reasons.append(f"{name}: volume {ratio:.2f} x the supports' (allowed "
                           f"{settings.min_volume_ratio}-{settings.max_volume_ratio})")
    sims = [s.get("similarity") for s in meta.get("atlas_supports") or [] if s.get("similarity") is not None]
    similarity = float(np.mean(sims)) if sims else None
    if settings.min_similarity is not None and similarity is not None and similarity < settings.min_similarity:
        reasons.append(f"post-registration similarity {similarity:.3f} < {settings.min_similarity}")
    reasons.extend(str(d) for d in meta.get("doubts") or [])  # what the engine itself doubts (a start in doubt)
    scores = [v["score"] for v in per_class.values()]
    return {"score": min(scores) if scores else None, "similarity": similarity, "per_class": per_class,
            "failed": bool(settings.gate and reasons), "reasons": reasons,
            "bars": {"min_score": settings.min_score, "min_volume_ratio": settings.min_volume_ratio,
                     "max_volume_ratio": settings.max_volume_ratio, "min_similarity": settings.min_similarity}}


def is_failed(summary: Mapping) -> bool:
    """A case summary's verdict (summaries written before the gate existed are not failed)."""
    return bool(summary.get("failed", False))


def failed_cases(summaries_dir, names: Sequence[str]) -> list[str]:
    """Of ``names``, the cases whose few-shot summary (``summaries_dir/<case>.json``) says ``failed``."""
    import json
    from pathlib import Path

    out = []
    for n in names:
        p = Path(summaries_dir) / f"{n}.json"
        if p.exists() and is_failed(json.loads(p.read_text())):
            out.append(n)
    return out


def trusted_classes(quality: Mapping | None) -> frozenset[int]:
    """The class ids of a quality record (:func:`assess`'s) that no reason names, when no reason speaks
    against the case as a whole (an engine doubt, the similarity): the organs whose pseudo label passed
    every bar, which an interactive correction may hold to more firmly. The reasons are :func:`assess`'s
    verdict (listed whether or not ``quality.gate`` marks the case), so this reads them rather than
    judging again. No record, a case-wide reason, an absent class or an unreadable record: none (the
    cautious answer: a wrong base must not be held to)."""
    if not isinstance(quality, Mapping) or not isinstance(quality.get("per_class"), Mapping):
        return frozenset()
    reasons = [str(r) for r in quality.get("reasons") or ()]
    prefixes = {name: f"{name}: " for name in quality["per_class"]}
    if any(not r.startswith(tuple(prefixes.values())) for r in reasons):
        return frozenset()
    try:
        return frozenset(int(v["class_id"]) for name, v in quality["per_class"].items()
                         if v.get("entropy") is not None and not any(r.startswith(prefixes[name]) for r in reasons))
    except (AttributeError, KeyError, TypeError, ValueError):
        return frozenset()
