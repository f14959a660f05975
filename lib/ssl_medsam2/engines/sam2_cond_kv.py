"""SAM2's memory attention for a batch of tracked frames, with the conditioning frames' keys and
values computed once instead of once per tracked frame.

In SAM2's memory attention every layer cross-attends from the current frame to the same memory
tokens: ``k = RoPE(k_proj(memory + pos))``, ``v = v_proj(memory)`` (``memory`` does not change across
layers). A conditioning (prompted) frame's memory tokens and their positional encoding are the same
for every frame that attends to them (temporal position 0; RoPE repeats the same spatial frequencies
for every memory frame), so its per-layer keys and values are too. In the TFFS protocol they are
most of the memory — a whole support volume's prompted slices — and every query frame of every run
of that (support, class) attends to them. :class:`CondKV` computes each conditioning frame's keys and
values once per layer and serves them to every later step; only the non-conditioning memories and the
object pointers go through ``k_proj`` / ``v_proj`` / RoPE per step. Everything else is SAM2's own
layer code (self-attention, MLP, norms) and SAM2's own ``apply_rotary_enc``.

The memory itself is the one SAM2's ``_prepare_memory_conditioned_features`` built (see
:mod:`.sam2_batch`); its first ``n_cond * H * W`` tokens are the selected conditioning frames' memories,
in the order ``select_closest_cond_frames`` returns them.

Two ways to compute the cross-attention, the same softmax up to float rounding:

- **fused** (CUDA, and any reduced-precision compute): the conditioning keys/values are concatenated
  with each element's own and go through ``F.scaled_dot_product_attention`` (flash / memory-efficient
  kernels, fp32 softmax accumulators, no score matrix in memory).
- **split** (CPU, float32): one CPU core runs the attention at its matmul peak, so the only savings
  left are in arithmetic. (1) The conditioning keys are the same for the whole batch: all elements'
  queries meet them in one matmul, without copying them once per element. (2) ``v = v_proj(memory)``
  is affine and softmax rows sum to 1, so ``softmax(s) @ v_proj(m) == v_proj(softmax(s) @ m)``: the
  weighted sum runs over the 64-channel memory instead of the 256-channel values (4x fewer
  multiply-adds in that half). The two softmax parts (conditioning, rest) share one row maximum and
  one normaliser, so the result is the softmax over all memory tokens, not an approximation.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from sam2.modeling.position_encoding import apply_rotary_enc


def supports_cond_kv(memory_attention) -> bool:
    """Whether the memory attention has the layout :class:`CondKV` reproduces (SAM2 / SAM2.1 / MedSAM2)."""
    from sam2.modeling.sam.transformer import RoPEAttention

    return bool(getattr(memory_attention, "batch_first", False)) and all(
        isinstance(layer.cross_attn_image, RoPEAttention) and layer.cross_attn_image.rope_k_repeat
        for layer in memory_attention.layers)


def _rope_freqs(attn, n_q: int, device):
    """The attention module's RoPE table for ``n_q`` query tokens (SAM2 recomputes it the same way)."""
    attn.freqs_cis = attn.freqs_cis.to(device)
    if attn.freqs_cis.shape[0] != n_q:
        side = math.sqrt(n_q)
        attn.freqs_cis = attn.compute_cis(end_x=side, end_y=side).to(device)
    return attn.freqs_cis


