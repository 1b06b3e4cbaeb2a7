"""Top-p without sorting, in registers, and over a row's compacted survivors (contract §6).

:func:`_top_p_keep` keeps a (ROWS, WIDTH) block's top-p tiles by a bisection
on the threshold's fp32 bits (:mod:`prism.optimized.selection`'s docstring,
step 4, derives the rule); Prism's selection kernel and every estimator's
finishing launch (:mod:`prism.optimized.tile_union`) call it.

Each of the bisection's 10-20 steps reduces every entry of the block. Most
entries cannot matter: the bracket starts at ``t0 = (1 - p - 1e-5) / n``
(``n`` admissible tiles), and an entry at or below ``t0`` is never kept (the
kept set is ``x > v`` plus ties at ``v``, with ``v > t0``). Rows of sparse
or peaked probabilities hold few entries above ``t0``: the cascade's scores
exist only at its candidate tiles (a few per cent of a row at 128K tokens).

:func:`_top_p_keep_compact` therefore writes each row's survivors (entries
above ``max(t0, 0)``), in column order, to the program's slot of a scratch
buffer with their columns, reads them back as a ``(ROWS, CW)`` block with
``CW`` the smaller of ``WIDTH / 4`` and ``WIDTH / 16`` that holds the
program's fullest row, runs the same bisection there, and sets the kept
survivors' flags by column in a zeroed full-width row of flags, read back
whole. The result is the same set: the survivors keep their order (so the
index tie-break is unchanged), and the bracket, the masses above every
threshold it tries and the tie quota see the same entries (only the order of
the fp32 additions differs, as it does between launch widths). Programs whose
fullest row does not fit in ``WIDTH / 4``, and ``p >= 1``, run the plain
bisection.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._runtime import kernels_interpreted


@triton.jit
def _add_pairs(mass_a, count_a, mass_b, count_b):
    return mass_a + mass_b, count_a + count_b


#: Set when Triton runs kernels in its CPU interpreter, whose reductions with a
#: user combine function call it once per element pair (0.7 s for one 16 x 16
#: block): there :func:`_mass_and_count_above` sums twice with ``tl.sum``. Compiled
#: kernels never take that branch (a constexpr, pruned before code generation).
_INTERPRETED = tl.constexpr(kernels_interpreted(_add_pairs))


@triton.jit
def _mass_and_count_above(prob, t):
    """Per row, ``F(t) = sum_{x_j > t} x_j`` and ``C(t) = #{x_j > t}``.

    One reduction of the pair, so the row's warps meet once per bisection step.
    """
    above = prob > t[:, None]
    if _INTERPRETED:
        return tl.sum(tl.where(above, prob, 0.0), axis=1), tl.sum(above.to(tl.int32), axis=1)
    return tl.reduce((tl.where(above, prob, 0.0), above.to(tl.int32)), 1, _add_pairs)


@triton.jit
def _bits_to_threshold(bits):
    """The fp32 threshold of int32 bits; -1 stands for "below every probability"."""
    return tl.where(bits < 0, -1.0, bits.to(tl.float32, bitcast=True))


@triton.jit
def _top_p_keep(prob, threshold, admissible_count, ROWS: tl.constexpr, WIDTH: tl.constexpr,
                LOG2_WIDTH: tl.constexpr, EARLY_EXIT: tl.constexpr, CHECK_EVERY: tl.constexpr,
                PER_ROW: tl.constexpr = False):
    """Tiles kept by top-p with the index tie-break (reference ``top_p_select``).

    ``prob`` is (ROWS, WIDTH) from :func:`_softmax_rows`; ``admissible_count``
    (ROWS,) counts each row's admissible tiles; ``threshold`` is one scalar, or
    with ``PER_ROW`` one value per row. Returns a bool mask. p = 1 keeps
    exactly the tiles of non-zero probability (contract §6.3).
    """
    if PER_ROW:
        exact_p1 = threshold >= 1.0
        keep = _top_p_bisect(prob, threshold, admissible_count, exact_p1, ROWS, WIDTH,
                             LOG2_WIDTH, EARLY_EXIT, CHECK_EVERY)
        keep = tl.where(exact_p1[:, None], prob > 0.0, keep)
    elif threshold >= 1.0:
        keep = prob > 0.0
    else:
        keep = _top_p_bisect(prob, threshold, admissible_count,
                             tl.zeros([ROWS], dtype=tl.int1), ROWS, WIDTH, LOG2_WIDTH,
                             EARLY_EXIT, CHECK_EVERY)
    return keep


@triton.jit
def _top_p_bisect(prob, threshold, admissible_count, exact_p1, ROWS: tl.constexpr,
                  WIDTH: tl.constexpr, LOG2_WIDTH: tl.constexpr, EARLY_EXIT: tl.constexpr,
                  CHECK_EVERY: tl.constexpr):
    """:func:`_top_p_keep` for rows with p < 1 (rows flagged ``exact_p1`` are skipped).

    The exit is checked (a reduction across warps) every ``CHECK_EVERY`` steps:
    a step on a resolved row changes nothing (a bracket holding one tile keeps
    it; one of a single bit stays put).
    """
    # Bracket v: F(lo) >= p > F(hi) on int32 bits of thresholds. Tiles at or
    # below t0 = (1 - p - 1e-5) / n carry at most n * t0 < 1 - p of mass, so
    # F(t0) > p and lo may start there (the 1e-5 covers fp32 rounding).
    t0 = (1.0 - threshold - 1e-5) / tl.maximum(admissible_count, 1).to(tl.float32)
    lo = tl.where(t0 > 0.0, t0.to(tl.int32, bitcast=True), -1)
    hi = tl.maximum(tl.max(prob, axis=1), 0.0).to(tl.int32, bitcast=True)
    _, count_lo = _mass_and_count_above(prob, _bits_to_threshold(lo))
    count_hi = tl.zeros([ROWS], dtype=tl.int32)
    # 30 halvings shrink any bracket inside [-1, bits(1.0)] to one step. With
    # EARLY_EXIT the loop also stops once every row's bracket (lo, hi] holds a
    # single tile, which is then v itself (typically after ~log2(n) + 8 steps).
    unresolved = (count_lo - count_hi > 1) & (hi - lo > 1) & ~exact_p1
    step = 0
    while (step < 30) & (tl.max(unresolved.to(tl.int32), axis=0) > 0):
        for _inner in tl.static_range(CHECK_EVERY):
            mid = lo + (hi - lo) // 2
            mass, count = _mass_and_count_above(prob, _bits_to_threshold(mid))
            up = mass >= threshold
            lo = tl.where(up, mid, lo)
            count_lo = tl.where(up, count, count_lo)
            hi = tl.where(up, hi, mid)
            count_hi = tl.where(up, count_hi, count)
        if EARLY_EXIT:
            unresolved = (count_lo - count_hi > 1) & (hi - lo > 1) & ~exact_p1
        else:
            unresolved = (hi - lo > 1) & ~exact_p1
        step += CHECK_EVERY
    # One tile in (lo, hi]: it is v, it has no tie, keep every x > t(lo).
    single = (count_lo - count_hi == 1) | exact_p1
    keep = prob > _bits_to_threshold(lo)[:, None]
    if tl.max((~single).to(tl.int32), axis=0) > 0:
        # Otherwise hi = bits(v): keep x > v and the first ceil((p - F(v)) / v)
        # ties at v, by index.
        v = hi.to(tl.float32, bitcast=True)
        above = prob > v[:, None]
        mass_above_v = tl.sum(tl.where(above, prob, 0.0), axis=1)
        at_v = prob == v[:, None]
        safe_v = tl.where(v > 0.0, v, 1.0)
        quota = tl.where(v > 0.0, tl.math.ceil((threshold - mass_above_v) / safe_v),
                         float("inf"))
        # The ties kept are those before column ``cut``, the smallest m with
        # quota ties in [0, m) (WIDTH when there are fewer): a bisection on
        # m instead of a row-wide prefix sum, which would need registers.
        cols = tl.arange(0, WIDTH)
        cut_lo = tl.zeros([ROWS], dtype=tl.int32)
        cut_hi = tl.zeros([ROWS], dtype=tl.int32) + WIDTH
        for _step in tl.static_range(LOG2_WIDTH + 1):
            mid = (cut_lo + cut_hi) // 2
            before = tl.sum((at_v & (cols[None, :] < mid[:, None])).to(tl.int32), axis=1)
            enough = before.to(tl.float32) >= quota
            cut_hi = tl.where(enough, mid, cut_hi)
            cut_lo = tl.where(enough, cut_lo, mid + 1)
        exact = above | (at_v & (cols[None, :] < cut_hi[:, None]))
        keep = tl.where(single[:, None], keep, exact)
    return keep

#: Narrowest block width a compacted bisection runs at.
MIN_COMPACT_WIDTH = 16
_MIN_CW = tl.constexpr(MIN_COMPACT_WIDTH)


def compact_scratch_elements(width: int) -> int:
    """fp32-sized elements of one block row's scratch slot at launch width ``width``
    (0 when that width is never compacted): ``width / 4`` survivors (fp32), their
    ``width / 4`` columns (int32) and ``width`` kept flags (int8)."""
    return 3 * (width // 4) if width // 4 >= MIN_COMPACT_WIDTH else 0


@triton.jit
def _compact_top_p(prob, threshold, admissible_count, values, columns, flags, live, slot,
                   n_live, ROWS: tl.constexpr, WIDTH: tl.constexpr, CW: tl.constexpr,
                   LOG2_CW: tl.constexpr, EARLY_EXIT: tl.constexpr,
                   CHECK_EVERY: tl.constexpr):
    """Top-p of the survivors at compacted width ``CW``: the kept survivors' flags are
    set in ``flags`` (one row of ``WIDTH`` int8 per block row, zeroed here first).

    ``values`` and ``columns`` are the rows' survivor slots (fp32, int32), at
    least ``CW`` each. Nothing of the full-width block but ``prob`` stays live
    across the bisection: the flags come back by column, not by slot.
    """
    cols = tl.arange(0, WIDTH)
    tl.store(flags[:, None] + cols[None, :], tl.zeros((ROWS, WIDTH), dtype=tl.int8))
    tl.store(values[:, None] + slot, prob, mask=live)
    tl.store(columns[:, None] + slot, cols[None, :] + tl.zeros_like(slot), mask=live)
    tl.debug_barrier()
    ccols = tl.arange(0, CW)
    in_compact = ccols[None, :] < n_live[:, None]
    cprob = tl.load(values[:, None] + ccols[None, :], mask=in_compact, other=-2.0)
    kept = _top_p_keep(cprob, threshold, admissible_count, ROWS, CW, LOG2_CW, EARLY_EXIT,
                       CHECK_EVERY)
    where = tl.load(columns[:, None] + ccols[None, :], mask=in_compact, other=0)
    tl.store(flags[:, None] + where, tl.full((ROWS, CW), 1, dtype=tl.int8),
             mask=in_compact & kept)


@triton.jit
def _top_p_keep_compact(prob, threshold, admissible_count, SCRATCH, ROWS: tl.constexpr,
                        WIDTH: tl.constexpr, LOG2_WIDTH: tl.constexpr,
                        EARLY_EXIT: tl.constexpr, CHECK_EVERY: tl.constexpr,
                        COMPACT: tl.constexpr):
    """``_top_p_keep(prob, threshold, admissible_count, ROWS, WIDTH, LOG2_WIDTH,
    EARLY_EXIT, CHECK_EVERY)``, by the module docstring's compaction when ``COMPACT``.

    ``prob`` (ROWS, WIDTH) holds probabilities at admissible tiles and values
    below 0 elsewhere; ``threshold`` is one scalar; ``SCRATCH`` (fp32) points at
    this program's ``ROWS * compact_scratch_elements(WIDTH)`` elements.
    """
    if (not COMPACT) or (WIDTH // 4 < _MIN_CW):
        keep = _top_p_keep(prob, threshold, admissible_count, ROWS, WIDTH, LOG2_WIDTH,
                           EARLY_EXIT, CHECK_EVERY)
    else:
        t0 = (1.0 - threshold - 1e-5) / tl.maximum(admissible_count, 1).to(tl.float32)
        live = prob > tl.maximum(t0, 0.0)[:, None]
        taken = live.to(tl.int32)
        n_live = tl.sum(taken, axis=1)
        fullest = tl.max(n_live, axis=0)
        if (fullest <= WIDTH // 4) & (threshold < 1.0):
            slot = tl.cumsum(taken, axis=1) - taken
            rows = tl.arange(0, ROWS)
            values = SCRATCH + rows * (WIDTH // 4)
            columns = (SCRATCH + ROWS * (WIDTH // 4)).to(tl.pointer_type(tl.int32)) \
                + rows * (WIDTH // 4)
            flags = (SCRATCH + 2 * ROWS * (WIDTH // 4)).to(tl.pointer_type(tl.int8)) \
                + rows * WIDTH
            tl.debug_barrier()  # an earlier use of the slots fully read
            if WIDTH // 16 < _MIN_CW:
                _compact_top_p(prob, threshold, admissible_count, values, columns, flags, live,
                               slot, n_live, ROWS, WIDTH, WIDTH // 4, LOG2_WIDTH - 2,
                               EARLY_EXIT, CHECK_EVERY)
            elif fullest <= WIDTH // 16:
                _compact_top_p(prob, threshold, admissible_count, values, columns, flags, live,
                               slot, n_live, ROWS, WIDTH, WIDTH // 16, LOG2_WIDTH - 4,
                               EARLY_EXIT, CHECK_EVERY)
            else:
                _compact_top_p(prob, threshold, admissible_count, values, columns, flags, live,
                               slot, n_live, ROWS, WIDTH, WIDTH // 4, LOG2_WIDTH - 2,
                               EARLY_EXIT, CHECK_EVERY)
            tl.debug_barrier()
            keep = tl.load(flags[:, None] + tl.arange(0, WIDTH)[None, :]) != 0
        else:
            keep = _top_p_keep(prob, threshold, admissible_count, ROWS, WIDTH, LOG2_WIDTH,
                               EARLY_EXIT, CHECK_EVERY)
    return keep


__all__ = ["MIN_COMPACT_WIDTH", "compact_scratch_elements"]
