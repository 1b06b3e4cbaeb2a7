"""A full-attention pass that also measures what block selections would keep.

:class:`FullAttentionProbe` is an attention function for transformers. It
returns exactly what ``attn_implementation="sdpa"`` returns (it calls
transformers' own SDPA function), and on the side it records, per layer:

* the mean-pooled query and key tiles (enough to replay any pooling-based
  selection, e.g. mean pooling at any threshold),
* Prism's tile mask on these very queries and keys (:func:`prism.select_blocks`),
* optionally, the full-attention softmax mass of every (query tile, key tile)
  pair, summed over the query rows of the tile
  (:func:`prism.metrics.query_tile_mass`).

From the last, the *attention recall* of any tile mask follows without another
pass: the mass its selected tiles keep, averaged over queries
(:func:`prism.metrics.recall_from_mass`). Recall is thus measured on the
activations of the full-attention model, the same inputs for every selection
method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import prism
from prism.metrics import query_tile_mass
from prism.reference import PrismConfig
from prism.reference.tiles import TileLayout, pool_tiles, tile_layout


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
        Also compute :func:`prism.metrics.query_tile_mass` (the costly part, needed for
        recall).

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
        mass = (query_tile_mass(query, key, bs, scale=scaling) if self.measure_mass
                else None)
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


__all__ = ["FullAttentionProbe", "LayerRecord"]
