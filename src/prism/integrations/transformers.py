"""Prism as a Hugging Face transformers attention implementation.

Example (not run as a doctest: it needs a model)::

    from prism.integrations.transformers import PrismStats, register
    stats = register("prism", block_size=64, stats=PrismStats())   # stats: optional
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="prism")
    model(input_ids)
    stats.density_by_layer()     # {0: 0.41, 1: 0.37, ...}

The module holds the attention function and :func:`register`; statistics live
in :mod:`~prism.integrations.stats` and mask decoding in
:mod:`~prism.integrations.masks` (both re-exported here).

How transformers (5.x) calls the function
-----------------------------------------
Every attention layer calls ``fn(module, query, key, value, attention_mask,
dropout=..., scaling=..., **kwargs)`` with ``query`` (B, Hq, L, D) after RoPE,
``key``/``value`` (B, Hkv, S, D) after RoPE and after the KV cache update, not
repeated for GQA, and expects ``(output (B, L, Hq, D), weights or None)``. The
mask comes from the mask function registered under the same name
(``AttentionMaskInterface``); :func:`register` registers
:func:`~prism.integrations.masks.prism_mask` (transformers' ``sdpa_mask``),
which returns ``None`` for a plain causal batch and a bool (B, 1, L, S) mask
otherwise. Without a registered mask function, transformers
hands custom implementations no mask at all, and a padded batch would be
silently wrong.

What runs where
---------------
* Prefill (``L >= min_query_length``, default one tile): Prism's selection
  (:func:`prism.select_blocks`, optimized kernels on CUDA, the reference
  elsewhere) and then block-sparse attention on the selected tiles, with the
  module's ``scaling`` and un-repeated K/V. These are the two stages that
  :func:`prism.prism_attention` chains; they are called one after the other
  here so that each can be timed when statistics are collected. With a KV
  prefix (chunked prefill) the queries are the last ``L`` of the ``S``
  positions, as contract §2 prescribes.
* Decode steps and any call with fewer queries than ``min_query_length``:
  dense attention, by transformers' own SDPA function (identical to
  ``attn_implementation="sdpa"``).

Padding
-------
Padded batches are honoured, never silently mixed: each row is stripped to its
contiguous run of real tokens and Prism runs on that row alone, so every real
token gets exactly what it would get in an unpadded batch of one. Its tile grid
starts at the row's first real token. Left padding (``tokenizer.padding_side =
"left"``, as used for generation) and right padding both work. Pad positions
get what ``attn_implementation="sdpa"`` gives them (dense SDPA over the keys
the mask lets them read), so a right-padded batch continued by ``generate``
gives the continuation it would give under SDPA: generation reads the last
position of every row, which is a pad position in the shorter rows. Rows
whose real tokens fill the same positions run as one batch. Static caches work
too: their unused key slots are never read. A mask that is not "causal and key
padding" (packed sequences, sliding windows shorter than the input, padding
between real tokens as after right padding and generated tokens, additive
biases) raises ``ValueError`` and names the fix when it reaches Prism, i.e.
in a call of at least ``min_query_length`` queries; decode steps run SDPA.

Synchronisation and torch.compile
---------------------------------
A call does no host synchronisation of its own and reads no clock unless a
:class:`~prism.integrations.stats.PrismStats` collector was passed to
:func:`register`: timing and tile counts are the collector's, an optional
hook. Two things still need the host: decoding a padding mask
(:func:`~prism.integrations.masks.key_spans`, one small device-to-host copy),
and whatever the selection and attention functions themselves do
(:mod:`prism.optimized` on CUDA, whose eager calls read a NaN flag once so
they can raise ``ValueError``; the reference elsewhere). A GPU test runs a
call under ``torch.cuda.set_sync_debug_mode("error")`` to check the first part.

A batch without padding mask gets no mask at all: the registered mask
function (:func:`~prism.integrations.masks.prism_mask`) returns ``None`` for
it, also while ``torch.compile`` traces the model, and the call goes straight
to Prism's operators. ``torch.compile(model, fullgraph=True)`` then traces
through the attention function without a graph break, and CUDA graphs
(``mode="reduce-overhead"``) capture it. A call that gets a mask (a padding
mask, even one of all ones, a static cache, a KV prefix) is decoded on the
host; under ``torch.compile`` that whole call, decode included, is one opaque
operator (``torch.ops.prism.transformers_masked_attention``, marked unsafe for
CUDA graphs), so ``fullgraph=True`` still holds and the result and errors are
eager's.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

import prism
from prism.reference import PrismConfig, resolve_config

from .masked_sdpa import masked_sdpa_attention
from .masks import key_spans, prism_mask
from .stats import AttentionCall, PrismStats, clock, count_tiles

#: Attention backends: ``"prism"`` runs :func:`prism.block_sparse_attention`
#: (Triton on CUDA, the reference elsewhere); ``"masked_sdpa"`` runs
#: :func:`prism.integrations.masked_sdpa.masked_sdpa_attention` (same output,
#: computed densely by torch SDPA; the fast choice on the CPU).
BACKENDS = ("prism", "masked_sdpa")

Selector = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class _Run:
    """One selection-and-attention run on an unpadded (sub-)batch, for the statistics."""

    mask: torch.Tensor
    query_length: int
    key_length: int
    selection_seconds: float
    attention_seconds: float


def _sdpa(module, query, key, value, attention_mask, scaling) -> torch.Tensor:
    """transformers' own SDPA attention, (B, H, L, D) as Prism lays its outputs out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                    scaling=scaling, is_causal=True)
    return out.transpose(1, 2)


