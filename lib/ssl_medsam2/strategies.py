"""Which volume should a person (or the pseudo-labeller) look at next: pure functions over per-image scores.

Active learning here never touches a server or a datastore: callers gather per-image scores (pseudo-label
uncertainty, few-shot vs nnU-Net disagreement, cheap image embeddings) and these functions rank image ids.
That keeps every strategy testable on plain dicts and reusable from the MONAI Label app, the CLI and benches.

Scores are "higher = more worth a human look" for annotation; pseudo-labelling goes the other way
(most confident first), because confident pseudo labels are the ones worth trusting and checking quickly.
"""

from __future__ import annotations

import random as _random
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .metrics import mean_dice, present_classes

ANNOTATION_STRATEGIES = ("uncertainty", "disagreement", "diversity", "random", "first")
PSEUDO_LABEL_STRATEGIES = ("most_confident",)


# --- rankings -------------------------------------------------------------------------------------

def _split_scored(ids: Iterable[str], scores: Mapping[str, float | None]) -> tuple[list[str], list[str]]:
    scored, unscored = [], []
    for i in ids:
        v = scores.get(i)
        (scored if v is not None and np.isfinite(v) else unscored).append(i)
    return scored, sorted(unscored)


def rank_by_score(ids: Iterable[str], scores: Mapping[str, float | None], descending: bool = True) -> list[str]:
    """Ids by score (ties broken by name); ids without a finite score come last, in name order.

    Unscored images are not dropped: a fresh datastore with no scores yet still hands out work.
    """
    scored, unscored = _split_scored(ids, scores)
    sign = -1.0 if descending else 1.0
    scored.sort(key=lambda i: (sign * float(scores[i]), i))  # type: ignore[arg-type]
    return scored + unscored


def rank_uncertainty(ids: Iterable[str], uncertainty: Mapping[str, float | None],
                     failed: Iterable[str] = ()) -> list[str]:
    """Most uncertain pseudo label first: where the few-shot ensemble disagreed with itself most.

    Pseudo labels that failed the quality gate (:mod:`ssl_medsam2.quality`) come before all others: a
    confidently wrong label can have a low entropy, and it is the one a person must see first."""
    ids = list(ids)
    bad = set(failed)
    return (rank_by_score([i for i in ids if i in bad], uncertainty, descending=True)
            + rank_by_score([i for i in ids if i not in bad], uncertainty, descending=True))


def rank_quality(ids: Iterable[str], quality: Mapping[str, float | None]) -> list[str]:
    """Lowest pseudo-label quality score first (:func:`ssl_medsam2.quality.assess`)."""
    return rank_by_score(ids, quality, descending=False)


def rank_disagreement(ids: Iterable[str], disagreement: Mapping[str, float | None]) -> list[str]:
    """Largest few-shot vs nnU-Net disagreement first: the two views of the data contradict each other there."""
    return rank_by_score(ids, disagreement, descending=True)


def rank_most_confident(ids: Iterable[str], uncertainty: Mapping[str, float | None]) -> list[str]:
    """Pseudo-labelling order: least uncertain first (they are the cheapest to accept)."""
    return rank_by_score(ids, uncertainty, descending=False)


def rank_first(ids: Iterable[str]) -> list[str]:
    """Name order: predictable, what a reading list would do."""
    return sorted(ids)


def rank_random(ids: Iterable[str], seed: int | None = None) -> list[str]:
    """A random order (the baseline every other strategy must beat)."""
    out = sorted(ids)
    _random.Random(seed).shuffle(out)
    return out


