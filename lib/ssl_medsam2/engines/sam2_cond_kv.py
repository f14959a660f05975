"""SAM2's memory attention for a whole batch of tracked frames over fixed-shape memory tensors, with the
conditioning frames' keys and values computed once per prompted frame.

In SAM2's memory attention every layer cross-attends from the current frame to the memory tokens:
``k = RoPE(k_proj(memory + pos))``, ``v = v_proj(memory)``. A conditioning (prompted) frame's memory
tokens and positional encoding are the same for every frame that attends to it (temporal position 0;
RoPE repeats the same spatial frequencies for every memory frame), so its per-layer keys and values
are too: :func:`cond_frame_kv` computes them once per prompted frame (kept with that frame's output,
so they live as long as the support's cache entry) and :class:`CondTable` stacks the ones a track
uses. Each element of a batch names its conditioning frames by index into that table (a padded index
row + validity mask); its own recent memories and object pointers (``rest``) come as one padded
tensor with a key-padding mask (:mod:`.sam2_batch`). Softmax attention does not depend on the order
of its keys, and a masked key adds exactly nothing, so this is SAM2's attention over exactly the
tokens SAM2 would have concatenated. Everything else is SAM2's own layer code (self-attention, MLP,
norms) and SAM2's own ``apply_rotary_enc``.

Two ways to compute the cross-attention, the same softmax up to float rounding:

- **fused** (CUDA, and any reduced-precision compute): every element's conditioning keys/values are
  gathered from the table next to its own, and one ``F.scaled_dot_product_attention`` with the key
  mask runs the whole batch (memory-efficient kernels, fp32 softmax accumulators).
- **split** (CPU, float32): one CPU core runs the attention at its matmul peak, so the only savings
  left are in arithmetic. (1) Elements with the same conditioning frames (one (support, class) and,
  with a bound, the same closest set) meet them in one matmul without copies. (2) ``v = v_proj(m)``
  is affine and softmax rows sum to 1, so ``softmax(s) @ v_proj(m) == v_proj(softmax(s) @ m)``: the
  weighted sum runs over the 64-channel memory instead of the 256-channel values. The two softmax
  parts (conditioning, rest) share one row maximum and one normaliser: the exact softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sam2.modeling.position_encoding import apply_rotary_enc


def supports_cond_kv(memory_attention) -> bool:
    """Whether the memory attention has the layout this module reproduces (SAM2 / SAM2.1 / MedSAM2)."""
    from sam2.modeling.sam.transformer import RoPEAttention

    return bool(getattr(memory_attention, "batch_first", False)) and all(
        isinstance(layer.cross_attn_image, RoPEAttention) and layer.cross_attn_image.rope_k_repeat
        for layer in memory_attention.layers)


def _rope_freqs(attn, n_q: int, device):
    """The attention module's RoPE table for ``n_q`` query tokens (SAM2 recomputes it the same way)."""
    if attn.freqs_cis.device != torch.device(device) or attn.freqs_cis.shape[0] != n_q:
        side = math.sqrt(n_q)
        freqs = attn.freqs_cis if attn.freqs_cis.shape[0] == n_q else attn.compute_cis(end_x=side, end_y=side)
        attn.freqs_cis = freqs.to(device)
    return attn.freqs_cis


def cond_frame_kv(memory_attention, mem: torch.Tensor, pos: torch.Tensor, split: bool) -> list:
    """Per layer (k, v) of conditioning frames: ``mem``/``pos`` (N, HW, C_mem) -> k (N, h, HW, d) and
    v (N, h, HW, d_v) fused, or v = the memory itself (N, HW, C_mem) split (``v_proj`` comes later)."""
    hw = mem.shape[1]
    kv = []
    for layer in memory_attention.layers:
        attn = layer.cross_attn_image
        k_in = mem + pos if layer.pos_enc_at_cross_attn_keys else mem
        k = attn._separate_heads(attn.k_proj(k_in), attn.num_heads)
        freqs = _rope_freqs(attn, hw, k.device)
        _, k = apply_rotary_enc(k, k, freqs_cis=freqs, repeat_freqs_k=False)  # one frame: no repeat
        v = mem if split else attn._separate_heads(attn.v_proj(mem), attn.num_heads)
        kv.append((k, v))
    return kv


class CondTable:
    """The conditioning frames one track reads, stacked: per layer k (NF, h, HW, d) and v, row NF
    being zeros (what padded index entries point at; masked anyway)."""

    def __init__(self, memory_attention, per_frame: list, split: bool, pad_rows: int = 0):
        n_layers = len(memory_attention.layers)
        self.split = split
        self.k, self.v = [], []
        for li in range(n_layers):
            ks = [f[li][0] for f in per_frame]
            vs = [f[li][1] for f in per_frame]
            n_pad = max(1, pad_rows - len(ks))
            self.k.append(torch.cat(ks + [torch.zeros_like(ks[0][:1]).expand(n_pad, *ks[0].shape[1:])]))
            self.v.append(torch.cat(vs + [torch.zeros_like(vs[0][:1]).expand(n_pad, *vs[0].shape[1:])]))


