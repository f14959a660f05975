"""An organ's look, learned from the campaign's own labelled images (no checkpoint): the intensity term of
a correction whose base someone vouches for.

Why: the engine's own intensity term is a 1-D histogram of the click's region, learned from its base
label; on T2-SPIR the organs and their neighbours overlap there (docs/interactive.md). A small classifier
per organ on multi-scale in-plane features (smoothed intensity, gradient, local spread, Laplacian, the
neighbouring slices), trained on the border bands of the labelled images, separates them better: in the
pseudo labels' border bands of the CHAOS queries whose base the gate passed, its AUC is higher in all 20
(``bench/interactive_appearance.py``).
Intensities are taken relative to the organ's median inside its (eroded) base label, so images scaled
differently still compare; that is also why it is used only where the base is trusted
(``interactive.trusted_base.appearance_weight``): a displaced base gives a wrong reference, and the term
then pulls the organ onto its neighbour (chaos_15's spleen: measured).

- :func:`fit_appearance`: a few seconds per organ on CPU (torch, seeded, deterministic).
- :class:`AppearanceModel`: the weights as plain arrays, saved with :meth:`~AppearanceModel.save` as an
  ``.npz`` without pickles (a server's state folder is not a place to unpickle from).
- :func:`crop_logit`: the organ's appearance log-odds over a crop, each voxel computed on first use and kept
  with the prepared image (the same value whatever crop asked first).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..config import Section
from ..io import atomic_write
from .engine import slice_axis

#: in-plane scales (mm) of the smoothed-intensity features; gradient magnitude at the first two, Laplacian at
#: the second, local spread over 5 x 5 pixels, the next slices' smoothed intensity, and a wide context scale
SMOOTH_MM = (1.25, 2.5, 5.0)
CONTEXT_MM = 10.0
FEATURE_NAMES = ("intensity", "smooth_1.25mm", "smooth_2.5mm", "smooth_5mm", "gradient_1.25mm", "gradient_2.5mm",
                 "spread_5px", "previous_slice", "next_slice", "laplacian_2.5mm", "context_10mm")
LOGIT_CLIP = 4.0


@dataclass(frozen=True)
class AppearanceSettings(Section):
    """Typed view of ``appearance:`` (how the organ looks are learned; defaults in the YAML only)."""

    SECTION = "appearance"
    band_mm: float            # training voxels: within this distance of the organ's border, both sides
    samples_per_image: int    # at most this many of them per image and organ
    hidden: int               # units of the two hidden layers
    epochs: int
    max_images: int           # the most recent labelled images it learns from
    seed: int

    def __post_init__(self):
        self._set(band_mm=float(self.band_mm), samples_per_image=int(self.samples_per_image),
                  hidden=int(self.hidden), epochs=int(self.epochs), max_images=int(self.max_images),
                  seed=int(self.seed))
        if self.samples_per_image < 100 or self.hidden < 1 or self.epochs < 1 or self.max_images < 1:
            raise ValueError("appearance: samples_per_image >= 100, hidden, epochs and max_images >= 1")


def _sigmas(mm: float, spacing: Sequence[float], through: int, along: float = 0.0) -> tuple[float, ...]:
    return tuple(along if a == through else mm / float(sp) for a, sp in enumerate(spacing))


#: slices a slab needs on each side so that its features equal the whole volume's: the context scale's
#: Gaussian (sigma 0.5 slice, scipy's radius int(4 x 0.5 + 0.5)); the other filters stay in-plane
PAD_SLICES = 2


def _neighbour(a: np.ndarray, step: int, axis: int) -> np.ndarray:
    """``a`` shifted by one slice (``step`` +-1) along ``axis``, the end slice repeated (no wrap-around)."""
    idx = np.clip(np.arange(a.shape[axis]) - step, 0, a.shape[axis] - 1)
    return np.take(a, idx, axis=axis)


def raw_features(image: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The features of :data:`FEATURE_NAMES` (..., F), not yet relative to the organ: each is linear in the
    image, so dividing by the organ's reference intensity afterwards is the same as dividing first."""
    img = np.asarray(image, np.float32)
    through = slice_axis(spacing)
    tiny = 0.01
    feats = [img]
    feats += [ndimage.gaussian_filter(img, _sigmas(mm, spacing, through)) for mm in SMOOTH_MM]
    feats += [ndimage.gaussian_gradient_magnitude(img, _sigmas(mm, spacing, through, tiny)) for mm in SMOOTH_MM[:2]]
    box = tuple(1 if a == through else 5 for a in range(3))
    mean = ndimage.uniform_filter(img, box)
    feats.append(np.sqrt(np.maximum(ndimage.uniform_filter(img * img, box) - mean * mean, 0.0)))
    fine = feats[1]
    feats += [_neighbour(fine, 1, through), _neighbour(fine, -1, through)]
    feats.append(ndimage.gaussian_laplace(img, _sigmas(SMOOTH_MM[1], spacing, through, tiny)))
    feats.append(ndimage.gaussian_filter(img, _sigmas(CONTEXT_MM, spacing, through, 0.5)))
    return np.stack(feats, -1).astype(np.float32)


