"""Paged KV caches and chunked prefill (docs/serving.rst).

Engines keep K and V in pages: ``k_cache`` (num_pages, page_size, Hkv, D) and
``v_cache`` (num_pages, page_size, Hkv, Dv). Sequence ``i`` holds
``seq_lens[i]`` tokens, token ``t`` in page ``block_table[i, t // page_size]``
at slot ``t % page_size``. Only the first ``ceil(seq_lens[i] / page_size)``
entries of a row are read; the rest may hold anything (engines pad with -1
or 0). Page size and tile size are independent.

The queries are packed as in :mod:`prism.reference.varlen`: sequence ``i``'s
``Nq_i`` queries are rows ``cu_seqlens_q[i] : cu_seqlens_q[i + 1]`` of ``q``
and, when causal, the LAST ``Nq_i`` of its ``seq_lens[i]`` tokens (the cache
already holds the keys of the chunk being prefilled, as engines write K/V
before attention). A prefill chunk over a cached prefix is exactly the
contract's KV-prefix case: ``Nq = chunk``, ``Nk = prefix + chunk``.

How K/V are read here: each sequence's pages are gathered into one packed
(total_k, Hkv, D) tensor (one indexed copy of the keys and values the call
reads), then the varlen functions run on views of it. The copy reads and
writes ``sum_i seq_lens[i] * Hkv * (D + Dv)`` elements once per call.
:mod:`prism.optimized` reads the pages in place in its attention kernel
(the ``run_paged_packed`` hook of :func:`run_paged_prism`).

Chunked prefill: :class:`~prism.reference.pooled_cache.PooledKeyCache` keeps
one sequence's pooled key tiles between chunks, so selection for a new chunk
pools only the keys after the last completed tile (see the class); an
implementation with a ``select_cached`` hook (:mod:`prism.optimized`) runs
the selection of cached sequences itself. Estimators that also read raw keys
(the accurate preset) still read every key; only Prism's tiles come from
the cache (:func:`key_starts`, docs/serving.rst).
"""

from __future__ import annotations

import contextlib

import torch

from . import attention as _attention
from . import select as _select
from .config import PrismConfig, resolve_config
from .pooled_cache import PooledKeyCache, select_from_pooled, unchanged_on_error
from .registry import ESTIMATORS, estimator_spec
from .validation import (
    FLOAT_DTYPES,
    check_finite,
    check_same_dtype_device,
    validate_qk,
    validate_scale,
)
from .varlen import (
    _name_sequence,
    as_heads,
    check_cu_seqlens,
    check_lengths_vector,
    check_max_seqlen,
    check_packed,
    run_attention,
    run_prism,
    run_select,
)

# --------------------------------------------------------------------------
# Validation and the page gather.
# --------------------------------------------------------------------------

def _check_cache(name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions {layout}, got shape {tuple(t.shape)}; "
                         f"a cache of (num_pages * page_size, Hkv, D) rows can be viewed as "
                         f"{name}.view(num_pages, page_size, Hkv, D)")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got {t.dtype}; "
                        f"cast it, e.g. {name}.to(torch.bfloat16)")
    if t.shape[1] < 1:
        raise ValueError(f"{name} must have pages of at least one token: its shape {layout} is "
                         f"{tuple(t.shape)}, page_size 0; allocate pages of 16 or more tokens")


