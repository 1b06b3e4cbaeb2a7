"""Packed variable-length batches: Prism on sequences of different lengths (docs/serving.rst).

Serving engines pack the tokens of every sequence of a batch into one tensor
and mark where each sequence starts with cumulative offsets, as flash-attn's
``*_varlen_func`` do:

* ``q``: (total_q, Hq, D), ``k``: (total_k, Hkv, D), ``v``: (total_k, Hkv, Dv);
* ``cu_seqlens_q``, ``cu_seqlens_k``: int32 or int64, shape (B + 1,), starting
  at 0, non-decreasing, ending at ``total_q`` / ``total_k``. Sequence ``i``
  owns query rows ``cu_seqlens_q[i] : cu_seqlens_q[i + 1]`` and key rows
  ``cu_seqlens_k[i] : cu_seqlens_k[i + 1]``.

Each sequence is an independent Prism problem: its own tile grid, selection
and calibration statistics, and, when causal, its own bottom-right alignment
(its ``Nq_i`` queries are the last ``Nq_i`` of its ``Nk_i`` keys, so a sequence
with a cached prefix has ``Nk_i > Nq_i``). Sequence ``i`` of a varlen call
gives exactly what the dense function gives on that sequence alone, as a
(1, H, N_i, D) tensor; this module runs that loop on views of the packed
tensors (``x[start:end].permute(1, 0, 2)[None]``, no copy). Adjacent
sequences of the same ``(Nq_i, Nk_i)`` run as one dense batch of that many
entries (:func:`runs_of_equal_shape`): one call instead of one per sequence,
with the same results.

Outputs:

* ``o``: (total_q, Hq, Dv), q's dtype, packed like ``q``;
* ``lse``: (Hq, total_q), float32, natural log (flash-attn's varlen layout);
* the tile masks: a list of B bool tensors, mask ``i`` of shape
  (1, Hq, n_query_tiles_i, n_key_tiles_i), exactly what ``select_blocks``
  returns for sequence ``i`` alone (row ``r`` is the ``r``-th tile holding a
  query of that sequence). Sequences have different tile counts, so there is
  no common shape to stack them in.
"""

from __future__ import annotations

import torch

from . import attention as _attention
from . import select as _select
from .config import PrismConfig, resolve_config
from .tile_mask import TileMask
from .validation import FLOAT_DTYPES, check_same_dtype_device, validate_qk, validate_scale

INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------
# Validation of the packed layout (contract §8 extended to packed batches).
# --------------------------------------------------------------------------

def check_packed(name: str, t, layout: str = "(total_tokens, H, D)") -> None:
    """``t`` is a float tensor of rank 3 in the packed layout."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(
            f"{name} must have 3 dimensions {layout} (the tokens of every sequence packed "
            f"along dim 0), got shape {tuple(t.shape)}; a padded (B, N, H, D) batch packs as "
            f"{name}.flatten(0, 1) with cu_seqlens = [0, N, 2N, ...]"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float32, float16 or bfloat16, got {t.dtype}; "
            f"convert with {name}.float() or {name}.to(torch.bfloat16)"
        )


def check_lengths_vector(name: str, t, what: str) -> list[int]:
    """A 1-D int32/int64 tensor (any device), returned as a Python list."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name} must be a 1-D int32 torch.Tensor of {what}, got {type(t).__name__}; "
            f"build it with torch.tensor(values, dtype=torch.int32)"
        )
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{name} must have dtype int32 or int64, got {t.dtype}; convert with "
            f"{name}.to(torch.int32)"
        )
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D ({what}), got shape {tuple(t.shape)}")
    return [int(x) for x in t.tolist()]


