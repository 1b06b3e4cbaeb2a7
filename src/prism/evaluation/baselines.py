"""Plain mean pooling: the block-selection baseline Prism is compared with.

Plain mean pooling scores every (query tile, key tile) pair with ONE softmax
over all head dims of the mean-pooled vectors,

    s[i, j] = (qbar[i] . kbar[j]) / sqrt(D),

keeps tiles by top-p over the admissible tiles of each row (the same rule and
tie-break as Prism, contract §6), and forces the sink and diagonal tiles. It is
Prism without bands and without energy calibration, built from the same
:mod:`prism.reference` stages, so a comparison isolates what the bands add.

:func:`tune_threshold` finds the top-p threshold at which mean pooling keeps as
many tiles as Prism, so the two can be compared at matched density.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# The density is the one of prism.metrics (re-exported here for the threshold search).
from prism.metrics import selection_density

# The baseline itself lives in the reference, shared with prism.theory.
from prism.reference.mean_pooling import check_threshold as _check_threshold
from prism.reference.mean_pooling import (
    mean_pooling_from_pooled,
    mean_pooling_probabilities,
    mean_pooling_select,
)
from prism.reference.mean_pooling import (
    select_from_probabilities as _select_from_probabilities,
)
from prism.reference.tiles import TileLayout


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
