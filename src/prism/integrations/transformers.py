"""Prism as a Hugging Face transformers attention implementation.

Example (not run as a doctest: it needs a model)::

    from prism.integrations.transformers import register
    stats = register("prism", block_size=64)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="prism")
    model(input_ids)
    stats.density_by_layer()     # {0: 0.41, 1: 0.37, ...}

How transformers (5.x) calls the function
-----------------------------------------
Every attention layer calls ``fn(module, query, key, value, attention_mask,
dropout=..., scaling=..., **kwargs)`` with ``query`` (B, Hq, L, D) after RoPE,
``key``/``value`` (B, Hkv, S, D) after RoPE and after the KV cache update, not
repeated for GQA, and expects ``(output (B, L, Hq, D), weights or None)``. The
mask comes from the mask function registered under the same name
(``AttentionMaskInterface``); :func:`register` registers transformers'
``sdpa_mask``, which returns ``None`` for a plain causal batch and a bool
(B, 1, L, S) mask otherwise. Without a registered mask function, transformers
hands custom implementations no mask at all, and a padded batch would be
silently wrong.

What runs where
---------------
* Prefill (``L >= min_query_length``, default one tile): Prism's selection
  (:func:`prism.select_blocks`, optimized kernels on CUDA, the reference
  elsewhere) and then block-sparse attention on the selected tiles, with the
  module's ``scaling`` and un-repeated K/V. These are the two stages that
  :func:`prism.prism_attention` chains; they are called one after the other
  here so that each can be timed. With a KV prefix (chunked prefill) the
  queries are the last ``L`` of the ``S`` positions, as SPEC 2 prescribes.
* Decode steps and any call with fewer queries than ``min_query_length``:
  dense attention, by transformers' own SDPA function (identical to
  ``attn_implementation="sdpa"``).

Padding
-------
Padded batches are honoured, never silently mixed: each row is stripped to its
contiguous run of real tokens and Prism runs on that row alone, so every real
token gets exactly what it would get in an unpadded batch of one. Its tile grid
starts at the row's first real token. Left padding (``tokenizer.padding_side =
"left"``, as used for generation) and right padding both work; outputs at pad
positions are 0. Rows whose real tokens fill the same positions run as one
batch. Static caches work too: their unused key slots are never read. A mask
that is not "causal and key padding" (packed sequences, sliding windows shorter
than the input, right padding followed by generated tokens, additive biases)
raises ``ValueError`` and names the fix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import prism
from prism.reference import PrismConfig, resolve_config
from prism.reference.scoring import admissible_tiles
from prism.reference.tiles import tile_layout

from .masked_sdpa import masked_sdpa_attention

#: Attention backends: ``"prism"`` runs :func:`prism.block_sparse_attention`
#: (Triton on CUDA, the reference elsewhere); ``"masked_sdpa"`` runs
#: :func:`prism.integrations.masked_sdpa.masked_sdpa_attention` (same output,
#: computed densely by torch SDPA; the fast choice on the CPU).
BACKENDS = ("prism", "masked_sdpa")


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


Selector = Callable[..., torch.Tensor]


def _synchronize(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def _allowed_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool view (B, H', L, S) of a transformers mask: True where a key may be read."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if not attention_mask.is_floating_point():
        raise TypeError(
            f"attention_mask must be bool or an additive float mask, got {attention_mask.dtype}"
        )
    blocked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    if not bool(((attention_mask == 0) | blocked).all()):
        raise ValueError(
            "the prism attention implementation got an additive attention mask with biases "
            "other than 0 and -inf; Prism cannot add per-position biases (ALiBi, relative "
            "position bias): use attn_implementation='sdpa' for this model"
        )
    return ~blocked


def key_spans(attention_mask: torch.Tensor | None, query_length: int,
              key_length: int) -> tuple[int, list[tuple[int, int]]] | None:
    """Where the queries sit among the keys, and each batch row's contiguous real keys.

    Parameters
    ----------
    attention_mask : Tensor (B, 1 or H, L, S) or None
        As passed by transformers (bool, or additive float with 0 / min).
    query_length, key_length : int
        ``L`` and ``S``.

    Returns
    -------
    None, or (query_start, spans)
        ``None`` when there is no mask or the mask is plain causal with the
        queries on the last ``L`` key positions and no padding. Otherwise
        query row ``r`` sits at key position ``query_start + r`` and
        ``spans[b] = (start, stop)`` is the range of keys that row ``b``'s
        queries read (``start == stop`` for a row without real tokens). Keys
        past the last query (unused slots of a static cache) are outside
        every span.

    Raises
    ------
    ValueError
        If the mask is not "causal and key padding", if heads disagree, or if
        a row's real tokens are not contiguous.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (query_length, key_length):
        raise ValueError(
            f"attention_mask must be (B, 1 or H, {query_length}, {key_length}) for these "
            f"queries and keys, got shape {tuple(attention_mask.shape)}"
        )
    allowed = _allowed_from_mask(attention_mask)
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        raise ValueError(
            "the prism attention implementation needs one mask shared by all heads, got a "
            "per-head attention_mask; use attn_implementation='sdpa' for this model"
        )
    allowed = allowed[:, 0]
    batch, device = allowed.shape[0], allowed.device
    read_keys = allowed.any(dim=-2)  # (B, S): keys that some query reads
    if not bool(read_keys.any()):
        return key_length - query_length, [(0, 0)] * batch
    # A real query reads itself last, so its position is its last readable key;
    # pad queries read nothing or stop short of their position.
    keys = torch.arange(key_length, device=device)
    rows = torch.arange(query_length, device=device)
    last_read = torch.where(allowed, keys, -1).amax(dim=-1)  # (B, L)
    query_start = int((last_read - rows).max())
    positions = query_start + rows
    expected = (keys[None, :] <= positions[:, None])[None] & read_keys[:, None, :]
    if query_start < 0 or query_start + query_length > key_length \
            or not bool((allowed == expected).all()):
        raise ValueError(
            "the prism attention implementation supports causal masks with key padding "
            "only; this mask has another pattern (packed sequences, a sliding window "
            "shorter than the input, or a custom 4D mask). Run such inputs with "
            "attn_implementation='sdpa', or unpack them into a padded batch"
        )
    if query_start == key_length - query_length and bool(read_keys.all()):
        return None
    spans = []
    for row, keys_of_row in enumerate(read_keys):
        idx = keys_of_row.nonzero().flatten()
        if idx.numel() == 0:
            spans.append((0, 0))
            continue
        start, stop = int(idx[0]), int(idx[-1]) + 1
        if idx.numel() != stop - start:
            raise ValueError(
                f"batch row {row} has padding between real tokens (keys {start}..{stop - 1} "
                f"hold {idx.numel()} real tokens); Prism needs each row's tokens to be "
                "contiguous. This happens when a right-padded batch is continued by "
                "generation: pad on the left (tokenizer.padding_side = 'left')"
            )
        spans.append((start, stop))
    return query_start, spans