def check_cu_seqlens(name: str, cu, total: int, total_name: str) -> list[int]:
    """Validate cumulative offsets and return them as a list of B + 1 ints.

    They must start at 0, never decrease and end at ``total`` (the number of
    rows of the packed tensor ``total_name``).
    """
    offsets = check_lengths_vector(name, cu, "cumulative sequence offsets, shape (B + 1,)")
    fix = ("build it from the lengths as torch.nn.functional.pad(lengths.cumsum(0), (1, 0))"
           ".to(torch.int32)")
    if not offsets:
        raise ValueError(f"{name} must hold B + 1 >= 1 offsets, got an empty tensor; {fix}")
    if offsets[0] != 0:
        raise ValueError(f"{name}[0] must be 0 (the first sequence starts at row 0), got "
                         f"{offsets[0]}; {fix}")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            raise ValueError(
                f"{name} must be non-decreasing (sorted cumulative offsets), but {name}[{i}] = "
                f"{offsets[i]} < {name}[{i - 1}] = {offsets[i - 1]}; {fix}"
            )
    if offsets[-1] != total:
        raise ValueError(
            f"{name}[-1] must equal the number of packed tokens of {total_name} ({total}), got "
            f"{offsets[-1]}; pass {total_name}[:{offsets[-1]}] if the rest is padding, or fix "
            f"the offsets ({fix})"
        )
    return offsets


