"""Paged KV caches read in place by the attention kernel (docs/serving.rst).

:func:`prism.optimized.prism_attention_paged` validates its arguments with the
reference's code (:func:`prism.reference.paged.run_paged_prism`), which then
hands the call to :func:`run_paged_packed`:

* **selection** pools the keys through the block table
  (:mod:`prism.optimized.paged_pooling`, :mod:`prism.optimized.paged_select`):
  all of each sequence's keys, or with a
  :class:`~prism.reference.PooledKeyCache` only those after its pooled tiles.
  Nothing is gathered (estimators other than Prism's, which read raw keys,
  get the keys gathered);
* **attention** is one launch of the packed kernel's ``PAGED`` branch: every
  key and value row is read through the block table (page
  ``block_table[i, n // page_size]``, slot ``n % page_size``), any page size;
* **NaN/Inf**: the tokens the call reads that selection did not check (the
  values, and with pooled caches the keys) are checked by one pass over their
  pages (:func:`paged_nonfinite`); a hit gathers them and raises the
  reference's error, which names the sequence.

Which path :func:`prism_attention_paged` takes (:data:`PAGED_READS`): where pages
hold whole key blocks (a page size that is a multiple of the launch's
``block_n``: 64 or more at the table's shapes), the paged launch reads each
block with Hopper's bulk tensor copies (TMA) from the cache seen as one row
dimension (:mod:`prism.optimized.paged_launch`), as the packed launch does, and
``"auto"`` reads in place. Smaller or unaligned pages take pointer loads, and
the history below applies to them (it was measured when every paged launch
used pointer loads).
Where the gathered batch would get bulk copies (16-bit inputs, head dims that
:func:`~prism.optimized.attention.descriptor_rows` accepts, compute capability
>= 9.0, a TMA or warp-specialised default launch shape), gathering K and V and
running the varlen launch was faster on the H200 for large prefills: 16.2 ms
against 19.8 ms for 128K tokens in 64-token pages at density 0.134
(``benchmarks/results/h200_varlen_2e60d7c.json``; attention alone 1.34x slower
in place at pages of 16 and 64 tokens, 1.14x at 256), and 45.0 against 49.8 ms
for one fresh 128K-token sequence. For small calls the copy costs more than the
bulk copies save. With the plain attention loop (the default since the
warp-specialised one was dropped), one sequence, ``prefix:chunk`` tokens,
gathered time over in place
(``benchmarks/results/h200_paged_crossover_eb06ef2.json``, 64-token pages,
threshold 0.9): 0:16K 1.33x, 32K:4K 1.28x, 0:32K 0.97x, 0:40K 0.83x, 0:48K
0.81x, 32K:32K 0.82x, 0:128K 0.74x (``h200_paged_crossover_7df1027.json``:
0:48K 0.82x, 0:64K 0.83x, 0:96K 0.78x, 32K:64K 0.79x). Between 16K and 32K,
with the 128 x 64 launch shape of 2026-12-03, over three runs
(``h200_paged_crossover_3afe9a7.json``, ``h200_paged_shapes_1b40961.json``,
``h200_paged_crossover_repeat_1b40961.json``, the last with two repeats): 0:16K
1.15x / 1.18x, 16K:16K 1.19x / 1.10x, 0:20K 1.37x / 0.99x, 0:24K 0.93x / 1.03x
/ 1.03x, 0:28K 1.11x / 0.98x, 0:32K 0.90x / 1.02x / 0.98x / 0.96x. So the
crossover lies near 28K-32K, within the runs' spread, and ``"auto"`` gathers
where the gathered launch gets bulk copies, the in-place one does not (pages
that are not whole key blocks) *and* the call has at least
:data:`GATHER_MIN_QUERIES` (32768) query tokens (the reference's path: pages
gathered, then the varlen functions, a transient copy of the batch's K and V),
and reads in place everywhere else, which also saves that copy. Tile sizes that
are not multiples of 16 always gather (the varlen functions run the reference's
loop on the dense functions there). :func:`block_sparse_attention_paged` always
reads in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prism.reference.paged import (
    _key_ranges,
    checked_skips,
    gather_tokens,
    paged_nonfinite_error,
    validate_paged,
)
from prism.reference.registry import estimator_spec
from prism.reference.validation import validate_scale
from prism.reference.varlen import check_masks

from ._runtime import check_device, device_capability, kernels_interpreted, next_power_of_2
from .attention import (
    _sparse_attention_kernel,
    default_config,
    descriptor_rows,
    supported_block_size,
)
from .chunked import flagged, select_with_caches, undo_and_raise
from .paged_launch import bulk_rows
from .paged_select import raise_paged, select_paged
from .varlen import (
    _flatten_indices,
    _nonfinite,
    mask_pieces,
    packed_attention_forward,
    packed_layout,
)

#: How :func:`prism_attention_paged` reads K and V: ``"auto"`` (see the module
#: docstring), ``"kernel"`` (in place, whenever the tile size allows) or ``"gather"``.
PAGED_READS = "auto"
#: Fewest query tokens in a call for which ``"auto"`` gathers the pages where the
#: gathered launch gets Hopper's bulk copies (module docstring).
GATHER_MIN_QUERIES = 32768


def reads_pages_in_kernel(q, k_cache, v_cache, block_size: int) -> bool:
    """Whether a paged call reads the pages in place (:data:`PAGED_READS`)."""
    if PAGED_READS not in ("auto", "kernel", "gather"):
        raise ValueError(f"prism.optimized.paged_kv.PAGED_READS must be 'auto', 'kernel' or "
                         f"'gather', got {PAGED_READS!r}")
    if not supported_block_size(block_size) or PAGED_READS == "gather":
        return False
    if PAGED_READS == "kernel" or not k_cache.is_cuda or q.shape[0] < GATHER_MIN_QUERIES:
        return True
    d, dv = k_cache.shape[3], v_cache.shape[3]
    config = default_config(block_size, d, q.dtype, kernels_interpreted(_sparse_attention_kernel))
    # The gathered K and V are contiguous: only their rows decide (tma_compatible).
    rows_ok = all(descriptor_rows(n, k_cache.element_size()) for n in (d, dv))
    bulk = (config.use_tma or config.warp_specialize) and rows_ok \
        and device_capability(k_cache.device)[0] >= 9
    if not bulk:
        return True
    # Pages of whole key blocks give the in-place launch the same bulk copies.
    d_pad, dv_pad = max(16, next_power_of_2(d)), max(16, next_power_of_2(dv))
    return bulk_rows(k_cache, v_cache, config, d_pad, dv_pad) is not None


@triton.jit
def _paged_nonfinite_kernel(C, BT, LENS, FLAG, stride_p, stride_s, stride_h, stride_d,
                            stride_bt, num_heads, PAGE_SIZE: tl.constexpr,
                            HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """FLAG = 1 if a token ``< LENS[seq]`` of sequence ``seq`` holds NaN or Inf."""
    seq = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    n = tl.load(LENS + seq)
    if start < n:
        rows = start + tl.arange(0, BLOCK)
        ok = rows < n
        page = tl.load(BT + seq.to(tl.int64) * stride_bt + rows // PAGE_SIZE, mask=ok,
                       other=0).to(tl.int64)
        base = C + page * stride_p + (rows % PAGE_SIZE).to(tl.int64) * stride_s
        dims = tl.arange(0, D_PAD)
        mask = ok[:, None] & (dims[None, :] < HEAD_DIM)
        bad = 0
        for h in range(num_heads):
            x = tl.load(base[:, None] + h * stride_h + dims[None, :] * stride_d, mask=mask,
                        other=0.0).to(tl.float32)
            bad += tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32))
        if bad > 0:
            tl.store(FLAG, 1.0)


def paged_nonfinite(caches, block_table: torch.Tensor, lengths: list[int],
                    block: int = 64) -> torch.Tensor:
    """A (1,) float64 device tensor, non-zero if a token that the call reads from any
    of ``caches`` (each (num_pages, page_size, H, D)) holds NaN or Inf.

    Reads only the first ``lengths[i]`` tokens of sequence ``i`` through
    ``block_table`` (validated), once each; no host wait.
    """
    block_table = _unit_columns(block_table)
    flag = torch.zeros(1, dtype=torch.float64, device=block_table.device)
    longest = max(lengths, default=0)
    if longest == 0:
        return flag
    lens = torch.tensor(lengths, dtype=torch.int32).to(block_table.device, non_blocking=True)
    grid = (len(lengths), -(-longest // block))
    for cache in caches:
        d = cache.shape[3]
        _paged_nonfinite_kernel[grid](
            cache, block_table, lens, flag, *cache.stride(), block_table.stride(0),
            cache.shape[2], PAGE_SIZE=cache.shape[1], HEAD_DIM=d,
            D_PAD=max(16, next_power_of_2(d)), BLOCK=block)
    return flag


def _unit_columns(block_table: torch.Tensor) -> torch.Tensor:
    """The kernels index a row of the table as ``row + j``."""
    return block_table if block_table.stride(1) == 1 else block_table.contiguous()


def paged_ranges(ranges_q, lengths: list[int], block_table: torch.Tensor):
    """The packed layout's rows of a paged call: each sequence's q rows, and for its
    "k rows" the offset of its row of ``block_table`` plus ``seq_lens[i]`` (the
    kernel's ``PAGED`` branch reads them so)."""
    row = _unit_columns(block_table).stride(0)
    return [(q0, q1, i * row, i * row + n) for i, ((q0, q1), n) in
            enumerate(zip(ranges_q, lengths, strict=True))]


def paged_attention(q, k_cache, v_cache, block_table, ranges_q, lengths, pieces, *,
                    block_size: int, causal: bool, scale, return_lse: bool, config=None):
    """One launch of the kernel's paged branch on validated inputs and compact indices
    (``pieces`` as :func:`prism.optimized.varlen._flatten_indices` takes them)."""
    block_table = _unit_columns(block_table)
    flat_num, flat_idx, placements = _flatten_indices(pieces, q.device)
    ranges = paged_ranges(ranges_q, lengths, block_table)
    layout = packed_layout(ranges, placements, block_size, causal, q.device)
    return packed_attention_forward(q, k_cache, v_cache, layout, flat_num, flat_idx,
                                    block_size=block_size, causal=causal, scale=scale,
                                    return_lse=return_lse, config=config,
                                    block_table=block_table)


def _raise_gathered(flags, q, k_cache, v_cache, block_table, ranges_q, lengths) -> None:
    """On a NaN/Inf flag, raise the reference's error naming the sequence, the cache, the
    token, page and slot (:func:`prism.reference.paged.paged_nonfinite_error`; rare path).
    Returns if no input holds one (a finite tile whose fp32 sum overflowed)."""
    if not flagged(flags):
        return
    error = paged_nonfinite_error(q, k_cache, v_cache, block_table, ranges_q, lengths)
    if error is not None:
        raise error


def run_paged_packed(q, k_cache, v_cache, block_table, ranges_q, lengths, caches, cfg, *,
                     causal: bool, scale, return_lse: bool, return_mask: bool):
    """Selection and one attention launch over a paged cache.

    The hook of :func:`prism.reference.paged.run_paged_prism` (validated
    arguments; ``caches`` one :class:`~prism.reference.PooledKeyCache` or None
    per sequence). Where the pages are read in place
    (:func:`reads_pages_in_kernel`), selection reads the keys through the
    block table too (:func:`prism.optimized.paged_select.select_paged`; other
    estimators than Prism's get every key gathered) and attention reads the
    pages; elsewhere K and V are gathered and the varlen launch runs on them:
    here when some sequence has a cache (its selection from
    :mod:`prism.optimized.chunked` on the gathered keys), else NotImplemented
    (the reference gathers and calls the varlen hooks).
    """
    check_device(_sparse_attention_kernel, q=q, k_cache=k_cache, v_cache=v_cache)
    cached = any(c is not None for c in caches)
    in_place = reads_pages_in_kernel(q, k_cache, v_cache, cfg.block_size)
    if not in_place and not (cached and supported_block_size(cfg.block_size)):
        return NotImplemented
    starts = [0 if c is None else c.num_tokens for c in caches]
    undo, k, v, ranges, skips = [], None, None, None, None
    if in_place and not estimator_spec(cfg.estimator).raw_keys:
        # Keys read through the block table by the pooling launches.
        pieces, flags, masks, undo = select_paged(q, k_cache, block_table, ranges_q, lengths,
                                                  caches, cfg, causal, return_mask)
        checked = [k_cache, v_cache] if cached else [v_cache]
    elif in_place:
        # Other estimators read raw keys: every key gathered (with a cache, the part
        # from Prism's tiles is fed from it: select_with_caches).
        k = gather_tokens(k_cache, block_table, [0] * len(lengths), lengths)
        ranges, skips = _key_ranges(ranges_q, lengths), starts
        pieces, flags, masks, undo = select_with_caches(q, k, ranges, skips, lengths, caches,
                                                        cfg, causal, return_mask)
        checked = [k_cache, v_cache] if cached else [v_cache]
    else:
        zeros = [0] * len(lengths)
        k = gather_tokens(k_cache, block_table, zeros, lengths)
        v = gather_tokens(v_cache, block_table, zeros, lengths)
        ranges, skips = _key_ranges(ranges_q, lengths), starts
        # Checks q and the keys it reads; the caches' prefixes and the values remain.
        pieces, flags, masks, undo = select_with_caches(q, k, ranges, skips, lengths, caches,
                                                        cfg, causal, return_mask)
        checked = [k_cache, v_cache]
    flags.append(paged_nonfinite(checked, block_table, lengths))
    if in_place:
        out, lse = paged_attention(q, k_cache, v_cache, block_table, ranges_q, lengths, pieces,
                                   block_size=cfg.block_size, causal=causal, scale=scale,
                                   return_lse=return_lse)
    else:
        flat_num, flat_idx, placements = _flatten_indices(pieces, q.device)
        layout = packed_layout(_key_ranges(ranges_q, lengths), placements, cfg.block_size,
                               causal, q.device)
        out, lse = packed_attention_forward(q, k, v, layout, flat_num, flat_idx,
                                            block_size=cfg.block_size, causal=causal,
                                            scale=scale, return_lse=return_lse)
    if flagged(flags):
        if in_place and k is None:
            raise_paged(undo, starts, q, k_cache, block_table, ranges_q, lengths, caches)
        else:
            undo_and_raise(undo, q, k, ranges, checked_skips(cfg, skips or [0] * len(lengths)),
                           caches)
        _raise_gathered(flags, q, k_cache, v_cache, block_table, ranges_q, lengths)
    result = (out, lse) if return_lse else (out,)
    if return_mask:
        result = (*result, masks)
    return result if len(result) > 1 else result[0]


def block_sparse_attention_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                 max_seqlen_q: int, block_masks, *, block_size: int = 128,
                                 causal: bool = True, scale: float | None = None,
                                 return_lse: bool = False, config=None):
    """Block-sparse attention over a paged KV cache on given per-sequence masks.

    The paged counterpart of
    :func:`prism.optimized.block_sparse_attention_varlen` (same masks, same
    result as that function on :func:`prism.reference.gather_paged_kv`'s
    gathered K and V), in one launch that reads the pages in place. ``config``
    (an :class:`~prism.optimized.attention.AttentionConfig`) fixes the launch
    shape (tests and benchmarks).
    """
    ranges_q, lengths = validate_paged(q, k_cache, v_cache, block_table, seq_lens,
                                       cu_seqlens_q, max_seqlen_q, causal=causal)
    validate_scale(scale)
    masks = check_masks(block_masks, len(lengths))
    if not supported_block_size(block_size):
        raise ValueError(f"block_sparse_attention_paged needs block_size % 16 == 0, got "
                         f"{block_size}; gather the pages (gather_paged_kv) and use "
                         "block_sparse_attention_varlen")
    check_device(_sparse_attention_kernel, q=q, k_cache=k_cache, v_cache=v_cache)
    pieces = mask_pieces(q, paged_ranges(ranges_q, lengths, block_table), masks, block_size,
                         causal)
    flags = [_nonfinite(q, q[:0], q[:0]), paged_nonfinite([k_cache, v_cache], block_table,
                                                          lengths)]
    out, lse = paged_attention(q, k_cache, v_cache, block_table, ranges_q, lengths, pieces,
                               block_size=block_size, causal=causal, scale=scale,
                               return_lse=return_lse, config=config)
    _raise_gathered(flags, q, k_cache, v_cache, block_table, ranges_q, lengths)
    return (out, lse) if return_lse else out
