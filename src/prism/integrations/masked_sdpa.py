"""Prism's block-sparse attention computed densely by torch SDPA.

:func:`masked_sdpa_attention` returns what contract §7 (and
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

from prism.reference.attention import token_mask
from prism.reference.tiles import TileLayout, tile_layout
from prism.reference.validation import (
    validate_block_mask,
    validate_block_size,
    validate_qkv,
    validate_scale,
)

# Bytes of additive token mask (fp32, B x Hq x rows x keys) built per chunk of query rows.
_CHUNK_MASK_BYTES = 128 * 2**20


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
    """Block-sparse attention (contract §7) by torch SDPA on the expanded token mask.

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
    The token mask comes from :func:`prism.reference.token_mask`; a chunk's
    mask holds (rows x Nk) entries, so memory is bounded by the sequence
    length even when ``block_size`` exceeds it.
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
    # contract §7: a row with nothing to read is 0. A row reads nothing iff its tile
    # selects no key tile starting at or before its position (causal), or none.
    key_tiles = torch.arange(layout.num_key_tiles, device=q.device)
    first_selected = torch.where(block_mask, key_tiles, layout.num_key_tiles).amin(dim=-1)
    rows_per_chunk = max(block_size, _CHUNK_MASK_BYTES // max(1, 4 * b * hq * nk))
    for r0, r1 in _row_chunks(layout, rows_per_chunk):
        key_stop = layout.query_start + r1 if causal else nk
        # The reference's token rule (contract §7), handed to SDPA as an additive
        # 0 / -inf mask; (rows x Nk) per chunk, whatever the tile size.
        allowed = token_mask(block_mask, layout, torch.arange(r0, r1, device=q.device),
                             causal)[..., :key_stop]
        bias = torch.where(allowed, 0.0, float("-inf"))  # fp32: SDPA adds it to the scores
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