class _GroupsOf:
    """What transformers' SDPA function reads of an attention module, for calls made
    inside the opaque operator (which cannot take the module itself)."""

    is_causal = True

    def __init__(self, groups: int | None, layer: int | None):
        if groups is not None:
            self.num_key_value_groups = groups
        self.layer_idx = layer


#: The live attention functions, by handle: the opaque operator finds its
#: function (config, backend, selector, statistics) here.
_FUNCTIONS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


class PrismAttention:
    """The attention function registered by :func:`register`.

    Parameters
    ----------
    config : PrismConfig
    stats : PrismStats or None
        Receives one record per call; ``None`` collects nothing, and then no
        call synchronises the device or reads a clock.
    min_query_length : int
        Calls with fewer queries run dense SDPA (decode steps, short chunks).
    backend : {"prism", "masked_sdpa"}
        Attention stage for the selected tiles (see :data:`BACKENDS`).
    selector : callable, optional
        ``selector(q, k, config, causal=True) -> bool mask`` replacing
        :func:`prism.select_blocks`, e.g. a baseline selection rule.
    """

    def __init__(self, config: PrismConfig, stats: PrismStats | None, min_query_length: int,
                 backend: str = "prism", selector: Selector | None = None):
        self.config = config
        self.stats = stats
        self.min_query_length = min_query_length
        self.backend = backend
        self.selector = selector
        self.handle = next(_HANDLES)
        _FUNCTIONS[self.handle] = self

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

        if attention_mask is not None:
            groups = getattr(module, "num_key_value_groups", None)
            if torch.compiler.is_compiling():
                out = torch.ops.prism.transformers_masked_attention(
                    query, key, value, attention_mask, scaling, self.handle, layer, groups)
            else:
                out = self._masked(module, query, key, value, attention_mask, scaling, layer)
            return out, None
        if k_len > q_len > 1:
            # transformers sends no mask with more keys than queries and more than one
            # query only when it prefills an empty static cache: the keys past the
            # queries are unused slots (its own SDPA function drops them the same way).
            # One query without a mask is a decode step: it reads every key.
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        out, run = self._sparse(query, key, value, scaling)
        if self.stats is not None:
            self._record(layer, b, q_len, k_len, [run], run.mask)
        return out.transpose(1, 2).contiguous(), None

    def _masked(self, module, query, key, value, attention_mask, scaling, layer):
        """A call with a mask: decode it (:func:`key_spans`), then Prism on the whole batch
        or row by row. Eager code; returns the output (B, L, Hq, D)."""
        b, _, q_len, _ = query.shape
        k_len = key.shape[2]
        layout = key_spans(attention_mask, q_len, k_len)
        if layout is None:
            out, run = self._sparse(query, key, value, scaling)
            runs, mask = [run], run.mask
        else:
            out, runs = self._sparse_padded(module, query, key, value, attention_mask, scaling,
                                            *layout)
            mask = [None if run is None else run.mask for run in runs]
        if self.stats is not None:
            self._record(layer, b, q_len, k_len, [r for r in runs if r is not None], mask)
        return out.transpose(1, 2).contiguous()

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
        timed = self.stats is not None
        t0 = clock(query) if timed else 0.0
        out = _sdpa(module, query, key, value, attention_mask, scaling)
        if timed:
            self.stats.record(AttentionCall(
                layer=layer, mode="dense", batch_size=query.shape[0],
                query_length=query.shape[2], key_length=key.shape[2],
                attention_seconds=clock(query) - t0,
            ))
        return out.transpose(1, 2).contiguous(), None

    def _sparse(self, query, key, value, scaling):
        """Selection then attention on one unpadded (sub-)batch: (out (B, H, L, D), run)."""
        cfg = self.config
        timed = self.stats is not None
        t0 = clock(query) if timed else 0.0
        if self.selector is None:
            mask = prism.select_blocks(query, key, cfg, causal=True)
        else:
            mask = self.selector(query, key, cfg, causal=True)
        t1 = clock(query) if timed else 0.0
        if self.backend == "prism":
            out = prism.block_sparse_attention(query, key, value, mask,
                                               block_size=cfg.block_size, causal=True,
                                               scale=scaling)
        else:
            out = masked_sdpa_attention(query, key, value, mask, block_size=cfg.block_size,
                                        causal=True, scale=scaling)
        t2 = clock(query) if timed else 0.0
        return out, _Run(mask, query.shape[2], key.shape[2], t1 - t0, t2 - t1)

    def _sparse_padded(self, module, query, key, value, attention_mask, scaling, query_start,
                       spans):
        """Run each batch row on its real tokens only; pad positions get SDPA's output.

        Query row ``r`` sits at key position ``query_start + r``; row ``b``'s
        real keys are ``spans[b]``. Rows that share one span run together.
        Returns the output (B, H, L, D) and one run per group (``None`` for a
        group without real queries).
        """
        b, hq, q_len, _ = query.shape
        out = torch.empty(b, hq, q_len, value.shape[-1], dtype=query.dtype, device=query.device)
        groups = [range(b)] if len(set(spans)) == 1 else [range(r, r + 1) for r in range(b)]
        runs = []
        for rows in groups:
            start, stop = spans[rows[0]]
            r0 = max(start - query_start, 0)
            r1 = stop - query_start
            batch = slice(rows[0], rows[-1] + 1)
            if r1 > r0:
                o, run = self._sparse(query[batch, :, r0:r1], key[batch, :, start:stop],
                                      value[batch, :, start:stop], scaling)
                out[batch, :, r0:r1] = o
                runs.append(run)
            else:
                r0 = r1 = q_len  # every query of the group is a pad position
                runs.append(None)
            # Pad positions: exactly what attn_implementation="sdpa" computes there.
            for lo, hi in ((0, r0), (r1, q_len)):
                if hi > lo:
                    out[batch, :, lo:hi] = _sdpa(module, query[batch, :, lo:hi], key[batch],
                                                 value[batch],
                                                 attention_mask[batch, :, lo:hi], scaling)
        return out, runs

    def _record(self, layer, batch_size, q_len, k_len, runs, mask) -> None:
        """The statistics hook: tile counts and stage times of one call."""
        selected = admissible = 0
        for run in runs:
            s, a = count_tiles(run.mask, run.query_length, run.key_length,
                               self.config.block_size)
            selected, admissible = selected + s, admissible + a
        self.stats.record(AttentionCall(
            layer=layer, mode="prism", batch_size=batch_size, query_length=q_len,
            key_length=k_len, selected_tiles=selected, admissible_tiles=admissible,
            selection_seconds=sum(r.selection_seconds for r in runs),
            attention_seconds=sum(r.attention_seconds for r in runs),
            mask=mask if self.stats.keep_masks else None,
        ))


