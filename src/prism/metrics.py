"""What a tile selection keeps: density and attention recall, one definition each.

Shared by :mod:`prism.theory` (synthetic heads), :mod:`prism.evaluation` (a
real model) and the transformers integration's statistics, so that the same
name always means the same number.

Definitions, for a tile mask on the grid of :func:`prism.reference.tile_layout`:

* **density** of one (batch, query head): the selected *admissible* tile pairs
  over the admissible ones (contract §6's admissible set: ``j <= i`` on the
  absolute grid when causal, every pair otherwise). 1 is dense attention.
  :func:`tile_counts` gives the two counts, :func:`tile_density` their ratio
  per head, and :func:`selection_density` the ratio of the sums over several
  masks (e.g. all layers), which weighs every tile pair equally.
* **query-tile mass** ``M[b, h, i, j]``: the full-attention softmax mass that
  the queries of query tile ``i`` put on the keys of key tile ``j``, summed over
  those queries (:func:`query_tile_mass`). Each row sums to the number of
  queries in its tile.
* **attention recall** of one (batch, query head): the full-attention mass
  that falls on the selected tiles, averaged over queries,
  ``sum_ij mask[i, j] M[i, j] / Nq`` (:func:`recall_from_mass`). 1 means the
  selection loses nothing. Every query counts equally, so the mean over heads
  of the per-head recall is the recall of all queries of all heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from prism.reference.scoring import admissible_tiles
from prism.reference.tiles import TileLayout, tile_layout
from prism.reference.validation import validate_block_size, validate_qk

__all__ = [
    "tile_counts",
    "tile_density",
    "selection_density",
    "query_tile_mass",
    "recall_from_mass",
]

# Score elements (B x Hq x rows x keys) computed per chunk of query rows.
_CHUNK_ELEMENTS = 2**25


def _check_mask(block_mask, layout: TileLayout) -> None:
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
    expected = (layout.num_query_tiles, layout.num_key_tiles)
    if block_mask.dim() != 4 or tuple(block_mask.shape[2:]) != expected:
        raise ValueError(
            f"block_mask must be a (B, Hq, {expected[0]}, {expected[1]}) tile mask for "
            f"{layout.num_queries} queries, {layout.num_keys} keys and block_size "
            f"{layout.block_size}, got shape {tuple(block_mask.shape)}"
        )


def tile_counts(block_mask: torch.Tensor, layout: TileLayout,
                causal: bool = True) -> tuple[torch.Tensor, int]:
    """Selected admissible tile pairs per (batch, head), and admissible pairs per head.

    Parameters
    ----------
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
    layout : TileLayout
        The grid the mask was selected on.
    causal : bool

    Returns
    -------
    selected : Tensor (B, Hq), int64
        Stays on the mask's device (no host synchronisation).
    admissible : int
        The same for every head.
    """
    _check_mask(block_mask, layout)
    admissible = admissible_tiles(layout, causal, block_mask.device)
    selected = (block_mask.bool() & admissible).sum(dim=(-2, -1))
    if causal:
        n_admissible = _causal_admissible_count(layout)
    else:
        n_admissible = layout.num_query_tiles * layout.num_key_tiles
    return selected, n_admissible


def _causal_admissible_count(layout: TileLayout) -> int:
    """``sum_i min(first + i + 1, nk)``: admissible pairs of a causal grid, on the host."""
    first, nq, nk = layout.first_query_tile, layout.num_query_tiles, layout.num_key_tiles
    return sum(min(first + i + 1, nk) for i in range(nq))


def tile_density(block_mask: torch.Tensor, layout: TileLayout,
                 causal: bool = True) -> torch.Tensor:
    """Density of each (batch, head): selected admissible pairs over admissible pairs.

    Returns
    -------
    Tensor (B, Hq), float64
        1 is dense attention (every admissible tile computed).

    Examples
    --------
    >>> import torch
    >>> from prism.reference import tile_layout
    >>> layout = tile_layout(4, 4, 2, causal=True)   # 2 x 2 tiles, 3 admissible
    >>> tile_density(torch.ones(1, 1, 2, 2, dtype=torch.bool), layout)
    tensor([[1.]], dtype=torch.float64)
    >>> tile_density(torch.eye(2, dtype=torch.bool)[None, None], layout).item()
    0.6666666666666666
    """
    selected, admissible = tile_counts(block_mask, layout, causal)
    if admissible == 0:
        raise ValueError("no admissible tile pairs: the mask has no query or no key tile")
    return selected.double() / admissible


def selection_density(masks: Sequence[torch.Tensor], layouts: Sequence[TileLayout],
                      causal: bool = True) -> float:
    """Selected / admissible tile pairs summed over several masks (e.g. all layers).

    Each tile pair weighs the same, so layers with more tiles weigh more;
    with equal shapes this is the mean of :func:`tile_density` over masks,
    batch rows and heads.
    """
    selected = admissible = 0
    for mask, layout in zip(masks, layouts, strict=True):
        count, per_head = tile_counts(mask, layout, causal)
        selected += int(count.sum())
        admissible += per_head * count.numel()
    if admissible == 0:
        raise ValueError("no admissible tile pairs: the masks are empty")
    return selected / admissible


def query_tile_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, *, causal: bool = True,
                    scale: float | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Full-attention mass per (query tile, key tile), summed over each tile's queries.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
        Query head ``h`` reads KV head ``h // (Hq // Hkv)``. When causal,
        query row ``r`` sits at position ``Nk - Nq + r`` and reads keys
        ``n <= Nk - Nq + r``.
    block_size : int
    causal : bool
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    dtype : torch.dtype
        Arithmetic and result dtype: float32 for speed on a real model,
        float64 for the theory's checks.

    Returns
    -------
    Tensor (B, Hq, n_query_tiles, n_key_tiles) of ``dtype``
        Entry ``[b, h, i, j]`` is the sum, over the queries of tile ``i``, of
        the softmax probability that falls on the keys of tile ``j``. Each row
        sums to the number of queries in its tile.

    Notes
    -----
    Query rows go in chunks that end on tile boundaries and, when causal,
    read only the keys they may see; the exponentials are taken in place,
    and the softmax normalisation divides the per-tile sums instead of every
    score.
    """
    validate_qk(q, k, causal=causal)
    validate_block_size(block_size)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    layout = tile_layout(nq, nk, block_size, causal)
    mass = torch.zeros(b, hq, layout.num_query_tiles, layout.num_key_tiles, dtype=dtype,
                       device=q.device)
    if nq == 0 or nk == 0:
        return mass
    kf = k.to(dtype).unsqueeze(2)  # (B, Hkv, 1, Nk, D): shared by the group, never repeated
    rows_per_chunk = max(block_size, _CHUNK_ELEMENTS // max(1, b * hq * nk))
    rows_per_chunk -= rows_per_chunk % block_size
    r0 = 0
    while r0 < nq:
        tile_end = (layout.query_start + r0) // block_size + rows_per_chunk // block_size
        r1 = min(nq, tile_end * block_size - layout.query_start)
        first_pos = layout.query_start + r0
        last_pos = layout.query_start + r1  # one past the chunk's last query position
        key_stop = last_pos if causal else nk
        n_rows = r1 - r0
        qf = (q[:, :, r0:r1].to(dtype) * scale).reshape(b, hkv, group, n_rows, d)
        scores = torch.matmul(qf, kf[:, :, :, :key_stop].transpose(-1, -2))
        if causal:
            # Only keys at or after the chunk's first position can lie in the future.
            future = (torch.arange(first_pos, key_stop, device=q.device)[None, :]
                      > torch.arange(first_pos, last_pos, device=q.device)[:, None])
            scores[..., first_pos:key_stop].masked_fill_(future, float("-inf"))
        scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
        full_tiles = key_stop // block_size
        per_tile = scores[..., : full_tiles * block_size].reshape(
            b, hkv, group, n_rows, full_tiles, block_size).sum(dim=-1)
        if key_stop > full_tiles * block_size:
            tail = scores[..., full_tiles * block_size :].sum(dim=-1, keepdim=True)
            per_tile = torch.cat([per_tile, tail], dim=-1)
        per_tile = per_tile / per_tile.sum(dim=-1, keepdim=True)
        per_tile = per_tile.reshape(b, hq, n_rows, per_tile.shape[-1])
        rows = torch.arange(first_pos, last_pos, device=q.device) // block_size
        mass[:, :, :, : per_tile.shape[-1]].index_add_(2, rows - layout.first_query_tile,
                                                       per_tile)
        r0 = r1
    return mass


def recall_from_mass(block_mask: torch.Tensor, mass: torch.Tensor,
                     num_queries: int) -> torch.Tensor:
    """Attention recall of each (batch, head): kept full-attention mass, averaged over queries.

    Parameters
    ----------
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
        Batch and head dims may be 1 to broadcast.
    mass : Tensor (B, Hq, n_query_tiles, n_key_tiles)
        From :func:`query_tile_mass` on the same queries, keys and tile size.
    num_queries : int
        ``Nq``.

    Returns
    -------
    Tensor (B, Hq), float64, in [0, 1]
        1 when the mask keeps every tile that carries mass. ``.mean()`` is
        the recall over all queries of all heads.
    """
    if not isinstance(block_mask, torch.Tensor) or not isinstance(mass, torch.Tensor):
        raise TypeError("block_mask and mass must be tensors")
    if block_mask.shape[-2:] != mass.shape[-2:]:
        raise ValueError(
            f"mask tiles {tuple(block_mask.shape[-2:])} do not match mass tiles "
            f"{tuple(mass.shape[-2:])}; build both with the same block_size"
        )
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
        raise ValueError(f"num_queries must be a positive int, got {num_queries!r}")
    kept = (mass.double() * block_mask.expand_as(mass)).sum(dim=(-2, -1))
    return kept / num_queries
