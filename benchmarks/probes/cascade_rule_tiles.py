"""The rules of ``cascade_rules.py`` as functions on tile masks and probabilities.

Split from the probe so that each file holds one job: this one parses the rule
names and computes the tiles each rule adds, keeps or drops (from the reference's
stages; nothing here is a new implementation of a contract stage); the probe wires
them into the reference cascade and the sweep. The rules are described in
``cascade_rules.py``'s docstring.
"""

from __future__ import annotations

import torch

from prism.reference.estimators import (
    last_query_distributions,
    last_tile_exact_tiles,
    vertical_slash_tiles_from_kept,
)
from prism.reference.topp import top_p_select


def parse_rule(text: str) -> dict:
    """``"none"``, ``"min_tiles=M"`` or ``"entropy_p=T:P"`` -> a dict describing the rule."""
    text = text.strip()
    if text == "none":
        return {"name": "none"}
    name, _, value = text.partition("=")
    if name == "min_tiles":
        m = int(value)
        if m < 1:
            raise ValueError(f"min_tiles needs M >= 1, got {m}")
        return {"name": "min_tiles", "m": m}
    if name == "entropy_p":
        tau, _, high = value.partition(":")
        tau, high = float(tau), float(high)
        if not 0.0 < high <= 1.0:
            raise ValueError(f"entropy_p needs P in (0, 1], got {high}")
        return {"name": "entropy_p", "tau": tau, "p_high": high}
    if name == "reduce":
        if value not in ("mean", "lse", "max"):
            raise ValueError(f"reduce needs mean, lse or max, got {value!r}")
        return {"name": "reduce", "reduce": value}
    if name == "mix":
        samples, _, weight = value.partition(":")
        samples, weight = int(samples), float(weight)
        if samples < 1 or not 0.0 <= weight <= 1.0:
            raise ValueError(f"mix needs Q >= 1 and W in [0, 1], got {value!r}")
        return {"name": "mix", "samples": samples, "weight": weight}
    if name == "hybrid":
        if value not in ("count", "rank"):
            raise ValueError(f"hybrid needs count or rank, got {value!r}")
        return {"name": "hybrid", "take": value}
    if name == "global_p":
        if value not in ("head", "layer"):
            raise ValueError(f"global_p needs head or layer, got {value!r}")
        return {"name": "global_p", "scope": value}
    if name == "prism_count":
        p = float(value)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"prism_count needs P in (0, 1], got {p}")
        return {"name": "prism_count", "p": p}
    if text == "no_vs":
        return {"name": "no_vs"}
    if name == "vs_coarse":
        p = float(value)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"vs_coarse needs P in (0, 1], got {p}")
        return {"name": "vs_coarse", "p": p}
    if name == "last_tile":
        if value == "half":
            return {"name": "last_tile", "p": None}
        p = float(value)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"last_tile needs P in (0, 1] or 'half', got {p}")
        return {"name": "last_tile", "p": p}
    raise ValueError(f"unknown rule {text!r}; use none, min_tiles=M, entropy_p=T:P, "
                     "prism_count=P, global_p=head|layer, reduce=lse|max, "
                     "hybrid=count|rank, mix=Q:W, last_tile=P, no_vs or vs_coarse=P")


#: Rule name -> its label (the inverse of :func:`parse_rule`).
_LABELS = {
    "min_tiles": lambda r: f"min_tiles={r['m']}",
    "entropy_p": lambda r: f"entropy_p={r['tau']:g}:{r['p_high']:g}",
    "prism_count": lambda r: f"prism_count={r['p']:g}",
    "global_p": lambda r: f"global_p={r['scope']}",
    "reduce": lambda r: f"reduce={r['reduce']}",
    "hybrid": lambda r: f"hybrid={r['take']}",
    "mix": lambda r: f"mix={r['samples']}:{r['weight']:g}",
    "last_tile": lambda r: "last_tile=half" if r["p"] is None else f"last_tile={r['p']:g}",
    "no_vs": lambda r: "no_vs",
    "vs_coarse": lambda r: f"vs_coarse={r['p']:g}",
    "none": lambda r: "none",
}


def rule_label(rule: dict) -> str:
    return _LABELS[rule["name"]](rule)


def last_tile_exact(q, k, layout, last_queries: int, threshold: float,
                    causal: bool) -> torch.Tensor:
    """The ``last_tile`` rule's tiles: the reference's cascade step 4 (since da34f8b
    part of the cascade itself, so applying it again after the committed cascade
    adds nothing at ``last_tile=half``)."""
    return last_tile_exact_tiles(q, k, layout, last_queries, threshold, causal)


