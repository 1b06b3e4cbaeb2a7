"""Prism block selection: the stages of SPEC 3 to 6 put together.

``trace_selection`` runs every stage and keeps every intermediate (tutorials
and tie analysis read them); ``select_blocks`` returns only the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bands import band_dims
from .calibration import band_temperature
from .config import TIE_MARGIN, PrismConfig, resolve_config
from .estimators import estimator_mask
from .scoring import admissible_tiles, band_logits, band_probabilities
from .tiles import TileLayout, pool_tiles, tile_layout
from .topp import top_p_select
from .validation import validate_qk


def forced_tiles(layout: TileLayout, causal: bool, force_sink: bool, force_diagonal: bool,
                 device=None) -> torch.Tensor:
    """Tiles kept whatever the scores say, shape (nq, nk) bool.

    The sink is key tile 0 (``force_sink``); the diagonal is the key tile with
    the query tile's absolute index (``force_diagonal``, causal only). Both
    are always admissible.
    """
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    forced = torch.zeros(nq, nk, dtype=torch.bool, device=device)
    if nk == 0 or nq == 0:
        return forced
    if force_sink:
        forced[:, 0] = True
    if causal and force_diagonal:
        rows = torch.arange(nq, device=device)
        forced[rows, layout.query_tile_indices(device)] = True
    return forced


@dataclass(frozen=True)
class SelectionTrace:
    """Every intermediate of one :func:`select_blocks` call.

    Shapes use ``nq`` query tiles and ``nk`` key tiles. Probabilities and
    masses are fp32, (B, Hq, nq, nk); temperatures are (B, Hq).
    """

    config: PrismConfig
    causal: bool
    layout: TileLayout
    high_dims: torch.Tensor
    low_dims: torch.Tensor
    q_pooled: torch.Tensor
    k_pooled: torch.Tensor
    high_tau: torch.Tensor
    low_tau: torch.Tensor
    admissible: torch.Tensor
    forced: torch.Tensor
    high_probs: torch.Tensor
    low_probs: torch.Tensor
    high_mass_before: torch.Tensor
    low_mass_before: torch.Tensor
    high_keep: torch.Tensor
    low_keep: torch.Tensor
    mask: torch.Tensor


def trace_selection(q, k, config: PrismConfig | None = None, *, causal: bool = True,
                    **overrides) -> SelectionTrace:
    """Run Prism's selection and return every stage (see :class:`SelectionTrace`).

    Arguments are those of :func:`select_blocks`. With
    ``estimator="prism_vertical_slash"`` the vertical-slash tiles
    (:mod:`prism.reference.estimators`) join the mask and count as forced, so
    tie analysis covers only the Prism bands. The other non-Prism estimators
    have no band stages to trace and raise ``ValueError``.
    """
    cfg = resolve_config(config, **overrides)
    if cfg.estimator not in ("prism", "prism_vertical_slash"):
        raise ValueError(
            f"trace_selection traces Prism's band stages, but estimator={cfg.estimator!r}; "
            "call select_blocks, or prism.reference.estimators.estimator_mask, instead"
        )
    validate_qk(q, k, causal=causal)
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    device = q.device
    layout = tile_layout(nq, nk, cfg.block_size, causal)

    # Stage 1 (SPEC 3): mean-pool the valid tokens of every tile, in fp32.
    q_pooled = pool_tiles(q, layout.query_start, cfg.block_size)
    k_pooled = pool_tiles(k, 0, cfg.block_size)

    # Stage 2 (SPEC 4): the two RoPE bands.
    high_dims, low_dims = band_dims(d, cfg.high_dim, cfg.low_dim, cfg.rope_layout, device)

    # Stage 3 (SPEC 5): one temperature per band and (batch, query head).
    if cfg.calibrate:
        high_tau = band_temperature(q_pooled, k_pooled, high_dims, cfg.eps)
        low_tau = band_temperature(q_pooled, k_pooled, low_dims, cfg.eps)
    else:
        high_tau = torch.full((b, hq), cfg.high_temperature, dtype=torch.float32, device=device)
        low_tau = torch.full((b, hq), cfg.low_temperature, dtype=torch.float32, device=device)

    # Stage 4 (SPEC 6): per-band softmax over admissible tiles, then top-p.
    admissible = admissible_tiles(layout, causal, device)
    high_probs = band_probabilities(band_logits(q_pooled, k_pooled, high_dims, high_tau),
                                    admissible)
    low_probs = band_probabilities(band_logits(q_pooled, k_pooled, low_dims, low_tau),
                                   admissible)
    high_keep, high_mass = top_p_select(high_probs, admissible, cfg.high_threshold)
    low_keep, low_mass = top_p_select(low_probs, admissible, cfg.low_threshold)

    # Stage 5: union of the bands, plus the forced sink and diagonal tiles.
    forced = forced_tiles(layout, causal, cfg.force_sink, cfg.force_diagonal, device)
    if cfg.estimator == "prism_vertical_slash":
        forced = forced | estimator_mask(q, k, cfg, causal)
    mask = (high_keep | low_keep | forced) & admissible
    return SelectionTrace(
        config=cfg, causal=causal, layout=layout, high_dims=high_dims, low_dims=low_dims,
        q_pooled=q_pooled, k_pooled=k_pooled, high_tau=high_tau, low_tau=low_tau,
        admissible=admissible, forced=forced, high_probs=high_probs, low_probs=low_probs,
        high_mass_before=high_mass, low_mass_before=low_mass, high_keep=high_keep,
        low_keep=low_keep, mask=mask,
    )


def select_blocks(q, k, config: PrismConfig | None = None, *, causal: bool = True,
                  **overrides) -> torch.Tensor:
    """Choose the (query tile, key tile) pairs to compute (SPEC 3 to 6).

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
        Queries after RoPE; fp32, fp16 or bf16.
    k : Tensor (B, Hkv, Nk, D)
        Keys after RoPE, un-repeated (``Hq % Hkv == 0``).
    config : PrismConfig, optional
        Defaults to ``PrismConfig()``.
    causal : bool
        Causal queries are the last ``Nq`` positions (``Nq <= Nk``).
    **overrides
        Any :class:`PrismConfig` field, e.g. ``block_size=64``.

    Returns
    -------
    Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
        Row ``i`` is the ``i``-th tile that holds a query (absolute tile
        ``(Nk - Nq) // block_size + i`` when causal).

    Raises
    ------
    ValueError, TypeError
        On any SPEC 8 bad input, before computing anything.

    Examples
    --------
    >>> import torch
    >>> from prism.reference import select_blocks
    >>> q = torch.randn(1, 4, 512, 64)
    >>> k = torch.randn(1, 2, 512, 64)
    >>> mask = select_blocks(q, k, block_size=128)
    >>> mask.shape, mask.dtype
    (torch.Size([1, 4, 4, 4]), torch.bool)
    >>> bool(mask[..., 0].all()), bool(mask.diagonal(dim1=-2, dim2=-1).all())
    (True, True)

    A non-default ``estimator`` (docs/estimators.rst) changes only how tiles
    are scored; the admissible set and forced tiles are the same.
    """
    cfg = resolve_config(config, **overrides)
    if cfg.estimator in ("antidiagonal", "vertical_slash", "subtile",
                         "antidiagonal_vertical_slash"):
        validate_qk(q, k, causal=causal)
        return estimator_mask(q, k, cfg, causal)
    return trace_selection(q, k, cfg, causal=causal).mask


def boundary_ties(q, k, config: PrismConfig | None = None, *, causal: bool = True,
                  margin: float = TIE_MARGIN, **overrides) -> torch.Tensor:
    """Mask entries on which two correct implementations may disagree (SPEC 6).

    An entry is a boundary tie when it is admissible and not forced, no band
    keeps it by more than ``margin``, and in at least one band the mass ranked
    before it lies within ``margin`` of that band's threshold, or its
    probability equals that of such an entry to within 1e-6 relative (the two
    may swap ranks under another fp32 summation order).

    Returns
    -------
    Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
    """
    trace = trace_selection(q, k, config, causal=causal, **overrides)
    return ties_from_trace(trace, margin)


def ties_from_trace(trace: SelectionTrace, margin: float = TIE_MARGIN,
                    relative: float = 1e-6) -> torch.Tensor:
    """:func:`boundary_ties` computed from an existing trace.

    Besides the entries whose preceding mass lies within ``margin`` of the
    threshold, an entry whose probability equals such an entry's to within
    ``relative`` (relative difference) is a tie too: the two may rank in
    either order once their probabilities are rounded in another summation
    order, which moves the cut from one to the other.
    """
    cfg = trace.config
    robust = ((trace.high_mass_before < cfg.high_threshold - margin)
              | (trace.low_mass_before < cfg.low_threshold - margin))
    near_any = torch.zeros_like(trace.mask)
    for probs, mass, threshold in ((trace.high_probs, trace.high_mass_before,
                                    cfg.high_threshold),
                                   (trace.low_probs, trace.low_mass_before,
                                    cfg.low_threshold)):
        near = ((mass - threshold).abs() <= margin) & trace.admissible
        # Probabilities of this row's boundary entries, as a [low, high] range.
        lowest = torch.where(near, probs, torch.full_like(probs, float("inf"))).amin(-1)
        highest = torch.where(near, probs, torch.full_like(probs, float("-inf"))).amax(-1)
        swappable = ((probs >= (lowest * (1 - relative))[..., None])
                     & (probs <= (highest * (1 + relative))[..., None]))
        near_any = near_any | near | swappable
    return trace.admissible & ~trace.forced & ~robust & near_any


def mask_differences(actual: torch.Tensor, expected: torch.Tensor,
                     ties: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``(b, h, i, j)`` where two masks differ outside the boundary ties.

    An empty result means the masks agree up to ties. Use it in tests of a
    port: ``assert mask_differences(mine, ref, ties).numel() == 0``.

    Returns
    -------
    Tensor (n_differences, 4), int64
    """
    if actual.shape != expected.shape:
        raise ValueError(
            f"masks have different shapes: actual {tuple(actual.shape)}, "
            f"expected {tuple(expected.shape)}"
        )
    differ = actual.bool() != expected.bool()
    if ties is not None:
        differ = differ & ~ties.to(differ.device)
    return differ.nonzero()
