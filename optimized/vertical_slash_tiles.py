"""The vertical-slash stage's second half as Triton kernels: top-p of long rows, then tiles.

What :func:`prism.reference.estimators.vertical_slash_tiles_from_distributions`
computes, in two launches and without sorting:

1. :func:`_long_top_p_kernel` - one program per row (every head's column
   distribution and every head's offset distribution, in one launch): contract
   §6's top-p with its index tie-break over the row's values, then, instead of
   one flag per value, the row's *bins*: for columns, key tile ``i // bs``; for
   offsets, the two tile offsets ``floor(o / bs)`` and ``ceil(o / bs)`` of the
   reference's :func:`~prism.reference.estimators.vertical_slash_tiles_from_kept`.
   A bin is set by storing 1 from every kept value in it (the same value from
   any number of threads: no read-modify-write).
   The same launch may hold one more program per head for the cascade's
   last-tile rule (docs/estimators.rst, the cascade's step 4): it sums the
   head's column distribution into key tiles, then runs the same top-p on
   that row of tile masses and stores one flag per key tile.
2. :func:`prism.optimized.tile_union.union_tiles` - the tile pairs:
   ``column[j] | diagonal[I - j + nk]`` within the admissible tiles (``I`` the
   query tile's absolute index), in a whole selection together with the other
   tiles, the forced ones and the compact indices.

The top-p without a sort. ``F(t)``, the mass strictly above ``t``, is one pass
over the row. Search the fp32 bits of ``t`` for the smallest value ``v`` with
``F(v) < p``, starting from the bracket ``((total - p - 1e-5) / n, max]``
(values at or below ``t`` carry at most ``n t`` of the mass, so ``F`` is at
least ``p`` at its lower end): each pass evaluates ``F`` at :data:`TOP_P_POINTS` thresholds
splitting the bracket evenly (one, the plain bisection, by default; more give
several bisection steps per pass; the answer does not depend on the path, up
to fp32 summation order at the boundary).
A row of at most one block (:data:`LONG_TOP_P_BLOCK` values) stays in registers
and the bisection runs on it, the values outside the bracket masked. A longer
row is narrowed by passes until the bracket ``(lo, hi]`` holds at most
:data:`CANDIDATES` values; one pass copies them out (in index order; a block
holding none of them skips the scan) and the bisection ends on them in
registers: ``F(t) = F(hi) + sum of those above t``. Keep every
``x > v`` and the first ``ceil((p - F(v)) / v)`` values equal to ``v`` by
index (a running count over the chunks; a chunk whose ties are all kept is not
ranked). Rows whose whole mass stays below
``p``, and ``p >= 1``, keep every non-zero value; zeros are never kept.
Causal offset rows skip their first ``Nk - 1`` entries (negative offsets,
always 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prism.reference.tiles import TileLayout

from ._runtime import check_device, next_power_of_2
from .launch import launch
from .tile_union import MAX_UNION_WIDTH, union_tiles

#: Values per chunk of the long-row top-p's passes. On the H200
#: (h200_estimators_stages_bfeba9a.json, the top-p and tiles of 32 heads, graph
#: replays) chunks of 8192 on 16 warps ran 0.0296/0.0703/0.295 ms at 8K/32K/128K
#: against 0.0302/0.0806/0.357 for 4096 on 8 warps (0.0305/0.0796/0.300 for 8192 on 8).
LONG_TOP_P_BLOCK = 8192
#: Most values of a bracket finished in registers (one pass copies them out).
CANDIDATES = 4096
#: Thresholds per step of the search (a power of two): a pass over the row
#: evaluates ``F`` at this many points splitting the bracket evenly,
#: ``log2(TOP_P_POINTS + 1)`` bisection steps per pass (1: plain bisection). On
#: the H200 (h200_estimators_4a1c52e.json, the top-p and tiles of 32 heads) 8 points
#: ran 0.035/0.095/0.406 ms at 8K/32K/128K against 0.034/0.094/0.414 for 1 and
#: 0.051/0.116/0.457 for 16: the passes are not what the kernel waits on, so 1.
TOP_P_POINTS = 1
#: Warps of a long-row top-p program; 0: 16 for chunks of 8192 values or more, 8 for
#: 2048 or more, else 4.
LONG_TOP_P_WARPS = 0
#: Values one tile-sum step of :func:`_long_top_p_kernel` loads (a whole number of
#: tiles, at least one).
SUM_VALUES = 4096
_MIN_BLOCK = 16


@triton.jit
def _bits_threshold(bits):
    """The fp32 threshold of int32 bits; -1 stands for "below every value"."""
    return tl.where(bits < 0, -1.0, bits.to(tl.float32, bitcast=True))


@triton.jit
def _mids(lo, hi, POINTS: tl.constexpr):
    """``POINTS`` thresholds (int32 bits) splitting ``(lo, hi)`` into ``POINTS + 1``
    even parts, all strictly inside it (``hi - lo > 1``; repeated where the bracket
    is narrower). One point is the plain bisection's midpoint."""
    j = tl.arange(0, POINTS).to(tl.int64) + 1
    mid = lo.to(tl.int64) + ((hi - lo).to(tl.int64) * j) // (POINTS + 1)
    return tl.minimum(tl.maximum(mid, lo.to(tl.int64) + 1), hi.to(tl.int64) - 1).to(tl.int32)


