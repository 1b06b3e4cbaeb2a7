"""Plain mean pooling: the single-band baseline that Prism is measured against.

It scores every (query tile, key tile) pair with ONE softmax over all head
dims of the mean-pooled vectors,

    s[i, j] = (qbar[i] . kbar[j]) / sqrt(D),

keeps tiles by the top-p rule and tie-break of contract §6, and forces the sink
and diagonal tiles. It is Prism without bands and without energy
calibration, built from the same stages, so a comparison isolates what the
bands add. The theory pages, the tutorials and ``prism eval`` all use this
one implementation.
"""

from __future__ import annotations

import torch

from .scoring import admissible_tiles, band_logits, band_probabilities
from .select import forced_tiles
from .tiles import TileLayout, pool_tiles, tile_layout
from .topp import top_p_select
from .validation import check_threshold, validate_block_size, validate_qk


def mean_pooling_probabilities(q_pooled: torch.Tensor, k_pooled: torch.Tensor,
                               layout: TileLayout, causal: bool = True):
    """Softmax over admissible key tiles of ``(qbar . kbar) / sqrt(D)``, per query tile.

    Parameters
    ----------
    q_pooled : Tensor (B, Hq, n_query_tiles, D), float32
    k_pooled : Tensor (B, Hkv, n_key_tiles, D), float32
        From :func:`prism.reference.pool_tiles` on the grid of ``layout``.
    layout : TileLayout
    causal : bool

    Returns
    -------
    probs : Tensor (B, Hq, n_query_tiles, n_key_tiles), float32
    admissible : Tensor (n_query_tiles, n_key_tiles), bool
    """
    b, hq, _, d = q_pooled.shape
    device = q_pooled.device
    all_dims = torch.arange(d, device=device)
    # band_logits over every dim with tau = 1 is exactly q.k / sqrt(D).
    unit_tau = torch.ones(b, hq, dtype=torch.float32, device=device)
    logits = band_logits(q_pooled, k_pooled, all_dims, unit_tau)
    admissible = admissible_tiles(layout, causal, device)
    return band_probabilities(logits, admissible), admissible


def select_from_probabilities(probs: torch.Tensor, admissible: torch.Tensor, layout: TileLayout,
                              threshold: float, causal: bool = True, force_sink: bool = True,
                              force_diagonal: bool = True) -> torch.Tensor:
    """Top-p over precomputed probabilities, plus the forced tiles (contract §6).

    Lets a threshold search reuse one probability table for many thresholds.

    Returns
    -------
    Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
    """
    keep, _ = top_p_select(probs, admissible, threshold)
    forced = forced_tiles(layout, causal, force_sink, force_diagonal, probs.device)
    return (keep | forced) & admissible


def mean_pooling_from_pooled(q_pooled: torch.Tensor, k_pooled: torch.Tensor, layout: TileLayout,
                             threshold: float, *, causal: bool = True, force_sink: bool = True,
                             force_diagonal: bool = True) -> torch.Tensor:
    """Plain mean-pooling selection from already pooled tiles.

    Parameters
    ----------
    q_pooled : Tensor (B, Hq, n_query_tiles, D), float32
    k_pooled : Tensor (B, Hkv, n_key_tiles, D), float32
        From :func:`prism.reference.pool_tiles` on the grid of ``layout``.
    layout : TileLayout
    threshold : float in (0, 1]
        Top-p mass kept per query tile.
    causal, force_sink, force_diagonal : bool
        As in :class:`prism.reference.PrismConfig`.

    Returns
    -------
    Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
    """
    threshold = check_threshold(threshold)
    for name, flag in (("force_sink", force_sink), ("force_diagonal", force_diagonal)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    probs, admissible = mean_pooling_probabilities(q_pooled, k_pooled, layout, causal)
    return select_from_probabilities(probs, admissible, layout, threshold, causal, force_sink,
                                     force_diagonal)


def mean_pooling_select(q, k, threshold: float = 0.95, *, block_size: int = 128,
                        causal: bool = True, force_sink: bool = True,
                        force_diagonal: bool = True) -> torch.Tensor:
    """Plain mean-pooling block selection (the baseline of the Prism paper).

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
        After RoPE, un-repeated; positions and tiles as in contract §2 and §3.
    threshold : float in (0, 1]
        Top-p mass kept per query tile over the single all-dims softmax.
    block_size : int
    causal, force_sink, force_diagonal : bool

    Returns
    -------
    Tensor (B, Hq, n_query_tiles, n_key_tiles), bool

    Examples
    --------
    >>> import torch
    >>> q, k = torch.randn(1, 2, 256, 32), torch.randn(1, 1, 256, 32)
    >>> mean_pooling_select(q, k, 0.9, block_size=64).shape
    torch.Size([1, 2, 4, 4])
    """
    validate_qk(q, k, causal=causal)
    validate_block_size(block_size)
    layout = tile_layout(q.shape[2], k.shape[2], block_size, causal)
    q_pooled = pool_tiles(q, layout.query_start, block_size)
    k_pooled = pool_tiles(k, 0, block_size)
    return mean_pooling_from_pooled(q_pooled, k_pooled, layout, threshold, causal=causal,
                                    force_sink=force_sink, force_diagonal=force_diagonal)
