"""``block_sparse_attention``'s own launches, in a form a call plan can replay.

The eager ``block_sparse_attention`` runs up to three kernels: the NaN/Inf
check of q, k and v (:func:`prism.optimized.pooling.nonfinite_flag`), the
mask's compact indices (:func:`prism.optimized.indices.mask_rows_to_indices`,
unless a :class:`~prism.reference.tile_mask.TileMask` carries them) and the
attention kernel. The first two are written here again with the same kernels,
grids, scalars and constexprs, so the same compiled kernels compute the same
bits, but launched through :class:`prism.optimized.launch.Prepared` (one per
call shape) and zeroed through :func:`prism.optimized.launch.zero_`: what
:mod:`prism.optimized.call_plan` can record and replay (a launch through
:func:`prism.optimized.launch.launch` or a ``torch.zeros`` refuses a plan).
"""

from __future__ import annotations

import torch

from . import indices, pooling
from ._runtime import next_power_of_2
from .launch import Prepared, zero_

_FLAG_PLANS: dict = {}
_INDEX_PLANS: dict = {}


def _remember(cache: dict, key, value):
    if len(cache) >= 1024:
        cache.clear()
    cache[key] = value
    return value


def nonfinite_flag(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   block_rows: int = 128) -> torch.Tensor:
    """:func:`prism.optimized.pooling.nonfinite_flag` (same kernel, launch and flag)."""
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), block_rows)
    plan = _FLAG_PLANS.get(key)
    if plan is None:
        b, hq, nq, d = q.shape
        hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
        q_programs = b * hq * -(-nq // block_rows)
        k_programs = b * hkv * -(-nk // block_rows)
        d_pad, dv_pad = next_power_of_2(d), next_power_of_2(dv)
        prepared = Prepared(
            (*q.stride(), *k.stride(), *v.stride(), hq, hkv, nq, nk, d, dv, q_programs,
             k_programs, block_rows),
            dict(D_PAD=d_pad, DV_PAD=dv_pad,
                 BLOCK_T=max(1, min(block_rows, 4096 // max(d_pad, dv_pad))), num_warps=4))
        plan = _remember(_FLAG_PLANS, key, ((q_programs + 2 * k_programs,), prepared))
    grid, prepared = plan
    flag = torch.empty(1, dtype=torch.float64, device=q.device)
    zero_(flag)
    if grid[0]:
        prepared.launch(pooling._nonfinite_kernel, grid, q, k, v, flag)
    return flag


def mask_rows_to_indices(block_mask: torch.Tensor, first_query_tile: int = 0,
                         causal_trim: bool = False):
    """:func:`prism.optimized.indices.mask_rows_to_indices` (same kernel and outputs)."""
    lead = block_mask.shape[:-1]
    nq, nk = block_mask.shape[-2], block_mask.shape[-1]
    num = torch.empty(lead, dtype=torch.int32, device=block_mask.device)
    idx = torch.empty(block_mask.shape, dtype=torch.int32, device=block_mask.device)
    rows = num.numel()
    if rows == 0 or nk == 0:
        zero_(num)
        return num, idx
    key = (max(nq, 1), nk, first_query_tile, causal_trim)
    prepared = _INDEX_PLANS.get(key)
    if prepared is None:
        prepared = _remember(_INDEX_PLANS, key, Prepared(
            key[:3], dict(CAUSAL_TRIM=causal_trim, BLOCK=min(1024, next_power_of_2(nk)),
                          num_warps=4)))
    flat = block_mask.contiguous().view(torch.uint8)
    prepared.launch(indices._mask_to_indices_kernel, (rows,), flat, num, idx)
    return num, idx
