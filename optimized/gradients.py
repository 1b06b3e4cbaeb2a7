"""Gradients of the optimized attention calls: the reference's, recomputed chunk by chunk.

The kernels compute the forward pass only. When grad mode is on and q, k or v
requires grad, :func:`prism.optimized.block_sparse_attention` and
:func:`prism.optimized.prism_attention` (and the packed
:func:`~prism.optimized.varlen.prism_attention_varlen` and
:func:`~prism.optimized.varlen.block_sparse_attention_varlen`, per sequence)
return outputs whose backward runs
contract §7's softmax again in torch (:func:`prism.reference.attention.masked_weights`)
for one chunk of query rows at a time and applies the softmax's gradient
formulas to it, so that the gradients are the reference's (up to fp32
rounding) for the same tile mask:

* the tile mask is a constant (selection is a discrete choice: no gradient
  flows through it, in the reference either);
* a chunk's scores are freed before the next chunk, so the backward pass
  holds a few (rows x Nk) fp32 blocks per head at a time, not the whole
  (Nq x Nk) matrices that autograd through the reference keeps;
* ``dq``, ``dk`` and ``dv`` come in the inputs' dtypes; rows with no key to
  read give zero gradients.

This is a dense fp32 recomputation in torch, meant for fine-tuning experiments
and gradient checks, not for training at scale: on the H200 a training step
(forward and backward) cost 34x torch SDPA's at 4K tokens and 45x at 8K
(docs/performance.rst, "Gradients"). Calls made under
``torch.no_grad()``, or on inputs that do not require grad, never come here.
"""

from __future__ import annotations

import math

import torch

from prism.reference.attention import masked_weights, query_chunks
from prism.reference.tile_mask import TileMask
from prism.reference.tiles import tile_layout


def needs_gradients(*tensors: torch.Tensor) -> bool:
    """Whether an attention call must return outputs that carry a backward."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def attention_gradients(q, k, v, block_mask, block_size: int, causal: bool, scale, grad_out,
                        grad_lse, needs=(True, True, True)):
    """``(dq, dk, dv)`` of contract §7's output (and log-sum-exp) for one tile mask.

    ``grad_out`` (B, Hq, Nq, Dv) and ``grad_lse`` (B, Hq, Nq) are the incoming
    gradients (either may be None: zero). ``needs`` says which of the three to
    return (the others are None). Per chunk of query rows, with ``P`` the
    softmax (the reference's weights over their row sums, 0 in empty rows),
    ``O = P V`` and ``dS = P * (dO V^T - rowsum(dO * O) + dlse)``:
    ``dq = scale * dS K``, ``dk = scale * dS^T Q``, ``dv = P^T dO``, the last
    two summed over the query heads of each KV head. Plain tensor operations
    (no nested autograd), so Dynamo and AOTAutograd trace it too.
    """
    b, hq, nq, d = q.shape
    hkv, nk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    layout = tile_layout(nq, nk, block_size, causal)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask = block_mask.as_tensor() if isinstance(block_mask, TileMask) else block_mask
    kf = k.detach().float().unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    vf = v.detach().float().unsqueeze(2)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if needs[0] else None
    dk = torch.zeros(kf.shape, dtype=torch.float32, device=q.device) if needs[1] else None
    dv = torch.zeros(vf.shape[:-1] + (dv_dim,), dtype=torch.float32, device=q.device) \
        if needs[2] else None
    for rows in query_chunks(q, k):
        r = rows.numel()
        q_rows = q[:, :, rows].detach().float()
        weights, _, total = masked_weights(q_rows, kf, mask, layout, rows, causal, scale)
        inv = torch.where(total > 0, 1.0 / torch.where(total > 0, total, 1.0), 0.0)
        p = weights * inv.reshape(b, hkv, group, r, 1)  # (B, Hkv, G, r, Nk)
        d_scores = torch.zeros_like(p)
        if grad_out is not None:
            g_out = grad_out[:, :, rows].float().reshape(b, hkv, group, r, dv_dim)
            out = torch.matmul(p, vf)
            d_p = torch.matmul(g_out, vf.transpose(-1, -2))
            d_scores = p * (d_p - (g_out * out).sum(dim=-1, keepdim=True))
            if dv is not None:
                dv += torch.matmul(p.transpose(-1, -2), g_out).sum(dim=2, keepdim=True)
        if grad_lse is not None:
            d_scores = d_scores + p * grad_lse[:, :, rows].float().reshape(b, hkv, group, r, 1)
        if dq is not None:
            dq[:, :, rows] = (torch.matmul(d_scores, kf) * scale).reshape(b, hq, r, d)
        if dk is not None:
            dk += (torch.matmul(d_scores.transpose(-1, -2),
                                q_rows.reshape(b, hkv, group, r, d)) * scale).sum(dim=2,
                                                                                 keepdim=True)
    return tuple(None if g is None else g.reshape(t.shape).to(t.dtype)
                 for g, t in ((dq, q), (dk, k), (dv, v)))


class _KernelAttention(torch.autograd.Function):
    """The kernels' forward output, the reference's gradients (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask, forward, block_size, causal, scale):
        out, lse = forward()
        ctx.save_for_backward(q, k, v, block_mask)
        ctx.options = (block_size, causal, scale)
        ctx.set_materialize_grads(False)
        if lse is None:
            return out
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse=None):
        q, k, v, block_mask = ctx.saved_tensors
        dq, dk, dv = attention_gradients(q, k, v, block_mask, *ctx.options, grad_out, grad_lse,
                                         ctx.needs_input_grad[:3])
        return dq, dk, dv, None, None, None, None, None


def with_gradients(q, k, v, block_mask, forward, *, block_size: int, causal: bool, scale):
    """``forward()`` (returning ``(out, lse or None)``, computed by the kernels) as outputs
    whose backward gives the reference's gradients: ``out``, or ``(out, lse)``."""
    mask = block_mask.as_tensor() if isinstance(block_mask, TileMask) else block_mask
    return _KernelAttention.apply(q, k, v, mask.detach(), forward, block_size, causal, scale)




class _PackedAttention(torch.autograd.Function):
    """A packed batch's kernel output with each sequence's reference gradients."""

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
        return (*totals, None, None, None, None, None, None)


def with_packed_gradients(q, k, v, ranges, masks, forward, *, block_size: int, causal: bool,
                          scale):
    """:func:`with_gradients` for a packed batch, (tokens, H, D) tensors: ``ranges``
    holds each sequence's ``(q0, q1, k0, k1)`` rows, ``masks`` its tile mask."""
    masks = [m.as_tensor() if isinstance(m, TileMask) else m for m in masks]
    return _PackedAttention.apply(q, k, v, forward, list(ranges), [m.detach() for m in masks],
                                  block_size, causal, scale)


__all__ = ["attention_gradients", "needs_gradients", "with_gradients", "with_packed_gradients"]
