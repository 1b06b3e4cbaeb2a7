"""The last kernel of every estimator's selection: top-p, union, forced tiles, compact indices.

:func:`union_tiles` runs one launch that finishes an estimator's selection
(docs/estimators.rst) for ``ROWS`` query-tile rows per program, each row of
``WIDTH`` key tiles in registers:

1. top-p of a row of tile probabilities (optional; contract §6's rule and
   tie-break by :func:`prism.optimized.top_p._top_p_keep`, no sort), the
   row first normalised to sum 1 when the scoring kernel left it unnormalised,
   and before that, optionally, mixed with a second row of scores (the
   cascade's sampled stage, computed beside the antidiagonal kernel);
2. the vertical-slash tiles (optional): key tile ``j`` of query tile ``I``
   (absolute) is kept when column bin ``j`` or diagonal bin ``I - j + nk`` is
   set (:func:`prism.optimized.vertical_slash_tiles.vertical_slash_bins`);
3. a given bool mask (optional: Prism's own selection, or tiles an estimator
   computed without a fused form); and, optionally, extra tiles of the last
   query tile's row (the cascade's last-tile rule, step 4 of the cascade in
   docs/estimators.rst, top-p'd by the vertical-slash launch);
4. the forced sink and diagonal tiles, then the admissible set (contract §6);
5. the bool mask and/or the compact indices (``kv_num_blocks``, ascending
   ``kv_indices`` padded with -1, as :func:`prism.reference.mask_to_indices`),
   written straight from registers: a kept tile's slot is the exclusive
   prefix sum of its row, and the padding fills the slots at or past the
   row's count, so the two stores never touch the same entry.

Causal layouts: a program whose rows have no admissible tile past a half or a
quarter of the launch's width holds them at that width (most of a long causal
layout's early rows), so the top-p's passes cost a third less over the whole
layout; the skipped columns get only their empty entries.

Optional extra programs check whole tensors (q, k, v) for NaN/Inf with the
pooling kernel's row check and set the caller's device flag, for estimators
whose scoring kernels do not read every row of them; no launch of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prism.reference.tiles import TileLayout

from ._runtime import next_power_of_2
from .launch import launch
from .pooling import _check_rows_finite
from .top_p import _top_p_keep

#: Widest row of key tiles the kernel keeps in registers (rows wider take the
#: reference's torch code).
MAX_UNION_WIDTH = 8192
#: Narrowest launch width whose causal programs may run at a half or a quarter of
#: it (a quarter is then at least 16 key tiles).
NARROW_MIN_WIDTH = 64
#: Token rows of q, k or v one checking program reads.
CHECK_ROWS = 256
#: Probabilities each thread holds (``ROWS * WIDTH / threads``; programs of 4 warps
#: up to FOUR_WARPS_MAX_WIDTH key tiles, 8 above); sets ``ROWS`` (1-16). 64, the
#: shape used first, spilled 1.8 KB per thread at width 1024 and the launch took
#: 0.51 against 0.27 ms at 16 (128K tokens, benchmarks/NOTES.md item 37). 4 (one row
#: of 1024 tiles per program, 96 registers, no spills, ptxas for sm_90): the accurate
#: preset's whole selection ran 0.159/0.515/2.520 ms at 8K/32K/128K against
#: 0.160/0.521/2.538 with 16 (graph replays, two each; 8: 0.161/0.515/2.520;
#: results/h200_union_ept_06c3199.json). Read at each launch (a replayed call plan
#: keeps the launches it recorded).
ELEMENTS_PER_THREAD = 4


@triton.jit
def _check_program(pid, Q, K, V, NONFINITE,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   num_q_heads, num_kv_heads, num_queries, num_keys, head_dim, head_dim_v,
                   q_programs, k_programs, CHECK_Q: tl.constexpr, CHECK_K: tl.constexpr,
                   CHECK_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Program ``pid`` of the checks: blocks of q rows, then of k rows, then of v rows
    (``q_programs``/``k_programs`` are 0 for a tensor not checked)."""
    if pid < q_programs:
        if CHECK_Q:
            _check_rows_finite(Q, stride_qb, stride_qh, stride_qn, stride_qd, num_q_heads,
                               num_queries, head_dim, pid, BLOCK_ROWS, NONFINITE, D_PAD,
                               BLOCK_T)
    elif pid < q_programs + k_programs:
        if CHECK_K:
            _check_rows_finite(K, stride_kb, stride_kh, stride_kn, stride_kd, num_kv_heads,
                               num_keys, head_dim, pid - q_programs, BLOCK_ROWS, NONFINITE,
                               D_PAD, BLOCK_T)
    else:
        if CHECK_V:
            _check_rows_finite(V, stride_vb, stride_vh, stride_vn, stride_vd, num_kv_heads,
                               num_keys, head_dim_v, pid - q_programs - k_programs,
                               BLOCK_ROWS, NONFINITE, DV_PAD, BLOCK_T)


