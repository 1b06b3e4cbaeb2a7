"""Packed variable-length batches and paged KV caches on the Triton kernels (docs/serving.rst).

Same signatures and results as :mod:`prism.reference.varlen` and
:mod:`prism.reference.paged`; the validation, the page gather and the
per-sequence selection loop are the reference's code.

Attention is **one launch** of the block-sparse kernel over every query tile
of every sequence (:func:`packed_attention_forward`, the kernel's ``VARLEN``
branch):

* selection runs per run of adjacent equal-shape sequences, on (count, H, N,
  D) strided views of the packed tensors (no copy), and leaves its compact
  indices per run; the runs' indices are concatenated (one copy of a few MB);
* a tile table, one row per query tile of every sequence (its sequence's
  row offsets, lengths and bottom-right layout, its absolute tile, where its
  indices sit), sequences heaviest first, is built on the host from the
  offsets, copied to the device without a wait, and cached for the next
  call with the same batch (every layer of a model sees the same offsets);
* the kernel reads q, k and v in place and writes the packed output and
  (Hq, total_q) log-sum-exp directly.

NaN/Inf flags of the selection launches are read once at the end (one host
wait per call, as the dense API). With a paged cache the same launch can read
K and V through the block table (``block_table`` of
:func:`packed_attention_forward`); :mod:`prism.optimized.paged_kv` says when
it does and when the pages are gathered instead. Tiles
that are not multiples of 16 run the reference's per-run loop on the dense
functions.

Chunked prefill with :class:`~prism.reference.PooledKeyCache` runs the
pooling and selection kernels on the cache's stored tile means
(:mod:`prism.optimized.chunked`) and attention as above.
"""

from __future__ import annotations

import functools
import importlib
import math
import types
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from prism.reference.config import PrismConfig, resolve_config
from prism.reference.paged import run_paged_prism, run_paged_select
from prism.reference.tile_mask import TileMask
from prism.reference.tiles import tile_layout
from prism.reference.validation import (
    check_finite,
    validate_block_mask,
    validate_scale,
)
from prism.reference.varlen import (
    _name_sequence,
    _run_views,
    as_heads,
    check_masks,
    run_attention,
    run_prism,
    run_select,
    runs_of_equal_shape,
    validate_varlen,
)

from . import gradients, varlen_ops
from ._runtime import check_device, kernels_interpreted, next_power_of_2
from .attention import (
    LOG2_E,
    _launch_config,
    _scratch_allocator,
    _sparse_attention_kernel,
    launch_constants,
    positive_scale,
    supported_block_size,
    tma_compatible,
)
from .paged_launch import bulk_rows, paged_config

#: Per sequence (host table :attr:`PackedLayout.seqs`): first q row, first k
#: row, Nq, Nk, query_start, first_query_tile, then where its compact indices
#: sit: kv_num_blocks base and head stride, kv_indices base, head stride and
#: row stride (elements of the flat index buffers).
SEQ_FIELDS = 11
#: Per query tile (the kernel's ``TILES``, :attr:`PackedLayout.table`): first q
#: row, first k row, Nq, Nk, query_start of its sequence, its absolute tile,
#: where its count sits and the head stride of counts, where its row of
#: indices sits and the head stride of indices. Must match the kernel.
TILE_FIELDS = 10

_INTERPRETED = kernels_interpreted(_sparse_attention_kernel)


def _module():
    """:mod:`prism.optimized` (imported late: this module is part of that package)."""
    return importlib.import_module("prism.optimized")


# --------------------------------------------------------------------------
# The launch: per-sequence table, tile table, one kernel call.
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedLayout:
    """The tile table of one packed launch (see :func:`packed_layout`).

    ``table`` is what the kernel reads; ``seqs`` and ``tiles`` say on the host
    what it was built from (tests and benchmarks read them).
    """

    table: torch.Tensor        # int32 (num_tiles, TILE_FIELDS), on the launch's device
    seqs: torch.Tensor         # int64 (B, SEQ_FIELDS), host
    tiles: torch.Tensor        # int64 (num_tiles, 2), host: sequence, its query-tile row
    num_tiles: int
    query_start_gcd: int       # gcd of every sequence's query_start (0 if all are 0)