class CondKV:
    """Per-layer keys/values of conditioning frames, by frame output (kept for one batched track)."""

    #: selections (ordered sets of conditioning frames) whose keys/values are kept; one cache serves one
    #: (support, class): with all prompted frames in attention that is one selection, with a bound
    #: (max_cond_frames_in_attn) one per distinct closest set
    max_selections = 32
    #: the split attention on CPU in float32 (see the module docstring); False = fused everywhere
    split_on_cpu = True
    #: score-matrix elements computed at once by the split attention (floats; 2**24 = 64 MB)
    split_chunk_elements = 2 ** 24

    def __init__(self, memory_attention, device: torch.device):
        self.ma = memory_attention
        self.split = self.split_on_cpu and torch.device(device).type == "cpu"
        # (split, ids of the selected outputs) -> (outputs, per layer: (k, v) fused / (k, memory) split)
        self._sel: OrderedDict = OrderedDict()

    def _selection_kv(self, outs, mem, pos, hw: int, split: bool):
        """(k, v) per layer over the tokens of the selected conditioning frames ``outs`` (in order);
        ``mem``/``pos``: those tokens, (len(outs) * hw, 1, C_mem), as SAM2 assembled them. With
        ``split``, v is the memory itself (``v_proj`` comes after the weighted sum)."""
        key = (split,) + tuple(id(o) for o in outs)
        hit = self._sel.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], outs)):
            self._sel.move_to_end(key)
            return hit[1]
        mem_b, pos_b = mem.transpose(0, 1), pos.transpose(0, 1)  # batch first, as MemoryAttention does
        kv = []
        for layer in self.ma.layers:
            attn = layer.cross_attn_image
            k_in = mem_b + pos_b if layer.pos_enc_at_cross_attn_keys else mem_b
            k = attn._separate_heads(attn.k_proj(k_in), attn.num_heads)
            v = mem_b if split else attn._separate_heads(attn.v_proj(mem_b), attn.num_heads)
            freqs = _rope_freqs(attn, hw, k.device)
            # RoPE repeats the same spatial frequencies for every memory frame; the query argument
            # only sets the table's size (hw tokens) and is discarded
            _, k = apply_rotary_enc(k[:, :, :hw], k, freqs_cis=freqs, repeat_freqs_k=attn.rope_k_repeat)
            kv.append((k, v))
        self._sel[key] = (list(outs), kv)
        while len(self._sel) > self.max_selections:
            self._sel.popitem(last=False)
        return kv

    def attend(self, curr, curr_pos, memories, memory_pos, cond_outputs, hw: int, num_obj_ptr_tokens: int):
        """``memory_attention(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens)`` for a batch.

        ``curr``/``curr_pos``: (HW, B, C); ``memories``/``memory_pos``: per element (N, 1, C_mem) with
        the same N; ``cond_outputs``: per element, the selected conditioning outputs (same count).
        Returns (HW, B, C) like SAM2's memory attention.
        """
        ma = self.ma
        n_cond = len(cond_outputs[0]) * hw
        # the split form in float32 only: under autocast the fused kernels keep the softmax in fp32
        split = self.split and bool(n_cond) and not ma.training and not torch.is_autocast_enabled(curr.device.type)
        cond_kv = [self._selection_kv(outs, mem[:n_cond], pos[:n_cond], hw, split) if n_cond else None
                   for outs, mem, pos in zip(cond_outputs, memories, memory_pos)]
        shared = all(e is cond_kv[0] for e in cond_kv)  # one selection for the whole batch (usual)
        B = len(memories)
        rest = torch.cat([m[n_cond:] for m in memories], dim=1).transpose(0, 1)        # (B, N_rest, C_mem)
        rest_pos = torch.cat([p[n_cond:] for p in memory_pos], dim=1).transpose(0, 1)
        n_rest_rope = rest.shape[1] - num_obj_ptr_tokens

        output = curr
        if ma.pos_enc_at_input and curr_pos is not None:
            output = output + 0.1 * curr_pos
        assert ma.batch_first
        output, query_pos = output.transpose(0, 1), curr_pos.transpose(0, 1)
        for li, layer in enumerate(ma.layers):
            output = layer._forward_sa(output, query_pos)
            # cross-attention (SAM2's MemoryAttentionLayer._forward_ca with RoPEAttention), keys and
            # values of the conditioning tokens from the cache
            attn = layer.cross_attn_image
            tgt2 = layer.norm2(output)
            q_in = tgt2 + query_pos if layer.pos_enc_at_cross_attn_queries else tgt2
            k_in = rest + rest_pos if layer.pos_enc_at_cross_attn_keys else rest
            q = attn._separate_heads(attn.q_proj(q_in), attn.num_heads)
            k = attn._separate_heads(attn.k_proj(k_in), attn.num_heads)
            freqs = _rope_freqs(attn, q.shape[-2], q.device)
            q, k[:, :, :n_rest_rope] = apply_rotary_enc(q, k[:, :, :n_rest_rope], freqs_cis=freqs,
                                                        repeat_freqs_k=attn.rope_k_repeat)
            if split:
                out = _split_attention(attn, q, [e[li] for e in (cond_kv[:1] if shared else cond_kv)], k, rest)
            else:
                v = attn._separate_heads(attn.v_proj(rest), attn.num_heads)
                if n_cond:
                    if shared:
                        k_c, v_c = (x.expand(B, -1, -1, -1) for x in cond_kv[0][li])
                    else:
                        k_c, v_c = (torch.cat([e[li][i] for e in cond_kv]) for i in (0, 1))
                    k, v = torch.cat([k_c, k], dim=2), torch.cat([v_c, v], dim=2)
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout_p if attn.training else 0.0)
            out = attn.out_proj(attn._recombine_heads(out))
            output = output + layer.dropout2(out)
            tgt2 = layer.norm3(output)
            output = output + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(tgt2)))))
        return ma.norm(output).transpose(0, 1)