@triton.jit
def _mass_above(x, mids):
    """``F(t)`` and ``C(t)`` of the values ``x`` at each threshold of ``mids`` (bits)."""
    above = x[:, None] > _bits_threshold(mids)[None, :]
    return (tl.sum(tl.where(above, x[:, None], 0.0), axis=0),
            tl.sum(above.to(tl.int32), axis=0))


@triton.jit
def _row_mass_above(x_row, length, mids, BLOCK: tl.constexpr, POINTS: tl.constexpr):
    """Over one row, chunk by chunk: ``F`` and ``C`` at each threshold of ``mids``."""
    mass = tl.zeros((POINTS,), dtype=tl.float32)
    count = tl.zeros((POINTS,), dtype=tl.int32)
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + idx, mask=idx < length, other=-1.0)
        chunk_mass, chunk_count = _mass_above(x, mids)
        mass += chunk_mass
        count += chunk_count
    return mass, count


@triton.jit
def _narrow(lo, hi, count_lo, count_hi, mass_hi, mids, mass, count, threshold):
    """The bracket given ``F`` and ``C`` at the thresholds ``mids`` inside it: its upper
    end moves to the lowest threshold with ``F < p``, its lower end to the highest
    threshold below that one with ``F >= p`` (one bisection step for one threshold)."""
    up = mass >= threshold
    new_hi = tl.min(tl.where(up, hi, mids), axis=0)
    new_lo = tl.max(tl.where(up & (mids < new_hi), mids, lo), axis=0)
    at_hi = (mids == new_hi) & ~up
    at_lo = (mids == new_lo) & up
    moved_hi = new_hi != hi
    moved_lo = new_lo != lo
    return (new_lo, new_hi,
            tl.where(moved_lo, tl.max(tl.where(at_lo, count, -1), axis=0), count_lo),
            tl.where(moved_hi, tl.max(tl.where(at_hi, count, -1), axis=0), count_hi),
            tl.where(moved_hi, tl.max(tl.where(at_hi, mass, -1.0), axis=0), mass_hi))


@triton.jit
def _bisect_in_registers(cand, lo, hi, count_lo, count_hi, mass_hi, unresolved, step,
                         threshold, POINTS: tl.constexpr):
    """The bisection on values held in registers: ``cand`` holds the bracket's values
    (anything else <= -1), so ``F(t) = F(hi) + sum of cand above t``. Returns the
    final ``lo, hi, count_lo, count_hi, mass_hi`` and the step count."""
    base_mass = mass_hi
    base_count = count_hi
    while (step < 64) & unresolved:
        mids = _mids(lo, hi, POINTS)
        mass, count = _mass_above(cand, mids)
        lo, hi, count_lo, count_hi, mass_hi = _narrow(
            lo, hi, count_lo, count_hi, mass_hi, mids, base_mass + mass,
            base_count + count, threshold)
        unresolved = (count_lo - count_hi > 1) & (hi - lo > 1)
        step += 1
    return lo, hi, count_lo, count_hi, mass_hi, step


