"""TFFS-MedSAM2: training-free few-shot segmentation by SAM2 video propagation.

For every support volume and every (seeded) insert position, the whole support volume is inserted
into the query's slice sequence; its masks are mask prompts on every slice where the class is present;
SAM2 propagates forward from the first prompted frame and, from a fresh state, backward from the last
one; the query frames are kept (where both directions reach a frame they are averaged). Each
foreground class is its own object. The engine returns the mean probability over all runs.

Two implementations of the same protocol live here:

* :meth:`SAM2Engine.predict` (the engine) reuses everything that does not depend on the insert
  position: image features once per unique slice (the query's for all its runs, supports' across
  queries too), the prompted support frames' outputs and memories once per (support, class), and the
  tracked support frames between/after/before the prompts once per direction — in SAM2 these depend
  only on relative frame distances inside the inserted block. Per run it then tracks only query frames.
* :meth:`SAM2Engine.predict_reference` is the paper's order with the stock predictor calls
  (``add_new_mask`` + ``propagate_in_video`` twice, no caches). It exists to prove the cached engine
  gives the same probabilities (tests, ``bench/tffs_speed.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import resolve_device
from ..io import InputError
from ..preprocess import (IntensityConfig, frames_for_model, resize_mask_nearest, resolve_slice_axis,
                          scale_to_uint8_range, to_slices, from_slices)
from ..protocol import PseudoVideo, RunningMean, insert_positions
from .base import Case, EngineResult, check_supports
from .sam2_model import CheckpointNotFound, build_predictor, checkpoint_status  # noqa: F401 (re-export)

log = logging.getLogger(__name__)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16}[str(name)]
    except KeyError:
        raise ValueError(f"sam2.dtype must be auto, float32 or bfloat16, got '{name}'") from None


class _Features:
    """Per-slice image features of one volume (list indexed by slice), shared positional encodings."""

    def __init__(self, per_frame, pos, sizes):
        self.per_frame, self.pos, self.sizes = per_frame, pos, sizes

    def __len__(self):
        return len(self.per_frame)


class _VideoFeatures:
    """Feature source of one pseudo-video: frame index -> the query's or the support's slice features."""

    def __init__(self, video: PseudoVideo, query: _Features, support: _Features):
        self.video, self.query, self.support = video, query, support
        self.num_frames = video.length

    def __call__(self, frame_idx: int):
        kind, i = self.video.source(frame_idx)
        feats = self.query if kind == "query" else self.support
        return feats.per_frame[i], feats.pos, feats.sizes


class _SupportOnly:
    """Feature source of the support block alone, in a video of ``num_frames`` frames (the full
    pseudo-video length, so SAM2's pointer-count and normalisation constants are the same)."""

    def __init__(self, support: _Features, num_frames: int):
        self.support, self.num_frames = support, num_frames

    def __call__(self, frame_idx: int):
        return self.support.per_frame[frame_idx], self.support.pos, self.support.sizes


@contextlib.contextmanager
def _quiet_sam2_progress():
    """SAM2's propagate_in_video draws a tqdm bar per call; the reference path makes hundreds."""
    import sam2.sam2_video_predictor as svp

    orig = svp.tqdm
    svp.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        svp.tqdm = orig


class SAM2Engine:
    """Few-shot engine over a SAM2 video predictor (MedSAM2 weights by default)."""

    name = "sam2"

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.scfg = dict(cfg.get("sam2", {}))
        self.icfg = IntensityConfig.from_config(cfg)
        self.slice_axis = cfg.get("input", {}).get("slice_axis", "auto")
        self.device = resolve_device(self.scfg.get("device"))
        self.dtype = resolve_dtype(self.scfg.get("dtype"), self.device)
        self.n_inserts = int(self.scfg.get("n_inserts", 5))
        self.n_supports = int(self.scfg.get("n_supports", 10))
        self.seed = int(self.scfg.get("seed", 0))
        self.feature_batch = int(self.scfg.get("feature_batch", 8))
        self._predictor = None
        self.model_info: dict = {}
        self._support_features: OrderedDict = OrderedDict()
        self._prompt_cache: dict = {}
        self._block_cache: dict = {}
        self.stats = {"frames_encoded": 0, "frames_tracked": 0}

    @classmethod
    def from_config(cls, cfg: dict) -> "SAM2Engine":
        return cls(cfg)

    # --- model ----------------------------------------------------------------------------------

    @property
    def predictor(self):
        """Built on first use, so constructing the engine (e.g. in a server) costs nothing."""
        if self._predictor is None:
            self._predictor, self.model_info = build_predictor(self.scfg, self.device, self.seed)
        return self._predictor

    @property
    def image_size(self) -> int:
        return int(self.predictor.image_size)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # --- inputs ---------------------------------------------------------------------------------

    def _slices(self, case: Case, axis: int) -> tuple[np.ndarray, np.ndarray | None]:
        img = to_slices(scale_to_uint8_range(case.image.array, self.icfg), axis)
        lab = to_slices(case.label.array, axis) if case.label is not None else None
        return img, lab

    def _encode(self, scaled_slices: np.ndarray) -> _Features:
        frames = frames_for_model(scaled_slices, self.image_size)
        with torch.inference_mode(), self._autocast():
            per_frame, pos, sizes = self.predictor.encode_frames(frames, self.feature_batch)
        self.stats["frames_encoded"] += len(per_frame)
        return _Features(per_frame, pos, sizes)

    def _support_key(self, s: Case, axis: int):
        return (s.image.path or s.name, s.name, s.image.shape, axis, self.image_size)

    def _support_features_for(self, s: Case, axis: int, scaled: np.ndarray) -> _Features:
        key = self._support_key(s, axis)
        if key in self._support_features:
            self._support_features.move_to_end(key)
            return self._support_features[key]
        feats = self._encode(scaled)
        self._support_features[key] = feats
        limit = int(self.scfg.get("support_cache_frames", 1024))
        while sum(len(f) for f in self._support_features.values()) > limit and len(self._support_features) > 1:
            old, _ = self._support_features.popitem(last=False)
            self._prompt_cache = {k: v for k, v in self._prompt_cache.items() if k[0] != old}
            self._block_cache = {k: v for k, v in self._block_cache.items() if k[0] != old}
        return feats

    def select_supports(self, supports: Sequence[Case]) -> list[Case]:
        """At most ``n_supports`` supports: all when there are few, else a seeded random subset."""
        if len(supports) <= self.n_supports:
            return list(supports)
        rng = np.random.default_rng([self.seed, 1])
        idx = sorted(rng.choice(len(supports), size=self.n_supports, replace=False).tolist())
        return [supports[i] for i in idx]

    def work_units(self, supports, query, classes) -> int:
        return len(self.select_supports(supports)) * self.n_inserts * len(classes)

    # --- protocol (shared by the cached engine and the reference) ---------------------------------

    def _protocol(self, supports, query, classes, run_one, progress, prepare_query=None) -> EngineResult:
        """Loop supports x insert positions x classes; ``run_one`` returns query-frame probabilities,
        ``prepare_query`` (optional) adds per-query state to the context once."""
        classes = tuple(int(c) for c in classes)
        check_supports(supports, classes)
        if query.image.array.ndim != 3:
            raise InputError(query.image.path, "query is not a 3D volume")
        axis = resolve_slice_axis(self.slice_axis, query.image.spacing)
        chosen = self.select_supports(supports)
        t0 = time.perf_counter()
        q_scaled, _ = self._slices(query, axis)
        n_q, h, w = q_scaled.shape
        acc = {c: RunningMean((n_q, h, w)) for c in classes}
        rng = np.random.default_rng(self.seed)
        positions: dict[str, list[int]] = {}
        ctx = {"axis": axis, "q_scaled": q_scaled, "hw": (h, w)}
        if prepare_query is not None:
            prepare_query(ctx)
        for s in chosen:
            s_scaled, s_lab = self._slices(s, axis)
            s_lab = resize_mask_nearest(s_lab, (h, w))
            positions[s.name] = insert_positions(n_q, self.n_inserts, rng)
            sctx = {"case": s, "scaled": s_scaled, "label": s_lab}
            for p in positions[s.name]:
                for c in classes:
                    mask = s_lab == c
                    if mask.any():
                        acc[c].add(run_one(ctx, sctx, p, c, mask))
                    if progress:
                        progress(1)
        missing = [c for c in classes if acc[c].n == 0]
        if missing:
            raise InputError(None, f"class(es) {missing} appear in none of the supports "
                                   f"{[s.name for s in chosen]}")
        probs = np.stack([from_slices(acc[c].mean, axis) for c in classes])
        meta = {**self.model_info, "engine": self.name, "slice_axis": axis,
                "n_inserts": self.n_inserts, "supports_used": [s.name for s in chosen],
                "insert_positions": positions, "runs_per_class": {str(c): acc[c].n for c in classes},
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "timings": {"engine_s": round(time.perf_counter() - t0, 3)}}
        return EngineResult(probs.astype(np.float32), classes, len(chosen) * self.n_inserts, meta)

    def _to_query_prob(self, pred_masks: torch.Tensor, hw) -> torch.Tensor:
        """Low-res mask logits (1,1,s,s) -> probability on the query's in-plane grid (H, W), as
        SAM2's ``_get_orig_video_res_output`` resizes them for the video resolution."""
        m = pred_masks.float()
        if tuple(m.shape[-2:]) != tuple(hw):
            m = F.interpolate(m, size=tuple(hw), mode="bilinear", align_corners=False)
        return torch.sigmoid(m)[0, 0]

    # --- cached engine ----------------------------------------------------------------------------

    def predict(self, supports: Sequence[Case], query: Case, classes: Sequence[int],
                progress: Callable[[int], None] | None = None) -> EngineResult:
        self.predictor  # build (and fail on missing weights) before any work
        return self._protocol(supports, query, classes, self._run_cached, progress, self._encode_query)

    def _encode_query(self, ctx):
        ctx["q_feats"] = self._encode(ctx["q_scaled"])

    def _new_state(self, source, hw):
        return self.predictor.init_state_from_frames(None, hw[0], hw[1], feature_source=source)

    def _prompts(self, ctx, sctx, c, mask) -> dict:
        """Outputs + memories of the prompted support frames (by support slice), as ``add_new_mask`` +
        the propagation preflight produce them; independent of the insert position."""
        s_feats = self._support_features_for(sctx["case"], ctx["axis"], sctx["scaled"])
        key = (self._support_key(sctx["case"], ctx["axis"]), c, ctx["hw"])
        if key not in self._prompt_cache:
            state = self._new_state(_SupportOnly(s_feats, len(s_feats)), ctx["hw"])
            with torch.inference_mode(), self._autocast():
                for j in np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1)):
                    self.predictor.add_new_mask(state, int(j), 1, torch.from_numpy(mask[j]))
                self.predictor.propagate_in_video_preflight(state)
            self._prompt_cache[key] = dict(state["output_dict_per_obj"][0]["cond_frame_outputs"])
        return self._prompt_cache[key]

    def _track(self, state, output_dict, frames, reverse):
        """SAM2's per-frame tracking step for one object (the body of ``propagate_in_video``)."""
        for f in frames:
            out = output_dict["cond_frame_outputs"].get(f)
            if out is not None:
                yield f, out["pred_masks"]
                continue
            out, pred = self.predictor._run_single_frame_inference(
                inference_state=state, output_dict=output_dict, frame_idx=f, batch_size=1,
                is_init_cond_frame=False, point_inputs=None, mask_inputs=None, reverse=reverse,
                run_mem_encoder=True)
            output_dict["non_cond_frame_outputs"][f] = out
            self.stats["frames_tracked"] += 1
            yield f, pred

    def _block(self, ctx, sctx, c, prompts, reverse) -> dict:
        """Non-prompted support frames tracked inside the block (after the first prompt going forward,
        before the last going backward), by support slice; independent of the insert position."""
        s_feats = self._support_features_for(sctx["case"], ctx["axis"], sctx["scaled"])
        n_q = ctx["q_scaled"].shape[0]
        key = (self._support_key(sctx["case"], ctx["axis"]), c, ctx["hw"], n_q, reverse)
        if key not in self._block_cache:
            n_s = len(s_feats)
            state = self._new_state(_SupportOnly(s_feats, n_q + n_s), ctx["hw"])
            output_dict = {"cond_frame_outputs": dict(prompts), "non_cond_frame_outputs": {}}
            frames = range(max(prompts), -1, -1) if reverse else range(min(prompts), n_s)
            with torch.inference_mode(), self._autocast():
                for _ in self._track(state, output_dict, frames, reverse):
                    pass
            self._block_cache[key] = output_dict["non_cond_frame_outputs"]
        return self._block_cache[key]

    def _run_cached(self, ctx, sctx, p, c, mask) -> np.ndarray:
        prompts = self._prompts(ctx, sctx, c, mask)
        s_feats = self._support_features_for(sctx["case"], ctx["axis"], sctx["scaled"])
        n_q, h, w = ctx["q_scaled"].shape
        video = PseudoVideo(n_q, len(s_feats), p)
        state = self._new_state(_VideoFeatures(video, ctx["q_feats"], s_feats), ctx["hw"])
        out = torch.empty((n_q, h, w), dtype=torch.float32)
        cond = {video.support_frame(j): o for j, o in prompts.items()}
        with torch.inference_mode(), self._autocast():
            for reverse in (False, True):
                block = self._block(ctx, sctx, c, prompts, reverse)
                output_dict = {"cond_frame_outputs": cond,
                               "non_cond_frame_outputs": {video.support_frame(k): o for k, o in block.items()}}
                # forward reaches the query frames after the block, backward those before it
                frames = range(p - 1, -1, -1) if reverse else range(p + video.n_support, video.length)
                for f, pred in self._track(state, output_dict, frames, reverse):
                    out[video.source(f)[1]] = self._to_query_prob(pred, (h, w))
        return out.numpy()

    # --- reference (paper order, stock predictor calls, no caches) ----------------------------------

    def predict_reference(self, supports: Sequence[Case], query: Case, classes: Sequence[int],
                          progress: Callable[[int], None] | None = None) -> EngineResult:
        self.predictor
        return self._protocol(supports, query, classes, self._run_reference, progress)

    def _run_reference(self, ctx, sctx, p, c, mask) -> np.ndarray:
        n_q, h, w = ctx["q_scaled"].shape
        n_s = sctx["scaled"].shape[0]
        video = PseudoVideo(n_q, n_s, p)
        frames = frames_for_model(video.assemble(ctx["q_scaled"], sctx["scaled"]), self.image_size)
        prompted = [int(j) for j in np.flatnonzero(mask.reshape(n_s, -1).any(axis=1))]
        pred = self.predictor
        state = pred.init_state_from_frames(frames, h, w)
        results = {}
        with torch.inference_mode(), self._autocast(), _quiet_sam2_progress():
            for reverse in (False, True):
                pred.reset_state(state)
                for j in prompted:
                    pred.add_new_mask(state, video.support_frame(j), 1, torch.from_numpy(mask[j]))
                start = video.support_frame(prompted[-1] if reverse else prompted[0])
                probs = np.zeros((video.length, h, w), dtype=np.float32)
                valid = np.zeros(video.length, dtype=bool)
                for f, _, masks in pred.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                    probs[f] = torch.sigmoid(masks[0, 0].float()).numpy()
                    valid[f] = True
                results[reverse] = (probs, valid)
        from ..protocol import combine_directions

        prob, valid = combine_directions(results[False][0], results[True][0], results[False][1], results[True][1])
        qf = video.query_frames()
        if not valid[qf].all():
            raise RuntimeError("some query frames were reached by neither direction")
        return prob[qf]
