"""Contract §3: one absolute tile grid, and mean pooling over the valid tokens of a tile.

Causal inputs place query row ``r`` at absolute position ``Nk - Nq + r``
(bottom-right alignment, as in chunked prefill after a KV prefix). Every
position ``p`` lies in tile ``p // block_size`` for queries and keys alike, so
query tile ``i`` and key tile ``i`` always cover the same positions, even when
the prefix ``Nk - Nq`` is not a multiple of the tile size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .validation import check_position, check_tensor, validate_block_size


@dataclass(frozen=True)
class TileLayout:
    """Where the query and key tiles sit on the absolute grid.

    Attributes
    ----------
    block_size : int
    num_queries, num_keys : int
        ``Nq`` and ``Nk``.
    query_start : int
        Absolute position of query row 0: ``Nk - Nq`` when causal, else 0.
    first_query_tile : int
        Absolute index of the first tile that holds a query.
    num_query_tiles, num_key_tiles : int
        Rows and columns of every per-tile output.
    """

    block_size: int
    num_queries: int
    num_keys: int
    query_start: int
    first_query_tile: int
    num_query_tiles: int
    num_key_tiles: int

    def query_tile_indices(self, device=None) -> torch.Tensor:
        """Absolute tile index of each query-tile row, shape (num_query_tiles,)."""
        return torch.arange(
            self.first_query_tile, self.first_query_tile + self.num_query_tiles, device=device
        )


def tile_layout(num_queries: int, num_keys: int, block_size: int, causal: bool) -> TileLayout:
    """Lay the queries and keys on the absolute tile grid (contract §2 and §3).

    >>> tile_layout(num_queries=100, num_keys=300, block_size=128, causal=True)
    TileLayout(block_size=128, num_queries=100, num_keys=300, query_start=200, first_query_tile=1, num_query_tiles=2, num_key_tiles=3)
    """  # noqa: E501
    validate_block_size(block_size)
    query_start = num_keys - num_queries if causal else 0
    first = query_start // block_size
    if num_queries == 0:
        n_query_tiles = 0
    else:
        n_query_tiles = (query_start + num_queries - 1) // block_size - first + 1
    n_key_tiles = -(-num_keys // block_size)
    return TileLayout(
        block_size=block_size,
        num_queries=num_queries,
        num_keys=num_keys,
        query_start=query_start,
        first_query_tile=first,
        num_query_tiles=n_query_tiles,
        num_key_tiles=n_key_tiles,
    )


def tile_token_counts(start: int, length: int, block_size: int) -> torch.Tensor:
    """Valid tokens in each tile touched by positions ``start .. start+length-1``.

    Returns an int64 tensor with one entry per tile, from tile
    ``start // block_size`` to the tile that holds the last position.
    """
    validate_block_size(block_size)
    if length == 0:
        return torch.zeros(0, dtype=torch.int64)
    first = start // block_size
    last = (start + length - 1) // block_size
    tile_starts = torch.arange(first, last + 1) * block_size
    lo = torch.clamp(tile_starts, min=start)
    hi = torch.clamp(tile_starts + block_size, max=start + length)
    return hi - lo


def pool_tiles(x: torch.Tensor, start: int, block_size: int) -> torch.Tensor:
    """Mean of each tile's valid tokens, accumulated and returned in fp32 (contract §3).

    Parameters
    ----------
    x : Tensor (B, H, N, D)
        Row ``r`` sits at absolute position ``start + r``.
    start : int
        Absolute position of row 0.
    block_size : int

    Returns
    -------
    Tensor (B, H, n_tiles, D), float32
        Tile ``t`` of the output is absolute tile ``start // block_size + t``.
        Partial tiles (at either end) are averaged over the tokens they hold,
        never diluted by padding.

    Raises
    ------
    ValueError, TypeError
        If ``x`` is not a floating-point tensor of rank 4, ``start`` not an int ``>= 0``
        or ``block_size`` not an int ``>= 1`` (contract §8).
    """
    check_tensor("x", x, any_float=True)
    check_position(start, "start")
    validate_block_size(block_size)
    b, h, n, d = x.shape
    host_counts = tile_token_counts(start, n, block_size)
    counts = host_counts.to(x.device)
    n_tiles = counts.numel()
    lead = start % block_size
    if n == 0:
        return torch.zeros(b, h, 0, d, dtype=torch.float32, device=x.device)
    if block_size > n:
        # Tiles longer than the data (two tiles at most): sum each tile's rows
        # directly, so memory follows the data, not block_size.
        ends = torch.cumsum(host_counts, 0).tolist()  # on the host (meta tensors too)
        starts = [0] + ends[:-1]
        pieces = [x[:, :, lo:hi].float().sum(dim=2) for lo, hi in zip(starts, ends, strict=True)]
        sums = torch.stack(pieces, dim=2)
    else:
        # Lay the tokens into a zero-filled grid of whole tiles so one reshape
        # sums each tile; the zeros add nothing and the division uses the true
        # counts.
        grid = torch.zeros(b, h, n_tiles * block_size, d, dtype=torch.float32,
                           device=x.device)
        grid[:, :, lead : lead + n] = x.float()
        sums = grid.view(b, h, n_tiles, block_size, d).sum(dim=3)
    return sums / counts.view(1, 1, n_tiles, 1).to(torch.float32)