@triton.jit
def _union_rows(pid, PROBS, SECOND, COLUMNS, DIAGONALS, OTHER, LAST, MASK, NUM, IDX,
                total_rows, num_query_tiles, num_key_tiles, num_diagonals, first_query_tile,
                threshold, weight,
                CAUSAL: tl.constexpr, HAS_PROBS: tl.constexpr, NORMALIZE: tl.constexpr,
                HAS_SECOND: tl.constexpr,
                HAS_VS: tl.constexpr, HAS_OTHER: tl.constexpr, HAS_LAST: tl.constexpr,
                FORCE_SINK: tl.constexpr,
                FORCE_DIAGONAL: tl.constexpr, WRITE_MASK: tl.constexpr,
                WRITE_INDICES: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr,
                LOG2_WIDTH: tl.constexpr,
                FULL_WIDTH: tl.constexpr):
    """Steps 1-5 of the module docstring for rows ``[pid * ROWS, (pid + 1) * ROWS)``.

    The rows are held ``WIDTH`` key tiles wide; when that is narrower than the
    launch's ``FULL_WIDTH`` (causal rows with no admissible tile past ``WIDTH``),
    the columns ``[WIDTH, num_key_tiles)`` only get their empty mask entries and
    index padding.
    """
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < total_rows
    bh = (rows // num_query_tiles).to(tl.int64)
    abs_rows = first_query_tile + rows % num_query_tiles
    cols = tl.arange(0, WIDTH)
    in_row = row_ok[:, None] & (cols < num_key_tiles)[None, :]
    admissible = in_row
    if CAUSAL:
        admissible = admissible & (cols[None, :] <= abs_rows[:, None])
    offsets = rows.to(tl.int64)[:, None] * num_key_tiles + cols[None, :]
    keep = tl.zeros((ROWS, WIDTH), dtype=tl.int1)
    if HAS_PROBS:
        prob = tl.load(PROBS + offsets, mask=admissible, other=0.0)
        if HAS_SECOND:
            # (1 - w) * prob / sum(prob) + w * second / sum(second), a term dropped where
            # its row sums to 0 (the reference's mix_tile_probabilities).
            second = tl.load(SECOND + offsets, mask=admissible, other=0.0)
            first_sum = tl.sum(prob, axis=1)
            second_sum = tl.sum(second, axis=1)
            first_scale = tl.where(first_sum > 0,
                                   (1.0 - weight) / tl.maximum(first_sum, 1e-30), 0.0)
            second_scale = tl.where(second_sum > 0, weight / tl.maximum(second_sum, 1e-30), 0.0)
            prob = prob * first_scale[:, None] + second * second_scale[:, None]
        if NORMALIZE:
            # The row's admissible mass, as the stage functions divide by it.
            mass = tl.maximum(tl.sum(prob, axis=1), 1e-30)
            prob = tl.math.div_rn(prob, mass[:, None])
        prob = tl.where(admissible, prob, -2.0)
        count = tl.sum(admissible.to(tl.int32), axis=1)
        top = _top_p_keep(prob, threshold, count, ROWS, WIDTH, LOG2_WIDTH, True, 1)
        # The bisection assumes a row's mass reaches p; a row whose whole mass
        # stays below p (an empty row) keeps every non-zero tile, as the sort does.
        total = tl.sum(tl.where(admissible, prob, 0.0), axis=1)
        keep = (top | (total < threshold)[:, None]) & (prob > 0.0)
    if HAS_VS:
        column = tl.load(COLUMNS + bh[:, None] * num_key_tiles + cols[None, :],
                         mask=admissible, other=0)
        diagonal = tl.load(DIAGONALS + bh[:, None] * num_diagonals
                           + (abs_rows[:, None] - cols[None, :] + num_key_tiles),
                           mask=admissible, other=0)
        keep = keep | (column != 0) | (diagonal != 0)
    if HAS_OTHER:
        keep = keep | (tl.load(OTHER + offsets, mask=admissible, other=0) != 0)
    if HAS_LAST:
        # The last query tile's row: its extra tiles (the cascade's last-tile rule,
        # top-p'd beside the vertical-slash bins).
        is_last = row_ok & (rows % num_query_tiles == num_query_tiles - 1)
        last = tl.load(LAST + bh[:, None] * num_key_tiles + cols[None, :],
                       mask=admissible & is_last[:, None], other=0)
        keep = keep | (last != 0)
    if FORCE_SINK:
        keep = keep | (cols[None, :] == 0)
    if CAUSAL and FORCE_DIAGONAL:
        keep = keep | (cols[None, :] == abs_rows[:, None])
    keep = keep & admissible
    if WRITE_MASK:
        tl.store(MASK + offsets, keep, mask=in_row)
    if WRITE_INDICES:
        taken = keep.to(tl.int32)
        slot = tl.cumsum(taken, axis=1) - taken
        count_kept = tl.sum(taken, axis=1)
        idx_rows = IDX + rows.to(tl.int64) * num_key_tiles
        tl.store(idx_rows[:, None] + slot, cols[None, :] + tl.zeros_like(taken), mask=keep)
        tl.store(IDX + offsets, tl.full((ROWS, WIDTH), -1, dtype=tl.int32),
                 mask=in_row & (cols[None, :] >= count_kept[:, None]))
        tl.store(NUM + rows, count_kept, mask=row_ok)
    for part in tl.static_range(1, FULL_WIDTH // WIDTH):
        tail_cols = part * WIDTH + cols
        tail_in = row_ok[:, None] & (tail_cols < num_key_tiles)[None, :]
        tail = rows.to(tl.int64)[:, None] * num_key_tiles + tail_cols[None, :]
        if WRITE_MASK:
            tl.store(MASK + tail, tl.zeros((ROWS, WIDTH), dtype=tl.int1), mask=tail_in)
        if WRITE_INDICES:
            tl.store(IDX + tail, tl.full((ROWS, WIDTH), -1, dtype=tl.int32), mask=tail_in)


@triton.jit
def _union_kernel(
    PROBS, SECOND, COLUMNS, DIAGONALS, OTHER, LAST, MASK, NUM, IDX,
    total_rows, num_query_tiles, num_key_tiles, num_diagonals, first_query_tile, threshold,
    weight, union_programs,
    Q, K, V, NONFINITE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    num_q_heads, num_kv_heads, num_queries, num_keys, head_dim, head_dim_v,
    q_programs, k_programs,
    CAUSAL: tl.constexpr, HAS_PROBS: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_SECOND: tl.constexpr,
    HAS_VS: tl.constexpr, HAS_OTHER: tl.constexpr, HAS_LAST: tl.constexpr,
    FORCE_SINK: tl.constexpr,
    FORCE_DIAGONAL: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_INDICES: tl.constexpr,
    ROWS: tl.constexpr, WIDTH: tl.constexpr, LOG2_WIDTH: tl.constexpr,
    CHECK_Q: tl.constexpr, CHECK_K: tl.constexpr, CHECK_V: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, NARROW: tl.constexpr,
):
    """``ROWS`` rows of the flat (batch * q head * query tile) grid (module docstring)."""
    pid = tl.program_id(0)
    if pid < union_programs:
        # Causal rows hold ``first_query_tile + I + 1`` admissible tiles: a program
        # whose rows all fit in a half or a quarter of the width runs that narrower
        # width (about a third less work over a whole causal layout).
        level = 0
        if NARROW:
            rows = pid * ROWS + tl.arange(0, ROWS)
            need = tl.max(tl.where(rows < total_rows,
                                   first_query_tile + rows % num_query_tiles, 0), axis=0) + 1
            level = tl.where(need <= WIDTH // 4, 2, tl.where(need <= WIDTH // 2, 1, 0))
        for lv in tl.static_range(3 if NARROW else 1):  # one instance per width
            if level == lv:
                _union_rows(pid, PROBS, SECOND, COLUMNS, DIAGONALS, OTHER, LAST, MASK, NUM,
                            IDX, total_rows, num_query_tiles, num_key_tiles, num_diagonals,
                            first_query_tile, threshold, weight, CAUSAL, HAS_PROBS,
                            NORMALIZE, HAS_SECOND, HAS_VS, HAS_OTHER, HAS_LAST, FORCE_SINK,
                            FORCE_DIAGONAL,
                            WRITE_MASK, WRITE_INDICES, ROWS,
                            WIDTH >> lv, LOG2_WIDTH - lv, WIDTH)
    else:
        _check_program(pid - union_programs, Q, K, V, NONFINITE,
                       stride_qb, stride_qh, stride_qn, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       num_q_heads, num_kv_heads, num_queries, num_keys, head_dim, head_dim_v,
                       q_programs, k_programs, CHECK_Q, CHECK_K, CHECK_V, D_PAD, DV_PAD,
                       BLOCK_T, BLOCK_ROWS)


#: Widest launch (key tiles) whose programs run on 4 warps; wider ones take 8. Read
#: at each launch (a replayed call plan keeps the launches it recorded).
FOUR_WARPS_MAX_WIDTH = 1024


def launch_shape(width: int) -> tuple[int, int]:
    """``(ROWS, num_warps)`` of the launch at ``width`` key tiles."""
    warps = 4 if width <= FOUR_WARPS_MAX_WIDTH else 8
    return max(1, min(16, ELEMENTS_PER_THREAD * 32 * warps // width)), warps


def union_tiles(layout: TileLayout, causal: bool, heads: tuple, *,
                probs: torch.Tensor | None = None, normalize: bool = False,
                second: torch.Tensor | None = None, weight: float = 0.0,
                threshold: float = 1.0, columns: torch.Tensor | None = None,
                diagonals: torch.Tensor | None = None, other: torch.Tensor | None = None,
                force_sink: bool = False, force_diagonal: bool = False,
                mask: torch.Tensor | None = None, last_tiles: torch.Tensor | None = None,
                write_mask: bool = True,
                write_indices: bool = False, check: dict | None = None,
                nonfinite: torch.Tensor | None = None):
    """Finish a selection in one launch (module docstring): ``(mask, kv_num_blocks, kv_indices)``.

    Inputs are the callers' own (not validated here).

    Parameters
    ----------
    layout : TileLayout
        With at most :data:`MAX_UNION_WIDTH` key tiles and at least one query tile.
    causal : bool
    heads : (B, Hq)
    probs : Tensor (B, Hq, nq, nk) float32, contiguous, optional
        Tile probabilities, read only at admissible tiles; with ``normalize``
        they are unnormalised and each row is first divided by its admissible mass.
    second : Tensor like ``probs``, optional
        A second row of tile scores, mixed into ``probs`` before the top-p: each
        row becomes ``(1 - weight) * probs / sum(probs) + weight * second /
        sum(second)`` over its admissible tiles (a term dropped where its row
        sums to 0), then normalised (``normalize`` required): the reference's
        :func:`~prism.reference.estimators.mix_tile_probabilities` (the cascade's
        sampled stage, :func:`prism.optimized.candidate_sampled.candidate_sampled_scores`).
    weight : float
        The mix's weight of ``second``.
    threshold : float
        The top-p of ``probs``.
    columns, diagonals : Tensor (B * Hq, nk) and (B * Hq, n) int8, optional
        Vertical-slash bins (both or neither).
    other : Tensor (B, Hq, nq, nk) bool, contiguous, optional
        Tiles to unite with; may be ``mask`` itself.
    force_sink, force_diagonal : bool
    mask : Tensor (B, Hq, nq, nk) bool, optional
        Where to write the mask (a new tensor otherwise).
    last_tiles : Tensor (B * Hq, nk) int8, optional
        Extra tiles of the last query tile's row (non-zero: kept), within the
        admissible ones (:func:`prism.optimized.vertical_slash_tiles.vertical_slash_bins`).
    write_mask, write_indices : bool
    check : dict, optional
        ``{"q": q, "k": k, "v": v}``, any subset, (B, H, N, D) each: extra
        programs check every row for NaN/Inf and set ``nonfinite`` (a float64
        device flag, required then).

    Returns
    -------
    mask : Tensor (B, Hq, nq, nk) bool, or None
    kv_num_blocks : Tensor (B, Hq, nq) int32, or None
    kv_indices : Tensor (B, Hq, nq, nk) int32, or None
    """
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    if nk > MAX_UNION_WIDTH:
        raise ValueError(f"union_tiles takes rows of at most {MAX_UNION_WIDTH} key tiles, "
                         f"got {nk}")
    if second is not None and (probs is None or not normalize):
        raise ValueError("union_tiles mixes second into probs: pass probs and normalize=True")
    shape = (*heads, nq, nk)
    check = check or {}
    device = next(t for t in (probs, columns, other, mask, last_tiles, *check.values())
                  if t is not None).device
    if write_mask and mask is None:
        mask = torch.empty(shape, dtype=torch.bool, device=device)
    num = idx = None
    if write_indices:
        num = torch.empty(shape[:3], dtype=torch.int32, device=device)
        idx = torch.empty(shape, dtype=torch.int32, device=device)
    width = next_power_of_2(max(nk, 16))
    rows, warps = launch_shape(width)
    total = heads[0] * heads[1] * nq
    union_programs = -(-total // rows)
    q, k, v = check.get("q"), check.get("k"), check.get("v")
    counts = [0 if t is None else t.shape[0] * t.shape[1] * -(-t.shape[2] // CHECK_ROWS)
              for t in (q, k, v)]
    qk = q if q is not None else k
    kv = k if k is not None else v
    d_pad = next_power_of_2(0 if qk is None else qk.shape[3])
    dv_pad = next_power_of_2(0 if v is None else v.shape[3])
    spare = mask if mask is not None else idx  # for pointers the kernel does not read
    tensors = [t if t is not None else spare
               for t in (probs, second, columns, diagonals, other, last_tiles, mask, num, idx)]
    checked = [t if t is not None else spare for t in (q, k, v, nonfinite)]
    strides = [s for t in (q, k, v) for s in (t.stride() if t is not None else (0, 0, 0, 0))]
    launch(_union_kernel, (union_programs + sum(counts),), *tensors,
           total, nq, nk, 0 if diagonals is None else diagonals.shape[-1],
           layout.first_query_tile, float(threshold), float(weight), union_programs, *checked,
           *strides,
           0 if q is None else q.shape[1],
           0 if kv is None else kv.shape[1], 0 if q is None else q.shape[2],
           0 if kv is None else kv.shape[2], 0 if qk is None else qk.shape[3],
           0 if v is None else v.shape[3], counts[0], counts[1],
           CAUSAL=causal, HAS_PROBS=probs is not None, NORMALIZE=normalize,
           HAS_SECOND=second is not None, HAS_VS=columns is not None,
           HAS_OTHER=other is not None,
           HAS_LAST=last_tiles is not None, FORCE_SINK=force_sink,
           FORCE_DIAGONAL=force_diagonal, WRITE_MASK=write_mask,
           WRITE_INDICES=write_indices, ROWS=rows, WIDTH=width,
           LOG2_WIDTH=width.bit_length() - 1, CHECK_Q=q is not None, CHECK_K=k is not None,
           CHECK_V=v is not None,
           D_PAD=d_pad, DV_PAD=dv_pad,
           BLOCK_T=max(1, min(CHECK_ROWS, 4096 // max(d_pad, dv_pad))), BLOCK_ROWS=CHECK_ROWS,
           NARROW=causal and width >= NARROW_MIN_WIDTH,
           num_warps=warps)
    return mask, num, idx


__all__ = ["CHECK_ROWS", "ELEMENTS_PER_THREAD", "MAX_UNION_WIDTH", "launch_shape", "union_tiles"]