class PrismAttention:
    """The attention function registered by :func:`register`.

    Parameters
    ----------
    config : PrismConfig
    stats : PrismStats
        Receives one record per call.
    min_query_length : int
        Calls with fewer queries run dense SDPA (decode steps, short chunks).
    backend : {"prism", "masked_sdpa"}
        Attention stage for the selected tiles (see :data:`BACKENDS`).
    selector : callable, optional
        ``selector(q, k, config, causal=True) -> bool mask`` replacing
        :func:`prism.select_blocks`, e.g. a baseline selection rule.
    """

    def __init__(self, config: PrismConfig, stats: PrismStats, min_query_length: int,
                 backend: str = "prism", selector: Selector | None = None):
        self.config = config
        self.stats = stats
        self.min_query_length = min_query_length
        self.backend = backend
        self.selector = selector

    def __repr__(self) -> str:
        selector = "prism.select_blocks" if self.selector is None else repr(self.selector)
        return (f"PrismAttention(config={self.config}, backend={self.backend!r}, "
                f"selector={selector}, min_query_length={self.min_query_length})")

    def __call__(self, module, query, key, value, attention_mask, dropout: float = 0.0,
                 scaling: float | None = None, is_causal: bool | None = None, **kwargs):
        self._check_call(module, dropout, is_causal, kwargs)
        layer = getattr(module, "layer_idx", None)
        b, _, q_len, _ = query.shape
        k_len = key.shape[2]
        if q_len < self.min_query_length:
            return self._dense(module, query, key, value, attention_mask, scaling, layer)

        if attention_mask is None and k_len > q_len:
            # transformers sends no mask with more keys than queries only when it
            # prefills an empty static cache: the keys past the queries are unused
            # slots (its own SDPA function drops them the same way).
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        layout = key_spans(attention_mask, q_len, key.shape[2])
        if layout is None:
            out, mask, selected, admissible, t_sel, t_att = self._sparse(query, key, value,
                                                                         scaling)
        else:
            out, mask, selected, admissible, t_sel, t_att = self._sparse_padded(
                query, key, value, scaling, *layout)
        self.stats.record(AttentionCall(
            layer=layer, mode="prism", batch_size=b, query_length=q_len, key_length=k_len,
            selected_tiles=selected, admissible_tiles=admissible, selection_seconds=t_sel,
            attention_seconds=t_att, mask=mask if self.stats.keep_masks else None,
        ))
        return out.transpose(1, 2).contiguous(), None

    @staticmethod
    def _check_call(module, dropout, is_causal, kwargs) -> None:
        if dropout:
            raise ValueError(
                f"the prism attention implementation is for inference and got dropout={dropout}; "
                "call model.eval() first"
            )
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not causal:
            raise ValueError(
                f"the prism attention implementation supports causal self-attention only, but "
                f"{type(module).__name__} is non-causal; keep attn_implementation='sdpa' for "
                "encoders and cross-attention"
            )
        for name in ("softcap", "s_aux", "sinks", "position_bias"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"the prism attention implementation does not support {name!r} (the model "
                    f"passed one); use attn_implementation='sdpa' for this model"
                )

    def _dense(self, module, query, key, value, attention_mask, scaling, layer):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _synchronize(query)
        t0 = time.perf_counter()
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        dropout=0.0, scaling=scaling, is_causal=True)
        _synchronize(query)
        self.stats.record(AttentionCall(
            layer=layer, mode="dense", batch_size=query.shape[0], query_length=query.shape[2],
            key_length=key.shape[2], attention_seconds=time.perf_counter() - t0,
        ))
        return out, None

    def _sparse(self, query, key, value, scaling):
        """Selection then attention on one unpadded (sub-)batch."""
        cfg = self.config
        _synchronize(query)
        t0 = time.perf_counter()
        if self.selector is None:
            mask = prism.select_blocks(query, key, cfg, causal=True)
        else:
            mask = self.selector(query, key, cfg, causal=True)
        _synchronize(query)
        t1 = time.perf_counter()
        if self.backend == "prism":
            out = prism.block_sparse_attention(query, key, value, mask,
                                               block_size=cfg.block_size, causal=True,
                                               scale=scaling)
        else:
            out = masked_sdpa_attention(query, key, value, mask, block_size=cfg.block_size,
                                        causal=True, scale=scaling)
        _synchronize(query)
        t2 = time.perf_counter()
        layout = tile_layout(query.shape[2], key.shape[2], cfg.block_size, True)
        admissible = admissible_tiles(layout, True, mask.device)
        selected = int((mask & admissible).sum())
        n_admissible = int(admissible.sum()) * query.shape[0] * query.shape[1]
        return out, mask, selected, n_admissible, t1 - t0, t2 - t1

    def _sparse_padded(self, query, key, value, scaling, query_start, spans):
        """Run each batch row on its real tokens only; pad positions get 0.

        Query row ``r`` sits at key position ``query_start + r``; row ``b``'s
        real keys are ``spans[b]``. Rows that share one span run together.
        """
        b, hq, q_len, _ = query.shape
        out = torch.zeros(b, hq, q_len, value.shape[-1], dtype=query.dtype, device=query.device)
        groups = [range(b)] if len(set(spans)) == 1 else [range(r, r + 1) for r in range(b)]
        masks, selected, admissible, t_sel, t_att = [], 0, 0, 0.0, 0.0
        for rows in groups:
            start, stop = spans[rows[0]]
            r0 = max(start - query_start, 0)
            r1 = stop - query_start
            if r1 <= r0:
                masks.append(None)
                continue
            batch = slice(rows[0], rows[-1] + 1)
            o, m, s, a, ts, ta = self._sparse(query[batch, :, r0:r1], key[batch, :, start:stop],
                                              value[batch, :, start:stop], scaling)
            out[batch, :, r0:r1] = o
            masks.append(m)
            selected, admissible = selected + s, admissible + a
            t_sel, t_att = t_sel + ts, t_att + ta
        return out, masks, selected, admissible, t_sel, t_att