def check_max_seqlen(name: str, value, lengths: list[int], cu_name: str) -> None:
    """``value`` is an int at least as large as every sequence length."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    longest = max(lengths, default=0)
    if value < longest:
        seq = lengths.index(longest)
        raise ValueError(
            f"{name} ({value}) is smaller than sequence {seq}'s length {longest} given by "
            f"{cu_name}; pass {name} >= the longest sequence, e.g. int(({cu_name}[1:] - "
            f"{cu_name}[:-1]).max())"
        )


def validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                    causal: bool):
    """Validate a packed call and return the per-sequence row ranges.

    Returns
    -------
    list of (q_start, q_end, k_start, k_end), one per sequence.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    check_packed("q", q)
    check_packed("k", k, "(total_k, Hkv, D)")
    if v is not None:
        check_packed("v", v, "(total_k, Hkv, Dv)")
        check_same_dtype_device(q=q, v=v)
        if v.shape[0] != k.shape[0] or v.shape[1] != k.shape[1]:
            raise ValueError(f"v must match k in tokens and heads: k has {tuple(k.shape)}, "
                             f"v has {tuple(v.shape)}")
        if v.shape[2] == 0:
            raise ValueError("v must have a head_dim of at least 1, got 0")
    # Heads, head dims and dtypes with the dense checks, on empty views.
    validate_qk(as_heads(q, 0, 0), as_heads(k, 0, 0), causal=False, check_values=False)
    cq = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q")
    ck = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k")
    if len(cq) != len(ck):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{len(cq) - 1} and {len(ck) - 1} (lengths {len(cq)} and {len(ck)}); pass one "
            "query and one key range per sequence (an empty range is allowed)"
        )
    lengths_q = [cq[i + 1] - cq[i] for i in range(len(cq) - 1)]
    lengths_k = [ck[i + 1] - ck[i] for i in range(len(ck) - 1)]
    check_max_seqlen("max_seqlen_q", max_seqlen_q, lengths_q, "cu_seqlens_q")
    check_max_seqlen("max_seqlen_k", max_seqlen_k, lengths_k, "cu_seqlens_k")
    if causal:
        for i, (nq, nk) in enumerate(zip(lengths_q, lengths_k, strict=True)):
            if nq > nk:
                raise ValueError(
                    f"causal attention needs Nq <= Nk in every sequence (its queries are the "
                    f"last Nq of its Nk keys), but sequence {i} has {nq} queries "
                    f"(cu_seqlens_q) and {nk} keys (cu_seqlens_k); pack each sequence's whole "
                    "KV including its cached prefix, or use causal=False"
                )
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def as_heads(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``start:end`` of a packed (T, H, D) tensor as a (1, H, n, D) view (no copy)."""
    return x[start:end].permute(1, 0, 2).unsqueeze(0)


def check_masks(block_masks, num_seqs: int) -> list:
    if isinstance(block_masks, torch.Tensor) or not isinstance(block_masks, (list, tuple)):
        raise TypeError(
            f"block_masks must be a list of {num_seqs} bool tensors (one (1, Hq, nq_i, nk_i) "
            f"tile mask per sequence, as select_blocks_varlen returns), got "
            f"{type(block_masks).__name__}"
        )
    if len(block_masks) != num_seqs:
        raise ValueError(
            f"block_masks must hold one mask per sequence ({num_seqs}, from cu_seqlens_q), got "
            f"{len(block_masks)}; build them with select_blocks_varlen on the same offsets"
        )
    return list(block_masks)


# --------------------------------------------------------------------------
# The per-sequence loop, shared by prism.reference and prism.optimized.
# --------------------------------------------------------------------------

def _name_sequence(error: Exception, first: int, count: int, what: str) -> Exception:
    """The same exception type with the sequence index (or range) in front of its message."""
    who = f"sequence {first}" if count == 1 else f"sequences {first}-{first + count - 1}"
    return type(error)(f"{who} ({what}): {error}")


def _blame(error: Exception, retry, first: int, count: int, what: str, describe,
           number=None) -> Exception:
    """The exception to raise for ``error`` from a run of ``count`` sequences from ``first``.

    A run of several sequences is one batched call, whose error cannot say which
    sequence caused it: each is then retried alone (``retry(i)``, on this error
    path only) and the first that fails is named, with ``describe(i)``. ``number``
    maps a sequence's place in ``ranges`` to the index to report.
    """
    number = number or (lambda i: i)
    if count > 1:
        for i in range(first, first + count):
            try:
                retry(i)
            except (ValueError, TypeError) as single:
                return _name_sequence(single, number(i), 1, describe(i))
    return _name_sequence(error, number(first), count, what)


def runs_of_equal_shape(ranges) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of adjacent sequences with the same ``(Nq, Nk)``.

    Such a run is one dense batch: its rows are contiguous in the packed
    tensors, so ``x[start : start + count * n]`` viewed as ``(count, n, H, D)``
    is a (count, H, n, D) batch without a copy, and one call of the dense
    function computes every sequence of the run (each batch entry is
    independent, so the results are those of the per-sequence loop).
    """
    runs: list[list[int]] = []
    for i, (q0, q1, k0, k1) in enumerate(ranges):
        if runs:
            p0, p1, r0, r1 = ranges[i - 1]
            if (q1 - q0, k1 - k0) == (p1 - p0, r1 - r0) and (q0, k0) == (p1, r1):
                runs[-1][1] += 1
                continue
        runs.append([i, 1])
    return [(first, count) for first, count in runs]


def as_batch(x: torch.Tensor, start: int, count: int, n: int) -> torch.Tensor:
    """``count`` sequences of ``n`` rows from ``start`` as a (count, H, n, D) view (no copy)."""
    return x[start:start + count * n].unflatten(0, (count, n)).permute(0, 2, 1, 3)


def _run_views(q, k, v, ranges, first: int, count: int):
    q0, q1, k0, k1 = ranges[first]
    views = (as_batch(q, q0, count, q1 - q0), as_batch(k, k0, count, k1 - k0))
    if v is not None:
        views = (*views, as_batch(v, k0, count, k1 - k0))
    last = ranges[first + count - 1]
    return views, f"q rows {q0}:{last[1]}, k rows {k0}:{last[3]}"


def _split(mask, count: int) -> list:
    """A run's (count, H, nq, nk) mask as ``count`` masks (1, H, nq, nk).

    A :class:`TileMask` carrying compact indices splits into TileMasks carrying
    their slices of them (so attention on the list need not rebuild them).
    """
    if count == 1:
        return [mask]
    carried = None
    if isinstance(mask, TileMask):
        carried = mask.carried_indices(block_size=mask.block_size, causal=mask.causal,
                                       num_queries=mask.num_queries, num_keys=mask.num_keys)
    if carried is None or carried[0].shape[0] != count:
        return [mask[g:g + 1] for g in range(count)]
    bits = mask.as_tensor()
    return [TileMask(bits[g:g + 1], block_size=mask.block_size, causal=mask.causal,
                     num_queries=mask.num_queries, num_keys=mask.num_keys,
                     kv_num_blocks=carried[0][g:g + 1], kv_indices=carried[1][g:g + 1])
            for g in range(count)]


def run_select(impl, q, k, ranges, cfg: PrismConfig, causal: bool, indices=None) -> list:
    """``impl.select_blocks`` on views of each run of equal-shape sequences; a list of masks.

    ``indices`` numbers the sequences in error messages (default 0, 1, ...).
    """
    masks = []
    for first, count in runs_of_equal_shape(ranges):
        (q_run, k_run), what = _run_views(q, k, None, ranges, first, count)
        try:
            mask = impl.select_blocks(q_run, k_run, cfg, causal=causal)
        except (ValueError, TypeError) as error:
            def retry(i):
                impl.select_blocks(*_run_views(q, k, None, ranges, i, 1)[0], cfg,
                                   causal=causal)
            raise _blame(error, retry, first, count, what,
                         lambda i: _run_views(q, k, None, ranges, i, 1)[1],
                         None if indices is None else indices.__getitem__) from error
        masks.extend(_split(mask, count))
    return masks


def _packed_outputs(q, v, return_lse: bool):
    total_q, hq = q.shape[0], q.shape[1]
    out = torch.empty(total_q, hq, v.shape[2], dtype=q.dtype, device=q.device)
    lse = (torch.empty(hq, total_q, dtype=torch.float32, device=q.device)
           if return_lse else None)
    return out, lse


def _store(out, lse, result, start: int, count: int, n: int, return_lse: bool) -> None:
    """Write a run's (count, Hq, n, Dv) output and (count, Hq, n) lse into the packed ones."""
    o_run = result[0] if return_lse else result
    as_batch(out, start, count, n).copy_(o_run)
    if return_lse:
        lse[:, start:start + count * n].unflatten(1, (count, n)).copy_(
            result[1].transpose(0, 1))


def _stackable(masks) -> bool:
    """Masks of one run that can be concatenated along the batch dim."""
    return all(isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[0] == 1
               and m.shape == masks[0].shape and m.dtype == torch.bool
               and m.device == masks[0].device for m in masks)


def run_attention(impl, q, k, v, ranges, block_masks, *, block_size: int, causal: bool, scale,
                  return_lse: bool):
    """``impl.block_sparse_attention`` on views of each run of equal-shape sequences, packed.

    An ``impl`` with a ``run_attention_packed`` hook (:mod:`prism.optimized`'s
    single launch over the whole batch) runs that instead, with these arguments.
    """
    packed = getattr(impl, "run_attention_packed", None)
    if packed is not None:
        return packed(q, k, v, ranges, block_masks, block_size=block_size, causal=causal,
                      scale=scale, return_lse=return_lse)
    out, lse = _packed_outputs(q, v, return_lse)
    runs = []
    for first, count in runs_of_equal_shape(ranges):
        group = block_masks[first:first + count]
        if count == 1 or _stackable(group):
            runs.append((first, count))
        else:  # masks of different shapes: one call per sequence names the bad one
            runs.extend((i, 1) for i in range(first, first + count))
    for first, count in runs:
        (q_run, k_run, v_run), _ = _run_views(q, k, v, ranges, first, count)
        mask = block_masks[first] if count == 1 else torch.cat(
            [m.as_subclass(torch.Tensor) for m in block_masks[first:first + count]])
        try:
            result = impl.block_sparse_attention(q_run, k_run, v_run, mask,
                                                 block_size=block_size, causal=causal,
                                                 scale=scale, return_lse=return_lse)
        except (ValueError, TypeError) as error:
            def retry(i):
                impl.block_sparse_attention(*_run_views(q, k, v, ranges, i, 1)[0],
                                            block_masks[i], block_size=block_size,
                                            causal=causal, scale=scale,
                                            return_lse=return_lse)
            what = f"block_masks[{first}]" if count == 1 else (
                f"block_masks[{first}:{first + count}]")
            raise _blame(error, retry, first, count, what,
                         lambda i: f"block_masks[{i}]") from error
        q0, q1 = ranges[first][:2]
        _store(out, lse, result, q0, count, q1 - q0, return_lse)
    return (out, lse) if return_lse else out


def run_prism(impl, q, k, v, ranges, cfg: PrismConfig, *, causal: bool, scale,
              return_lse: bool, return_mask: bool):
    """``impl.prism_attention`` on views of each run of equal-shape sequences, packed.

    An ``impl`` with a ``run_prism_packed`` hook (:mod:`prism.optimized`: selection
    per run, one attention launch) runs that instead, with these arguments.
    """
    packed = getattr(impl, "run_prism_packed", None)
    if packed is not None:
        return packed(q, k, v, ranges, cfg, causal=causal, scale=scale, return_lse=return_lse,
                      return_mask=return_mask)
    out, lse = _packed_outputs(q, v, return_lse)
    masks = []
    for first, count in runs_of_equal_shape(ranges):
        (q_run, k_run, v_run), what = _run_views(q, k, v, ranges, first, count)
        try:
            result = impl.prism_attention(q_run, k_run, v_run, cfg, causal=causal, scale=scale,
                                          return_lse=return_lse, return_mask=True)
        except (ValueError, TypeError) as error:
            def retry(i):
                impl.prism_attention(*_run_views(q, k, v, ranges, i, 1)[0], cfg,
                                     causal=causal, scale=scale)
            raise _blame(error, retry, first, count, what,
                         lambda i: _run_views(q, k, v, ranges, i, 1)[1]) from error
        masks.extend(_split(result[-1], count))
        q0, q1 = ranges[first][:2]
        _store(out, lse, result[:-1] if return_lse else result[0], q0, count, q1 - q0,
               return_lse)
    return _assemble(out, lse, masks, return_lse, return_mask)


def _assemble(out, lse, masks, return_lse: bool, return_mask: bool):
    result = (out, lse) if return_lse else (out,)
    if return_mask:
        result = (*result, masks)
    return result if len(result) > 1 else result[0]


# --------------------------------------------------------------------------
# Public functions (the reference implementation).
# --------------------------------------------------------------------------

def select_blocks_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                         max_seqlen_k: int, config: PrismConfig | None = None, *,
                         causal: bool = True, **overrides) -> list:
    """Prism's tile selection for every sequence of a packed batch.

    Parameters
    ----------
    q : Tensor (total_q, Hq, D)
    k : Tensor (total_k, Hkv, D)
        Packed along dim 0, after RoPE (each sequence's positions from 0).
    cu_seqlens_q, cu_seqlens_k : Tensor (B + 1,), int32 or int64
        Cumulative offsets of the sequences in ``q`` and ``k`` (any device;
        read on the host once).
    max_seqlen_q, max_seqlen_k : int
        At least the longest query / key sequence (as flash-attn takes them).
    config : PrismConfig, optional
    causal : bool
        Per sequence, queries are the last ``Nq_i`` of its ``Nk_i`` positions.
    **overrides
        Any :class:`PrismConfig` field.

    Returns
    -------
    list of B bool tensors
        Mask ``i`` has shape (1, Hq, n_query_tiles_i, n_key_tiles_i) and equals
        ``select_blocks`` on sequence ``i`` alone.

    Examples
    --------
    >>> import torch
    >>> from prism.reference import select_blocks_varlen
    >>> lengths = torch.tensor([100, 0, 300], dtype=torch.int32)
    >>> cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    >>> q, k = torch.randn(400, 4, 32), torch.randn(400, 2, 32)
    >>> masks = select_blocks_varlen(q, k, cu, cu, 300, 300, block_size=64)
    >>> [tuple(m.shape) for m in masks]
    [(1, 4, 2, 2), (1, 4, 0, 0), (1, 4, 5, 5)]
    """
    cfg = resolve_config(config, **overrides)
    ranges = validate_varlen(q, k, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, causal=causal)
    return run_select(_select, q, k, ranges, cfg, causal)