def validate_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                   max_seqlen_q: int, *, causal: bool):
    """Validate a paged call; return ``(ranges_q, seq_lens as a list)``.

    ``ranges_q[i]`` is ``(q_start, q_end)`` of sequence ``i``. ``v_cache`` may be
    None (selection only).
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    check_packed("q", q)
    _check_cache("k_cache", k_cache, "(num_pages, page_size, Hkv, D)")
    check_same_dtype_device(q=q, k_cache=k_cache)
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    if v_cache is not None:
        _check_cache("v_cache", v_cache, "(num_pages, page_size, Hkv, Dv)")
        check_same_dtype_device(k_cache=k_cache, v_cache=v_cache)
        if v_cache.shape[:3] != k_cache.shape[:3]:
            raise ValueError(
                f"v_cache must match k_cache in pages, page size and heads: k_cache has "
                f"{tuple(k_cache.shape)}, v_cache has {tuple(v_cache.shape)}"
            )
    validate_qk(as_heads(q, 0, 0), k_cache[:0, 0].permute(1, 0, 2)[None], causal=False,
                check_values=False)
    if not isinstance(block_table, torch.Tensor) or block_table.dtype not in (torch.int32,
                                                                             torch.int64):
        raise TypeError(
            "block_table must be an int32 tensor (B, max_pages) of page indices, got "
            + (f"dtype {block_table.dtype}" if isinstance(block_table, torch.Tensor)
               else type(block_table).__name__) + "; convert with block_table.to(torch.int32)"
        )
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be 2-D (B, max_pages), got shape "
                         f"{tuple(block_table.shape)}")
    if block_table.device != k_cache.device:
        raise ValueError(f"block_table is on {block_table.device} but k_cache is on "
                         f"{k_cache.device}; move it with block_table.to(k_cache.device)")
    lengths = check_lengths_vector("seq_lens", seq_lens, "tokens per sequence, shape (B,)")
    cq = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q")
    batch = block_table.shape[0]
    if len(lengths) != batch or len(cq) != batch + 1:
        raise ValueError(
            f"block_table ({batch} rows), seq_lens ({len(lengths)} entries) and cu_seqlens_q "
            f"({len(cq)} offsets) must describe the same B sequences (B, B and B + 1)"
        )
    lengths_q = [cq[i + 1] - cq[i] for i in range(batch)]
    check_max_seqlen("max_seqlen_q", max_seqlen_q, lengths_q, "cu_seqlens_q")
    capacity = block_table.shape[1] * page_size
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"seq_lens[{i}] must be >= 0, got {n}")
        if n > capacity:
            raise ValueError(
                f"seq_lens[{i}] = {n} tokens do not fit in the {block_table.shape[1]} pages of "
                f"block_table's row ({capacity} tokens at page_size {page_size}); widen "
                "block_table or fix seq_lens"
            )
        if causal and lengths_q[i] > n:
            raise ValueError(
                f"causal attention needs Nq <= Nk in every sequence, but sequence {i} has "
                f"{lengths_q[i]} queries (cu_seqlens_q) and {n} cached tokens (seq_lens); the "
                "cache must already hold the keys of the queries' own chunk"
            )
    _check_pages(block_table, lengths, page_size, num_pages)
    return [(cq[i], cq[i + 1]) for i in range(batch)], lengths


def _check_pages(block_table, lengths: list[int], page_size: int, num_pages: int) -> None:
    """Every page a sequence reads must be a valid index into the cache."""
    if not lengths:
        return
    used = -(-torch.tensor(lengths, device=block_table.device) // page_size)
    columns = torch.arange(block_table.shape[1], device=block_table.device)
    read = columns[None, :] < used[:, None]
    bad = read & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0].tolist())
        raise ValueError(
            f"block_table[{i}, {j}] = {int(block_table[i, j])} is not a page of the cache "
            f"(valid pages are 0..{num_pages - 1}); sequence {i} reads its first {int(used[i])} "
            "entries, so each must index a page of k_cache/v_cache"
        )


def gather_tokens(cache: torch.Tensor, block_table: torch.Tensor, starts: list[int],
                  ends: list[int]) -> torch.Tensor:
    """Tokens ``starts[i] .. ends[i] - 1`` of every sequence, packed: (total, H, D).

    One indexed copy; ``block_table`` must already be validated. The token
    positions are built on the host and sent in one copy, so nothing waits
    for the device.
    """
    page_size = cache.shape[1]
    device = cache.device
    counts = [e - s for s, e in zip(starts, ends, strict=True)]
    total = sum(counts)
    if total == 0:
        return cache.new_empty(0, cache.shape[2], cache.shape[3])
    seq = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    first = torch.tensor([0] + counts[:-1]).cumsum(0)
    position = torch.arange(total) - first[seq] + torch.tensor(starts)[seq]
    seq, position = torch.stack([seq, position]).to(device, non_blocking=True)
    pages = block_table[seq, position // page_size].long()
    rows = pages * page_size + position % page_size
    return cache.flatten(0, 1).index_select(0, rows) if cache.is_contiguous() else \
        cache[pages, position % page_size]


# --------------------------------------------------------------------------
# NaN/Inf errors in the caller's terms: pages, slots and tokens, not gathered rows.
# --------------------------------------------------------------------------

_NONFINITE_ADVICE = ("Prism's selection and attention are undefined on non-finite inputs: "
                     "clean or clamp them first")


def _first_nonfinite(rows: torch.Tensor):
    """``(count, row, head)`` of the non-finite entries of (n, H, D) ``rows``; None if none."""
    if rows.numel() == 0:
        return None
    bad = ~torch.isfinite(rows)
    count = int(bad.sum())
    if count == 0:
        return None
    row, head, _ = (int(x) for x in bad.nonzero()[0])
    return count, row, head


def paged_nonfinite_error(q, k_cache, v_cache, block_table, ranges_q, lengths,
                          starts=None) -> ValueError | None:
    """The first NaN/Inf a paged call reads, as the ``ValueError`` to raise (None if none).

    Sequence by sequence: its queries (rows of the packed ``q``), its keys from
    token ``starts[i]`` on (0 by default; a :class:`PooledKeyCache`'s end where
    selection reads only the keys after it), then its values (``v_cache`` None:
    selection only). The message names the tensor the caller passed
    (``k_cache``, ``v_cache``), the sequence, the token and its page and slot.
    """
    page_size = k_cache.shape[1]
    for i, ((q0, q1), n) in enumerate(zip(ranges_q, lengths, strict=True)):
        found = _first_nonfinite(q[q0:q1])
        if found:
            count, row, head = found
            return ValueError(f"sequence {i}: q contains {count} NaN or Inf value(s) in its "
                              f"rows {q0}:{q1}, the first at row {q0 + row} (query head "
                              f"{head}); {_NONFINITE_ADVICE}")
        start = 0 if starts is None else starts[i]
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if cache is None:
                continue
            found = _first_nonfinite(gather_tokens(cache, block_table[i:i + 1], [start], [n]))
            if found:
                count, row, head = found
                token = start + row
                read = f"tokens {start}:{n}" + (
                    f" (those after its PooledKeyCache's {start})" if start else "")
                return ValueError(
                    f"sequence {i}: {name} contains {count} NaN or Inf value(s) in its {read}, "
                    f"the first at token {token} (page "
                    f"{int(block_table[i, token // page_size])}, slot {token % page_size}, KV "
                    f"head {head}); {_NONFINITE_ADVICE}")
    return None


@contextlib.contextmanager
def paged_errors(q, k_cache, v_cache, block_table, ranges_q, lengths, starts=None):
    """Re-raise a NaN/Inf ``ValueError`` from the packed functions (which name rows of
    gathered tensors) as :func:`paged_nonfinite_error`'s, from the original."""
    try:
        yield
    except ValueError as error:
        if "NaN or Inf" not in str(error):
            raise
        better = paged_nonfinite_error(q, k_cache, v_cache, block_table, ranges_q, lengths,
                                       starts)
        if better is None:
            raise
        raise better from error


