"""Top-p without sorting, in registers (contract §6): the bisection both finishing kernels use.

:func:`_top_p_keep` keeps a (ROWS, WIDTH) block's top-p tiles by a bisection
on the threshold's fp32 bits; :mod:`prism.optimized.selection`'s docstring,
step 4, derives the rule. Prism's selection kernel and every estimator's
finishing launch (:mod:`prism.optimized.tile_union`) call it.
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

    ``prob`` is (ROWS, WIDTH), probabilities at admissible tiles and a value below
    0 elsewhere (:func:`prism.optimized.selection._softmax_rows`); ``admissible_count``
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