def coarse_vertical_slash_tiles(q, k, layout, last_queries: int, threshold: float,
                                causal: bool) -> torch.Tensor:
    """The ``vs_coarse`` rule's tiles: the vertical-slash stage with its top-p run on
    tile bins instead of single columns and offsets.

    The last queries' distributions (:func:`last_query_distributions`) are summed
    into key tiles (columns) and into bins of ``block_size`` offsets (bin ``t``
    holds offsets ``o`` with ``floor(o / bs) + nk == t``); each is top-p'd at
    ``threshold`` (contract §6's rule, zero mass never kept). Every column of a
    kept key tile and every offset of a kept bin then counts as kept, and the
    reference maps them to tile pairs (:func:`vertical_slash_tiles_from_kept`): a
    kept key tile for every query tile, a kept bin's tile offsets ``t`` and ``t + 1``.
    (The runs in ``results/eval/unseen/no-vs/`` used a direct form of that mapping;
    the two gave equal tiles on 600 drawn shapes before this one replaced it.)
    """
    b, hq = q.shape[0], q.shape[1]
    bs, nq, nk = layout.block_size, layout.num_query_tiles, layout.num_key_tiles
    device = q.device
    if nq == 0 or nk == 0:
        return torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=device)
    vertical, slash = last_query_distributions(q, k, layout, last_queries, causal)
    nk_tokens = vertical.shape[-1]
    columns = torch.zeros(b, hq, nk * bs, dtype=torch.float32, device=device)
    columns[..., :nk_tokens] = vertical
    columns = columns.view(b, hq, nk, bs).sum(-1)
    # Offset entry i sits at i + lead in whole bins (as the reference's mapping reads it).
    bins = layout.first_query_tile + nq + nk + 2
    lead = nk * bs - (nk_tokens - 1)
    offsets = torch.zeros(b, hq, bins * bs, dtype=torch.float32, device=device)
    offsets[..., lead:lead + slash.shape[-1]] = slash
    offsets = offsets.view(b, hq, bins, bs).sum(-1)
    ones = torch.ones((), dtype=torch.bool, device=device)
    keep_columns = top_p_select(columns, ones, threshold)[0] & (columns > 0)
    keep_bins = top_p_select(offsets, ones, threshold)[0] & (offsets > 0)
    return vertical_slash_tiles_from_kept(
        keep_columns.repeat_interleave(bs, -1)[..., :nk_tokens],
        keep_bins.repeat_interleave(bs, -1)[..., lead:lead + slash.shape[-1]], layout, causal)


def head_flatness(probs: torch.Tensor) -> torch.Tensor:
    """Mean normalised entropy of each (batch, head)'s rows, shape (B, Hq).

    A row's normalised entropy is ``-sum(p log p) / log(n)`` over its ``n``
    positive probabilities; rows with ``n < 2`` are left out (a head with no
    such row gets 0).
    """
    positive = probs > 0
    n = positive.sum(-1)
    plogp = torch.where(positive, probs * probs.clamp_min(1e-30).log(), torch.zeros_like(probs))
    entropy = -plogp.sum(-1)
    rows = n >= 2
    normalised = torch.where(rows, entropy / n.clamp_min(2).float().log(),
                             torch.zeros_like(entropy))
    counted = rows.sum(-1)
    return torch.where(counted > 0, normalised.sum(-1) / counted.clamp_min(1),
                       torch.zeros(counted.shape, dtype=probs.dtype, device=probs.device))


def add_min_tiles(mask: torch.Tensor, probs: torch.Tensor, admissible: torch.Tensor,
                  m: int | torch.Tensor) -> torch.Tensor:
    """``mask`` with every row topped up to ``m`` admissible tiles by ``probs`` (ties: lower index).

    Parameters
    ----------
    mask : Tensor (B, Hq, nq, nk), bool, within ``admissible``
    probs : Tensor (B, Hq, nq, nk), float32 (the cascade's tile probabilities)
    admissible : Tensor (nq, nk), bool
    m : int, or Tensor (B, Hq, nq, 1) of per-row minimums
    """
    admissible = admissible.expand_as(mask)
    need = (m - mask.sum(-1, keepdim=True)).clamp_min(0)
    free = admissible & ~mask
    score = torch.where(free, probs.float(), torch.full_like(probs, -1.0, dtype=torch.float32))
    # Stable descending sort: equal scores keep ascending tile order, so ties go
    # to the lower key tile index; non-free tiles (score -1) come last.
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                  .expand_as(order).contiguous())
    return mask | (free & (rank < need))


def global_top_p(probs: torch.Tensor, threshold: float, scope: str) -> torch.Tensor:
    """Top-p over all rows of a head (``scope="head"``) or of the call (``"layer"``) at once.

    Every row of ``probs`` with positive mass sums to 1. The tiles of the
    scope are taken in descending probability (ties: lower flat index), and
    kept while the mass before them is below ``threshold`` times the number of
    rows with mass: the fewest tiles that keep that total mass, wherever the
    rows lose it. Tiles of probability 0 are never kept.

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool
    """
    b, hq, nq, nk = probs.shape
    flat = probs.reshape(b, hq, nq * nk) if scope == "head" else probs.reshape(b, 1, -1)
    rows = (probs.sum(-1) > 0).reshape(flat.shape[0], flat.shape[1], -1).sum(-1, keepdim=True)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(flat, -1, order)
    before = torch.cumsum(ranked, dim=-1) - ranked
    keep_ranked = (before < threshold * rows.to(ranked.dtype)) & (ranked > 0)
    keep = torch.zeros_like(keep_ranked)
    keep.scatter_(-1, order, keep_ranked)
    return keep.reshape(b, hq, nq, nk)
