"""Scoring stages of the opt-in block-score estimators (docs/estimators.rst).

Every estimator keeps tiles on contract §3's absolute grid, with the same
admissible set and forced tiles (sink, diagonal) as contract §6; only the way
tile pairs are scored changes. This module holds the scoring stages; the
table of estimators, their parameters and how the stages combine is
:mod:`prism.reference.registry`.

* ``"antidiagonal"`` (XAttention-style): inside every ``stride x stride``
  sub-block of the token score matrix, sum the scores on one antidiagonal
  (``q[g*S + S-1-t] . k[g'*S + t]`` for ``t < S``); this reads every query and
  every key once, so positional (slash) and content (vertical) structure both
  survive, unlike a mean. A softmax over the admissible key groups, summed into
  tiles and renormalised per query tile, gives tile probabilities; tiles are
  kept by top-p at ``high_threshold``.
* ``"vertical_slash"`` (MInference/FlexPrefill-style): the exact attention of
  the last ``last_queries`` queries over all keys, averaged over those queries,
  gives a distribution over key columns (vertical lines) and, summed along
  ``q_pos - k_pos``, a distribution over diagonal offsets (slash lines). Top-p
  at ``vertical_slash_threshold`` on each picks token columns and offsets; a
  tile pair is kept when it holds a picked column or a picked offset.
* ``"prism_vertical_slash"``: the union of Prism's selection (contract §6) and the
  vertical-slash one.
* ``"antidiagonal_vertical_slash"``: the union of the antidiagonal selection
  (top-p at ``high_threshold``) and the vertical-slash one (top-p at
  ``vertical_slash_threshold``).
* ``"subtile"``: Prism's two band distributions computed on sub-tiles of
  ``block_size / subtile_factor`` tokens (finer pooling keeps more of the high
  band), summed per tile pair, then top-p per band and the union, as in contract §6.
* ``"sampled"``: the exact attention of ``sampled_queries`` queries per query
  tile (the last query of each of its equal runs), summed into key tiles;
  tiles are kept by top-p at ``high_threshold``.
* ``"sampled_vertical_slash"``: the union of the sampled-query selection and
  the vertical-slash one.
* ``"cascade"``: Prism's mask at ``candidate_threshold`` names the candidate
  tiles; antidiagonal scores are taken on the key groups of those tiles only
  (each query group's softmax over them); with ``sampled_weight`` > 0 these
  tile probabilities are mixed with the candidate-restricted exact attention
  of ``sampled_queries`` sampled queries per tile; top-p at
  ``high_threshold``, united with the vertical-slash tiles.
"""

from __future__ import annotations

import math

import torch

from .scoring import admissible_tiles
from .tiles import TileLayout, tile_layout
from .topp import top_p_select


def _absolute_grid(x: torch.Tensor, start: int, block_size: int, n_tiles: int) -> torch.Tensor:
    """Rows of ``x`` laid on whole tiles from tile ``start // block_size``, zero-filled, fp32."""
    b, h, n, d = x.shape
    grid = torch.zeros(b, h, n_tiles * block_size, d, dtype=torch.float32, device=x.device)
    lead = start % block_size
    grid[:, :, lead : lead + n] = x.float()
    return grid