def block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                                  max_seqlen_k: int, block_masks, *, block_size: int = 128,
                                  causal: bool = True, scale: float | None = None,
                                  return_lse: bool = False):
    """Block-sparse attention of every sequence of a packed batch on its own tile mask.

    Parameters
    ----------
    q : Tensor (total_q, Hq, D)
    k : Tensor (total_k, Hkv, D)
    v : Tensor (total_k, Hkv, Dv)
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        As in :func:`select_blocks_varlen`.
    block_masks : list of B bool tensors
        Mask ``i`` is (1 or 1, Hq or 1, n_query_tiles_i, n_key_tiles_i), as
        :func:`select_blocks_varlen` returns.
    block_size, causal, scale, return_lse
        As in :func:`prism.reference.block_sparse_attention`.

    Returns
    -------
    o : Tensor (total_q, Hq, Dv), q's dtype
    lse : Tensor (Hq, total_q), float32, only if ``return_lse``
        Natural-log log-sum-exp; ``-inf`` (and ``o = 0``) for a query with no key.
    """
    ranges = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal=causal)
    validate_scale(scale)
    masks = check_masks(block_masks, len(ranges))
    return run_attention(_attention, q, k, v, ranges, masks, block_size=block_size, causal=causal,
                         scale=scale, return_lse=return_lse)


