"""Launch shape and bulk-copy views of the attention kernel over a paged KV cache.

:func:`prism.optimized.varlen.packed_attention_forward` with a block table reads
K and V from (num_pages, page_size, Hkv, D) caches in place
(:mod:`prism.optimized.paged_kv`). Two choices depend on the page size:

* the launch shape (:func:`paged_config`): the dense table's, except that
  pages of fewer than :data:`SMALL_PAGE` tokens at head dims 65-128 take
  :data:`SMALL_PAGE_CONFIG`;
* how a key block is read. Key blocks start at multiples of their height
  ``block_n``, so where the page size is a multiple of ``block_n`` a block lies
  inside one page and its rows are contiguous: one block-table entry gives
  the block's first row in the cache seen as (1, Hkv, num_pages * page_size,
  D) (:func:`cache_rows`), and the kernel reads it with a bulk tensor copy
  (TMA), as the packed launch does. Smaller or unaligned pages take pointer
  loads, one table entry per row.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .attention import AttentionConfig, _launch_config, tma_compatible

#: Pages shorter than this take :data:`SMALL_PAGE_CONFIG` (D 65-128, tile >= 128).
SMALL_PAGE = 64
#: The paged launch shape for pages of fewer than :data:`SMALL_PAGE` tokens at head
#: dims 65-128 and tiles of 128 or more (16-bit inputs; pointer loads, since such
#: pages hold less than a 64-key block). On the H200
#: (``benchmarks/results/h200_paged_mixed_shapes_818c422.json``, bench_varlen's 8
#: mixed sequences, 128K tokens, density 0.134; ``h200_paged_shapes_page16_6cab374``,
#: one sequence, ``prefix:chunk`` 0:4K, 0:16K, 16K:16K, 0:32K), 16-token pages, attention
#: alone: 19.1 against 30.3 ms for the dense table's 128 x 64 / 4 warps (1.59x), and
#: 1.17-1.60x on the single sequences. With 64- and 256-token pages the same shape
#: gave 1.06x and 1.15x on the mixed batch but 0.81x on one 16K sequence
#: (``h200_paged_shapes_1b40961``), all with pointer loads.
SMALL_PAGE_CONFIG = AttentionConfig(128, 128, 8, 2)


def paged_config(config, q4, k4, v4, d_pad: int, dv_pad: int, query_start: int,
                 block_size: int, interpreted: bool, page_size: int = SMALL_PAGE):
    """The launch shape of a paged launch: the dense choice, without warp specialisation.

    The table's blocks, warps, stages and TMA flag are kept (128 x 64 on 4 warps
    and 2 stages at D 65-128, tile 128); whether TMA is used is decided by the
    page size at launch (the module docstring). Pages of fewer than
    :data:`SMALL_PAGE` tokens at D 65-128 and tiles of 128 or more take
    :data:`SMALL_PAGE_CONFIG` instead (measured there; 16-bit inputs). A
    warp-specialised shape, which no table entry uses now, would run with 8
    warps and 2 stages; an explicit warp-specialised ``config`` is refused (the
    partitioned loop cannot follow a block table).
    """
    if config is not None and config.warp_specialize:
        raise ValueError("a paged launch cannot use AttentionConfig(warp_specialize=True): "
                         "the kernel follows the block table itself")
    if (config is None and not interpreted and page_size < SMALL_PAGE
            and 64 < max(d_pad, dv_pad) <= 128 and (block_size & -block_size) >= 128
            and q4.dtype in (torch.float16, torch.bfloat16)):
        config = SMALL_PAGE_CONFIG
    config = _launch_config(config, q4, k4, v4, d_pad, dv_pad, query_start, block_size,
                            interpreted)
    if config.warp_specialize:
        config = replace(config, warp_specialize=False, num_warps=8, num_stages=2)
    return config


def cache_rows(cache: torch.Tensor) -> torch.Tensor | None:
    """A (num_pages, page_size, H, D) cache as a (1, H, num_pages * page_size, D) view
    for tensor descriptors, or None where pages and slots cannot merge into one row
    dimension without a copy, or the rows exceed a descriptor's int32 coordinates."""
    pages, size, heads, dim = cache.shape
    if cache.stride(0) != size * cache.stride(1) or pages * size >= 2**31:
        return None
    return cache.view(pages * size, heads, dim).permute(1, 0, 2).unsqueeze(0)


def bulk_rows(k_cache: torch.Tensor, v_cache: torch.Tensor, config: AttentionConfig,
              d_pad: int, dv_pad: int):
    """``(k_rows, v_rows)``, the :func:`cache_rows` views the kernel's descriptors read,
    where a paged launch with ``config`` reads by bulk copy (a TMA shape, pages of
    whole ``block_n``-key blocks, rows :func:`tma_compatible` accepts); else None."""
    if not config.use_tma or config.warp_specialize or k_cache.shape[1] % config.block_n:
        return None
    k_rows, v_rows = cache_rows(k_cache), cache_rows(v_cache)
    if k_rows is None or v_rows is None or not tma_compatible(k_rows, v_rows, d_pad, dv_pad):
        return None
    return k_rows, v_rows