torch.library.define(
    "prism::transformers_masked_attention",
    "(Tensor query, Tensor key, Tensor value, Tensor attention_mask, float? scaling, "
    "int function, int? layer, int? groups) -> Tensor",
    tags=(torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ())


@torch.library.impl("prism::transformers_masked_attention", "default")
def _masked_attention_op(query, key, value, attention_mask, scaling, function, layer, groups):
    """A masked call of the attention function ``function`` (a :class:`PrismAttention`
    handle), as one operator that ``torch.compile`` does not look into."""
    return _FUNCTIONS[function]._masked(_GroupsOf(groups, layer), query, key, value,
                                        attention_mask, scaling, layer)


@torch.library.register_fake("prism::transformers_masked_attention")
def _masked_attention_fake(query, key, value, attention_mask, scaling, function, layer,
                           groups):
    b, hq, q_len, _ = query.shape
    return query.new_empty(b, q_len, hq, value.shape[-1])


def register(name: str = "prism", config: PrismConfig | None = None, *,
             stats: PrismStats | None = None, backend: str = "prism",
             min_query_length: int | None = None, selector: Selector | None = None,
             **overrides) -> PrismStats | None:
    """Register Prism as ``attn_implementation=name`` in transformers.

    Registers an attention function (``AttentionInterface``) and
    :func:`~prism.integrations.masks.prism_mask` (transformers' ``sdpa_mask``,
    with no mask for an unpadded causal batch even under ``torch.compile``) as
    the matching mask function (``AttentionMaskInterface``), so that padded
    batches reach the attention function with their mask.
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
        For accuracy, pass ``PrismConfig.preset("accurate")`` (the cascade
        estimator): it stayed within 1.7% of full attention's perplexity at the
        default's density on SmolLM2 (docs/estimators.rst, "Presets"); its
        selection costs more than the default's (``PrismConfig.preset("paper")``).
    stats : PrismStats, optional
        Collector for per-call statistics (tile counts, density, stage
        times). Without one nothing is collected, and a call neither
        synchronises the device nor reads a clock.
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
    PrismStats or None
        ``stats``: the collector that receives this implementation's statistics.

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
    if stats is not None and not isinstance(stats, PrismStats):
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
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "prism.integrations.transformers needs transformers: "
            "pip install 'prism-attention[eval]'"
        ) from err

    function = PrismAttention(cfg, stats, min_query_length, backend, selector)
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, prism_mask)
    return stats


__all__ = [
    "BACKENDS",
    "AttentionCall",
    "PrismAttention",
    "PrismStats",
    "key_spans",
    "register",
]
