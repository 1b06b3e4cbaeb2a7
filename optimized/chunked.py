"""Chunked prefill on the kernels: a chunk's selection fed from a PooledKeyCache (docs/serving.rst).

A chunk of ``C`` queries over ``P`` cached tokens selects what the one-shot
call ``select_blocks(q_chunk, k[:P + C])`` selects (contract §2: ``Nq = C``,
``Nk = P + C``). :class:`~prism.reference.PooledKeyCache` holds the means of
the ``f = P // block_size`` complete key tiles (transposed, (Hkv, D, f), the
selection kernel's layout) and, per KV head and dim, the float64 sum of their
squares. :func:`cached_select` runs the same two kernels as an uncached call
(:mod:`~prism.optimized.pooling`, :mod:`~prism.optimized.selection`) on one
pooling buffer (:func:`~prism.optimized.pooling.work_layout`) filled so:

* key tile columns ``0 .. f - 1``: the stored means, one device copy;
* the key energy slots: the stored tiles' energies over all dims and each
  band's dims, ``square_sums @ membership`` (one (Hkv, D) x (D, 3) product);
* the pooling launch pools the chunk's query tiles and only key tiles
  ``f ..`` (the tile left partial by the last chunk, re-pooled, and the
  chunk's), reading keys from row ``f * block_size`` on (contiguous keys, or
  through the block table: :mod:`~prism.optimized.paged_pooling`), into
  their own columns, and adds their energies to the slots (its float64
  atomics);
* the selection launches are those of the uncached call of that shape.

The newly completed tiles are then copied from the buffer into the cache.
Each tile's mean is summed in the same order as in an uncached call, so the
mask equals the uncached kernel's except where the float64 energy sums,
added in another order, round to another fp32 temperature (the contract's
boundary ties; not seen in the tests). NaN/Inf in the chunk's queries or in
the keys read set the pooling launch's flag; the caller reads it once at the
end of the call, and on a hit the caches are truncated back to where the
call found them (:func:`undo_and_raise`) before the reference's error is
raised.
"""

from __future__ import annotations

import torch

from prism.reference.bands import band_dims
from prism.reference.paged import check_cached_finite, checked_skips, gather_tokens
from prism.reference.pooled_cache import select_from_pooled
from prism.reference.registry import estimator_spec
from prism.reference.tile_mask import TileMask
from prism.reference.validation import check_finite
from prism.reference.varlen import _name_sequence, as_heads

from .indices import mask_rows_to_indices
from .paged_pooling import _pool_paged_kernel, paged_pool_plan
from .plan_items import zero_
from .pooling import _pool_tiles_kernel, nonfinite_flag, pool_plan, work_layout
from .selection import _DEFAULT_TUNING, MAX_WIDTH, launch_steps, run_selection

_MEMBERSHIP: dict = {}


def _membership(d: int, high_dim: int, low_dim: int, rope_layout: str, device) -> torch.Tensor:
    """(D, 3) float64: 1 where a head dim counts in the energy over all dims, the high
    band and the low band (the pooling kernel's three energy sums)."""
    key = (d, high_dim, low_dim, rope_layout, device)
    matrix = _MEMBERSHIP.get(key)
    if matrix is None:
        high, low = band_dims(d, high_dim, low_dim, rope_layout)
        matrix = torch.zeros(d, 3, dtype=torch.float64)
        matrix[:, 0] = 1
        matrix[high, 1] = 1
        matrix[low, 2] = 1
        matrix = matrix.to(device)
        if len(_MEMBERSHIP) > 64:
            _MEMBERSHIP.clear()
        _MEMBERSHIP[key] = matrix
    return matrix


