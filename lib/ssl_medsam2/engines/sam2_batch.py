"""Batched tracking: every sequence of a query (or of several queries) advances together, one SAM2 step
per frame index, over fixed-shape memory tensors.

Why this is the same computation as tracking each sequence alone: SAM2 treats the batch dimension as
independent objects everywhere on the tracking path (memory attention, mask decoder, memory encoder;
``non_overlap_masks_for_mem_enc`` is off, and is refused here when on). What differs per sequence is
the *memory* each frame attends to. That memory is a pure function of frame indices (SAM2's
``_prepare_memory_conditioned_features``: which conditioning frames, which of the last ``num_maskmem
- 1`` frames, which object pointers at which temporal distance), so :func:`_plan` replays SAM2's
index logic on the host once, before the first step, for every step of every sequence, and writes it
down as integer tensors (the *schedule*): rows of

* a **memory bank**: ``mem`` (rows, HW, C_mem) and ``ptr`` (rows, C) on the device, holding every
  memory a track can read — the prompted frames', the already tracked ones' (support block) and one
  preassigned row per frame the track will produce (written in place by the step that produces it);
* a **conditioning table** (:mod:`.sam2_cond_kv`): per prompted frame its per-layer keys/values,
  computed once and shared by every sequence and step that attends to it;
* the **feature pool**: the image features of every query and support slice, once.

A step is then: gather features, ``num_maskmem - 1`` recent memories and the object pointers by index
(missing ones masked), one memory attention with a key-padding mask for the whole batch, SAM2's heads
and memory encoder batched, and three in-place writes (memory, pointer, probability accumulator).
No Python assembly per element, no host round-trip: the schedule lives on the device from the start.
Sequences are sorted longest first, so step ``t``'s batch is a prefix of the schedule's columns.
With ``static_shapes`` (CUDA) the batch is padded to a power of two and the memory capacities to
fixed sizes, so the dense part of the step can run as a CUDA graph (``torch.compile(mode=
"reduce-overhead", dynamic=False)``) without recompiling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sam2.modeling.sam2_utils import get_1d_sine_pe, select_closest_cond_frames

from .sam2_cond_kv import CondTable, _rope_freqs, attend, cond_frame_kv, supports_cond_kv

log = logging.getLogger(__name__)

#: use the split attention (see :mod:`.sam2_cond_kv`) on CPU in float32; False = fused everywhere
SPLIT_ON_CPU = True


def logits_to_prob(pred_masks: torch.Tensor, hw) -> torch.Tensor:
    """Low-res mask logits (B,1,s,s) -> probabilities (B,H,W) on the query's in-plane grid, resized
    as SAM2's ``_get_orig_video_res_output`` resizes them to the video resolution."""
    m = pred_masks.float()
    if tuple(m.shape[-2:]) != tuple(hw):
        m = F.interpolate(m, size=tuple(hw), mode="bilinear", align_corners=False)
    return torch.sigmoid(m)[:, 0]


@dataclass
class TrackSequence:
    """One direction of one run (or one tracked support block): what to track, host bookkeeping only.

    ``frames``: video frame indices in tracking order; ``features(frame)`` -> (Features, slice index);
    ``cond`` / ``non_cond``: SAM2 output dicts by video frame (the prompted frames, and the already
    tracked frames this sequence may read); ``acc_rows``: per frame the row of the track's probability
    accumulator (None: probabilities not kept). With ``keep_outputs``, ``outputs`` receives the tracked
    frames' outputs (memory and pointer) by frame.
    """

    reverse: bool
    frames: list
    features: Callable
    cond: dict
    non_cond: dict
    num_frames: int
    acc_rows: list | None = None
    outputs: dict = field(default_factory=dict)


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass
class _Plan:
    """The schedule of one chunk of sequences (host arrays, (T, S, ...)) and its step batch sizes."""

    n_active: list
    feat: np.ndarray
    cond: np.ndarray
    cond_valid: np.ndarray
    recent: np.ndarray
    ptr: np.ndarray
    ptr_pos: np.ndarray
    ptr_div: np.ndarray
    out: np.ndarray
    acc: np.ndarray


