"""The cascade's sampled-query stage inside the restricted antidiagonal kernel.

With ``sampled_queries == block_size // antidiagonal_stride`` the stage's
samples (docs/estimators.rst, the cascade's step 2b: the last real query of
each run of ``block_size / R`` positions) are the query groups' last real
rows: one per row of the packed kernel (:mod:`prism.optimized.antidiagonal_packed`).
That kernel already loads, for each gathered key block and each antidiagonal
row ``u``, row ``S-1-u`` of every key group; over the ``S`` values of ``u``
that is every key of the block. So the kernel can score each row's sample
against the same loaded keys (one more ``ROWS x D`` by ``D x BLOCK_KG``
product per ``u``) and keep, per row, the online softmax statistics of those
scores over the row's candidate keys and, per listed key tile, the sum of
``2^(s - m)``, without the separate launch's scan and key loads
(:mod:`prism.optimized.candidate_sampled`).

The helpers here are that work; the packed kernel calls them under its
``SAMPLED`` constexpr, writes the per-tile sums and the block maxima into a
one-pass scratch laid out as its own, and in its second pass turns them into
each (head, query tile)'s sum of its samples' probabilities per key tile (0
off the candidates), the rows of
:func:`~prism.optimized.candidate_sampled.candidate_sampled_scores`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .antidiagonal_blocks import _dot, _u_loads


@triton.jit
def _group_samples(q_head, stride_qn, stride_qd, groups, rows_ok, query_start, num_queries,
                   STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   UPCAST: tl.constexpr, SAMPLED: tl.constexpr):
    """``(positions, (ROWS, D_PAD) rows)`` of each query group's sample: its last real
    query (absolute position). Without ``SAMPLED``, placeholders (nothing loaded)."""
    pos = tl.minimum(groups * STRIDE + STRIDE - 1, query_start + num_queries - 1)
    dims = tl.arange(0, D_PAD)
    if SAMPLED:
        rows = tl.load(q_head[:, None] + (pos - query_start).to(tl.int64)[:, None] * stride_qn
                       + dims[None, :] * stride_qd,
                       mask=rows_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
        if UPCAST:
            rows = rows.to(tl.float32)
    else:
        rows = tl.zeros((1, D_PAD), dtype=tl.float32)
    return pos, rows


@triton.jit
def _scores_with_samples(q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd, groups,
                         rows_ok, key_groups, query_start, num_queries, num_keys, q_desc,
                         q_head_row, q_group, s_rows, s_pos, cand, s_scale, m2, l2, e2_rows,
                         mb2_rows, key_start, chunk_tiles, CAUSAL: tl.constexpr,
                         STRIDE: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_KG: tl.constexpr, PER_TILE: tl.constexpr,
                         IEEE: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """One gathered key block: the antidiagonal products (as
    :func:`~prism.optimized.antidiagonal_blocks._raw_scores`) and, from the same key
    loads, the samples' scores (``s_scale``: log2(e) / sqrt(D)) over the row's
    candidate keys at or before its sample (``cand``, ``s_pos``). The block's per-tile
    sums of ``2^(s - m_block)`` and ``m_block`` go to the scratch rows at list entry
    ``key_start / PER_TILE``. Returns the products and the samples' running max and
    sum ``m2``, ``l2`` (base 2) updated by the block."""
    TILES_PER_CHUNK: tl.constexpr = BLOCK_KG // PER_TILE
    raw = tl.zeros((ROWS, BLOCK_KG), dtype=tl.float32)
    sums = tl.zeros((ROWS, TILES_PER_CHUNK), dtype=tl.float32)
    m_block = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    for u in range(STRIDE):
        q_rows, k_cols = _u_loads(u, q_head, k_head, stride_qn, stride_qd, stride_kn,
                                  stride_kd, groups, rows_ok, key_groups, query_start,
                                  num_queries, num_keys, q_desc, None, q_head_row, q_group, 0,
                                  0, STRIDE, D_PAD, HEAD_DIM, ROWS, BLOCK_KG, UPCAST, TMA, True)
        raw = _dot(q_rows, k_cols, raw, IEEE)
        keys = key_groups * STRIDE + (STRIDE - 1 - u)
        allowed = cand & (keys < num_keys)[None, :]
        if CAUSAL:
            allowed = allowed & (keys[None, :] <= s_pos[:, None])
        s = _dot(s_rows, k_cols, tl.zeros((ROWS, BLOCK_KG), dtype=tl.float32), IEEE)
        s = tl.where(allowed, s * s_scale, float("-inf"))
        m_new = tl.maximum(m_block, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - shift[:, None])
        sums = (sums * tl.math.exp2(m_block - shift)[:, None]
                + tl.sum(tl.reshape(p, (ROWS, TILES_PER_CHUNK, PER_TILE)), axis=2))
        m_block = m_new
    block_shift = tl.where(m_block == float("-inf"), 0.0, m_block)
    m_new = tl.maximum(m2, m_block)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    l2 = l2 * tl.math.exp2(m2 - shift) + tl.sum(sums, axis=1) * tl.math.exp2(block_shift - shift)
    tl.store(e2_rows + (key_start // PER_TILE + chunk_tiles)[None, :], sums)
    tl.store(mb2_rows + key_start // BLOCK_KG, block_shift)
    return raw, m_new, l2


__all__: list = []
