"""Gradients of the optimized attention calls: the reference's, recomputed block-sparsely.

The kernels compute the forward pass only. When grad mode is on and q, k or v
requires grad, :func:`prism.optimized.block_sparse_attention` and
:func:`prism.optimized.prism_attention` (and the packed
:func:`~prism.optimized.varlen.prism_attention_varlen` and
:func:`~prism.optimized.varlen.block_sparse_attention_varlen`, per sequence)
return outputs whose backward recomputes contract §7's softmax in torch over
each query tile's selected key tiles only (:func:`attention_gradients`) and
applies the softmax's gradient formulas, so that the gradients are the
reference's (up to fp32 rounding) for the same tile mask:

* the tile mask is a constant (selection is a discrete choice: no gradient
  flows through it, in the reference either);
* the work and memory follow the mask's density: a chunk of query tiles
  gathers its selected key tiles (as many slots as the fullest row), and the
  chunk's blocks are freed before the next;
* ``dq``, ``dk`` and ``dv`` come in the inputs' dtypes; rows with no key to
  read give zero gradients.

fp32 torch operations, not a fused kernel: meant for fine-tuning experiments
and gradient checks more than for training at scale (docs/performance.rst,
"Gradients", has its measured cost). Calls made under ``torch.no_grad()``, or
on inputs that do not require grad, never come here.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

from prism.reference.indices import mask_to_indices
from prism.reference.tile_mask import TileMask
from prism.reference.tiles import tile_layout


def needs_gradients(*tensors: torch.Tensor) -> bool:
    """Whether an attention call must return outputs that carry a backward."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in tensors)


def _shapes_only(t: torch.Tensor) -> bool:
    """Whether ``t``'s values cannot be read on the host: Dynamo or AOTAutograd tracing
    (fake tensors), or a CUDA stream being captured."""
    return (torch.compiler.is_compiling() or is_fake(t)
            or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


#: Bytes of one fp32 (query rows x gathered keys) block, over all heads of the
#: batch, that a chunk of query tiles aims at.
CHUNK_BYTES = 256 * 2**20


def attention_gradients(q, k, v, block_mask, block_size: int, causal: bool, scale, grad_out,
                        grad_lse, needs=(True, True, True)):
    """``(dq, dk, dv)`` of contract §7's output (and log-sum-exp) for one tile mask.

    ``grad_out`` (B, Hq, Nq, Dv) and ``grad_lse`` (B, Hq, Nq) are the incoming
    gradients (either may be None: zero). ``needs`` says which of the three to
    return (the others are None).

    Block-sparse, in torch: each query tile reads only its selected key tiles,
    gathered (``mask_to_indices``; as many slots as the fullest row of the
    mask, every tile while tracing, where that count is not known), so the work
    follows the density. Per chunk of query tiles, with ``P`` the softmax over
    a row's allowed keys (tile selected, key inside ``Nk``, causally at or
    before the query's position; 0 in rows with none), ``O = P V`` and
    ``dS = P * (dO V^T - rowsum(dO * O) + dlse)``: ``dq = scale * dS K``,
    ``dk = scale * dS^T Q``, ``dv = P^T dO``, the last two added into each
    key's row of its KV head. fp32 throughout; plain tensor operations (no
    nested autograd), so AOTAutograd traces it too. Nothing is detached: under
    ``create_graph=True`` autograd records these operations on q, k, v and the
    incoming gradients, so second derivatives (a gradient penalty, a
    Hessian-vector product) are those of the recomputed softmax, the
    reference's; otherwise the backward runs without grad mode and records
    nothing.
    """
    b, hq, nq, d = q.shape
    hkv, nk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    bs = block_size
    layout = tile_layout(nq, nk, bs, causal)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask = _plain(block_mask)
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    mask = mask.expand(b, hq, nqt, nkt)
    if 0 in (b, hq, nq, nk):  # no score: every gradient is zero
        return tuple(None if not need else torch.zeros_like(t)
                     for t, need in zip((q, k, v), needs, strict=True))
    num, idx = mask_to_indices(mask)
    width = nkt if _shapes_only(num) else max(1, int(num.max()))
    idx = idx[..., :width]
    # Query rows laid out in whole tiles of the absolute grid (contract §2).
    lead = layout.query_start - layout.first_query_tile * bs
    padded = nqt * bs

    def tiles(x):  # (B, Hq, Nq, X) rows -> (B, Hq, nqt * bs, X) fp32, zero padded
        out = x.new_zeros((b, hq, padded, x.shape[-1]), dtype=torch.float32)
        out[:, :, lead:lead + nq] = x.float()
        return out

    qt = tiles(q)
    go = tiles(grad_out) if grad_out is not None else None
    gl = tiles(grad_lse.unsqueeze(-1))[..., 0] if grad_lse is not None else None
    kf, vf = k.float(), v.float()
    dq = torch.zeros_like(qt) if needs[0] else None
    dk = torch.zeros_like(kf) if needs[1] else None
    dv = torch.zeros_like(vf) if needs[2] else None
    rows = torch.arange(padded, device=q.device)
    positions = layout.first_query_tile * bs + rows
    row_ok = (rows >= lead) & (rows < lead + nq)
    slots = torch.arange(width, device=q.device)
    offsets = torch.arange(bs, device=q.device)
    batch = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    kv_head = (torch.arange(hq, device=q.device) // group).view(1, hq, 1, 1)
    keys = width * bs
    per_tile = 4 * b * hq * bs * keys
    step = max(1, CHUNK_BYTES // max(1, per_tile))
    for t0 in range(0, nqt, step):
        t1 = min(nqt, t0 + step)
        c = t1 - t0
        sel = idx[:, :, t0:t1]  # (B, Hq, c, W)
        slot_ok = slots < num[:, :, t0:t1, None]
        token = (sel.clamp_min(0)[..., None] * bs + offsets).reshape(b, hq, c, keys)
        token_ok = (slot_ok[..., None] & (sel[..., None] * bs + offsets < nk)).reshape(
            b, hq, c, keys)
        token = token.clamp_max(nk - 1)
        r = slice(t0 * bs, t1 * bs)
        allowed = token_ok[:, :, :, None, :] & row_ok[r].view(1, 1, c, bs, 1)
        if causal:
            allowed = allowed & (token[:, :, :, None, :]
                                 <= positions[r].view(1, 1, c, bs, 1))
        k_sel = kf[batch, kv_head, token]  # (B, Hq, c, W * bs, D)
        v_sel = vf[batch, kv_head, token]
        q_rows = qt[:, :, r].reshape(b, hq, c, bs, d)
        scores = torch.matmul(q_rows, k_sel.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        weights = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, 0.0))
        total = weights.sum(dim=-1, keepdim=True)
        p = weights / torch.where(total > 0, total, 1.0)  # rows without a key stay 0
        d_scores = 0.0  # dS, formed by the terms present (no zero block to add to)
        if go is not None:
            g_out = go[:, :, r].reshape(b, hq, c, bs, dv_dim)
            out = torch.matmul(p, v_sel)
            d_p = torch.matmul(g_out, v_sel.transpose(-1, -2))
            d_scores = p * (d_p - (g_out * out).sum(dim=-1, keepdim=True))
            if dv is not None:
                dv.index_put_((batch, kv_head, token), torch.matmul(p.transpose(-1, -2), g_out),
                              accumulate=True)
        if gl is not None:
            d_scores = d_scores + p * gl[:, :, r].reshape(b, hq, c, bs, 1)
        if not isinstance(d_scores, torch.Tensor):  # neither gradient given
            d_scores = torch.zeros_like(p)
        if dq is not None:
            dq[:, :, r] = (torch.matmul(d_scores, k_sel) * scale).reshape(b, hq, c * bs, d)
        if dk is not None:
            dk.index_put_((batch, kv_head, token),
                          torch.matmul(d_scores.transpose(-1, -2), q_rows) * scale,
                          accumulate=True)
    if dq is not None:
        dq = dq[:, :, lead:lead + nq]
    return tuple(None if g is None else g.to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))


class _KernelAttention(torch.autograd.Function):
    """The kernels' forward output, the reference's gradients (module docstring): one
    dense call (``ranges`` None, one mask) or a packed batch (each sequence's
    ``(q0, q1, k0, k1)`` rows and mask)."""

    @staticmethod
    def forward(ctx, q, k, v, forward, ranges, masks, block_size, causal, scale):
        out, lse = forward()
        ctx.save_for_backward(q, k, v, *masks)
        ctx.options = (ranges, block_size, causal, scale)
        ctx.set_materialize_grads(False)
        if lse is None:
            return out
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse=None):
        q, k, v, *masks = ctx.saved_tensors
        ranges, block_size, causal, scale = ctx.options
        needs = ctx.needs_input_grad[:3]
        if ranges is None:
            grads = attention_gradients(q, k, v, masks[0], block_size, causal, scale, grad_out,
                                        grad_lse, needs)
        else:
            grads = _packed_gradients(q, k, v, ranges, masks, block_size, causal, scale,
                                      grad_out, grad_lse, needs)
        return (*grads, None, None, None, None, None, None)


