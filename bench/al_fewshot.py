"""The no-training active-learning curve (``python bench/al_curve.py --no-training``).

Question: do the strategies pick the volumes that help few-shot pseudo-labelling most? No nnU-Net is
trained, so the answer fits a 2-core CPU. On the 8 CHAOS T2-SPIR volumes: start from 2 labelled
volumes; at each step the strategy picks the next volume, its ground truth is revealed and it becomes
a support; the atlas pseudo labels of every still-unlabelled volume (all labelled volumes as supports)
are scored against their ground truth.

Strategies (each sees only what a deployment sees, never the ground truth of unlabelled volumes):
- ``uncertainty``: mean pseudo-label entropy in and around the organs (strategies.uncertainty_score),
  quality-gate failures first (strategies.rank_uncertainty);
- ``disagreement``: 1 - mean pairwise Dice of the supports' individual warped labels (the no-training
  stand-in for the app's few-shot vs nnU-Net disagreement);
- ``diversity``: k-center on cheap image embeddings (strategies.k_center);
- ``quality``: lowest quality score first (ssl_medsam2.quality.assess);
- ``random``: a seeded shuffle.
Every seed draws a different starting pair (the same for every strategy of that seed).

Cost: each (support, query) pair is registered ONCE (the atlas engine with that one support and its
appearance EM off) and its fused class probabilities cached; a labelled set's pseudo label is the MEAN
of its supports' cached probabilities followed by the engine's appearance EM over the query's
intensities (``ssl_medsam2.appearance``, the engine's settings), as the engine does after its fusion.
Only the engine's local-NCC weighting between supports is not replayed (it needs the registrations'
transforms): the curve measures mean fusion + EM. 8 volumes -> 56 registrations, then array work.
The cache folder is named by a digest of the atlas settings, so a changed setting registers again.

Two curves per strategy: the mean Dice of the still-unlabelled volumes (what the pseudo labels of the
rest are worth; picking a hard case also removes it from this mean), and the mean Dice of the whole
set where labelled volumes count their ground truth (Dice 1): the training set nnU-Net would get.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np

from shared_data import CHAOS, chaos_cases, downsample_case

STRATEGIES = ("uncertainty", "disagreement", "diversity", "quality", "random")
log = logging.getLogger("bench.al_fewshot")


def pair_cache(root: Path, cases: list[str], factor: int, cfg: dict) -> dict:
    """Every (support, query) pair registered once: case -> {image, label}, and (s, q) -> uint8 probabilities."""
    from ssl_medsam2.engines import build_engine
    from ssl_medsam2.engines.base import Case
    from ssl_medsam2.io import load_label_for, load_volume

    vols = {}
    for c in cases:
        img, lab = root / "images" / f"{c}.nii.gz", root / "labels" / f"{c}.nii.gz"
        if not img.exists():
            downsample_case(CHAOS / "imagesTr" / f"{c}_0000.nii.gz", CHAOS / "labelsTr" / f"{c}.nii.gz", img, lab,
                            factor=factor)
        v = load_volume(img, name=c)
        vols[c] = Case(v, load_label_for(v, lab))
    classes = (1, 2, 3, 4)
    no_em = copy.deepcopy(cfg)
    no_em["atlas"]["appearance_iterations"] = 0  # the EM runs after the fusion of a labelled set (Oracle)
    engine = build_engine("atlas", no_em)
    digest = hashlib.sha256(json.dumps(no_em["atlas"], sort_keys=True, default=str).encode()).hexdigest()[:10]
    probs, cpu = {}, 0.0
    for s, q in itertools.permutations(cases, 2):
        f = root / f"pairs-{digest}" / f"{s}__{q}.npy"
        if not f.exists():
            t = time.process_time()
            r = engine.predict([vols[s]], Case(vols[q].image), classes)
            cpu += time.process_time() - t
            f.parent.mkdir(parents=True, exist_ok=True)
            np.save(f, np.round(r.probs * 255).astype(np.uint8))
            log.info("registered %s -> %s (%.1f CPU-s)", s, q, time.process_time() - t)
        probs[(s, q)] = np.load(f)
    return {"vols": vols, "probs": probs, "classes": classes, "registration_cpu_s": round(cpu, 1)}


class Oracle:
    """Pseudo label, scores and true Dice of a query given a labelled set, memoised per (query, set)."""

    def __init__(self, cache: dict, cfg: dict):
        from ssl_medsam2.preprocess import IntensityConfig, scale_to_uint8_range
        from ssl_medsam2.protocol import ProtocolSettings
        from ssl_medsam2.quality import QualitySettings, class_volumes_mm3, support_histograms
        from ssl_medsam2.strategies import image_embedding

        from ssl_medsam2.engines import build_engine

        self.c, self.cfg = cache, cfg
        self.appearance = build_engine("atlas", cfg).appearance  # the engine's EM, replayed after each fusion
        self.p = ProtocolSettings.from_config(cfg)
        self.q = QualitySettings.from_config(cfg)
        self.classes = cache["classes"]
        inten = IntensityConfig.from_config(cfg)
        self.norm = {n: scale_to_uint8_range(v.image.array, inten) for n, v in cache["vols"].items()}
        self.vol = {n: class_volumes_mm3(v.label.array, v.label.spacing, self.classes)
                    for n, v in cache["vols"].items()}
        self.hist = {n: support_histograms([(self.norm[n], v.label.array)], self.classes, self.q.appearance_bins)
                     for n, v in cache["vols"].items()}
        grid = cfg["app"]["embedding_grid"]
        self.emb = {n: image_embedding(v.image.array, grid) for n, v in cache["vols"].items()}
        self.memo: dict = {}
        self.single: dict = {}

    def _label(self, probs):
        from ssl_medsam2.protocol import probabilities_to_label

        return probabilities_to_label(probs, self.classes, self.p.threshold, self.p.keep_largest_component)

    def _single_label(self, s, q):
        if (s, q) not in self.single:
            self.single[(s, q)] = self._label(self.c["probs"][(s, q)].astype(np.float32) / 255.0)
        return self.single[(s, q)]

    def __call__(self, q: str, labelled: tuple[str, ...]) -> dict:
        from ssl_medsam2.metrics import mean_dice
        from ssl_medsam2.quality import assess
        from ssl_medsam2.strategies import uncertainty_score
        from ssl_medsam2.uncertainty import binary_entropy

        key = (q, tuple(sorted(labelled)))
        if key in self.memo:
            return self.memo[key]
        from ssl_medsam2 import appearance

        probs = np.mean([self.c["probs"][(s, q)].astype(np.float32) for s in key[1]], axis=0) / 255.0
        probs = appearance.refine(probs, self.norm[q], self.c["vols"][q].image.spacing, self.appearance)
        label = self._label(probs)
        entropy = binary_entropy(probs)
        vols = {c: [self.vol[s][c] for s in key[1]] for c in self.classes}
        hist = {c: np.mean([self.hist[s][c] for s in key[1] if c in self.hist[s]], axis=0) for c in self.classes}
        quality = assess(probs, entropy, label, self.classes, self.c["vols"][q].image.spacing, vols, {}, self.q,
                         query_norm=self.norm[q], support_hist=hist)
        singles = [self._single_label(s, q) for s in key[1]]
        pair_d = [mean_dice(a, b, self.classes) or 0.0 for a, b in itertools.combinations(singles, 2)]
        out = {"dice": float(mean_dice(label, self.c["vols"][q].label.array, self.classes) or 0.0),
               "uncertainty": uncertainty_score(entropy, label, self.classes, self.p.boundary_band),
               "disagreement": float(1.0 - np.mean(pair_d)) if pair_d else None,
               "quality": quality["score"], "failed": quality["failed"]}
        self.memo[key] = out
        return out

    def pick(self, strategy: str, candidates: list[str], labelled: list[str], seed: int, step: int) -> str:
        from ssl_medsam2 import strategies as st

        if strategy == "random":
            return st.rank_random(candidates, seed=seed * 1000 + step)[0]
        if strategy == "diversity":
            return st.k_center({c: self.emb[c] for c in candidates}, {c: self.emb[c] for c in labelled})[0]
        r = {c: self(c, tuple(labelled)) for c in candidates}
        if strategy == "uncertainty":
            return st.rank_uncertainty(candidates, {c: r[c]["uncertainty"] for c in candidates},
                                       [c for c in candidates if r[c]["failed"]])[0]
        if strategy == "disagreement":
            return st.rank_disagreement(candidates, {c: r[c]["disagreement"] for c in candidates})[0]
        return st.rank_quality(candidates, {c: r[c]["quality"] for c in candidates})[0]


def curve(oracle: Oracle, cases: list[str], start: list[str], strategy: str, seed: int) -> list[dict]:
    labelled = list(start)
    pts = []
    for step in range(len(cases) - len(start)):
        rest = [c for c in cases if c not in labelled]
        d = [oracle(c, tuple(labelled))["dice"] for c in rest]
        pts.append({"n_labelled": len(labelled), "unlabelled_dice": float(np.mean(d)),
                    "whole_set_dice": float((sum(d) + len(labelled)) / len(cases)),
                    "flagged": [c for c in rest if oracle(c, tuple(labelled))["failed"]]})
        if len(rest) == 1:
            break
        choice = oracle.pick(strategy, rest, labelled, seed, step)
        pts[-1]["picked"] = choice
        labelled.append(choice)
    return pts


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(rc=matplotlib.rcParamsDefault):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, title in ((axes[0], "unlabelled_dice", "pseudo labels of the still-unlabelled volumes"),
                               (axes[1], "whole_set_dice", "whole set (labelled volumes count Dice 1)")):
            for i, (s, agg) in enumerate(result["aggregate"].items()):
                x = np.array(agg["n_labelled"]) + (i - 2) * 0.05
                m, sd = np.array(agg[key]["mean"]), np.array(agg[key]["std"])
                ax.errorbar(x, m, yerr=sd, marker="o", capsize=3, label=s, ls="--" if s == "random" else "-")
            ax.set(xlabel="labelled volumes (supports)", ylabel="mean Dice of 4 organs", title=title)
            ax.set_xticks(result["aggregate"]["random"]["n_labelled"])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        c = result["conditions"]
        fig.suptitle(f"CHAOS T2-SPIR, 8 volumes, atlas pseudo labels (mean fusion + appearance EM), no training; "
                     f"{c['seeds']} seeds (random start pair each), mean +- std", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def run(seeds: int, factor: int, work: Path, out: Path, overrides: list[str]) -> dict:
    from ssl_medsam2.config import load_config

    t0 = time.perf_counter()
    cfg = load_config(overrides=overrides)
    cases = chaos_cases()
    cache = pair_cache(work, cases, factor, cfg)
    oracle = Oracle(cache, cfg)
    runs = {s: [] for s in STRATEGIES}
    starts = []
    for seed in range(seeds):
        start = sorted(np.random.default_rng(seed).choice(cases, 2, replace=False).tolist())
        starts.append(start)
        for s in STRATEGIES:
            runs[s].append(curve(oracle, cases, start, s, seed))
    agg = {}
    for s, curves in runs.items():
        n = [p["n_labelled"] for p in curves[0]]
        agg[s] = {"n_labelled": n}
        for key in ("unlabelled_dice", "whole_set_dice"):
            v = np.array([[p[key] for p in c] for c in curves])
            agg[s][key] = {"mean": v.mean(0).round(4).tolist(), "std": v.std(0).round(4).tolist()}
    result = {"aggregate": agg, "runs": runs, "starts": starts,
              "conditions": {"cases": cases, "in_plane_factor": factor, "seeds": seeds, "engine": "atlas",
                             "fusion": "mean of per-pair warped probabilities, then the appearance EM",
                             "appearance": vars(oracle.appearance), "overrides": overrides,
                             "registration_cpu_s": cache["registration_cpu_s"],
                             "pairs": len(cache["probs"])},
              "minutes_total": round((time.perf_counter() - t0) / 60, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "al_curve_fewshot.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "al_curve_fewshot.png")
    summary = {s: {"unlabelled_dice_mean": a["unlabelled_dice"]["mean"],
                   "whole_set_dice_mean": a["whole_set_dice"]["mean"]} for s, a in agg.items()}
    print(json.dumps({"n_labelled": agg["random"]["n_labelled"], "summary": summary,
                      "registration_cpu_s": cache["registration_cpu_s"], "out": str(out)}))
    return result
