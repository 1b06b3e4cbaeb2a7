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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

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
    _store_pair_sums,
    _tile_sums,
    masked_scores,
    online_softmax_step,
)
from .launch import launch
from .pooling import _flag_if_nonfinite

BLOCK_KEY_GROUPS = 64
TARGET_ROWS = 64
MAX_ROWS = 128
_MIN_DOT = 16
#: Candidate flags one step of the candidate kernel's tile scan loads (pairs x key
#: tiles).
SCAN_ELEMENTS = 4096
#: Largest number of groups per tile for which the one-pass form applies (stride 8
#: at tile 128: the scratch is 16 times the output).
ONE_PASS_MAX_PER_TILE = 16
#: Largest one-pass scratch (bytes); a larger call takes the two-pass form. At 128K
#: tokens, 32/8 heads, tile 128 and stride 8 the scratch is about 2.5 GiB.
ONE_PASS_MAX_SCRATCH_BYTES = 8 << 30


@dataclass(frozen=True)
class PackedTuning:
    """Launch shape of the packed kernel.

    Attributes
    ----------
    target_rows : int
        Rows (query groups x heads of a GQA group) a program aims to hold; at
        large strides more rows reuse each loaded key block more often.
    block_kg : int
        Key groups per matrix product (a power of two, a multiple of the groups
        per tile).
    num_warps, num_stages : int
        Triton's launch parameters (``num_stages`` pipelines the loop over the
        rows ``u`` of a group).
    one_pass : int
        1: score every key block once, keep each row's per-tile sums of
        ``2^(s - m_block)`` and each block's running max ``m_block`` in a
        scratch buffer, and rescale them by ``2^(m_block - m) / l`` at the end
        instead of recomputing the scores (applies when a tile holds at most
        :data:`ONE_PASS_MAX_PER_TILE` groups; the scratch is that many times
        the output). 0: two passes over the scores.
    tma : int
        1: load the query and key rows of each ``u`` through tensor
        descriptors (the bulk tensor copy engine on Hopper) over q and k seen
        as ``(heads, groups, S * D)``, where :func:`_tma_applies` says the
        shapes allow it (contiguous q and k, lengths and the KV prefix whole
        groups and tiles, the program's rows exactly its heads' groups);
        elsewhere, and with 0, pointer loads.
    heads : int
        Query heads of a GQA group one program holds (a divisor of the group;
        tensor descriptors need a power of two; 0: the whole group).
        :func:`default_tuning` splits only groups whose rows pass
        :data:`MAX_ROWS` (:func:`fitting_heads`). With one head and descriptors
        a program's query rows are one box of consecutive groups, which the
        matrix product reads straight from shared memory (several heads' rows
        are first copied to registers for every ``u``), but on the H200 that
        measured slower for the tuned shapes (benchmarks/NOTES.md item 49 (b)).
    d_split : int
        Pieces each ``u`` product is split into along the head dim (a power of
        two; each piece is one pipelined step with its own loads), so that a
        head dim of 256 runs a shape sized for 128 with the same shared memory.
    """

    target_rows: int = TARGET_ROWS
    block_kg: int = BLOCK_KEY_GROUPS
    num_warps: int = 4
    num_stages: int = 3
    one_pass: int = 1
    tma: int = 0
    heads: int = 0
    d_split: int = 1


#: Launch shapes by groups per tile (``block_size // stride``) for head dims up to
#: ``TUNED_MAX_HEAD_DIM``. Measured on the H200 (benchmarks/results/
#: h200_estimators_e37bc51.json, ``bench_estimators.py --stages``; 32/8 heads, D 128,
#: bf16, 128K tokens): 128 rows and 128 key groups on 8 warps ran strides 32/64/128
#: in 12.3/6.8/4.2 ms against 20.4/11.5/6.7 ms for the generic 64 x 64 on 4 warps.
#: Stride 8 (16 groups per tile, one pass; h200_estimators_6f0e6ce.json): 25.2 ms
#: against 34.3 ms for the generic shape and 45.2 ms for two passes. Loads through
#: tensor descriptors (h200_estimators_4a1c52e.json): stride 8 at 8K/32K/128K
#: 0.149/1.34/21.3 ms against 0.174/1.54/24.8 ms with pointer loads, stride 32
#: 0.083/0.475/5.63 against 0.131/0.529/6.28 ms; 128 x 256 and 256 x 128 shapes (two
#: stages) were then slower at every length (before the unmasked step below).
#: Strides 64 and 128 were not timed with them.
#: Stride 16 (8 groups per tile; h200_estimators_flat_stages_f3efba6.json, 128K): 12.0
#: ms with tensor descriptors against 21.8 for the generic shape.
#: Stride 8 since the dense path's unmasked step (h200_packed_shapes_dc0c941.json): 128
#: rows x 256 key groups on two stages, 19.33 / 1.251 ms at 128K / 32K against 21.01 /
#: 1.309 for 128 x 128 on three (which no longer fit shared memory at 256); before
#: that step 128 x 256 spilled 388 bytes a thread and was slower at 32K.
#: ``bench_estimators.py --use-fastest`` overwrites entries with a run's fastest.
TUNED: dict[int, PackedTuning] = {
    per_tile: PackedTuning(target_rows=128, block_kg=128, num_warps=8, num_stages=3,
                           one_pass=1, tma=int(per_tile in (4, 8, 16)))
    for per_tile in (1, 2, 4, 8)
}
TUNED[16] = PackedTuning(target_rows=128, block_kg=256, num_warps=8, num_stages=2, one_pass=1,
                         tma=1)