def antidiagonal_probabilities(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                               stride: int, causal: bool = True,
                               candidates: torch.Tensor | None = None,
                               reduce: str = "mean") -> torch.Tensor:
    """Tile probabilities from strided antidiagonal scores (XAttention-style).

    Token rows are grouped into runs of ``stride`` on the absolute grid. Group
    ``g`` of queries and group ``g'`` of keys score::

        a[g, g'] = sum_t q[g*S + S-1-t] . k[g'*S + t] / (sqrt(D) * S),

    one antidiagonal of their ``S x S`` sub-block. Each query group takes a
    softmax over its admissible key groups (causal: ``g' <= g``; groups holding
    no key are excluded); the probabilities of the query groups of a tile are
    summed into key tiles and the row is renormalised to sum to 1.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    layout : TileLayout
        From :func:`prism.reference.tile_layout`; ``layout.block_size`` must be
        a multiple of ``stride``.
    stride : int
    causal : bool
    candidates : Tensor (B, Hq, nq, nk) bool, optional
        When given, each query group's softmax runs over the admissible key
        groups that lie in its query tile's candidate key tiles only (the
        ``"cascade"`` estimator); the result is zero outside the candidates.
        With every admissible tile a candidate the result is the same, bit
        for bit, as without.
    reduce : ``"mean"``, ``"lse"`` or ``"max"``
        How the ``S`` products of an antidiagonal make the group's logit.
        ``"mean"`` (every estimator's) is the formula above. ``"lse"``
        (a research variant, not an estimator's setting) takes
        ``log(mean_t exp(q[g*S + S-1-t] . k[g'*S + t] / sqrt(D)))``, so that
        ``exp`` of the logit is the sampled products' mean attention weight
        instead of the weight of their mean logit; ``"max"`` takes the largest
        product. With ``S = 1`` all three are the exact logit.

    Returns
    -------
    Tensor (B, Hq, nq, nk), float32
        Zero outside the admissible tiles; each row with an admissible tile
        sums to 1.
    """
    b, hq, nq_tokens, d = q.shape
    hkv, nk_tokens = k.shape[1], k.shape[2]
    group = hq // hkv
    bs = layout.block_size
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    per_tile = bs // stride
    q_grid = _absolute_grid(q, layout.query_start, bs, nq)
    k_grid = _absolute_grid(k, 0, bs, nk)
    # Reversing each query group pairs row S-1-t with key row t: an antidiagonal.
    q_groups = q_grid.view(b, hq, nq * per_tile, stride, d).flip(3)
    if reduce == "mean":
        q_groups = q_groups.reshape(b, hkv, group, nq * per_tile, stride * d)
        k_groups = k_grid.view(b, hkv, 1, nk * per_tile, stride * d)
        scores = torch.matmul(q_groups, k_groups.transpose(-1, -2)) / (math.sqrt(d) * stride)
    elif reduce in ("lse", "max"):
        # One product per position t of the antidiagonal, then reduced over t.
        q_rows = q_groups.reshape(b, hkv, group, nq * per_tile, stride, d).movedim(4, 1)
        k_rows = k_grid.view(b, hkv, nk * per_tile, stride, d).movedim(3, 1).unsqueeze(3)
        products = torch.matmul(q_rows, k_rows.transpose(-1, -2)) / math.sqrt(d)
        scores = (torch.logsumexp(products, dim=1) - math.log(stride) if reduce == "lse"
                  else products.amax(dim=1))
    else:
        raise ValueError(f"reduce must be 'mean', 'lse' or 'max', got {reduce!r}")
    scores = scores.reshape(b, hq, nq * per_tile, nk * per_tile)

    device = q.device
    first_group = layout.first_query_tile * per_tile
    query_groups = torch.arange(first_group, first_group + nq * per_tile, device=device)
    key_groups = torch.arange(nk * per_tile, device=device)
    # Groups that hold at least one real query or key; padding groups score nothing.
    q_lo = layout.query_start // stride
    q_hi = (layout.query_start + nq_tokens - 1) // stride if nq_tokens else q_lo - 1
    query_valid = (query_groups >= q_lo) & (query_groups <= q_hi)
    key_valid = key_groups < -(-nk_tokens // stride)
    allowed = key_valid[None, :].expand(query_groups.numel(), -1)
    if causal:
        allowed = allowed & (key_groups[None, :] <= query_groups[:, None])
    if candidates is not None:
        allowed = allowed & candidates.repeat_interleave(per_tile, dim=2).repeat_interleave(
            per_tile, dim=3)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0) * query_valid[:, None].to(probs.dtype)
    tiles = probs.view(b, hq, nq, per_tile, nk, per_tile).sum(dim=(3, 5))
    tiles = tiles * admissible_tiles(layout, causal, device).to(tiles.dtype)
    total = tiles.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, tiles / total.clamp_min(1e-30), torch.zeros_like(tiles))


def candidate_antidiagonal_probabilities(q: torch.Tensor, k: torch.Tensor,
                                         layout: TileLayout, stride: int, candidates: torch.Tensor,
                                         causal: bool = True) -> torch.Tensor:
    """:func:`antidiagonal_probabilities` over the ``candidates`` tiles only (``"cascade"``).

    Each query group's softmax runs over the admissible key groups of its
    query tile's candidate key tiles, so every query group weighs 1 in its
    tile's row; the row is then renormalised over the candidates. This is not
    the plain probabilities restricted and renormalised (there each query
    group weighs its mass on the candidates), unless every admissible tile is
    a candidate, where the two are equal bit for bit.
    """
    return antidiagonal_probabilities(q, k, layout, stride, causal, candidates=candidates)


