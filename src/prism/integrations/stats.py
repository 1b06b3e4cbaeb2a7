"""Per-call statistics of the transformers integration: an optional hook.

:class:`PrismStats` collects one :class:`AttentionCall` per call of the
attention function. Collecting is opt-in: the attention function times its
stages and counts tiles only when a collector was passed to
:func:`prism.integrations.transformers.register`. Timing synchronises the
device around each stage and counting reads tile counts back to the host, so
without a collector a call does neither. Densities follow the one definition
of :mod:`prism.metrics`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from prism.metrics import tile_counts
from prism.reference.tiles import tile_layout

__all__ = ["AttentionCall", "PrismStats", "clock", "count_tiles"]


def clock(t: torch.Tensor) -> float:
    """Host time after the device of ``t`` finished its queued work (statistics only)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


def count_tiles(mask: torch.Tensor, query_length: int, key_length: int,
                block_size: int) -> tuple[int, int]:
    """(selected, admissible) tile pairs of a causal mask, summed over batch rows and heads.

    :func:`prism.metrics.tile_counts` read back to the host (a synchronisation).
    """
    layout = tile_layout(query_length, key_length, block_size, True)
    selected, per_head = tile_counts(mask, layout, causal=True)
    return int(selected.sum()), per_head * selected.numel()


@dataclass
class AttentionCall:
    """Statistics of one call of the attention function.

    Attributes
    ----------
    layer : int or None
        ``module.layer_idx`` of the calling attention layer.
    mode : {"prism", "dense"}
        ``"dense"`` for decode steps and short queries (SDPA fallback).
    batch_size, query_length, key_length : int
    selected_tiles, admissible_tiles : int
        Tile pairs kept by the selection and causally admissible, summed over
        batch rows and query heads (0 for dense calls).
    selection_seconds, attention_seconds : float
        Wall time of the selection and of the attention stage.
    mask : Tensor or None
        The tile mask (B, Hq, n_query_tiles, n_key_tiles), kept only when the
        collector was built with ``keep_masks=True`` and the batch is unpadded;
        for a padded batch, a list with one mask per group of rows that share
        their real tokens (``None`` for a group without real queries).
    """

    layer: int | None
    mode: str
    batch_size: int
    query_length: int
    key_length: int
    selected_tiles: int = 0
    admissible_tiles: int = 0
    selection_seconds: float = 0.0
    attention_seconds: float = 0.0
    mask: object = None

    @property
    def density(self) -> float | None:
        """Selected / admissible tile pairs, or ``None`` for a dense call."""
        if self.mode != "prism" or self.admissible_tiles == 0:
            return None
        return self.selected_tiles / self.admissible_tiles


@dataclass
class PrismStats:
    """Collects one :class:`AttentionCall` per attention call, keyed by layer.

    One collector belongs to one registered name (or is shared on purpose by
    passing it to several :func:`register` calls); nothing is global.

    Parameters
    ----------
    keep_masks : bool
        Keep every prefill call's tile mask in its record (memory grows with
        every call; meant for tests and analysis).
    """

    keep_masks: bool = False
    calls: list[AttentionCall] = field(default_factory=list)

    def reset(self) -> None:
        """Forget every recorded call."""
        self.calls.clear()

    def record(self, call: AttentionCall) -> None:
        """Append one call (the attention function does this)."""
        self.calls.append(call)

    def sparse_calls(self, layer: int | None = None) -> list[AttentionCall]:
        """Prefill calls that ran Prism, optionally of one layer only."""
        return [c for c in self.calls
                if c.mode == "prism" and (layer is None or c.layer == layer)]

    def layers(self) -> list[int]:
        """Sorted layer indices that made at least one Prism call."""
        return sorted({c.layer for c in self.sparse_calls() if c.layer is not None})

    def density_by_layer(self) -> dict[int, float]:
        """Causal tile density of each layer: selected / admissible pairs over its calls."""
        result = {}
        for layer in self.layers():
            calls = self.sparse_calls(layer)
            admissible = sum(c.admissible_tiles for c in calls)
            if admissible:
                result[layer] = sum(c.selected_tiles for c in calls) / admissible
        return result

    def mean_density(self) -> float | None:
        """Selected / admissible tile pairs over all Prism calls (``None`` if there were none).

        When every layer sees the same shapes, this equals the mean over
        layers, batch rows and heads of the per-head density.
        """
        calls = self.sparse_calls()
        admissible = sum(c.admissible_tiles for c in calls)
        if not admissible:
            return None
        return sum(c.selected_tiles for c in calls) / admissible

    def seconds_by_layer(self) -> dict[int, dict[str, float]]:
        """Total selection and attention seconds of each layer's Prism calls."""
        return {
            layer: {
                "selection": sum(c.selection_seconds for c in self.sparse_calls(layer)),
                "attention": sum(c.attention_seconds for c in self.sparse_calls(layer)),
            }
            for layer in self.layers()
        }

    def summary(self) -> dict:
        """A JSON-ready digest: call counts, mean density and per-layer figures."""
        seconds = self.seconds_by_layer()
        density = self.density_by_layer()
        return {
            "calls": len(self.calls),
            "prism_calls": len(self.sparse_calls()),
            "dense_calls": sum(c.mode == "dense" for c in self.calls),
            "mean_density": self.mean_density(),
            "layers": {
                str(layer): {"density": density.get(layer), **seconds[layer]}
                for layer in self.layers()
            },
        }