def gather_paged_kv(k_cache, v_cache, block_table, seq_lens):
    """Gather every sequence's pages into packed K and V.

    Parameters
    ----------
    k_cache : Tensor (num_pages, page_size, Hkv, D)
    v_cache : Tensor (num_pages, page_size, Hkv, Dv)
    block_table : Tensor (B, max_pages), int32
    seq_lens : Tensor (B,), int32

    Returns
    -------
    k : Tensor (total_k, Hkv, D)
    v : Tensor (total_k, Hkv, Dv)
    cu_seqlens_k : Tensor (B + 1,), int32, on k's device

    Examples
    --------
    >>> import torch
    >>> cache = torch.arange(4 * 2 * 1 * 2.0).reshape(4, 2, 1, 2)   # 4 pages of 2 tokens
    >>> table = torch.tensor([[3, 0], [1, -1]], dtype=torch.int32)
    >>> k, v, cu = gather_paged_kv(cache, cache, table, torch.tensor([3, 1]))
    >>> k[:, 0, 0].tolist(), cu.tolist()
    ([12.0, 14.0, 0.0, 4.0], [0, 3, 4])
    """
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(cache, torch.Tensor):
            raise TypeError(f"gather_paged_kv needs {name} as a (num_pages, page_size, H, D) "
                            f"tensor, got {type(cache).__name__}")
    q_probe = k_cache.new_empty(0, k_cache.shape[2], k_cache.shape[3])
    batch = block_table.shape[0] if isinstance(block_table, torch.Tensor) else 0
    cu_q = torch.zeros(batch + 1, dtype=torch.int32)
    _, lengths = validate_paged(q_probe, k_cache, v_cache, block_table, seq_lens, cu_q, 0,
                                causal=False)
    zeros = [0] * len(lengths)
    k = gather_tokens(k_cache, block_table, zeros, lengths)
    v = gather_tokens(v_cache, block_table, zeros, lengths)
    cu = torch.tensor([0] + lengths, device=k_cache.device).cumsum(0).to(torch.int32)
    return k, v, cu


