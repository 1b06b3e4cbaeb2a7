"""Compact (FlexAttention-style) form of a tile mask."""

from __future__ import annotations

import torch

from .validation import validate_compact_indices


def mask_to_indices(block_mask: torch.Tensor):
    """Per row, the number of selected key tiles and their indices in ascending order.

    Parameters
    ----------
    block_mask : Tensor (..., nq, nk), bool

    Returns
    -------
    kv_num_blocks : Tensor (..., nq), int32
    kv_indices : Tensor (..., nq, nk), int32
        The first ``kv_num_blocks[..., i]`` entries of row ``i`` are the
        selected key tiles, ascending; the rest are -1. The dense mask is
        rebuilt by::

            mask = zeros(..., nq, nk, dtype=bool)
            for i in range(nq):
                for t in range(kv_num_blocks[..., i]):
                    mask[..., i, kv_indices[..., i, t]] = True

    >>> import torch
    >>> m = torch.tensor([[True, False, True], [False, True, False]])
    >>> num, idx = mask_to_indices(m)
    >>> num.tolist(), idx.tolist()
    ([2, 1], [[0, 2, -1], [1, -1, -1]])
    """
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise TypeError(
            "block_mask must be a bool tensor (..., n_query_tiles, n_key_tiles), got "
            f"{type(block_mask).__name__}"
            + (f" of dtype {block_mask.dtype}" if isinstance(block_mask, torch.Tensor) else "")
        )
    if block_mask.dim() < 2:
        raise ValueError(
            f"block_mask needs at least 2 dims (n_query_tiles, n_key_tiles), got shape "
            f"{tuple(block_mask.shape)}"
        )
    nk = block_mask.shape[-1]
    columns = torch.arange(nk, device=block_mask.device)
    # Selected tiles sort by their index; unselected ones go after all of them.
    keys = torch.where(block_mask, columns, columns + nk)
    order = torch.argsort(keys, dim=-1)
    num = block_mask.sum(dim=-1)
    filled = columns < num.unsqueeze(-1)
    indices = torch.where(filled, order, torch.full_like(order, -1))
    return num.to(torch.int32), indices.to(torch.int32)


def indices_to_mask(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                    num_key_tiles: int) -> torch.Tensor:
    """Rebuild the bool mask (..., nq, num_key_tiles) from its compact form.

    Parameters
    ----------
    kv_num_blocks : Tensor (..., nq), integer
        Selected key tiles per row, each in ``[0, slots]``.
    kv_indices : Tensor (..., nq, slots), integer
        The first ``kv_num_blocks[..., i]`` entries of row ``i`` are key tiles
        in ``[0, num_key_tiles)``; the entries after them are not read.
    num_key_tiles : int

    Raises
    ------
    ValueError, TypeError
        On a count or an index out of range, mismatched shapes, devices or
        non-integer tensors (contract §8), before building anything.

    >>> import torch
    >>> num, idx = torch.tensor([2, 1]), torch.tensor([[0, 2, -1], [1, -1, -1]])
    >>> indices_to_mask(num, idx, 3).tolist()
    [[True, False, True], [False, True, False]]
    """
    validate_compact_indices(kv_num_blocks, kv_indices, num_key_tiles)
    nk_stored = kv_indices.shape[-1]
    slots = torch.arange(nk_stored, device=kv_indices.device)
    valid = slots < kv_num_blocks.unsqueeze(-1).long()
    mask = torch.zeros(*kv_indices.shape[:-1], num_key_tiles + 1, dtype=torch.bool,
                       device=kv_indices.device)
    # Padding slots write into a spare last column, which is dropped.
    target = torch.where(valid, kv_indices.long(), torch.full_like(kv_indices.long(),
                                                                    num_key_tiles))
    mask.scatter_(-1, target, True)
    return mask[..., :num_key_tiles]
