"""Prism's block-sparse attention computed densely by torch SDPA.

:func:`masked_sdpa_attention` returns what SPEC 7 (and
:func:`prism.reference.block_sparse_attention`) returns, but it expands the tile
mask to a token mask and hands it to
:func:`torch.nn.functional.scaled_dot_product_attention`. It does dense work,
so it is no speed-up on a GPU; on the CPU it is several times faster than the
reference, whose plain-torch masked softmax is written for clarity. The
evaluation (``prism eval``) uses it to run a 30-layer model at 4K tokens in
minutes. Selection is untouched: the mask always comes from
:func:`prism.select_blocks` (or another selector).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prism.reference.tiles import TileLayout, tile_layout
from prism.reference.validation import (
    validate_block_mask,
    validate_block_size,
    validate_qkv,
    validate_scale,
)

# Bytes of additive token mask (fp32, B x Hq x rows x keys) built per chunk of query rows.
_CHUNK_MASK_BYTES = 128 * 2**20


def expand_tile_mask(block_mask: torch.Tensor, layout: TileLayout, row_start: int, row_stop: int,
                     key_stop: int, causal: bool) -> torch.Tensor:
    """Token-level mask of query rows ``row_start .. row_stop-1`` over keys ``0 .. key_stop-1``.

    Query row ``r`` sits at absolute position ``p = layout.query_start + r`` and
    may read key ``n`` iff tile ``n // bs`` is selected for tile ``p // bs``
    and, when causal, ``n <= p`` (SPEC 7).

    Parameters
    ----------
    block_mask : Tensor (B', H', n_query_tiles, n_key_tiles), bool
    layout : TileLayout
        From :func:`prism.reference.tile_layout` for the same inputs.
    row_start, row_stop : int
        Query rows to expand, ``0 <= row_start < row_stop <= Nq``.
    key_stop : int
        Keys ``0 .. key_stop-1`` are expanded, ``key_stop <= Nk``.
    causal : bool

    Returns
    -------
    Tensor (B', H', row_stop - row_start, key_stop), bool
    """
    bs = layout.block_size
    first_pos = layout.query_start + row_start
    last_pos = layout.query_start + row_stop - 1
    tile_lo = first_pos // bs - layout.first_query_tile
    tile_hi = last_pos // bs - layout.first_query_tile
    key_tiles = -(-key_stop // bs)
    sub = block_mask[:, :, tile_lo : tile_hi + 1, :key_tiles]
    b, h, t, kt = sub.shape
    # Repeat every tile entry bs x bs times with one contiguous copy: cheaper
    # than gathering rows and columns through index tensors.
    dense = sub[:, :, :, None, :, None].expand(b, h, t, bs, kt, bs).reshape(b, h, t * bs, kt * bs)
    offset = first_pos - (layout.first_query_tile + tile_lo) * bs
    dense = dense[:, :, offset : offset + row_stop - row_start, :key_stop]
    if causal:
        positions = torch.arange(first_pos, last_pos + 1, device=block_mask.device)
        keys = torch.arange(key_stop, device=block_mask.device)
        dense = dense & (keys[None, :] <= positions[:, None])
    return dense


def _row_chunks(layout: TileLayout, rows_per_chunk: int):
    """Split the query rows into chunks whose boundaries fall on tile boundaries."""
    bs = layout.block_size
    tiles_per_chunk = max(1, rows_per_chunk // bs)
    start = 0
    while start < layout.num_queries:
        tile = (layout.query_start + start) // bs + tiles_per_chunk
        stop = min(layout.num_queries, tile * bs - layout.query_start)
        yield start, stop
        start = stop


def masked_sdpa_attention(q, k, v, block_mask, *, block_size: int = 128, causal: bool = True,
                          scale: float | None = None) -> torch.Tensor:
    """Block-sparse attention (SPEC 7) by torch SDPA on the expanded token mask.

    Same arguments and output as :func:`prism.reference.block_sparse_attention`
    without ``return_lse``: the softmax runs in fp32 and the result comes back
    in ``q``'s dtype; a query with no key to read gets ``o = 0``. K and V are
    never repeated in memory (``enable_gqa``).

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    v : Tensor (B, Hkv, Nk, Dv)
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
        Batch and head dims may be 1 to broadcast.
    block_size : int
    causal : bool
    scale : float, optional
        Default ``1 / sqrt(D)``.

    Returns
    -------
    Tensor (B, Hq, Nq, Dv)

    Notes
    -----
    Query rows are processed in chunks aligned to tiles; when causal, a chunk
    only reads the keys up to its last position, which halves the dense work.
    """
    validate_qkv(q, k, v, causal=causal)
    validate_block_size(block_size)
    validate_scale(scale)
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    layout = tile_layout(nq, nk, block_size, causal)
    validate_block_mask(block_mask, q, (layout.num_query_tiles, layout.num_key_tiles))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    out = torch.zeros(b, hq, nq, dv, dtype=q.dtype, device=q.device)
    if nq == 0 or nk == 0:
        return out
    qf, kf, vf = q.float(), k.float(), v.float()
    # SDPA adds a float mask to the scores; building it here from the small tile
    # table saves SDPA's own bool-to-float conversion of the large token mask.
    tile_bias = torch.zeros(block_mask.shape, dtype=torch.float32, device=q.device)
    tile_bias.masked_fill_(~block_mask, float("-inf"))
    # SPEC 7: a row with nothing to read is 0. A row reads nothing iff its tile
    # selects no key tile starting at or before its position (causal), or none.
    key_tiles = torch.arange(layout.num_key_tiles, device=q.device)
    first_selected = torch.where(block_mask, key_tiles, layout.num_key_tiles).amin(dim=-1)
    rows_per_chunk = max(block_size, _CHUNK_MASK_BYTES // max(1, 4 * b * hq * nk))
    for r0, r1 in _row_chunks(layout, rows_per_chunk):
        key_stop = layout.query_start + r1 if causal else nk
        bias = _chunk_bias(tile_bias, layout, r0, r1, key_stop, causal)
        chunk = F.scaled_dot_product_attention(
            qf[:, :, r0:r1], kf[:, :, :key_stop], vf[:, :, :key_stop],
            attn_mask=bias.expand(b, hq, r1 - r0, key_stop), scale=scale,
            enable_gqa=hq != hkv,
        )
        positions = torch.arange(layout.query_start + r0, layout.query_start + r1,
                                 device=q.device)
        row_first = first_selected[:, :, positions // block_size - layout.first_query_tile]
        if causal:
            empty = row_first * block_size > positions
        else:
            empty = row_first >= layout.num_key_tiles
        out[:, :, r0:r1] = chunk.masked_fill(empty.unsqueeze(-1), 0.0).to(q.dtype)
    return out


def _chunk_bias(tile_bias: torch.Tensor, layout: TileLayout, row_start: int, row_stop: int,
                key_stop: int, causal: bool) -> torch.Tensor:
    """Additive mask (0 or -inf) of some query rows: :func:`expand_tile_mask` as floats."""
    bs = layout.block_size
    first_pos = layout.query_start + row_start
    last_pos = layout.query_start + row_stop - 1
    tile_lo = first_pos // bs - layout.first_query_tile
    tile_hi = last_pos // bs - layout.first_query_tile
    sub = tile_bias[:, :, tile_lo : tile_hi + 1, : -(-key_stop // bs)]
    b, h, t, kt = sub.shape
    # contiguous(): a one-tile reshape may stay a stride-0 view; it is written below.
    dense = (sub[:, :, :, None, :, None].expand(b, h, t, bs, kt, bs)
             .reshape(b, h, t * bs, kt * bs).contiguous())
    offset = first_pos - (layout.first_query_tile + tile_lo) * bs
    dense = dense[:, :, offset : offset + row_stop - row_start, :key_stop]
    if causal and key_stop > first_pos:
        # Only keys from the chunk's first position on can lie in a query's future.
        rows = torch.arange(first_pos, last_pos + 1, device=tile_bias.device)
        keys = torch.arange(first_pos, key_stop, device=tile_bias.device)
        dense[..., first_pos:].masked_fill_(keys[None, :] > rows[:, None], float("-inf"))
    return dense
