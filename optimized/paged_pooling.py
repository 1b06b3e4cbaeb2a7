"""Key pooling read through a block table: selection over a paged cache without gathered keys.

The pooling launch of :mod:`prism.optimized.pooling` with one difference: key
row ``n`` of sequence ``b`` of a launch is read from the cache
``(num_pages, page_size, Hkv, D)`` at page ``BT[b, (row0 + n) // page_size]``,
slot ``(row0 + n) % page_size`` (``BT`` the launch's rows of the block table,
``row0`` the first key row pooled: 0, or with a
:class:`~prism.reference.PooledKeyCache` its ``num_tokens``, a tile boundary).
Each tile's rows are summed ``BLOCK_T`` at a time in the same order as the
contiguous launch, so the means, the energies and the NaN/Inf flag are those
of the contiguous launch on the gathered keys, bit for bit. Query tiles are
pooled by the contiguous code. The outputs land in the same buffer
(:func:`~prism.optimized.pooling.work_layout`), so the selection launches are
those of the contiguous path. Any page size (the tests use 16 to 256) and
any block-table strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prism.reference.tiles import TileLayout

from ._runtime import next_power_of_2
from .launch import Prepared
from .plan_items import zero_
from .pooling import (
    _pool_one_tile,
    _store_tile_mean,
    band_pairs,
    work_layout,
    work_pointers,
)


@triton.jit
def _pool_paged_key_tile(
    C, BT, stride_p, stride_s, stride_h, stride_d, stride_bt, num_heads, row0, num_rows,
    num_tiles, block_size, out_ptr, out_stride_bh, out_stride_dim, energy_ptr, nonfinite_ptr,
    tile_program, head_dim, half_layout, high_start, high_pairs, low_start, low_pairs,
    PAGE_SIZE: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Pool key tile ``tile_program % num_tiles`` of (sequence, KV head)
    ``tile_program // num_tiles``, its rows read through the block table."""
    bh = tile_program // num_tiles
    tile = tile_program % num_tiles
    b = bh // num_heads
    h = bh % num_heads
    row_lo = tile * block_size
    row_hi = tl.minimum(row_lo + block_size, num_rows)
    table = BT + b.to(tl.int64) * stride_bt
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < head_dim
    head = C + h.to(tl.int64) * stride_h
    total = tl.zeros([D_PAD], dtype=tl.float32)
    for r0 in range(0, row_hi - row_lo, BLOCK_T):  # the tile's rows with data only
        rows = row_lo + r0 + tl.arange(0, BLOCK_T)
        row_ok = rows < row_hi
        position = row0 + rows
        page = tl.load(table + position // PAGE_SIZE, mask=row_ok, other=0).to(tl.int64)
        ptrs = (head + page[:, None] * stride_p
                + (position % PAGE_SIZE).to(tl.int64)[:, None] * stride_s
                + dims[None, :] * stride_d)
        x = tl.load(ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), axis=0)
    _store_tile_mean(total, row_hi - row_lo, dims, dim_ok,
                     out_ptr + bh.to(tl.int64) * out_stride_bh + tile, out_stride_dim,
                     energy_ptr + bh * 3, nonfinite_ptr, head_dim, half_layout, high_start,
                     high_pairs, low_start, low_pairs)