def prism_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                           max_seqlen_k: int, config: PrismConfig | None = None, *,
                           causal: bool = True, scale: float | None = None,
                           return_lse: bool = False, return_mask: bool = False, **overrides):
    """Prism end to end on a packed variable-length batch.

    Each sequence gets its own selection and its own bottom-right causal
    alignment; the result equals a loop of :func:`prism.reference.prism_attention`
    over the sequences.

    Parameters
    ----------
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        As in :func:`block_sparse_attention_varlen`.
    config : PrismConfig, optional
    causal, scale, return_lse
        As in :func:`block_sparse_attention_varlen`.
    return_mask : bool
        Also return the list of per-sequence tile masks.
    **overrides
        Any :class:`PrismConfig` field.

    Returns
    -------
    o, or a tuple ``(o, lse)``, ``(o, masks)`` or ``(o, lse, masks)``.

    Examples
    --------
    >>> import torch
    >>> from prism.reference import prism_attention_varlen
    >>> cu_q = torch.tensor([0, 64, 65], dtype=torch.int32)    # 64 queries, then 1
    >>> cu_k = torch.tensor([0, 64, 265], dtype=torch.int32)   # the second has a prefix
    >>> q = torch.randn(65, 4, 32)
    >>> k, v = torch.randn(265, 2, 32), torch.randn(265, 2, 32)
    >>> o, lse = prism_attention_varlen(q, k, v, cu_q, cu_k, 64, 201, block_size=32,
    ...                                 return_lse=True)
    >>> tuple(o.shape), tuple(lse.shape)
    ((65, 4, 32), (4, 65))
    """
    cfg = resolve_config(config, **overrides)
    ranges = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal=causal)
    validate_scale(scale)
    return run_prism(_attention, q, k, v, ranges, cfg, causal=causal, scale=scale,
                     return_lse=return_lse, return_mask=return_mask)