@triton.jit
def _copy_bracket(x_row, length, lo, hi, scratch, BLOCK: tl.constexpr):
    """Copy the row's values in ``(lo, hi]`` (bits) to ``scratch`` in index order and
    return how many there are; a block holding none of them skips its scan."""
    lo_t = _bits_threshold(lo)
    hi_t = hi.to(tl.float32, bitcast=True)
    written = tl.zeros((), dtype=tl.int32)
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + idx, mask=idx < length, other=-1.0)
        inside = (x > lo_t) & (x <= hi_t) & (idx < length)
        inside_count = tl.sum(inside.to(tl.int32), axis=0)
        if inside_count > 0:
            slot = written + tl.cumsum(inside.to(tl.int32), axis=0) - 1
            tl.store(scratch + slot, x, mask=inside)
        written += inside_count
    tl.debug_barrier()  # the program's threads read what others wrote
    return written


@triton.jit
def _tile_sums_program(x_row, length, sums_row, n_tiles, tile,
                       TILES: tl.constexpr, TILE_PAD: tl.constexpr):
    """Sums of one row's values by runs of ``tile``: entry ``j`` of ``sums_row`` is
    the sum of values ``[j * tile, (j + 1) * tile)`` (past ``length``: 0)."""
    t = tl.arange(0, TILE_PAD)
    for start in range(0, n_tiles, TILES):
        tiles = start + tl.arange(0, TILES)
        idx = tiles[:, None] * tile + t[None, :]
        x = tl.load(x_row + idx, mask=(t < tile)[None, :] & (idx < length), other=0.0)
        tl.store(sums_row + tiles, tl.sum(x, axis=1), mask=tiles < n_tiles)


@triton.jit(do_not_specialize=["length_x", "rows_x", "length_y", "start_x", "start_y",
                               "stride_x", "stride_y", "bins_x", "bins_y", "lead_x",
                               "lead_y", "lead2_x", "lead2_y", "rows_xy", "n_sums"])
def _long_top_p_kernel(X, KEEP_X, BINS_X, length_x, rows_x, stride_x, start_x, bins_x, lead_x,
                       lead2_x, Y, KEEP_Y, BINS_Y, length_y, stride_y, start_y, bins_y, lead_y,
                       lead2_y, SCRATCH, threshold, width, rows_xy, SUMS, LAST, n_sums,
                       last_threshold,
                       BLOCK: tl.constexpr, CAND: tl.constexpr, WRITE_KEEP: tl.constexpr,
                       WRITE_BINS: tl.constexpr, POINTS: tl.constexpr,
                       SUM_TILES: tl.constexpr, TILE_PAD: tl.constexpr):
    """Top-p of one row (module docstring); its flags (``KEEP``) and/or bins (``BINS``).

    Programs ``[0, rows_x)`` take the rows of ``X``, ``[rows_x, rows_xy)`` those
    of ``Y`` (columns and offsets in one launch). Row ``r`` is ``length``
    values from ``X + r * stride + start``; its keep flags go to ``KEEP + r *
    length`` and its bins to ``BINS + r * bins`` (value ``idx`` sets bins
    ``(idx + lead) // width`` and ``(idx + lead2) // width`` below ``bins``).
    Programs from ``rows_xy`` on, when launched (one per row of ``X``), are the
    cascade's last-tile rule: they sum the row per ``width`` values into
    ``SUMS + r * n_sums`` (its key tiles' mass), then top-p that row at
    ``last_threshold`` into the flags ``LAST + r * n_sums`` (the same search).
    """
    row = tl.program_id(0)
    if row >= rows_xy:
        r = row - rows_xy
        sums_row = SUMS + r.to(tl.int64) * n_sums
        _tile_sums_program(X + r.to(tl.int64) * stride_x + start_x, length_x, sums_row, n_sums,
                           width, SUM_TILES, TILE_PAD)
        tl.debug_barrier()  # the sums are this program's own stores
        # Row r of SUMS as the top-p's "X" (rows_x = r + 1), binned one value per
        # bin; scratch rows past the other programs'.
        _top_p_program(r, SUMS, LAST, LAST, n_sums, r + 1, n_sums, 0, n_sums, 0, 0,
                       SUMS, LAST, LAST, 0, 0, 0, 0, 0, 0, SCRATCH + rows_xy.to(tl.int64) * CAND,
                       last_threshold, 1, BLOCK, CAND, False, True, POINTS)
    else:
        _top_p_program(row, X, KEEP_X, BINS_X, length_x, rows_x, stride_x, start_x, bins_x,
                       lead_x, lead2_x, Y, KEEP_Y, BINS_Y, length_y, stride_y, start_y,
                       bins_y, lead_y, lead2_y, SCRATCH, threshold, width, BLOCK, CAND,
                       WRITE_KEEP, WRITE_BINS, POINTS)