#: Launch shapes of candidate-restricted calls (the cascade), by groups per tile.
#: Few key blocks of a program are scored, so small programs and blocks win
#: (h200_estimators_b14b03c.json, stride 8 at 128K: 64 x 64 with tensor descriptors
#: 0.876 ms against 1.06 for the dense calls' 128 x 128; h200_estimators_f6fb415.json,
#: stride 16: 0.801 against 0.896 for the generic shape without them, 1.13 for
#: 128 x 128; both before the candidate tiles were gathered). With them gathered
#: (h200_candidate_shapes_634b2a0.json, the preset's whole selection, graph replays at
#: 8K / 32K / 128K): 64 x 64 on 3 stages 0.136 / 0.420-0.427 / 2.208-2.215 ms; on 4
#: stages 0.137 / 0.419 / 2.184; 64 x 32 0.134 / 0.427 / 2.188 (bd9e739's run); 32 rows
#: 0.150 / 0.492 / 2.51; 8 warps 0.140 / 0.443 / 2.35.
CANDIDATE_TUNED: dict[int, PackedTuning] = {
    per_tile: PackedTuning(target_rows=64, block_kg=64, num_warps=4, num_stages=3,
                           one_pass=1, tma=1)
    for per_tile in (8, 16)
}
#: The tuned shapes' shared memory is sized for this head dim; larger head dims take
#: them with each ``u`` product split into pieces of this width
#: (``PackedTuning.d_split``).
TUNED_MAX_HEAD_DIM = 128


