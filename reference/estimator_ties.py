"""Boundary ties of the estimators' selections (docs/estimators.rst, docs/golden.rst).

Contract §6's tie analysis (:func:`prism.reference.boundary_ties`) covers the
two band top-p's of Prism's own selection. An estimator's mask is a union of
several top-p decisions: a tile top-p over estimated tile probabilities, the
vertical-slash top-p's over token columns and diagonal offsets, the cascade's
candidate mask (Prism's selection at ``candidate_threshold``) and its
last-tile rule. Two correct implementations sum in different fp32 orders, so
each of those decisions may flip where its mass lies at its threshold.
:func:`estimator_boundary_ties` runs the registry's composition of the
estimator with every top-p stage instrumented, and returns the mask entries
that such a flip can change.

Per decision, an entry is *flagged* by the rules of contract §6.5 (the mass
ranked before it within ``margin`` of the threshold, a probability within
``relative`` of such an entry's, or a kept and a dropped entry within
``relative`` of each other), and *robustly kept* when it is kept and not
flagged. Decisions map to tile pairs as the estimator maps them:

* a tile top-p flags its own tiles;
* a vertical-slash column or offset flags every tile pair its keep would
  add (:func:`~prism.reference.estimators.vertical_slash_tiles_from_kept`),
  and a robustly kept one keeps those pairs robustly;
* a flagged candidate of the cascade may move into or out of ``C``, which
  renormalises the antidiagonal probabilities of its whole query-tile row:
  every admissible tile of such a row is flagged for the tile top-p;
* the last-tile rule flags tiles of the last query-tile row.

The union keeps an entry robustly when any decision does; an entry is a
boundary tie when it is admissible, not forced, not robustly kept, and
flagged by some decision. A port may differ from the reference only there.
"""

from __future__ import annotations

import torch

from .config import TIE_MARGIN, TIE_RELATIVE, PrismConfig, resolve_config
from .estimators import (
    last_query_distributions,
    last_tile_masses,
    vertical_slash_tiles_from_kept,
)
from .registry import (
    REFERENCE_STAGES,
    estimator_spec,
    estimator_tiles,
)
from .scoring import admissible_tiles
from .select import _band_ties, forced_tiles, ties_from_trace, trace_selection
from .tiles import tile_layout
from .topp import top_p_select
from .validation import validate_qk


def _decision(probs, threshold, admissible, margin, relative):
    """``(flagged, robust)`` entries of one top-p over ``probs`` along the last axis.

    Every entry is its own key group: no two entries count as an exact copy,
    so every near-equal pair across the cut is flagged.
    """
    groups = torch.arange(probs.shape[-1], device=probs.device)
    _, mass = top_p_select(probs, admissible, threshold)
    flagged, keep = _band_ties(probs, mass, threshold, admissible, groups, margin, relative)
    return flagged, keep & ~flagged


