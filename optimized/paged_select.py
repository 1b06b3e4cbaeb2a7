"""Selection over a paged cache with the keys read through the block table (docs/serving.rst).

:func:`select_paged` selects every sequence of a paged call without gathering
keys: runs of adjacent equal-shape sequences without a
:class:`~prism.reference.PooledKeyCache` pool their key tiles with
:mod:`~prism.optimized.paged_pooling` (one launch per run, the run's rows of
the block table) and then run the selection launches of the contiguous path;
sequences with a cache run :func:`~prism.optimized.chunked.cached_select` on
their row of the table. The pooled means are those of the contiguous path on
gathered keys, bit for bit, so the masks are too. Rows of more than
``MAX_WIDTH`` key tiles, empty grids and estimators other than Prism's (which
read raw keys) gather the keys they need and take the varlen path's
selection.
"""

from __future__ import annotations

from prism.reference.paged import _key_ranges, gather_tokens
from prism.reference.registry import estimator_spec
from prism.reference.tile_mask import TileMask
from prism.reference.varlen import as_batch, as_heads

from .chunked import cached_select, flagged, undo_and_raise
from .paged_pooling import paged_pool_plan, run_paged_pooling, unit_columns
from .selection import _DEFAULT_TUNING, MAX_WIDTH, launch_steps, run_selection


def _uncached_run(q_run, k_cache, table_rows, num_keys: int, cfg, causal: bool):
    """Selection of ``count`` equal-shape sequences without caches: ``(mask, num, idx, flag)``
    as :func:`prism.optimized.ops.select` returns them."""
    from . import ops

    count, hq, nq, d = q_run.shape
    layout = ops._cached_layout(nq, num_keys, cfg.block_size, causal)
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    if not (nqt and nkt and nkt <= MAX_WIDTH):
        k = gather_tokens(k_cache, table_rows, [0] * count, [num_keys] * count)
        return ops.select(q_run, as_batch(k, 0, count, num_keys), None, cfg, causal)
    high_dim, low_dim = ops._band_sizes(d, cfg.high_dim, cfg.low_dim)
    plan = paged_pool_plan(q_run, k_cache, table_rows, layout, high_dim, low_dim,
                           cfg.rope_layout)
    work = run_paged_pooling(plan, q_run, k_cache, table_rows)
    steps = launch_steps(layout, cfg, _DEFAULT_TUNING, causal, count, hq, k_cache.shape[2], d,
                         high_dim, low_dim, True, True)
    mask, num, idx = run_selection(steps, work, (count, hq, nqt, nkt), q_run.device,
                                   _DEFAULT_TUNING, write_mask=True, write_indices=True)
    return mask, num, idx, work[:1]


def select_paged(q, k_cache, block_table, ranges_q, lengths, caches, cfg, causal: bool,
                 return_mask: bool):
    """Every sequence's selection, keys read in place. Nothing waits for the GPU.

    ``ranges_q[i] = (q0, q1)`` are the packed query rows of sequence ``i``,
    ``lengths[i]`` its tokens, ``caches[i]`` a validated cache or None
    (``estimator="prism"``). Returns ``(pieces, flags, masks, undo)`` as
    :func:`prism.optimized.chunked.select_with_caches`.
    """
    table = unit_columns(block_table)
    undo = [(cache, cache.num_tiles) for cache in caches if cache is not None]
    pieces, flags, masks = [], [], []
    i, batch = 0, len(lengths)
    while i < batch:
        q0, q1 = ranges_q[i]
        if caches[i] is not None:
            mask, num, idx, flag = cached_select(as_heads(q, q0, q1), (k_cache, table[i:i + 1]),
                                                 caches[i], lengths[i], cfg, causal)
            count = 1
        else:
            count = 1
            while (i + count < batch and caches[i + count] is None
                   and lengths[i + count] == lengths[i]
                   and ranges_q[i + count][0] == ranges_q[i + count - 1][1]
                   and ranges_q[i + count][1] - ranges_q[i + count][0] == q1 - q0):
                count += 1
            mask, num, idx, flag = _uncached_run(as_batch(q, q0, count, q1 - q0), k_cache,
                                                 table[i:i + count], lengths[i], cfg, causal)
        pieces.append((count, num, idx))
        flags.append(flag)
        if return_mask:
            masks.extend(TileMask(mask[g:g + 1], block_size=cfg.block_size, causal=causal,
                                  num_queries=q1 - q0, num_keys=lengths[i],
                                  kv_num_blocks=num[g:g + 1], kv_indices=idx[g:g + 1])
                         for g in range(count))
        i += count
    return pieces, flags, masks, undo


def raise_paged(undo, starts, q, k_cache, block_table, ranges_q, lengths, caches) -> None:
    """After a NaN/Inf flag of :func:`select_paged`: gather the keys it read (from
    ``starts[i]``, each cache's ``num_tokens`` when the call began) and raise the
    reference's error, caches truncated back (:func:`~prism.optimized.chunked.undo_and_raise`)."""
    k = gather_tokens(k_cache, block_table, starts, lengths)
    ranges = _key_ranges(ranges_q, [n - s for n, s in zip(lengths, starts, strict=True)])
    undo_and_raise(undo, q, k, ranges, [0] * len(lengths), caches)


def select_blocks_paged_hook(q, k_cache, block_table, ranges_q, lengths, caches, cfg,
                             causal: bool):
    """The ``select_paged`` hook of :func:`prism.reference.paged.run_paged_select`:
    masks with the keys read in place, after one read of the NaN/Inf flags
    (NotImplemented for estimators other than Prism's: the reference gathers)."""
    if estimator_spec(cfg.estimator).raw_keys:
        return NotImplemented
    starts = [0 if c is None else c.num_tokens for c in caches]
    _, flags, masks, undo = select_paged(q, k_cache, block_table, ranges_q, lengths, caches,
                                         cfg, causal, True)
    if flagged(flags):
        raise_paged(undo, starts, q, k_cache, block_table, ranges_q, lengths, caches)
    return masks