def register(name: str = "prism", config: PrismConfig | None = None, *,
             stats: PrismStats | None = None, backend: str = "prism",
             min_query_length: int | None = None, selector: Selector | None = None,
             **overrides) -> PrismStats:
    """Register Prism as ``attn_implementation=name`` in transformers.

    Registers an attention function (``AttentionInterface``) and transformers'
    ``sdpa_mask`` as the matching mask function (``AttentionMaskInterface``),
    so that padded batches reach the attention function with their mask.
    Afterwards ``from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)`` runs Prism in every attention
    layer of a RoPE decoder (Llama, Mistral, Qwen2, SmolLM2, ...).
    Registering a name again replaces its function.

    Parameters
    ----------
    name : str
        The ``attn_implementation`` name.
    config : PrismConfig, optional
        Prism settings; ``**overrides`` change single fields (e.g.
        ``block_size=64, high_threshold=0.9``). Use ``rope_layout="interleaved"``
        for models whose q/k projections pair dims as (2m, 2m+1).
    stats : PrismStats, optional
        Collector for per-call statistics; a new one is made if omitted.
    backend : {"prism", "masked_sdpa"}
        ``"prism"``: :func:`prism.block_sparse_attention` (Triton kernels on
        CUDA, the reference elsewhere). ``"masked_sdpa"``: the same output
        computed densely by torch SDPA, much faster than the reference on the
        CPU (used by ``prism eval``).
    min_query_length : int, optional
        Calls with fewer queries run dense SDPA; default ``block_size``
        (decode steps and chunks shorter than a tile).
    selector : callable, optional
        ``selector(q, k, config, causal=True)`` returning a tile mask, to
        replace Prism's selection (baselines such as plain mean pooling).

    Returns
    -------
    PrismStats
        The collector that receives this implementation's statistics.

    Raises
    ------
    TypeError, ValueError
        On a bad argument, before anything is registered.
    ImportError
        If transformers is not installed.
    """
    if not isinstance(name, str) or not name or name in ("eager", "sdpa") or "|" in name:
        raise ValueError(
            f"name must be a new non-empty attn_implementation name such as 'prism', got "
            f"{name!r} ('eager', 'sdpa' and names with '|' are taken by transformers)"
        )
    cfg = resolve_config(config, **overrides)
    if stats is None:
        stats = PrismStats()
    elif not isinstance(stats, PrismStats):
        raise TypeError(f"stats must be a PrismStats or None, got {type(stats).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if min_query_length is None:
        min_query_length = cfg.block_size
    if isinstance(min_query_length, bool) or not isinstance(min_query_length, int):
        raise TypeError(
            f"min_query_length must be an int or None, got {type(min_query_length).__name__}"
        )
    if min_query_length < 1:
        raise ValueError(f"min_query_length must be >= 1, got {min_query_length}")
    if selector is not None and not callable(selector):
        raise TypeError(f"selector must be callable or None, got {type(selector).__name__}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "prism.integrations.transformers needs transformers: "
            "pip install 'prism-attention[eval]'"
        ) from err

    function = PrismAttention(cfg, stats, min_query_length, backend, selector)
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
    return stats


__all__ = [
    "BACKENDS",
    "AttentionCall",
    "PrismAttention",
    "PrismStats",
    "key_spans",
    "register",
]