def prism_candidate_tiles(q: torch.Tensor, k: torch.Tensor, cfg, causal: bool,
                          trace) -> torch.Tensor:
    """Prism's mask (contract §6, forced tiles included) at ``cfg.candidate_threshold``.

    Both bands' top-p run at ``candidate_threshold``; ``trace`` is
    :func:`prism.reference.trace_selection`, passed in as for
    :func:`subtile_band_probabilities`.

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool
    """
    p = cfg.candidate_threshold
    return trace(q, k, cfg.replace(estimator="prism", high_threshold=p, low_threshold=p),
                 causal=causal).mask


def last_query_distributions(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                             last_queries: int, causal: bool = True):
    """Vertical and slash distributions from the exact attention of the last queries.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    layout : TileLayout
    last_queries : int
        The last ``min(last_queries, Nq)`` query rows are used.
    causal : bool

    Returns
    -------
    vertical : Tensor (B, Hq, Nk), float32
        Mean attention probability of each key over the last queries.
    slash : Tensor (B, Hq, P + Nk), float32
        Mean probability mass at each offset ``q_pos - k_pos``, where ``P`` is
        the last query's absolute position; entry ``o + Nk - 1`` holds offset
        ``o``.
    """
    b, hq, nq_tokens, d = q.shape
    hkv, nk_tokens = k.shape[1], k.shape[2]
    group = hq // hkv
    rows = min(last_queries, nq_tokens)
    device = q.device
    tail = q[:, :, nq_tokens - rows :].float().reshape(b, hkv, group, rows, d)
    scores = torch.matmul(tail, k.float().unsqueeze(2).transpose(-1, -2)) / math.sqrt(d)
    scores = scores.reshape(b, hq, rows, nk_tokens)
    q_pos = torch.arange(nq_tokens - rows, nq_tokens, device=device) + layout.query_start
    k_pos = torch.arange(nk_tokens, device=device)
    if causal:
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0) / max(rows, 1)
    vertical = probs.sum(dim=2)
    offsets = (q_pos[:, None] - k_pos[None, :]) + (nk_tokens - 1)
    n_offsets = layout.query_start + nq_tokens + nk_tokens - 1
    slash = torch.zeros(b, hq, n_offsets, dtype=torch.float32, device=device)
    slash.scatter_add_(-1, offsets.reshape(1, 1, -1).expand(b, hq, -1),
                       probs.reshape(b, hq, -1))
    return vertical, slash


def last_tile_masses(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                     last_queries: int, causal: bool = True) -> torch.Tensor:
    """The last queries' exact attention per key tile: (B, Hq, nk), float32.

    The vertical distribution of :func:`last_query_distributions` (the exact
    attention of the last ``min(last_queries, Nq)`` queries, averaged over
    them) summed over each key tile's tokens (a partial last tile sums what
    it holds).
    """
    b, hq = q.shape[0], q.shape[1]
    nk, bs = layout.num_key_tiles, layout.block_size
    vertical, _ = last_query_distributions(q, k, layout, last_queries, causal)
    padded = torch.zeros(b, hq, nk * bs, dtype=torch.float32, device=q.device)
    padded[..., : vertical.shape[-1]] = vertical
    return padded.view(b, hq, nk, bs).sum(dim=-1)


def last_tile_exact_tiles(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                          last_queries: int, threshold: float,
                          causal: bool = True) -> torch.Tensor:
    """The last query tile's key tiles by top-p of the last queries' exact attention.

    The last query tile's row keeps the key tiles that top-p (contract §6's
    rule and tie-break) at ``threshold`` keeps on :func:`last_tile_masses`,
    never one of mass 0. Every other row is empty.

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool
        Restricted to the admissible tiles; not yet united with forced tiles.
    """
    b, hq = q.shape[0], q.shape[1]
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    out = torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=q.device)
    if nq == 0 or nk == 0:
        return out
    mass = last_tile_masses(q, k, layout, last_queries, causal)
    admissible = admissible_tiles(layout, causal, q.device)[-1]
    keep, _ = top_p_select(mass, admissible, threshold)
    out[:, :, -1] = keep & (mass > 0)
    return out


