"""The blind spot of mean pooling, shown on a synthetic positional head.

The head (:func:`prism.theory.synthetic_positional_head`) carries a slash on
its fastest RoPE pairs, sink and vertical tiles on its slowest, and content in
between. Mean pooling multiplies each pair's
contribution to the tile score by ``gain_m^2`` (:func:`prism.theory.score_filter_residual`),
which is small on the slash pairs beyond the cut-off ``2 pi / B``, so in one
softmax over the whole head the slash's tile drowns beside the sink and
vertical tiles. Prism scores the fast band on its own and calibrates it by its
energy (contract §5), so the remnant of the slash that survives pooling can still
rank its tile first there (at low bases, where almost every slash pair is
beyond the cut-off, it often does not, and Prism pays in density).

Everything is measured against full attention (:mod:`prism.theory.recall`):
*recall* is the softmax mass of full attention that falls on the selected
tiles, averaged over queries, and *density* is the share of causally
admissible tiles selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism.metrics import query_tile_mass, recall_from_mass
from prism.reference import select_blocks
from prism.reference.mean_pooling import mean_pooling_select

from ._args import check_threshold
from .frequency import validate_block_size
from .recall import causal_density
from .synthetic import SyntheticHead, synthetic_positional_head

DEFAULT_BLIND_SPOT_BASES = (1e4, 1e5, 5e5, 1e6)

METHOD_MEAN_POOLING = "mean pooling"
METHOD_PRISM = "prism"
#: Label of Prism run with ``calibrate=False`` (see :attr:`BlindSpotResult.label`).
LABEL_PRISM_UNCALIBRATED = "prism (calibrate=False)"


@dataclass(frozen=True)
class BlindSpotResult:
    """Recall and density of one selection method on one synthetic head.

    Attributes
    ----------
    base : float
        RoPE base of the head.
    block_size : int
    slash_offset : int
    method : str
        ``"mean pooling"`` or ``"prism"``.
    calibrate : bool or None
        Prism's contract §5 calibration; None for mean pooling.
    threshold : float
        Top-p (both bands for Prism).
    recall : float
        Mean over queries of the full-attention mass on the selected tiles.
    density : float
        Selected admissible tiles over admissible tiles.
    """

    base: float
    block_size: int
    slash_offset: int
    method: str
    calibrate: bool | None
    threshold: float
    recall: float
    density: float

    @property
    def label(self) -> str:
        """Short name of the method, e.g. ``"prism (calibrate=False)"``."""
        if self.method == METHOD_PRISM and self.calibrate is False:
            return LABEL_PRISM_UNCALIBRATED
        return self.method


def compare_selections(
    head: SyntheticHead,
    *,
    block_size: int = 128,
    threshold: float = 0.95,
    mean_pooling_thresholds=None,
) -> tuple[list[BlindSpotResult], dict]:
    """Score mean pooling and Prism (calibrated or not) against full attention on one head.

    Parameters
    ----------
    head : SyntheticHead
    block_size : int
    threshold : float
        Top-p of every method (both bands for Prism).
    mean_pooling_thresholds : sequence of float, optional
        Further top-p values at which to run mean pooling, to see what
        density it needs to catch up.

    Returns
    -------
    results : list of BlindSpotResult
        Mean pooling at ``threshold``, Prism calibrated, Prism with
        ``calibrate=False``, then mean pooling at each extra threshold.
    masks : dict
        The (1, 1, nq, nk) bool masks keyed by each result's ``label`` (the
        first three only), for plotting.
    """
    if not isinstance(head, SyntheticHead):
        raise TypeError(f"head must be a SyntheticHead, got {type(head).__name__}; build one "
                        "with synthetic_positional_head()")
    block_size = validate_block_size(block_size)
    threshold = check_threshold(threshold)
    q, k = head.q, head.k
    n = head.num_tokens
    # One mass table, many masks: each recall is then a masked sum.
    mass = query_tile_mass(q, k, block_size, dtype=torch.float64)

    def measure(mask, method, calibrate, top_p):
        recall = recall_from_mass(mask, mass, n).mean()
        density = causal_density(mask, num_queries=n, num_keys=n, block_size=block_size)
        return BlindSpotResult(base=head.base, block_size=block_size,
                               slash_offset=head.slash_offset, method=method,
                               calibrate=calibrate, threshold=top_p, recall=float(recall),
                               density=float(density.mean()))

    masks = {
        METHOD_MEAN_POOLING: mean_pooling_select(q, k, block_size=block_size,
                                                 threshold=threshold),
        METHOD_PRISM: select_blocks(q, k, block_size=block_size, high_threshold=threshold,
                                    low_threshold=threshold, rope_layout=head.rope_layout),
        LABEL_PRISM_UNCALIBRATED: select_blocks(
            q, k, block_size=block_size, high_threshold=threshold, low_threshold=threshold,
            rope_layout=head.rope_layout, calibrate=False),
    }
    results = [
        measure(masks[METHOD_MEAN_POOLING], METHOD_MEAN_POOLING, None, threshold),
        measure(masks[METHOD_PRISM], METHOD_PRISM, True, threshold),
        measure(masks[LABEL_PRISM_UNCALIBRATED], METHOD_PRISM, False, threshold),
    ]
    for extra in mean_pooling_thresholds or ():
        extra = check_threshold(extra)
        mask = mean_pooling_select(q, k, block_size=block_size, threshold=extra)
        results.append(measure(mask, METHOD_MEAN_POOLING, None, extra))
    return results, masks


def blind_spot_table(
    bases=DEFAULT_BLIND_SPOT_BASES,
    *,
    block_size: int = 128,
    threshold: float = 0.95,
    mean_pooling_thresholds=None,
    **head_options,
) -> list[BlindSpotResult]:
    """Run :func:`compare_selections` on the synthetic head for several RoPE bases.

    Parameters
    ----------
    bases : sequence of float
        RoPE bases (default 1e4, 1e5, 5e5, 1e6).
    block_size : int
    threshold : float
    mean_pooling_thresholds : sequence of float, optional
        Passed to :func:`compare_selections`.
    **head_options
        Keyword arguments of :func:`synthetic_positional_head` (not ``base``).

    Returns
    -------
    list of BlindSpotResult
        Grouped by base, in the order of ``bases``.
    """
    if "base" in head_options:
        raise TypeError("pass RoPE bases through bases=, not base=")
    rows = []
    for base in bases:
        head = synthetic_positional_head(base, **head_options)
        results, _ = compare_selections(head, block_size=block_size, threshold=threshold,
                                        mean_pooling_thresholds=mean_pooling_thresholds)
        rows.extend(results)
    return rows


def format_blind_spot_table(rows: list[BlindSpotResult]) -> str:
    """Render :class:`BlindSpotResult` rows as a fixed-width text table.

    Parameters
    ----------
    rows : list of BlindSpotResult

    Returns
    -------
    str
        A header line and one line per row.
    """
    lines = [f"{'base':>8} {'B':>4} {'offset':>6}  {'method':<24} {'top-p':>6} "
             f"{'recall':>7} {'density':>8}"]
    for row in rows:
        lines.append(f"{row.base:>8.0e} {row.block_size:>4} {row.slash_offset:>6}  "
                     f"{row.label:<24} {row.threshold:>6.3f} {row.recall:>7.3f} "
                     f"{row.density:>8.3f}")
    return "\n".join(lines)