def k_center(candidates: Mapping[str, np.ndarray], selected: Mapping[str, np.ndarray],
             k: int | None = None) -> list[str]:
    """Greedy k-center (farthest-first): each pick is the candidate farthest from everything already covered.

    ``selected`` are the images already labelled (their embeddings); with none, the first pick is the
    candidate farthest from the candidates' mean, so the order is still deterministic. Returns all
    candidates when ``k`` is None, ordered by when greedy k-center would pick them.
    """
    ids = sorted(candidates)
    if not ids:
        return []
    X = np.stack([np.asarray(candidates[i], dtype=np.float64).ravel() for i in ids])
    if selected:
        S = np.stack([np.asarray(v, dtype=np.float64).ravel() for v in selected.values()])
        d = np.min(((X[:, None, :] - S[None, :, :]) ** 2).sum(-1), axis=1)
    else:
        d = ((X - X.mean(0)) ** 2).sum(-1)
    k = len(ids) if k is None else min(k, len(ids))
    order: list[str] = []
    d = d.copy()
    taken = np.zeros(len(ids), dtype=bool)
    for _ in range(k):
        d_masked = np.where(taken, -np.inf, d)
        j = int(np.argmax(d_masked))  # ties -> lowest index -> name order
        order.append(ids[j])
        taken[j] = True
        d = np.minimum(d, ((X - X[j]) ** 2).sum(-1))
    return order


def most_similar(query: np.ndarray, pool: Mapping[str, np.ndarray], k: int) -> list[str]:
    """The ``k`` pool ids nearest to ``query`` in embedding space (few-shot support selection)."""
    q = np.asarray(query, dtype=np.float64).ravel()
    dist = {i: float(((np.asarray(v, dtype=np.float64).ravel() - q) ** 2).sum()) for i, v in pool.items()}
    return [i for i, _ in sorted(dist.items(), key=lambda kv: (kv[1], kv[0]))][: max(0, k)]


# --- cheap image embeddings -----------------------------------------------------------------------

def image_embedding(array: np.ndarray, grid: Sequence[int], bins: int = 16,
                    percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """A small fixed-length vector describing a volume: a coarse intensity thumbnail plus a histogram.

    Intensities are percentile-normalised first so scanners with different scales compare; the
    thumbnail (block means on ``grid``) captures layout and field of view, the histogram contrast.
    Cheap enough to compute for every image at each request (tens of ms on a 256x256x40 volume).
    """
    a = np.asarray(array, dtype=np.float32)
    nz = a[a != 0]
    lo, hi = np.percentile(nz if nz.size else a, percentiles)
    a = np.clip((a - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    zoom = [g / s for g, s in zip(grid, a.shape)]
    thumb = ndimage.zoom(a, zoom, order=1, prefilter=False, grid_mode=True, mode="nearest")
    thumb = thumb[: grid[0], : grid[1], : grid[2]]
    hist, _ = np.histogram(a, bins=bins, range=(0.0, 1.0))
    hist = hist / max(hist.sum(), 1)
    return np.concatenate([thumb.ravel(), hist]).astype(np.float32)


# --- scores ---------------------------------------------------------------------------------------

def disagreement_score(fewshot_label: np.ndarray, nnunet_label: np.ndarray,
                       classes: Sequence[int] | None = None) -> float:
    """1 - mean Dice between the few-shot pseudo label and the nnU-Net prediction, over the classes
    (of ``classes``) present in either map; 0 when both are empty."""
    d = mean_dice(fewshot_label, nnunet_label, present_classes(fewshot_label, nnunet_label, classes))
    return 0.0 if d is None else float(1.0 - d)


def uncertainty_score(entropy: np.ndarray, label: np.ndarray, classes: Sequence[int],
                      band: int) -> float | None:
    """Mean voxel entropy inside and around each class mask (mask dilated by ``band``), averaged over classes.

    ``entropy`` is (C, X, Y, Z) with channel i for ``classes[i]`` (the pseudo-label output layout). The
    background far from any organ is excluded: it is confidently empty in every run and would dilute
    the score. Classes missing from the label are scored on nothing and skipped; None if all are.
    """
    entropy = np.asarray(entropy)
    if entropy.ndim == 3:
        entropy = entropy[None]
    st = ndimage.generate_binary_structure(3, 1)
    vals = []
    for i, c in enumerate(classes):
        m = np.asarray(label) == c
        if not m.any():
            continue
        if band > 0:
            m = ndimage.binary_dilation(m, st, iterations=band)
        vals.append(float(entropy[i][m].mean()))
    return float(np.mean(vals)) if vals else None


def choose_next(ranked: Sequence[str], unavailable: Iterable[str] = ()) -> str | None:
    """The first ranked id that is not unavailable (leased to someone else, already labelled, ...)."""
    skip = set(unavailable)
    for i in ranked:
        if i not in skip:
            return i
    return None
