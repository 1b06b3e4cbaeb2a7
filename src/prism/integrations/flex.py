"""A Prism tile mask as a FlexAttention ``BlockMask``.

:func:`to_block_mask` turns the output of :func:`prism.select_blocks` (or its
compact form from :func:`prism.mask_to_indices`) into a
:class:`torch.nn.attention.flex_attention.BlockMask`, so that

    flex_attention(q, k, v, block_mask=to_block_mask(mask, Nq, Nk, block_size=bs),
                   scale=scale, enable_gqa=True)

computes what :func:`prism.block_sparse_attention` computes (contract §7).

FlexAttention's query blocks are counted from query row 0, while Prism's tiles
sit on the absolute grid where query row ``r`` has position ``P + r`` with
``P = Nk - Nq`` (causal). When ``P`` is a multiple of the tile size the two
grids coincide; otherwise a FlexAttention query block straddles two Prism
query tiles, and its key-block list is the union of theirs. Either way the
``mask_mod`` holds the exact token rule (tile selected for the query's own
tile, and ``n <= P + r`` when causal), so the result never depends on how the
blocks were listed; the lists only decide what a compiled kernel may skip.
Blocks that the rule fills completely are listed as "full" so a compiled
kernel can skip ``mask_mod`` on them.
"""

from __future__ import annotations

import torch

from prism.reference.indices import indices_to_mask, mask_to_indices
from prism.reference.tiles import tile_layout
from prism.reference.validation import validate_block_size


def _dense_tile_mask(mask, num_key_tiles: int) -> torch.Tensor:
    """Accept a bool tile mask or a ``(kv_num_blocks, kv_indices)`` pair; return the bool mask."""
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tile mask (B, H, n_query_tiles, n_key_tiles) or a "
                f"(kv_num_blocks, kv_indices) pair, got a tensor of dtype {mask.dtype}"
            )
        return mask
    if isinstance(mask, (tuple, list)) and len(mask) == 2:
        num, idx = mask
        if not (isinstance(num, torch.Tensor) and isinstance(idx, torch.Tensor)):
            raise TypeError("a (kv_num_blocks, kv_indices) pair must hold two tensors")
        if num.is_floating_point() or idx.is_floating_point():
            raise TypeError(
                f"kv_num_blocks and kv_indices must be integer tensors, got {num.dtype} and "
                f"{idx.dtype}; pass the output of prism.mask_to_indices"
            )
        if idx.dim() != num.dim() + 1 or idx.shape[:-1] != num.shape:
            raise ValueError(
                f"kv_indices must have kv_num_blocks' shape plus one dim, got "
                f"{tuple(num.shape)} and {tuple(idx.shape)}"
            )
        if idx.numel() and int(idx.max()) >= num_key_tiles:
            raise ValueError(
                f"kv_indices holds key tile {int(idx.max())} but these keys have only "
                f"{num_key_tiles} tiles; check num_keys and block_size"
            )
        return indices_to_mask(num, idx, num_key_tiles)
    raise TypeError(
        "mask must be a bool tile mask (B, H, n_query_tiles, n_key_tiles) or the pair "
        f"(kv_num_blocks, kv_indices) from prism.mask_to_indices, got {type(mask).__name__}"
    )


def to_block_mask(mask, num_queries: int, num_keys: int, *, block_size: int = 128,
                  causal: bool = True):
    """Build a FlexAttention ``BlockMask`` equivalent to a Prism tile mask.

    Parameters
    ----------
    mask : Tensor (B, H, n_query_tiles, n_key_tiles) bool, or tuple
        A tile mask from :func:`prism.select_blocks`, or its compact form
        ``(kv_num_blocks, kv_indices)`` from :func:`prism.mask_to_indices`.
        ``B`` and ``H`` may be 1 (broadcast by FlexAttention).
    num_queries, num_keys : int
        ``Nq`` and ``Nk`` of the attention call; causal needs ``Nq <= Nk``
        (queries are the last ``Nq`` positions, bottom-right aligned, so a KV
        prefix ``Nk - Nq`` of any length is supported).
    block_size : int
        Prism's tile size; also FlexAttention's query and key block size.
    causal : bool

    Returns
    -------
    torch.nn.attention.flex_attention.BlockMask
        With ``BLOCK_SIZE = (block_size, block_size)`` and sequence lengths
        ``(num_queries, num_keys)``. Its ``mask_mod`` reads ``mask`` (kept on
        ``mask``'s device; build q, k, v on the same device).

    Raises
    ------
    TypeError, ValueError
        On a mask of the wrong type or shape for these lengths.

    Examples
    --------
    >>> import torch
    >>> from prism.reference import select_blocks
    >>> q, k = torch.randn(1, 2, 100, 32), torch.randn(1, 2, 150, 32)
    >>> bm = to_block_mask(select_blocks(q, k, block_size=32), 100, 150, block_size=32)
    >>> bm.shape
    (1, 2, 100, 150)
    """
    from torch.nn.attention.flex_attention import BlockMask

    validate_block_size(block_size)
    for name, value in (("num_queries", num_queries), ("num_keys", num_keys)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    if causal and num_queries > num_keys:
        raise ValueError(
            f"causal masks need num_queries <= num_keys, got {num_queries} > {num_keys}"
        )
    layout = tile_layout(num_queries, num_keys, block_size, causal)
    dense = _dense_tile_mask(mask, layout.num_key_tiles)
    expected = (layout.num_query_tiles, layout.num_key_tiles)
    if dense.dim() != 4 or tuple(dense.shape[-2:]) != expected:
        raise ValueError(
            f"mask must be (B, H, {expected[0]}, {expected[1]}) for {num_queries} queries, "
            f"{num_keys} keys and block_size {block_size}, got {tuple(dense.shape)}"
        )
    device = dense.device
    bs = block_size
    prefix = layout.query_start
    first = layout.first_query_tile

    # Flex query block t covers query rows [t*bs, (t+1)*bs): Prism rows lo[t]..hi[t].
    n_flex = -(-num_queries // bs)
    block_rows = torch.arange(n_flex, device=device)
    row_first = block_rows * bs
    row_last = torch.clamp(row_first + bs, max=num_queries) - 1
    lo = (prefix + row_first) // bs - first
    hi = (prefix + row_last) // bs - first
    listed = dense[:, :, lo] | dense[:, :, hi]  # (B, H, n_flex, nk)
    # "Full" blocks: both Prism rows select the tile, the key tile is complete,
    # and (causal) its last key precedes the block's first query position.
    key_tiles = torch.arange(layout.num_key_tiles, device=device)
    complete = (key_tiles + 1) * bs <= num_keys
    full = dense[:, :, lo] & dense[:, :, hi] & complete
    if causal:
        below = (key_tiles[None, :] + 1) * bs - 1 <= (prefix + row_first)[:, None]
        full = full & below
    partial = listed & ~full

    # FlexAttention reads only the first ``num`` entries of each index row, so
    # mask_to_indices' -1 padding is never used as a block index.
    kv_num, kv_idx = mask_to_indices(partial)
    full_num, full_idx = mask_to_indices(full)
    b_dim, h_dim = dense.shape[0], dense.shape[1]

    def prism_mask_mod(b, h, q_idx, kv_idx):
        tile_row = (q_idx + prefix) // bs - first
        keep = dense[b if b_dim > 1 else 0, h if h_dim > 1 else 0, tile_row, kv_idx // bs]
        if causal:
            keep = keep & (kv_idx <= q_idx + prefix)
        return keep

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bs, bs), mask_mod=prism_mask_mod,
        seq_lengths=(num_queries, num_keys),
    )


__all__ = ["to_block_mask"]
