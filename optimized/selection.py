"""Prism's block selection on the GPU: scores, softmax, top-p, union, forced tiles (contract §5-§6).

After :mod:`~prism.optimized.pooling`, one kernel finishes the selection. A
program owns ``ROWS`` query-tile rows of one (batch, q head) and keeps the
whole row of ``WIDTH`` key tiles of both bands in registers, so no
``(B, H, 2 * nq, nk)`` probability tensor ever reaches global memory:

1. temperatures ``tau_b`` from the pooled energies (contract §5);
2. band logits ``s_b = (qbar_b . kbar_b) / (sqrt(d_b) tau_b)``: a tf32x3 matrix
   product (outer products on the CUDA cores for the widest rows) of the pooled
   queries, scale folded in, and the band's pooled keys;
3. softmax over the admissible tiles ``j <= i`` (causal) in fp32;
4. top-p without sorting. With probabilities ``x_j`` let
   ``F(t) = sum_{x_j > t} x_j``, the mass strictly above ``t``. Ranked by
   descending probability with ties by index, tile ``j`` has
   ``mass_before(j) = F(x_j) + x_j * (number of earlier-index ties)``, and it
   is kept iff that is ``< p``. ``F(t) < p`` holds exactly for ``t >= v``,
   where ``v`` is the smallest probability with ``F(v) < p``; so every tile
   with ``x_j > v`` is kept, none with ``x_j < v``, and the first
   ``ceil((p - F(v)) / v)`` ties at ``v`` by index. Non-negative fp32 values
   order like their bit patterns, so a bisection on the int32 bits finds ``v``
   exactly in at most 30 steps (``bits(1.0) < 2^30``), each one masked sum
   per row; it stops early once the bracket holds a single tile.
   At ``p == 1`` the kept set is every tile with ``x_j > 0`` (reference/topp.py);
5. union of the bands, the forced sink and diagonal tiles, and the bool mask
   and the compact indices written straight from registers.

Causal rows near the top of the grid see few key tiles: the host launches one
program family per power-of-two ``WIDTH`` (benchmarks/NOTES.md has the tuning).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from prism.reference.config import PrismConfig
from prism.reference.tiles import TileLayout

from .plan_items import fork, join, side_stream
from .pooling import pool_plan, run_pooling, work_pointers
from .selection_plan import (  # noqa: F401  (SelectionTuning and the caches: public here)
    _LAUNCHES,
    _LAUNCHES_BY_VALUE,
    SelectionTuning,
    _cached_plan,
    _launch_plan,
    launch_steps,
)
from .top_p import _top_p_keep

#: Widest key-tile row of any kernel path; longer rows take the reference's path.
MAX_WIDTH = 32768


@triton.jit
def _band_temperature(q_energy, k_energy, band_index, band_dim, head_dim, num_query_tiles,
                      num_key_tiles, eps):
    """``tau_b = sqrt(d_b/D) * (rq_b / max(rq, eps)) * (rk_b / max(rk, eps))``, at least eps.

    ``rq = sqrt(sum qbar^2 / (nq * D))`` and ``rq_b = sqrt(sum_b qbar^2 / (nq * d_b))``
    from the pooling kernel's energy sums; ``rk``, ``rk_b`` likewise for keys.
    """
    rq = tl.sqrt((tl.load(q_energy) / (num_query_tiles * head_dim)).to(tl.float32))
    rq_b = tl.sqrt((tl.load(q_energy + band_index) / (num_query_tiles * band_dim)).to(tl.float32))
    rk = tl.sqrt((tl.load(k_energy) / (num_key_tiles * head_dim)).to(tl.float32))
    rk_b = tl.sqrt((tl.load(k_energy + band_index) / (num_key_tiles * band_dim)).to(tl.float32))
    tau = (tl.sqrt(band_dim.to(tl.float32) / head_dim)
           * (rq_b / tl.maximum(rq, eps)) * (rk_b / tl.maximum(rk, eps)))
    return tl.maximum(tau, eps).to(tl.float32)


@triton.jit
def _band_dim(i, head_dim, half_layout, band_start, band_pairs):
    """Head dim of the ``i``-th dim of a band, in ascending order (contract §4)."""
    in_first_half = i < band_pairs
    half_dim = tl.where(in_first_half, band_start + i, head_dim // 2 + band_start + i - band_pairs)
    return tl.where(half_layout != 0, half_dim, 2 * band_start + i)


@triton.jit
def _admissible(rows, row_end, cols, first_query_tile, num_key_tiles, CAUSAL: tl.constexpr):
    """Admissible (row, key tile) pairs of contract §6.2 and their count per row."""
    row_ok = rows < row_end
    if CAUSAL:
        abs_rows = first_query_tile + rows
        admissible = row_ok[:, None] & (cols[None, :] <= abs_rows[:, None])
        count = tl.minimum(abs_rows + 1, num_key_tiles)
    else:
        admissible = row_ok[:, None] & (cols < num_key_tiles)[None, :]
        count = tl.zeros_like(rows) + num_key_tiles
    return admissible, count


@triton.jit
def _softmax_rows(logits, admissible):
    """Row softmax over admissible tiles in fp32; inadmissible entries become -2.

    -2 lies below every probability and every bisection threshold, so later
    stages neither count nor keep those entries.
    """
    s = tl.where(admissible, logits, float("-inf"))
    row_max = tl.max(s, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    e = tl.exp(s - row_max[:, None])
    total = tl.sum(e, axis=1)
    total = tl.where(total > 0.0, total, 1.0)
    return tl.where(admissible, e / total[:, None], -2.0)


@triton.jit
def _band_logits(q_rows, k_head, row_ok, cols, col_ok, k_pooled_stride, coef,
                 head_dim, half_layout, band_start, band_dim,
                 ROWS: tl.constexpr, WIDTH: tl.constexpr, DK: tl.constexpr,
                 USE_DOT: tl.constexpr):
    """``coef * (qbar_b . kbar_b)`` for ``ROWS`` rows and ``WIDTH`` key tiles of one band.

    Only the band's own dims are read (``_band_dim`` maps the band's i-th dim to
    its head dim), so the two bands together read each pooled dim once.
    """
    logits = tl.zeros([ROWS, WIDTH], dtype=tl.float32)
    if USE_DOT:
        # Tensor cores, DK band dims at a time; "tf32x3" keeps fp32 accuracy.
        for i0 in range(0, band_dim, DK):
            i = i0 + tl.arange(0, DK)
            i_ok = i < band_dim
            dims = _band_dim(i, head_dim, half_layout, band_start, band_dim // 2)
            qbar = (tl.load(q_rows[:, None] + dims[None, :],
                            mask=row_ok[:, None] & i_ok[None, :], other=0.0) * coef).to(tl.float32)
            kbar = tl.load(k_head + dims[:, None] * k_pooled_stride + cols[None, :],
                           mask=i_ok[:, None] & col_ok[None, :], other=0.0)
            logits = tl.dot(qbar, kbar, logits, input_precision="tf32x3")
    else:
        # CUDA cores, one band dim at a time: an outer product per dim.
        for i in range(0, band_dim):
            d = _band_dim(i, head_dim, half_layout, band_start, band_dim // 2)
            qd = tl.load(q_rows + d, mask=row_ok, other=0.0) * coef
            kd = tl.load(k_head + d * k_pooled_stride + cols, mask=col_ok, other=0.0)
            logits += qd[:, None] * kd[None, :]
    return logits


@triton.jit
def _select_tiles_kernel(
    WORK, MASK, NUM, IDX,
    num_q_heads, group, num_query_tiles, num_key_tiles, k_pooled_stride, first_query_tile,
    row_start, row_end,
    head_dim, half_layout, high_dim, low_dim, high_start, low_start,
    high_threshold, low_threshold, high_temperature, low_temperature, eps,
    q_pooled_offset, k_pooled_offset, k_energy_offset,
    CAUSAL: tl.constexpr, CALIBRATE: tl.constexpr,
    FORCE_SINK: tl.constexpr, FORCE_DIAGONAL: tl.constexpr,
    WRITE_MASK: tl.constexpr, WRITE_INDICES: tl.constexpr,
    ROWS: tl.constexpr, WIDTH: tl.constexpr, LOG2_WIDTH: tl.constexpr, DK: tl.constexpr,
    CHUNK: tl.constexpr, USE_DOT: tl.constexpr, EARLY_EXIT: tl.constexpr,
    CHECK_EVERY: tl.constexpr, STACK_BANDS: tl.constexpr,
):
    """Select the key tiles of ``ROWS`` query-tile rows of one (batch, q head).

    Fuses the reference stages ``band_temperature``, ``band_logits``,
    ``admissible_tiles``, ``band_probabilities``, ``top_p_select`` (both bands),
    ``forced_tiles``, the union, and ``mask_to_indices``. Rows
    ``[row_start, row_end)`` of this launch all see fewer than ``WIDTH`` key tiles.
    Wide rows run the bands one after the other, so that one band's (ROWS, WIDTH)
    probabilities are live at a time; ``STACK_BANDS`` (narrow rows) runs both at once.
    ``WORK`` is the pooling launch's buffer (:func:`~prism.optimized.pooling.work_layout`).
    """
    _, Q_ENERGY, K_ENERGY, Q_POOLED, K_POOLED_T = work_pointers(
        WORK, q_pooled_offset, k_pooled_offset, k_energy_offset)
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    bkv = b * (num_q_heads // group) + h // group
    rows = row_start + tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < row_end
    cols = tl.arange(0, WIDTH)
    col_ok = cols < num_key_tiles
    abs_rows = first_query_tile + rows
    admissible, admissible_count = _admissible(rows, row_end, cols, first_query_tile,
                                               num_key_tiles, CAUSAL)

    # Stage 1 (contract §5): one temperature per band for this (batch, q head).
    if CALIBRATE:
        q_energy = Q_ENERGY + bh * 3
        k_energy = K_ENERGY + bkv * 3
        tau_high = _band_temperature(q_energy, k_energy, 1, high_dim, head_dim,
                                     num_query_tiles, num_key_tiles, eps)
        tau_low = _band_temperature(q_energy, k_energy, 2, low_dim, head_dim,
                                    num_query_tiles, num_key_tiles, eps)
    else:
        tau_high = high_temperature
        tau_low = low_temperature
    # fp32 throughout: a caller may pass the float arguments as fp64 (Inductor
    # does), and tl.dot needs both operands in one dtype.
    coef_high = (1.0 / (tl.sqrt(high_dim.to(tl.float32)) * tau_high)).to(tl.float32)
    coef_low = (1.0 / (tl.sqrt(low_dim.to(tl.float32)) * tau_low)).to(tl.float32)

    # Stages 2-4 (contract §5-§6), one band at a time: s_b[i, j] = coef_b * qbar_b . kbar_b,
    # softmax over the admissible tiles, top-p.
    q_rows = Q_POOLED + (bh.to(tl.int64) * num_query_tiles + rows) * head_dim
    k_head = K_POOLED_T + bkv.to(tl.int64) * head_dim * k_pooled_stride
    logits = _band_logits(q_rows, k_head, row_ok, cols, col_ok, k_pooled_stride, coef_high,
                          head_dim, half_layout, high_start, high_dim, ROWS, WIDTH, DK, USE_DOT)
    if STACK_BANDS:
        # Narrow rows: both bands' rows in one (2 * ROWS, WIDTH) block (row 2r is
        # row r's high band, 2r + 1 its low band), so one softmax and one top-p
        # bisection serve both and the chain of dependent reductions halves.
        low = _band_logits(q_rows, k_head, row_ok, cols, col_ok, k_pooled_stride, coef_low,
                           head_dim, half_layout, low_start, low_dim, ROWS, WIDTH, DK, USE_DOT)
        both = tl.reshape(tl.permute(tl.join(logits, low), (0, 2, 1)), (2 * ROWS, WIDTH))
        pair = tl.arange(0, 2 * ROWS)
        admissible2, count2 = _admissible(row_start + tl.program_id(0) * ROWS + pair // 2,
                                          row_end, cols, first_query_tile, num_key_tiles,
                                          CAUSAL)
        thresholds = tl.where(pair % 2 == 0, high_threshold, low_threshold).to(tl.float32)
        keep2 = _top_p_keep(_softmax_rows(both, admissible2), thresholds, count2, 2 * ROWS,
                            WIDTH, LOG2_WIDTH, EARLY_EXIT, CHECK_EVERY, True)
        keep = tl.max(tl.reshape(keep2.to(tl.int32), (ROWS, 2, WIDTH)), axis=1) != 0
    else:
        keep = _top_p_keep(_softmax_rows(logits, admissible), high_threshold,
                           admissible_count, ROWS, WIDTH, LOG2_WIDTH, EARLY_EXIT, CHECK_EVERY)
        logits = _band_logits(q_rows, k_head, row_ok, cols, col_ok, k_pooled_stride, coef_low,
                              head_dim, half_layout, low_start, low_dim, ROWS, WIDTH, DK,
                              USE_DOT)
        keep = keep | _top_p_keep(_softmax_rows(logits, admissible), low_threshold,
                                  admissible_count, ROWS, WIDTH, LOG2_WIDTH, EARLY_EXIT,
                                  CHECK_EVERY)

    # Stage 5: union, forced sink and diagonal, never outside the admissible set.
    if FORCE_SINK:
        keep = keep | (cols[None, :] == 0)
    if CAUSAL and FORCE_DIAGONAL:
        keep = keep | (cols[None, :] == abs_rows[:, None])
    keep = keep & admissible

    # Outputs. Columns at or beyond WIDTH are never selected in this launch.
    row_offsets = (bh.to(tl.int64) * num_query_tiles + rows) * num_key_tiles
    in_row = row_ok[:, None] & col_ok[None, :]
    if WRITE_MASK and not WRITE_INDICES:
        tl.store(MASK + row_offsets[:, None] + cols[None, :], keep, mask=in_row)
    if WRITE_INDICES:
        # Compact in column chunks, so no (ROWS, WIDTH) prefix sum is live at
        # once: the keep flags go to the mask (or, without one, to the index rows,
        # each chunk read whole before its slots, which never exceed their
        # column, are written) and come back a chunk at a time.
        idx_rows = IDX + row_offsets
        if WRITE_MASK:
            flags = MASK + row_offsets
            tl.store(flags[:, None] + cols[None, :], keep, mask=in_row)
        else:
            flags = idx_rows
            tl.store(flags[:, None] + cols[None, :], keep.to(tl.int32), mask=in_row)
        tl.debug_barrier()
        count = tl.zeros([ROWS], dtype=tl.int32)
        for c0 in range(0, WIDTH, CHUNK):
            chunk = c0 + tl.arange(0, CHUNK)
            chunk_ok = row_ok[:, None] & (chunk < num_key_tiles)[None, :]
            taken = tl.load(flags[:, None] + chunk[None, :], mask=chunk_ok, other=0).to(tl.int32)
            if not WRITE_MASK:
                tl.debug_barrier()
            slot = count[:, None] + tl.cumsum(taken, axis=1) - taken
            tl.store(idx_rows[:, None] + slot, chunk[None, :] + tl.zeros_like(taken),
                     mask=taken != 0)
            count += tl.sum(taken, axis=1)
        tl.debug_barrier()
        for c0 in range(0, WIDTH, CHUNK):
            chunk = c0 + tl.arange(0, CHUNK)
            pad = (row_ok[:, None] & (chunk < num_key_tiles)[None, :]
                   & (chunk[None, :] >= count[:, None]))
            tl.store(idx_rows[:, None] + chunk[None, :],
                     tl.full([ROWS, CHUNK], -1, dtype=tl.int32), mask=pad)
        tl.store(NUM + bh.to(tl.int64) * num_query_tiles + rows, count, mask=row_ok)
    for c0 in range(WIDTH, num_key_tiles, WIDTH):
        tail = c0 + cols
        tail_ok = row_ok[:, None] & (tail < num_key_tiles)[None, :]
        if WRITE_MASK:
            tl.store(MASK + row_offsets[:, None] + tail[None, :],
                     tl.zeros([ROWS, WIDTH], dtype=tl.int1), mask=tail_ok)
        if WRITE_INDICES:
            tl.store(IDX + row_offsets[:, None] + tail[None, :],
                     tl.full([ROWS, WIDTH], -1, dtype=tl.int32), mask=tail_ok)


#: The tuning of calls that pass none (a benchmark may rebind it).
_DEFAULT_TUNING = SelectionTuning()


def select_tiles(q: torch.Tensor, k: torch.Tensor, cfg: PrismConfig, causal: bool,
                 layout: TileLayout, high_dim: int, low_dim: int, *,
                 write_mask: bool = True, write_indices: bool = False,
                 mask: torch.Tensor | None = None, kv_num_blocks: torch.Tensor | None = None,
                 kv_indices: torch.Tensor | None = None,
                 tuning: SelectionTuning | None = None, v: torch.Tensor | None = None,
                 after_pooling=None):
    """Run pooling and selection; return the mask and/or the compact indices, and a NaN flag.

    Inputs are validated by the caller. Nothing here waits for the GPU: the
    pooling kernel flags NaN/Inf in a device tensor, which the caller reads
    (or not, under compilation and graph capture).

    ``q`` (B, Hq, Nq, D), ``k`` (B, Hkv, Nk, D); ``layout`` with ``Nq, Nk > 0``;
    ``high_dim``, ``low_dim`` the resolved band widths; ``write_mask``,
    ``write_indices`` pick the outputs; ``mask`` (bool, (B, Hq, nq, nk)),
    ``kv_num_blocks`` (int32, (B, Hq, nq)) and ``kv_indices`` (int32,
    (B, Hq, nq, nk)) may be preallocated (tests pass poisoned ones to prove every
    element is written); ``tuning`` the launch shape; ``v`` (B, Hkv, Nk, Dv) is
    checked for NaN/Inf by the pooling launch too. ``after_pooling``, a callable
    with no arguments, is called once the pooling launch is queued (an
    estimator queues its side-stream stage there).

    Returns ``(mask, kv_num_blocks, kv_indices, nonfinite)``, the outputs not
    asked for as None; ``nonfinite`` (1,) float64 is non-zero when q, k (or v)
    may hold NaN/Inf, and then the outputs are undefined.
    """
    b, hq, _, d = q.shape
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    device = q.device
    tuning = _DEFAULT_TUNING if tuning is None else tuning
    steps = launch_steps(layout, cfg, tuning, causal, b, hq, k.shape[1], d, high_dim, low_dim,
                         write_mask, write_indices)
    work = run_pooling(pool_plan(q, k, v, layout, high_dim, low_dim, cfg.rope_layout), q, k, v)
    if after_pooling is not None:
        after_pooling()
    mask, kv_num_blocks, kv_indices = run_selection(
        steps, work, (b, hq, nqt, nkt), device, tuning, write_mask=write_mask,
        write_indices=write_indices, mask=mask, kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices)
    return mask, kv_num_blocks, kv_indices, work[:1]


def run_selection(steps, work: torch.Tensor, shape, device, tuning: SelectionTuning, *,
                  write_mask: bool, write_indices: bool, mask=None, kv_num_blocks=None,
                  kv_indices=None):
    """Launch the selection ``steps`` (:func:`launch_steps`) on a pooling buffer ``work``.

    ``shape`` is ``(B, Hq, nq, nk)``; outputs not given are allocated. Returns
    ``(mask, kv_num_blocks, kv_indices)``, those not asked for as None.
    """
    b, hq, nqt, nkt = shape
    if write_mask and mask is None:
        mask = torch.empty(b, hq, nqt, nkt, dtype=torch.bool, device=device)
    if write_indices:
        if kv_num_blocks is None:
            kv_num_blocks = torch.empty(b, hq, nqt, dtype=torch.int32, device=device)
        if kv_indices is None:
            kv_indices = torch.empty(b, hq, nqt, nkt, dtype=torch.int32, device=device)
    # Unused output pointers still need a tensor on the right device.
    tensors = (work, mask if write_mask else work, kv_num_blocks if write_indices else work,
               kv_indices if write_indices else work)
    if len(steps) < tuning.overlap_min_launches or not tuning.overlap or not work.is_cuda:
        for grid, prepared in steps:
            prepared.launch(_select_tiles_kernel, grid, *tensors)
        return mask, kv_num_blocks, kv_indices
    side = side_stream(device)
    main = fork(side)
    # Widest rows first: they hold most of the work.
    for step, (grid, prepared) in enumerate(steps):
        with torch.cuda.stream(side) if step else contextlib.nullcontext():
            prepared.launch(_select_tiles_kernel, grid, *tensors)
    join(main, side)
    return mask, kv_num_blocks, kv_indices
