"""The estimator registry: one table of every block-score estimator (docs/estimators.rst).

Each entry names the estimator's scoring stages, the :class:`PrismConfig`
fields it reads, the Triton kernels :mod:`prism.optimized` has for its stages
and its section of ``docs/estimators.rst``. Configuration checks
(:mod:`~prism.reference.config`), :func:`prism.reference.select_blocks`,
:func:`prism.optimized.estimators.estimator_select_blocks`, the evaluation
sweep and the command line all read this table; none of them branches on
estimator names.

Import order: this module imports only the scoring stages of
:mod:`~prism.reference.estimators` (and the shared top-p, tiles and scoring
modules), never :mod:`~prism.reference.select` or
:mod:`~prism.reference.config`. Prism's own band selection enters an
estimator's tiles through the ``stages`` mapping (key ``"prism_trace"``),
which :mod:`~prism.reference.select` fills in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .estimators import (
    antidiagonal_probabilities,
    candidate_antidiagonal_probabilities,
    candidate_sampled_probabilities,
    last_tile_exact_tiles,
    mix_tile_probabilities,
    prism_candidate_tiles,
    sampled_query_probabilities,
    subtile_band_probabilities,
    vertical_slash_tiles,
)
from .scoring import admissible_tiles
from .tiles import TileLayout
from .topp import top_p_select


def top_p_tiles(probs: torch.Tensor, layout: TileLayout, causal: bool,
                threshold: float) -> torch.Tensor:
    """Tiles kept by contract §6's top-p at ``threshold``, never a zero-probability one.

    Parameters
    ----------
    probs : Tensor (B, Hq, nq, nk), float32
        Tile probabilities of an estimator (zero outside the admissible tiles).
    layout : TileLayout
    causal : bool
    threshold : float in (0, 1]

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool, within the admissible tiles
    """
    keep, _ = top_p_select(probs, admissible_tiles(layout, causal, probs.device), threshold)
    return keep & (probs > 0)


#: Stage name -> reference implementation. :mod:`prism.optimized` replaces some
#: of them by kernels with the same signature and result.
REFERENCE_STAGES: dict[str, Callable] = {
    "antidiagonal": antidiagonal_probabilities,
    "sampled": sampled_query_probabilities,
    "vertical_slash": vertical_slash_tiles,
    "tile_top_p": top_p_tiles,
    "prism_candidates": prism_candidate_tiles,
    "candidate_antidiagonal": candidate_antidiagonal_probabilities,
    "candidate_sampled": candidate_sampled_probabilities,
    "last_tile_exact": last_tile_exact_tiles,
}


@dataclass(frozen=True)
class EstimatorSpec:
    """One row of the registry.

    Attributes
    ----------
    name : str
        The value of ``PrismConfig.estimator``.
    summary : str
        One line for tables and ``--help``.
    parameters : tuple of str
        The :class:`PrismConfig` fields it reads besides ``block_size``, the
        thresholds and the forced-tile switches.
    stages : tuple of str
        Keys of :data:`REFERENCE_STAGES` its selection calls.
    docs : str
        Its section label in ``docs/estimators.rst``.
    prism_bands : bool
        Prism's band selection (contract §6) is part of its mask, so
        :func:`prism.reference.trace_selection` traces it.
    tiles : callable or None
        ``tiles(q, k, cfg, layout, causal, stages) -> bool (B, Hq, nq, nk)``:
        the tiles its own evidence keeps, before the forced tiles. For a
        ``prism_bands`` estimator these are the tiles joined to Prism's.
    block_multiple_of : str or None
        A field that must divide ``block_size`` for this estimator.
    threshold_moves : str
        What the sweep's threshold (``high_threshold``) moves.
    sweep_parameters : tuple of str or None
        The parameters a sweep holds fixed at its settings' values; ``None``
        means all of ``parameters``.
    """

    name: str
    summary: str
    parameters: tuple[str, ...]
    stages: tuple[str, ...]
    docs: str
    prism_bands: bool = False
    tiles: Callable | None = None
    block_multiple_of: str | None = None
    threshold_moves: str = "both bands' top-p"
    sweep_parameters: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.sweep_parameters is None:
            object.__setattr__(self, "sweep_parameters", self.parameters)

    @property
    def pooled_tiles(self) -> bool:
        """Whether Prism's mean-pooled key tiles at ``block_size`` enter the selection
        (its bands, or the cascade's candidates): a
        :class:`~prism.reference.PooledKeyCache` can hold them between prefill chunks."""
        return self.prism_bands or "prism_candidates" in self.stages

    @property
    def raw_keys(self) -> bool:
        """Whether the selection also reads the raw keys (every estimator but ``"prism"``):
        with a :class:`~prism.reference.PooledKeyCache`, it still reads every key."""
        return self.tiles is not None


def _top_p(probs, layout, causal, threshold, stages):
    """The ``"tile_top_p"`` stage (:func:`top_p_tiles` or its kernel)."""
    return stages.get("tile_top_p", top_p_tiles)(probs, layout, causal, threshold)


def _vs_threshold(cfg) -> float:
    value = cfg.vertical_slash_threshold
    return cfg.high_threshold if value is None else value


def _vertical_slash(q, k, cfg, layout, causal, stages):
    return stages["vertical_slash"](q, k, layout, cfg.last_queries, _vs_threshold(cfg), causal)


def _antidiagonal(q, k, cfg, layout, causal, stages):
    probs = stages["antidiagonal"](q, k, layout, cfg.antidiagonal_stride, causal)
    return _top_p(probs, layout, causal, cfg.high_threshold, stages)


def _antidiagonal_vertical_slash(q, k, cfg, layout, causal, stages):
    return (_antidiagonal(q, k, cfg, layout, causal, stages)
            | _vertical_slash(q, k, cfg, layout, causal, stages))


def _sampled(q, k, cfg, layout, causal, stages):
    probs = stages["sampled"](q, k, layout, cfg.sampled_queries, causal)
    return _top_p(probs, layout, causal, cfg.high_threshold, stages)


def _sampled_vertical_slash(q, k, cfg, layout, causal, stages):
    return (_sampled(q, k, cfg, layout, causal, stages)
            | _vertical_slash(q, k, cfg, layout, causal, stages))


def _subtile(q, k, cfg, layout, causal, stages):
    high, low = subtile_band_probabilities(q, k, cfg, causal, stages["prism_trace"])
    return (_top_p(high, layout, causal, cfg.high_threshold, stages)
            | _top_p(low, layout, causal, cfg.low_threshold, stages))


def last_tile_threshold(cfg) -> float:
    """The cascade's last-tile top-p, ``(1 + high_threshold) / 2``: the last query
    tile's row, on exact evidence, drops at most half the mass the estimated rows
    may drop (docs/estimators.rst, the cascade's step 4)."""
    return (1.0 + cfg.high_threshold) / 2


def _cascade(q, k, cfg, layout, causal, stages):
    candidates = stages["prism_candidates"](q, k, cfg, causal, stages["prism_trace"])
    probs = stages["candidate_antidiagonal"](q, k, layout, cfg.antidiagonal_stride, candidates,
                                             causal)
    if cfg.sampled_weight > 0:
        # Exact evidence from a few queries per tile, on the same candidates.
        sampled = stages["candidate_sampled"](q, k, layout, cfg.sampled_queries, candidates,
                                              causal)
        probs = mix_tile_probabilities(probs, sampled, cfg.sampled_weight)
    # The last query tile's row also keeps the key tiles of the last queries'
    # exact attention at (1 + p) / 2: the tokens that follow the prompt read
    # that row, and its evidence there is exact, not estimated.
    last = stages["last_tile_exact"](q, k, layout, cfg.last_queries, last_tile_threshold(cfg),
                                     causal)
    return (_top_p(probs, layout, causal, cfg.high_threshold, stages)
            | _vertical_slash(q, k, cfg, layout, causal, stages) | last)


_VS = ("last_queries", "vertical_slash_threshold")

#: Every estimator, by name; ``"prism"`` (the paper's, contract §3-6) first.
ESTIMATOR_REGISTRY: dict[str, EstimatorSpec] = {spec.name: spec for spec in (
    EstimatorSpec(
        "prism", "Prism's two RoPE bands of mean-pooled tiles (the paper; contract §3-6)",
        (), (), "estimator-prism", prism_bands=True),
    EstimatorSpec(
        "antidiagonal", "strided antidiagonal token scores, top-p per query tile",
        ("antidiagonal_stride",), ("antidiagonal", "tile_top_p"), "estimator-antidiagonal",
        tiles=_antidiagonal, block_multiple_of="antidiagonal_stride",
        threshold_moves="the antidiagonal top-p"),
    EstimatorSpec(
        "vertical_slash", "key columns and diagonals of the last queries' exact attention",
        _VS, ("vertical_slash",), "estimator-vertical-slash", tiles=_vertical_slash,
        threshold_moves="the vertical-slash top-p", sweep_parameters=("last_queries",)),
    EstimatorSpec(
        "prism_vertical_slash", "Prism's bands united with the vertical-slash tiles",
        _VS, ("vertical_slash",), "estimator-prism-vertical-slash", prism_bands=True,
        tiles=_vertical_slash, threshold_moves="Prism's band top-p"),
    EstimatorSpec(
        "subtile", "Prism's bands scored on sub-tiles, summed per tile pair",
        ("subtile_factor",), ("prism_trace", "tile_top_p"), "estimator-subtile", tiles=_subtile,
        block_multiple_of="subtile_factor"),
    EstimatorSpec(
        "antidiagonal_vertical_slash",
        "antidiagonal tiles united with the vertical-slash tiles",
        ("antidiagonal_stride", *_VS), ("antidiagonal", "tile_top_p", "vertical_slash"),
        "estimator-antidiagonal-vertical-slash", tiles=_antidiagonal_vertical_slash,
        block_multiple_of="antidiagonal_stride", threshold_moves="the antidiagonal top-p"),
    EstimatorSpec(
        "sampled", "exact attention of a few sampled queries per tile, top-p per query tile",
        ("sampled_queries",), ("sampled", "tile_top_p"), "estimator-sampled", tiles=_sampled,
        block_multiple_of="sampled_queries", threshold_moves="the sampled-query top-p"),
    EstimatorSpec(
        "sampled_vertical_slash", "sampled-query tiles united with the vertical-slash tiles",
        ("sampled_queries", *_VS), ("sampled", "tile_top_p", "vertical_slash"),
        "estimator-sampled-vertical-slash", tiles=_sampled_vertical_slash,
        block_multiple_of="sampled_queries", threshold_moves="the sampled-query top-p"),
    EstimatorSpec(
        "cascade", "antidiagonal scores on the tiles of Prism's mask at candidate_threshold, "
        "optionally mixed with sampled queries' exact attention there, top-p, united with the "
        "vertical-slash tiles and the last query tile's exact top tiles (the accurate preset)",
        ("antidiagonal_stride", "candidate_threshold", *_VS, "sampled_queries",
         "sampled_weight"),
        ("prism_trace", "prism_candidates", "candidate_antidiagonal", "candidate_sampled",
         "tile_top_p", "vertical_slash", "last_tile_exact"),
        "estimator-cascade", tiles=_cascade, block_multiple_of="antidiagonal_stride",
        threshold_moves="the antidiagonal top-p"),
)}

#: The registry's names, in table order.
ESTIMATORS = tuple(ESTIMATOR_REGISTRY)

#: The fields that choose and tune an estimator; absent from the golden records
#: of contract v1.1, whose configurations all use the default estimator.
ESTIMATOR_FIELDS = ("estimator", *dict.fromkeys(
    field for spec in ESTIMATOR_REGISTRY.values() for field in spec.parameters))


def estimator_spec(name: str) -> EstimatorSpec:
    """The registry row of ``name``.

    Raises
    ------
    ValueError
        If no estimator has that name.
    """
    try:
        return ESTIMATOR_REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"estimator must be one of {ESTIMATORS}, got {name!r}; 'prism' is the default"
        ) from None


def estimator_tiles(q: torch.Tensor, k: torch.Tensor, cfg, layout: TileLayout, causal: bool,
                    stages: Mapping[str, Callable] | None = None) -> torch.Tensor:
    """The tiles ``cfg.estimator``'s own evidence keeps, before the forced tiles.

    Parameters
    ----------
    q, k : validated inputs
    cfg : PrismConfig
    layout : TileLayout
    causal : bool
    stages : mapping, optional
        Stage implementations by name, overriding :data:`REFERENCE_STAGES`;
        ``"prism_trace"`` (Prism's :func:`~prism.reference.trace_selection`)
        is needed by estimators that score with Prism's bands.

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool, within the admissible tiles
    """
    spec = estimator_spec(cfg.estimator)
    if spec.tiles is None:
        raise ValueError(f"estimator {cfg.estimator!r} has no tiles of its own beside "
                         "Prism's bands; run prism.reference.select_blocks")
    merged = {**REFERENCE_STAGES, **(stages or {})}
    missing = [name for name in spec.stages if name not in merged]
    if missing:
        raise ValueError(f"estimator {cfg.estimator!r} needs the stage(s) {missing}; pass "
                         "them in stages (prism_trace=prism.reference.trace_selection)")
    return spec.tiles(q, k, cfg, layout, causal, merged)


__all__ = ["ESTIMATORS", "ESTIMATOR_FIELDS", "ESTIMATOR_REGISTRY", "EstimatorSpec",
           "REFERENCE_STAGES", "estimator_spec", "estimator_tiles", "last_tile_threshold",
           "top_p_tiles"]
