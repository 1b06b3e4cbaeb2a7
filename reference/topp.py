"""Contract §6, second half: top-p (cumulative probability) selection per row."""

from __future__ import annotations

import torch

from .validation import check_threshold


def top_p_select(probs: torch.Tensor, admissible: torch.Tensor, threshold: float):
    """Keep the most probable tiles of each row until their mass reaches ``threshold``.

    Order the admissible tiles of a row by probability, descending, breaking
    ties by the smaller tile index; keep a tile when the mass of the tiles
    ranked before it is ``< threshold``. The first tile is therefore always
    kept. A tile of probability exactly 0 is never kept, whatever the
    threshold, and with ``threshold == 1`` the rule keeps exactly the tiles of
    non-zero probability, which is what it means in exact arithmetic: fp32
    rounding of the running sum may neither drop a tail tile (a sum that
    reached 1.0 early) nor keep a zero one (a sum that stopped at 0.99999988).

    Parameters
    ----------
    probs : Tensor (..., nk), float32
        Output of :func:`band_probabilities`.
    admissible : Tensor (..., nk) bool, broadcastable to ``probs``
    threshold : float in (0, 1]

    Returns
    -------
    keep : Tensor (..., nk) bool
    mass_before : Tensor (..., nk) float32
        For each tile, the fp32 mass ranked before it; the distance of this
        value from ``threshold`` tells a boundary tie from a real difference.

    Raises
    ------
    ValueError, TypeError
        If ``threshold`` is not a number in ``(0, 1]`` (a plain Python check).
    """
    threshold = check_threshold(threshold)
    # A stable descending sort keeps equal probabilities in index order, which
    # is the contract's tie-break (§6).
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    # Mass before = inclusive running sum minus the entry itself. The first
    # entry gets exactly 0, and this is the rounding the paper's code uses.
    running = torch.cumsum(sorted_probs, dim=-1)
    mass_before_sorted = running - sorted_probs
    if threshold >= 1.0:
        keep_sorted = sorted_probs > 0
    else:
        keep_sorted = (mass_before_sorted < threshold) & (sorted_probs > 0)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    mass_before = torch.zeros_like(mass_before_sorted).scatter(-1, order, mass_before_sorted)
    return keep & admissible, mass_before
