"""A full-attention pass that also measures what block selections would keep.

:class:`FullAttentionProbe` is an attention function for transformers. It
returns exactly what ``attn_implementation="sdpa"`` returns (it calls
transformers' own SDPA function), and on the side it records, per layer:

* the mean-pooled query and key tiles (enough to replay any pooling-based
  selection, e.g. mean pooling at any threshold),
* Prism's tile mask on these very queries and keys (:func:`prism.select_blocks`),
* optionally, the full-attention softmax mass of every (query tile, key tile)
  pair, summed over the query rows of the tile (:func:`tile_attention_mass`).

From the last, the *attention recall* of any tile mask follows without another
pass: the mass its selected tiles keep, averaged over queries and heads
(:func:`attention_recall`). Recall is thus measured on the activations of the
full-attention model, the same inputs for every selection method.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

import prism
from prism.reference import PrismConfig
from prism.reference.tiles import TileLayout, pool_tiles, tile_layout

# fp32 score elements (B x Hq x rows x keys) computed per chunk of query rows.
_CHUNK_ELEMENTS = 2**25


def tile_attention_mass(q: torch.Tensor, k: torch.Tensor, block_size: int,
                        scale: float | None = None) -> torch.Tensor:
    """Causal full-attention mass per (query tile, key tile), summed over each tile's queries.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
        Causal, bottom-right aligned (query row ``r`` at position ``Nk - Nq + r``);
        query head ``h`` reads KV head ``h // (Hq // Hkv)``.
    block_size : int
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.

    Returns
    -------
    Tensor (B, Hq, n_query_tiles, n_key_tiles), float32
        Entry ``[b, h, i, j]`` is the sum, over the queries of tile ``i``, of the
        softmax probability that falls on the keys of tile ``j``. Each row sums
        to the number of queries in its tile.

    Notes
    -----
    Written for speed on the CPU, where it runs once per layer of a long
    sequence: query rows go in chunks that end on tile boundaries and read only
    the keys they may see; the exponentials are taken in place; and the
    softmax normalisation divides the per-tile sums instead of every score.
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    layout = tile_layout(nq, nk, block_size, True)
    mass = torch.zeros(b, hq, layout.num_query_tiles, layout.num_key_tiles,
                       dtype=torch.float32, device=q.device)
    kf = k.float().unsqueeze(2)  # (B, Hkv, 1, Nk, D): shared by the group, never repeated
    rows_per_chunk = max(block_size, _CHUNK_ELEMENTS // max(1, b * hq * nk))
    rows_per_chunk -= rows_per_chunk % block_size
    r0 = 0
    while r0 < nq:
        tile_end = (layout.query_start + r0) // block_size + rows_per_chunk // block_size
        r1 = min(nq, tile_end * block_size - layout.query_start)
        first_pos = layout.query_start + r0
        key_stop = layout.query_start + r1
        n_rows = r1 - r0
        qf = (q[:, :, r0:r1].float() * scale).reshape(b, hkv, group, n_rows, d)
        scores = torch.matmul(qf, kf[:, :, :, :key_stop].transpose(-1, -2))
        # Only keys at or after the chunk's first position can lie in the future.
        future = (torch.arange(first_pos, key_stop, device=q.device)[None, :]
                  > torch.arange(first_pos, key_stop, device=q.device)[:, None])
        scores[..., first_pos:key_stop].masked_fill_(future, float("-inf"))
        scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
        full_tiles = key_stop // block_size
        per_tile = scores[..., : full_tiles * block_size].reshape(
            b, hkv, group, n_rows, full_tiles, block_size).sum(dim=-1)
        if key_stop > full_tiles * block_size:
            tail = scores[..., full_tiles * block_size :].sum(dim=-1, keepdim=True)
            per_tile = torch.cat([per_tile, tail], dim=-1)
        per_tile = per_tile / per_tile.sum(dim=-1, keepdim=True)
        per_tile = per_tile.reshape(b, hq, n_rows, per_tile.shape[-1])
        rows = torch.arange(first_pos, key_stop, device=q.device) // block_size
        mass[:, :, :, : per_tile.shape[-1]].index_add_(2, rows - layout.first_query_tile,
                                                       per_tile)
        r0 = r1
    return mass


def attention_recall(mask: torch.Tensor, mass: torch.Tensor, num_queries: int) -> float:
    """Full-attention mass kept by a tile mask, averaged over queries, heads and batch.

    Parameters
    ----------
    mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
    mass : Tensor (B, Hq, n_query_tiles, n_key_tiles)
        From :func:`tile_attention_mass` on the same queries and keys.
    num_queries : int
        ``Nq``.

    Returns
    -------
    float in [0, 1]; 1 when the mask keeps every tile that carries mass.
    """
    if mask.shape[-2:] != mass.shape[-2:]:
        raise ValueError(
            f"mask tiles {tuple(mask.shape[-2:])} do not match mass tiles "
            f"{tuple(mass.shape[-2:])}; build both with the same block_size"
        )
    rows = mass.shape[0] * mass.shape[1] * num_queries
    return float((mass * mask.expand_as(mass)).sum() / rows)


@dataclass
class LayerRecord:
    """What :class:`FullAttentionProbe` keeps of one layer's call."""

    layout: TileLayout
    q_pooled: torch.Tensor
    k_pooled: torch.Tensor
    prism_mask: torch.Tensor
    mass: torch.Tensor | None
    attention_seconds: float
    probe_seconds: float


class FullAttentionProbe:
    """Dense attention (transformers' SDPA) that records pooled tiles, Prism masks and mass.

    Parameters
    ----------
    config : PrismConfig
        Prism settings used for the recorded masks and the tile grid.
    measure_mass : bool
        Also compute :func:`tile_attention_mass` (the costly part, needed for recall).

    Attributes
    ----------
    layers : dict[int, LayerRecord]
        Filled by the forward pass, keyed by ``module.layer_idx``.
    """

    def __init__(self, config: PrismConfig, measure_mass: bool = True):
        self.config = config
        self.measure_mass = measure_mass
        self.layers: dict[int, LayerRecord] = {}

    def __call__(self, module, query, key, value, attention_mask, dropout: float = 0.0,
                 scaling: float | None = None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if attention_mask is not None or query.shape[2] != key.shape[2]:
            raise ValueError(
                "FullAttentionProbe measures single unpadded sequences without a KV cache; "
                "call the model on one sequence with use_cache=False"
            )
        t0 = time.perf_counter()
        out, _ = sdpa_attention_forward(module, query, key, value, None, dropout=0.0,
                                        scaling=scaling, is_causal=True)
        t1 = time.perf_counter()
        bs = self.config.block_size
        layout = tile_layout(query.shape[2], key.shape[2], bs, True)
        mass = tile_attention_mass(query, key, bs, scaling) if self.measure_mass else None
        self.layers[module.layer_idx] = LayerRecord(
            layout=layout,
            q_pooled=pool_tiles(query, layout.query_start, bs),
            k_pooled=pool_tiles(key, 0, bs),
            prism_mask=prism.select_blocks(query, key, self.config, causal=True),
            mass=mass,
            attention_seconds=t1 - t0,
            probe_seconds=time.perf_counter() - t1,
        )
        return out, None


__all__ = ["FullAttentionProbe", "LayerRecord", "attention_recall", "tile_attention_mass"]
