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
  - batched (``sam2.batch_runs: true``, default): every run of the query — all supports x classes x
    inserts x directions — advances together, one SAM2 step per frame index over fixed-shape memory
    tensors (:mod:`.sam2_batch`, :mod:`.sam2_cond_kv`); first all tracked support blocks together,
    then all runs. :meth:`SAM2Engine.predict_campaign` puts several queries into the same steps, or
  - run by run (``sam2.batch_runs: false``): SAM2's own per-frame step, batch 1.
  Probabilities are summed per class on the model's device and copied to the host once per query.
* :meth:`SAM2Engine.predict_reference` is the paper's order with the stock predictor calls
  (:mod:`.sam2_reference`); it exists to prove the engine gives the same probabilities.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..devices import resolve_device
from ..io import InputError
from ..preprocess import (InputSettings, IntensityConfig, frames_for_model, resize_mask_nearest, resolve_slice_axis,
                          scale_to_uint8_range, to_slices, from_slices)
from ..protocol import PseudoVideo, RunningMean, insert_positions
from .base import Case, EngineResult, check_supports
from .sam2_batch import BatchedTracker, TrackSequence, logits_to_prob
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


def resolve_max_batch(value, device: torch.device) -> int | None:
    """``sam2.max_batch``: auto = 8 sequences per step on CPU (bounded memory; batching saves little
    there), on CUDA chosen per track from free device memory (None)."""
    if value in (None, "auto"):
        return None if device.type == "cuda" else 8
    if int(value) < 1:
        raise ValueError(f"sam2.max_batch must be auto or >= 1, got {value}")
    return int(value)


def resolve_campaign_queries(value, device: torch.device) -> int | None:
    """``sam2.campaign_queries``: queries per batched track in a campaign; auto = 1 on CPU (it is
    compute-bound already), on CUDA chosen from free device memory (None)."""
    if value in (None, "auto"):
        return None if device.type == "cuda" else 1
    if int(value) < 1:
        raise ValueError(f"sam2.campaign_queries must be auto or >= 1, got {value}")
    return int(value)


