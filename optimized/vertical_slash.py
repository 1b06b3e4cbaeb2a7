"""The vertical-slash stage (docs/estimators.rst, "vertical_slash") as Triton kernels.

:func:`last_query_distributions_kernel` computes what
:func:`prism.reference.estimators.last_query_distributions` computes: the mean
attention probability of the last ``L`` queries over every key column
(vertical) and over every diagonal offset ``q_pos - k_pos`` (slash). The
reference holds the ``(B, Hq, L, Nk)`` scores and probabilities in memory
(1 GiB at 128K tokens, 32 heads, ``L = 64``); the kernels never write them.
:func:`vertical_slash_tile_mask` then hands the two distributions to
:mod:`prism.optimized.vertical_slash_tiles` (top-p of columns and offsets with
contract §6's tie rule, columns and offsets to tiles: the kernels of
:func:`prism.reference.estimators.vertical_slash_tiles_from_distributions`).

Layout. One program holds ``ROWS = HEADS x LB`` query rows: ``LB`` consecutive
last queries of ``HEADS`` query heads of one GQA group (they read the same KV
head, so a key block loaded once serves them all).

1. :func:`_stats_kernel` - grid (row blocks, key chunks): the online softmax
   statistics (running max ``m`` and sum ``l`` of ``2^(s - m)``, base 2, the
   scale folded in) of every row over one chunk of keys.
2. :func:`_distribution_kernel` - grid (row blocks, runs of key blocks of ``BN``):
   each program first combines its rows' chunks (``ROWS x chunks`` numbers)
   into ``m`` and ``w = 1 / (l * L)``, then scores each of its key blocks again,
   ``p = 2^(s - m) * w``;

   * vertical: ``p`` summed over each head's rows, one store per key;
   * slash: row ``r`` (absolute position ``P0 + r``) and key ``k0 + j`` lie
     on offset ``P0 + r - k0 - j``. One ``tl.gather`` along the keys rotates
     each row, ``z[r, c] = p[r, (c - (LB - 1) + r) mod BN]`` (``BN >= LB``),
     so that column ``c`` of every row holds offset ``P0 + LB - 1 - k0 - c``
     where ``c + r >= LB - 1`` (the window's first half) and offset
     ``P0 + LB - 1 - k0 - c - BN`` elsewhere (its second half); two masked
     sums over each head's rows give the ``2 * BN`` consecutive offsets of
     the block. The two halves are stored apart: the first halves of
     successive key blocks tile the offsets without overlap, the second half
     of block ``kb`` covers the first half of block ``kb + 1``. (The rotation
     gathers ``BN`` columns per row, not the ``2 * BN`` of a skew.)
3. :func:`_slash_combine_kernel` adds, per slash entry, the two halves that
   cover it (and the row blocks, when ``L > 128``) in a fixed order:
   deterministic, no atomics. Causally the ``Nk - 1`` negative offsets are
   stored as zeros without reading the windows.

Causal masking is the reference's: key ``k`` counts for row ``r`` iff
``k <= P0 + r``; keys past ``Nk`` and rows past the ``L`` last queries count
for nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from prism.reference.tiles import TileLayout
from prism.reference.validation import validate_stage_inputs

from ._runtime import check_device, kernels_interpreted, next_power_of_2
from .antidiagonal_packed import masked_scores, online_softmax_step
from .launch import launch
from .pooling import _flag_if_nonfinite
from .tile_union import MAX_UNION_WIDTH, union_tiles
from .vertical_slash_tiles import (
    long_top_p_kernel,
    vertical_slash_bins,
    vertical_slash_tiles_kernel,
)

#: Most query rows (heads x last queries) one program holds.
MAX_ROWS = 128
#: Most keys per program of the statistics pass (a chunk; its blocks are BN keys).
CHUNK_KEYS = 4096
#: Programs the statistics pass aims at: short inputs take smaller chunks (at 8K
#: tokens, 32 heads and 128 rows per program, 16 chunks of 512 keys instead of two
#: chunks of 4096, whose 64 blocks in a row were the pass's whole latency). The
#: accurate preset's whole selection (32/8 heads, D 128, graph replays,
#: results/h200_preset_constants_1e512ed.json) ran 0.166/0.278/0.532/1.098/2.526 ms at
#: 8K/16K/32K/64K/128K with 256 against 0.174/0.288/0.541/1.113/2.520 with 512 (128:
#: 0.165/0.292/0.525/1.098/2.521): fewer chunks for the distribution pass to combine.
STATS_PROGRAMS = 256
#: Fewest keys per statistics program (at most STATS_PROGRAMS programs of at least
#: this many keys each).
STATS_MIN_KEYS = 256
#: Programs the distribution kernel's grid aims at (each takes several key blocks).
#: The accurate preset's whole selection (same run as STATS_PROGRAMS) ran
#: 0.163/0.280/0.526/1.102/2.534 ms at 8K/16K/32K/64K/128K with 512 against
#: 0.175/0.287/0.542/1.115/2.534 with 2048 (1024: 0.165/0.282/0.533/1.103/2.531).
DISTRIBUTION_PROGRAMS = 512


@dataclass(frozen=True)
class VSTuning:
    """Launch shape of the distribution kernels (the result does not depend on it
    beyond fp32 summation order).

    Attributes
    ----------
    max_rows : int
        Most query rows (heads of a GQA group x last queries) one program holds.
    block_n : int
        Keys per block of the distribution pass (a power of two, at least the
        rows per head).
    stats_block_n : int
        Keys per block of the statistics pass (a power of two).
    num_warps : int
        0: 8 when a program's rows x head dim reach 128 x 128, else 4.
    num_stages : int
        Triton's software pipelining depth of both passes' key loops.
    programs : int
        Programs the distribution pass's grid aims at (each walks a run of key
        blocks, its query rows and statistics loaded once);
        0: :data:`DISTRIBUTION_PROGRAMS`.
    """

    max_rows: int = MAX_ROWS
    block_n: int = 64
    stats_block_n: int = 64
    num_warps: int = 0
    num_stages: int = 3
    programs: int = 0


#: The launch shape used unless one is passed (``bench_estimators.py --stages``
#: times others; ``--use-fastest`` puts the fastest here). One head's 64 last
#: queries per program on 4 warps (h200_estimators_4a1c52e.json, 32/8 heads, D 128,
#: bf16; graph replay): 0.101/0.307/1.14 ms at 8K/32K/128K against 0.174/0.446/1.55
#: for two heads on 8 warps, 0.124/0.439/1.33 for four heads and 0.195/0.572/2.00 for
#: key blocks of 128.
TUNED_VS = VSTuning(max_rows=64, num_warps=4)
_MIN_DOT = 16


@triton.jit
def _tail_rows(Q, K, pid_rows, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb,
               stride_kh, group, heads_per_row_block, row_blocks, rows, num_queries,
               query_start, HEADS: tl.constexpr, LB: tl.constexpr, HEAD_DIM: tl.constexpr,
               D_PAD: tl.constexpr):
    """The program's query rows: (ROWS, D_PAD) tile, row validity, positions, K head."""
    b = pid_rows // (heads_per_row_block * row_blocks)
    rest = pid_rows % (heads_per_row_block * row_blocks)
    head_block = rest // row_blocks
    rb = rest % row_blocks
    i = tl.arange(0, HEADS * LB)
    h = head_block * HEADS + i // LB
    local = rb * LB + i % LB  # row among the L last queries
    row_ok = local < rows
    q_row = num_queries - rows + local
    q_pos = query_start + q_row
    dims = tl.arange(0, D_PAD)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64)[:, None] * stride_qh
              + q_row.to(tl.int64)[:, None] * stride_qn + dims[None, :] * stride_qd)
    q_tile = tl.load(q_ptrs, mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    hk = (head_block * HEADS) // group
    k_head = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    return q_tile, row_ok, q_pos, k_head, rb


@triton.jit
def _block_scores(q_tile, k_head, stride_kn, stride_kd, keys, num_keys,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr,
                  UPCAST: tl.constexpr):
    """(ROWS, BN) fp32 dot products of the rows with keys ``keys`` (0 past Nk)."""
    dims = tl.arange(0, D_PAD)
    k_cols = tl.load(k_head + keys.to(tl.int64)[None, :] * stride_kn + dims[:, None] * stride_kd,
                     mask=(keys < num_keys)[None, :] & (dims[:, None] < HEAD_DIM), other=0.0)
    q_rows = q_tile
    if UPCAST:
        q_rows = q_rows.to(tl.float32)
        k_cols = k_cols.to(tl.float32)
    if IEEE:
        return tl.dot(q_rows, k_cols, input_precision="ieee")
    return tl.dot(q_rows, k_cols)


@triton.jit
def _stats_kernel(
    Q, K, M_OUT, L_OUT, NONFINITE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    group, heads_per_row_block, row_blocks, rows, num_queries, num_keys, query_start,
    chunk_keys, num_chunks, qk_scale,
    CAUSAL: tl.constexpr, HEADS: tl.constexpr, LB: tl.constexpr, BN: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    CHECK: tl.constexpr,
):
    """Per row, max ``m`` and sum ``l`` of ``2^(s*qk_scale - m)`` over one key chunk.

    With ``CHECK`` a NaN/Inf in k or in the last queries sets ``NONFINITE``
    (:func:`prism.optimized.antidiagonal_packed.masked_scores`).
    """
    pid_rows = tl.program_id(0)
    chunk = tl.program_id(1)
    q_tile, row_ok, q_pos, k_head, rb = _tail_rows(
        Q, K, pid_rows, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh,
        group, heads_per_row_block, row_blocks, rows, num_queries, query_start, HEADS, LB,
        HEAD_DIM, D_PAD)
    key_end = num_keys
    if CAUSAL:
        key_end = tl.minimum(key_end, tl.max(tl.where(row_ok, q_pos, -1), axis=0) + 1)
    start = chunk * chunk_keys
    stop = tl.minimum(start + chunk_keys, key_end)
    m_i = tl.full((HEADS * LB,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((HEADS * LB,), dtype=tl.float32)
    for key_start in range(start, stop, BN):
        keys = key_start + tl.arange(0, BN)
        s = _block_scores(q_tile, k_head, stride_kn, stride_kd, keys, num_keys, HEAD_DIM,
                          D_PAD, IEEE, UPCAST)
        allowed = row_ok[:, None] & (keys < stop)[None, :]
        if CAUSAL:
            allowed = allowed & (keys[None, :] <= q_pos[:, None])
        m_i, l_i = online_softmax_step(m_i, l_i, masked_scores(s, allowed, qk_scale, CHECK))
    if CHECK:
        _flag_if_nonfinite(l_i, NONFINITE)
    out = (pid_rows * num_chunks + chunk).to(tl.int64) * (HEADS * LB) + tl.arange(0, HEADS * LB)
    tl.store(M_OUT + out, m_i)
    tl.store(L_OUT + out, l_i)


@triton.jit
def _add_triples(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


#: Set under Triton's CPU interpreter, whose reductions with a user combine function
#: call it once per element pair (far too slow): there :func:`_row_sums` sums each
#: with ``tl.sum``. A constexpr: compiled kernels never see that branch.
_INTERPRETED = tl.constexpr(kernels_interpreted(_add_triples))


@triton.jit
def _row_sums(a, b, c):
    """Sums over axis 1 of three (HEADS, LB, BN) blocks, in one reduction."""
    if _INTERPRETED:
        return tl.sum(a, axis=1), tl.sum(b, axis=1), tl.sum(c, axis=1)
    return tl.reduce((a, b, c), 1, _add_triples)


@triton.jit
def _distribution_kernel(
    Q, K, M_PART, L_PART, VERT, SLASH,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    group, heads_per_row_block, row_blocks, rows, num_queries, num_keys, query_start,
    num_key_blocks, num_chunks, qk_scale, blocks_per_program,
    CAUSAL: tl.constexpr, HEADS: tl.constexpr, LB: tl.constexpr, BN: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    DIRECT_VERT: tl.constexpr,
):
    """One key block: per head, column sums (vertical) and skewed diagonal sums (slash).

    First combines the statistics pass's chunks of its rows: ``m = max m_c``,
    ``l = sum l_c 2^(m_c - m)``, weight ``w = 1 / (l * rows)``. With
    ``DIRECT_VERT`` (one row block) ``VERT`` is the (B, Hq, Nk) result;
    otherwise (row programs, HEADS, num_key_blocks * BN) partial sums. ``SLASH``
    is (row programs, HEADS, num_key_blocks, 2, BN): the two halves of each
    block's window of ``2 * BN`` offsets.
    """
    ROWS: tl.constexpr = HEADS * LB
    pid_rows = tl.program_id(0)
    q_tile, row_ok, q_pos, k_head, rb = _tail_rows(
        Q, K, pid_rows, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh,
        group, heads_per_row_block, row_blocks, rows, num_queries, query_start, HEADS, LB,
        HEAD_DIM, D_PAD)
    i = tl.arange(0, ROWS)
    stats = pid_rows.to(tl.int64) * num_chunks * ROWS + i
    m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    for c in range(num_chunks):
        m = tl.maximum(m, tl.load(M_PART + stats + c * ROWS))
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros((ROWS,), dtype=tl.float32)
    for c in range(num_chunks):
        total += tl.load(L_PART + stats + c * ROWS) * tl.math.exp2(
            tl.load(M_PART + stats + c * ROWS) - m)
    w = tl.where(total > 0.0, 1.0 / (tl.where(total > 0.0, total, 1.0) * rows), 0.0)
    heads = tl.arange(0, HEADS)
    cols = tl.arange(0, BN)
    prog = pid_rows.to(tl.int64) * HEADS + heads
    # Rotation: z[r, c] = p[r, (c - (LB - 1) + r % LB) mod BN] (BN a power of two, >= LB).
    # Where c + r % LB >= LB - 1 column c holds the window's first half, else its second.
    shifted = cols[None, :] - (LB - 1) + (i % LB)[:, None]
    first = shifted >= 0
    source = shifted & (BN - 1)
    kb_start = tl.program_id(1) * blocks_per_program
    kb_stop = tl.minimum(kb_start + blocks_per_program, num_key_blocks)
    # Blocks [kb_start, full_stop) count every key for every row: no mask (the
    # causal limit of the program's first row, Nk, and every row real).
    first_pos = tl.min(tl.where(row_ok, q_pos, num_keys), axis=0)
    full_stop = tl.minimum(kb_stop, tl.minimum(first_pos + 1, num_keys) // BN)
    if not CAUSAL:
        full_stop = tl.minimum(kb_stop, num_keys // BN)
    if tl.min(row_ok.to(tl.int32), axis=0) == 0:
        full_stop = kb_start
    for kb in range(kb_start, kb_stop):
        keys = kb * BN + cols
        # Every block is scored, with the key load outside any branch, so that Triton
        # pipelines it across blocks: loaded inside branches, each block waited for its
        # keys (h200_pipelined_distribution_8c5dc26.json: the preset's selection 2.507
        # -> 2.454 ms at 128K, E5's 1.615 -> 1.538 ms at 32K, graph replays). A block
        # past the rows' last key is masked to zeros like any partial one.
        s = _block_scores(q_tile, k_head, stride_kn, stride_kd, keys, num_keys, HEAD_DIM,
                          D_PAD, IEEE, UPCAST)
        p = tl.math.exp2(s * qk_scale - m[:, None]) * w[:, None]
        if kb >= full_stop:
            allowed = row_ok[:, None] & (keys < num_keys)[None, :]
            if CAUSAL:
                allowed = allowed & (keys[None, :] <= q_pos[:, None])
            p = tl.where(allowed, p, 0.0)
        z = tl.gather(p, source, 1)
        # The three sums over each head's rows in one reduction (one exchange between
        # warps instead of three).
        vert, head, tail = _row_sums(tl.reshape(p, (HEADS, LB, BN)),
                                     tl.reshape(tl.where(first, z, 0.0), (HEADS, LB, BN)),
                                     tl.reshape(tl.where(first, 0.0, z), (HEADS, LB, BN)))
        if DIRECT_VERT:
            # One row block: program pid_rows = b * (Hq / HEADS) + head block, so prog
            # is the flat (b, h) index of each of its heads.
            tl.store(VERT + prog[:, None] * num_keys + keys[None, :], vert,
                     mask=(keys < num_keys)[None, :])
        else:
            tl.store(VERT + prog[:, None] * (num_key_blocks * BN) + keys[None, :], vert)
        base = (prog[:, None] * num_key_blocks + kb) * (2 * BN) + cols[None, :]
        tl.store(SLASH + base, head)
        tl.store(SLASH + base + BN, tail)


@triton.jit
def _slash_combine_kernel(PARTS, SLASH, num_q_heads, heads_per_program, row_blocks,
                          num_key_blocks, n_offsets, first_top, zero_below, LB: tl.constexpr,
                          BN: tl.constexpr, HEADS: tl.constexpr, BLOCK: tl.constexpr):
    """Slash entries from the distribution kernel's windows, in a fixed order.

    Slash index ``i`` of row block ``rb`` is window column ``t = top(rb) - i``
    (``top(rb) = first_top + rb * LB``): block ``t // BN``'s first half at
    ``t % BN`` plus block ``t // BN - 1``'s second half at the same column.
    Entries below ``zero_below`` are stored as zeros without reading the windows
    (causally, the ``Nk - 1`` negative offsets: every score there is masked).
    """
    bh = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    b = bh // num_q_heads
    h = bh % num_q_heads
    program0 = (b * heads_per_program + h // HEADS) * row_blocks
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for rb in range(row_blocks):
        t = first_top + rb * LB - idx
        inside = (t >= 0) & (idx < n_offsets) & (idx >= zero_below)
        t = tl.where(inside, t, 0)
        kb = t // BN
        c = t % BN
        base = ((program0 + rb).to(tl.int64) * HEADS + h % HEADS) * num_key_blocks
        head_ok = inside & (kb < num_key_blocks)
        tail_ok = inside & (kb >= 1) & (kb <= num_key_blocks)
        first = tl.load(PARTS + ((base + kb) * 2) * BN + c, mask=head_ok, other=0.0)
        second = tl.load(PARTS + ((base + kb - 1) * 2 + 1) * BN + c, mask=tail_ok, other=0.0)
        acc += first + second
    tl.store(SLASH + bh.to(tl.int64) * n_offsets + idx, acc, mask=idx < n_offsets)


def _validate(q, k, layout, last_queries, causal) -> None:
    """Argument checks of :func:`last_query_distributions_kernel` (contract §8)."""
    validate_stage_inputs(q, k, layout, causal)
    if isinstance(last_queries, bool) or not isinstance(last_queries, int):
        raise TypeError(f"last_queries must be an int, got {type(last_queries).__name__}")
    if last_queries < 1:
        raise ValueError(f"last_queries must be >= 1, got {last_queries}")


def _plan(rows: int, group: int, tuning: VSTuning):
    """(HEADS, LB, BN, row blocks): rows per head in a program and heads per program."""
    lb = max(_MIN_DOT, min(tuning.max_rows, next_power_of_2(rows)))
    heads = 1
    while group % (heads * 2) == 0 and heads * 2 * lb <= tuning.max_rows:
        heads *= 2
    bn = max(tuning.block_n, lb)  # BN >= LB: a block's offset window fits 2 * BN columns
    return heads, lb, bn, -(-rows // lb)


def _check_tuning(tuning: VSTuning) -> None:
    for name in ("max_rows", "block_n", "stats_block_n", "num_warps", "num_stages",
                 "programs"):
        value = getattr(tuning, name)
        least = 0 if name in ("num_warps", "programs") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"VSTuning.{name} must be an int >= {least}, got {value!r}")
    for name in ("max_rows", "block_n", "stats_block_n"):
        value = getattr(tuning, name)
        if value < _MIN_DOT or value & (value - 1):
            raise ValueError(f"VSTuning.{name} must be a power of two >= {_MIN_DOT}, "
                             f"got {value}")


def _stats_chunk(nk_tokens: int, row_programs: int, bn: int) -> int:
    """Keys per statistics program: about STATS_PROGRAMS programs, at least
    STATS_MIN_KEYS and at most CHUNK_KEYS keys each (whole blocks of ``bn``)."""
    chunks = max(1, -(-STATS_PROGRAMS // row_programs))
    keys = max(STATS_MIN_KEYS, -(-nk_tokens // chunks))
    chunk = -(-keys // bn) * bn
    return max(bn, min(chunk, CHUNK_KEYS // bn * bn))


def last_query_distributions_kernel(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                                    last_queries: int, causal: bool = True,
                                    tuning: VSTuning | None = None):
    """Vertical and slash distributions of the last queries, by Triton kernels.

    Same result as :func:`prism.reference.estimators.last_query_distributions`
    up to fp32 summation order; never writes the ``(B, Hq, L, Nk)`` scores.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
        fp32, fp16 or bf16, any strides, on CUDA (or the CPU under Triton's
        interpreter).
    k : Tensor (B, Hkv, Nk, D)
    layout : TileLayout
    last_queries : int
    causal : bool
    tuning : VSTuning, optional
        The launch shape (:data:`TUNED_VS` when not given).

    Returns
    -------
    vertical : Tensor (B, Hq, Nk), float32
    slash : Tensor (B, Hq, P + Nk), float32
        Entry ``o + Nk - 1`` holds offset ``o``; ``P`` the last query's position.
    """
    _validate(q, k, layout, last_queries, causal)
    check_device(_distribution_kernel, q=q, k=k)
    if tuning is not None:
        _check_tuning(tuning)
    return last_query_distributions_unchecked(q, k, layout, last_queries, causal,
                                              tuning=tuning)


def last_query_distributions_unchecked(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                                       last_queries: int, causal: bool,
                                       nonfinite: torch.Tensor | None = None,
                                       tuning: VSTuning | None = None):
    """:func:`last_query_distributions_kernel` on validated inputs; ``nonfinite``, a
    float64 device flag, is set when k or one of the last queries holds NaN/Inf."""
    b, hq, nq_tokens, d = q.shape
    hkv, nk_tokens = k.shape[1], k.shape[2]
    group = hq // hkv
    device = q.device
    n_offsets = layout.query_start + nq_tokens + nk_tokens - 1
    rows = min(last_queries, nq_tokens)
    if rows == 0 or nk_tokens == 0 or b == 0:
        return (torch.zeros(b, hq, nk_tokens, dtype=torch.float32, device=device),
                torch.zeros(b, hq, max(n_offsets, 0), dtype=torch.float32, device=device))
    # Every entry of both is written below (the distribution kernel stores every
    # key of every block, the combine kernel every offset).
    vertical = torch.empty(b, hq, nk_tokens, dtype=torch.float32, device=device)
    slash = torch.empty(b, hq, n_offsets, dtype=torch.float32, device=device)
    tuning = TUNED_VS if tuning is None else tuning
    heads, lb, bn, row_blocks = _plan(rows, group, tuning)
    row_programs = b * (hq // heads) * row_blocks
    d_pad = max(_MIN_DOT, next_power_of_2(d))
    upcast = q.dtype == torch.bfloat16 and kernels_interpreted(_distribution_kernel)
    ieee = q.dtype == torch.float32 or upcast
    qk_scale = math.log2(math.e) / math.sqrt(d)
    warps = tuning.num_warps or (8 if heads * lb * d_pad >= 128 * 128 else 4)
    common = dict(CAUSAL=causal, HEADS=heads, LB=lb, HEAD_DIM=d, D_PAD=d_pad, IEEE=ieee,
                  UPCAST=upcast, num_warps=warps, num_stages=tuning.num_stages)
    stats_bn = tuning.stats_block_n
    chunk = _stats_chunk(nk_tokens, row_programs, stats_bn)
    chunks = -(-nk_tokens // chunk)
    m_part = torch.empty(row_programs, chunks, heads * lb, dtype=torch.float32, device=device)
    l_part = torch.empty_like(m_part)
    args = (*q.stride(), *k.stride(), group, hq // heads, row_blocks, rows, nq_tokens,
            nk_tokens, layout.query_start)
    launch(_stats_kernel, (row_programs, chunks), q, k, m_part, l_part,
           nonfinite if nonfinite is not None else m_part, *args, chunk, chunks, qk_scale,
           CHECK=nonfinite is not None, BN=stats_bn, **common)
    key_blocks = -(-nk_tokens // bn)
    direct = row_blocks == 1
    vert = vertical if direct else torch.empty(row_programs, heads, key_blocks * bn,
                                               dtype=torch.float32, device=device)
    parts = torch.empty(row_programs, heads, key_blocks, 2, bn, dtype=torch.float32,
                        device=device)
    # Several key blocks per program (its query rows and statistics loaded once) while
    # the grid keeps about DISTRIBUTION_PROGRAMS programs.
    per_program = max(1, row_programs * key_blocks // (tuning.programs
                                                        or DISTRIBUTION_PROGRAMS))
    launch(_distribution_kernel, (row_programs, -(-key_blocks // per_program)), q, k, m_part,
           l_part, vert, parts, *args, key_blocks, chunks, qk_scale, per_program,
           DIRECT_VERT=direct, BN=bn, **common)
    if not direct:
        # (b, head block, row block) programs -> (b, hq, row block), summed over row blocks.
        vert = vert.view(b, hq // heads, row_blocks, heads, -1).transpose(2, 3)
        vertical.copy_(vert.reshape(b, hq, row_blocks, -1)[..., :nk_tokens].sum(dim=2))
    # Slash index of window column 0 of row block 0's first key block.
    first_top = layout.query_start + nq_tokens - rows + lb - 1 + nk_tokens - 1
    block = 1024
    # Causally the Nk - 1 negative offsets are zeros: stored without reading the windows
    # (half of the combine's loads; h200_vs_constants_45810d7.json, graph replays: E5
    # 20.64-20.69 ms at 128K against 20.75-20.79 reading them, the preset within 0.5%).
    zero_below = nk_tokens - 1 if causal else 0
    launch(_slash_combine_kernel, (b * hq, -(-n_offsets // block)), parts, slash, hq,
           hq // heads, row_blocks, key_blocks, n_offsets, first_top, zero_below, LB=lb, BN=bn,
           HEADS=heads, BLOCK=block)
    return vertical, slash


def vertical_slash_tile_mask(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                             last_queries: int, threshold: float,
                             causal: bool = True) -> torch.Tensor:
    """The vertical-slash tiles, with the distributions computed by Triton kernels.

    Same signature and result as
    :func:`prism.reference.estimators.vertical_slash_tiles` (up to top-p
    boundary ties): :func:`last_query_distributions_kernel` (three launches),
    then :func:`prism.optimized.vertical_slash_tiles.vertical_slash_tiles_kernel`
    (the top-p of columns and offsets, then their tiles by
    :func:`prism.optimized.tile_union.union_tiles`: two launches), every launch
    through :func:`prism.optimized.launch.launch`.

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool
    """
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    if nq == 0 or nk == 0:
        return torch.zeros(q.shape[0], q.shape[1], nq, nk, dtype=torch.bool, device=q.device)
    vertical, slash = last_query_distributions_kernel(q, k, layout, last_queries, causal)
    return vertical_slash_tiles_kernel(vertical, slash, layout, threshold, causal)


def last_tile_exact_kernel(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                           last_queries: int, threshold: float,
                           causal: bool = True) -> torch.Tensor:
    """The cascade's last-tile rule, with its stages computed by Triton kernels.

    Same signature and result as
    :func:`prism.reference.estimators.last_tile_exact_tiles` (up to top-p
    boundary ties and fp32 summation order): :func:`last_query_distributions_kernel`,
    the vertical distribution summed into key tiles and top-p'd
    (:func:`~prism.optimized.vertical_slash_tiles.vertical_slash_bins`, the
    rule's programs only), then the last query tile's row written by
    :func:`~prism.optimized.tile_union.union_tiles`.

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool, only the last query tile's row set
    """
    b, hq = q.shape[:2]
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    if b * hq * nq * nk == 0 or nk > MAX_UNION_WIDTH:
        from prism.reference.estimators import last_tile_exact_tiles

        return last_tile_exact_tiles(q, k, layout, last_queries, threshold, causal)
    vertical, slash = last_query_distributions_kernel(q, k, layout, last_queries, causal)
    _, _, last, _ = vertical_slash_bins(vertical, slash, layout, threshold, causal,
                                        with_bins=False, last_threshold=threshold)
    return union_tiles(layout, causal, (b, hq), last_tiles=last)[0]


__all__ = ["TUNED_VS", "VSTuning", "last_query_distributions_kernel",
           "last_query_distributions_unchecked", "last_tile_exact_kernel", "long_top_p_kernel",
           "vertical_slash_tile_mask"]