def attend(ma, table: CondTable, curr, curr_pos, cond_idx, cond_valid, rest, rest_pos, rest_valid,
           n_rest_rope: int, groups=None):
    """``memory_attention(curr, memory, ...)`` for a batch over fixed-shape memory tensors.

    ``curr``/``curr_pos``: (HW, B, C); ``cond_idx``/``cond_valid``: (B, K) rows of ``table`` and their
    mask; ``rest``/``rest_pos``: (B, N_rest, C_mem) (recent memories, then object-pointer tokens) with
    ``rest_valid`` (B, N_rest); the first ``n_rest_rope`` rest tokens are memory frames (RoPE).
    ``groups`` (split form only): host list of (element index tensor, table row index tensor) with the
    same conditioning frames. Returns (HW, B, C) like SAM2's memory attention.
    """
    output = curr
    if ma.pos_enc_at_input and curr_pos is not None:
        output = output + 0.1 * curr_pos
    output, query_pos = output.transpose(0, 1), curr_pos.transpose(0, 1)
    B, hw = output.shape[0], output.shape[1]
    for li, layer in enumerate(ma.layers):
        output = layer._forward_sa(output, query_pos)
        attn = layer.cross_attn_image
        tgt2 = layer.norm2(output)
        q_in = tgt2 + query_pos if layer.pos_enc_at_cross_attn_queries else tgt2
        k_in = rest + rest_pos if layer.pos_enc_at_cross_attn_keys else rest
        q = attn._separate_heads(attn.q_proj(q_in), attn.num_heads)
        k = attn._separate_heads(attn.k_proj(k_in), attn.num_heads)
        freqs = _rope_freqs(attn, q.shape[-2], q.device)
        q, k_rope = apply_rotary_enc(q, k[:, :, :n_rest_rope], freqs_cis=freqs, repeat_freqs_k=attn.rope_k_repeat)
        k = torch.cat([k_rope, k[:, :, n_rest_rope:]], dim=2)
        if table.split:
            out = torch.empty(B, attn.num_heads, hw, attn.internal_dim // attn.num_heads,
                              dtype=q.dtype, device=q.device)
            for elems, rows in groups:
                out[elems] = _split_attention(attn, q[elems], table.k[li][rows], table.v[li][rows],
                                              k[elems], rest[elems], rest_valid[elems])
        else:
            v = attn._separate_heads(attn.v_proj(rest), attn.num_heads)
            h, K = k.shape[1], cond_idx.shape[1]
            k_c = table.k[li][cond_idx]                                  # (B, K, h, HW, d)
            v_c = table.v[li][cond_idx]
            k_c = k_c.permute(0, 2, 1, 3, 4).reshape(B, h, K * hw, -1)
            v_c = v_c.permute(0, 2, 1, 3, 4).reshape(B, h, K * hw, -1)
            mask = torch.cat([cond_valid.repeat_interleave(hw, dim=1), rest_valid], dim=1)[:, None, None, :]
            out = F.scaled_dot_product_attention(q, torch.cat([k_c, k.to(k_c.dtype)], 2),
                                                 torch.cat([v_c, v.to(v_c.dtype)], 2), attn_mask=mask)
        out = attn.out_proj(attn._recombine_heads(out))
        output = output + layer.dropout2(out)
        tgt2 = layer.norm3(output)
        output = output + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(tgt2)))))
    return ma.norm(output).transpose(0, 1)


#: score-matrix elements the split attention computes at once (floats; 2**24 = 64 MB)
SPLIT_CHUNK_ELEMENTS = 2 ** 24


def _split_attention(attn, q, k_c, m_c, k_rest, mem_rest, rest_valid):
    """``softmax(q k^T / sqrt(d)) @ v_proj(memory)`` over [conditioning tokens, rest] (split form).

    ``q``: (g, h, Nq, d); ``k_c`` (n, h, HW, d) / ``m_c`` (n, HW, C): the shared conditioning frames;
    ``k_rest``: (g, h, Nr, d); ``mem_rest``: (g, Nr, C); ``rest_valid``: (g, Nr). Returns (g, h, Nq, d_v).
    """
    G, h, n_q, d = q.shape
    k_c = k_c.transpose(0, 1).reshape(1, h, -1, d)                       # (1, h, Nc, d)
    m_c = m_c.reshape(1, -1, m_c.shape[-1])                              # (1, Nc, C)
    n_c, n_r = k_c.shape[2], k_rest.shape[2]
    w = attn.v_proj.weight.view(h, -1, attn.v_proj.in_features).transpose(-1, -2).unsqueeze(1)  # (h,1,C,dv)
    bias = attn.v_proj.bias.view(h, 1, 1, -1)
    step = max(1, SPLIT_CHUNK_ELEMENTS // (h * n_q * (n_c + n_r)))
    outs = []
    q = q * d ** -0.5  # scaled once here, not the (much larger) score matrices
    for b0 in range(0, G, step):
        qh = q[b0:b0 + step].transpose(0, 1)                                            # (h, g, Nq, d)
        g = qh.shape[1]
        s_c = torch.matmul(qh.reshape(h, 1, g * n_q, d), k_c.transpose(0, 1).transpose(-1, -2))
        s_r = torch.matmul(qh, k_rest[b0:b0 + g].transpose(0, 1).transpose(-1, -2))        # (h, g, Nq, Nr)
        s_r = s_r.masked_fill(~rest_valid[b0:b0 + g][None, :, None, :], float("-inf"))
        p_r = s_r.view(h, 1, g * n_q, n_r)
        top = torch.maximum(s_c.amax(-1, keepdim=True), p_r.amax(-1, keepdim=True))
        p_c, p_r = s_c.sub_(top).exp_(), p_r.sub_(top).exp_()                           # (h, 1, g*Nq, N)
        norm = (p_c.sum(-1, keepdim=True) + p_r.sum(-1, keepdim=True)).view(h, g, n_q, 1)
        u = torch.matmul(p_c, m_c).view(h, g, n_q, -1)
        u = (u + torch.matmul(p_r.view(h, g, n_q, n_r), mem_rest[b0:b0 + g])) / norm      # (h, g, Nq, C)
        outs.append((torch.matmul(u, w) + bias).transpose(0, 1))                         # (g, h, Nq, dv)
    return outs[0] if len(outs) == 1 else torch.cat(outs)
