"""Prism block selection: the stages of contract §3 to §6 put together.

``trace_selection`` runs every stage and keeps every intermediate (tutorials
and tie analysis read them); ``select_blocks`` returns only the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .bands import band_dims, band_sizes
from .calibration import band_temperature
from .config import TIE_MARGIN, TIE_RELATIVE, PrismConfig, resolve_config
from .registry import estimator_spec, estimator_tiles
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
    if not estimator_spec(cfg.estimator).prism_bands:
        raise ValueError(
            f"trace_selection traces Prism's band stages, but estimator={cfg.estimator!r}; "
            "call select_blocks, or prism.reference.select.estimator_mask, instead"
        )
    validate_qk(q, k, causal=causal)
    # The band widths against this head dim (contract §4, §8), before any pooling.
    band_sizes(q.shape[-1], cfg.high_dim, cfg.low_dim)
    # Stage 1 (contract §3) for the keys; the queries are pooled in the stages below.
    k_pooled = pool_tiles(k, 0, cfg.block_size)
    trace = trace_from_pooled_keys(q, k_pooled, k.shape[2], cfg, causal)
    return join_estimator_tiles(trace, q, k, cfg, causal, trace_selection)


def join_estimator_tiles(trace: SelectionTrace, q, k, cfg: PrismConfig, causal: bool,
                         prism_trace) -> SelectionTrace:
    """``trace`` (Prism's bands) with the tiles of a ``prism_bands`` estimator joined.

    The estimator's own tiles (registry) count as forced, so tie analysis covers
    only the bands; ``prism_trace`` is the ``"prism_trace"`` stage they may use.
    Returns ``trace`` itself for ``estimator="prism"``.
    """
    if estimator_spec(cfg.estimator).tiles is None:
        return trace
    forced = trace.forced | estimator_tiles(q, k, cfg, trace.layout, causal,
                                            {"prism_trace": prism_trace})
    return replace(trace, forced=forced, mask=(trace.high_keep | trace.low_keep | forced)
                   & trace.admissible)


def trace_from_pooled_keys(q, k_pooled, num_keys: int, cfg: PrismConfig,
                           causal: bool) -> SelectionTrace:
    """Prism's band stages (contract §3-§6) from the queries and already pooled keys.

    The one composition of the stages, shared by :func:`trace_selection` and by
    chunked prefill, whose key tiles were pooled by earlier chunks
    (:mod:`prism.reference.paged`). Inputs are not validated here.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k_pooled : Tensor (B or 1, Hkv, ceil(num_keys / block_size), D), float32
        :func:`prism.reference.pool_tiles` of all ``num_keys`` keys.
    num_keys : int
    cfg : PrismConfig
    causal : bool
    """
    b, hq, nq, d = q.shape
    device = q.device
    layout = tile_layout(nq, num_keys, cfg.block_size, causal)

    # Stage 1 (contract §3): mean-pool the valid tokens of every query tile, in fp32.
    q_pooled = pool_tiles(q, layout.query_start, cfg.block_size)

    # Stage 2 (contract §4): the two RoPE bands.
    high_dims, low_dims = band_dims(d, cfg.high_dim, cfg.low_dim, cfg.rope_layout, device)

    # Stage 3 (contract §5): one temperature per band and (batch, query head).
    if cfg.calibrate:
        high_tau = band_temperature(q_pooled, k_pooled, high_dims, cfg.eps)
        low_tau = band_temperature(q_pooled, k_pooled, low_dims, cfg.eps)
    else:
        high_tau = torch.full((b, hq), cfg.high_temperature, dtype=torch.float32, device=device)
        low_tau = torch.full((b, hq), cfg.low_temperature, dtype=torch.float32, device=device)

    # Stage 4 (contract §6): per-band softmax over admissible tiles, then top-p.
    admissible = admissible_tiles(layout, causal, device)
    high_probs = band_probabilities(band_logits(q_pooled, k_pooled, high_dims, high_tau),
                                    admissible)
    low_probs = band_probabilities(band_logits(q_pooled, k_pooled, low_dims, low_tau),
                                   admissible)
    high_keep, high_mass = top_p_select(high_probs, admissible, cfg.high_threshold)
    low_keep, low_mass = top_p_select(low_probs, admissible, cfg.low_threshold)

    # Stage 5: union of the bands, plus the forced sink and diagonal tiles.
    forced = forced_tiles(layout, causal, cfg.force_sink, cfg.force_diagonal, device)
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
    """Choose the (query tile, key tile) pairs to compute (contract §3 to §6).

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
        On any bad input of contract §8, before computing anything.

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
    if not estimator_spec(cfg.estimator).prism_bands:
        validate_qk(q, k, causal=causal)
        return estimator_mask(q, k, cfg, causal)
    return trace_selection(q, k, cfg, causal=causal).mask


def estimator_mask(q, k, cfg: PrismConfig, causal: bool = True, *, stages=None) -> torch.Tensor:
    """Selection by an estimator without Prism's bands, on validated inputs.

    The tiles of ``cfg.estimator`` (:func:`prism.reference.registry.estimator_tiles`)
    united with the forced tiles, within the admissible ones. ``stages``
    overrides scoring stages by name (:mod:`prism.optimized` passes its
    kernels); Prism's trace is this module's :func:`trace_selection`.

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool
    """
    layout = tile_layout(q.shape[2], k.shape[2], cfg.block_size, causal)
    device = q.device
    tiles = estimator_tiles(q, k, cfg, layout, causal,
                            {"prism_trace": trace_selection, **(stages or {})})
    forced = forced_tiles(layout, causal, cfg.force_sink, cfg.force_diagonal, device)
    return (tiles | forced) & admissible_tiles(layout, causal, device)


def boundary_ties(q, k, config: PrismConfig | None = None, *, causal: bool = True,
                  margin: float = TIE_MARGIN, relative: float = TIE_RELATIVE,
                  **overrides) -> torch.Tensor:
    """Mask entries on which two correct implementations may disagree (contract §6).

    An entry is a boundary tie when it is admissible and not forced, no band
    keeps it robustly, and in at least one band

    * the mass ranked before it lies within ``margin`` (:data:`TIE_MARGIN`)
      of the band's threshold, or its probability equals such an entry's to
      within ``relative`` (:data:`TIE_RELATIVE`); or
    * it is kept and its probability is within ``relative`` of the first
      dropped entry's, or it is dropped and its probability is within
      ``relative`` of the last kept entry's (another summation order may swap
      the two, wherever the cut falls in the mass).

    With a threshold of 1 neither rule applies (every tile of non-zero
    probability is kept, whatever the masses); instead the entries whose fp32
    probability is below the smallest normal fp32 number, zero included, are
    ties (underflow decides them).

    With another ``estimator`` (docs/estimators.rst) the entries come from every
    top-p decision of its selection:
    :func:`prism.reference.estimator_ties.estimator_boundary_ties`.

    Exact ties are not boundary ties: when every entry that the second rule
    flags in a row and band has the same pooled band key vector as the last
    kept one (identical key tiles), the probabilities are equal in every
    implementation and the index decides.

    Returns
    -------
    Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
    """
    cfg = resolve_config(config, **overrides)
    if estimator_spec(cfg.estimator).tiles is not None:
        # An estimator's union of top-p decisions (docs/estimators.rst).
        from .estimator_ties import estimator_boundary_ties

        return estimator_boundary_ties(q, k, cfg, causal=causal, margin=margin,
                                       relative=relative)
    return ties_from_trace(trace_selection(q, k, cfg, causal=causal), margin, relative)


#: Probabilities below the smallest normal fp32 number may flush or underflow
#: to zero, or not (in float64), so with ``p = 1`` such a tile may be kept or not.
_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def _same_vector_groups(vectors: torch.Tensor) -> torch.Tensor:
    """Group id of every row of ``vectors`` (..., n, d): equal ids iff bitwise equal rows."""
    lead = vectors.shape[:-1]
    flat = vectors.reshape(-1, vectors.shape[-1])
    if flat.shape[0] == 0:
        return torch.zeros(lead, dtype=torch.int64, device=vectors.device)
    # Prefix each row with its (batch, head) position so groups never span heads.
    owner = torch.arange(flat.shape[0] // max(1, lead[-1]), device=vectors.device,
                         dtype=torch.float64).repeat_interleave(lead[-1])
    keyed = torch.cat([owner[:, None], flat.double()], dim=1)
    _, ids = torch.unique(keyed, dim=0, return_inverse=True)
    return ids.reshape(lead)


def _band_ties(probs, mass, threshold, admissible, key_groups, margin, relative):
    """Entries of one band that another implementation may keep or drop, and the kept ones."""
    positive = probs > 0
    if threshold >= 1.0:
        # p = 1 keeps every tile of non-zero probability, whatever the masses:
        # only fp32 underflow can make two implementations disagree (float64
        # keeps what fp32 rounds to 0; some hardware flushes subnormals).
        keep = positive & admissible
        return admissible & (probs < _SMALLEST_NORMAL), keep
    keep = (mass < threshold) & positive & admissible
    dropped = admissible & positive & ~keep
    # Rule 1: the mass ranked before the entry is within the margin of p,
    # and the entries whose probability equals such an entry's.
    near = ((mass - threshold).abs() <= margin) & admissible & positive
    inf = torch.full_like(probs, float("inf"))
    lowest = torch.where(near, probs, inf).amin(-1, keepdim=True)
    highest = torch.where(near, probs, -inf).amax(-1, keepdim=True)
    flagged = near | (admissible & positive & (probs >= lowest * (1 - relative))
                      & (probs <= highest * (1 + relative)))
    # Rule 2: a kept entry near the first dropped one, or a dropped entry near
    # the last kept one, may swap with it under another summation order.
    last_kept = torch.where(keep, probs, inf).amin(-1, keepdim=True)
    first_dropped = torch.where(dropped, probs, -inf).amax(-1, keepdim=True)
    swap = ((keep & (probs <= first_dropped * (1 + relative)))
            | (dropped & (probs >= last_kept * (1 - relative))))
    # ... unless they are all copies of the last kept key tile: an exact tie,
    # which the index decides in every implementation.
    last_kept_index = torch.where(keep & (probs == last_kept), torch.arange(
        probs.shape[-1], device=probs.device), -1).amax(-1, keepdim=True).clamp(min=0)
    groups = key_groups.expand_as(probs)
    same = groups == torch.gather(groups, -1, last_kept_index)
    exact = (swap & ~same).sum(-1, keepdim=True) == 0
    flagged = flagged | (swap & ~exact)
    return flagged, keep


def ties_from_trace(trace: SelectionTrace, margin: float = TIE_MARGIN,
                    relative: float = TIE_RELATIVE) -> torch.Tensor:
    """:func:`boundary_ties` computed from an existing trace.

    ``margin`` is the absolute distance of the preceding mass from the
    threshold (contract §6.5, :data:`TIE_MARGIN`); ``relative`` the relative
    distance between two probabilities under which they may swap ranks
    (:data:`TIE_RELATIVE`).
    """
    cfg = trace.config
    if trace.mask.numel() == 0:
        return torch.zeros_like(trace.mask)
    group = trace.q_pooled.shape[1] // max(1, trace.k_pooled.shape[1])
    ties = torch.zeros_like(trace.mask)
    robust = torch.zeros_like(trace.mask)
    for probs, mass, threshold, dims in (
            (trace.high_probs, trace.high_mass_before, cfg.high_threshold, trace.high_dims),
            (trace.low_probs, trace.low_mass_before, cfg.low_threshold, trace.low_dims)):
        # Key tiles with bitwise-equal band vectors, per (batch, query head).
        key_groups = _same_vector_groups(trace.k_pooled[..., dims])
        key_groups = key_groups.repeat_interleave(group, dim=1)[:, :, None, :]
        flagged, keep = _band_ties(probs, mass, threshold, trace.admissible, key_groups,
                                   margin, relative)
        ties = ties | flagged
        robust = robust | (keep & ~flagged)
    return trace.admissible & ~trace.forced & ~robust & ties


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
