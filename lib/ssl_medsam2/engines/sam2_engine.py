"""TFFS-MedSAM2: training-free few-shot segmentation by SAM2 video propagation.

For every support volume and every (seeded) insert position, the whole support volume is inserted
into the query's slice sequence; its masks are mask prompts on every slice where the class is present;
SAM2 propagates forward from the first prompted frame and, from a fresh state, backward from the last
one; the query frames are kept (where both directions reach a frame they are averaged). Each
foreground class is its own object. The engine returns the mean probability over all runs.

Three implementations of the same protocol, one oracle:

* :meth:`SAM2Engine.predict` reuses everything that does not depend on the insert position: image
  features once per unique slice (the query's for all its runs, supports' across queries too, in one
  :class:`~.sam2_context.SupportCache`), the prompted support frames' outputs and memories once per
  (support, class), and the tracked support frames between/after/before the prompts once per direction
  — in SAM2 these depend only on relative frame distances inside the inserted block. Per run it then
  tracks only query frames, either
  - batched (``sam2.batch_runs: true``, default): all runs of a (support, class) advance together,
    one SAM2 step per frame for the whole batch (:mod:`.sam2_batch`, :mod:`.sam2_cond_kv`; the
    tracked support frames go through the same step), or
  - run by run (``sam2.batch_runs: false``): SAM2's own per-frame step, batch 1.
  Probabilities are summed per class on the model's device and copied to the host once per query.
* :meth:`SAM2Engine.predict_reference` is the paper's order with the stock predictor calls
  (:mod:`.sam2_reference`); it exists to prove the engine gives the same probabilities.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch

from ..devices import resolve_device
from ..io import InputError
from ..preprocess import (InputSettings, IntensityConfig, frames_for_model, resize_mask_nearest, resolve_slice_axis,
                          scale_to_uint8_range, to_slices, from_slices)
from ..protocol import PseudoVideo, RunningMean, insert_positions
from .base import Case, EngineResult, check_supports
from .sam2_batch import TrackSequence, logits_to_prob, new_cond_kv, track_batched
from .sam2_context import (Features, QueryContext, SupportCache, SupportContext, SupportOnly,
                           VideoFeatures)
from .sam2_model import CheckpointNotFound, SAM2Settings, build_predictor, checkpoint_status  # noqa: F401 (re-export)
from .sam2_reference import run_reference

log = logging.getLogger(__name__)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16}[str(name)]
    except KeyError:
        raise ValueError(f"sam2.dtype must be auto, float32 or bfloat16, got '{name}'") from None


def resolve_max_batch(value, device: torch.device) -> int:
    """``sam2.max_batch``: auto = 8 sequences per step on CPU (bounded memory; batching saves little
    there), 64 on CUDA (the GPU is latency-bound at batch 1)."""
    if value in (None, "auto"):
        return 64 if device.type == "cuda" else 8
    if int(value) < 1:
        raise ValueError(f"sam2.max_batch must be auto or >= 1, got {value}")
    return int(value)


def compile_tracking(model, device: torch.device) -> bool:
    """``sam2.compile``: torch.compile the per-frame tracking modules (as SAM2's ``vos_optimized``
    predictor does). CUDA only; on CPU it is ignored (compilation costs minutes and gains nothing)."""
    if device.type != "cuda":
        log.warning("sam2.compile is ignored on %s (CUDA only)", device)
        return False
    model.memory_attention.forward = torch.compile(model.memory_attention.forward, dynamic=True)
    model.memory_encoder.forward = torch.compile(model.memory_encoder.forward, dynamic=True)
    model.sam_mask_decoder.forward = torch.compile(model.sam_mask_decoder.forward, dynamic=True)
    return True


class SAM2Engine:
    """Few-shot engine over a SAM2 video predictor (MedSAM2 weights by default)."""

    name = "sam2"

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.settings = s = SAM2Settings.from_config(cfg)
        self.icfg = IntensityConfig.from_config(cfg)
        self.slice_axis = InputSettings.from_config(cfg).slice_axis
        self.device = resolve_device(s.device)
        self.dtype = resolve_dtype(s.dtype, self.device)
        self.n_inserts, self.n_supports, self.seed = s.n_inserts, s.n_supports, s.seed
        self.feature_batch, self.batch_runs = s.feature_batch, s.batch_runs
        self.max_batch = resolve_max_batch(s.max_batch, self.device)
        self._predictor = None
        self.model_info: dict = {}
        self.supports = SupportCache(s.support_cache_frames)
        self.stats = {"frames_encoded": 0, "frames_tracked": 0, "batched_steps": 0}

    @classmethod
    def from_config(cls, cfg: dict) -> "SAM2Engine":
        return cls(cfg)

    # --- model ----------------------------------------------------------------------------------

    @property
    def predictor(self):
        """Built on first use, so constructing the engine (e.g. in a server) costs nothing."""
        if self._predictor is None:
            self._predictor, self.model_info = build_predictor(self.settings, self.device)
            self.model_info["compiled"] = self.settings.compile and \
                compile_tracking(self._predictor, self.device)
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

    def _encode(self, scaled_slices: np.ndarray) -> Features:
        frames = frames_for_model(scaled_slices, self.image_size)
        with torch.inference_mode(), self._autocast():
            per_frame, pos, sizes = self.predictor.encode_frames(frames, self.feature_batch)
        self.stats["frames_encoded"] += len(per_frame)
        return Features(per_frame, pos, sizes)

    def _support_key(self, s: Case, axis: int):
        return (s.image.path or s.name, s.name, s.image.shape, axis, self.image_size)

    def query_context(self, query: Case, axis: int, encode: bool) -> QueryContext:
        q_scaled, _ = self._slices(query, axis)
        return QueryContext(axis, q_scaled, self._encode(q_scaled) if encode else None)

    def support_context(self, s: Case, q: QueryContext, cached: bool) -> SupportContext:
        """The support on the query's in-plane grid; with ``cached``, its features from the cache."""
        s_scaled, s_lab = self._slices(s, q.axis)
        ctx = SupportContext(s, s_scaled, resize_mask_nearest(s_lab, q.hw))
        if cached:
            ctx.entry = self.supports.entry(self._support_key(s, q.axis), lambda: self._encode(s_scaled))
        return ctx

    def select_supports(self, supports: Sequence[Case]) -> list[Case]:
        """At most ``n_supports`` supports: all when there are few, else a seeded random subset."""
        if len(supports) <= self.n_supports:
            return list(supports)
        rng = np.random.default_rng([self.seed, 1])
        idx = sorted(rng.choice(len(supports), size=self.n_supports, replace=False).tolist())
        return [supports[i] for i in idx]

    def work_units(self, supports, query, classes) -> int:
        return len(self.select_supports(supports)) * self.n_inserts * len(classes)

    # --- protocol (shared by every implementation) ------------------------------------------------

    def _protocol(self, supports, query, classes, run_support, progress, cached: bool) -> EngineResult:
        """Loop over the chosen supports; ``run_support(q, s, positions, masks, acc)`` adds every run
        of one support (insert positions x classes present) to the per-class running means."""
        classes = tuple(int(c) for c in classes)
        check_supports(supports, classes)
        if query.image.array.ndim != 3:
            raise InputError(query.image.path, "query is not a 3D volume")
        axis = resolve_slice_axis(self.slice_axis, query.image.spacing)
        chosen = self.select_supports(supports)
        t0 = time.perf_counter()
        q = self.query_context(query, axis, encode=cached)
        acc = {c: RunningMean((q.n_slices,) + q.hw, device=self.device) for c in classes}
        rng = np.random.default_rng(self.seed)
        positions: dict[str, list[int]] = {}
        for s_case in chosen:
            s = self.support_context(s_case, q, cached)
            positions[s_case.name] = insert_positions(q.n_slices, self.n_inserts, rng)
            masks = {c: m for c in classes if (m := s.mask(c)).any()}
            run_support(q, s, positions[s_case.name], masks, acc)
            if progress:
                progress(len(positions[s_case.name]) * len(classes))
        missing = [c for c in classes if acc[c].n == 0]
        if missing:
            raise InputError(None, f"class(es) {missing} appear in none of the supports "
                                   f"{[s.name for s in chosen]}")
        probs = np.stack([from_slices(acc[c].mean, axis) for c in classes])  # the one host copy
        meta = {**self.model_info, "engine": self.name, "slice_axis": axis,
                "n_inserts": self.n_inserts, "supports_used": [s.name for s in chosen],
                "insert_positions": positions, "runs_per_class": {str(c): acc[c].n for c in classes},
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "timings": {"engine_s": round(time.perf_counter() - t0, 3)}}
        return EngineResult(probs.astype(np.float32), classes, len(chosen) * self.n_inserts, meta)

    # --- the engine: shared work cached, query frames batched or run by run --------------------------

    def predict(self, supports: Sequence[Case], query: Case, classes: Sequence[int],
                progress: Callable[[int], None] | None = None) -> EngineResult:
        self.predictor  # build (and fail on missing weights) before any work
        run_support = self._run_support_batched if self.batch_runs else self._run_support_by_run
        return self._protocol(supports, query, classes, run_support, progress, cached=True)

    def _new_state(self, source, hw):
        return self.predictor.init_state_from_frames(None, hw[0], hw[1], feature_source=source)

    def _prompts(self, q: QueryContext, s: SupportContext, c: int, mask: np.ndarray) -> dict:
        """Outputs + memories of the prompted support frames (by support slice), as ``add_new_mask`` +
        the propagation preflight produce them; independent of the insert position."""
        key = (c, q.hw)
        if key not in s.entry.prompts:
            feats = s.entry.features
            state = self._new_state(SupportOnly(feats, len(feats)), q.hw)
            with torch.inference_mode(), self._autocast():
                for j in SupportContext.prompted_slices(mask):
                    self.predictor.add_new_mask(state, j, 1, torch.from_numpy(mask[j]))
                self.predictor.propagate_in_video_preflight(state)
            s.entry.prompts[key] = dict(state["output_dict_per_obj"][0]["cond_frame_outputs"])
        return s.entry.prompts[key]

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

    def _block(self, q: QueryContext, s: SupportContext, c: int, prompts: dict, reverse: bool,
               cond_kv=None) -> dict:
        """Non-prompted support frames tracked inside the block (after the first prompt going forward,
        before the last going backward), by support slice; independent of the insert position.
        ``cond_kv``: the batched path's cache of these prompts' keys/values (:func:`.sam2_batch.new_cond_kv`)."""
        key = (c, q.hw, q.n_slices, reverse)
        if key not in s.entry.blocks:
            n_s = s.n_slices
            source = SupportOnly(s.entry.features, q.n_slices + n_s)
            output_dict = {"cond_frame_outputs": dict(prompts), "non_cond_frame_outputs": {}}
            frames = range(max(prompts), -1, -1) if reverse else range(min(prompts), n_s)
            with torch.inference_mode(), self._autocast():
                if self.batch_runs:  # the batched step (conditioning keys once); keeps what later frames read
                    frames = [f for f in frames if f not in prompts]
                    block = TrackSequence(reverse=reverse, frames=frames, slices=frames, source=source,
                                          output_dict=output_dict, num_frames=source.num_frames)
                    track_batched(self.predictor, [block], lambda *_: None, 1, self.stats, cond_kv)
                else:
                    for _ in self._track(self._new_state(source, q.hw), output_dict, frames, reverse):
                        pass
            s.entry.blocks[key] = output_dict["non_cond_frame_outputs"]
        return s.entry.blocks[key]

    @staticmethod
    def _query_frames(video: PseudoVideo, reverse: bool) -> range:
        """Forward reaches the query frames after the block, backward those before it."""
        p = video.position
        return range(p - 1, -1, -1) if reverse else range(p + video.n_support, video.length)

    def _run_support_by_run(self, q, s, positions, masks, acc) -> None:
        for p in positions:
            for c, mask in masks.items():
                acc[c].add(self._run_cached(q, s, p, c, mask))

    def _run_cached(self, q: QueryContext, s: SupportContext, p: int, c: int, mask) -> torch.Tensor:
        """One run, batch 1: query-slice probabilities (n_query, H, W) on the model's device."""
        prompts = self._prompts(q, s, c, mask)
        video = PseudoVideo(q.n_slices, s.n_slices, p)
        state = self._new_state(VideoFeatures(video, q.features, s.entry.features), q.hw)
        out = torch.empty((q.n_slices,) + q.hw, dtype=torch.float32, device=self.device)
        cond = {video.support_frame(j): o for j, o in prompts.items()}
        with torch.inference_mode(), self._autocast():
            for reverse in (False, True):
                block = self._block(q, s, c, prompts, reverse)
                output_dict = {"cond_frame_outputs": cond,
                               "non_cond_frame_outputs": {video.support_frame(k): o for k, o in block.items()}}
                for f, pred in self._track(state, output_dict, self._query_frames(video, reverse), reverse):
                    out[video.source(f)[1]] = logits_to_prob(pred, q.hw)[0]
        return out

    def _run_support_batched(self, q, s, positions, masks, acc) -> None:
        """All runs of this support, one class at a time: its insert positions x 2 directions tracked
        together (classes rarely batch with each other: their prompted-frame counts differ)."""
        for c, mask in masks.items():
            sequences = []
            with torch.inference_mode(), self._autocast():
                prompts = self._prompts(q, s, c, mask)
                cond_kv = new_cond_kv(self.predictor)  # the prompts' keys/values, once for blocks and runs
                blocks = {rev: self._block(q, s, c, prompts, rev, cond_kv) for rev in (False, True)}
                for p in positions:
                    video = PseudoVideo(q.n_slices, s.n_slices, p)
                    source = VideoFeatures(video, q.features, s.entry.features)
                    cond = {video.support_frame(j): o for j, o in prompts.items()}
                    for reverse in (False, True):
                        frames = list(self._query_frames(video, reverse))
                        if not frames:
                            continue
                        non_cond = {video.support_frame(k): o for k, o in blocks[reverse].items()}
                        sequences.append(TrackSequence(
                            reverse=reverse, frames=frames,
                            slices=[video.source(f)[1] for f in frames], source=source,
                            output_dict={"cond_frame_outputs": cond, "non_cond_frame_outputs": non_cond},
                            num_frames=video.length))

                def emit(elements, pred_masks, c=c):
                    acc[c].add_slices([sl for _, sl in elements], logits_to_prob(pred_masks, q.hw))

                track_batched(self.predictor, sequences, emit, self.max_batch, self.stats, cond_kv)
            acc[c].count(len(positions))

    # --- reference (paper order, stock predictor calls, no caches) ----------------------------------

    def predict_reference(self, supports: Sequence[Case], query: Case, classes: Sequence[int],
                          progress: Callable[[int], None] | None = None) -> EngineResult:
        self.predictor

        def run_support(q, s, positions, masks, acc):
            for p in positions:
                for c, mask in masks.items():
                    acc[c].add(run_reference(self.predictor, self._autocast, q, s, p, mask))

        return self._protocol(supports, query, classes, run_support, progress, cached=False)