@triton.jit
def _top_p_program(row, X, KEEP_X, BINS_X, length_x, rows_x, stride_x, start_x, bins_x,
                   lead_x, lead2_x, Y, KEEP_Y, BINS_Y, length_y, stride_y, start_y, bins_y,
                   lead_y, lead2_y, SCRATCH, threshold, width,
                   BLOCK: tl.constexpr, CAND: tl.constexpr, WRITE_KEEP: tl.constexpr,
                   WRITE_BINS: tl.constexpr, POINTS: tl.constexpr):
    """Program ``row`` of the top-p: one row of ``X`` or of ``Y`` (:func:`_long_top_p_kernel`)."""
    if row < rows_x:
        x_row = X + row.to(tl.int64) * stride_x + start_x
        keep_row = KEEP_X + row.to(tl.int64) * length_x
        bins_row = BINS_X + row.to(tl.int64) * bins_x
        length = length_x
        n_bins = bins_x
        lead = lead_x
        lead2 = lead2_x
    else:
        x_row = Y + (row - rows_x).to(tl.int64) * stride_y + start_y
        keep_row = KEEP_Y + (row - rows_x).to(tl.int64) * length_y
        bins_row = BINS_Y + (row - rows_x).to(tl.int64) * bins_y
        length = length_y
        n_bins = bins_y
        lead = lead_y
        lead2 = lead2_y
    # Pass 1: total mass, count and maximum.
    total = tl.zeros((), dtype=tl.float32)
    count_all = tl.zeros((), dtype=tl.int32)
    top = tl.zeros((), dtype=tl.float32)
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + idx, mask=idx < length, other=-1.0)
        total += tl.sum(tl.where(x > -1.0, x, 0.0), axis=0)
        count_all += tl.sum((x > -1.0).to(tl.int32), axis=0)
        top = tl.maximum(top, tl.max(x, 0))
    # Bracket: F(lo) >= p > F(hi), on int32 bits (lo = -1: below every value).
    # Values at or below t add at most count_all * t to the mass, so F(t0) >= p + 1e-5
    # at t0 = (total - p - 1e-5) / count_all (the 1e-5 covers fp32 rounding): the
    # bracket may start there, which saves the passes that would only raise lo.
    # count_lo then stays an upper bound until lo first moves; the search only
    # needs it to bound the bracket's count (the cut itself uses counts at hi).
    t0 = (total - threshold - 1e-5) / tl.maximum(count_all, 1).to(tl.float32)
    lo = tl.where(t0 > 0.0, t0.to(tl.int32, bitcast=True), -1)
    hi = top.to(tl.int32, bitcast=True)
    count_lo = count_all
    count_hi = tl.zeros((), dtype=tl.int32)
    mass_hi = tl.zeros((), dtype=tl.float32)
    everything = (threshold >= 1.0) | (total < threshold)
    unresolved = (~everything) & (count_lo - count_hi > 1) & (hi - lo > 1)
    step = tl.zeros((), dtype=tl.int32)
    if unresolved:
        if length <= BLOCK:
            # The whole row is one block in registers: finish the search on it.
            idx = tl.arange(0, BLOCK)
            x = tl.load(x_row + idx, mask=idx < length, other=-1.0)
            inside = (x > _bits_threshold(lo)) & (x <= hi.to(tl.float32, bitcast=True))
            count_lo = count_hi + tl.sum(inside.to(tl.int32), axis=0)
            unresolved = (count_lo - count_hi > 1) & (hi - lo > 1)
            lo, hi, count_lo, count_hi, mass_hi, step = _bisect_in_registers(
                tl.where(inside, x, -1.0), lo, hi, count_lo, count_hi, mass_hi, unresolved,
                step, threshold, POINTS)
        else:
            # Passes over the row while the bracket holds more than CAND values; each
            # evaluates POINTS thresholds (log2(POINTS + 1) bisection steps).
            while (step < 32) & unresolved & (count_lo - count_hi > CAND):
                mids = _mids(lo, hi, POINTS)
                mass, count = _row_mass_above(x_row, length, mids, BLOCK, POINTS)
                lo, hi, count_lo, count_hi, mass_hi = _narrow(lo, hi, count_lo, count_hi,
                                                              mass_hi, mids, mass, count,
                                                              threshold)
                unresolved = (count_lo - count_hi > 1) & (hi - lo > 1)
                step += 1
            if unresolved:
                # Copy the bracket's values out (this program's scratch row), then
                # finish the search on them in registers.
                scratch = SCRATCH + row.to(tl.int64) * CAND
                written = _copy_bracket(x_row, length, lo, hi, scratch, BLOCK)
                slots = tl.arange(0, CAND)
                cand = tl.load(scratch + slots, mask=slots < written, other=-1.0)
                lo, hi, count_lo, count_hi, mass_hi, step = _bisect_in_registers(
                    cand, lo, hi, count_lo, count_hi, mass_hi, unresolved, step, threshold,
                    POINTS)
    single = count_lo - count_hi == 1
    # Cut value and how many of its ties to keep (index order).
    v = tl.where(everything, 0.0, tl.where(single, _bits_threshold(lo),
                                           hi.to(tl.float32, bitcast=True)))
    safe_v = tl.where(v > 0.0, v, 1.0)
    quota = tl.where(everything | single | (v <= 0.0), 0.0,
                     tl.math.ceil((threshold - mass_hi) / safe_v))
    if WRITE_BINS:
        for start in range(0, n_bins, BLOCK):
            b = start + tl.arange(0, BLOCK)
            tl.store(bins_row + b, tl.zeros((BLOCK,), dtype=tl.int8), mask=b < n_bins)
        tl.debug_barrier()
    seen = tl.zeros((), dtype=tl.int32)
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + idx, mask=idx < length, other=0.0)
        at_v = (x == v) & (idx < length) & ~(everything | single)
        ties = tl.sum(at_v.to(tl.int32), axis=0)
        keep = (x > v) | at_v
        if (seen + ties).to(tl.float32) > quota:
            # Not every tie of this block is kept: rank them (1-based, index order).
            rank = tl.cumsum(at_v.to(tl.int32), axis=0) + seen
            keep = (x > v) | (at_v & (rank.to(tl.float32) <= quota))
        keep = keep & (x > 0.0) & (idx < length)
        if WRITE_KEEP:
            tl.store(keep_row + idx, keep.to(tl.int8), mask=idx < length)
        if WRITE_BINS:
            ones = tl.full((BLOCK,), 1, dtype=tl.int8)
            first = (idx + lead) // width
            tl.store(bins_row + first, ones, mask=keep & (first < n_bins))
            second = (idx + lead2) // width
            tl.store(bins_row + second, ones, mask=keep & (second < n_bins))
        seen += ties