def cached_select(q, keys, cache, num_keys: int, cfg, causal: bool, *, tuning=None):
    """One sequence's selection from its cache; stores the tiles this call completes.

    Parameters
    ----------
    q : Tensor (1, Hq, C, D)
        The chunk's queries (any strides).
    keys : Tensor (1, Hkv, num_keys - cache.num_tokens, D), or (k_cache, table_row)
        The sequence's keys from ``cache.num_tokens`` on; or a paged cache
        (num_pages, page_size, Hkv, D) and the sequence's (1, max_pages) row of
        the block table, read in place (:mod:`prism.optimized.paged_pooling`).
    cache : PooledKeyCache
        Checked by the caller (:meth:`~prism.reference.PooledKeyCache.check`).
    num_keys : int
        ``Nk``: every key of the sequence, the chunk's included.

    Returns
    -------
    ``(mask, kv_num_blocks, kv_indices, nonfinite)`` as
    :func:`prism.optimized.ops.select` returns them for ``(q, k[:num_keys])``.
    """
    from .ops import _band_sizes, _cached_layout

    paged = isinstance(keys, tuple)
    _, hq, nq, d = q.shape
    hkv = keys[0].shape[2] if paged else keys.shape[1]
    device = q.device
    layout = _cached_layout(nq, num_keys, cfg.block_size, causal)
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    first = cache.num_tiles
    if nkt == 0 or nkt > MAX_WIDTH:
        # No key (an empty mask), or rows too wide for the kernel: the reference's stages.
        k_tail = keys
        if paged:
            k_tail = as_heads(gather_tokens(keys[0], keys[1], [cache.num_tokens], [num_keys]),
                              0, num_keys - cache.num_tokens)
        k_pooled = cache.pooled(k_tail, num_keys)
        if nqt and nkt:
            mask = select_from_pooled(q, k_pooled, num_keys, cfg, causal)
        else:
            mask = torch.zeros(1, hq, nqt, nkt, dtype=torch.bool, device=device)
        num, idx = mask_rows_to_indices(mask)
        return mask, num, idx, nonfinite_flag(q, k_tail, k_tail)
    high_dim, low_dim = _band_sizes(d, cfg.high_dim, cfg.low_dim)
    if paged:
        grid, prepared, size, k_stride, num_sums = paged_pool_plan(
            q, keys[0], keys[1], layout, high_dim, low_dim, cfg.rope_layout, first)
    else:
        grid, prepared, size, (_, _, _, k_stride), num_sums = pool_plan(
            q, keys, None, layout, high_dim, low_dim, cfg.rope_layout, first_key_tile=first)
    _, _, k_off, k_energy_off, _ = work_layout(1, hq, hkv, d, nqt, nkt)
    work = torch.empty(size, dtype=torch.float64, device=device)
    k_pooled = work.view(torch.float32)[k_off:k_off + hkv * d * k_stride].view(hkv, d, k_stride)
    if first:
        zero_(work[:k_energy_off])
        torch.mm(cache.square_sums(), _membership(d, high_dim, low_dim, cfg.rope_layout, device),
                 out=work[k_energy_off:num_sums].view(hkv, 3))
        k_pooled[:, :, :first].copy_(cache.means_t)
    else:
        zero_(work[:num_sums])
    if grid[0] and paged:
        prepared.launch(_pool_paged_kernel, grid, q, keys[0], keys[1], work)
    elif grid[0]:
        prepared.launch(_pool_tiles_kernel, grid, q, keys, keys, work)
    cache.append(k_pooled[:, :, first:num_keys // cfg.block_size])
    if nqt == 0:
        mask = torch.zeros(1, hq, 0, nkt, dtype=torch.bool, device=device)
        num, idx = mask_rows_to_indices(mask)
        return mask, num, idx, work[:1]
    tuning = _DEFAULT_TUNING if tuning is None else tuning
    steps = launch_steps(layout, cfg, tuning, causal, 1, hq, hkv, d, high_dim, low_dim,
                         True, True)
    mask, num, idx = run_selection(steps, work, (1, hq, nqt, nkt), device, tuning,
                                   write_mask=True, write_indices=True)
    return mask, num, idx, work[:1]


def cached_estimator_select(q, k, cache, num_keys: int, cfg, causal: bool):
    """One sequence's selection by an estimator with Prism's pooled tiles in it that also
    reads raw keys (Prism's bands joined with vertical-slash tiles, the cascade): Prism's
    stage is :func:`cached_select` on the keys after the cache (which stores the tiles
    this call completes), every other stage reads all of ``k``, (1, Hkv, num_keys, D).
    Returns ``(mask, kv_num_blocks, kv_indices, nonfinite)`` as :func:`cached_select`."""
    from .cascade import _as_prism
    from .estimator_path import estimator_select
    from .ops import _cached_layout

    tail = k[:, :, cache.num_tokens:]
    layout = _cached_layout(q.shape[2], num_keys, cfg.block_size, causal)
    if layout.num_query_tiles * layout.num_key_tiles * q.shape[1] == 0:
        # Nothing to select; the cache still takes the tiles this call completes.
        return cached_select(q, tail, cache, num_keys, _as_prism(cfg), causal)

    def prism_source(prism_cfg, after_pooling):
        mask, _, _, flag = cached_select(q, tail, cache, num_keys, prism_cfg, causal)
        if after_pooling is not None:
            after_pooling()
        return mask, flag

    return estimator_select(q, k, None, cfg, causal, layout, prism_source=prism_source)


def select_with_caches(q, k, ranges, skips, lengths, caches, cfg, causal: bool,
                       return_mask: bool):
    """Selection of a batch in which some sequences have a cache.

    ``ranges[i] = (q0, q1, k0, k1)`` are packed rows; rows ``k0 + skips[i]`` to
    ``k1`` of ``k`` hold sequence ``i``'s keys from ``caches[i].num_tokens`` on
    (all of them without a cache; for estimators that read raw keys, rows ``k0``
    on hold all of them: :func:`prism.reference.paged.key_starts`). Cached
    sequences run :func:`cached_select` (:func:`cached_estimator_select` for
    those estimators), runs of adjacent uncached ones the varlen path's
    :func:`~prism.optimized.varlen.select_runs`. Nothing waits for the GPU.

    Returns ``(pieces, flags, masks, undo)``: ``pieces`` for
    :func:`~prism.optimized.varlen._flatten_indices`, NaN/Inf flags, one
    :class:`~prism.reference.tile_mask.TileMask` per sequence with
    ``return_mask``, and what :func:`undo_and_raise` needs to restore the caches.
    """
    from .varlen import select_runs

    pieces, flags, masks = [], [], []
    undo = [(cache, cache.num_tiles) for cache in caches if cache is not None]
    raw = estimator_spec(cfg.estimator).raw_keys
    pending: list = []

    def flush():
        if pending:
            run = select_runs(q, k, None, pending, cfg, causal, return_mask)
            pieces.extend(run[0])
            flags.extend(run[1])
            masks.extend(run[2])
            pending.clear()

    for i, ((q0, q1, k0, k1), cache) in enumerate(zip(ranges, caches, strict=True)):
        if cache is None:
            pending.append((q0, q1, k0, k1))
            continue
        flush()
        if raw:
            mask, num, idx, flag = cached_estimator_select(
                as_heads(q, q0, q1), as_heads(k, k0, k1), cache, lengths[i], cfg, causal)
        else:
            mask, num, idx, flag = cached_select(as_heads(q, q0, q1),
                                                 as_heads(k, k0 + skips[i], k1), cache,
                                                 lengths[i], cfg, causal)
        pieces.append((1, num, idx))
        flags.append(flag)
        if return_mask:
            masks.append(TileMask(mask, block_size=cfg.block_size, causal=causal,
                                  num_queries=q1 - q0, num_keys=lengths[i],
                                  kv_num_blocks=num, kv_indices=idx))
    flush()
    return pieces, flags, masks, undo


def flagged(flags) -> bool:
    """Whether any NaN/Inf flag is set (one copy to the host)."""
    if not flags:
        return False
    if len(flags) == 1:
        return bool(flags[0])
    return bool(torch.cat([f.reshape(-1) for f in flags]).any())


def undo_and_raise(undo, q, k, ranges, skips, caches) -> None:
    """After a NaN/Inf flag: raise the reference's error for the first sequence whose
    queries or keys read (rows ``k0 + skips[i]`` on) hold one, after truncating every
    cache back to where the call found it. Returns if none does (values, or keys that
    selection did not read: the caller's checks go on; a finite tile whose fp32 sum
    overflowed: the call's results stand)."""
    for i, ((q0, q1, k0, k1), cache) in enumerate(zip(ranges, caches, strict=True)):
        try:
            if cache is not None:
                check_cached_finite(q, k, i, (q0, q1, k0 + skips[i], k1))
                continue
            try:
                check_finite("q", as_heads(q, q0, q1))
                check_finite("k", as_heads(k, k0, k1))
            except ValueError as error:
                raise _name_sequence(error, i, 1, f"q rows {q0}:{q1}, k rows {k0}:{k1}") \
                    from error
        except ValueError:
            for cache_, num_tiles in undo:
                cache_.truncate(num_tiles)
            raise


def select_cached(q, k, ranges, skips, lengths, caches, cfg, causal: bool) -> list:
    """The ``select_cached`` hook of :func:`prism.reference.paged._select_all`: the masks
    of :func:`select_with_caches`, after one read of its NaN/Inf flags."""
    _, flags, masks, undo = select_with_caches(q, k, ranges, skips, lengths, caches, cfg,
                                               causal, True)
    if flagged(flags):
        undo_and_raise(undo, q, k, ranges, checked_skips(cfg, skips), caches)
    return masks