class BatchedTracker:
    """Fixed-shape batched tracking with one SAM2 model (see the module docstring).

    ``max_batch``: sequences per step (None: chosen from free device memory on CUDA);
    ``static_shapes``: pad to bucket sizes (for CUDA graphs); ``compile``: torch.compile the dense
    part of the step (``mode="reduce-overhead", dynamic=False``); ``stats``: counters to add to.
    """

    def __init__(self, model, max_batch: int | None, static_shapes: bool, compile: bool, stats: dict):
        if getattr(model, "non_overlap_masks_for_mem_enc", False):
            raise NotImplementedError("batched tracking needs non_overlap_masks_for_mem_enc off "
                                      "(it couples the objects of a batch); use sam2.batch_runs: false")
        if not supports_cond_kv(model.memory_attention):
            raise NotImplementedError("batched tracking needs SAM2's RoPE memory attention; "
                                      "use sam2.batch_runs: false")
        self.model, self.max_batch, self.static = model, max_batch, static_shapes
        self.stats = stats
        self._dense = self._dense_step
        if compile:
            self._dense = torch.compile(self._dense_step, mode="reduce-overhead", dynamic=False)

    # --- host: the schedule ---------------------------------------------------------------------

    def _plan(self, seqs: list, prow: dict, trow: dict, next_row: int, pad_row: int, acc_trash: int):
        """SAM2's memory selection (``_prepare_memory_conditioned_features``) replayed on indices for
        every step of ``seqs``; returns the chunk's :class:`_Plan` and the next free memory row."""
        m = self.model
        M = m.num_maskmem - 1
        stride = max(1, int(getattr(m, "memory_temporal_stride_for_eval", 1)))
        per_seq = []
        for s in seqs:
            nc = {f: prow[id(o)] for f, o in s.non_cond.items()}
            sign = -1 if s.reverse else 1
            steps = []
            for k, f in enumerate(s.frames):
                sel, unsel = select_closest_cond_frames(f, s.cond, m.max_cond_frames_in_attn)

                def lookup(t):
                    r = nc.get(t)
                    if r is None and t in unsel:
                        r = prow[id(unsel[t])]
                    return r

                recent = []
                for t_pos in range(1, m.num_maskmem):
                    t_rel = m.num_maskmem - t_pos
                    if t_rel == 1:
                        prev = f - t_rel if not s.reverse else f + t_rel
                    elif not s.reverse:
                        prev = ((f - 2) // stride) * stride - (t_rel - 2) * stride
                    else:
                        prev = -(-(f + 2) // stride) * stride + (t_rel - 2) * stride
                    r = lookup(prev)
                    recent.append(-1 if r is None else r)
                ptrs, div = [], 1.0
                if m.use_obj_ptrs_in_encoder:
                    max_ptrs = min(s.num_frames, m.max_obj_ptrs_in_encoder)
                    div = float(max_ptrs - 1)
                    for t, o in sel.items():
                        if m.only_obj_ptrs_in_the_past_for_eval and not (t >= f if s.reverse else t <= f):
                            continue
                        ptrs.append((prow[id(o)], (f - t) * sign if m.use_signed_tpos_enc_to_obj_ptrs else abs(f - t)))
                    for t_diff in range(1, max_ptrs):
                        t = f + t_diff if s.reverse else f - t_diff
                        if t < 0 or t >= s.num_frames:
                            break
                        r = lookup(t)
                        if r is not None:
                            ptrs.append((r, t_diff))
                acc = s.acc_rows[k] if s.acc_rows is not None and s.acc_rows[k] is not None else acc_trash
                steps.append(([trow[id(o)] for o in sel.values()], recent, ptrs, div, next_row, acc,
                              s.features(f)))
                s._rows[f] = next_row
                nc[f] = next_row
                next_row += 1
            per_seq.append(steps)
        T, S = len(per_seq[0]), len(per_seq)
        K = max(len(st[0]) for steps in per_seq for st in steps)
        P = max(len(st[2]) for steps in per_seq for st in steps)
        if self.static:
            S, K, P = _pow2(S), _round_up(K, 8), _round_up(P, 8)
        plan = _Plan(
            n_active=[sum(1 for steps in per_seq if len(steps) > t) for t in range(T)],
            feat=np.zeros((T, S), np.int64), cond=np.full((T, S, K), pad_row, np.int64),
            cond_valid=np.zeros((T, S, K), bool), recent=np.full((T, S, M), -1, np.int64),
            ptr=np.full((T, S, P), -1, np.int64), ptr_pos=np.zeros((T, S, P), np.float32),
            ptr_div=np.ones((T, S), np.float32), out=np.full((T, S), -1, np.int64),
            acc=np.full((T, S), acc_trash, np.int64))
        plan.cond_valid[:, :, 0] = True  # padding elements attend to the table's zero row: finite outputs
        for j, steps in enumerate(per_seq):
            for t, (cond, recent, ptrs, div, out, acc, feat) in enumerate(steps):
                plan.feat[t, j] = feat
                plan.cond[t, j, :len(cond)] = cond
                plan.cond_valid[t, j, :len(cond)] = True
                plan.recent[t, j] = recent
                if ptrs:
                    plan.ptr[t, j, :len(ptrs)] = [r for r, _ in ptrs]
                    plan.ptr_pos[t, j, :len(ptrs)] = [p for _, p in ptrs]
                plan.ptr_div[t, j] = div
                plan.out[t, j] = out
                plan.acc[t, j] = acc
        return plan, next_row

    # --- device: one step -------------------------------------------------------------------------

    def _dense_step(self, feats, curr_pos, mem, rec_valid, rest_pos_mem, ptrs, ptr_pos, ptr_valid,
                    cond_idx, cond_valid, table_k, table_v, groups=None):
        """The fixed-shape part of a step: memory attention, SAM heads, memory encoder."""
        m = self.model
        B, C, Cm = mem.shape[0], m.hidden_dim, m.mem_dim
        hw_mem = rest_pos_mem.shape[0] // (m.num_maskmem - 1)
        H, W = self._sizes[-1]
        if m.add_tpos_enc_to_obj_ptrs:
            obj_pos = m.obj_ptr_tpos_proj(get_1d_sine_pe(ptr_pos, dim=C if m.proj_tpos_enc_in_obj_ptrs else Cm))
        else:
            obj_pos = ptrs.new_zeros(ptrs.shape[0], ptrs.shape[1], Cm)
        r = C // Cm if Cm < C else 1
        ptr_tokens = ptrs.reshape(B, -1, Cm)
        rest = torch.cat([mem.reshape(B, -1, Cm).float(), ptr_tokens.float()], dim=1)
        rest_pos = torch.cat([rest_pos_mem.expand(B, -1, -1), obj_pos.repeat_interleave(r, dim=1).to(rest_pos_mem.dtype)], 1)
        rest_valid = torch.cat([rec_valid.repeat_interleave(hw_mem, dim=1), ptr_valid.repeat_interleave(r, dim=1)], 1)
        table = _TableView(table_k, table_v, self._split)
        pix = attend(m.memory_attention, table, feats[-1], curr_pos, cond_idx, cond_valid, rest, rest_pos,
                     rest_valid, mem.shape[1] * hw_mem, groups)
        pix = pix.permute(1, 2, 0).reshape(B, C, H, W)
        high_res = None
        if len(feats) > 1:
            high_res = [x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], self._sizes[:-1])]
        _, _, _, low_res, high_res_masks, obj_ptr, obj_scores = m._forward_sam_heads(
            backbone_features=pix, point_inputs=None, mask_inputs=None, high_res_features=high_res,
            multimask_output=m._use_multimask(False, None))
        maskmem, _ = m._encode_new_memory(current_vision_feats=feats, feat_sizes=self._sizes,
                                          pred_masks_high_res=high_res_masks, object_score_logits=obj_scores,
                                          is_mask_from_pts=False)
        return low_res, maskmem, obj_ptr

    # --- the track ----------------------------------------------------------------------------------

    def track(self, sequences: Sequence[TrackSequence], acc: torch.Tensor | None = None,
              hw=None, keep_outputs: bool = False) -> None:
        """Track every frame of every sequence; probabilities go to ``acc`` (rows, H, W) at the rows the
        sequences name (``hw`` = (H, W)); its last row collects what is not kept."""
        m = self.model
        if m.num_maskmem < 2:
            raise NotImplementedError("batched tracking needs num_maskmem >= 2")
        seqs = sorted((s for s in sequences if s.frames), key=lambda s: -len(s.frames))
        if not seqs:
            return
        dev = m.device
        for s in seqs:
            s._rows = {}
        # the memory bank: every output the sequences can read, then one row per frame to track
        prow, old = {}, []
        for s in seqs:
            for o in list(s.cond.values()) + list(s.non_cond.values()):
                if id(o) not in prow:
                    prow[id(o)] = len(old)
                    old.append(o)
        n_new = sum(len(s.frames) for s in seqs)
        trash = len(old) + n_new
        first = old[0]["maskmem_features"]
        Cm, Hm, Wm = first.shape[1:]
        mem_pool = torch.empty((trash + 1, Hm * Wm, Cm), dtype=torch.bfloat16, device=dev)
        mem_pool[:len(old)] = torch.cat([o["maskmem_features"].flatten(2).transpose(1, 2) for o in old])
        mem_pool[trash:] = 0
        ptr_pool = torch.zeros((trash + 1, m.hidden_dim), dtype=torch.float32, device=dev)
        ptr_pool[:len(old)] = torch.cat([o["obj_ptr"].float() for o in old])
        pos_enc = old[0]["maskmem_pos_enc"]
        pe = pos_enc[-1].flatten(2).transpose(1, 2).float()                       # (1, HW, C_mem)
        tpos = m.maskmem_tpos_enc                                                 # (num_maskmem, 1, 1, C_mem)
        M = m.num_maskmem - 1
        rest_pos_mem = torch.cat([pe[0] + tpos[m.num_maskmem - t_pos - 1, 0] for t_pos in range(1, m.num_maskmem)])
        # the conditioning table: per prompted frame its keys/values, computed once and kept with it
        self._split = SPLIT_ON_CPU and dev.type == "cpu" and not torch.is_autocast_enabled("cpu")
        trow, conds = {}, []
        for s in seqs:
            for o in s.cond.values():
                if id(o) not in trow:
                    trow[id(o)] = len(conds)
                    conds.append(o)
        cache_key = ("_cond_kv", self._split, torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None)
        todo = [o for o in conds if cache_key not in o]
        if todo:
            mem = torch.cat([o["maskmem_features"].flatten(2).transpose(1, 2) for o in todo]).float()
            kv = cond_frame_kv(m.memory_attention, mem, (pe + tpos[m.num_maskmem - 1, 0]).expand_as(mem), self._split)
            for i, o in enumerate(todo):
                o[cache_key] = [(k[i:i + 1], v[i:i + 1]) for k, v in kv]
        table = CondTable(m.memory_attention, [o[cache_key] for o in conds], self._split,
                          pad_rows=_pow2(len(conds) + 1) if self.static else 0)
        for layer in m.memory_attention.layers:  # RoPE tables set before the steps (no module mutation in them)
            _rope_freqs(layer.cross_attn_image, Hm * Wm, dev)
        # the feature pool: every slice's image features once
        fids, fobjs = {}, []
        for s in seqs:
            for f in s.frames:
                feats, _ = s.features(f)
                if id(feats) not in fids:
                    fids[id(feats)] = sum(len(x) for x in fobjs)
                    fobjs.append(feats)
        self._sizes = fobjs[0].sizes
        n_levels = len(self._sizes)
        feat_pool = [torch.cat([fr[lvl] for x in fobjs for fr in x.per_frame], dim=1) for lvl in range(n_levels)]
        pos = fobjs[0].pos
        if acc is None:
            acc = torch.zeros((1,) + tuple(hw or (1, 1)), dtype=torch.float64, device=dev)
        acc_trash = acc.shape[0] - 1

        def feature_row(s):
            inner = s.features
            return lambda f: (lambda x: fids[id(x[0])] + x[1])(inner(f))

        max_batch = self.max_batch or auto_max_batch(m, Hm * Wm, max(len(s.cond) for s in seqs))
        next_row = len(old)
        for c0 in range(0, len(seqs), max_batch):
            chunk = seqs[c0:c0 + max_batch]
            for s in chunk:
                s._features, s.features = s.features, feature_row(s)
            try:
                plan, next_row = self._plan(chunk, prow, trow, next_row, len(conds), acc_trash)
            finally:
                for s in chunk:
                    s.features = s._features
            self._run_plan(plan, feat_pool, pos, mem_pool, ptr_pool, rest_pos_mem, table, acc, trash, M)
        if keep_outputs:
            for s in seqs:
                for f, row in s._rows.items():
                    s.outputs[f] = {"maskmem_features": mem_pool[row].transpose(0, 1).reshape(1, Cm, Hm, Wm).clone(),
                                    "maskmem_pos_enc": pos_enc, "obj_ptr": ptr_pool[row:row + 1].clone(),
                                    "pred_masks": None, "object_score_logits": None}
        for s in seqs:
            del s._rows

    def _run_plan(self, plan: _Plan, feat_pool, pos, mem_pool, ptr_pool, rest_pos_mem, table, acc, trash, M):
        m = self.model
        dev = m.device
        d = {k: torch.from_numpy(getattr(plan, k)).to(dev) for k in
             ("feat", "cond", "cond_valid", "recent", "ptr", "ptr_pos", "ptr_div", "out", "acc")}
        d["out"] = torch.where(d["out"] < 0, trash, d["out"])  # padding elements write to the trash row
        S = plan.feat.shape[1]
        hw = acc.shape[1:]
        for t, n in enumerate(plan.n_active):
            B = min(_pow2(n), S) if self.static else n
            fi = d["feat"][t, :B]
            feats = [p.index_select(1, fi) for p in feat_pool]
            curr_pos = pos[-1].expand(-1, B, -1)
            rec = d["recent"][t, :B]
            mem = mem_pool[rec.clamp(min=0)]                                      # (B, M, HW, C_mem)
            pr = d["ptr"][t, :B]
            ptrs = ptr_pool[pr.clamp(min=0)]                                      # (B, P, C)
            ptr_pos = d["ptr_pos"][t, :B] / d["ptr_div"][t, :B, None]
            groups = None
            if self._split:  # host grouping by conditioning set (from the host schedule: no device sync)
                keys = {}
                for j in range(B):
                    keys.setdefault(tuple(plan.cond[t, j][plan.cond_valid[t, j]]), []).append(j)
                groups = [(torch.tensor(e), torch.tensor(k)) for k, e in keys.items()]
            low_res, maskmem, obj_ptr = self._dense(
                feats, curr_pos, mem, rec >= 0, rest_pos_mem, ptrs, ptr_pos, pr >= 0,
                d["cond"][t, :B], d["cond_valid"][t, :B], table.k, table.v, groups)
            rows = d["out"][t, :B]
            mem_pool.index_copy_(0, rows, maskmem.flatten(2).transpose(1, 2).to(mem_pool.dtype))
            ptr_pool.index_copy_(0, rows, obj_ptr.to(ptr_pool.dtype))
            pred = low_res
            if getattr(m, "fill_hole_area", 0) > 0:
                from sam2.utils.misc import fill_holes_in_mask_scores

                pred = fill_holes_in_mask_scores(pred, m.fill_hole_area)
            acc.index_add_(0, d["acc"][t, :B], logits_to_prob(pred, hw).to(acc.dtype))
            self.stats["batched_steps"] = self.stats.get("batched_steps", 0) + 1
            self.stats["frames_tracked"] = self.stats.get("frames_tracked", 0) + n


class _TableView:
    """The conditioning table's tensors as the dense step receives them (arguments, not attributes,
    so a compiled step does not guard on which track's table it reads)."""

    def __init__(self, k, v, split):
        self.k, self.v, self.split = k, v, split


def auto_max_batch(model, hw_tokens: int, cond_frames: int) -> int:
    """Sequences per step from free device memory (CUDA): the fused attention gathers each element's
    conditioning keys and values next to its own, 4 layers one after the other; half the free memory,
    a power of two in 8..1024. CPU: 8."""
    if model.device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(model.device)
    tokens = (_round_up(cond_frames, 8) + model.num_maskmem) * hw_tokens
    per_element = tokens * 256 * 2 * 2 * 3 + 64 * 2 ** 20  # k and v, bf16, gathered + concatenated + slack
    n = int(free * 0.5 // per_element)
    return int(min(1024, max(8, 1 << max(0, n.bit_length() - 1))))
