"""The launch plan of Prism's selection kernel: its tuning, row ranges and cached launches.

:mod:`~prism.optimized.selection` holds the kernel; this module decides how it
is launched for one call shape (contract §6: which rows share a width) and
keeps each shape's prepared launches, so that a call only looks them up.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from prism.reference.config import PrismConfig
from prism.reference.tiles import TileLayout

from ._runtime import next_power_of_2
from .launch import Prepared
from .pooling import band_pairs, work_layout

#: Tensor-core launches wider than this many key tiles take ``wide_num_stages``.
WIDE_DOT_WIDTH = 1024


@dataclass(frozen=True)
class SelectionTuning:
    """Launch shape of the selection kernel (benchmarks/NOTES.md records the tuning).

    Attributes
    ----------
    dot_max_width : int
        Launches at most this wide (key tiles) use tensor cores (16 rows a program);
        wider ones the CUDA cores. 2048 covers rows of 256K tokens at tile 128: on the
        H200 it ran random inputs' selection 8.04 -> 6.15 ms (benchmarks/NOTES.md item
        36) and, timed against 1024 in one process twice, the structured inputs'
        5.79 -> 4.74 and 5.79 -> 4.71 ms, masks equal (item 40 (e); an earlier trial
        across runs read 4.27 -> 4.88).
    elements_per_thread : int
        Probabilities of one band each thread holds; sets ``num_warps``.
    early_exit : bool
        Stop the top-p bisection once each row's bracket holds one tile.
    rows_per_program : int
        Query-tile rows of one program on the tensor-core path (a power of two, >= 16).
    overlap : bool
        On CUDA, with at least ``overlap_min_launches`` launches, run the narrower
        ones on a second stream, filling SMs the widest launch leaves idle.
    merge_width : int
        Causal rows that see at most this many key tiles share one launch of this
        width (or the full row's) instead of one per power of two. 128 since
        2026-12-03 (benchmarks/NOTES.md item 45; random inputs, graph replays, two
        runs): 32K 0.193 against 0.205 ms for 256, 64K 0.498-0.499 against
        0.522-0.523, 128K 1.452-1.456 against 1.460-1.467, 4K-16K and 256K within
        1%; 64 and 32 were slower from 16K on.
    check_every, num_stages : int
        Bisection steps between early-exit checks; pipelining stages of the logits.
    wide_num_stages : int
        Pipelining stages of tensor-core launches wider than ``WIDE_DOT_WIDTH`` (three
        stages of a 2048-wide launch need more shared memory than an H200 SM has).
    stack_bands_max_width : int
        Launches at most this wide run both bands' top-p in one block of twice
        the rows (one chain of reductions instead of two); 0 turns this off.
    """

    dot_max_width: int = 2048
    elements_per_thread: int = 32
    early_exit: bool = True
    rows_per_program: int = 16
    overlap: bool = True
    overlap_min_launches: int = 3
    merge_width: int = 128
    check_every: int = 2
    num_stages: int = 3
    stack_bands_max_width: int = 64
    wide_num_stages: int = 2


def _launch_plan(layout: TileLayout, causal: bool, tuning: SelectionTuning):
    """Row ranges that share one kernel shape: ``[(row_start, row_end, width, rows, use_dot)]``.

    A causal row ``i`` sees key tiles ``0 .. first + i``; it goes to the
    narrowest power-of-two width (at least ``merge_width``, capped by the full
    row) that holds them. Launches wider than ``dot_max_width`` tiles use the
    CUDA-core path with fewer rows per program, so a program keeps at most 8K
    probabilities per band there; the narrower launches of the same call keep
    the tensor cores.
    """
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    full_width = max(16, next_power_of_2(nkt))
    narrowest = min(full_width, max(16, next_power_of_2(tuning.merge_width)))
    plan = []
    row = 0
    while row < nqt:
        seen = min(nkt, layout.first_query_tile + row + 1) if causal else nkt
        width = max(narrowest, next_power_of_2(seen))
        if causal and width < nkt:
            # Rows r with first + r + 1 <= width fit in this width.
            end = max(row + 1, min(nqt, width - layout.first_query_tile))
        else:
            end = nqt
        use_dot = width <= tuning.dot_max_width
        rows = tuning.rows_per_program if use_dot else max(1, min(16, 8192 // width))
        plan.append((row, end, width, rows, use_dot))
        row = end
    return plan

_PLANS: dict = {}


def _cached_plan(layout: TileLayout, causal: bool, tuning: SelectionTuning):
    """:func:`_launch_plan` with each launch's grid rows and warps, cached per shape."""
    key = (layout, causal, tuning)
    plan = _PLANS.get(key)
    if plan is None:
        plan = []
        for row_start, row_end, width, rows, use_dot in reversed(_launch_plan(layout, causal,
                                                                              tuning)):
            warps = max(4, min(16, rows * width // (32 * tuning.elements_per_thread)))
            plan.append((row_start, row_end, width, rows, use_dot,
                         triton.cdiv(row_end - row_start, rows), warps))
        if len(_PLANS) > 4096:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


_LAUNCHES: dict = {}  # by the identity of layout, config and tuning
_LAUNCHES_BY_VALUE: dict = {}


def launch_steps(layout: TileLayout, cfg: PrismConfig, tuning: SelectionTuning, causal: bool,
                 b: int, hq: int, hkv: int, d: int, high_dim: int, low_dim: int,
                 write_mask: bool, write_indices: bool):
    """:func:`_prepare_launches` of one call shape, cached.

    Keyed by the identity of the (frozen) layout, config and tuning: hashing
    their fields costs microseconds per call. The entry keeps them alive, so an
    id is never reused while its entry exists. Objects made afresh for every
    call (a config copied per call) miss here and are found by value instead,
    without filling this cache.
    """
    rest = (causal, b, hq, hkv, d, high_dim, low_dim, write_mask, write_indices)
    cached = _LAUNCHES.get((id(layout), id(cfg), id(tuning), *rest))
    if cached is not None:
        return cached[3]
    steps = _LAUNCHES_BY_VALUE.get((layout, cfg, tuning, *rest))
    if steps is None:
        steps = _prepare_launches(layout, causal, tuning, cfg, b, hq, hkv, d, high_dim,
                                  low_dim, write_mask, write_indices)
        for cache in (_LAUNCHES, _LAUNCHES_BY_VALUE):
            if len(cache) > 1024:
                cache.clear()
        _LAUNCHES_BY_VALUE[(layout, cfg, tuning, *rest)] = steps
        _LAUNCHES[(id(layout), id(cfg), id(tuning), *rest)] = (layout, cfg, tuning, steps)
    return steps


def _prepare_launches(layout: TileLayout, causal: bool, tuning: SelectionTuning,
                      cfg: PrismConfig, b: int, hq: int, hkv: int, d: int, high_dim: int,
                      low_dim: int, write_mask: bool, write_indices: bool):
    """``[(grid, Prepared)]`` of every launch of one call shape, widest rows first."""
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    k_stride = -(-nkt // 16) * 16  # the row stride of the pooled keys
    _, q_off, k_off, k_energy_off, _ = work_layout(b, hq, hkv, d, nqt, nkt)
    high_start, _, low_start, _ = band_pairs(d, high_dim, low_dim)
    dk_cap = next_power_of_2(max(high_dim, low_dim))
    half_layout = 1 if cfg.rope_layout == "half" else 0
    steps = []
    for row_start, row_end, width, rows, use_dot, programs, warps in _cached_plan(
            layout, causal, tuning):
        dk = max(16 if use_dot else 8, min(32, 16384 // width, dk_cap))  # tl.dot: K >= 16
        steps.append(((programs, b * hq), Prepared(
            (hq, hq // hkv, nqt, nkt, k_stride, layout.first_query_tile,
             row_start, row_end,
             d, half_layout, high_dim, low_dim, high_start, low_start,
             float(cfg.high_threshold), float(cfg.low_threshold),
             float(cfg.high_temperature), float(cfg.low_temperature), float(cfg.eps),
             q_off, k_off, k_energy_off),
            dict(CAUSAL=causal, CALIBRATE=cfg.calibrate,
                 FORCE_SINK=cfg.force_sink, FORCE_DIAGONAL=cfg.force_diagonal,
                 WRITE_MASK=write_mask, WRITE_INDICES=write_indices,
                 ROWS=rows, WIDTH=width, LOG2_WIDTH=width.bit_length() - 1, DK=dk,
                 CHUNK=min(width, 128), USE_DOT=use_dot,
                 EARLY_EXIT=tuning.early_exit, CHECK_EVERY=tuning.check_every,
                 STACK_BANDS=width <= tuning.stack_bands_max_width,
                 num_warps=warps,
                 num_stages=(tuning.wide_num_stages if use_dot and width > WIDE_DOT_WIDTH
                             else tuning.num_stages)))))
    return steps
