"""What a tile selection keeps of full attention: dense weights, per-tile mass, recall, density.

Float64 helpers over small heads, used by :mod:`prism.theory.blind_spot` and
the docs. *Recall* is the softmax mass of full attention that falls on the
selected tiles, averaged over queries (:mod:`prism.metrics`); *density* is the
share of causally admissible tiles selected.
"""

from __future__ import annotations

import math

import torch

from prism.metrics import query_tile_mass, recall_from_mass, tile_density
from prism.reference import tile_layout
from prism.reference.validation import validate_block_mask, validate_qk

from ._args import check_int, check_real
from .frequency import validate_block_size


def full_attention_probabilities(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True,
                                 scale: float | None = None) -> torch.Tensor:
    """Dense softmax attention weights in float64 (memory ``B * Hq * Nq * Nk * 8`` bytes).

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    causal : bool
        Query row ``r`` sits at position ``Nk - Nq + r`` and reads keys ``n <= p``.
    scale : float, optional
        Default ``1 / sqrt(D)``.

    Returns
    -------
    Tensor (B, Hq, Nq, Nk), float64
        Each row sums to 1 (rows with no admissible key are all zero).
    """
    validate_qk(q, k, causal=causal)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else check_real("scale", scale, positive=True)
    qf = q.double().reshape(b, hkv, hq // hkv, nq, d)
    scores = (qf @ k.double().unsqueeze(2).transpose(-1, -2)).reshape(b, hq, nq, nk) * scale
    if causal:
        positions = torch.arange(nk - nq, nk, device=q.device)
        allowed = torch.arange(nk, device=q.device)[None, :] <= positions[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def tile_attention_mass(probabilities: torch.Tensor, *, block_size: int = 128,
                        causal: bool = True) -> torch.Tensor:
    """Per query row, the full-attention mass that falls in each key tile.

    Summing once per key tile lets many tile selections be scored against the
    same attention matrix at the cost of a gather each. This keeps one row per
    query (for per-query analysis, :func:`kept_attention_mass`); summed over the
    rows of each query tile it is :func:`prism.metrics.query_tile_mass`, from
    which the recall of :mod:`prism.metrics` is computed.

    Parameters
    ----------
    probabilities : Tensor (B, Hq, Nq, Nk)
        From :func:`full_attention_probabilities`.
    block_size : int
    causal : bool
        When causal, keys after the query (``n > p``) are left out even if
        ``probabilities`` holds mass there.

    Returns
    -------
    Tensor (B, Hq, Nq, n_key_tiles), float64
    """
    if not isinstance(probabilities, torch.Tensor) or probabilities.dim() != 4:
        raise TypeError("probabilities must be a (B, Hq, Nq, Nk) tensor from "
                        "full_attention_probabilities")
    block_size = validate_block_size(block_size)
    b, h, nq, nk = probabilities.shape
    n_key_tiles = -(-nk // block_size)
    weights = probabilities.double()
    if causal:
        positions = torch.arange(nk - nq, nk, device=weights.device)
        allowed = torch.arange(nk, device=weights.device)[None, :] <= positions[:, None]
        weights = weights * allowed
    padded = torch.zeros(b, h, nq, n_key_tiles * block_size, dtype=torch.float64,
                         device=weights.device)
    padded[..., :nk] = weights
    return padded.view(b, h, nq, n_key_tiles, block_size).sum(dim=-1)


def kept_attention_mass(probabilities: torch.Tensor, block_mask: torch.Tensor, *,
                        block_size: int = 128, causal: bool = True) -> torch.Tensor:
    """Per query, the full-attention mass that falls on its selected tiles.

    Query ``p`` keeps key ``n`` iff ``tile(n)`` is selected for ``tile(p)``
    and, when causal, ``n <= p`` (contract §7).

    Parameters
    ----------
    probabilities : Tensor (B, Hq, Nq, Nk)
        From :func:`full_attention_probabilities`.
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
        Tile selection on the contract §3 grid; batch and head dims may be 1.
    block_size : int
    causal : bool

    Returns
    -------
    Tensor (B, Hq, Nq), float64
    """
    tile_mass = tile_attention_mass(probabilities, block_size=block_size, causal=causal)
    nq, nk = probabilities.shape[2], probabilities.shape[3]
    layout = tile_layout(nq, nk, block_size, causal)
    validate_block_mask(block_mask, probabilities,
                        (layout.num_query_tiles, layout.num_key_tiles))
    positions = layout.query_start + torch.arange(nq, device=tile_mass.device)
    rows = positions // block_size - layout.first_query_tile
    selected = block_mask[:, :, rows].to(torch.float64)  # (B', H', Nq, n_key_tiles)
    return (tile_mass * selected).sum(dim=-1)


def attention_recall(q: torch.Tensor, k: torch.Tensor, block_mask: torch.Tensor, *,
                     block_size: int = 128, causal: bool = True,
                     scale: float | None = None) -> torch.Tensor:
    """Full-attention mass kept by a tile selection, averaged over queries.

    The attention recall of :mod:`prism.metrics`, computed in float64 from
    ``q`` and ``k``: :func:`prism.metrics.query_tile_mass`, then
    :func:`prism.metrics.recall_from_mass`.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
    block_size : int
    causal : bool
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.

    Returns
    -------
    Tensor (B, Hq), float64
        1 means the selection loses nothing; each query counts equally.
    """
    block_size = validate_block_size(block_size)
    if scale is not None:
        scale = check_real("scale", scale, positive=True)
    layout = tile_layout(q.shape[2], k.shape[2], block_size, causal)
    validate_block_mask(block_mask, q, (layout.num_query_tiles, layout.num_key_tiles))
    mass = query_tile_mass(q, k, block_size, causal=causal, scale=scale, dtype=torch.float64)
    return recall_from_mass(block_mask, mass, q.shape[2])


def causal_density(block_mask: torch.Tensor, *, num_queries: int, num_keys: int,
                   block_size: int = 128, causal: bool = True) -> torch.Tensor:
    """Selected admissible tiles over admissible tiles: :func:`prism.metrics.tile_density`.

    Parameters
    ----------
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
    num_queries, num_keys : int
        ``Nq`` and ``Nk`` of the selection.
    block_size : int
    causal : bool

    Returns
    -------
    Tensor (B, Hq), float64
        1 is dense attention (every admissible tile computed).
    """
    num_queries = check_int("num_queries", num_queries, 1)
    num_keys = check_int("num_keys", num_keys, 1)
    block_size = validate_block_size(block_size)
    return tile_density(block_mask, tile_layout(num_queries, num_keys, block_size, causal), causal)
