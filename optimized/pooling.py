"""Tile pooling and calibration energies in one pass over Q and K (SPEC 3 and 5).

One launch pools both tensors: the first programs pool query tiles, the rest
pool key tiles (K once per KV head). Each program owns one tile:

* ``mean[d] = (1 / c) * sum_{n in tile, valid} x[n, d]``, accumulated in fp32,
  where ``c`` is the number of valid tokens of the tile on the absolute grid
  (a partial first or last tile is averaged over the tokens it holds);
* the calibration energies of SPEC 5 are sums of ``mean[d]^2`` over all tiles
  of a head, over all dims and over each band's dims; each program adds its
  tile's three partial sums with one float64 atomic each, so the order in
  which tiles land does not cost fp32 accuracy.

Pooled keys are stored transposed, ``(B, Hkv, D, nk_stride)``, so the selection
kernel reads one contiguous row of key tiles per head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prism.reference.tiles import TileLayout

from ._runtime import next_power_of_2


@triton.jit
def _band_membership(dims, head_dim, half_layout, band_start_pair, band_pairs):
    """Which of ``dims`` belong to the band of RoPE pairs ``[start, start + pairs)`` (SPEC 4).

    ``half`` layout: dim d is in pair ``d mod D/2``; ``interleaved``: pair ``d // 2``.
    """
    half = head_dim // 2
    pair = tl.where(half_layout != 0, dims % half, dims // 2)
    return (pair >= band_start_pair) & (pair < band_start_pair + band_pairs) & (dims < head_dim)


@triton.jit
def _pool_one_tile(
    x_ptr, stride_b, stride_h, stride_n, stride_d,
    num_heads, num_rows, start, first_tile, num_tiles, block_size,
    out_ptr, out_stride_bh, out_stride_tile, out_stride_dim, energy_ptr,
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
    for r0 in range(0, block_size, BLOCK_T):
        rows = tile_row0 + r0 + tl.arange(0, BLOCK_T)
        row_ok = (rows >= row_lo) & (rows < row_hi)
        ptrs = base + rows.to(tl.int64)[:, None] * stride_n + dims[None, :] * stride_d
        x = tl.load(ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), axis=0)
    mean = total / (row_hi - row_lo).to(tl.float32)
    out = out_ptr + bh.to(tl.int64) * out_stride_bh + tile * out_stride_tile
    tl.store(out + dims * out_stride_dim, mean, mask=dim_ok)

    # Energies: sum_d mean[d]^2 over all dims and over each band's dims.
    square = mean.to(tl.float64) * mean.to(tl.float64)
    in_high = _band_membership(dims, head_dim, half_layout, high_start, high_pairs)
    in_low = _band_membership(dims, head_dim, half_layout, low_start, low_pairs)
    energy = energy_ptr + bh * 3
    tl.atomic_add(energy + 0, tl.sum(tl.where(dim_ok, square, 0.0), axis=0))
    tl.atomic_add(energy + 1, tl.sum(tl.where(in_high, square, 0.0), axis=0))
    tl.atomic_add(energy + 2, tl.sum(tl.where(in_low, square, 0.0), axis=0))


@triton.jit
def _pool_tiles_kernel(
    Q, K, Q_POOLED, K_POOLED_T, Q_ENERGY, K_ENERGY,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    num_q_heads, num_kv_heads, num_queries, num_keys, query_start, first_query_tile,
    num_query_tiles, num_key_tiles, k_pooled_stride, block_size, num_query_programs,
    head_dim, half_layout, high_start, high_pairs, low_start, low_pairs,
    D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Pool every query tile and every key tile of one call, in one launch.

    Fuses the reference's ``pool_tiles(q, ...)``, ``pool_tiles(k, ...)`` and the
    energy sums of ``calibration.band_temperature``. Programs
    ``[0, num_query_programs)`` pool query tiles (one per (batch, q head, tile));
    the rest pool key tiles (one per (batch, KV head, tile)).
    """
    pid = tl.program_id(0)
    if pid < num_query_programs:
        _pool_one_tile(
            Q, stride_qb, stride_qh, stride_qn, stride_qd,
            num_q_heads, num_queries, query_start, first_query_tile, num_query_tiles, block_size,
            Q_POOLED, num_query_tiles * head_dim, head_dim, 1, Q_ENERGY,
            pid, head_dim, half_layout, high_start, high_pairs, low_start, low_pairs,
            D_PAD, BLOCK_T,
        )
    else:
        _pool_one_tile(
            K, stride_kb, stride_kh, stride_kn, stride_kd,
            num_kv_heads, num_keys, 0, 0, num_key_tiles, block_size,
            K_POOLED_T, head_dim * k_pooled_stride, 1, k_pooled_stride, K_ENERGY,
            pid - num_query_programs, head_dim, half_layout,
            high_start, high_pairs, low_start, low_pairs,
            D_PAD, BLOCK_T,
        )


def band_pairs(head_dim: int, high_dim: int, low_dim: int):
    """``(high_start, high_pairs, low_start, low_pairs)`` of the RoPE pairs of each band."""
    half = head_dim // 2
    return 0, high_dim // 2, half - low_dim // 2, low_dim // 2


def pool_tiles_and_energy(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                          high_dim: int, low_dim: int, rope_layout: str, *,
                          rows_per_load: int | None = None, num_warps: int = 1):
    """Pooled queries, transposed pooled keys and their calibration energies.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    layout : TileLayout
        From ``prism.reference.tile_layout``; needs ``Nq > 0`` and ``Nk > 0``.
    high_dim, low_dim : int
        Resolved band widths in head dims.
    rope_layout : {"half", "interleaved"}
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
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    k_stride = -(-nkt // 16) * 16
    device = q.device
    q_pooled = torch.empty(b, hq, nqt, d, dtype=torch.float32, device=device)
    k_pooled_t = torch.empty(b, hkv, d, k_stride, dtype=torch.float32, device=device)
    q_energy = torch.zeros(b * hq, 3, dtype=torch.float64, device=device)
    k_energy = torch.zeros(b * hkv, 3, dtype=torch.float64, device=device)
    d_pad = next_power_of_2(d)
    if rows_per_load is None:
        # About 4K elements per load (32 x 128) with one warp: the best of six
        # launch shapes on the H200 at 128K (benchmarks/NOTES.md).
        rows_per_load = 4096 // d_pad
    block_t = max(1, min(next_power_of_2(layout.block_size), next_power_of_2(rows_per_load)))
    num_query_programs = b * hq * nqt
    grid = (num_query_programs + b * hkv * nkt,)
    _pool_tiles_kernel[grid](
        q, k, q_pooled, k_pooled_t, q_energy, k_energy,
        *q.stride(), *k.stride(),
        hq, hkv, nq, nk, layout.query_start, layout.first_query_tile,
        nqt, nkt, k_stride, layout.block_size, num_query_programs,
        d, 1 if rope_layout == "half" else 0, *band_pairs(d, high_dim, low_dim),
        D_PAD=d_pad, BLOCK_T=block_t, num_warps=num_warps,
    )
    return q_pooled, k_pooled_t, q_energy, k_energy