def _key_ranges(ranges_q, lengths):
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return [(q0, q1, starts[i], starts[i + 1]) for i, (q0, q1) in enumerate(ranges_q)]


# --------------------------------------------------------------------------
# Chunked prefill: pooled key tiles kept between chunks.
# --------------------------------------------------------------------------

def _check_pooled_keys(pooled_keys, batch: int, cfg: PrismConfig) -> list:
    if not isinstance(pooled_keys, (list, tuple)) or len(pooled_keys) != batch:
        raise TypeError(
            f"pooled_keys must be a list of {batch} PooledKeyCache (or None) entries, one per "
            f"sequence, got {type(pooled_keys).__name__}"
            + (f" of length {len(pooled_keys)}" if isinstance(pooled_keys, (list, tuple)) else "")
        )
    for i, cache in enumerate(pooled_keys):
        if cache is not None and not isinstance(cache, PooledKeyCache):
            raise TypeError(f"pooled_keys[{i}] must be a PooledKeyCache or None, got "
                            f"{type(cache).__name__}")
    seen: dict = {}
    for i, cache in enumerate(pooled_keys):
        if cache is not None:
            if id(cache) in seen:
                raise ValueError(
                    f"pooled_keys[{seen[id(cache)]}] and pooled_keys[{i}] are the same "
                    "PooledKeyCache; each sequence keeps its own pooled tiles: give every "
                    "sequence its own PooledKeyCache(block_size) (or None)"
                )
            seen[id(cache)] = i
    if not estimator_spec(cfg.estimator).pooled_tiles and any(c is not None for c in pooled_keys):
        usable = [name for name in ESTIMATORS if estimator_spec(name).pooled_tiles]
        raise ValueError(
            f"pooled_keys work with the estimators that use Prism's pooled key tiles "
            f"({', '.join(usable)}); the {cfg.estimator!r} estimator reads raw keys only: "
            "pass pooled_keys=None"
        )
    return list(pooled_keys)


def _prepare_caches(pooled_keys, lengths: list[int], k_cache, cfg: PrismConfig) -> list:
    """Validated caches, one entry per sequence (None where none is given)."""
    if pooled_keys is None:
        return [None] * len(lengths)
    caches = _check_pooled_keys(pooled_keys, len(lengths), cfg)
    for i, cache in enumerate(caches):
        if cache is not None:
            cache.check(i, lengths[i], k_cache, cfg)
    return caches


def _select_all(impl, q, k, ranges, skips, lengths, caches, cfg, causal) -> list:
    """One mask per sequence: from its :class:`PooledKeyCache` where given, else ``impl``.

    ``ranges[i] = (q0, q1, k0, k1)`` are rows of the packed ``q`` and ``k``;
    rows ``k0 + skips[i]`` to ``k1`` hold sequence ``i``'s tokens from
    ``caches[i].num_tokens`` on. Every input is checked before any cache grows.
    An ``impl`` with a ``select_cached`` hook (:mod:`prism.optimized`: the
    selection kernel fed from the caches) runs that instead, with these arguments.
    """
    hook = getattr(impl, "select_cached", None)
    if hook is not None:
        return hook(q, k, ranges, skips, lengths, caches, cfg, causal)
    checked = checked_skips(cfg, skips)
    for i, ((q0, q1, k0, k1), cache) in enumerate(zip(ranges, caches, strict=True)):
        if cache is not None:
            check_cached_finite(q, k, i, (q0, q1, k0 + checked[i], k1))
    raw = estimator_spec(cfg.estimator).raw_keys
    masks = []
    for i, ((q0, q1, k0, k1), cache) in enumerate(zip(ranges, caches, strict=True)):
        if cache is None:
            masks.extend(run_select(impl, q, k, [(q0, q1, k0, k1)], cfg, causal, [i]))
            continue
        k_pooled = cache.pooled(as_heads(k, k0 + skips[i], k1), lengths[i])
        masks.append(select_from_pooled(as_heads(q, q0, q1), k_pooled, lengths[i], cfg, causal,
                                        k=as_heads(k, k0, k1) if raw else None))
    return masks


