"""Batched tracking: the query frames of many runs through SAM2's memory attention, mask decoder and
memory encoder as one batch per step.

Why this is the same computation as tracking each run alone: SAM2 treats the batch dimension as
independent objects everywhere on the tracking path (memory attention, mask decoder, memory encoder;
``non_overlap_masks_for_mem_enc`` is off, and is refused here when on). What differs per run is the
*memory* each frame attends to: which conditioning frames, which recent non-conditioning frames,
which object pointers, with which temporal encodings. That is built for each element by SAM2's own
``_prepare_memory_conditioned_features`` (batch 1, exactly the stock call), with the memory-attention
module swapped for a recorder for that call only; the recorded memories of all elements that have the
same number of memory tokens and object-pointer tokens are then concatenated along the batch
dimension and go through the memory attention together — with the conditioning frames' per-layer keys
and values computed once (:mod:`.sam2_cond_kv`; SAM2's own module when its layout differs). Elements
with other counts form their own batch in the same step. A sequence that runs out of frames simply
leaves the batch.

For the TFFS protocol one sequence is one direction of one run (support, insert position, class).
All runs of one (support, class) share their prompted frames and tracked support block, and after
the inserted block their memory counts coincide step by step: the 2 x ``n_inserts`` sequences of a
class advance together. Each step's probabilities go straight to the per-class running sums on the
model's device (no per-frame host copy). A sequence keeps only the outputs its next frames can still
read (SAM2 looks back ``num_maskmem`` memories and ``max_obj_ptrs_in_encoder`` pointers), so memory
is bounded by the number of sequences in flight, not by the query length.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_utils import select_closest_cond_frames

from .sam2_cond_kv import CondKV, supports_cond_kv


def logits_to_prob(pred_masks: torch.Tensor, hw) -> torch.Tensor:
    """Low-res mask logits (B,1,s,s) -> probabilities (B,H,W) on the query's in-plane grid, resized
    as SAM2's ``_get_orig_video_res_output`` resizes them to the video resolution."""
    m = pred_masks.float()
    if tuple(m.shape[-2:]) != tuple(hw):
        m = F.interpolate(m, size=tuple(hw), mode="bilinear", align_corners=False)
    return torch.sigmoid(m)[:, 0]


@dataclass
class TrackSequence:
    """One direction of one run: the video frames to track, in order, and its own output dict.

    ``output_dict`` starts with the conditioning outputs and any already tracked (shared) outputs, by
    video frame; ``source(frame)`` serves the frame's image features; ``slices`` say where each
    frame's probability goes (the query slice).
    """

    reverse: bool
    frames: list
    slices: list
    source: Callable
    output_dict: dict
    num_frames: int
    step: int = 0

    @property
    def done(self) -> bool:
        return self.step >= len(self.frames)


class _MemoryRecorder(torch.nn.Module):
    """Stands in for ``memory_attention`` during one ``_prepare_memory_conditioned_features`` call."""

    def forward(self, curr, memory, curr_pos=None, memory_pos=None, num_obj_ptr_tokens=0):
        self.recorded = (memory, memory_pos, int(num_obj_ptr_tokens))
        return curr[0] if isinstance(curr, list) else curr


@contextlib.contextmanager
def _recording_memory(model):
    real = model._modules["memory_attention"]
    recorder = _MemoryRecorder()
    model._modules["memory_attention"] = recorder
    try:
        yield recorder
    finally:
        model._modules["memory_attention"] = real


@dataclass
class _Item:
    seq: TrackSequence
    frame: int
    feats: list
    pos: list
    sizes: list
    memory: torch.Tensor
    memory_pos: torch.Tensor
    n_ptr: int
    cond: list  # the conditioning outputs SAM2 selected for this frame, in memory order


def memory_window(model) -> int:
    """How far back (in frames) SAM2 can still read a non-conditioning output when tracking."""
    stride = max(1, int(getattr(model, "memory_temporal_stride_for_eval", 1)))
    ptrs = int(model.max_obj_ptrs_in_encoder) if model.use_obj_ptrs_in_encoder else 0
    return max(int(model.num_maskmem) * stride, ptrs) + 1


def new_cond_kv(model) -> CondKV | None:
    """A conditioning-frame key/value cache for ``model`` (None when its memory attention has another
    layout); share one across the tracks that use the same prompted frames."""
    return CondKV(model.memory_attention, model.device) if supports_cond_kv(model.memory_attention) else None