def compile_wanted(settings, device: torch.device) -> bool:
    """``sam2.compile``: torch.compile the fixed-shape part of the batched step
    (``mode="reduce-overhead", dynamic=False``: CUDA graphs). CUDA only; on CPU it is ignored
    (compilation costs minutes and gains nothing)."""
    if settings.compile and device.type != "cuda":
        log.warning("sam2.compile is ignored on %s (CUDA only)", device)
        return False
    return bool(settings.compile)


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
        self.campaign_queries = resolve_campaign_queries(s.campaign_queries, self.device)
        self._campaign_from_memory: int | None = None  # auto on CUDA: what the last query's size allowed
        self._predictor = None
        self._tracker = None
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
            self.model_info["compiled"] = self.batch_runs and compile_wanted(self.settings, self.device)
        return self._predictor

    @property
    def tracker(self) -> BatchedTracker:
        """The batched tracker (fixed-shape steps; padded to bucket sizes and optionally compiled on CUDA)."""
        if self._tracker is None:
            self._tracker = BatchedTracker(self.predictor, self.max_batch, static_shapes=self.device.type == "cuda",
                                           compile=self.model_info["compiled"], stats=self.stats)
        return self._tracker

    @property
    def image_size(self) -> int:
        return int(self.predictor.image_size)

    def autocast(self):
        """The engine's precision for a block of model calls (none in float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # --- inputs ---------------------------------------------------------------------------------

    def _slices(self, case: Case, axis: int) -> tuple[np.ndarray, np.ndarray | None]:
        img = to_slices(scale_to_uint8_range(case.image.array, self.icfg), axis)
        lab = to_slices(case.label.array, axis) if case.label is not None else None
        return img, lab

    def encode_slices(self, scaled_slices: np.ndarray) -> Features:
        """Image features of scaled slices, batched (counted in ``stats``); the interactive engine uses it too."""
        frames = frames_for_model(scaled_slices, self.image_size)
        with torch.inference_mode(), self.autocast():
            per_frame, pos, sizes = self.predictor.encode_frames(frames, self.feature_batch)
        self.stats["frames_encoded"] += len(per_frame)
        return Features(per_frame, pos, sizes)

    def _support_key(self, s: Case, axis: int):
        return (s.image.path or s.name, s.name, s.image.shape, axis, self.image_size)

    def query_context(self, query: Case, axis: int, encode: bool) -> QueryContext:
        q_scaled, _ = self._slices(query, axis)
        return QueryContext(axis, q_scaled, self.encode_slices(q_scaled) if encode else None)

    def support_context(self, s: Case, q: QueryContext, cached: bool) -> SupportContext:
        """The support on the query's in-plane grid; with ``cached``, its features from the cache."""
        s_scaled, s_lab = self._slices(s, q.axis)
        ctx = SupportContext(s, s_scaled, resize_mask_nearest(s_lab, q.hw))
        if cached:
            ctx.entry = self.supports.entry(self._support_key(s, q.axis), lambda: self.encode_slices(s_scaled))
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
        return self._result(self._begin(supports, query, classes, run_support, progress, cached))

    def _begin(self, supports, query, classes, run_support, progress, cached: bool) -> "_QueryJob":
        """Checks, contexts, insert positions and the per-support calls of one query."""
        classes = tuple(int(c) for c in classes)
        check_supports(supports, classes)
        if query.image.array.ndim != 3:
            raise InputError(query.image.path, "query is not a 3D volume")
        axis = resolve_slice_axis(self.slice_axis, query.image.spacing)
        chosen = self.select_supports(supports)
        t0 = time.perf_counter()
        q = self.query_context(query, axis, encode=cached)
        job = _QueryJob(q, classes, chosen, t0, {c: RunningMean((q.n_slices,) + q.hw, device=self.device)
                                                  for c in classes})
        rng = np.random.default_rng(self.seed)
        for s_case in chosen:
            s = self.support_context(s_case, q, cached)
            job.positions[s_case.name] = insert_positions(q.n_slices, self.n_inserts, rng)
            masks = {c: m for c in classes if (m := s.mask(c)).any()}
            run_support(job, s, job.positions[s_case.name], masks, job.acc)
            if progress:
                progress(len(job.positions[s_case.name]) * len(classes))
        return job

    def _result(self, job: "_QueryJob") -> EngineResult:
        acc, classes, chosen, q = job.acc, job.classes, job.chosen, job.q
        missing = [c for c in classes if acc[c].n == 0]
        if missing:
            raise InputError(None, f"class(es) {missing} appear in none of the supports "
                                   f"{[s.name for s in chosen]}")
        probs = np.stack([from_slices(acc[c].mean, q.axis) for c in classes])  # the one host copy
        meta = {**self.model_info, "engine": self.name, "slice_axis": q.axis,
                "n_inserts": self.n_inserts, "supports_used": [s.name for s in chosen],
                "insert_positions": job.positions, "runs_per_class": {str(c): acc[c].n for c in classes},
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "timings": {"engine_s": round(time.perf_counter() - job.t0, 3)}}
        return EngineResult(probs.astype(np.float32), classes, len(chosen) * self.n_inserts, meta)

    # --- the engine: shared work cached, query frames batched or run by run --------------------------

    def predict(self, supports: Sequence[Case], query: Case, classes: Sequence[int],
                progress: Callable[[int], None] | None = None) -> EngineResult:
        self.predictor  # build (and fail on missing weights) before any work
        if self.batch_runs:
            return self.predict_campaign(supports, [query], classes, progress)[0]
        return self._protocol(supports, query, classes, self._run_support_by_run, progress, cached=True)

    def campaign_size(self) -> int:
        """Queries worth handing to one :meth:`predict_campaign` call (the folder command and the Ray
        workers group their queries by it): 1 run by run; else ``sam2.campaign_queries``; auto on CUDA
        from free device memory and the last query's size (1 before the first query)."""
        if not self.batch_runs:
            return 1
        return self.campaign_queries or self._campaign_from_memory or 1

    def predict_campaign(self, supports: Sequence[Case], queries: Sequence[Case], classes: Sequence[int],
                         progress: Callable[[int], None] | None = None) -> list[EngineResult]:
        """Several queries with the same supports: their runs share the batched steps (queries of one
        in-plane size per track; ``sam2.campaign_queries`` per track, auto = from free CUDA memory),
        the supports' features, prompts and tracked blocks are computed once. Same results as
        :meth:`predict` one query at a time."""
        self.predictor
        if not self.batch_runs:
            return [self.predict(supports, q, classes, progress) for q in queries]
        results: list = [None] * len(queries)
        pending: list = []

        def flush():
            jobs = [job for _, job in pending]
            self._track_jobs(jobs)
            for i, job in pending:
                results[i] = self._result(job)
                if progress:
                    progress(self.work_units(supports, queries[i], classes))
            pending.clear()

        per_track = self.campaign_queries
        for i, query in enumerate(queries):
            job = self._begin(supports, query, classes, self._collect_batched, None, cached=True)
            if pending and (pending[0][1].q.hw != job.q.hw):
                flush()
            pending.append((i, job))
            if per_track is None:
                per_track = self._campaign_from_memory = campaign_queries_for(self.device, job)
            if len(pending) >= per_track:
                flush()
        if pending:
            flush()
        return results

    def new_state(self, source, hw):
        """A fresh tracking state over already encoded frames (one per propagation direction)."""
        return self.predictor.init_state_from_frames(None, hw[0], hw[1], feature_source=source)

    def _prompts(self, q: QueryContext, s: SupportContext, c: int, mask: np.ndarray) -> dict:
        """Outputs + memories of the prompted support frames (by support slice), as ``add_new_mask`` +
        the propagation preflight produce them; independent of the insert position."""
        key = (c, q.hw)
        if key not in s.entry.prompts:
            feats = s.entry.features
            state = self.new_state(SupportOnly(feats, len(feats)), q.hw)
            with torch.inference_mode(), self.autocast():
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

    @staticmethod
    def _block_frames(prompts: dict, n_support: int, reverse: bool) -> range:
        """The support block's frames tracked from the first prompt (forward) / last prompt (backward)."""
        return range(max(prompts), -1, -1) if reverse else range(min(prompts), n_support)

    def _block(self, q: QueryContext, s: SupportContext, c: int, prompts: dict, reverse: bool) -> dict:
        """Non-prompted support frames tracked inside the block (after the first prompt going forward,
        before the last going backward), by support slice; independent of the insert position.
        Run by run, SAM2's own step; the batched engine tracks all missing blocks together
        (:meth:`_track_jobs`)."""
        key = (c, q.hw, q.n_slices, reverse)
        if key not in s.entry.blocks:
            source = SupportOnly(s.entry.features, q.n_slices + s.n_slices)
            output_dict = {"cond_frame_outputs": dict(prompts), "non_cond_frame_outputs": {}}
            with torch.inference_mode(), self.autocast():
                for _ in self._track(self.new_state(source, q.hw), output_dict,
                                     self._block_frames(prompts, s.n_slices, reverse), reverse):
                    pass
            s.entry.blocks[key] = output_dict["non_cond_frame_outputs"]
        return s.entry.blocks[key]

    @staticmethod
    def _query_frames(video: PseudoVideo, reverse: bool) -> range:
        """Forward reaches the query frames after the block, backward those before it."""
        p = video.position
        return range(p - 1, -1, -1) if reverse else range(p + video.n_support, video.length)

    def _run_support_by_run(self, job, s, positions, masks, acc) -> None:
        for p in positions:
            for c, mask in masks.items():
                acc[c].add(self._run_cached(job.q, s, p, c, mask))

    def _run_cached(self, q: QueryContext, s: SupportContext, p: int, c: int, mask) -> torch.Tensor:
        """One run, batch 1: query-slice probabilities (n_query, H, W) on the model's device."""
        prompts = self._prompts(q, s, c, mask)
        video = PseudoVideo(q.n_slices, s.n_slices, p)
        state = self.new_state(VideoFeatures(video, q.features, s.entry.features), q.hw)
        out = torch.empty((q.n_slices,) + q.hw, dtype=torch.float32, device=self.device)
        cond = {video.support_frame(j): o for j, o in prompts.items()}
        with torch.inference_mode(), self.autocast():
            for reverse in (False, True):
                block = self._block(q, s, c, prompts, reverse)
                output_dict = {"cond_frame_outputs": cond,
                               "non_cond_frame_outputs": {video.support_frame(k): o for k, o in block.items()}}
                for f, pred in self._track(state, output_dict, self._query_frames(video, reverse), reverse):
                    out[video.source(f)[1]] = logits_to_prob(pred, q.hw)[0]
        return out

    # --- batched: every run of the query (or campaign) in one track --------------------------------

    def _collect_batched(self, job, s, positions, masks, acc) -> None:
        """Queue this support's runs (tracked later with every other run, :meth:`_track_jobs`)."""
        for c, mask in masks.items():
            job.runs.append((s, c, self._prompts(job.q, s, c, mask), positions))
            acc[c].count(len(positions))

    def _track_jobs(self, jobs: list) -> None:
        """Two batched tracks: every missing support block (all supports x classes x directions),
        then every run of every job (supports x classes x inserts x directions)."""
        tracker = self.tracker
        with torch.inference_mode(), self.autocast():
            blocks = {}
            for job in jobs:
                q = job.q
                for s, c, prompts, _ in job.runs:
                    for reverse in (False, True):
                        key = (c, q.hw, q.n_slices, reverse)
                        if key in s.entry.blocks or (id(s.entry), key) in blocks:
                            continue
                        frames = [f for f in self._block_frames(prompts, s.n_slices, reverse) if f not in prompts]
                        feats = s.entry.features
                        blocks[(id(s.entry), key)] = (s.entry, key, TrackSequence(
                            reverse=reverse, frames=frames, features=lambda f, feats=feats: (feats, f),
                            cond=prompts, non_cond={}, num_frames=q.n_slices + s.n_slices))
            tracker.track([b[2] for b in blocks.values()], keep_outputs=True)
            for entry, key, seq in blocks.values():
                entry.blocks[key] = seq.outputs

            q0 = jobs[0].q
            rows, sequences = 0, []
            for job in jobs:
                q = job.q
                base = {}
                for c in job.classes:
                    base[c], rows = rows, rows + q.n_slices
                for s, c, prompts, positions in job.runs:
                    block = {rev: s.entry.blocks[(c, q.hw, q.n_slices, rev)] for rev in (False, True)}
                    for p in positions:
                        video = PseudoVideo(q.n_slices, s.n_slices, p)

                        def features(f, video=video, qf=q.features, sf=s.entry.features):
                            kind, i = video.source(f)
                            return (qf if kind == "query" else sf), i

                        cond = {video.support_frame(j): o for j, o in prompts.items()}
                        for reverse in (False, True):
                            frames = list(self._query_frames(video, reverse))
                            sequences.append(TrackSequence(
                                reverse=reverse, frames=frames, features=features, cond=cond,
                                non_cond={video.support_frame(k): o for k, o in block[reverse].items()},
                                num_frames=video.length, acc_rows=[base[c] + video.source(f)[1] for f in frames]))
                job.base = base
            acc = torch.zeros((rows + 1,) + q0.hw, dtype=torch.float64, device=self.device)
            tracker.track(sequences, acc=acc)
            for job in jobs:
                for c in job.classes:
                    job.acc[c].total += acc[job.base[c]:job.base[c] + job.q.n_slices]

    # --- reference (paper order, stock predictor calls, no caches) ----------------------------------

    def predict_reference(self, supports: Sequence[Case], query: Case, classes: Sequence[int],
                          progress: Callable[[int], None] | None = None) -> EngineResult:
        self.predictor

        def run_support(job, s, positions, masks, acc):
            for p in positions:
                for c, mask in masks.items():
                    acc[c].add(run_reference(self.predictor, self.autocast, job.q, s, p, mask))

        return self._protocol(supports, query, classes, run_support, progress, cached=False)


@dataclass
class _QueryJob:
    """One query in flight: its context, classes, supports, start time, running means, insert
    positions by support, and (batched) the queued runs: (support, class, prompts, positions)."""

    q: QueryContext
    classes: tuple
    chosen: list
    t0: float
    acc: dict
    positions: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)
    base: dict = field(default_factory=dict)


def campaign_queries_for(device: torch.device, job: _QueryJob) -> int:
    """Queries per batched track on CUDA from free device memory: a query's track holds its image
    features, the memory rows of all its runs and its accumulator; a quarter of the free memory, 1..64."""
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, reusable
    frames = job.q.n_slices * max(1, sum(len(p) for _, _, _, p in job.runs)) * 2
    per_query = frames * (2 ** 17 + 4096) + job.q.n_slices * 5 * 2 ** 20
    return int(min(64, max(1, free * 0.25 // per_query)))