def checked_skips(cfg: PrismConfig, skips: list[int]) -> list[int]:
    """Per sequence, the key rows before its NaN/Inf check starts: ``skips`` (the keys its
    cache pooled earlier) for Prism, none for estimators that read every raw key."""
    return [0] * len(skips) if estimator_spec(cfg.estimator).raw_keys else list(skips)


def key_starts(cfg: PrismConfig, caches: list) -> tuple[list[int], list[int]]:
    """``(starts, skips)`` for gathering a paged batch's keys with pooled caches: the
    token each sequence's gathered keys start at, and the gathered rows its cache covers.
    Prism reads only the keys after each cache; estimators that read raw keys read all."""
    ends = [0 if c is None else c.num_tokens for c in caches]
    if estimator_spec(cfg.estimator).raw_keys:
        return [0] * len(caches), ends
    return ends, [0] * len(caches)


def check_cached_finite(q, k, index: int, rows) -> None:
    """The NaN/Inf check of a cached sequence: its queries, and its keys after the cache
    (``rows = (q0, q1, k0, k1)``); the error names the sequence."""
    q0, q1, k0, k1 = rows
    try:
        check_finite("q", as_heads(q, q0, q1))
        check_finite("k_cache", as_heads(k, k0, k1))
    except ValueError as error:
        raise _name_sequence(error, index, 1, "pooled_keys given") from error


def run_paged_select(impl, q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                     config, causal, pooled_keys, overrides) -> list:
    """Selection over a paged cache; reads only the keys the caches do not cover."""
    cfg = resolve_config(config, **overrides)
    ranges_q, lengths = validate_paged(q, k_cache, None, block_table, seq_lens, cu_seqlens_q,
                                       max_seqlen_q, causal=causal)
    caches = _prepare_caches(pooled_keys, lengths, k_cache, cfg)
    with unchanged_on_error(caches), paged_errors(q, k_cache, None, block_table, ranges_q,
                                                  lengths, key_starts(cfg, caches)[0]):
        paged = getattr(impl, "select_paged", None)
        if paged is not None:
            # prism.optimized: keys read through the block table (NotImplemented: gather).
            masks = paged(q, k_cache, block_table, ranges_q, lengths, caches, cfg, causal)
            if masks is not NotImplemented:
                return masks
        starts, skips = key_starts(cfg, caches)
        k = gather_tokens(k_cache, block_table, starts, lengths)
        ranges = _key_ranges(ranges_q, [n - s for n, s in zip(lengths, starts, strict=True)])
        return _select_all(impl, q, k, ranges, skips, lengths, caches, cfg, causal)


def run_paged_prism(impl, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                    max_seqlen_q, config, *, causal, scale, return_lse, return_mask,
                    pooled_keys, overrides):
    """Selection and attention over a paged cache (K and V gathered once)."""
    cfg = resolve_config(config, **overrides)
    ranges_q, lengths = validate_paged(q, k_cache, v_cache, block_table, seq_lens,
                                       cu_seqlens_q, max_seqlen_q, causal=causal)
    validate_scale(scale)
    caches = _prepare_caches(pooled_keys, lengths, k_cache, cfg)
    with unchanged_on_error(caches), paged_errors(q, k_cache, v_cache, block_table, ranges_q,
                                                  lengths):
        return _paged_prism(impl, q, k_cache, v_cache, block_table, ranges_q, lengths, caches,
                            cfg, causal=causal, scale=scale, return_lse=return_lse,
                            return_mask=return_mask, cached=pooled_keys is not None)


