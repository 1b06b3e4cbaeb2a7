"""Plain mean pooling: the block-selection baseline Prism is compared with.

Plain mean pooling scores every (query tile, key tile) pair with ONE softmax
over all head dims of the mean-pooled vectors,

    s[i, j] = (qbar[i] . kbar[j]) / sqrt(D),

keeps tiles by top-p over the admissible tiles of each row (the same rule and
tie-break as Prism, SPEC 6), and forces the sink and diagonal tiles. It is
Prism without bands and without energy calibration, built from the same
:mod:`prism.reference` stages, so a comparison isolates what the bands add.

:func:`tune_threshold` finds the top-p threshold at which mean pooling keeps as
many tiles as Prism, so the two can be compared at matched density.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from prism.reference.scoring import admissible_tiles, band_logits, band_probabilities
from prism.reference.select import forced_tiles
from prism.reference.tiles import TileLayout, pool_tiles, tile_layout
from prism.reference.topp import top_p_select
from prism.reference.validation import validate_block_size, validate_qk


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float in (0, 1], got {type(threshold).__name__}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    return float(threshold)


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


def _select_from_probabilities(probs, admissible, layout, threshold, causal, force_sink,
                               force_diagonal) -> torch.Tensor:
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
    threshold = _check_threshold(threshold)
    probs, admissible = mean_pooling_probabilities(q_pooled, k_pooled, layout, causal)
    return _select_from_probabilities(probs, admissible, layout, threshold, causal, force_sink,
                                      force_diagonal)


def mean_pooling_select(q, k, threshold: float = 0.95, *, block_size: int = 128,
                        causal: bool = True, force_sink: bool = True,
                        force_diagonal: bool = True) -> torch.Tensor:
    """Plain mean-pooling block selection (the baseline of the Prism paper).

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
        After RoPE, un-repeated; positions and tiles as in SPEC 2 and 3.
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
    threshold = _check_threshold(threshold)
    layout = tile_layout(q.shape[2], k.shape[2], block_size, causal)
    q_pooled = pool_tiles(q, layout.query_start, block_size)
    k_pooled = pool_tiles(k, 0, block_size)
    return mean_pooling_from_pooled(q_pooled, k_pooled, layout, threshold, causal=causal,
                                    force_sink=force_sink, force_diagonal=force_diagonal)


class MeanPoolingSelector:
    """Plain mean pooling as a ``selector`` for :func:`prism.integrations.transformers.register`.

    Called as ``selector(q, k, config, causal=True)``; takes the tile size and
    forced tiles from ``config`` and its own top-p ``threshold``.
    """

    def __init__(self, threshold: float):
        self.threshold = _check_threshold(threshold)

    def __repr__(self) -> str:
        return f"MeanPoolingSelector(threshold={self.threshold:.6g})"

    def __call__(self, q, k, config, causal: bool = True) -> torch.Tensor:
        return mean_pooling_select(q, k, self.threshold, block_size=config.block_size,
                                   causal=causal, force_sink=config.force_sink,
                                   force_diagonal=config.force_diagonal)


def selection_density(masks: Sequence[torch.Tensor], layouts: Sequence[TileLayout],
                      causal: bool = True) -> float:
    """Selected / admissible tile pairs over several masks (e.g. all layers)."""
    selected = admissible = 0
    for mask, layout in zip(masks, layouts, strict=True):
        allowed = admissible_tiles(layout, causal, mask.device)
        selected += int((mask & allowed).sum())
        admissible += int(allowed.sum()) * mask.shape[0] * mask.shape[1]
    if admissible == 0:
        raise ValueError("no admissible tile pairs: the masks are empty")
    return selected / admissible


def tune_threshold(pooled: Sequence[tuple[torch.Tensor, torch.Tensor, TileLayout]],
                   target_density: float, *, causal: bool = True, force_sink: bool = True,
                   force_diagonal: bool = True, iterations: int = 30) -> tuple[float, float]:
    """Bisect the mean-pooling threshold whose density matches ``target_density``.

    Density grows with the threshold (a larger top-p mass keeps a superset of
    tiles), so bisection on ``(0, 1]`` converges to the smallest threshold that
    reaches the target; the threshold returned is whichever of the two final
    brackets lands closer to the target.

    Parameters
    ----------
    pooled : sequence of (q_pooled, k_pooled, layout)
        Pooled tiles of the calibration data, e.g. one entry per layer.
    target_density : float in (0, 1]
        Selected / admissible tile pairs to reach, over all entries.
    causal, force_sink, force_diagonal : bool
    iterations : int
        Bisection steps (30 resolve the threshold to about 1e-9).

    Returns
    -------
    (threshold, density) : (float, float)
    """
    if not 0.0 < target_density <= 1.0 or math.isnan(target_density):
        raise ValueError(f"target_density must lie in (0, 1], got {target_density}")
    if not pooled:
        raise ValueError("pooled must hold at least one (q_pooled, k_pooled, layout) entry")
    layouts = [layout for _, _, layout in pooled]
    # The probabilities do not depend on the threshold: compute them once.
    tables = [(*mean_pooling_probabilities(qp, kp, layout, causal), layout)
              for qp, kp, layout in pooled]

    def density_at(threshold: float) -> float:
        masks = [_select_from_probabilities(probs, admissible, layout, threshold, causal,
                                            force_sink, force_diagonal)
                 for probs, admissible, layout in tables]
        return selection_density(masks, layouts, causal)

    low, high = 0.0, 1.0
    low_density, high_density = density_at(1e-9), density_at(1.0)
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        density = density_at(middle)
        if density < target_density:
            low, low_density = middle, density
        else:
            high, high_density = middle, density
    low = max(low, 1e-9)
    if abs(low_density - target_density) < abs(high_density - target_density):
        return low, low_density
    return high, high_density


__all__ = [
    "MeanPoolingSelector",
    "mean_pooling_from_pooled",
    "mean_pooling_probabilities",
    "mean_pooling_select",
    "selection_density",
    "tune_threshold",
]
