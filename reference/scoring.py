"""Contract §6, first half: band logits, the admissible set, and band probabilities."""

from __future__ import annotations

import math

import torch

from .tiles import TileLayout


def band_logits(
    q_pooled: torch.Tensor,
    k_pooled: torch.Tensor,
    dims: torch.Tensor,
    tau: torch.Tensor,
) -> torch.Tensor:
    """Scaled pooled scores of one band: ``(qbar_b . kbar_b) / (sqrt(d_b) * tau_b)``.

    Parameters
    ----------
    q_pooled : Tensor (B, Hq, nq, D), float32
    k_pooled : Tensor (B, Hkv, nk, D), float32
        Query head ``h`` reads KV head ``h // (Hq // Hkv)``; K is broadcast,
        never repeated.
    dims : Tensor (d_b,)
    tau : Tensor (B, Hq)

    Returns
    -------
    Tensor (B, Hq, nq, nk), float32
    """
    b, hq, nq, _ = q_pooled.shape
    hkv, nk = k_pooled.shape[1], k_pooled.shape[2]
    group = hq // hkv
    q_band = q_pooled[..., dims].reshape(b, hkv, group, nq, dims.numel())
    k_band = k_pooled[..., dims].unsqueeze(2)  # (B, Hkv, 1, nk, d_b)
    scores = torch.matmul(q_band, k_band.transpose(-1, -2)).reshape(b, hq, nq, nk)
    return scores / (math.sqrt(dims.numel()) * tau[:, :, None, None])


def admissible_tiles(layout: TileLayout, causal: bool, device=None) -> torch.Tensor:
    """Tile pairs that may be selected, shape (nq, nk) bool.

    Causal: key tile ``j`` is admissible for query tile ``i`` iff ``j <= i``
    on the absolute grid. Non-causal: every pair.
    """
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    if not causal:
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    query_tiles = layout.query_tile_indices(device)
    key_tiles = torch.arange(nk, device=device)
    return key_tiles[None, :] <= query_tiles[:, None]


def band_probabilities(logits: torch.Tensor, admissible: torch.Tensor) -> torch.Tensor:
    """Softmax of each row over its admissible key tiles, in fp32.

    Inadmissible entries get probability 0; a row with no admissible tile is
    all zeros.
    """
    masked = logits.float().masked_fill(~admissible, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)