class _Recorder:
    """Reference stages that also record each top-p decision's flagged and robust tiles."""

    def __init__(self, margin: float, relative: float):
        self.margin, self.relative = margin, relative
        self.flagged: list[torch.Tensor] = []
        self.robust: list[torch.Tensor] = []
        self.unsettled_rows = None  # (B, Hq, nq, 1) rows whose candidates may move

    def _add(self, flagged, robust):
        self.flagged.append(flagged)
        self.robust.append(robust)

    def tile_top_p(self, probs, layout, causal, threshold):
        admissible = admissible_tiles(layout, causal, probs.device)
        flagged, robust = _decision(probs, threshold, admissible, self.margin, self.relative)
        if self.unsettled_rows is not None:
            # The probabilities of such a row depend on which tiles are candidates.
            flagged = flagged | (self.unsettled_rows & admissible)
            robust = robust & ~self.unsettled_rows
        self._add(flagged, robust)
        return REFERENCE_STAGES["tile_top_p"](probs, layout, causal, threshold)

    def prism_candidates(self, q, k, cfg, causal, trace):
        p = cfg.candidate_threshold
        candidate = trace(q, k, cfg.replace(estimator="prism", high_threshold=p,
                                            low_threshold=p), causal=causal)
        ties = ties_from_trace(candidate, self.margin, self.relative)
        self.unsettled_rows = ties.any(dim=-1, keepdim=True)
        return candidate.mask

    def vertical_slash(self, q, k, layout, last_queries, threshold, causal):
        vertical, slash = last_query_distributions(q, k, layout, last_queries, causal)
        ones = torch.ones((), dtype=torch.bool, device=q.device)
        parts = [_decision(x, threshold, ones, self.margin, self.relative)
                 for x in (vertical, slash)]
        (col_flag, col_robust), (off_flag, off_robust) = parts
        self._add(vertical_slash_tiles_from_kept(col_flag, off_flag, layout, causal),
                  vertical_slash_tiles_from_kept(col_robust, off_robust, layout, causal))
        return REFERENCE_STAGES["vertical_slash"](q, k, layout, last_queries, threshold,
                                                  causal)

    def last_tile_exact(self, q, k, layout, last_queries, threshold, causal):
        b, hq = q.shape[:2]
        nq, nk = layout.num_query_tiles, layout.num_key_tiles
        flagged = torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=q.device)
        robust = torch.zeros_like(flagged)
        if nq and nk:
            mass = last_tile_masses(q, k, layout, last_queries, causal)
            admissible = admissible_tiles(layout, causal, q.device)[-1]
            flagged[:, :, -1], robust[:, :, -1] = _decision(mass, threshold, admissible,
                                                            self.margin, self.relative)
        self._add(flagged, robust)
        return REFERENCE_STAGES["last_tile_exact"](q, k, layout, last_queries, threshold,
                                                   causal)

    def stages(self) -> dict:
        return {"tile_top_p": self.tile_top_p, "prism_candidates": self.prism_candidates,
                "vertical_slash": self.vertical_slash, "last_tile_exact": self.last_tile_exact,
                "prism_trace": trace_selection}


def estimator_boundary_ties(q, k, config: PrismConfig | None = None, *, causal: bool = True,
                            margin: float = TIE_MARGIN, relative: float = TIE_RELATIVE,
                            **overrides) -> torch.Tensor:
    """Mask entries of an estimator's selection on which two correct implementations may
    disagree (module docstring); for ``estimator="prism"`` the same as
    :func:`prism.reference.boundary_ties`.

    Parameters
    ----------
    q, k, config, causal, **overrides
        As :func:`prism.reference.select_blocks`.
    margin : float
        Distance of the mass ranked before an entry from its threshold under
        which the entry is flagged (:data:`~prism.reference.TIE_MARGIN`).
    relative : float
        Relative distance of two probabilities under which they may swap ranks
        (:data:`~prism.reference.TIE_RELATIVE`).

    Returns
    -------
    Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
    """
    cfg = resolve_config(config, **overrides)
    spec = estimator_spec(cfg.estimator)
    if spec.tiles is None:  # Prism alone
        return ties_from_trace(trace_selection(q, k, cfg, causal=causal), margin, relative)
    validate_qk(q, k, causal=causal)
    layout = tile_layout(q.shape[2], k.shape[2], cfg.block_size, causal)
    shape = (q.shape[0], q.shape[1], layout.num_query_tiles, layout.num_key_tiles)
    if 0 in shape:  # no entry to disagree on
        return torch.zeros(shape, dtype=torch.bool, device=q.device)
    recorder = _Recorder(margin, relative)
    estimator_tiles(q, k, cfg, layout, causal, recorder.stages())
    if spec.prism_bands:
        # Prism's bands are one more decision of the union (their tie rule, contract §6).
        prism = trace_selection(q, k, cfg.replace(estimator="prism"), causal=causal)
        prism_ties = ties_from_trace(prism, margin, relative)
        recorder._add(prism_ties, prism.mask & ~prism_ties)
    device = q.device
    admissible = admissible_tiles(layout, causal, device)
    forced = forced_tiles(layout, causal, cfg.force_sink, cfg.force_diagonal, device)
    flagged = torch.zeros(shape, dtype=torch.bool, device=device)
    robust = torch.zeros_like(flagged)
    for f, r in zip(recorder.flagged, recorder.robust, strict=True):
        flagged, robust = flagged | f, robust | r
    return flagged & ~robust & admissible & ~forced


__all__ = ["estimator_boundary_ties"]