def _split_attention(attn, q, cond, k_rest, mem_rest):
    """``softmax(q k^T / sqrt(d)) @ v_proj(memory)`` over [conditioning tokens, rest] (split form).

    ``q``: (B, h, Nq, d); ``cond``: one (k (1, h, Nc, d), memory (1, Nc, C)) shared by the batch, or
    one per element; ``k_rest``: (B, h, Nr, d); ``mem_rest``: (B, Nr, C). Returns (B, h, Nq, d_v)
    like the fused attention (before ``_recombine_heads``/``out_proj``).
    """
    B, h, n_q, d = q.shape
    n_c, n_r = cond[0][0].shape[2], k_rest.shape[2]
    scale = d ** -0.5
    w = attn.v_proj.weight.view(h, -1, attn.v_proj.in_features).transpose(-1, -2).unsqueeze(1)  # (h,1,C,dv)
    bias = attn.v_proj.bias.view(h, 1, 1, -1)
    shared = len(cond) == 1
    # elements per chunk: the score matrices stay within split_chunk_elements (one element when each
    # has its own conditioning keys)
    step = max(1, CondKV.split_chunk_elements // (h * n_q * (n_c + n_r))) if shared else 1
    outs = []
    q = q * scale  # scaled once here, not the (much larger) score matrices
    for b0 in range(0, B, step):
        qb = q[b0:b0 + step]
        g = qb.shape[0]
        qh = qb.transpose(0, 1)                                                         # (h, g, Nq, d)
        k_c, m_c = cond[0] if shared else cond[b0]  # (1, h, Nc, d), (1, Nc, C)
        # shared: every element's queries against the same keys, one matmul (rows = g * Nq)
        s_c = torch.matmul(qh.reshape(h, 1, g * n_q, d), k_c.transpose(0, 1).transpose(-1, -2))
        s_r = torch.matmul(qh, k_rest[b0:b0 + g].transpose(0, 1).transpose(-1, -2))        # (h, g, Nq, Nr)
        p_r = s_r.view(h, 1, g * n_q, n_r)
        top = torch.maximum(s_c.amax(-1, keepdim=True), p_r.amax(-1, keepdim=True))
        p_c, p_r = s_c.sub_(top).exp_(), p_r.sub_(top).exp_()                           # (h, 1, g*Nq, N)
        norm = (p_c.sum(-1, keepdim=True) + p_r.sum(-1, keepdim=True)).view(h, g, n_q, 1)
        u = torch.matmul(p_c, m_c).view(h, g, n_q, -1)
        u = (u + torch.matmul(p_r.view(h, g, n_q, n_r), mem_rest[b0:b0 + g])) / norm      # (h, g, Nq, C)
        outs.append((torch.matmul(u, w) + bias).transpose(0, 1))                         # (g, h, Nq, dv)
    return outs[0] if len(outs) == 1 else torch.cat(outs)
