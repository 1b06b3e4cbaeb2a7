"""Antidiagonal tile scores with the query heads of a GQA group packed into one program.

The same result as :func:`prism.optimized.estimators.antidiagonal_tile_probabilities`
(and :func:`prism.reference.estimators.antidiagonal_probabilities`), laid out
for tensor cores: one program takes one (batch, KV head) and ``TILES``
consecutive query tiles, and its rows are the query groups of those tiles for
every query head of the GQA group (``group * TILES * groups_per_tile`` rows,
64 for 4 heads at stride 32 and tile 128, or for 4 heads at stride 8 with one
tile). Each key block it loads serves all of them in one ``ROWS x BLOCK_KG``
matrix product per antidiagonal row ``u``, where the per-head kernel ran 16-row
products with most rows empty at large strides.

Two passes over the admissible key groups, as in the per-head kernel: online
softmax statistics per row, then the normalised scores summed into key tiles
and over each (head, query tile)'s groups
(exact fp32 sums over reshaped blocks), stored once per key-tile chunk. Applies when the groups per
tile are a power of two dividing ``BLOCK_KEY_GROUPS``
(:func:`antidiagonal_packed_applies`); a GQA group whose rows pass ``MAX_ROWS``
(32 query heads per KV head at stride 8, say) is split over programs of fewer
heads (``PackedTuning.heads``, :func:`fitting_heads`).

With a candidate tile mask (the ``"cascade"`` estimator, :mod:`prism.optimized.cascade`)
each row's softmax runs over its candidate key tiles' groups only, and only the
key tiles in which some row of the program has a candidate are scored: the
program first lists them (a vectorised scan of its pairs' candidate rows, which
also stores zeros in every other tile of their output rows), then both passes
take the list ``BLOCK_KG // groups_per_tile`` tiles at a time as one gathered
key block (the key rows of listed tiles by pointer loads, the query rows as
in the dense form; unused list places are masked everywhere). On the H200 this
cut the accurate preset's restricted scores by a third to two fifths against
scoring every whole key block that holds a candidate
(results/h200_candidate_shapes_bd9e739.json: 0.063 -> 0.039 ms at 8K, 0.210 ->
0.126 at 32K, 0.796 -> 0.539 at 128K): a program's candidates lie mostly in the
sink and the diagonal tiles, in different blocks of eight (4.6 listed tiles
against 2.1 such blocks per program at 8K on the CPU draw of the synthetic
inputs, results/cpu_cascade_block_shares_af005af.json).

With ``sampled=`` as well (``SAMPLED``; the cascade's sampled stage where its
samples are the query groups, :func:`fused_sampled_applies`), the candidate
form also scores each row's sample against the same key loads and writes the
stage's rows (:mod:`prism.optimized.antidiagonal_sampled`). The launch shapes
(:class:`PackedTuning`, the tuned tables, :func:`default_tuning`) live in
:mod:`prism.optimized.antidiagonal_shapes` and are re-exported here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from prism.reference.tiles import TileLayout

from ._runtime import kernels_interpreted, next_power_of_2
from .antidiagonal_blocks import (
    _candidate_block,
    _candidate_tiles,
    _first_pass_step,
    _gathered_key_groups,
    _listed_tiles,
    _one_pass_sums,
    _program_heads,
    _raw_scores,
    _scaled_scores,
    _scratch_rows,
    _store_pair_sums,
    _tile_sums,
    masked_scores,
    online_softmax_step,
)
from .antidiagonal_sampled import _group_samples, _scores_with_samples
from .antidiagonal_shapes import (  # noqa: F401  (the launch shapes: public here too)
    _MIN_DOT,
    BLOCK_KEY_GROUPS,
    CANDIDATE_TUNED,
    MAX_ROWS,
    ONE_PASS_MAX_PER_TILE,
    ONE_PASS_MAX_SCRATCH_BYTES,
    SAMPLED_TUNED,
    TARGET_ROWS,
    TUNED,
    TUNED_MAX_HEAD_DIM,
    PackedTuning,
    _check_tuning,
    _shape,
    antidiagonal_packed_applies,
    causal_extents,
    default_tuning,
    fitting_heads,
    fused_sampled_applies,
)
from .launch import launch
from .pooling import _flag_if_nonfinite

#: Candidate flags one step of the candidate kernel's tile scan loads (pairs x key
#: tiles).
SCAN_ELEMENTS = 4096


def _tma_applies(q: torch.Tensor, k: torch.Tensor, layout: TileLayout, stride: int,
                 rows: int, heads: int, per_head: int, d: int) -> bool:
    """Whether the packed kernel may load through tensor descriptors (``tma=1``):
    16-bit q and k, contiguous, both lengths whole groups, the KV prefix whole
    tiles, the program's rows exactly ``heads`` heads x ``per_head`` groups, D a
    power of two (the shapes measured on the H200: bf16, D 128)."""
    return (q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype
            and q.is_contiguous() and k.is_contiguous()
            and q.shape[2] % stride == 0 and k.shape[2] % stride == 0
            and layout.query_start % layout.block_size == 0
            and heads & (heads - 1) == 0 and heads * per_head == rows
            and d == next_power_of_2(d) and d >= _MIN_DOT
            and q.data_ptr() % 16 == 0 and k.data_ptr() % 16 == 0)


@triton.jit
def _packed_kernel(
    Q, K, OUT, E, MB, NONFINITE, CAND, LIST, SECOND, E2, MB2,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_orow, stride_otile,
    stride_cb, stride_ch, stride_cq, stride_ck,
    num_kv_heads, group, heads, tiles_per_program, programs_per_head, num_queries, num_keys,
    query_start, first_query_tile, num_query_tiles, num_key_tiles, num_key_groups, qk_scale,
    scratch_blocks, total_q_heads, total_kv_heads, query_groups,
    CAUSAL: tl.constexpr, STRIDE: tl.constexpr, PER_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr, PAIRS: tl.constexpr,
    BLOCK_KG: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ONE_PASS: tl.constexpr, CHECK: tl.constexpr, TMA: tl.constexpr = False,
    GROUP: tl.constexpr = 1, CANDIDATES: tl.constexpr = False,
    SCAN_TILES: tl.constexpr = 16, D_SPLIT: tl.constexpr = 1, SAMPLED: tl.constexpr = False,
    EXTENTS: tl.constexpr = True,
):
    pid = tl.program_id(0)
    # Program = (batch, KV head, which `heads` of its group, query tiles).
    block, bh, b, hk, head0 = _program_heads(pid, programs_per_head, group, heads,
                                             num_kv_heads)

    # Row = (head in group g, tile t, group in tile r); pair = (g, t).
    rows = tl.arange(0, ROWS)
    per_head = tiles_per_program * PER_TILE
    g = rows // per_head
    t = (rows // PER_TILE) % tiles_per_program
    tile_row = block * tiles_per_program + t
    groups = (first_query_tile + tile_row) * PER_TILE + rows % PER_TILE
    first_valid = query_start // STRIDE
    last_valid = (query_start + num_queries - 1) // STRIDE
    rows_ok = ((rows < heads * per_head) & (tile_row < num_query_tiles)
               & (groups >= first_valid) & (groups <= last_valid))
    q_head = Q + b.to(tl.int64) * stride_qb + (head0 + g).to(tl.int64) * stride_qh
    k_head = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    key_end = num_key_groups
    if CAUSAL:
        key_end = tl.minimum(key_end, tl.max(tl.where(rows_ok, groups, -1), axis=0) + 1)
    else:
        key_end = tl.where(tl.max(rows_ok.to(tl.int32), axis=0) > 0, key_end, 0)
    q_desc = None
    k_desc = None
    if TMA:
        # q and k as (heads, groups, S * D); a program's rows are GROUP (= heads) heads
        # x ROWS / GROUP consecutive groups (_tma_applies).
        q_desc = tl.make_tensor_descriptor(
            Q, shape=[total_q_heads, query_groups, STRIDE * HEAD_DIM],
            strides=[query_groups * STRIDE * HEAD_DIM, STRIDE * HEAD_DIM, 1],
            block_shape=[GROUP, ROWS // GROUP, HEAD_DIM // D_SPLIT])
        k_desc = tl.make_tensor_descriptor(
            K, shape=[total_kv_heads, num_key_groups, STRIDE * HEAD_DIM],
            strides=[num_key_groups * STRIDE * HEAD_DIM, STRIDE * HEAD_DIM, 1],
            block_shape=[1, BLOCK_KG, HEAD_DIM // D_SPLIT])
    q_head_row = b * (num_kv_heads * group) + head0
    q_group = block * per_head
    # CANDIDATES: row r's (query head, query tile) row of the candidate tile mask.
    cand_rows = (CAND + b.to(tl.int64) * stride_cb + (head0 + g).to(tl.int64) * stride_ch
                 + tile_row.to(tl.int64) * stride_cq)

    TILES_PER_CHUNK: tl.constexpr = BLOCK_KG // PER_TILE
    chunk_tiles = tl.arange(0, TILES_PER_CHUNK)
    # Row // PER_TILE is the row's (head, tile) pair: g * tiles_per_program + t.
    pairs = tl.arange(0, PAIRS)
    pair_g = pairs // tiles_per_program
    pair_tile = block * tiles_per_program + pairs % tiles_per_program
    pair_ok = (pairs < heads * tiles_per_program) & (pair_tile < num_query_tiles)
    out_rows = (OUT + b.to(tl.int64) * stride_ob
                + (head0 + pair_g).to(tl.int64)[:, None] * stride_oh
                + pair_tile.to(tl.int64)[:, None] * stride_orow)
    key_blocks = tl.cdiv(key_end, BLOCK_KG)
    # One-pass scratch of this program: per row, for each of its s_blocks key blocks,
    # the per-tile sums of 2^(s - m_block) (TILES_PER_CHUNK of them) and m_block.
    s_start, s_blocks = _scratch_rows(pid, programs_per_head, block, first_query_tile,
                                      tiles_per_program, scratch_blocks, CAUSAL and EXTENTS,
                                      TILES_PER_CHUNK)
    row_offsets = rows * s_blocks.to(tl.int32)  # a program's scratch is far below 2^31
    e_rows = (E + s_start * (ROWS * TILES_PER_CHUNK)) + (row_offsets * TILES_PER_CHUNK)[:, None]
    mb_rows = (MB + s_start * ROWS) + row_offsets
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    bad = tl.zeros((ROWS,), dtype=tl.float32)  # NaN once a full block held a NaN/Inf score
    # SAMPLED: each query group's sample (antidiagonal_sampled), its statistics, output
    # rows and one-pass scratch (laid out as E and MB).
    m2 = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l2 = tl.zeros((ROWS,), dtype=tl.float32)
    out2_rows = (SECOND + b.to(tl.int64) * stride_ob
                 + (head0 + pair_g).to(tl.int64)[:, None] * stride_oh
                 + pair_tile.to(tl.int64)[:, None] * stride_orow)
    e2_rows = (E2 + s_start * (ROWS * TILES_PER_CHUNK)) + (row_offsets * TILES_PER_CHUNK)[:, None]
    mb2_rows = (MB2 + s_start * ROWS) + row_offsets
    s_pos, s_rows = _group_samples(q_head, stride_qn, stride_qd, groups, rows_ok, query_start,
                                   num_queries, STRIDE, HEAD_DIM, D_PAD, UPCAST, SAMPLED)
    if CANDIDATES:
        # Only the key tiles holding a candidate of some pair are scored: they are
        # listed once (the others' output tiles get zeros there), and each step of
        # both passes takes the next BLOCK_KG // PER_TILE of them as one gathered
        # key block (key rows by pointer loads).
        cand_pairs = (CAND + b.to(tl.int64) * stride_cb
                      + (head0 + pair_g).to(tl.int64) * stride_ch
                      + pair_tile.to(tl.int64) * stride_cq)
        active = LIST + pid.to(tl.int64) * scratch_blocks * TILES_PER_CHUNK
        num_active = _candidate_tiles(cand_pairs, pair_ok,
                                      tl.minimum(num_key_tiles, key_blocks * TILES_PER_CHUNK),
                                      stride_ck, active, out_rows, stride_otile, PAIRS,
                                      SCAN_TILES, True, out2_rows, SAMPLED)
        # Every thread reads the list some threads wrote.
        tl.debug_barrier()
        for slot in range(0, num_active, TILES_PER_CHUNK):
            key_groups = _gathered_key_groups(active, slot, num_active, num_key_tiles,
                                              BLOCK_KG, PER_TILE)
            cand = _candidate_block(cand_rows, rows_ok, key_groups, num_key_tiles, stride_ck,
                                    PER_TILE)
            if SAMPLED:
                # The same key loads also score the samples: their per-tile sums.
                raw, m2, l2 = _scores_with_samples(
                    q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd, groups,
                    rows_ok, key_groups, query_start, num_queries, num_keys, q_desc, q_head_row,
                    q_group, s_rows, s_pos, cand, qk_scale * STRIDE, m2, l2, e2_rows, mb2_rows,
                    slot * PER_TILE, chunk_tiles, CAUSAL, STRIDE, D_PAD, HEAD_DIM, ROWS,
                    BLOCK_KG, PER_TILE, IEEE, UPCAST, TMA)
            else:
                raw = _raw_scores(q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd,
                                  groups, rows_ok, key_groups, query_start, num_queries,
                                  num_keys, q_desc, k_desc, q_head_row, q_group, bh, 0, STRIDE,
                                  D_PAD, HEAD_DIM, ROWS, BLOCK_KG, IEEE, UPCAST, TMA, True,
                                  D_SPLIT)
            # The scratch is indexed by list position (slot * PER_TILE stands for a
            # key start), the masks by the gathered groups.
            m_i, l_i, bad = _first_pass_step(
                m_i, l_i, bad, raw, False, groups, rows_ok, key_groups, key_end, qk_scale,
                e_rows, mb_rows, slot * PER_TILE, chunk_tiles, CAUSAL, CHECK, ROWS, BLOCK_KG,
                PER_TILE, ONE_PASS, cand, CANDIDATES)
    else:
        # Key blocks below full_end need no mask: every key group of the block is before
        # key_end and, causally, at or before the program's first real query group. Rows
        # holding no real query score whatever they loaded there (zeros, or another
        # position's row through a descriptor); inv_l = 0 drops them below.
        full_end = key_end
        if CAUSAL:
            full_end = tl.minimum(full_end, tl.min(tl.where(rows_ok, groups, key_end), 0) + 1)
        for key_start in range(0, key_end, BLOCK_KG):
            key_groups = key_start + tl.arange(0, BLOCK_KG)
            raw = _raw_scores(q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd,
                              groups, rows_ok, key_groups, query_start, num_queries, num_keys,
                              q_desc, k_desc, q_head_row, q_group, bh, key_start, STRIDE, D_PAD,
                              HEAD_DIM, ROWS, BLOCK_KG, IEEE, UPCAST, TMA, False, D_SPLIT)
            m_i, l_i, bad = _first_pass_step(
                m_i, l_i, bad, raw, key_start + BLOCK_KG <= full_end, groups, rows_ok,
                key_groups, key_end, qk_scale, e_rows, mb_rows, key_start, chunk_tiles, CAUSAL,
                CHECK, ROWS, BLOCK_KG, PER_TILE, ONE_PASS)

    if CHECK:
        _flag_if_nonfinite(l_i + bad, NONFINITE)
    m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(rows_ok & (l_i > 0), 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    m2_shift = tl.where(m2 == float("-inf"), 0.0, m2)
    inv_l2 = tl.where(rows_ok & (l2 > 0), 1.0 / tl.where(l2 > 0, l2, 1.0), 0.0)
    if ONE_PASS:
        # Other threads of the program read the scratch this pass wrote.
        tl.debug_barrier()
    if CANDIDATES:
        for slot in range(0, num_active, TILES_PER_CHUNK):
            if ONE_PASS:
                by_tile = _one_pass_sums(e_rows, slot * PER_TILE, chunk_tiles,
                                         tl.load(mb_rows + slot // TILES_PER_CHUNK), m_shift,
                                         inv_l, PER_TILE)
            else:
                key_groups = _gathered_key_groups(active, slot, num_active, num_key_tiles,
                                                  BLOCK_KG, PER_TILE)
                cand = _candidate_block(cand_rows, rows_ok, key_groups, num_key_tiles,
                                        stride_ck, PER_TILE)
                s = _scaled_scores(q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd,
                                   groups, rows_ok, key_groups, key_end, query_start,
                                   num_queries, num_keys, qk_scale, q_desc, k_desc, q_head_row,
                                   q_group, bh, 0, CAUSAL, STRIDE, D_PAD, HEAD_DIM,
                                   ROWS, BLOCK_KG, IEEE, UPCAST, False, TMA, cand, CANDIDATES,
                                   True, D_SPLIT)
                by_tile = _tile_sums(s, m_shift, inv_l, ROWS, BLOCK_KG, PER_TILE)
            listed = _listed_tiles(active, slot, num_active, num_key_tiles, TILES_PER_CHUNK)
            _store_pair_sums(out_rows, pair_ok, by_tile, listed, num_key_tiles, stride_otile,
                             PAIRS, PER_TILE, TILES_PER_CHUNK)
            if SAMPLED:
                by_tile2 = _one_pass_sums(e2_rows, slot * PER_TILE, chunk_tiles,
                                          tl.load(mb2_rows + slot // TILES_PER_CHUNK),
                                          m2_shift, inv_l2, PER_TILE)
                _store_pair_sums(out2_rows, pair_ok, by_tile2, listed, num_key_tiles,
                                 stride_otile, PAIRS, PER_TILE, TILES_PER_CHUNK)
    else:
        for key_start in range(0, key_end, BLOCK_KG):
            if ONE_PASS:
                by_tile = _one_pass_sums(e_rows, key_start, chunk_tiles,
                                         tl.load(mb_rows + key_start // BLOCK_KG), m_shift,
                                         inv_l, PER_TILE)
            else:
                key_groups = key_start + tl.arange(0, BLOCK_KG)
                s = _scaled_scores(q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd,
                                   groups, rows_ok, key_groups, key_end, query_start,
                                   num_queries, num_keys, qk_scale, q_desc, k_desc, q_head_row,
                                   q_group, bh, key_start, CAUSAL, STRIDE, D_PAD, HEAD_DIM,
                                   ROWS, BLOCK_KG, IEEE, UPCAST, False, TMA, None, False, False,
                                   D_SPLIT)
                by_tile = _tile_sums(s, m_shift, inv_l, ROWS, BLOCK_KG, PER_TILE)
            _store_pair_sums(out_rows, pair_ok, by_tile, key_start // PER_TILE + chunk_tiles,
                             num_key_tiles, stride_otile, PAIRS, PER_TILE, TILES_PER_CHUNK)


def antidiagonal_packed_probabilities(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                                      stride: int, causal: bool = True,
                                      tuning: PackedTuning | None = None, *,
                                      normalize: bool = True,
                                      nonfinite: torch.Tensor | None = None,
                                      candidates: torch.Tensor | None = None,
                                      sampled: torch.Tensor | None = None) -> torch.Tensor:
    """Antidiagonal tile probabilities, GQA heads packed (inputs validated by the caller).

    ``tuning`` overrides the launch shape (:func:`default_tuning`); the result
    does not depend on it beyond fp32 summation order. ``normalize=False``
    returns each row before its division by its sum, defined only at the
    admissible tiles (the selection's last kernel normalises). ``nonfinite``, a
    float64 device flag, is set when q or k holds NaN/Inf (with ``candidates``, only
    in the key blocks scored).

    ``candidates`` (B, Hq, nq, nk) bool restricts each query group's softmax to
    the key groups of its query tile's candidate key tiles (the ``"cascade"``
    estimator, :func:`prism.reference.estimators.candidate_antidiagonal_probabilities`);
    a program scores only the key tiles in which some of its rows has a
    candidate tile (module docstring).

    ``sampled`` (B, Hq, nq, nk) float32, with ``candidates`` where
    :func:`fused_sampled_applies`: the kernel also writes the cascade's
    sampled-query rows there, from the same key loads
    (:mod:`prism.optimized.antidiagonal_sampled`; each query group's sample,
    as :func:`prism.optimized.candidate_sampled.candidate_sampled_scores`).

    Returns
    -------
    Tensor (B, Hq, nq, nk), float32
    """
    b, hq, nq_tokens, d = q.shape
    hkv, nk_tokens = k.shape[1], k.shape[2]
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    # Every admissible tile of every row is stored (a program's key groups reach
    # its last query tile's); the others only matter when normalised here.
    out = (torch.zeros if normalize else torch.empty)(b, hq, nq, nk, dtype=torch.float32,
                                                      device=q.device)
    if out.numel() == 0:
        return out
    (per_tile, d_pad, tuning, heads, tiles, rows, programs, key_blocks, extents,
     one_pass) = _shape(q, k, layout, stride, tuning, candidates is not None,
                        sampled is not None, causal)
    if sampled is not None and not (candidates is not None and one_pass and tuning.d_split == 1):
        raise ValueError("the sampled stage runs in the packed kernel only with candidates, "
                         "the one-pass form and D_SPLIT 1 (fused_sampled_applies)")
    pairs = rows // per_tile
    per_head = -(-nq // tiles)
    upcast = q.dtype == torch.bfloat16 and kernels_interpreted(_packed_kernel)
    key_groups = -(-nk_tokens // stride)
    # One-pass scratch: per row, the key blocks its program holds (_shape's extents, laid
    # out by the kernel's _scratch_rows), each with its tile sums and its running max.
    per_chunk = tuning.block_kg // per_tile
    tma = bool(tuning.tma) and _tma_applies(q, k, layout, stride, rows, heads,
                                            tiles * per_tile, d)
    e = torch.empty(extents * per_chunk if one_pass else 1, dtype=torch.float32,
                    device=q.device)
    mb = torch.empty(extents if one_pass else 1, dtype=torch.float32, device=q.device)
    # The sampled stage's own one-pass scratch, laid out as e and mb.
    e2, mb2 = (torch.empty_like(e), torch.empty_like(mb)) if sampled is not None else (mb, mb)
    if candidates is not None:
        cand = candidates.view(torch.uint8)
        cand_strides = cand.stride()
        # Per program, the key tiles it scores (written and read by the kernel).
        active = torch.empty(programs * key_blocks * (tuning.block_kg // per_tile),
                             dtype=torch.int32, device=q.device)
    else:
        cand, cand_strides, active = mb, (0, 0, 0, 0), mb
    launch(
        _packed_kernel, (programs,), q, k, out, e, mb,
        nonfinite if nonfinite is not None else mb, cand, active,
        sampled if sampled is not None else mb, e2, mb2, *q.stride(), *k.stride(),
        *out.stride(), *cand_strides,
        hkv, hq // hkv, heads, tiles, per_head, nq_tokens, nk_tokens, layout.query_start,
        layout.first_query_tile, nq, nk, key_groups,
        math.log2(math.e) / (math.sqrt(d) * stride), key_blocks, b * hq,
        b * hkv, nq_tokens // stride,
        CAUSAL=causal, STRIDE=stride, PER_TILE=per_tile, HEAD_DIM=d, D_PAD=d_pad, ROWS=rows,
        PAIRS=pairs, BLOCK_KG=tuning.block_kg, IEEE=q.dtype == torch.float32 or upcast,
        UPCAST=upcast, ONE_PASS=one_pass, CHECK=nonfinite is not None, TMA=tma,
        GROUP=heads if tma else 1, CANDIDATES=candidates is not None,
        SCAN_TILES=min(next_power_of_2(key_blocks * (tuning.block_kg // per_tile)),
                       max(16, SCAN_ELEMENTS // pairs)), D_SPLIT=tuning.d_split,
        SAMPLED=sampled is not None, EXTENTS=causal_extents(causal), num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
    )
    if not normalize:
        return out
    # Rows sum to 1; a row with no admissible tile is all zeros and stays so (0 / 1e-30).
    return out.div_(out.sum(dim=-1, keepdim=True).clamp_min_(1e-30))


__all__ = ["CANDIDATE_TUNED", "PackedTuning", "antidiagonal_packed_applies", "fitting_heads",
           "fused_sampled_applies",
           "antidiagonal_packed_probabilities", "TUNED", "masked_scores", "default_tuning",
           "online_softmax_step"]
