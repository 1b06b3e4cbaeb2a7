"""The ``"cascade"``'s sampled-query stage as a Triton kernel (docs/estimators.rst, "cascade").

With ``sampled_weight`` > 0 the cascade mixes its candidate-restricted
antidiagonal tile probabilities with the exact attention of
``sampled_queries`` sampled queries per query tile over the same candidate
tiles (:func:`prism.reference.estimators.candidate_sampled_probabilities`,
mixed by :func:`prism.reference.estimators.mix_tile_probabilities`).

:func:`candidate_sampled_mix_` does both in one launch, in place on the
antidiagonal stage's output; :func:`candidate_sampled_scores` (the same
kernel, ``IN_PLACE`` off) writes only the stage's rows into a tensor of its
own, so that it can run beside the antidiagonal kernel, and the selection's
finishing launch mixes the two. Where the samples are the antidiagonal's
query groups (the accurate preset) neither runs: the antidiagonal launch
scores them itself (:mod:`prism.optimized.antidiagonal_sampled`).

One program takes one (batch, KV head), the query heads of its GQA group that
fit (``heads``) and ``TILES`` consecutive query tiles; its rows are those
tiles' samples for each of those heads. It lists the key tiles in which some
of its (head, query tile) pairs has a candidate (the same scan as the
restricted antidiagonal kernel,
:func:`prism.optimized.antidiagonal_blocks._candidate_tiles`), then makes two
passes over them, one key tile at a time:

1. each row's online softmax statistics over its candidate keys (causal: at
   or before the sample's position), and each pair's sum of the antidiagonal
   probabilities over its candidate tiles; with :data:`ONE_PASS`, also each
   row's ``log2`` of its sum of ``2^s`` per tile, into a scratch buffer (for
   the first :data:`SCRATCH_TILES` listed tiles);
2. the probabilities (from the scratch and the final statistics, or for
   tiles it does not hold the scores computed again), summed over each key
   tile and over the samples of each pair (a one-hot reduction), and, in
   place, written over the antidiagonal value of every candidate tile of the pair:
   ``(1 - w) * a / sum(a) + w * s / sum(s)``, where ``sum(s)`` is the number of
   the pair's samples with a candidate key. Tiles that are no pair's candidate
   are not touched (the antidiagonal stage wrote zeros there). Not in place,
   the sum ``s`` is stored at every tile the pair's row lists (0 off its
   candidates) and the tile scan stores zeros at the others.

The selection's finishing launch (:func:`prism.optimized.tile_union.union_tiles`)
renormalises each row, as the reference's mix does. The pooling launch of the
candidate selection has already checked q and k for NaN/Inf, so this kernel
checks nothing.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from prism.reference.tiles import TileLayout

from ._runtime import check_device, kernels_interpreted, next_power_of_2
from .antidiagonal_blocks import _candidate_tiles, _program_heads, online_softmax_step
from .antidiagonal_packed import fitting_heads
from .launch import launch
from .sampled import _key_tile_end, _sample_queries, _sample_rows, _tile_scores

#: Rows (samples x query heads x query tiles) a program aims to hold (read at each
#: call, as :data:`ONE_PASS`).
TARGET_ROWS = 64
#: Most rows of one program; a GQA group with more samples is split over programs.
MAX_ROWS = 128
#: Candidate flags one step of the tile scan loads (pairs x key tiles).
SCAN_ELEMENTS = 4096
#: True: score each listed tile once, keeping each row's per-tile ``log2 sum 2^s`` in
#: a scratch buffer that the second pass turns into probabilities, for a program's
#: first :data:`SCRATCH_TILES` listed tiles (the rest are scored again); False: score
#: every listed tile twice, the second time with the final statistics. Read at each
#: call (a call plan keeps the form it recorded).
ONE_PASS = True
#: Listed tiles per program the one-pass scratch holds: the buffer is
#: ``programs x min(key tiles, SCRATCH_TILES) x rows`` floats (at 128K tokens, 32/8
#: heads and tile 128, 4096 programs x 128 x 64: 128 MiB).
SCRATCH_TILES = 128
#: Launch knobs, read at each call (0: the defaults, 4 warps up to 64 rows x D 128
#: else 8; Triton's pipelining depth; key chunks of 64 keys). On the H200
#: (results/h200_sampled_launch_0800dcb.json, the preset's whole selection, 32/8 heads,
#: D 128, graph replays, masks equal) chunks of 64 keys took 0.140 / 0.470 / 2.553-2.561
#: ms at 8K / 32K / 128K against 0.140 / 0.487 / 2.570-2.576 for 128 (the default until
#: then); 8 warps 0.150 / 0.540 / 2.93; 2 or 4 pipeline stages within 0.3% of 3.
NUM_WARPS = 0
NUM_STAGES = 0
BLOCK_N = 0
_MIN_DOT = 16


@triton.jit
def _mix_tile(out_rows, cand_pairs, tile, pair_ok, one_hot, row_p, a_scale, s_scale,
              stride_ck, stride_otile, IN_PLACE: tl.constexpr):
    """Each pair's value at key tile ``tile``. ``IN_PLACE``: where it is a candidate, its
    antidiagonal value times ``a_scale`` plus the sum of its rows' probabilities
    ``row_p`` times ``s_scale``; else that sum where it is a candidate and 0 elsewhere
    (``a_scale`` and ``s_scale`` not used)."""
    pair_cand = tl.load(cand_pairs + tile.to(tl.int64) * stride_ck, mask=pair_ok, other=0) != 0
    pair_mass = tl.sum(tl.where(one_hot, row_p[:, None], 0.0), axis=0)
    where = out_rows + tile.to(tl.int64) * stride_otile
    if IN_PLACE:
        a = tl.load(where, mask=pair_cand, other=0.0)
        tl.store(where, a * a_scale + pair_mass * s_scale, mask=pair_cand)
    else:
        tl.store(where, tl.where(pair_cand, pair_mass, 0.0), mask=pair_ok)


@triton.jit
def _candidate_sampled_kernel(
    Q, K, CAND, OUT, LIST, E,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_orow, stride_otile,
    stride_cb, stride_ch, stride_cq, stride_ck,
    num_kv_heads, group, heads, samples, tiles_per_program, programs_per_head,
    num_query_tiles, num_key_tiles, num_keys, num_queries, query_start, first_query_tile,
    block_size, qk_scale, weight, list_width, scratch_tiles,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    ROWS: tl.constexpr, PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, SCAN_TILES: tl.constexpr,
    ONE_PASS: tl.constexpr = False, IN_PLACE: tl.constexpr = True,
):
    pid = tl.program_id(0)
    block, bh, b, hk, head0 = _program_heads(pid, programs_per_head, group, heads,
                                             num_kv_heads)

    # Row r = (head g of the program's heads, tile t, sample); pair = (g, t).
    g, t, tile_row, pos, rows_ok = _sample_rows(block, heads, samples, tiles_per_program,
                                                num_query_tiles, first_query_tile, block_size,
                                                query_start, num_queries, ROWS)
    q_rows = _sample_queries(Q + b.to(tl.int64) * stride_qb, stride_qh, stride_qn, stride_qd,
                             head0 + g, pos, rows_ok, query_start, HEAD_DIM, D_PAD, UPCAST)
    k_head = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    cand_rows = (CAND + b.to(tl.int64) * stride_cb + (head0 + g).to(tl.int64) * stride_ch
                 + tile_row.to(tl.int64) * stride_cq)

    pairs = tl.arange(0, PAIRS)
    pair_g = pairs // tiles_per_program
    pair_tile = block * tiles_per_program + pairs % tiles_per_program
    pair_ok = (pairs < heads * tiles_per_program) & (pair_tile < num_query_tiles)
    one_hot = (g * tiles_per_program + t)[:, None] == pairs[None, :]
    cand_pairs = (CAND + b.to(tl.int64) * stride_cb + (head0 + pair_g).to(tl.int64) * stride_ch
                  + pair_tile.to(tl.int64) * stride_cq)
    out_rows = (OUT + b.to(tl.int64) * stride_ob + (head0 + pair_g).to(tl.int64) * stride_oh
                + pair_tile.to(tl.int64) * stride_orow)

    scan_end = _key_tile_end(rows_ok, pos, block_size, num_key_tiles, CAUSAL)
    active = LIST + pid.to(tl.int64) * list_width
    # IN_PLACE: the antidiagonal stage wrote every tile; else the tiles no pair lists
    # get their zeros here.
    num_active = _candidate_tiles(cand_pairs, pair_ok, scan_end, stride_ck, active,
                                  out_rows[:, None], stride_otile, PAIRS, SCAN_TILES,
                                  not IN_PLACE)
    tl.debug_barrier()  # every thread reads the list some threads wrote

    # Pass 1: the rows' softmax statistics; the pairs' antidiagonal sums. One loop
    # over (listed tile, chunk of its keys), so that Triton pipelines its loads.
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    a_sum = tl.zeros((PAIRS,), dtype=tl.float32)
    e_tile = tl.zeros((ROWS,), dtype=tl.float32)  # ONE_PASS: the tile's sum of 2^(s - m)
    # ONE_PASS scratch of this program: for its first scratch_tiles list slots, each
    # row's log2 of its tile sum of 2^s (log2(sum 2^(s - m)) + m; -inf for none).
    e_rows = E + (pid.to(tl.int64) * scratch_tiles) * ROWS + tl.arange(0, ROWS)
    for step in range(0, num_active * CHUNKS):
        tile = tl.load(active + step // CHUNKS)
        row_cand = tl.load(cand_rows + tile.to(tl.int64) * stride_ck, mask=rows_ok, other=0) != 0
        if IN_PLACE and step % CHUNKS == 0:
            pair_cand = tl.load(cand_pairs + tile.to(tl.int64) * stride_ck, mask=pair_ok,
                                other=0) != 0
            a_sum += tl.load(out_rows + tile.to(tl.int64) * stride_otile, mask=pair_cand,
                             other=0.0)
        s = _tile_scores(q_rows, k_head, stride_kn, stride_kd, tile, step % CHUNKS, block_size,
                         num_keys, pos, rows_ok, row_cand, qk_scale, CAUSAL, HEAD_DIM, D_PAD,
                         BLOCK_N, IEEE, UPCAST)
        if ONE_PASS:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_step = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_step)  # 0 while m_i is -inf
            p_sum = tl.sum(tl.math.exp2(s - m_step[:, None]), axis=1)
            l_i = l_i * alpha + p_sum
            e_tile = e_tile * alpha + p_sum
            m_i = m_new
            if step % CHUNKS == CHUNKS - 1:
                slot = step // CHUNKS
                lse = tl.where(e_tile > 0, tl.math.log2(tl.where(e_tile > 0, e_tile, 1.0))
                               + m_step, float("-inf"))
                tl.store(e_rows + slot * ROWS, lse, mask=slot < scratch_tiles)
                e_tile = tl.zeros((ROWS,), dtype=tl.float32)
        else:
            m_i, l_i = online_softmax_step(m_i, l_i, s)

    # Pass 2: per candidate tile, the pair's sampled mass mixed into its value.
    m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    counted = rows_ok & (l_i > 0)
    inv_l = tl.where(counted, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    s_count = tl.sum(tl.where(one_hot & counted[:, None], 1.0, 0.0), axis=0)
    s_scale = tl.where(s_count > 0, weight / tl.where(s_count > 0, s_count, 1.0), 0.0)
    a_scale = tl.where(a_sum > 0, (1.0 - weight) / tl.where(a_sum > 0, a_sum, 1.0), 0.0)
    kept = 0
    if ONE_PASS:
        kept = tl.minimum(num_active, scratch_tiles)
        tl.debug_barrier()  # other threads of the program wrote the scratch
        for slot in range(0, kept):
            tile = tl.load(active + slot)
            lse = tl.load(e_rows + slot * ROWS)
            row_p = tl.math.exp2(lse - m_shift) * inv_l  # 0 where lse is -inf
            _mix_tile(out_rows, cand_pairs, tile, pair_ok, one_hot, row_p, a_scale, s_scale,
                      stride_ck, stride_otile, IN_PLACE)
    # The tiles past the scratch (every tile without ONE_PASS): scored again.
    row_mass = tl.zeros((ROWS,), dtype=tl.float32)
    for step in range(kept * CHUNKS, num_active * CHUNKS):
        tile = tl.load(active + step // CHUNKS)
        row_cand = tl.load(cand_rows + tile.to(tl.int64) * stride_ck, mask=rows_ok,
                           other=0) != 0
        s = _tile_scores(q_rows, k_head, stride_kn, stride_kd, tile, step % CHUNKS,
                         block_size, num_keys, pos, rows_ok, row_cand, qk_scale, CAUSAL,
                         HEAD_DIM, D_PAD, BLOCK_N, IEEE, UPCAST)
        row_mass += tl.sum(tl.math.exp2(s - m_shift[:, None]), axis=1)
        if step % CHUNKS == CHUNKS - 1:  # the tile's last chunk: mix and store its value
            _mix_tile(out_rows, cand_pairs, tile, pair_ok, one_hot, row_mass * inv_l,
                      a_scale, s_scale, stride_ck, stride_otile, IN_PLACE)
            row_mass = tl.zeros((ROWS,), dtype=tl.float32)


def _run_stage(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
               samples: int, weight: float, candidates: torch.Tensor, causal: bool,
               in_place: bool) -> torch.Tensor:
    """One launch of the stage's kernel on ``out`` (the module docstring; ``in_place``
    as the kernel's ``IN_PLACE``)."""
    b, hq, _, d = q.shape
    hkv, nk_tokens = k.shape[1], k.shape[2]
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    if out.numel() == 0:
        return out
    group = hq // hkv
    heads = group if group * samples <= MAX_ROWS else fitting_heads(group, samples, MAX_ROWS)
    tiles = max(1, TARGET_ROWS // (heads * samples))
    rows = max(_MIN_DOT, next_power_of_2(heads * samples * tiles))
    pairs = next_power_of_2(heads * tiles)
    per_head = -(-nq // tiles)
    programs = b * hkv * (group // heads) * per_head
    d_pad = max(_MIN_DOT, next_power_of_2(d))
    block_n = max(_MIN_DOT, min(BLOCK_N or 64, next_power_of_2(layout.block_size)))
    upcast = q.dtype == torch.bfloat16 and kernels_interpreted(_candidate_sampled_kernel)
    cand = candidates.view(torch.uint8)
    options = {"num_stages": NUM_STAGES} if NUM_STAGES else {}
    active = torch.empty(programs * nk, dtype=torch.int32, device=q.device)
    scratch_tiles = min(nk, SCRATCH_TILES) if ONE_PASS else 0
    e = torch.empty(max(1, programs * scratch_tiles * rows), dtype=torch.float32,
                    device=q.device)
    launch(
        _candidate_sampled_kernel, (programs,),
        q, k, cand, out, active, e,
        *q.stride(), *k.stride(), *out.stride(), *cand.stride(),
        hkv, group, heads, samples, tiles, per_head, nq, nk, nk_tokens, q.shape[2],
        layout.query_start, layout.first_query_tile, layout.block_size,
        math.log2(math.e) / math.sqrt(d), float(weight), nk, scratch_tiles,
        CAUSAL=causal, HEAD_DIM=d, D_PAD=d_pad, ROWS=rows, PAIRS=pairs, BLOCK_N=block_n,
        CHUNKS=-(-layout.block_size // block_n),
        IEEE=q.dtype == torch.float32 or upcast, UPCAST=upcast,
        SCAN_TILES=min(next_power_of_2(nk), max(16, SCAN_ELEMENTS // pairs)),
        ONE_PASS=bool(ONE_PASS), IN_PLACE=in_place,
        num_warps=NUM_WARPS or (4 if rows * d_pad <= 64 * 128 else 8), **options,
    )
    return out


def candidate_sampled_mix_(probs: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           layout: TileLayout, samples: int, weight: float,
                           candidates: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Mix the candidate-restricted sampled-query probabilities into ``probs``, in place.

    ``probs`` (B, Hq, nq, nk) float32 holds the cascade's antidiagonal tile
    probabilities at the candidate tiles, each row normalised or not (a row is
    divided by its sum over the candidates here). Afterwards each candidate
    tile holds ``(1 - weight) * a / sum(a) + weight * s / sum(s)`` (a term is
    dropped where its row sums to 0); other tiles are not touched. Dividing
    each row by its sum then gives
    :func:`prism.reference.estimators.mix_tile_probabilities` of the
    reference stages (up to fp32 rounding). Inputs are validated by the caller.

    Returns
    -------
    ``probs``
    """
    return _run_stage(probs, q, k, layout, samples, weight, candidates, causal, True)


def candidate_sampled_scores(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                             samples: int, candidates: torch.Tensor,
                             causal: bool = True) -> torch.Tensor:
    """The stage's unnormalised tile rows, in a new tensor (inputs validated by the caller).

    Each (batch, query head, query tile) row holds, at its candidate tiles, the
    sum over its samples of each sample's softmax mass in that tile (each
    sample's softmax over its candidate keys, so a row sums to the number of
    its samples that have one), and 0 at its other admissible tiles; entries
    past the admissible tiles are undefined. Divided by its sum, a row is
    :func:`prism.reference.estimators.candidate_sampled_probabilities`' row.
    The selection's finishing launch mixes it with the antidiagonal rows
    (:func:`prism.optimized.tile_union.union_tiles`' ``second``), so this
    launch need not wait for the antidiagonal kernel.

    Returns
    -------
    Tensor (B, Hq, nq, nk), float32
    """
    shape = (q.shape[0], q.shape[1], layout.num_query_tiles, layout.num_key_tiles)
    out = torch.empty(shape, dtype=torch.float32, device=q.device)
    return _run_stage(out, q, k, layout, samples, 1.0, candidates, causal, False)


def candidate_sampled_tile_probabilities(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                                         samples: int, candidates: torch.Tensor,
                                         causal: bool = True) -> torch.Tensor:
    """:func:`prism.reference.estimators.candidate_sampled_probabilities` by the kernel
    (same signature and result, up to fp32 rounding).

    Returns
    -------
    Tensor (B, Hq, nq, nk), float32
        Zero outside the admissible candidate tiles; rows with one sum to 1.
    """
    from .cascade import check_candidates
    from .estimators import _validate

    _validate(q, k, layout, samples, causal, "samples", "8 for tile 128")
    check_candidates(candidates, q, layout)
    check_device(_candidate_sampled_kernel, q=q, k=k)
    from prism.reference.scoring import admissible_tiles

    out = candidate_sampled_scores(q, k, layout, samples, candidates.contiguous(), causal)
    out = torch.where(admissible_tiles(layout, causal, q.device), out, torch.zeros_like(out))
    total = out.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-30), torch.zeros_like(out))


__all__ = ["candidate_sampled_mix_", "candidate_sampled_scores",
           "candidate_sampled_tile_probabilities"]