def organ_reference(image: np.ndarray, mask: np.ndarray) -> float | None:
    """The organ's median intensity inside its mask eroded twice (the mask itself when that is empty);
    None for an empty mask. Features are taken relative to it."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    core = ndimage.binary_erosion(mask, iterations=2)
    return max(float(np.median(np.asarray(image)[core if core.any() else mask])), 1e-3)


@dataclass(frozen=True)
class OrganLook:
    """One organ's classifier: standardisation, a 2-hidden-layer perceptron, the training prior removed
    (so that its output is a log-likelihood ratio, like the histogram term it replaces)."""

    mean: np.ndarray
    std: np.ndarray
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    prior_logit: float

    @property
    def token(self) -> str:
        """A short digest of the weights (what a memo of its outputs is keyed by)."""
        h = hashlib.blake2b(digest_size=8)
        for w, b in self.layers:
            h.update(w.tobytes())
            h.update(b.tobytes())
        h.update(self.mean.tobytes())
        return h.hexdigest()

    def logit(self, feats: np.ndarray) -> np.ndarray:
        x = ((feats.reshape(-1, feats.shape[-1]) - self.mean) / self.std).astype(np.float32)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                np.maximum(x, 0.0, out=x)
        return np.clip(x[:, 0] - self.prior_logit, -LOGIT_CLIP, LOGIT_CLIP).reshape(feats.shape[:-1])


@dataclass(frozen=True)
class AppearanceModel:
    """The organ looks learned from ``images`` (their names; what a client is told it learned from)."""

    looks: Mapping[int, OrganLook]
    images: tuple[str, ...]
    digest: str = field(default="")

    def save(self, path) -> Path:
        arrays = {"meta": np.frombuffer(json.dumps({"images": list(self.images), "digest": self.digest,
                                                     "features": list(FEATURE_NAMES)}).encode(), np.uint8)}
        for cid, look in self.looks.items():
            arrays[f"c{cid}_mean"], arrays[f"c{cid}_std"] = look.mean, look.std
            arrays[f"c{cid}_prior"] = np.array([look.prior_logit], np.float64)
            for i, (w, b) in enumerate(look.layers):
                arrays[f"c{cid}_w{i}"], arrays[f"c{cid}_b{i}"] = w, b

        def write(tmp):
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path) -> "AppearanceModel":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("features") != list(FEATURE_NAMES):
                raise ValueError("appearance model made with other features")
            looks = {}
            for cid in sorted({int(k[1:].split("_")[0]) for k in z.files if k.startswith("c")}):
                layers, i = [], 0
                while f"c{cid}_w{i}" in z.files:
                    layers.append((z[f"c{cid}_w{i}"], z[f"c{cid}_b{i}"]))
                    i += 1
                looks[cid] = OrganLook(z[f"c{cid}_mean"], z[f"c{cid}_std"], tuple(layers),
                                       float(z[f"c{cid}_prior"][0]))
        return cls(looks, tuple(meta["images"]), meta.get("digest", ""))


def examples_digest(names: Iterable[str], fingerprints: Iterable, s: AppearanceSettings) -> str:
    """What a model is made from (image names + their label files' fingerprints + the settings)."""
    text = json.dumps([list(names), [list(map(str, f)) for f in fingerprints], s.__dict__], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fit_appearance(examples: Iterable[tuple[str, np.ndarray, Sequence[float], np.ndarray]],
                   class_ids: Sequence[int], s: AppearanceSettings, *, digest: str = "",
                   should_stop: Callable[[], bool] | None = None) -> AppearanceModel:
    """Learn each organ's look from ``examples``: (name, image normalised as :func:`interactive.prepare`
    does, spacing, label of class ids). Voxels within ``band_mm`` of each organ's border, at most
    ``samples_per_image`` per image; binary cross-entropy, Adam, ``epochs`` passes. Organs that no example
    holds get no look. ``should_stop`` (checked between images and minibatches): True raises
    InterruptedError (a server shutting down does not wait for a fit)."""

    def check():
        if should_stop is not None and should_stop():
            raise InterruptedError("learning the organ looks was stopped")

    import torch

    from .engine import signed_distance_mm

    rng = np.random.default_rng(s.seed)
    data: dict[int, tuple[list, list]] = {int(c): ([], []) for c in class_ids}
    names = []
    for name, image, spacing, label in examples:
        check()
        names.append(str(name))
        raw = raw_features(image, spacing)
        for cid, (xs, ys) in data.items():
            organ = np.asarray(label) == cid
            ref = organ_reference(image, organ)
            if ref is None:
                continue
            idx = np.flatnonzero(np.abs(signed_distance_mm(organ, spacing)) <= s.band_mm)
            idx = np.sort(rng.choice(idx, min(len(idx), s.samples_per_image), replace=False))
            xs.append(raw.reshape(-1, raw.shape[-1])[idx] / ref)
            ys.append(organ.ravel()[idx])
    looks = {}
    gen = torch.Generator().manual_seed(s.seed)
    for cid, (xs, ys) in data.items():
        if not xs:
            continue
        x = torch.from_numpy(np.concatenate(xs).astype(np.float32))
        y = torch.from_numpy(np.concatenate(ys).astype(np.float32))
        prior = float(y.mean().clamp(1e-4, 1 - 1e-4))
        mean, std = x.mean(0), x.std(0) + 1e-6
        xn = (x - mean) / std
        with torch.random.fork_rng(devices=[]):  # seeded weights, the process's own generator left as it was
            torch.manual_seed(s.seed)
            net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], s.hidden), torch.nn.ReLU(),
                                      torch.nn.Linear(s.hidden, s.hidden), torch.nn.ReLU(),
                                      torch.nn.Linear(s.hidden, 1))
        opt = torch.optim.Adam(net.parameters(), 3e-3, weight_decay=1e-4)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        for _ in range(s.epochs):
            order = torch.randperm(len(xn), generator=gen)
            for i in range(0, len(xn), 2048):
                check()
                j = order[i:i + 2048]
                loss = loss_fn(net(xn[j]).squeeze(1), y[j])
                opt.zero_grad()
                loss.backward()
                opt.step()
        linear = [m for m in net if isinstance(m, torch.nn.Linear)]
        looks[cid] = OrganLook(mean.numpy(), std.numpy(),
                               tuple((m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
                                     for m in linear), float(np.log(prior / (1 - prior))))
    return AppearanceModel(looks, tuple(names), digest)


def crop_logit(look: OrganLook, image: np.ndarray, spacing: Sequence[float], ref: float,
               roi: Sequence[slice], memo: dict | None = None) -> np.ndarray:
    """``look``'s log-odds over the crop ``roi`` of ``image`` (features relative to ``ref``). Each voxel is
    computed once and kept in ``memo`` (float16), so a further click pays only for voxels it has not seen;
    features come from whole slices, padded, so a value is the same whatever crop asked for it first."""
    through = slice_axis(spacing)
    roi = tuple(slice(*r.indices(n)) for r, n in zip(roi, image.shape))
    key = (look.token, round(float(ref), 6))
    store = memo.get(key) if memo is not None else None
    if store is None:
        store = (np.zeros(image.shape, np.float16), np.zeros(image.shape, bool))
        if memo is not None:
            memo[key] = store
    values, done = store
    todo = ~done[roi]
    if todo.any():
        layers = np.flatnonzero(todo.any(axis=tuple(a for a in range(3) if a != through)))
        lo, hi = roi[through].start + int(layers[0]), roi[through].start + int(layers[-1]) + 1
        slab_lo, slab_hi = max(0, lo - PAD_SLICES), min(image.shape[through], hi + PAD_SLICES)
        take = [slice(None)] * 3
        take[through] = slice(slab_lo, slab_hi)
        raw = raw_features(image[tuple(take)], spacing)
        part, within = list(roi), list(roi)  # the crop's slices that hold voxels to compute, in the slab
        part[through], within[through] = slice(lo, hi), slice(lo - slab_lo, hi - slab_lo)
        part = tuple(part)
        need = ~done[part]
        part_values, part_done = values[part], done[part]  # views
        part_values[need] = look.logit(raw[tuple(within)][need] / ref).astype(np.float16)
        part_done[need] = True
    return values[roi].astype(np.float32)


def labelled_examples(items: Iterable[tuple[str, str | Path, str | Path | np.ndarray]], *, intensity=None):
    """(name, image normalised as the engine sees it, spacing, label) for each (name, image file, label file
    or canonical label array): the examples :func:`fit_appearance` learns from, read one at a time."""
    from ..io import load_label_for, load_volume
    from .prepared import prepare

    for name, image_path, label in items:
        vol = load_volume(image_path, name=name)
        lab = np.asarray(label) if isinstance(label, np.ndarray) else load_label_for(vol, label).array
        yield name, prepare(vol.array, vol.spacing, intensity=intensity).image, vol.spacing, lab
