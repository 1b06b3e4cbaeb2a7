"""Sampled-query tile scores (the ``"sampled"`` estimators, docs/estimators.rst) as a Triton kernel.

:func:`sampled_tile_probabilities` computes what
:func:`prism.reference.estimators.sampled_query_probabilities` computes: the
exact softmax of a few sampled queries per query tile over their admissible
keys, summed into key tiles and renormalised per query tile. The reference
holds the (samples x N/bs) x N probability matrix; the kernel never writes
it.

One program takes one (batch, KV head) and ``TILES`` consecutive query tiles.
Its rows are the samples of those tiles for every query head of the GQA group
(``group * TILES * samples`` rows, about 64), so each key tile it loads serves
the whole group in one matrix product. Two passes over the key tiles:

1. online softmax statistics per row (running max and sum, base 2, the scale
   folded into ``qk_scale``);
2. the same scores normalised to probabilities, summed over each key tile's
   columns and, through a one-hot reduction, over the samples of each
   (query head, query tile): one number per (head, query tile, key tile),
   stored once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from prism.reference.tiles import TileLayout

from ._runtime import check_device, kernels_interpreted, next_power_of_2
from .antidiagonal_packed import masked_scores, online_softmax_step
from .launch import launch
from .pooling import _flag_if_nonfinite

#: Rows (sampled queries of a GQA group) one program aims to hold.
TARGET_ROWS = 64
_MIN_DOT = 16


@triton.jit
def _tile_scores(q_rows, k_head, stride_kn, stride_kd, tile, chunk, block_size, num_keys,
                 pos, rows_ok, row_cand, qk_scale, CAUSAL: tl.constexpr,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr, CHECK: tl.constexpr = False):
    """(ROWS, BLOCK_N) scaled scores (base 2) of the sampled rows ``q_rows`` (at
    positions ``pos``) against chunk ``chunk`` of key tile ``tile``, -inf where a key
    is not admissible or the row is not ``rows_ok & row_cand`` (its tile's candidates,
    for the cascade's stage); with ``CHECK``, NaN where a score is not finite
    (:func:`~prism.optimized.antidiagonal_blocks.masked_scores`)."""
    dims = tl.arange(0, D_PAD)
    offset = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    keys = tile * block_size + offset
    key_ok = (offset < block_size) & (keys < num_keys)
    k_cols = tl.load(k_head + keys.to(tl.int64)[None, :] * stride_kn + dims[:, None] * stride_kd,
                     mask=key_ok[None, :] & (dims[:, None] < HEAD_DIM), other=0.0)
    if UPCAST:
        k_cols = k_cols.to(tl.float32)
    if IEEE:
        scores = tl.dot(q_rows, k_cols, input_precision="ieee")
    else:
        scores = tl.dot(q_rows, k_cols)
    allowed = key_ok[None, :] & (rows_ok & row_cand)[:, None]
    if CAUSAL:
        allowed = allowed & (keys[None, :] <= pos[:, None])
    return masked_scores(scores, allowed, qk_scale, CHECK)


@triton.jit
def _sample_rows(block, heads, samples, tiles_per_program, num_query_tiles, first_query_tile,
                 block_size, query_start, num_queries, ROWS: tl.constexpr):
    """``(g, t, tile_row, pos, rows_ok)`` of a program's rows: row ``r`` is sample
    ``r % samples`` of tile ``t`` for head ``g`` of the program's ``heads``; its
    position is the last real query of that run of ``block_size / samples`` positions
    (:func:`prism.reference.estimators.sampled_query_positions`); ``rows_ok`` is False
    for padding rows, tiles past the last and runs without a query."""
    r = tl.arange(0, ROWS)
    per_head = tiles_per_program * samples
    g = r // per_head
    t = (r // samples) % tiles_per_program
    tile_row = block * tiles_per_program + t
    row_used = (r < heads * per_head) & (tile_row < num_query_tiles)
    run = block_size // samples
    start = (first_query_tile + tile_row) * block_size + (r % samples) * run
    pos = tl.minimum(start + run - 1, query_start + num_queries - 1)
    return g, t, tile_row, pos, row_used & (pos >= tl.maximum(start, query_start))


@triton.jit
def _sample_queries(q_rows_base, stride_qh, stride_qn, stride_qd, row_heads, pos, rows_ok,
                    query_start, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    UPCAST: tl.constexpr):
    """(ROWS, D_PAD) query vectors of the sampled rows (``row_heads``: each row's query
    head; zero for rows not ``rows_ok`` and past ``HEAD_DIM``)."""
    dims = tl.arange(0, D_PAD)
    q_rows = tl.load(q_rows_base + row_heads.to(tl.int64)[:, None] * stride_qh
                     + (pos - query_start).to(tl.int64)[:, None] * stride_qn
                     + dims[None, :] * stride_qd,
                     mask=rows_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q_rows = q_rows.to(tl.float32)
    return q_rows


@triton.jit
def _key_tile_end(rows_ok, pos, block_size, num_key_tiles, CAUSAL: tl.constexpr):
    """Key tiles ``[0, end)`` some sampled row may see (causal: up to the last row's
    position; else every tile when some row is real)."""
    if CAUSAL:
        last_key = tl.max(tl.where(rows_ok, pos, -1), axis=0)
        end = tl.where(last_key >= 0, last_key // block_size + 1, 0)
    else:
        end = tl.where(tl.max(rows_ok.to(tl.int32), axis=0) > 0, num_key_tiles, 0)
    return tl.minimum(end, num_key_tiles)


@triton.jit
def _sampled_tile_kernel(
    Q, K, OUT, NONFINITE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_orow, stride_otile,
    num_kv_heads, group, samples, tiles_per_program, num_programs_per_head,
    num_query_tiles, num_key_tiles, num_keys, num_queries, query_start, first_query_tile,
    block_size, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    ROWS: tl.constexpr, PAIRS: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, CHECK: tl.constexpr,
):
    """Unnormalised tile probabilities of ``TILES`` query tiles x one GQA group.

    With ``CHECK`` a NaN/Inf in k (or a sampled query) sets ``NONFINITE``
    (:func:`prism.optimized.antidiagonal_packed.masked_scores`).
    """
    pid = tl.program_id(0)
    # Heaviest (last) query tiles first.
    block = num_programs_per_head - 1 - pid % num_programs_per_head
    bh = pid // num_programs_per_head
    b = bh // num_kv_heads
    hk = bh % num_kv_heads

    # Row r = (head-in-group g, tile t, sample); pair = (g, t).
    g, t, tile_row, pos, rows_ok = _sample_rows(block, group, samples, tiles_per_program,
                                                num_query_tiles, first_query_tile, block_size,
                                                query_start, num_queries, ROWS)
    q_rows = _sample_queries(Q + b.to(tl.int64) * stride_qb, stride_qh, stride_qn, stride_qd,
                             hk * group + g, pos, rows_ok, query_start, HEAD_DIM, D_PAD, UPCAST)
    k_head = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    key_tiles = _key_tile_end(rows_ok, pos, block_size, num_key_tiles, CAUSAL)
    chunks = tl.cdiv(block_size, BLOCK_N)

    # Pass 1: running max m and sum l of 2^(score * qk_scale - m) per row.
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    for j in range(0, key_tiles):
        for c in range(0, chunks):
            scaled = _tile_scores(q_rows, k_head, stride_kn, stride_kd, j, c, block_size,
                                  num_keys, pos, rows_ok, rows_ok, qk_scale, CAUSAL, HEAD_DIM,
                                  D_PAD, BLOCK_N, IEEE, UPCAST, CHECK)
            m_i, l_i = online_softmax_step(m_i, l_i, scaled)
    if CHECK:
        _flag_if_nonfinite(l_i, NONFINITE)

    # Pass 2: per key tile, each row's probability mass, summed over the
    # samples of each (head, tile) pair by a one-hot reduction.
    m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(rows_ok & (l_i > 0), 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    pairs = tl.arange(0, PAIRS)
    pair_of_row = g * tiles_per_program + t
    one_hot = pair_of_row[:, None] == pairs[None, :]
    pair_g = pairs // tiles_per_program
    pair_tile = block * tiles_per_program + pairs % tiles_per_program
    pair_ok = (pairs < group * tiles_per_program) & (pair_tile < num_query_tiles)
    out_ptrs = (OUT + b.to(tl.int64) * stride_ob
                + (hk * group + pair_g).to(tl.int64) * stride_oh
                + pair_tile.to(tl.int64) * stride_orow)
    for j in range(0, key_tiles):
        row_mass = tl.zeros((ROWS,), dtype=tl.float32)
        for c in range(0, chunks):
            scores = _tile_scores(q_rows, k_head, stride_kn, stride_kd, j, c, block_size,
                                  num_keys, pos, rows_ok, rows_ok, qk_scale, CAUSAL, HEAD_DIM,
                                  D_PAD, BLOCK_N, IEEE, UPCAST)
            row_mass += tl.sum(tl.math.exp2(scores - m_shift[:, None]), axis=1)
        pair_mass = tl.sum(tl.where(one_hot, (row_mass * inv_l)[:, None], 0.0), axis=0)
        tl.store(out_ptrs + j * stride_otile, pair_mass, mask=pair_ok)


def sampled_tile_probabilities(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                               samples: int, causal: bool = True, *, normalize: bool = True,
                               nonfinite: torch.Tensor | None = None) -> torch.Tensor:
    """Tile probabilities of the sampled queries of every tile, by a Triton kernel.

    Same arguments and result as
    :func:`prism.reference.estimators.sampled_query_probabilities` (up to fp32
    rounding); inputs must be validated by the caller (``select_blocks``
    does it). The query heads of a GQA group share each loaded key tile.
    ``normalize=False`` returns the rows before their division by their sums
    (the selection's last kernel divides); ``nonfinite``, a float64 device
    flag, is set when k or a sampled query holds NaN/Inf.

    Returns
    -------
    Tensor (B, Hq, nq, nk), float32
    """
    check_device(_sampled_tile_kernel, q=q, k=k)
    b, hq, _, d = q.shape
    hkv, nk_tokens = k.shape[1], k.shape[2]
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    out = torch.zeros(b, hq, nq, nk, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    group = hq // hkv
    tiles = max(1, TARGET_ROWS // (group * samples))
    rows = max(_MIN_DOT, next_power_of_2(group * samples * tiles))
    pairs = next_power_of_2(group * tiles)
    per_head = -(-nq // tiles)
    block_n = max(_MIN_DOT, min(128, next_power_of_2(layout.block_size)))
    d_pad = max(_MIN_DOT, next_power_of_2(d))
    upcast = q.dtype == torch.bfloat16 and kernels_interpreted(_sampled_tile_kernel)
    launch(
        _sampled_tile_kernel, (b * hkv * per_head,),
        q, k, out, nonfinite if nonfinite is not None else out,
        *q.stride(), *k.stride(), *out.stride(),
        hkv, group, samples, tiles, per_head, nq, nk, nk_tokens, q.shape[2],
        layout.query_start, layout.first_query_tile, layout.block_size,
        math.log2(math.e) / math.sqrt(d),
        CAUSAL=causal, HEAD_DIM=d, D_PAD=d_pad, ROWS=rows, PAIRS=pairs, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32 or upcast, UPCAST=upcast, CHECK=nonfinite is not None,
        num_warps=4 if d_pad <= 128 else 8,
    )
    if not normalize:
        return out
    total = out.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-30), torch.zeros_like(out))


__all__ = ["TARGET_ROWS", "sampled_tile_probabilities"]