def default_tuning(per_tile: int, group: int, head_dim: int = 128,
                   candidates: bool = False) -> PackedTuning:
    """The launch shape used unless one is passed (:data:`TUNED`, or with
    ``candidates`` :data:`CANDIDATE_TUNED`; else a generic one)."""
    tuned = (CANDIDATE_TUNED if candidates else TUNED).get(per_tile)
    if tuned is not None:
        heads = tuned.heads if tuned.heads and group % tuned.heads == 0 else 0
        if not heads and group * per_tile > MAX_ROWS:
            # The group's rows do not fit one program: the tuned shape over as many
            # of its heads as fill that shape's rows.
            heads = fitting_heads(group, per_tile, tuned.target_rows)
        if (heads or group) * per_tile <= tuned.target_rows:
            # Head dims above TUNED_MAX_HEAD_DIM in pieces of that width.
            d_split = max(1, next_power_of_2(head_dim) // TUNED_MAX_HEAD_DIM)
            if (heads, d_split) == (tuned.heads, tuned.d_split):
                return tuned  # the common case: no new object per call
            return dataclasses.replace(tuned, heads=heads, d_split=d_split)
    if group * per_tile > MAX_ROWS:
        # The group's rows do not fit one program: split it (fitting_heads).
        return PackedTuning(target_rows=MAX_ROWS, num_warps=8,
                            heads=fitting_heads(group, per_tile))
    rows = max(_MIN_DOT, next_power_of_2(group * per_tile))
    return PackedTuning(num_warps=4 if rows <= 64 else 8)


def fitting_heads(group: int, per_tile: int, rows: int = MAX_ROWS) -> int:
    """Query heads per program for a GQA group whose rows (``group * per_tile``)
    pass :data:`MAX_ROWS`: the largest power of two dividing ``group`` whose rows
    fit ``rows`` (1 for an odd group).

    Measured on the H200 (``results/h200_large_groups_42b8c73.json``, 32 query heads
    on one KV head, graph replays, masks equal): the accurate preset's selection
    0.126 / 0.388 ms at 8K / 32K against 1.32 / 15.7 with the reference restricted
    scores in torch that ran before; E5's dense stride-8 scores 0.147 / 1.25
    against 0.619 / 9.47 for the per-head kernel (1.25-1.27 ms for 32/8 heads at
    32K, ``h200_flatten_dense_dc227d3.json``). The generic 128-row shape instead of
    the tuned ones (16 heads a program for the restricted scores, 8 for the
    dense) was slower (``h200_large_groups_{7cb18ff,2c39b58}.json``, NOTES item 49).
    """
    heads = 1
    while group % (heads * 2) == 0 and heads * 2 * per_tile <= rows:
        heads *= 2
    return heads


def antidiagonal_packed_applies(layout: TileLayout, stride: int) -> bool:
    """Whether :func:`antidiagonal_packed_probabilities` takes this shape: groups per
    tile a power of two dividing ``BLOCK_KEY_GROUPS``. Any GQA group: one whose rows
    pass :data:`MAX_ROWS` is split over programs of :func:`fitting_heads` heads."""
    per_tile = layout.block_size // stride
    return per_tile & (per_tile - 1) == 0 and BLOCK_KEY_GROUPS % per_tile == 0


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


def _check_tuning(tuning: PackedTuning, per_tile: int, group: int, d_pad: int) -> None:
    for name in ("target_rows", "block_kg", "num_warps", "num_stages", "one_pass", "tma",
                 "heads", "d_split"):
        value = getattr(tuning, name)
        least = 0 if name in ("one_pass", "tma", "heads") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"PackedTuning.{name} must be an int >= {least}, got {value!r}")
    if tuning.block_kg & (tuning.block_kg - 1) or tuning.block_kg % per_tile:
        raise ValueError(f"PackedTuning.block_kg must be a power of two and a multiple of the "
                         f"{per_tile} groups per tile, got {tuning.block_kg}")
    if tuning.d_split & (tuning.d_split - 1):
        raise ValueError(f"PackedTuning.d_split must be a power of two, got {tuning.d_split}")
    if d_pad // tuning.d_split < _MIN_DOT:
        raise ValueError(f"PackedTuning.d_split={tuning.d_split} leaves pieces narrower than "
                         f"{_MIN_DOT} of the padded head dim {d_pad}; use a smaller d_split")
    if tuning.heads and group % tuning.heads:
        raise ValueError(f"PackedTuning.heads must divide the GQA group of {group} query heads "
                         f"(or be 0 for all of them), got {tuning.heads}")
    heads = tuning.heads or group
    if heads * per_tile > max(MAX_ROWS, tuning.target_rows):
        raise ValueError(f"{heads} query heads x {per_tile} groups per tile do not fit "
                         f"{max(MAX_ROWS, tuning.target_rows)} rows; set PackedTuning.heads "
                         f"to fewer heads per program")


