"""Top-p over a row's survivors only: the bisection on a compacted copy of the rows.

:func:`prism.optimized.selection._top_p_keep` bisects on the threshold with the
whole ``(ROWS, WIDTH)`` block in registers, and each of its 10-20 steps reduces
every entry. Most entries cannot matter: the bisection's bracket starts at
``t0 = (1 - p - 1e-5) / n`` (``n`` admissible tiles), and an entry at or below
``t0`` is never kept (the kept set is ``x > v`` plus ties at ``v``, with
``v > t0``). Rows of sparse probabilities hold few entries above ``t0``: the
cascade's scores exist only at its candidate tiles (a few per cent of a row at
128K tokens).

:func:`_top_p_keep_compact` therefore writes each row's survivors (entries
above ``max(t0, 0)``), in column order, to the program's slot of a scratch
buffer, reads them back as a ``(ROWS, CW)`` block with ``CW`` the smallest of
``WIDTH / 4`` and ``WIDTH / 16`` that holds the program's fullest row, runs the
same :func:`_top_p_keep` there, and maps the kept flags back through the same
slots. The result is the same set: the survivors keep their order (so the
index tie-break is unchanged), and the bracket, the masses above every
threshold it tries and the tie quota see the same entries (only the order of
the fp32 additions differs, as it does between launch widths). Programs whose
fullest row does not fit in ``WIDTH / 4``, and ``p >= 1``, run the plain
bisection.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .selection import _top_p_keep

#: Narrowest block width a compacted bisection runs at.
MIN_COMPACT_WIDTH = 16
_MIN_CW = tl.constexpr(MIN_COMPACT_WIDTH)


def compact_scratch_elements(width: int) -> int:
    """fp32 elements of one block row's scratch slot at launch width ``width`` (0 when
    that width is never compacted)."""
    return width // 4 if width // 4 >= MIN_COMPACT_WIDTH else 0


@triton.jit
def _compact_top_p(prob, threshold, admissible_count, base, live, slot, n_live,
                   ROWS: tl.constexpr, CW: tl.constexpr, LOG2_CW: tl.constexpr,
                   CHECK_EVERY_ARG: tl.constexpr):
    """Top-p of the survivors at compacted width ``CW``; the kept flags go back to
    ``base`` (one scratch row per block row) at the survivors' slots."""
    tl.store(base[:, None] + slot, prob, mask=live)
    tl.debug_barrier()
    ccols = tl.arange(0, CW)
    in_compact = ccols[None, :] < n_live[:, None]
    cprob = tl.load(base[:, None] + ccols[None, :], mask=in_compact, other=-2.0)
    kept = _plain_top_p(cprob, threshold, admissible_count, ROWS, CW, LOG2_CW, CHECK_EVERY_ARG)
    tl.debug_barrier()  # every survivor read before its slot is overwritten
    tl.store(base[:, None] + ccols[None, :], kept.to(tl.float32), mask=in_compact)


@triton.jit
def _plain_top_p(prob, threshold, admissible_count, ROWS: tl.constexpr, WIDTH: tl.constexpr,
                 LOG2_WIDTH: tl.constexpr, CHECK_EVERY_ARG: tl.constexpr):
    """``_top_p_keep`` with early exit, checked every step."""
    if CHECK_EVERY_ARG:  # selection._top_p_keep's CHECK_EVERY parameter, if it has one
        keep = _top_p_keep(prob, threshold, admissible_count, ROWS, WIDTH, LOG2_WIDTH, True, 1)
    else:
        keep = _top_p_keep(prob, threshold, admissible_count, ROWS, WIDTH, LOG2_WIDTH, True)
    return keep


@triton.jit
def _top_p_keep_compact(prob, threshold, admissible_count, SCRATCH, ROWS: tl.constexpr,
                        WIDTH: tl.constexpr, LOG2_WIDTH: tl.constexpr,
                        CHECK_EVERY_ARG: tl.constexpr):
    """``_plain_top_p(prob, threshold, admissible_count, ...)`` by the module
    docstring's compaction.

    ``prob`` (ROWS, WIDTH) holds probabilities at admissible tiles and values
    below 0 elsewhere; ``threshold`` is one scalar; ``SCRATCH`` points at this
    program's ``ROWS * compact_scratch_elements(WIDTH)`` fp32 elements.
    """
    CW0: tl.constexpr = WIDTH // 4
    if CW0 < _MIN_CW:
        keep = _plain_top_p(prob, threshold, admissible_count, ROWS, WIDTH, LOG2_WIDTH,
                            CHECK_EVERY_ARG)
    else:
        t0 = (1.0 - threshold - 1e-5) / tl.maximum(admissible_count, 1).to(tl.float32)
        live = prob > tl.maximum(t0, 0.0)[:, None]
        taken = live.to(tl.int32)
        n_live = tl.sum(taken, axis=1)
        fullest = tl.max(n_live, axis=0)
        if (fullest <= CW0) & (threshold < 1.0):
            slot = tl.cumsum(taken, axis=1) - taken
            base = SCRATCH + tl.arange(0, ROWS) * CW0
            if CW0 // 4 < _MIN_CW:
                _compact_top_p(prob, threshold, admissible_count, base, live, slot, n_live,
                               ROWS, CW0, LOG2_WIDTH - 2, CHECK_EVERY_ARG)
            elif fullest <= CW0 // 4:
                _compact_top_p(prob, threshold, admissible_count, base, live, slot, n_live,
                               ROWS, CW0 // 4, LOG2_WIDTH - 4, CHECK_EVERY_ARG)
            else:
                _compact_top_p(prob, threshold, admissible_count, base, live, slot, n_live,
                               ROWS, CW0, LOG2_WIDTH - 2, CHECK_EVERY_ARG)
            tl.debug_barrier()
            kept = tl.load(base[:, None] + slot, mask=live, other=0.0)
            keep = live & (kept != 0.0)
        else:
            keep = _plain_top_p(prob, threshold, admissible_count, ROWS, WIDTH, LOG2_WIDTH,
                                CHECK_EVERY_ARG)
    return keep


__all__ = ["MIN_COMPACT_WIDTH", "compact_scratch_elements"]