def track_batched(model, sequences: Sequence[TrackSequence], emit: Callable[[list, torch.Tensor], None],
                  max_batch: int, stats: dict | None, cond_kv: CondKV | None) -> None:
    """Advance all ``sequences`` one frame per step, batching elements with equal memory counts.

    ``emit(sequences_and_slices, pred_masks)`` receives, per batch, the list of (sequence, query
    slice) and SAM2's low-res mask logits (B,1,s,s) on the model's device. ``cond_kv``: from
    :func:`new_cond_kv` (None: SAM2's own memory attention).
    """
    if getattr(model, "non_overlap_masks_for_mem_enc", False):
        raise NotImplementedError("batched tracking needs non_overlap_masks_for_mem_enc off "
                                  "(it couples the objects of a batch); use sam2.batch_runs: false")
    window = memory_window(model)
    active = [s for s in sequences if not s.done]
    max_batch = max(1, int(max_batch))
    while active:
        items = []
        with _recording_memory(model) as rec:
            for s in active:
                f = s.frames[s.step]
                feats, pos, sizes = s.source(f)
                model._prepare_memory_conditioned_features(
                    frame_idx=f, is_init_cond_frame=False, current_vision_feats=feats[-1:],
                    current_vision_pos_embeds=pos[-1:], feat_sizes=sizes[-1:], output_dict=s.output_dict,
                    num_frames=s.num_frames, track_in_reverse=s.reverse)
                memory, memory_pos, n_ptr = rec.recorded
                cond, _ = select_closest_cond_frames(f, s.output_dict["cond_frame_outputs"],
                                                     model.max_cond_frames_in_attn)
                items.append(_Item(s, f, feats, pos, sizes, memory, memory_pos, n_ptr, list(cond.values())))
        groups = defaultdict(list)
        for it in items:
            groups[(tuple(it.memory.shape), it.n_ptr, len(it.cond), tuple(map(tuple, it.sizes)))].append(it)
        for group in groups.values():
            for i in range(0, len(group), max_batch):
                _step(model, group[i:i + max_batch], emit, cond_kv)
                if stats is not None:
                    stats["batched_steps"] = stats.get("batched_steps", 0) + 1
        for s in active:
            f = s.frames[s.step]
            s.output_dict["non_cond_frame_outputs"].pop(f + window if s.reverse else f - window, None)
            s.step += 1
        if stats is not None:
            stats["frames_tracked"] = stats.get("frames_tracked", 0) + len(active)
        active = [s for s in active if not s.done]


def _step(model, items: list[_Item], emit, cond_kv: CondKV | None) -> None:
    """One tracked frame for every element of ``items`` (same memory shape): the batched body of
    SAM2's ``track_step`` + ``_run_single_frame_inference`` for non-conditioning frames."""
    B = len(items)
    sizes = items[0].sizes
    feats = [torch.cat([it.feats[lvl] for it in items], dim=1) for lvl in range(len(sizes))]  # (HW, B, C)
    C = model.hidden_dim
    H, W = sizes[-1]
    curr_pos = items[0].pos[-1].expand(-1, B, -1)
    if cond_kv is not None:  # the conditioning frames' keys/values computed once (sam2_cond_kv)
        pix = cond_kv.attend(feats[-1], curr_pos, [it.memory for it in items], [it.memory_pos for it in items],
                             [it.cond for it in items], H * W, items[0].n_ptr)
    else:
        pix = model.memory_attention(
            curr=feats[-1:], curr_pos=[curr_pos], memory=torch.cat([it.memory for it in items], dim=1),
            memory_pos=torch.cat([it.memory_pos for it in items], dim=1), num_obj_ptr_tokens=items[0].n_ptr)
    pix = pix.permute(1, 2, 0).view(B, C, H, W)
    high_res = None
    if len(feats) > 1:
        high_res = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1])]
    _, _, _, low_res, high_res_masks, obj_ptr, obj_scores = model._forward_sam_heads(
        backbone_features=pix, point_inputs=None, mask_inputs=None, high_res_features=high_res,
        multimask_output=model._use_multimask(False, None))
    maskmem, maskmem_pos = (None, None)
    if model.num_maskmem > 0:
        maskmem, maskmem_pos = model._encode_new_memory(
            current_vision_feats=feats, feat_sizes=sizes, pred_masks_high_res=high_res_masks,
            object_score_logits=obj_scores, is_mask_from_pts=False)
        maskmem = maskmem.to(torch.bfloat16)  # as SAM2's video predictor stores memories
        maskmem_pos = [x[0:1] for x in maskmem_pos]  # the same for every frame and object
    pred = low_res
    if getattr(model, "fill_hole_area", 0) > 0:
        from sam2.utils.misc import fill_holes_in_mask_scores

        pred = fill_holes_in_mask_scores(pred, model.fill_hole_area)
    for b, it in enumerate(items):
        it.seq.output_dict["non_cond_frame_outputs"][it.frame] = {
            "maskmem_features": maskmem[b:b + 1] if maskmem is not None else None,
            "maskmem_pos_enc": maskmem_pos,
            "pred_masks": pred[b:b + 1],
            "obj_ptr": obj_ptr[b:b + 1],
            "object_score_logits": obj_scores[b:b + 1],
        }
    emit([(it.seq, it.seq.slices[it.seq.step]) for it in items], pred)