@triton.jit
def _pool_paged_kernel(
    Q, C, BT, WORK,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_p, stride_s, stride_h, stride_d, stride_bt,
    num_q_heads, num_kv_heads, num_queries, num_keys, key_row0, query_start,
    first_query_tile, num_query_tiles, num_key_tiles, k_pooled_stride, block_size,
    num_query_programs, head_dim, half_layout, high_start, high_pairs, low_start, low_pairs,
    q_pooled_offset, k_pooled_offset, k_energy_offset,
    PAGE_SIZE: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Programs ``[0, num_query_programs)`` pool query tiles (the contiguous code); the
    rest pool key tiles through the block table. ``num_keys`` counts the key rows
    pooled (from ``key_row0`` on), ``num_key_tiles`` their tiles."""
    NONFINITE, Q_ENERGY, K_ENERGY, Q_POOLED, K_POOLED_T = work_pointers(
        WORK, q_pooled_offset, k_pooled_offset, k_energy_offset)
    pid = tl.program_id(0)
    if pid < num_query_programs:
        _pool_one_tile(
            Q, stride_qb, stride_qh, stride_qn, stride_qd,
            num_q_heads, num_queries, query_start, first_query_tile, num_query_tiles, block_size,
            Q_POOLED, num_query_tiles * head_dim, head_dim, 1, Q_ENERGY, NONFINITE,
            pid, head_dim, half_layout, high_start, high_pairs, low_start, low_pairs,
            D_PAD, BLOCK_T,
        )
    else:
        _pool_paged_key_tile(
            C, BT, stride_p, stride_s, stride_h, stride_d, stride_bt, num_kv_heads, key_row0,
            num_keys, num_key_tiles, block_size, K_POOLED_T, head_dim * k_pooled_stride,
            k_pooled_stride, K_ENERGY, NONFINITE, pid - num_query_programs, head_dim,
            half_layout, high_start, high_pairs, low_start, low_pairs,
            PAGE_SIZE, D_PAD, BLOCK_T,
        )


_PLANS: dict = {}


def paged_pool_plan(q, k_cache, block_table, layout: TileLayout, high_dim: int, low_dim: int,
                    rope_layout: str, first_key_tile: int = 0):
    """``(grid, Prepared, WORK size, k_pooled stride, sums)`` of one paged pooling launch.

    ``q`` (B, Hq, Nq, D); ``block_table`` the B rows of the launch's sequences
    (any strides; row ``b`` is sequence ``b``), each with ``layout.num_keys``
    tokens; key tiles ``first_key_tile`` on are pooled (columns before it are
    the caller's). Cached per shape.
    """
    key = (q.shape, q.stride(), k_cache.shape, k_cache.stride(), block_table.stride(0),
           layout, high_dim, low_dim, rope_layout, first_key_tile)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    b, hq, nq, d = q.shape
    hkv, page_size = k_cache.shape[2], k_cache.shape[1]
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    k_stride = -(-nkt // 16) * 16
    size, q_off, k_off, k_energy_off, num_sums = work_layout(b, hq, hkv, d, nqt, nkt)
    d_pad = next_power_of_2(d)
    block_t = max(1, min(next_power_of_2(layout.block_size), 4096 // d_pad))
    key_row0 = first_key_tile * layout.block_size
    pooled_tiles = nkt - first_key_tile
    num_query_programs = b * hq * nqt
    prepared = Prepared(
        (*q.stride(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
         k_cache.stride(3), block_table.stride(0),
         hq, hkv, nq, layout.num_keys - key_row0, key_row0, layout.query_start,
         layout.first_query_tile, nqt, pooled_tiles, k_stride, layout.block_size,
         num_query_programs, d, 1 if rope_layout == "half" else 0,
         *band_pairs(d, high_dim, low_dim), q_off, k_off + first_key_tile, k_energy_off),
        dict(PAGE_SIZE=page_size, D_PAD=d_pad, BLOCK_T=block_t, num_warps=1))
    plan = ((num_query_programs + b * hkv * pooled_tiles,), prepared, size, k_stride,
            num_sums)
    if len(_PLANS) > 1024:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def unit_columns(block_table: torch.Tensor) -> torch.Tensor:
    """The kernels index a row of the table as ``row + j``."""
    return block_table if block_table.stride(1) == 1 else block_table.contiguous()


def run_paged_pooling(plan, q, k_cache, block_table, work: torch.Tensor | None = None,
                      zero: bool = True) -> torch.Tensor:
    """Launch ``plan`` (:func:`paged_pool_plan`); return its buffer (``work``, given or
    allocated; ``zero`` False: the caller has zeroed or filled the sums)."""
    grid, prepared, size, _, num_sums = plan
    if work is None:
        work = torch.empty(size, dtype=torch.float64, device=q.device)
    if zero:
        zero_(work[:num_sums])
    if grid[0]:
        prepared.launch(_pool_paged_kernel, grid, q, k_cache, block_table, work)
    return work