def vertical_slash_tiles(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                         last_queries: int, threshold: float,
                         causal: bool = True) -> torch.Tensor:
    """Tile pairs holding a top-p key column or a top-p diagonal offset of the last queries.

    Key columns and offsets are kept by top-p (contract §6's rule) at ``threshold``
    on the distributions of :func:`last_query_distributions`. A kept column
    keeps its key tile for every query tile; a kept offset ``o`` keeps every
    tile pair whose token offsets ``(I - j) * bs +- (bs - 1)`` contain ``o``
    (``I`` the query tile's absolute index), i.e. tile offsets
    ``floor(o / bs)`` and ``ceil(o / bs)``.

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool
        Restricted to the admissible tiles; not yet united with forced tiles.
    """
    b, hq = q.shape[0], q.shape[1]
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    if nq == 0 or nk == 0:
        return torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=q.device)
    vertical, slash = last_query_distributions(q, k, layout, last_queries, causal)
    return vertical_slash_tiles_from_distributions(vertical, slash, layout, threshold, causal)


def vertical_slash_tiles_from_distributions(vertical: torch.Tensor, slash: torch.Tensor,
                                            layout: TileLayout, threshold: float,
                                            causal: bool = True) -> torch.Tensor:
    """The second half of :func:`vertical_slash_tiles`: top-p columns and offsets to tiles.

    Parameters
    ----------
    vertical : Tensor (B, Hq, Nk), float32
    slash : Tensor (B, Hq, P + Nk), float32
        As returned by :func:`last_query_distributions` (or a kernel computing
        the same distributions).
    layout : TileLayout
    threshold : float in (0, 1]
    causal : bool

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool
        Restricted to the admissible tiles; not yet united with forced tiles.
    """
    ones = torch.ones((), dtype=torch.bool, device=vertical.device)
    keep_columns, _ = top_p_select(vertical, ones, threshold)
    keep_offsets, _ = top_p_select(slash, ones, threshold)
    return vertical_slash_tiles_from_kept(keep_columns & (vertical > 0),
                                          keep_offsets & (slash > 0), layout, causal)


def _any_per_bin(keep: torch.Tensor, lead: int, width: int, bins: int) -> torch.Tensor:
    """``out[..., t]``: any ``keep[..., i]`` with ``(i + lead) // width == t``, for ``t < bins``.

    ``lead`` zeros are put before the entries and the rest padded to ``bins``
    whole bins; entries that would fall past the last bin are dropped (callers
    never have any).
    """
    n = keep.shape[-1]
    total = bins * width
    padded = torch.zeros(*keep.shape[:-1], total, dtype=torch.bool, device=keep.device)
    take = max(0, min(n, total - lead))
    padded[..., lead : lead + take] = keep[..., :take]
    return padded.view(*keep.shape[:-1], bins, width).any(dim=-1)


def vertical_slash_tiles_from_kept(keep_columns: torch.Tensor, keep_offsets: torch.Tensor,
                                   layout: TileLayout, causal: bool = True) -> torch.Tensor:
    """Kept key columns and diagonal offsets to tile pairs (:func:`vertical_slash_tiles`' end).

    Parameters
    ----------
    keep_columns : Tensor (B, Hq, Nk), bool
    keep_offsets : Tensor (B, Hq, P + Nk), bool
        Entry ``o + Nk - 1`` is offset ``o``.
    layout : TileLayout
    causal : bool

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool, restricted to the admissible tiles
    """
    b, hq, nk_tokens = keep_columns.shape
    bs = layout.block_size
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    device = keep_columns.device
    admissible = admissible_tiles(layout, causal, device)
    if nq == 0 or nk == 0:
        return torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=device)
    # Columns -> key tiles: whole tiles of columns (zero-padded), any kept.
    column_tiles = _any_per_bin(keep_columns, 0, bs, nk)
    # Offsets -> tile offsets; tile offset d sits at index d + nk in the table.
    # Entry i is offset o = i - (Nk - 1), so floor(o / bs) + nk = floor((i + lead) / bs)
    # with lead = nk * bs - (Nk - 1) >= 1, and ceil(o / bs) + nk is the same with
    # lead + bs - 1. Every such index lies in [0, n_diag) (offsets run from
    # -(Nk - 1) to the last query's position).
    n_diag = layout.first_query_tile + nq + nk + 1
    lead = nk * bs - (nk_tokens - 1)
    diagonal_tiles = (_any_per_bin(keep_offsets, lead, bs, n_diag)
                      | _any_per_bin(keep_offsets, lead + bs - 1, bs, n_diag))
    query_tiles = layout.query_tile_indices(device)
    pair_offsets = query_tiles[:, None] - torch.arange(nk, device=device)[None, :] + nk
    from_slash = diagonal_tiles[..., pair_offsets.clamp(0, n_diag - 1)]
    return (column_tiles[:, :, None, :] | from_slash) & admissible