def _paged_prism(impl, q, k_cache, v_cache, block_table, ranges_q, lengths, caches, cfg, *,
                 causal, scale, return_lse, return_mask, cached):
    """:func:`run_paged_prism` after validation."""
    paged = getattr(impl, "run_paged_packed", None)
    if paged is not None:
        # prism.optimized: attention reads the pages in place (NotImplemented: gather).
        result = paged(q, k_cache, v_cache, block_table, ranges_q, lengths, caches, cfg,
                       causal=causal, scale=scale, return_lse=return_lse,
                       return_mask=return_mask)
        if result is not NotImplemented:
            return result
    zeros = [0] * len(lengths)
    k = gather_tokens(k_cache, block_table, zeros, lengths)
    v = gather_tokens(v_cache, block_table, zeros, lengths)
    ranges = _key_ranges(ranges_q, lengths)
    if not cached:
        return run_prism(impl, q, k, v, ranges, cfg, causal=causal, scale=scale,
                         return_lse=return_lse, return_mask=return_mask)
    skips = [0 if c is None else c.num_tokens for c in caches]
    masks = _select_all(impl, q, k, ranges, skips, lengths, caches, cfg, causal)
    result = run_attention(impl, q, k, v, ranges, masks, block_size=cfg.block_size,
                           causal=causal, scale=scale, return_lse=return_lse)
    if not return_mask:
        return result
    return (*result, masks) if return_lse else (result, masks)


# --------------------------------------------------------------------------
# Public functions (the reference implementation).
# --------------------------------------------------------------------------

def select_blocks_paged(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q: int,
                        config: PrismConfig | None = None, *, causal: bool = True,
                        pooled_keys=None, **overrides) -> list:
    """Prism's tile selection for packed queries over a paged key cache.

    Parameters
    ----------
    q : Tensor (total_q, Hq, D)
        Packed queries, after RoPE at their absolute positions.
    k_cache : Tensor (num_pages, page_size, Hkv, D)
    block_table : Tensor (B, max_pages), int32, on k_cache's device
    seq_lens : Tensor (B,), int32
        Tokens in each sequence's cache, the queries' own chunk included.
    cu_seqlens_q : Tensor (B + 1,), int32
    max_seqlen_q : int
    config : PrismConfig, optional
    causal : bool
    pooled_keys : list of B :class:`PooledKeyCache` or None, optional
        Per sequence, the pooled tiles kept from earlier chunks; given caches
        are read and extended in place (chunked prefill). Estimators with
        Prism's pooled tiles only: ``"prism"``, ``"prism_vertical_slash"``,
        ``"cascade"`` (the accurate preset).
    **overrides
        Any :class:`PrismConfig` field.

    Returns
    -------
    list of B bool tensors (1, Hq, n_query_tiles_i, n_key_tiles_i)
    """
    return run_paged_select(_select, q, k_cache, block_table, seq_lens, cu_seqlens_q,
                            max_seqlen_q, config, causal, pooled_keys, overrides)


def prism_attention_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                          max_seqlen_q: int, config: PrismConfig | None = None, *,
                          causal: bool = True, scale: float | None = None,
                          return_lse: bool = False, return_mask: bool = False,
                          pooled_keys=None, **overrides):
    """Prism end to end for packed queries over a paged KV cache.

    Parameters
    ----------
    q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, config, causal, pooled_keys
        As in :func:`select_blocks_paged`.
    v_cache : Tensor (num_pages, page_size, Hkv, Dv)
    scale, return_lse, return_mask
        As in :func:`prism.reference.prism_attention_varlen`.

    Returns
    -------
    o (total_q, Hq, Dv), or a tuple with lse (Hq, total_q) and/or the list of masks.
    """
    return run_paged_prism(_attention, q, k_cache, v_cache, block_table, seq_lens,
                           cu_seqlens_q, max_seqlen_q, config, causal=causal, scale=scale,
                           return_lse=return_lse, return_mask=return_mask,
                           pooled_keys=pooled_keys, overrides=overrides)
