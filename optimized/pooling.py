"""Tile pooling and calibration energies in one pass over Q and K (contract §3 and §5).

One launch pools both tensors: the first programs pool query tiles, the rest
pool key tiles (K once per KV head). Each program owns one tile:

* ``mean[d] = (1 / c) * sum_{n in tile, valid} x[n, d]``, accumulated in fp32,
  where ``c`` is the number of valid tokens of the tile on the absolute grid
  (a partial first or last tile is averaged over the tokens it holds);
* the calibration energies of contract §5 are sums of ``mean[d]^2`` over all tiles
  of a head, over all dims and over each band's dims; each program adds its
  tile's three partial sums with one float64 atomic each, so the order in
  which tiles land does not cost fp32 accuracy.

Pooled keys are stored transposed, ``(B, Hkv, D, nk_stride)``, so the selection
kernel reads one contiguous row of key tiles per head dim.

The same launch finds NaN and Inf without a host wait: a tile holding one
has a non-finite sum, and its program sets a flag in device memory that the
caller reads at the end of an eager call (never under compilation or graph
capture). Optional extra programs check V the same way, so
``prism_attention`` needs no separate pass over it. A finite tile whose fp32
sum overflows also sets the flag; the eager caller confirms every flag
against the inputs before raising.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prism.reference.tiles import TileLayout

from ._runtime import next_power_of_2
from .launch import Prepared
from .plan_items import zero_


@triton.jit
def _band_membership(dims, head_dim, half_layout, band_start_pair, band_pairs):
    """Which of ``dims`` belong to the band of RoPE pairs ``[start, start + pairs)`` (contract §4).

    ``half`` layout: dim d is in pair ``d mod D/2``; ``interleaved``: pair ``d // 2``.
    """
    half = head_dim // 2
    pair = tl.where(half_layout != 0, dims % half, dims // 2)
    return (pair >= band_start_pair) & (pair < band_start_pair + band_pairs) & (dims < head_dim)


@triton.jit
def _flag_if_nonfinite(sums, nonfinite_ptr):
    """Set the flag when any of ``sums`` is NaN or +-Inf (every writer stores 1)."""
    bad = tl.sum((sums - sums != 0).to(tl.int32), axis=0)
    tl.store(nonfinite_ptr, 1.0, mask=bad > 0)


@triton.jit
def _check_rows_finite(x_ptr, stride_b, stride_h, stride_n, stride_d, num_heads, num_rows,
                       num_dims, row_block, block_rows, nonfinite_ptr,
                       D_PAD: tl.constexpr, BLOCK_T: tl.constexpr, counts=None, stride_cb=0,
                       stride_ch=0, stride_ct=0, tile_size=1, first_tile=0, row_start=0,
                       UNREAD: tl.constexpr = False, SPAN_TILES: tl.constexpr = 1):
    """Flag NaN/Inf in rows ``[block * block_rows, ...)`` of one head of ``x`` (B, H, N, D).

    ``row_block`` numbers (batch * head, block) pairs; fp32 column sums over the
    rows find a non-finite entry as :func:`_pool_one_tile` does. With ``UNREAD``
    only the rows of query tiles whose count in ``counts`` (an attention
    launch's ``kv_num_blocks``, strides 0 where broadcast) is 0 are read: row
    ``r`` lies in tile ``(row_start + r) // tile_size - first_tile``. The
    block's rows then span at most ``SPAN_TILES`` tiles, whose counts are read
    first: a block whose tiles all have keys reads nothing more.
    """
    blocks_per_head = tl.cdiv(num_rows, block_rows)
    bh = row_block // blocks_per_head
    block = row_block % blocks_per_head
    b = bh // num_heads
    h = bh % num_heads
    dims = tl.arange(0, D_PAD)
    base = x_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    total = tl.zeros([D_PAD], dtype=tl.float32)
    # The block's rows that exist (a block as long as a tile may pass the data's end).
    rows_end = tl.minimum(block_rows, num_rows - block * block_rows)
    if UNREAD:
        first_row = block * block_rows
        last_row = tl.minimum(first_row + block_rows, num_rows) - 1
        first = (row_start + first_row) // tile_size - first_tile
        spanned = first + tl.arange(0, SPAN_TILES)
        spanned_counts = tl.load(
            counts + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
            + spanned * stride_ct,
            mask=spanned <= (row_start + last_row) // tile_size - first_tile, other=1)
        rows_end = tl.where(tl.min(spanned_counts, axis=0) == 0, rows_end, 0)
    for r0 in range(0, rows_end, BLOCK_T):
        rows = block * block_rows + r0 + tl.arange(0, BLOCK_T)
        row_ok = rows < num_rows
        if UNREAD:
            tiles = (row_start + rows) // tile_size - first_tile
            count = tl.load(counts + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
                            + tiles * stride_ct, mask=row_ok, other=1)
            row_ok = row_ok & (count == 0)
        ok = row_ok[:, None] & (dims < num_dims)[None, :]
        x = tl.load(base + rows.to(tl.int64)[:, None] * stride_n + dims[None, :] * stride_d,
                    mask=ok, other=0.0)
        total += tl.sum(x.to(tl.float32), axis=0)
    _flag_if_nonfinite(total, nonfinite_ptr)


@triton.jit
def _nonfinite_kernel(
    Q, K, V, NONFINITE, COUNTS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    num_q_heads, num_kv_heads, num_queries, num_keys, head_dim, head_dim_v,
    q_programs, k_programs, block_rows, q_block_rows, stride_cb, stride_ch, stride_ct,
    tile_size, first_tile, query_start,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_T: tl.constexpr, UNREAD: tl.constexpr,
    SPAN_TILES: tl.constexpr,
):
    """One pass over Q, K and V that flags NaN/Inf (the reference's ``check_finite``).

    Programs ``[0, q_programs)`` read blocks of ``block_rows`` query rows, the
    next ``k_programs`` key rows, the rest value rows. With ``UNREAD`` the query
    programs take ``q_block_rows`` rows each and read only the rows of query tiles
    with a count of 0 in ``COUNTS`` (:func:`_check_rows_finite`).
    """
    pid = tl.program_id(0)
    if pid < q_programs:
        _check_rows_finite(Q, stride_qb, stride_qh, stride_qn, stride_qd, num_q_heads,
                           num_queries, head_dim, pid, q_block_rows, NONFINITE, D_PAD,
                           BLOCK_T, COUNTS, stride_cb, stride_ch, stride_ct, tile_size,
                           first_tile, query_start, UNREAD, SPAN_TILES)
    elif pid < q_programs + k_programs:
        _check_rows_finite(K, stride_kb, stride_kh, stride_kn, stride_kd, num_kv_heads,
                           num_keys, head_dim, pid - q_programs, block_rows, NONFINITE,
                           D_PAD, BLOCK_T)
    else:
        _check_rows_finite(V, stride_vb, stride_vh, stride_vn, stride_vd, num_kv_heads,
                           num_keys, head_dim_v, pid - q_programs - k_programs, block_rows,
                           NONFINITE, DV_PAD, BLOCK_T)


@triton.jit
def _pool_one_tile(
    x_ptr, stride_b, stride_h, stride_n, stride_d,
    num_heads, num_rows, start, first_tile, num_tiles, block_size,
    out_ptr, out_stride_bh, out_stride_tile, out_stride_dim, energy_ptr, nonfinite_ptr,
    tile_program, head_dim, half_layout,
    high_start, high_pairs, low_start, low_pairs,
    D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Pool tile ``tile_program % num_tiles`` of head ``tile_program // num_tiles``.

    Fuses reference stages ``pool_tiles`` (one tile) and the sums of squares that
    ``band_temperature`` takes its RMS values from.
    """
    bh = tile_program // num_tiles
    tile = tile_program % num_tiles
    b = bh // num_heads
    h = bh % num_heads
    abs_tile = first_tile + tile
    # Rows of x inside this tile: positions [abs_tile*bs, abs_tile*bs + bs) cut to
    # the positions [start, start + num_rows) that x covers.
    row_lo = tl.maximum(abs_tile * block_size, start) - start
    row_hi = tl.minimum(abs_tile * block_size + block_size, start + num_rows) - start

    dims = tl.arange(0, D_PAD)
    dim_ok = dims < head_dim
    base = x_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    total = tl.zeros([D_PAD], dtype=tl.float32)
    # sum_n x[n, d] over the valid rows, BLOCK_T rows at a time, in fp32.
    tile_row0 = abs_tile * block_size - start
    # Only the chunks that hold valid rows, on the tile-aligned chunk grid: the skipped
    # ones are all masked (their sum, +0, leaves the total's bits as they are), and a
    # tile longer than the data costs nothing past it.
    first_chunk = (row_lo - tile_row0) // BLOCK_T * BLOCK_T
    for r0 in range(first_chunk, row_hi - tile_row0, BLOCK_T):
        rows = tile_row0 + r0 + tl.arange(0, BLOCK_T)
        row_ok = (rows >= row_lo) & (rows < row_hi)
        ptrs = base + rows.to(tl.int64)[:, None] * stride_n + dims[None, :] * stride_d
        x = tl.load(ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), axis=0)
    _store_tile_mean(total, row_hi - row_lo, dims, dim_ok,
                     out_ptr + bh.to(tl.int64) * out_stride_bh + tile * out_stride_tile,
                     out_stride_dim, energy_ptr + bh * 3, nonfinite_ptr, head_dim,
                     half_layout, high_start, high_pairs, low_start, low_pairs)


@triton.jit
def _store_tile_mean(total, count, dims, dim_ok, out, out_stride_dim, energy, nonfinite_ptr,
                     head_dim, half_layout, high_start, high_pairs, low_start, low_pairs):
    """A tile's column sums ``total`` over ``count`` rows: flag NaN/Inf, store the mean
    at ``out``, and add its squared norm over all dims and over each band's dims to
    ``energy[0:3]`` (float64 atomics). Shared by the contiguous and the paged launch."""
    # NaN or Inf anywhere in the tile makes its sum non-finite (x - x != 0).
    _flag_if_nonfinite(total, nonfinite_ptr)
    mean = total / count.to(tl.float32)
    tl.store(out + dims * out_stride_dim, mean, mask=dim_ok)
    # Energies: sum_d mean[d]^2 over all dims and over each band's dims.
    square = mean.to(tl.float64) * mean.to(tl.float64)
    in_high = _band_membership(dims, head_dim, half_layout, high_start, high_pairs)
    in_low = _band_membership(dims, head_dim, half_layout, low_start, low_pairs)
    tl.atomic_add(energy + 0, tl.sum(tl.where(dim_ok, square, 0.0), axis=0))
    tl.atomic_add(energy + 1, tl.sum(tl.where(in_high, square, 0.0), axis=0))
    tl.atomic_add(energy + 2, tl.sum(tl.where(in_low, square, 0.0), axis=0))


@triton.jit
def work_pointers(WORK, q_pooled_offset, k_pooled_offset, k_energy_offset):
    """The flag, the energies (float64) and the pooled q and k (float32) inside ``WORK``."""
    pooled = WORK.to(tl.pointer_type(tl.float32), bitcast=True)
    return (WORK, WORK + 1, WORK + k_energy_offset, pooled + q_pooled_offset,
            pooled + k_pooled_offset)


@triton.jit
def _pool_tiles_kernel(
    Q, K, V, WORK,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    num_q_heads, num_kv_heads, num_queries, num_keys, query_start, first_query_tile,
    num_query_tiles, num_key_tiles, k_pooled_stride, block_size, num_query_programs,
    num_key_programs, head_dim, head_dim_v, half_layout,
    high_start, high_pairs, low_start, low_pairs,
    q_pooled_offset, k_pooled_offset, k_energy_offset,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Pool every query tile and every key tile of one call, in one launch.

    Fuses the reference's ``pool_tiles(q, ...)``, ``pool_tiles(k, ...)`` and the
    energy sums of ``calibration.band_temperature``, and the reference's
    ``check_finite`` of q, k (and v). Programs ``[0, num_query_programs)`` pool
    query tiles (one per (batch, q head, tile)); the next ``num_key_programs``
    pool key tiles (one per (batch, KV head, tile)); any others only check
    tiles of V for NaN/Inf. ``WORK`` is the call's one buffer (:func:`work_layout`).
    """
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
    elif pid < num_query_programs + num_key_programs:
        _pool_one_tile(
            K, stride_kb, stride_kh, stride_kn, stride_kd,
            num_kv_heads, num_keys, 0, 0, num_key_tiles, block_size,
            K_POOLED_T, head_dim * k_pooled_stride, 1, k_pooled_stride, K_ENERGY, NONFINITE,
            pid - num_query_programs, head_dim, half_layout,
            high_start, high_pairs, low_start, low_pairs,
            D_PAD, BLOCK_T,
        )
    else:
        _check_rows_finite(V, stride_vb, stride_vh, stride_vn, stride_vd, num_kv_heads,
                           num_keys, head_dim_v, pid - num_query_programs - num_key_programs,
                           block_size, NONFINITE, DV_PAD, BLOCK_T)


def band_pairs(head_dim: int, high_dim: int, low_dim: int):
    """``(high_start, high_pairs, low_start, low_pairs)`` of the RoPE pairs of each band."""
    half = head_dim // 2
    return 0, high_dim // 2, half - low_dim // 2, low_dim // 2


def pool_tiles_and_energy(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                          high_dim: int, low_dim: int, rope_layout: str, *,
                          v: torch.Tensor | None = None,
                          rows_per_load: int | None = None, num_warps: int = 1):
    """Pooled queries, transposed pooled keys, their calibration energies, a NaN/Inf flag.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    layout : TileLayout
        From ``prism.reference.tile_layout``; needs ``Nq > 0`` and ``Nk > 0``.
    high_dim, low_dim : int
        Resolved band widths in head dims.
    rope_layout : {"half", "interleaved"}
    v : Tensor (B, Hkv, Nk, Dv), optional
        Also checked for NaN/Inf in the same launch.
    rows_per_load, num_warps : int, optional
        Launch shape: token rows summed per load (default about 4K elements
        per load) and warps per program (benchmarks/NOTES.md records the tuning).

    Returns
    -------
    q_pooled : Tensor (B, Hq, n_query_tiles, D), float32
    k_pooled_t : Tensor (B, Hkv, D, nk_stride), float32
        ``k_pooled_t[..., d, j]`` is the mean of dim ``d`` over key tile ``j``;
        ``nk_stride`` is ``n_key_tiles`` rounded up to a multiple of 16.
    q_energy : Tensor (B * Hq, 3), float64
        Per (batch, q head): sum of squared pooled values over all query tiles,
        over all dims, the high band's dims and the low band's dims.
    k_energy : Tensor (B * Hkv, 3), float64
        The same for the key tiles of each KV head.
    nonfinite : Tensor (1,), float64
        Non-zero if some tile of q, k (or v) has a non-finite fp32 sum.
    """
    plan = pool_plan(q, k, v, layout, high_dim, low_dim, rope_layout, rows_per_load, num_warps)
    work = run_pooling(plan, q, k, v)
    b, hq, hkv, d = q.shape[0], q.shape[1], k.shape[1], q.shape[3]
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    _, q_off, k_off, k_energy_off, num_sums = work_layout(b, hq, hkv, d, nqt, nkt)
    pooled = work.view(torch.float32)
    k_stride = plan[3][3]
    return (pooled[q_off:q_off + b * hq * nqt * d].view(b, hq, nqt, d),
            pooled[k_off:k_off + b * hkv * d * k_stride].view(b, hkv, d, k_stride),
            work[1:k_energy_off].view(-1, 3), work[k_energy_off:num_sums].view(-1, 3),
            work[:1])


def work_layout(b: int, hq: int, hkv: int, d: int, nqt: int, nkt: int):
    """Where pooling's outputs lie in its one float64 buffer, ``WORK``.

    ``(size in float64, q_pooled offset, k_pooled_t offset (both in float32
    elements), k energy offset, sums)``: the NaN flag at 0, the q energies
    from 1, the k energies, then (256-byte aligned) the pooled q and pooled keys.
    Only the first ``sums`` elements need zeroing.
    """
    k_stride = -(-nkt // 16) * 16
    num_sums = 3 * b * (hq + hkv) + 1
    q_off = 2 * (-(-num_sums // 32) * 32)
    k_off = q_off + -(-(b * hq * nqt * d) // 64) * 64
    size = (k_off + b * hkv * d * k_stride + 1) // 2
    return size, q_off, k_off, 1 + 3 * b * hq, num_sums


def pool_plan(q, k, v, layout: TileLayout, high_dim: int, low_dim: int, rope_layout: str,
              rows_per_load=None, num_warps: int = 1, first_key_tile: int = 0):
    """:func:`_pool_plan` of one call shape, cached.

    The layout by identity (the entry keeps it alive): hashing its fields costs
    more. A layout made afresh per call is found by value instead.
    """
    rest = (q.shape, q.stride(), k.shape, k.stride(),
            None if v is None else (v.shape, v.stride()), high_dim, low_dim, rope_layout,
            rows_per_load, num_warps, first_key_tile)
    plan = _POOL_PLANS.get((id(layout), *rest))
    if plan is not None:
        return plan[1]
    plan = _POOL_PLANS_BY_VALUE.get((layout, *rest))
    if plan is None:
        plan = _pool_plan(q, k, v, layout, high_dim, low_dim, rope_layout, rows_per_load,
                          num_warps, first_key_tile)
        for cache in (_POOL_PLANS, _POOL_PLANS_BY_VALUE):
            if len(cache) > 1024:
                cache.clear()
        _POOL_PLANS_BY_VALUE[(layout, *rest)] = plan
        _POOL_PLANS[(id(layout), *rest)] = (layout, plan)
    return plan


def run_pooling(plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """Launch the pooling of ``plan`` (:func:`pool_plan`); return its ``WORK`` buffer.

    One allocation holds every output; only the energies and the flag, which
    the kernel accumulates into, are zeroed.
    """
    grid, prepared, size, num_sums = plan[0], plan[1], plan[2], plan[4]
    work = torch.empty(size, dtype=torch.float64, device=q.device)
    zero_(work[:num_sums])
    prepared.launch(_pool_tiles_kernel, grid, q, k, k if v is None else v, work)
    return work


_POOL_PLANS: dict = {}  # by the identity of the layout
_POOL_PLANS_BY_VALUE: dict = {}


def _pool_plan(q, k, v, layout: TileLayout, high_dim: int, low_dim: int, rope_layout: str,
               rows_per_load, num_warps: int, first_key_tile: int = 0):
    """Everything of a pooling launch that depends only on shapes, strides and settings.

    ``(grid, prepared launch, WORK size, k_pooled_t shape, sums)``. With
    ``first_key_tile`` f > 0, row 0 of ``k`` (and ``v``) is absolute position
    ``f * block_size`` and only key tiles f .. nk - 1 of the layout are pooled,
    into their own columns of the pooled keys (chunked prefill: columns
    before f hold a :class:`~prism.reference.PooledKeyCache`'s means); their
    energies are added to what the energy slots hold.
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    k_stride = -(-nkt // 16) * 16
    size, q_off, k_off, k_energy_off, num_sums = work_layout(b, hq, hkv, d, nqt, nkt)
    d_pad = next_power_of_2(d)
    if rows_per_load is None:
        # About 4K elements per load (32 x 128) with one warp: the best of six
        # launch shapes on the H200 at 128K (benchmarks/NOTES.md).
        rows_per_load = 4096 // d_pad
    block_t = max(1, min(next_power_of_2(layout.block_size), next_power_of_2(rows_per_load)))
    num_query_programs = b * hq * nqt
    # Key tile f of the layout is tile 0 of k: the kernel pools k from its row 0,
    # on a grid aligned with the layout's since row 0 starts a tile.
    pooled_tiles = nkt - first_key_tile
    num_key_programs = b * hkv * pooled_tiles
    v_programs = 0 if v is None else b * hkv * pooled_tiles
    dv = d if v is None else v.shape[3]
    v_strides = k.stride() if v is None else v.stride()
    prepared = Prepared(
        (*q.stride(), *k.stride(), *v_strides,
         hq, hkv, nq, nk, layout.query_start, layout.first_query_tile,
         nqt, pooled_tiles, k_stride, layout.block_size, num_query_programs, num_key_programs,
         d, dv, 1 if rope_layout == "half" else 0, *band_pairs(d, high_dim, low_dim),
         q_off, k_off + first_key_tile, k_energy_off),
        dict(D_PAD=d_pad, DV_PAD=next_power_of_2(dv), BLOCK_T=block_t, num_warps=num_warps))
    grid = (num_query_programs + num_key_programs + v_programs,)
    return grid, prepared, size, (b, hkv, d, k_stride), num_sums


_FLAG_LAUNCHES: dict = {}  # call shape -> (grid, Prepared)


#: Launch shape of :func:`nonfinite_flag`: rows per program, rows per load (at most
#: 4096 elements a load), warps. One warp per program, as for pooling: on the H200
#: (``benchmarks/probes/nonfinite_shapes.py``, ``h200_nonfinite_shapes_8a2d70a.json``,
#: 32/8 heads, D 128, bf16) 0.366 ms at 128K (4.4 TB/s), 0.104 at 8K batch 4 and
#: 0.024 at 4K, against 0.943 / 0.246 / 0.041 for the earlier 4 warps (1.7 TB/s:
#: a reduction across warps after every load); 8 warps 1.81 ms at 128K.
NONFINITE_SHAPE = (128, 32, 1)
#: Query tiles a query program of :func:`nonfinite_flag` spans when it reads only
#: the rows of tiles without keys (``unread``): it reads their counts first and
#: most programs stop there (the rows of a tile that reads keys are the attention
#: kernel's to check), so fewer, wider programs.
UNREAD_TILES = 16


def nonfinite_flag(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   shape: tuple | None = None, unread: tuple | None = None,
                   flag: torch.Tensor | None = None) -> torch.Tensor:
    """A (1,) float64 device tensor, non-zero if q, k or v may hold NaN or Inf.

    One launch reads each tensor once (the reference's ``check_finite`` without
    a host wait). A finite block whose fp32 sum overflows also sets it. The
    launch goes through :class:`~prism.optimized.launch.Prepared` (one per call
    shape) and the flag is zeroed by :func:`~prism.optimized.plan_items.zero_`, so a
    call plan (:mod:`prism.optimized.call_plan`) can record and replay both.
    ``unread = (kv_num_blocks, tile size, first query tile, query start)`` of an
    attention launch that checks the query rows it reads (``CHECK_FINITE`` of
    :func:`prism.optimized.attention_kernel._sparse_attention_kernel`): then only
    the query rows of tiles with a count of 0 are read here, with k and v. With
    ``flag`` given, the launch sets that zeroed flag instead of a new one.
    A query program then takes :data:`UNREAD_TILES` tiles' rows.
    """
    block_rows, rows_per_load, warps = NONFINITE_SHAPE if shape is None else shape
    q_block_rows, span_tiles = block_rows, 1
    counts = None
    count_strides, layout = (0, 0, 0), (1, 0, 0)
    if unread is not None:
        counts, layout = unread[0], unread[1:]
        # Rows of UNREAD_TILES tiles; a run that does not start a tile touches one more.
        q_block_rows, span_tiles = UNREAD_TILES * layout[0], next_power_of_2(UNREAD_TILES + 1)
        count_strides = tuple(0 if counts.shape[i] == 1 else counts.stride(i) for i in (0, 1, 2))
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), block_rows,
           rows_per_load, warps, None if counts is None else counts.shape, count_strides,
           layout)
    plan = _FLAG_LAUNCHES.get(key)
    if plan is None:
        b, hq, nq, d = q.shape
        hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
        q_programs = b * hq * -(-nq // q_block_rows)
        k_programs = b * hkv * -(-nk // block_rows)
        d_pad, dv_pad = next_power_of_2(d), next_power_of_2(dv)
        prepared = Prepared(
            (*q.stride(), *k.stride(), *v.stride(), hq, hkv, nq, nk, d, dv, q_programs,
             k_programs, block_rows, q_block_rows, *count_strides, *layout),
            dict(D_PAD=d_pad, DV_PAD=dv_pad,
                 BLOCK_T=max(1, min(block_rows, rows_per_load, 4096 // max(d_pad, dv_pad))),
                 UNREAD=counts is not None, SPAN_TILES=span_tiles, num_warps=warps))
        if len(_FLAG_LAUNCHES) >= 1024:
            _FLAG_LAUNCHES.clear()
        plan = _FLAG_LAUNCHES[key] = ((q_programs + 2 * k_programs,), prepared)
    grid, prepared = plan
    if flag is None:
        flag = torch.empty(1, dtype=torch.float64, device=q.device)
        zero_(flag)
    if grid[0]:
        prepared.launch(_nonfinite_kernel, grid, q, k, v, flag, counts)
    return flag