_LAYOUTS: OrderedDict = OrderedDict()
_LAYOUT_CACHE_SIZE = 64


def packed_layout(ranges, placements, block_size: int, causal: bool,
                  device: torch.device) -> PackedLayout:
    """The kernel's tile table for a packed batch, cached per (batch, index placement).

    Parameters
    ----------
    ranges : list of (q0, q1, k0, k1)
        Packed rows of each sequence.
    placements : list of (num_base, num_stride_h, idx_base, idx_stride_h, idx_stride_r)
        Where each sequence's compact indices sit in the flat buffers.
    block_size, causal
        As in the attention call; each sequence gets ``tile_layout(Nq_i, Nk_i)``.
    device
        Where the tables go (copied from pinned memory without a host wait).

    The tile table lists every (sequence, query-tile row); the kernel runs it
    from the end. Read from the end, it takes the sequences by descending
    work of their heaviest tile (causal: key tiles up to the diagonal;
    otherwise the sequence's key tiles), ties in sequence order, and each
    sequence's rows from the last (heaviest) one: heavy tiles start first,
    and the programs running together (one KV head at a time, see
    ``AttentionConfig.kv_major``) read one sequence's K and V, as a dense
    batch's programs read one batch entry's (ordering every tile of every
    sequence by work alone timed the same within noise on the H200:
    docs/serving.rst).
    """
    key = (tuple(ranges), tuple(placements), block_size, causal, str(device))
    cached = _LAYOUTS.get(key)
    if cached is not None:
        _LAYOUTS.move_to_end(key)
        return cached
    batch = len(ranges)
    seqs = np.zeros((batch, SEQ_FIELDS), dtype=np.int64)
    counts = np.zeros(batch, dtype=np.int64)
    gcd = 0
    for i, ((q0, q1, k0, k1), place) in enumerate(zip(ranges, placements, strict=True)):
        layout = tile_layout(q1 - q0, k1 - k0, block_size, causal)
        seqs[i, :6] = (q0, k0, q1 - q0, k1 - k0, layout.query_start, layout.first_query_tile)
        seqs[i, 6:] = place
        counts[i] = layout.num_query_tiles
        if layout.num_query_tiles:
            gcd = math.gcd(gcd, layout.query_start)
    if seqs.size and (seqs.max() > 2**31 - 1 or seqs.min() < 0):
        raise ValueError("packed attention needs every row offset and index base below 2^31; "
                         "split the batch into smaller calls")
    seq_of_tile = np.repeat(np.arange(batch, dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    row = np.arange(seq_of_tile.size, dtype=np.int64) - starts[seq_of_tile]
    if causal:
        heaviest = seqs[:, 5] + counts
    else:
        heaviest = -(-seqs[:, 3] // block_size)
    rank = np.empty(batch, dtype=np.int64)
    rank[np.argsort(-heaviest, kind="stable")] = np.arange(batch)
    order = np.lexsort((-row, rank[seq_of_tile]))[::-1]  # run order, reversed
    tiles = np.stack([seq_of_tile[order], row[order]], axis=1)
    result = PackedLayout(table=tile_table(seqs, tiles, device), seqs=torch.from_numpy(seqs),
                          tiles=torch.from_numpy(tiles), num_tiles=int(seq_of_tile.size),
                          query_start_gcd=gcd)
    _LAYOUTS[key] = result
    if len(_LAYOUTS) > _LAYOUT_CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return result


def tile_table(seqs: np.ndarray, tiles: np.ndarray, device) -> torch.Tensor:
    """The kernel's (num_tiles, TILE_FIELDS) int32 table for ``tiles`` (sequence, row),
    in that order, copied to ``device`` from pinned memory without a host wait."""
    seq, row = tiles[:, 0], tiles[:, 1]
    per = seqs[seq]
    table = np.stack([per[:, 0], per[:, 1], per[:, 2], per[:, 3], per[:, 4],
                      per[:, 5] + row,                  # absolute tile of the row
                      per[:, 6] + row, per[:, 7],       # its count, head stride
                      per[:, 8] + row * per[:, 10],     # its row of indices
                      per[:, 9]], axis=1) if len(tiles) else np.zeros((0, TILE_FIELDS))
    if table.size and table.max() > 2**31 - 1:
        raise ValueError("packed attention needs every row offset and index position below "
                         "2^31; split the batch into smaller calls")
    host = torch.from_numpy(np.ascontiguousarray(table, dtype=np.int32))
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    """A packed (T, H, D) tensor as a (1, H, T, D) view (what the launch checks see)."""
    return x.permute(1, 0, 2).unsqueeze(0)


def packed_attention_forward(q, k, v, layout: PackedLayout, kv_num_blocks, kv_indices, *,
                             block_size: int, causal: bool, scale: float | None,
                             return_lse: bool, interpreted: bool = _INTERPRETED,
                             out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                             config=None, block_table: torch.Tensor | None = None):
    """Block-sparse attention of a whole packed batch in one kernel launch.

    Parameters
    ----------
    q : Tensor (total_q, Hq, D)
    k : Tensor (total_k, Hkv, D)
    v : Tensor (total_k, Hkv, Dv)
    layout : PackedLayout
        From :func:`packed_layout` for these rows and index placements.
    kv_num_blocks, kv_indices : Tensor, int32, flat
        Every sequence's counts and ascending causal-trimmed key tiles, where
        ``layout`` says they sit.
    block_size, causal, scale, return_lse, interpreted, config
        As in :func:`prism.optimized.attention.sparse_attention_forward`.
    out, lse : Tensor, optional
        Preallocated (total_q, Hq, Dv) and (Hq, total_q) float32.
    block_table : Tensor (B, max_pages), int32 or int64, optional
        Paged KV: ``k``/``v`` are (num_pages, page_size, Hkv, D) caches and
        the "first k row" of each sequence in ``layout`` is the offset of its
        row in ``block_table`` (:mod:`prism.optimized.paged_kv` builds both;
        the table must have unit column stride). The kernel follows the table
        with pointer loads, or with bulk copies (TMA) where pages hold whole key
        blocks (:mod:`prism.optimized.paged_launch`); no warp specialisation.

    Returns
    -------
    out (total_q, Hq, Dv), and lse (Hq, total_q) or None
    """
    q, scale = positive_scale(q, scale)
    total_q, hq, d = q.shape
    paged = block_table is not None
    hkv, dv = k.shape[-2], v.shape[-1]
    if out is None:
        out = torch.empty(total_q, hq, dv, dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(hq, total_q, dtype=torch.float32, device=q.device)
    if layout.num_tiles == 0:
        return out, lse
    d_pad, dv_pad = max(16, next_power_of_2(d)), max(16, next_power_of_2(dv))
    rows_k, rows_v = (k[:1].flatten(0, 1), v[:1].flatten(0, 1)) if paged else (k, v)
    q4, k4, v4 = _heads_view(q), _heads_view(rows_k), _heads_view(rows_v)
    if paged:
        config = paged_config(config, q4, k4, v4, d_pad, dv_pad, layout.query_start_gcd,
                              block_size, interpreted, page_size=k.shape[1])
        # Bulk copies read whole key blocks inside one page, from the cache's rows.
        rows = bulk_rows(k, v, config, d_pad, dv_pad)
        use_tma = rows is not None
        if use_tma:
            k4, v4 = rows
    else:
        config = _launch_config(config, q4, k4, v4, d_pad, dv_pad, layout.query_start_gcd,
                                block_size, interpreted)
        use_tma = (config.use_tma and not config.warp_specialize
                   and tma_compatible(k4, v4, d_pad, dv_pad))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    k_desc = v_desc = None
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc = TensorDescriptor.from_tensor(k4, [1, 1, config.block_n, d_pad])
        v_desc = TensorDescriptor.from_tensor(v4, [1, 1, config.block_n, dv_pad])
    grid = (layout.num_tiles * -(-block_size // config.block_m) * hq,)
    # Dummy index buffers keep the pointers valid when every row is empty.
    num = kv_num_blocks if kv_num_blocks.numel() else layout.table
    idx = kv_indices if kv_indices.numel() else layout.table
    scratch = _scratch_allocator() if config.warp_specialize else _null()
    # Row (token or slot), head and dim strides; a cache's page stride goes separately.
    k_strides, v_strides = (k.stride()[1:], v.stride()[1:]) if paged else (k.stride(), v.stride())
    extra = {}
    if paged:
        extra = dict(BLOCK_TABLE=block_table, stride_kpage=k.stride(0),
                     stride_vpage=v.stride(0), PAGED=True, PAGE_SIZE=k.shape[1])
    with scratch:
        _sparse_attention_kernel[grid](
            q, k, v, out, lse if return_lse else out, num, idx, k_desc, v_desc, None,
            layout.table,
            0, q.stride(1), q.stride(0), q.stride(2),
            0, k_strides[1], k_strides[0], k_strides[2],
            0, v_strides[1], v_strides[0], v_strides[2],
            0, out.stride(1), out.stride(0), out.stride(2),
            0, 0, 0, 0, 0,
            hq, hq, hq // hkv, total_q, 0, 0, 0, layout.num_tiles, block_size,
            scale * LOG2_E,
            **launch_constants(config, causal, return_lse, d, dv, q.dtype, use_tma,
                               varlen=True),
            **extra,
        )
    return out, (lse if return_lse else None)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------
# Compact indices of every sequence, flat, and where each one sits.
# --------------------------------------------------------------------------

def _flatten_indices(pieces, device=None):
    """Concatenate per-group compact indices and say where each sequence's sit.

    ``pieces`` lists ``(count, num, idx)``: ``count`` sequences whose counts
    ``num`` are (count or 1, Hq or 1, nqt) and indices ``idx`` (count or 1,
    Hq or 1, nqt, width). Returns the flat num, flat idx and one placement
    per sequence (see :func:`packed_layout`). ``device`` places the empty
    indices of a batch without sequences.
    """
    nums, idxs, placements = [], [], []
    num_at = idx_at = 0
    for count, num, idx in pieces:
        nb, nh, nqt = num.shape
        width = idx.shape[3]
        per_num, per_idx = nh * nqt, nh * nqt * width
        for g in range(count):
            step = g if nb > 1 else 0
            placements.append((num_at + step * per_num, nqt if nh > 1 else 0,
                               idx_at + step * per_idx, nqt * width if nh > 1 else 0, width))
        nums.append(num.reshape(-1))
        idxs.append(idx.reshape(-1))
        num_at += nums[-1].numel()
        idx_at += idxs[-1].numel()
    if not pieces:  # an empty batch (B = 0): nothing to place
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        return empty, empty, placements
    flat_num = nums[0] if len(nums) == 1 else torch.cat(nums)
    flat_idx = idxs[0] if len(idxs) == 1 else torch.cat(idxs)
    return flat_num, flat_idx, placements


def _raise_named(flags, q, k, v, ranges) -> None:
    """Raise the reference's ValueError, naming the sequence, if a launch flagged NaN/Inf."""
    ops = importlib.import_module("prism.optimized.ops")
    if not flags or ops.tracing():
        return
    if len(flags) == 1:
        flagged = bool(flags[0])  # one element: a copy to the host, no extra kernel
    else:
        flagged = bool(torch.cat([f.reshape(-1) for f in flags]).any())
    if not flagged:
        return
    for i, (q0, q1, k0, k1) in enumerate(ranges):
        try:
            check_finite("q", as_heads(q, q0, q1))
            check_finite("k", as_heads(k, k0, k1))
            if v is not None:
                check_finite("v", as_heads(v, k0, k1))
        except ValueError as error:
            raise _name_sequence(error, i, 1, f"q rows {q0}:{q1}, k rows {k0}:{k1}") from error


# --------------------------------------------------------------------------
# The packed stages (hooks of reference.varlen.run_prism / run_attention).
# --------------------------------------------------------------------------

def select_runs(q, k, v, ranges, cfg: PrismConfig, causal: bool, return_mask: bool):
    """Selection per run of equal-shape sequences on strided views (``v`` may be None:
    then only q and k are checked for NaN/Inf).

    Returns the runs' ``pieces`` for :func:`_flatten_indices`, their NaN/Inf
    flags and (with ``return_mask``) one :class:`TileMask` per sequence.
    """
    ops = importlib.import_module("prism.optimized.ops")
    pieces, flags, masks = [], [], []
    for first, count in runs_of_equal_shape(ranges):
        # validate_varlen checked what the dense validation would check per run.
        views, _ = _run_views(q, k, v, ranges, first, count)
        q_run, k_run, v_run = views if v is not None else (*views, None)
        mask, num, idx, flag = ops.select(q_run, k_run, v_run, cfg, causal)
        pieces.append((count, num, idx))
        flags.append(flag)
        if return_mask:
            nq, nk = q_run.shape[2], k_run.shape[2]
            masks.extend(
                TileMask(mask[g:g + 1], block_size=cfg.block_size, causal=causal,
                         num_queries=nq, num_keys=nk, kv_num_blocks=num[g:g + 1],
                         kv_indices=idx[g:g + 1]) for g in range(count))
    return pieces, flags, masks


def run_prism_packed(q, k, v, ranges, cfg: PrismConfig, *, causal: bool, scale,
                     return_lse: bool, return_mask: bool):
    """Selection per run of equal-shape sequences, then one attention launch."""
    impl = _module()
    if not supported_block_size(cfg.block_size):
        return run_prism(impl, q, k, v, ranges, cfg, causal=causal, scale=scale,
                         return_lse=return_lse, return_mask=return_mask)
    check_device(_sparse_attention_kernel, q=q, k=k, v=v)
    pieces, flags, masks = select_runs(q, k, v, ranges, cfg, causal, return_mask)
    flat_num, flat_idx, placements = _flatten_indices(pieces, q.device)
    layout = packed_layout(ranges, placements, cfg.block_size, causal, q.device)
    out, lse = packed_attention_forward(q, k, v, layout, flat_num, flat_idx,
                                        block_size=cfg.block_size, causal=causal, scale=scale,
                                        return_lse=return_lse)
    _raise_named(flags, q, k, v, ranges)
    result = (out, lse) if return_lse else (out,)
    if return_mask:
        result = (*result, masks)
    return result if len(result) > 1 else result[0]


def run_attention_packed(q, k, v, ranges, block_masks, *, block_size: int, causal: bool, scale,
                         return_lse: bool):
    """Every sequence's mask checked and turned into compact indices, one attention launch."""
    impl = _module()
    if not supported_block_size(block_size):
        return run_attention(impl, q, k, v, ranges, block_masks, block_size=block_size,
                             causal=causal, scale=scale, return_lse=return_lse)
    check_device(_sparse_attention_kernel, q=q, k=k, v=v)
    pieces = mask_pieces(q, ranges, block_masks, block_size, causal)
    flags = [_nonfinite(q, k, v)]
    flat_num, flat_idx, placements = _flatten_indices(pieces, q.device)
    layout = packed_layout(ranges, placements, block_size, causal, q.device)
    out, lse = packed_attention_forward(q, k, v, layout, flat_num, flat_idx,
                                        block_size=block_size, causal=causal, scale=scale,
                                        return_lse=return_lse)
    _raise_named(flags, q, k, v, ranges)
    return (out, lse) if return_lse else out


def mask_pieces(q, ranges, block_masks, block_size: int, causal: bool) -> list:
    """Every sequence's mask checked and turned into compact indices (its indices
    carried by a :class:`TileMask` where present): ``pieces`` for
    :func:`_flatten_indices`."""
    pieces = []
    for i, ((q0, q1, k0, k1), mask) in enumerate(zip(ranges, block_masks, strict=True)):
        nq, nk = q1 - q0, k1 - k0
        tiles = tile_layout(nq, nk, block_size, causal)
        try:
            validate_block_mask(mask, as_heads(q, q0, q1),
                                (tiles.num_query_tiles, tiles.num_key_tiles))
        except (ValueError, TypeError) as error:
            raise _name_sequence(error, i, 1, f"block_masks[{i}]") from error
        carried = None
        if isinstance(mask, TileMask):
            carried = mask.carried_indices(block_size=block_size, causal=causal,
                                           num_queries=nq, num_keys=nk)
            mask = mask.as_tensor()
        if carried is not None and carried[0].device == q.device:
            num, idx = carried
        else:
            num, idx = _compact(mask, tiles.first_query_tile, causal)
        pieces.append((1, num, idx))
    return pieces


def _compact(mask, first_query_tile: int, causal: bool):
    """Compact indices of one sequence's mask; a causal call's rows lose the tiles above
    their diagonal (they hold no key a query may read)."""
    from .indices import mask_rows_to_indices

    return mask_rows_to_indices(mask, first_query_tile, causal_trim=causal)


def _nonfinite(q, k, v):
    from .pooling import nonfinite_flag

    return nonfinite_flag(_heads_view(q), _heads_view(k), _heads_view(v))


@functools.lru_cache(maxsize=1)
def _impl():
    """The functions the reference's loops call, plus the packed hooks."""
    impl = _module()
    return types.SimpleNamespace(
        select_blocks=impl.select_blocks, prism_attention=impl.prism_attention,
        block_sparse_attention=impl.block_sparse_attention,
        run_prism_packed=run_prism_packed, run_attention_packed=run_attention_packed,
        run_paged_packed=importlib.import_module("prism.optimized.paged_kv").run_paged_packed,
        select_cached=importlib.import_module("prism.optimized.chunked").select_cached,
        select_paged=importlib.import_module("prism.optimized.paged_select")
        .select_blocks_paged_hook)


# --------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------

def select_blocks_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                         max_seqlen_k: int, config: PrismConfig | None = None, *,
                         causal: bool = True, **overrides) -> list:
    """Per-sequence tile selection of a packed batch, on the GPU.

    Same contract as :func:`prism.reference.select_blocks_varlen`: a list of B
    bool masks (1, Hq, n_query_tiles_i, n_key_tiles_i).
    """
    cfg = resolve_config(config, **overrides)
    ranges = validate_varlen(q, k, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, causal=causal)
    return run_select(_impl(), q, k, ranges, cfg, causal)


def block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                                  max_seqlen_k: int, block_masks, *, block_size: int = 128,
                                  causal: bool = True, scale: float | None = None,
                                  return_lse: bool = False):
    """Block-sparse attention of a packed batch on per-sequence masks, one GPU launch.

    Same contract as :func:`prism.reference.block_sparse_attention_varlen`:
    ``o`` (total_q, Hq, Dv) and, with ``return_lse``, ``lse`` (Hq, total_q).
    """
    ranges = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal=causal)
    validate_scale(scale)
    masks = check_masks(block_masks, len(ranges))

    def forward():
        result = run_attention(_impl(), q, k, v, ranges, masks, block_size=block_size,
                               causal=causal, scale=scale, return_lse=return_lse)
        return result if return_lse else (result, None)

    if gradients.needs_gradients(q, k, v):  # the kernels' output, the reference's backward
        return gradients.with_packed_gradients(q, k, v, ranges, masks, forward,
                                               block_size=block_size, causal=causal, scale=scale)
    result = forward()
    return result if return_lse else result[0]


def prism_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                           max_seqlen_k: int, config: PrismConfig | None = None, *,
                           causal: bool = True, scale: float | None = None,
                           return_lse: bool = False, return_mask: bool = False, **overrides):
    """Prism end to end on a packed variable-length batch, on the GPU.

    Same contract as :func:`prism.reference.prism_attention_varlen`: selection
    per run of equal-shape sequences, then one attention launch for the batch.
    Under ``torch.compile`` one operator (:mod:`prism.optimized.varlen_ops`).
    """
    if torch.compiler.is_compiling():
        return varlen_ops.prism_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config,
            causal=causal, scale=scale, return_lse=return_lse, return_mask=return_mask,
            **overrides)
    cfg = resolve_config(config, **overrides)
    ranges = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal=causal)
    validate_scale(scale)
    if gradients.needs_gradients(q, k, v):  # selection, then attention with a backward
        masks = run_select(_impl(), q, k, ranges, cfg, causal)
        result = block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                               max_seqlen_q, max_seqlen_k, masks,
                                               block_size=cfg.block_size, causal=causal,
                                               scale=scale, return_lse=return_lse)
        if not return_mask:
            return result
        return (*result, masks) if return_lse else (result, masks)
    return run_prism(_impl(), q, k, v, ranges, cfg, causal=causal, scale=scale,
                     return_lse=return_lse, return_mask=return_mask)