def _packed_gradients(q, k, v, ranges, masks, block_size, causal, scale, grad_out, grad_lse,
                      needs):
    """:func:`attention_gradients` per sequence of a packed batch ((tokens, H, D) rows)."""
    totals = [torch.zeros_like(t) if need else None for t, need in zip((q, k, v), needs,
                                                                     strict=True)]

    def heads(x, lo, hi):  # (tokens, H, D) rows lo:hi as (1, H, n, D)
        return x[lo:hi].transpose(0, 1).unsqueeze(0)

    for (q0, q1, k0, k1), mask in zip(ranges, masks, strict=True):
        if q1 == q0 or k1 == k0:
            continue
        grads = attention_gradients(
            heads(q, q0, q1), heads(k, k0, k1), heads(v, k0, k1), mask, block_size, causal,
            scale, None if grad_out is None else heads(grad_out, q0, q1),
            None if grad_lse is None else grad_lse[:, q0:q1].unsqueeze(0), needs)
        for total, grad, (lo, hi) in zip(totals, grads, ((q0, q1), (k0, k1), (k0, k1)),
                                         strict=True):
            if total is not None:
                total[lo:hi] += grad[0].transpose(0, 1)
    return totals


def _plain(mask):
    return (mask.as_tensor() if isinstance(mask, TileMask) else mask).detach()


def with_gradients(q, k, v, block_mask, forward, *, block_size: int, causal: bool, scale):
    """``forward()`` (returning ``(out, lse or None)``, computed by the kernels) as outputs
    whose backward gives the reference's gradients: ``out``, or ``(out, lse)``."""
    return _KernelAttention.apply(q, k, v, forward, None, [_plain(block_mask)], block_size,
                                  causal, scale)


def with_packed_gradients(q, k, v, ranges, masks, forward, *, block_size: int, causal: bool,
                          scale):
    """:func:`with_gradients` for a packed batch, (tokens, H, D) tensors: ``ranges``
    holds each sequence's ``(q0, q1, k0, k1)`` rows, ``masks`` its tile mask."""
    return _KernelAttention.apply(q, k, v, forward, list(ranges), [_plain(m) for m in masks],
                                  block_size, causal, scale)


__all__ = ["attention_gradients", "needs_gradients", "with_gradients", "with_packed_gradients"]
