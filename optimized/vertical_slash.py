"""The vertical-slash stage on the GPU without scatter-adds.

:func:`vertical_slash_tile_mask` returns what
:func:`prism.reference.estimators.vertical_slash_tiles` returns. The reference
builds the slash distribution with a ``scatter_add`` of ``L x N`` probabilities
into ``N + P`` offsets and maps columns and offsets to tiles with
``index_add``; on a GPU those are atomic adds on a few addresses. Here every
step is a dense reduction:

* slash: the last query ``r`` (absolute position ``P_0 + r``) puts key ``n``'s
  probability at offset index ``P_0 + r + (Nk - 1 - n)``: its row, reversed
  and shifted right by ``r``. A pad-and-reshape skew shifts every row at once
  and one sum over rows gives the distribution;
* columns and offsets to tiles: the kept flags are padded to whole tiles and
  reduced with ``any`` over each tile's ``bs`` entries.

The distributions equal the reference's up to fp32 summation order, and the
top-p over them is the reference's :func:`~prism.reference.topp.top_p_select`.
"""

from __future__ import annotations

import math

import torch

from prism.reference.scoring import admissible_tiles
from prism.reference.tiles import TileLayout
from prism.reference.topp import top_p_select


def last_query_distributions_dense(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                                   last_queries: int, causal: bool = True):
    """:func:`prism.reference.estimators.last_query_distributions`, with a skewed sum for slash."""
    b, hq, nq_tokens, d = q.shape
    hkv, nk_tokens = k.shape[1], k.shape[2]
    group = hq // hkv
    rows = min(last_queries, nq_tokens)
    device = q.device
    tail = q[:, :, nq_tokens - rows:].float().reshape(b, hkv, group, rows, d)
    scores = torch.matmul(tail, k.float().unsqueeze(2).transpose(-1, -2)) / math.sqrt(d)
    scores = scores.reshape(b, hq, rows, nk_tokens)
    first = layout.query_start + nq_tokens - rows  # absolute position of the first row
    if causal:
        q_pos = torch.arange(first, first + rows, device=device)
        k_pos = torch.arange(nk_tokens, device=device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0) / max(rows, 1)
    vertical = probs.sum(dim=2)
    # Row r reversed lands at offset indices first + r + [0, Nk): skew by r, then sum.
    width = nk_tokens + rows - 1
    padded = torch.nn.functional.pad(probs.flip(-1), (0, rows))
    skewed = padded.reshape(b, hq, -1)[..., : rows * width].reshape(b, hq, rows, width)
    n_offsets = layout.query_start + nq_tokens + nk_tokens - 1
    slash = torch.zeros(b, hq, n_offsets, dtype=torch.float32, device=device)
    slash[..., first : first + width] = skewed.sum(dim=2)
    return vertical, slash


def _any_per_bin(flags: torch.Tensor, start: int, size: int, bins: int) -> torch.Tensor:
    """``out[..., t] = any(flags[..., i])`` over ``i - start`` in ``[t*size, (t+1)*size)``."""
    lead = flags.shape[:-1]
    out = torch.zeros(*lead, bins * size, dtype=torch.bool, device=flags.device)
    lo, hi = max(start, 0), min(start + flags.shape[-1], bins * size)
    if hi > lo:
        out[..., lo:hi] = flags[..., lo - start : hi - start]
    return out.view(*lead, bins, size).any(dim=-1)


def vertical_slash_tile_mask(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                             last_queries: int, threshold: float,
                             causal: bool = True) -> torch.Tensor:
    """Tile pairs holding a top-p key column or diagonal offset of the last queries.

    Same arguments and result as
    :func:`prism.reference.estimators.vertical_slash_tiles` (up to top-p
    boundary ties of the column and offset distributions).

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool
    """
    b, hq = q.shape[0], q.shape[1]
    nk_tokens = k.shape[2]
    bs = layout.block_size
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    device = q.device
    if nq == 0 or nk == 0:
        return torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=device)
    vertical, slash = last_query_distributions_dense(q, k, layout, last_queries, causal)
    ones = torch.ones((), dtype=torch.bool, device=device)
    keep_columns = top_p_select(vertical, ones, threshold)[0] & (vertical > 0)
    keep_offsets = top_p_select(slash, ones, threshold)[0] & (slash > 0)
    column_tiles = _any_per_bin(keep_columns, 0, bs, nk)
    # Offset index i holds offset o = i - (Nk - 1); a kept o keeps tile offsets
    # floor(o / bs) and ceil(o / bs). Tile offset t sits at index t + nk of the table.
    n_diag = layout.first_query_tile + nq + nk + 1
    shift = nk * bs - (nk_tokens - 1)  # index of offset o in a table where o = -nk*bs is 0
    floor_hits = _any_per_bin(keep_offsets, shift, bs, n_diag)
    ceil_hits = _any_per_bin(keep_offsets, shift + bs - 1, bs, n_diag)
    diagonal_tiles = floor_hits | ceil_hits
    query_tiles = layout.query_tile_indices(device)
    pair_offsets = query_tiles[:, None] - torch.arange(nk, device=device)[None, :] + nk
    from_slash = diagonal_tiles[..., pair_offsets.clamp(0, n_diag - 1)]
    return (column_tiles[:, :, None, :] | from_slash) & admissible_tiles(layout, causal, device)


__all__ = ["last_query_distributions_dense", "vertical_slash_tile_mask"]