def select_blocks_paged(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q: int,
                        config: PrismConfig | None = None, *, causal: bool = True,
                        pooled_keys=None, **overrides) -> list:
    """Tile selection over a paged key cache, on the GPU.

    Same contract as :func:`prism.reference.select_blocks_paged`.
    """
    return run_paged_select(_impl(), q, k_cache, block_table, seq_lens, cu_seqlens_q,
                            max_seqlen_q, config, causal, pooled_keys, overrides)


def prism_attention_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                          max_seqlen_q: int, config: PrismConfig | None = None, *,
                          causal: bool = True, scale: float | None = None,
                          return_lse: bool = False, return_mask: bool = False,
                          pooled_keys=None, **overrides):
    """Prism end to end over a paged KV cache, on the GPU: one attention launch, reading
    the pages in place or gathered first (:data:`prism.optimized.paged_kv.PAGED_READS`).

    Same contract as :func:`prism.reference.prism_attention_paged`. Forward only:
    with grad mode on and an input that requires grad it raises ``TypeError``
    (gather the pages and call :func:`prism_attention_varlen` for gradients).
    Under ``torch.compile`` one operator (:mod:`prism.optimized.varlen_ops`).
    """
    if torch.compiler.is_compiling():
        return varlen_ops.prism_attention_paged(
            q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, config,
            causal=causal, scale=scale, return_lse=return_lse, return_mask=return_mask,
            pooled_keys=pooled_keys, **overrides)
    if gradients.needs_gradients(q, k_cache, v_cache):
        raise TypeError("prism_attention_paged computes forward passes only, but an input "
                        "requires grad; call it under torch.no_grad(), or gather the pages "
                        "(prism.reference.gather_paged_kv) and call prism_attention_varlen")
    return run_paged_prism(_impl(), q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                           max_seqlen_q, config, causal=causal, scale=scale,
                           return_lse=return_lse, return_mask=return_mask,
                           pooled_keys=pooled_keys, overrides=overrides)