def _launch_top_p(sets, threshold: float, write_keep: bool, write_bins: bool, width: int = 1,
                  last: tuple | None = None):
    """One launch over up to two sets of rows.

    ``sets``: dicts with ``x`` (rows, full_length) fp32 contiguous, ``start``,
    ``length``, ``keep`` (rows, length) int8 or None, ``bins`` (rows, n) int8 or
    None, ``lead``, ``lead2``. ``last``: ``(sums, flags, threshold)``, (rows of
    the first set's ``x``, n) fp32 and int8: extra programs sum each of those
    rows per ``width`` values into ``sums`` and top-p them into ``flags``.
    """
    if len(sets) == 1:
        sets = [sets[0], {**sets[0], "rows": 0}]
    rows = [s.get("rows", s["x"].shape[0]) for s in sets]
    sum_rows = 0 if last is None else last[0].shape[0]
    if not sum(rows) + sum_rows:
        return
    device = sets[0]["x"].device
    dummy = torch.empty(1, dtype=torch.int8, device=device)
    longest = max([s["length"] for s, r in zip(sets, rows, strict=True) if r]
                  + ([last[0].shape[-1]] if sum_rows else []))
    block = min(LONG_TOP_P_BLOCK, max(_MIN_BLOCK, next_power_of_2(longest)))
    scratch = torch.empty((sum(rows) + sum_rows) * CANDIDATES, dtype=torch.float32,
                          device=device)
    args = []
    for i, (s, r) in enumerate(zip(sets, rows, strict=True)):
        keep = s["keep"] if s["keep"] is not None else dummy
        bins = s["bins"] if s["bins"] is not None else dummy
        n_bins = bins.shape[-1] if s["bins"] is not None else 0
        head = [s["x"], keep, bins, s["length"]] + ([r] if i == 0 else [])
        args += head + [s["x"].shape[-1], s["start"], n_bins, s["lead"], s["lead2"]]
    warps = LONG_TOP_P_WARPS or (16 if block >= 8192 else 8 if block >= 2048 else 4)
    sums, flags, last_threshold = last if last is not None else (scratch, dummy, 1.0)
    tile_pad = next_power_of_2(width)
    launch(_long_top_p_kernel, (sum(rows) + sum_rows,), *args, scratch, float(threshold),
           width, sum(rows), sums, flags, sums.shape[-1] if sum_rows else 0,
           float(last_threshold),
           BLOCK=block, CAND=CANDIDATES, WRITE_KEEP=write_keep, WRITE_BINS=write_bins,
           POINTS=TOP_P_POINTS, SUM_TILES=max(1, SUM_VALUES // tile_pad), TILE_PAD=tile_pad,
           num_warps=warps)


def long_top_p_kernel(values: torch.Tensor, threshold: float,
                      more: torch.Tensor | None = None):
    """Contract §6's top-p along the last axis, for long rows, by a Triton kernel.

    Same result as ``top_p_select(values, True, threshold)[0] & (values > 0)``
    (:func:`prism.reference.top_p_select`) up to fp32 summation order at the
    boundary; ``values`` must be non-negative (probabilities). ``more``, a
    second tensor of rows (another length), is done in the same launch.

    Returns
    -------
    Tensor, bool, the shape of ``values`` (and one the shape of ``more``, if given)
    """
    check_device(_long_top_p_kernel, values=values)
    tensors = [values] if more is None else [values, more]
    sets, keeps = [], []
    for t in tensors:
        length = t.shape[-1] if t.dim() else 1
        x = t.float().contiguous().view(-1, max(length, 1))
        keep = torch.zeros(t.shape, dtype=torch.int8, device=t.device)
        keeps.append(keep)
        sets.append({"x": x, "rows": x.shape[0] if length else 0, "start": 0,
                     "length": length, "keep": keep.view(-1, max(length, 1)), "bins": None,
                     "lead": 0, "lead2": 0})
    _launch_top_p(sets, threshold, True, False)
    out = [keep.view(torch.bool) for keep in keeps]
    return out[0] if more is None else (out[0], out[1])


def vertical_slash_bins(vertical: torch.Tensor, slash: torch.Tensor, layout: TileLayout,
                        threshold: float, causal: bool, *, with_bins: bool = True,
                        last_threshold: float | None = None):
    """The top-p of columns and offsets as tile bins, in one launch (step 1 of the module).

    With ``last_threshold`` the same launch also runs the cascade's last-tile
    rule (step 4 of the cascade in docs/estimators.rst): ``vertical`` summed into key tiles,
    then top-p at ``last_threshold`` over those sums (the same search, one
    program per head). ``with_bins=False`` runs only that rule.

    Returns
    -------
    columns : Tensor (B * Hq, nk), int8, or None without bins
        1 where a kept column falls in key tile ``j``.
    diagonals : Tensor (B * Hq, first_query_tile + nq + nk + 1), int8, or None
        1 at ``I - j + nk`` where a kept offset maps to tile offset ``I - j``.
    last_tiles : Tensor (B * Hq, nk), int8, or None without ``last_threshold``
        1 at the key tiles the last-tile rule keeps (mass 0 never).
    mass : Tensor (B * Hq, nk), float32, or None without ``last_threshold``
        ``vertical`` summed over each key tile's tokens.
    """
    b, hq, nk_tokens = vertical.shape
    bs = layout.block_size
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    device = vertical.device
    n_diag = layout.first_query_tile + nq + nk + 1
    vertical = vertical.float().contiguous().view(b * hq, nk_tokens)
    last = None
    if last_threshold is not None:
        last = (torch.empty(b * hq, nk, dtype=torch.float32, device=device),
                torch.empty(b * hq, nk, dtype=torch.int8, device=device), last_threshold)
    columns = diagonals = None
    sets = [{"x": vertical, "start": 0, "length": nk_tokens, "keep": None, "bins": None,
             "lead": 0, "lead2": 0, "rows": 0}]  # without bins: only the last-tile programs
    if with_bins:
        columns = torch.empty(b * hq, nk, dtype=torch.int8, device=device)
        diagonals = torch.empty(b * hq, n_diag, dtype=torch.int8, device=device)
        # Causal: offsets below 0 (the first Nk - 1 entries) hold no mass.
        skip = min(nk_tokens - 1, slash.shape[-1]) if causal else 0
        lead = nk * bs - (nk_tokens - 1) + skip
        slash = slash.float().contiguous().view(b * hq, -1)
        sets = [
            {"x": vertical, "start": 0, "length": nk_tokens, "keep": None, "bins": columns,
             "lead": 0, "lead2": 0},
            {"x": slash, "start": skip, "length": slash.shape[-1] - skip, "keep": None,
             "bins": diagonals, "lead": lead, "lead2": lead + bs - 1}]
    _launch_top_p(sets, threshold, False, True, bs, last=last)
    if last is None:
        return columns, diagonals, None, None
    return columns, diagonals, last[1], last[0]


def vertical_slash_tiles_kernel(vertical: torch.Tensor, slash: torch.Tensor,
                                layout: TileLayout, threshold: float,
                                causal: bool = True) -> torch.Tensor:
    """:func:`prism.reference.estimators.vertical_slash_tiles_from_distributions` by kernels.

    Same signature and result (up to fp32 summation order at the top-p
    boundary): two launches (:func:`vertical_slash_bins`, then the tile pairs
    ``column[j] | diagonal[I - j + nk]`` within the admissible tiles by
    :func:`prism.optimized.tile_union.union_tiles`), no sort, no per-value
    flags in memory.

    Parameters
    ----------
    vertical : Tensor (B, Hq, Nk), float32
    slash : Tensor (B, Hq, P + Nk), float32
    layout : TileLayout
    threshold : float in (0, 1]
    causal : bool

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool, restricted to the admissible tiles
    """
    check_device(_long_top_p_kernel, vertical=vertical, slash=slash)
    b, hq = vertical.shape[:2]
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    if b * hq * nq * nk == 0:
        return torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=vertical.device)
    if nk > MAX_UNION_WIDTH:
        from prism.reference.estimators import vertical_slash_tiles_from_distributions

        return vertical_slash_tiles_from_distributions(vertical, slash, layout, threshold,
                                                       causal)
    columns, diagonals, _, _ = vertical_slash_bins(vertical, slash, layout, threshold,
                                                   causal)
    return union_tiles(layout, causal, (b, hq), columns=columns, diagonals=diagonals)[0]


__all__ = ["CANDIDATES", "LONG_TOP_P_BLOCK", "TOP_P_POINTS", "long_top_p_kernel",
           "vertical_slash_bins", "vertical_slash_tiles_kernel"]
