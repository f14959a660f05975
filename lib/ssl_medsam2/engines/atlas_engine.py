"""The weight-free few-shot engine: multi-atlas registration and label fusion.

Why: pretrained SAM2 weights are not always at hand (air-gapped sites, licences, CPU-only
machines). Registering each labelled support onto the query and warping its labels needs no
weights at all, gives every user a working pseudo-labeller on day one, and is a partner for SAM2 in
the ensemble engine whose errors are of a different kind.

Per query: one in-plane start (plain, or rotated by 90° steps / mirrored, when every support
agrees it fits clearly better) and an affine for every support; the most similar supports after the
affine (body NCC, ``atlas.max_supports``; 0 = all) then get a deformable stage over all their organs
and, per class, an affine refined around that organ with its own deformable stage
(:mod:`ssl_medsam2.registration`). Each class is warped with each of these transforms as a 0/1 image
with linear interpolation (a soft per-class probability) and all are fused by their mean or by weights
from the local image similarity between the warped support and the query (supports that match
locally count more), each registration's vote for an organ also weighted by how well it fits over that
whole organ (:func:`organ_fit`, ``atlas.organ_weight_*``) and by how well it agrees with where the
whole-abdomen registrations put that organ (:func:`consensus_factor`); a per-organ refinement that
left its organ's whole-abdomen placement does not vote (``atlas.refine_min_overlap``). The fused
probabilities are then the spatial prior of an EM over the query's own intensities
(:mod:`ssl_medsam2.appearance`), which moves the boundary onto the query's edges, and thin
protrusions of each organ leave its label (:mod:`ssl_medsam2.shape`, ``atlas.trim_fraction``).
Output: the probability on the query's full canonical grid, like every engine.

With ``atlas.organ_matched_pass`` (default) this runs twice: a cheap first pass (whole-abdomen votes
only, then the EM) labels the query, and the full pass's demons then match each support organ's
intensities onto the same organ of that label (:func:`ssl_medsam2.registration.match_organ_intensities`)
instead of trusting the global histogram match alone, with a looser field
(``organ_matched_field_sigma``, ``organ_matched_iteration_scale`` × the demons iterations). Why: a
loose field follows whatever the histogram match hands it; where a subject's organs are unusually
dark (CHAOS chaos_15) that was the wrong tissue, and only a stiff field kept the organs in place, at a
cost in accuracy on every other subject.

What the case summary (``EngineResult.meta``) says about the choices:

- ``atlas_passes``: 2 with the organ-matched pass, else 1;
- ``atlas_init``: the in-plane start used (``rot0`` = the header's orientation; ``rot90``/``rot180``/
  ``rot270``, ``flip+rot…`` = the query was found stored rotated / mirrored in-plane);
- ``atlas_start``: how it was chosen (:class:`ssl_medsam2.registration.StartChoice`): ``lead`` over the
  next start, ``over_header`` (what the best rotated / mirrored start scores over the header's),
  ``per_support`` (each support's own best start), ``doubt`` and ``edge_check``, the second opinion
  (:func:`ssl_medsam2.registration.check_start`: every start through the affine stage, the edges
  compared; ``atlas.start_check``): a start it contradicts is in doubt too;
- ``doubts``: why the engine doubts its own output (a start in doubt); the quality gate fails the case;
- ``atlas_supports``: per used support ``{"support", "init", "similarity", "seconds"}`` plus
  ``affine_similarity``, ``init_scores`` (NCC of every start at its best slab shift), ``init_choice``
  (its own best start), ``init_shift_mm`` (the slab shift it started from), ``edge_scores`` (the edge
  alignment from every start) and ``organ_weight`` (per class, the
  share of the fused vote this support's registrations carried: ``atlas.organ_weight_*``), and
  ``refinement_dropped`` (the classes whose per-organ refinement was dropped) where there are any.
  ``similarity`` is the NCC of the query and the registered support over the query's body (Otsu
  foreground) on the working grid, in [-1, 1], comparable between supports and queries; ``seconds`` is
  that support's wall time;
- ``atlas_supports_not_used``: supports ranked out by ``max_supports`` with their ``affine_similarity``;
- ``support_agreement``: ``{class_id: mean pairwise Dice of the supports' warped labels (at 0.5)}``,
  ``None`` for a class fewer than two supports have (a quality signal: supports that disagree
  about where an organ is make an unreliable pseudo label).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np
from scipy import ndimage

from .. import appearance, metrics, shape
from .. import registration as reg
from ..config import section_dict
from ..io import Volume
from ..preprocess import IntensityConfig, scale_to_uint8_range
from ..protocol import probabilities_to_label
from .base import Case, EngineResult, ProgressFn, check_supports, classes_in

log = logging.getLogger(__name__)

FUSIONS = ("mean", "local_ncc")


def organ_fit(ncc: np.ndarray, prob: np.ndarray, floor: float) -> float:
    """Mean local NCC over one registration's warped organ (probability >= 0.5), never below ``floor``.

    Why: whether a registration put *this* organ in the right place shows in the similarity over the
    whole organ, where the voxel-wise weight sees only a neighbourhood. On CHAOS (2 supports, 6
    queries) a left kidney or spleen warped onto a neighbouring organ had an organ fit of 0.27-0.69 (Dice
    0-0.5) while the other support's fit 0.75-0.9 (Dice 0.75-0.9), and the plain mean of the two kept
    half of the wrong one. The floor: where every registration fits badly (a subject whose organ is as
    dark as muscle on T2, chaos_15's liver and spleen: below 0.3) the fits say nothing about which is
    better, so they count alike.
    """
    inside = prob >= 0.5
    return max(float(ncc[inside].mean()) if inside.any() else floor, floor)


def consensus_factor(prob: np.ndarray, consensus: np.ndarray, sharpness: float) -> float:
    """exp(sharpness × (Dice of a registration's warped organ with the consensus mask − 1)).

    The consensus is the first pass's plain mean of every support's whole-abdomen registration
    (before the EM): each of those is held in place by all organs at once, so their mean says
    roughly where an organ is even where the query's organ looks unlike every support's. Why: where
    it does (CHAOS chaos_15, a spleen as dark as muscle on T2), registrations refined around the
    organ lock onto a bright neighbour (bowel), and those wrong placements even had the better local
    NCC (0.45-0.55 against 0.1-0.3); a vote far from the consensus now counts little. 1 for an organ
    the consensus does not have (nothing to compare with).
    """
    if not consensus.any():
        return 1.0
    return float(np.exp(sharpness * (metrics.dice(prob >= 0.5, consensus) - 1.0)))


def local_ncc(a: np.ndarray, b: np.ndarray, sigma_vox) -> np.ndarray:
    """Gaussian-windowed normalised cross-correlation of two images, in [-1, 1], voxel by voxel."""
    a = a.astype(np.float32)
    b = b.astype(np.float32)

    def g(x):
        return ndimage.gaussian_filter(x, sigma_vox, mode="nearest")

    ma, mb = g(a), g(b)
    va = np.maximum(g(a * a) - ma * ma, 0)
    vb = np.maximum(g(b * b) - mb * mb, 0)
    cov = g(a * b) - ma * mb
    return np.clip(cov / np.sqrt(va * vb + 1e-6), -1.0, 1.0)


class AtlasEngine:
    """Multi-atlas registration engine (SimpleITK). Config: the ``atlas:`` section."""

    name = "atlas"

    def __init__(self, settings: reg.RegistrationSettings, intensity: IntensityConfig, *, fusion: str,
                 fusion_sigma_mm: float, fusion_sharpness: float, max_supports: int, fuse_global: bool,
                 organ_matched_pass: bool, organ_matched_field_sigma: float, organ_matched_iteration_scale: float,
                 organ_weight_sharpness: float, organ_weight_floor: float, refine_min_overlap: float,
                 consensus_sharpness: float, trim_fraction: float, appearance_settings: appearance.AppearanceSettings):
        if fusion not in FUSIONS:
            raise ValueError(f"unknown atlas fusion '{fusion}' (choose from {', '.join(FUSIONS)})")
        self.settings = settings
        self.fusion = fusion
        self.fusion_sigma_mm = float(fusion_sigma_mm)
        self.fusion_sharpness = float(fusion_sharpness)
        self.max_supports = int(max_supports or 0)
        self.fuse_global = bool(fuse_global)
        self.organ_matched_pass = bool(organ_matched_pass)
        self.organ_matched_field_sigma = float(organ_matched_field_sigma)
        self.organ_matched_iteration_scale = float(organ_matched_iteration_scale)
        self.organ_weight_sharpness = float(organ_weight_sharpness)
        self.organ_weight_floor = float(organ_weight_floor)
        self.refine_min_overlap = float(refine_min_overlap)
        self.consensus_sharpness = float(consensus_sharpness)
        self.trim_fraction = float(trim_fraction)
        self.appearance = appearance_settings
        self.intensity = intensity

    @classmethod
    def from_config(cls, cfg: dict) -> "AtlasEngine":
        """From the ``atlas:`` section: the named preset, with every non-null key overriding it."""
        a = dict(section_dict(cfg, "atlas"))
        preset = a.pop("preset", None)
        presets = a.pop("presets", None) or {}
        settings: dict = {}
        if preset:
            if preset not in presets:
                raise ValueError(f"unknown atlas preset '{preset}' (known: {', '.join(presets) or 'none'})")
            settings.update(presets[preset])
        settings.update({k: v for k, v in a.items() if v is not None})
        looks = {f"appearance_{f}": f for f in appearance.AppearanceSettings.__dataclass_fields__}
        own = ("fusion", "fusion_sigma_mm", "fusion_sharpness", "max_supports", "fuse_global", "organ_matched_pass",
               "organ_matched_field_sigma", "organ_matched_iteration_scale", "organ_weight_sharpness",
               "organ_weight_floor", "refine_min_overlap", "consensus_sharpness", "trim_fraction", *looks)
        unknown = sorted(set(settings) - set(reg.RegistrationSettings.__dataclass_fields__) - set(own))
        if unknown:
            raise ValueError(f"unknown atlas setting(s): {', '.join(unknown)}")
        missing = [f"atlas.{k}" for k in own if k not in settings]
        if missing:
            raise ValueError(f"{', '.join(missing)} set neither by the atlas preset nor directly")
        engine_kw = {k: settings.pop(k) for k in own if k not in looks}
        looks_kw = appearance.AppearanceSettings(**{f: settings.pop(k) for k, f in looks.items()})
        return cls(reg.RegistrationSettings.from_dict(settings), IntensityConfig.from_config(cfg),
                   appearance_settings=looks_kw, **engine_kw)

    def _n_used(self, supports: Sequence[Case]) -> int:
        return len(supports) if self.max_supports <= 0 else min(self.max_supports, len(supports))

    def work_units(self, supports: Sequence[Case], query: Case, classes: Sequence[int]) -> int:
        return self._n_used(supports)

    def _normalised(self, vol: Volume) -> np.ndarray:
        return scale_to_uint8_range(vol.array, self.intensity) / 255.0

    def predict(self, supports: Sequence[Case], query: Case, classes: Sequence[int],
                progress: ProgressFn | None = None) -> EngineResult:
        with reg.sitk_threads(self.settings):  # every SimpleITK step, so a seed gives identical labels
            return self._predict(supports, query, classes, progress)

    def _predict(self, supports: Sequence[Case], query: Case, classes: Sequence[int],
                 progress: ProgressFn | None = None) -> EngineResult:
        classes = tuple(int(c) for c in classes)
        check_supports(supports, classes)
        s = self.settings
        t_start = time.perf_counter()
        fixed = reg.prepare(query.image, s, self.intensity)
        body = reg.body_mask(fixed)
        moving = [reg.prepare(c.image, s, self.intensity) for c in supports]
        masks = [reg.focus_mask(c.label, classes, m, s.focus_margin_mm) if s.focus_margin_mm else None
                 for c, m in zip(supports, moving)]
        labelled = [classes_in([c]) for c in supports]  # each support's organs (once, for both passes)
        # affine for every support (cheap); the deformable stage only for the most similar ones
        t0 = time.perf_counter()
        # the start is scored over every labelled organ of a support, not only the requested ones:
        # one organ alone (the liver) can match its mirror image (measured on CHAOS at 5 mm)
        focus = [reg.focus_mask(c.label, own, m, s.focus_margin_mm) if s.focus_margin_mm else None
                 for c, m, own in zip(supports, moving, labelled)]
        scored = [reg.best_shifts(reg.start_scores(fixed, m, s, f)) for m, f in zip(moving, focus)]
        choice = reg.choose_start([sc for sc, _ in scored], s.init_margin, s.init_doubt_margin)
        slab_search = bool(choice.doubt or choice.start != reg.HEADER_START)
        if slab_search:  # a start in doubt, or not the header's: look again with the slabs shifted along z
            scored = [reg.best_shifts(reg.start_scores(fixed, m, s, f, slabs=True)) for m, f in zip(moving, focus)]
            choice = reg.choose_start([sc for sc, _ in scored], s.init_margin, s.init_doubt_margin)
        init_scores = [sc for sc, _ in scored]
        start = choice.start
        init_shift = [sh.get(start, 0.0) for _, sh in scored]  # where along the slice normal each support starts
        init_s = (time.perf_counter() - t0) / len(supports)
        affines, affine_sim, affine_s = [], [], []
        for m, mk, shift in zip(moving, masks, init_shift):
            t0 = time.perf_counter()
            affines.append(reg.affine_stage(fixed, m, s, mk, start, shift))
            affine_sim.append(reg.similarity(fixed, m, affines[-1][0], body))
            affine_s.append(init_s + time.perf_counter() - t0)
        ranked = sorted(range(len(supports)), key=lambda i: (-affine_sim[i], supports[i].name))
        order = ranked[: self._n_used(supports)]
        t0 = time.perf_counter()
        edges = {}  # the second opinion on the start (used supports): every start through the affine stage
        if s.start_check == "edges" and s.init_starts == "dihedral":
            fixed_edges = reg.query_edges(fixed, s)  # the same for every support
            edges = {i: reg.edge_scores(fixed, moving[i], s, focus[i], scored[i][1], query=fixed_edges)
                     for i in order}
        elif s.start_check not in ("edges", "none", None, False):
            raise ValueError(f"unknown atlas.start_check '{s.start_check}' (edges or none)")
        check = reg.check_start(start, [edges.get(i) for i in order], s.start_check_margin,
                                [supports[i].name for i in order])
        check["seconds"] = round(time.perf_counter() - t0, 2)
        if check["doubt"]:  # a start the edges contradict is a start in doubt
            choice = dataclasses.replace(choice, doubt="; ".join(filter(None, (choice.doubt, check["doubt"]))))
        q_img = self._normalised(query.image) if self.fusion == "local_ncc" else None
        sigma_vox = [self.fusion_sigma_mm / sp for sp in query.image.spacing]
        q_uint8 = scale_to_uint8_range(query.image.array, self.intensity)
        refined: dict = {}  # (support, class index) -> the affine refined around that organ (same in both passes)
        sup_imgs = {i: self._normalised(supports[i].image) for i in order} if self.fusion == "local_ncc" else {}

        def fuse(settings: reg.RegistrationSettings, per_class: bool, organ_labels: dict | None, report: bool,
                 weighted: bool = True, consensus: np.ndarray | None = None):
            """Every used support's votes with these demons settings, fused; (probs, prior, per_support, votes).

            ``prior``: the fused votes before the EM. ``weighted=False``: a plain mean even with local-NCC
            fusion (the cheap first pass). ``consensus``: per class, the first pass's whole-abdomen
            mask each registration's organ is compared with (:func:`consensus_factor`).
            """
            num = np.zeros((len(classes),) + query.image.shape, dtype=np.float32)
            den = np.zeros_like(num)
            organ_weight = np.zeros((len(order), len(classes)))  # each support's summed organ-fit factors
            per_support = []
            votes: list[list[np.ndarray]] = [[] for _ in classes]  # each support's warped 0/1 mask per class
            for n_used, i in enumerate(order):
                t0 = time.perf_counter()
                sup = supports[i]
                todo = [k for k, c in enumerate(classes) if c in labelled[i]]  # a support without a class says nothing
                labels_i = organ_labels[i] if organ_labels else None
                tx_all = None
                if not (per_class and s.refine_margin_mm) or self.fuse_global:  # one registration for all organs
                    tx_all = reg.deformable_stage(fixed, moving[i], affines[i][0], settings, masks[i], labels_i)
                groups = [(todo, tx_all)] if tx_all is not None else []
                if per_class and s.refine_margin_mm:  # and one per class, refined around that organ
                    for k in todo:
                        cmask = reg.focus_mask(sup.label, [classes[k]], moving[i], s.refine_margin_mm)
                        if (i, k) not in refined:
                            refined[(i, k)] = reg.refine_affine(fixed, moving[i], affines[i][0], s, cmask)
                        groups.append(([k], reg.deformable_stage(fixed, moving[i], refined[(i, k)], settings, cmask,
                                                                 labels_i)))
                sim = reg.similarity(fixed, moving[i], tx_all if tx_all is not None and not s.refine_margin_mm
                                     else affines[i][0], body)
                own = {k: [] for k in todo}  # this support's candidate probabilities per class
                dropped = []
                for ks, tx in groups:
                    probs = reg.warp_label_probabilities(sup.label, [classes[k] for k in ks], query.image, tx)
                    if tx is not tx_all and tx_all is not None and not stays_in_place(own[ks[0]][0], probs[0]):
                        dropped.append(classes[ks[0]])  # the organ's whole-abdomen vote stands alone
                        continue
                    ncc = None
                    if self.fusion == "local_ncc" and weighted:
                        warped = reg.warp_array(sup_imgs[i], sup.image.affine, query.image, tx)
                        ncc = local_ncc(q_img, warped, sigma_vox)
                        weight = np.exp(self.fusion_sharpness * (ncc - 1.0)).astype(np.float32)
                    else:
                        weight = np.ones(query.image.shape, dtype=np.float32)
                    for j, k in enumerate(ks):
                        factor = 1.0
                        if ncc is not None and self.organ_weight_sharpness:
                            fit = organ_fit(ncc, probs[j], self.organ_weight_floor)
                            factor = float(np.exp(self.organ_weight_sharpness * (fit - 1.0)))
                        if consensus is not None:
                            factor *= consensus_factor(probs[j], consensus[k], self.consensus_sharpness)
                        organ_weight[n_used, k] += factor
                        num[k] += np.float32(factor) * weight * probs[j]
                        den[k] += np.float32(factor) * weight
                        own[k].append(probs[j])
                for k, cands in own.items():  # one vote per support, whatever its number of candidates
                    votes[k].append(np.packbits(np.mean(cands, axis=0) >= 0.5))
                per_support.append({"support": sup.name, "init": start, "similarity": round(sim, 4),
                                    "affine_similarity": round(affine_sim[i], 4), "init_scores": init_scores[i],
                                    "init_choice": choice.per_support[i] if choice.per_support else start,
                                    "init_shift_mm": init_shift[i], "edge_scores": edges.get(i),
                                    "seconds": round(affine_s[i] + time.perf_counter() - t0, 2)})
                if dropped:
                    per_support[-1]["refinement_dropped"] = dropped
                if report and progress is not None:
                    progress(1)
            share = organ_weight / np.maximum(organ_weight.sum(0, keepdims=True), 1e-300)
            for entry, row in zip(per_support, share):  # how much each support counted, per class it has
                entry["organ_weight"] = {c: round(float(row[k]), 3) for k, c in enumerate(classes) if row[k] > 0}
            prior = np.where(den > 0, num / np.maximum(den, 1e-30), 0.0).astype(np.float32)
            probs = prior
            if self.appearance.iterations:
                probs = appearance.refine(prior, q_uint8, query.image.spacing, self.appearance)
            return probs, prior, per_support, votes

        def stays_in_place(whole_abdomen: np.ndarray, refined: np.ndarray) -> bool:
            """Whether an organ's refinement overlaps its whole-abdomen placement as much as required
            (``atlas.refine_min_overlap``; an empty side leaves nothing to compare: kept)."""
            if not self.refine_min_overlap:
                return True
            a, b = whole_abdomen >= 0.5, refined >= 0.5
            return not (a.any() and b.any()) or metrics.dice(a, b) >= self.refine_min_overlap

        organ_labels, passes, consensus = None, 1, None
        final_settings = s
        if self.organ_matched_pass and s.deformable == "demons":
            # pass 1: whole-abdomen votes only (cheap); its label tells each organ's intensities in the query
            first, first_prior, _, _ = fuse(s, per_class=False, organ_labels=None, report=False, weighted=False)
            if self.consensus_sharpness:
                consensus = first_prior >= 0.5
            first_label = probabilities_to_label(first, classes, 0.5, keep_largest_component=False).astype(np.int16)
            query_label = reg.to_sitk(first_label, query.image.affine)
            organ_labels = {i: (reg.to_sitk(supports[i].label.array.astype(np.int16), supports[i].label.affine),
                                query_label, classes) for i in order}
            final_settings = dataclasses.replace(s, demons_field_sigma=self.organ_matched_field_sigma,
                                                 demons_iterations=tuple(
                                                     max(1, round(n * self.organ_matched_iteration_scale))
                                                     for n in s.demons_iterations))
            passes = 2
        probs, _, per_support, votes = fuse(final_settings, per_class=True, organ_labels=organ_labels, report=True,
                                            consensus=consensus)
        probs = shape.trim_protrusions(probs, query.image.spacing, self.trim_fraction)
        meta = {
            "engine_settings": {"registration": {k: (list(v) if isinstance(v, tuple) else v)
                                                 for k, v in vars(s).items() if k != "extra"},
                                "fusion": self.fusion, "fusion_sigma_mm": self.fusion_sigma_mm,
                                "fusion_sharpness": self.fusion_sharpness, "max_supports": self.max_supports,
                                "fuse_global": self.fuse_global, "appearance": vars(self.appearance),
                                "organ_matched_pass": self.organ_matched_pass,
                                "organ_matched_field_sigma": self.organ_matched_field_sigma,
                                "organ_matched_iteration_scale": self.organ_matched_iteration_scale,
                                "organ_weight_sharpness": self.organ_weight_sharpness,
                                "organ_weight_floor": self.organ_weight_floor,
                                "refine_min_overlap": self.refine_min_overlap,
                                "consensus_sharpness": self.consensus_sharpness, "trim_fraction": self.trim_fraction},
            "atlas_passes": passes,
            "atlas_supports": per_support,
            "atlas_init": start,
            "atlas_start": {**choice.summary(), "slab_search": slab_search, "edge_check": check},
            "doubts": [f"start in doubt: {choice.doubt}"] if choice.doubt else [],
            "atlas_supports_not_used": [{"support": supports[i].name, "init": start,
                                         "affine_similarity": round(affine_sim[i], 4)}
                                        for i in ranked[len(order):]],
            "support_agreement": {c: pairwise_dice(v) for c, v in zip(classes, votes)},
            "timings": {"atlas_s": round(time.perf_counter() - t_start, 3)},
            "random_weights": False,
        }
        return EngineResult(np.clip(probs, 0.0, 1.0), classes, len(order), meta)


def pairwise_dice(packed_masks: Sequence[np.ndarray]) -> float | None:
    """Mean Dice over every pair of (bit-packed, same-grid) masks; None with fewer than two masks."""
    if len(packed_masks) < 2:
        return None
    masks = [np.unpackbits(m).astype(bool) for m in packed_masks]
    scores = [metrics.dice(masks[a], masks[b]) for a in range(len(masks)) for b in range(a + 1, len(masks))]
    return round(float(np.mean(scores)), 4)
