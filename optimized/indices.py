"""Compact (FlexAttention-style) form of a tile mask, computed by a Triton kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import next_power_of_2
from .launch import Prepared
from .plan_items import zero_

_LAUNCHES: dict = {}  # (rows per matrix, nk, first tile, trim) -> Prepared


@triton.jit
def _mask_to_indices_kernel(
    MASK, NUM, IDX, num_rows_per_matrix, num_key_tiles, first_query_tile,
    CAUSAL_TRIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row of a ``(rows, nk)`` mask to its count and ascending indices.

    Fuses the reference's ``mask_to_indices`` for one row: a running exclusive
    prefix sum over the row gives every selected tile its slot. With
    ``CAUSAL_TRIM`` (used before attention) tiles ``j > first + row`` are
    dropped first: they hold no key a causal query may read.
    """
    row = tl.program_id(0).to(tl.int64)
    base = row * num_key_tiles
    cols = tl.arange(0, BLOCK)
    last_tile = first_query_tile + row % num_rows_per_matrix
    count = 0
    for c0 in range(0, num_key_tiles, BLOCK):
        tile = c0 + cols
        selected = tl.load(MASK + base + tile, mask=tile < num_key_tiles, other=0) != 0
        if CAUSAL_TRIM:
            selected = selected & (tile <= last_tile)
        taken = selected.to(tl.int32)
        slot = count + tl.cumsum(taken, axis=0) - taken
        tl.store(IDX + base + slot, tile, mask=selected)
        count += tl.sum(taken, axis=0)
    for c0 in range(0, num_key_tiles, BLOCK):
        tile = c0 + cols
        tl.store(IDX + base + tile, tl.full([BLOCK], -1, dtype=tl.int32),
                 mask=(tile >= count) & (tile < num_key_tiles))
    tl.store(NUM + row, count)


def mask_rows_to_indices(block_mask: torch.Tensor, first_query_tile: int = 0,
                         causal_trim: bool = False):
    """Counts and ascending indices of every row of a bool mask ``(..., nq, nk)``.

    Parameters
    ----------
    block_mask : Tensor (..., nq, nk), bool
    first_query_tile : int
        Absolute tile of row 0 (only used with ``causal_trim``).
    causal_trim : bool
        Drop tiles ``j > first_query_tile + i`` from row ``i``.

    Returns
    -------
    kv_num_blocks : Tensor (..., nq), int32
    kv_indices : Tensor (..., nq, nk), int32, padded with -1
    """
    lead = block_mask.shape[:-1]
    nq, nk = block_mask.shape[-2], block_mask.shape[-1]
    num = torch.empty(lead, dtype=torch.int32, device=block_mask.device)
    idx = torch.empty(block_mask.shape, dtype=torch.int32, device=block_mask.device)
    rows = num.numel()
    if rows == 0 or nk == 0:
        zero_(num)
        return num, idx
    # Launched through Prepared and zeroed through zero_: a call plan
    # (prism.optimized.call_plan) can record and replay this step.
    key = (max(nq, 1), nk, first_query_tile, causal_trim)
    prepared = _LAUNCHES.get(key)
    if prepared is None:
        if len(_LAUNCHES) >= 1024:
            _LAUNCHES.clear()
        prepared = _LAUNCHES[key] = Prepared(
            key[:3], dict(CAUSAL_TRIM=causal_trim, BLOCK=min(1024, next_power_of_2(nk)),
                          num_warps=4))
    flat = block_mask.contiguous().view(torch.uint8)
    prepared.launch(_mask_to_indices_kernel, (rows,), flat, num, idx)
    return num, idx