def sampled_query_positions(layout: TileLayout, samples: int, device=None):
    """The sampled queries of every query tile: the last real query of each of its runs.

    Query tile ``I`` (absolute) is cut into ``samples`` runs of
    ``block_size / samples`` positions; run ``t`` covers
    ``[I*bs + t*run, I*bs + (t+1)*run)``. Its sample is the last real query in
    it (the run's last position, or the last query when the queries end
    inside the run). A run holding no real query has no sample.

    Returns
    -------
    rows : Tensor (nq, samples), int64
        Query row (index into ``q``'s token axis) of each sample; 0 where invalid.
    positions : Tensor (nq, samples), int64
        Absolute position of each sample.
    valid : Tensor (nq, samples), bool
    """
    run = layout.block_size // samples
    tiles = layout.query_tile_indices(device)
    starts = tiles[:, None] * layout.block_size + torch.arange(samples, device=device) * run
    last_query = layout.query_start + layout.num_queries - 1
    positions = torch.clamp(starts + run - 1, max=last_query)
    valid = positions >= torch.clamp(starts, min=layout.query_start)
    rows = torch.where(valid, positions - layout.query_start, torch.zeros_like(positions))
    return rows, positions, valid


def sampled_query_probabilities(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                                samples: int, causal: bool = True,
                                candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Tile probabilities from the exact attention of a few sampled queries per tile.

    Each sampled query (:func:`sampled_query_positions`) takes the exact
    softmax of ``q . k / sqrt(D)`` over its admissible keys (causal: keys at
    or before its position); its probabilities are summed into key tiles. A
    query tile's row is the sum over its samples, restricted to the
    admissible tiles and renormalised to 1. This costs ``samples * N / bs``
    query rows against all keys: ``N^2 D * samples / bs`` multiply-adds
    instead of dense attention's ``N^2 D``.

    With ``candidates`` (B, Hq, nq, nk) bool, a sample's softmax runs over the
    admissible keys of its (query head, query tile)'s candidate key tiles
    only, so every sample with such a key weighs 1 in its row (the
    ``"cascade"``'s sampled stage, :func:`candidate_sampled_probabilities`).

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    layout : TileLayout
        ``layout.block_size`` must be a multiple of ``samples``.
    samples : int
    causal : bool

    Returns
    -------
    Tensor (B, Hq, nq, nk), float32
        Zero outside the admissible tiles; each row with an admissible tile
        sums to 1.
    """
    b, hq, _, d = q.shape
    hkv, nk_tokens = k.shape[1], k.shape[2]
    group = hq // hkv
    bs = layout.block_size
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    device = q.device
    rows, positions, valid = sampled_query_positions(layout, samples, device)
    picked = q[:, :, rows.reshape(-1)].float().reshape(b, hkv, group, nq * samples, d)
    scores = torch.matmul(picked, k.float().unsqueeze(2).transpose(-1, -2)) / math.sqrt(d)
    scores = scores.reshape(b, hq, nq * samples, nk_tokens)
    allowed = valid.reshape(-1, 1).expand(-1, nk_tokens)
    if causal:
        key_pos = torch.arange(nk_tokens, device=device)
        allowed = allowed & (key_pos[None, :] <= positions.reshape(-1, 1))
    if candidates is not None:
        # Key token j lies in key tile j // bs; each sample takes its tile's row.
        by_key = candidates[..., torch.arange(nk_tokens, device=device) // bs]
        allowed = allowed & by_key.repeat_interleave(samples, dim=2)
    probs = torch.nan_to_num(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1),
                             nan=0.0)
    padded = torch.zeros(b, hq, nq * samples, nk * bs, dtype=torch.float32, device=device)
    padded[..., :nk_tokens] = probs
    tiles = padded.view(b, hq, nq, samples, nk, bs).sum(dim=(3, 5))
    tiles = tiles * admissible_tiles(layout, causal, device).to(tiles.dtype)
    total = tiles.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, tiles / total.clamp_min(1e-30), torch.zeros_like(tiles))


def candidate_sampled_probabilities(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                                    samples: int, candidates: torch.Tensor,
                                    causal: bool = True) -> torch.Tensor:
    """The ``"cascade"``'s sampled stage: :func:`sampled_query_probabilities` with
    each sample's softmax over its query tile's candidate key tiles only.

    Returns
    -------
    Tensor (B, Hq, nq, nk), float32
        Zero outside the admissible candidate tiles; rows with one sum to 1.
    """
    return sampled_query_probabilities(q, k, layout, samples, causal, candidates=candidates)


def mix_tile_probabilities(first: torch.Tensor, second: torch.Tensor,
                           weight: float) -> torch.Tensor:
    """``(1 - weight) * first + weight * second``, each row renormalised to 1.

    Both inputs hold rows that sum to 1 or are all zero (tile probabilities);
    a row zero in one input is the other's row. Rows zero in both stay zero.
    """
    mixed = (1.0 - weight) * first + weight * second
    total = mixed.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, mixed / total.clamp_min(1e-30), torch.zeros_like(mixed))


def subtile_band_probabilities(q: torch.Tensor, k: torch.Tensor, cfg, causal: bool,
                               trace):
    """Prism's band probabilities scored on sub-tiles and summed per tile pair.

    contract §3 to §6's pooling, bands, calibration and per-band softmax run with
    tile ``block_size / subtile_factor`` on the same absolute grid (sub-tile
    ``T`` lies in tile ``T // subtile_factor``). Each band's probabilities are
    summed over the sub-rows of a query tile and the sub-columns of a key tile,
    restricted to the admissible tiles and renormalised per query tile.

    Parameters
    ----------
    q, k : Tensors, as in :func:`prism.reference.select_blocks`
    cfg : PrismConfig
    causal : bool
    trace : callable
        Prism's selection trace, :func:`prism.reference.trace_selection`
        (passed in, so this module never imports the selection it feeds).

    Returns
    -------
    (high, low) : two Tensors (B, Hq, nq, nk), float32
    """
    factor = cfg.subtile_factor
    fine = trace(q, k, cfg.replace(estimator="prism",
                                             block_size=cfg.block_size // factor),
                           causal=causal)
    layout = tile_layout(q.shape[2], k.shape[2], cfg.block_size, causal)
    device = q.device
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    rows = fine.layout.query_tile_indices(device) // factor - layout.first_query_tile
    cols = torch.arange(fine.layout.num_key_tiles, device=device) // factor
    admissible = admissible_tiles(layout, causal, device).to(torch.float32)
    result = []
    for probs in (fine.high_probs, fine.low_probs):
        b, hq = probs.shape[:2]
        by_col = torch.zeros(b, hq, probs.shape[2], nk, dtype=torch.float32, device=device)
        by_col.index_add_(-1, cols, probs)
        tiles = torch.zeros(b, hq, nq, nk, dtype=torch.float32, device=device)
        tiles.index_add_(2, rows, by_col)
        tiles = tiles * admissible
        total = tiles.sum(dim=-1, keepdim=True)
        result.append(torch.where(total > 0, tiles / total.clamp_min(1e-30),
                                  torch.zeros_like(tiles)))
    return result[0], result[1]


__all__ = [
    "antidiagonal_probabilities",
    "candidate_antidiagonal_probabilities",
    "last_query_distributions",
    "last_tile_exact_tiles",
    "last_tile_masses",
    "prism_candidate_tiles",
    "sampled_query_positions",
    "sampled_query_probabilities",
    "subtile_band_probabilities",
    "vertical_slash_tiles",
    "vertical_slash_tiles_from_distributions",
    "vertical_slash_tiles_from_kept",
]