@triton.jit
def _packed_kernel(
    Q, K, OUT, E, MB, NONFINITE, CAND, LIST,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_orow, stride_otile,
    stride_cb, stride_ch, stride_cq, stride_ck,
    num_kv_heads, group, heads, tiles_per_program, programs_per_head, num_queries, num_keys,
    query_start, first_query_tile, num_query_tiles, num_key_tiles, num_key_groups, qk_scale,
    scratch_tiles, scratch_blocks, total_q_heads, total_kv_heads, query_groups,
    CAUSAL: tl.constexpr, STRIDE: tl.constexpr, PER_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr, PAIRS: tl.constexpr,
    BLOCK_KG: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ONE_PASS: tl.constexpr, CHECK: tl.constexpr, TMA: tl.constexpr = False,
    GROUP: tl.constexpr = 1, CANDIDATES: tl.constexpr = False,
    SCAN_TILES: tl.constexpr = 16, D_SPLIT: tl.constexpr = 1,
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
    # One-pass scratch of this program: per row, per-tile sums of 2^(s - m_block)
    # (scratch_tiles columns) and each of its scratch_blocks key blocks' m_block.
    e_rows = E + (pid.to(tl.int64) * ROWS + rows)[:, None] * scratch_tiles
    mb_rows = MB + (pid.to(tl.int64) * ROWS + rows) * scratch_blocks
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    bad = tl.zeros((ROWS,), dtype=tl.float32)  # NaN once a full block held a NaN/Inf score
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
                                      SCAN_TILES)
        # Every thread reads the list some threads wrote.
        tl.debug_barrier()
        for slot in range(0, num_active, TILES_PER_CHUNK):
            key_groups = _gathered_key_groups(active, slot, num_active, num_key_tiles,
                                              BLOCK_KG, PER_TILE)
            cand = _candidate_block(cand_rows, rows_ok, key_groups, num_key_tiles, stride_ck,
                                    PER_TILE)
            raw = _raw_scores(q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd,
                              groups, rows_ok, key_groups, query_start, num_queries, num_keys,
                              q_desc, k_desc, q_head_row, q_group, bh, 0, STRIDE, D_PAD,
                              HEAD_DIM, ROWS, BLOCK_KG, IEEE, UPCAST, TMA, True, D_SPLIT)
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
            _store_pair_sums(out_rows, pair_ok, by_tile,
                             _listed_tiles(active, slot, num_active, num_key_tiles,
                                           TILES_PER_CHUNK),
                             num_key_tiles, stride_otile, PAIRS, PER_TILE, TILES_PER_CHUNK)
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
                                      candidates: torch.Tensor | None = None) -> torch.Tensor:
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

    Returns
    -------
    Tensor (B, Hq, nq, nk), float32
    """
    b, hq, nq_tokens, d = q.shape
    hkv, nk_tokens = k.shape[1], k.shape[2]
    group = hq // hkv
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    # Every admissible tile of every row is stored (a program's key groups reach
    # its last query tile's); the others only matter when normalised here.
    out = (torch.zeros if normalize else torch.empty)(b, hq, nq, nk, dtype=torch.float32,
                                                      device=q.device)
    if out.numel() == 0:
        return out
    per_tile = layout.block_size // stride
    d_pad = max(_MIN_DOT, next_power_of_2(d))
    if tuning is None:
        tuning = default_tuning(per_tile, group, d_pad, candidates is not None)
    _check_tuning(tuning, per_tile, group, d_pad)
    heads = tuning.heads or group
    tiles = max(1, tuning.target_rows // (heads * per_tile))
    rows = max(_MIN_DOT, next_power_of_2(heads * per_tile * tiles))
    pairs = rows // per_tile
    per_head = -(-nq // tiles)
    upcast = q.dtype == torch.bfloat16 and kernels_interpreted(_packed_kernel)
    programs = b * hkv * (group // heads) * per_head
    key_groups = -(-nk_tokens // stride)
    key_blocks = -(-key_groups // tuning.block_kg)
    scratch_tiles = key_blocks * (tuning.block_kg // per_tile)
    one_pass = (bool(tuning.one_pass) and per_tile <= ONE_PASS_MAX_PER_TILE
                and programs * rows * (scratch_tiles + key_blocks) * 4
                <= ONE_PASS_MAX_SCRATCH_BYTES)
    scratch_tiles = scratch_tiles if one_pass else 1
    tma = bool(tuning.tma) and _tma_applies(q, k, layout, stride, rows, heads,
                                            tiles * per_tile, d)
    e = torch.empty(programs * rows * scratch_tiles if one_pass else 1, dtype=torch.float32,
                    device=q.device)
    mb = torch.empty(programs * rows * key_blocks if one_pass else 1, dtype=torch.float32,
                     device=q.device)
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
        nonfinite if nonfinite is not None else mb, cand, active, *q.stride(), *k.stride(),
        *out.stride(), *cand_strides,
        hkv, group, heads, tiles, per_head, nq_tokens, nk_tokens, layout.query_start,
        layout.first_query_tile, nq, nk, key_groups,
        math.log2(math.e) / (math.sqrt(d) * stride), scratch_tiles, key_blocks, b * hq,
        b * hkv, nq_tokens // stride,
        CAUSAL=causal, STRIDE=stride, PER_TILE=per_tile, HEAD_DIM=d, D_PAD=d_pad, ROWS=rows,
        PAIRS=pairs, BLOCK_KG=tuning.block_kg, IEEE=q.dtype == torch.float32 or upcast,
        UPCAST=upcast, ONE_PASS=one_pass, CHECK=nonfinite is not None, TMA=tma,
        GROUP=heads if tma else 1, CANDIDATES=candidates is not None,
        SCAN_TILES=min(next_power_of_2(key_blocks * (tuning.block_kg // per_tile)),
                       max(16, SCAN_ELEMENTS // pairs)), D_SPLIT=tuning.d_split,
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )
    if not normalize:
        return out
    # Rows sum to 1; a row with no admissible tile is all zeros and stays so (0 / 1e-30).
    return out.div_(out.sum(dim=-1, keepdim=True).clamp_min_(1e-30))


__all__ = ["CANDIDATE_TUNED", "PackedTuning", "antidiagonal_packed_applies", "fitting_heads",
           "antidiagonal_packed_probabilities", "TUNED", "masked_scores", "default_tuning",
           "online_softmax_step"]
