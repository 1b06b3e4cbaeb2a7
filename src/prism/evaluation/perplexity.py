"""Perplexity, density and attention recall of Prism against full attention and mean pooling.

The default run of ``prism eval``. On one window of ``tokens`` tokens of real
text it runs four forward passes of the model:

1. *Calibration* (full attention, on the next ``tokens`` tokens of the text,
   held out from the evaluation window): Prism's tile density on these
   activations is the target, and :func:`~prism.evaluation.baselines.tune_threshold`
   bisects the mean-pooling threshold that reaches it.
2. *Full attention* (SDPA) on the evaluation window, through
   :class:`~prism.evaluation.probe.FullAttentionProbe`: the reference
   perplexity, and per layer the full-attention mass of every tile pair, from
   which the recall of Prism's and mean pooling's selections follows.
3. *Prism*: every layer's prefill attention replaced through
   :func:`prism.integrations.transformers.register`.
4. *Mean pooling* at the tuned threshold, through the same integration with
   :class:`~prism.evaluation.baselines.MeanPoolingSelector`.
5. *A preset* (``settings.preset``, default ``"accurate"``:
   :meth:`prism.reference.PrismConfig.preset`), through the same integration,
   so the table shows the accurate mode beside Prism and mean pooling. Its
   recall is not measured (the probe records Prism's pooled scores only).

Densities are those of each sparse pass itself (its own activations); recall
is measured on the full-attention activations of pass 2 (the selection each
method makes given exact inputs, and the share of the true attention it keeps).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from prism.integrations.transformers import PrismStats, register
from prism.metrics import recall_from_mass
from prism.reference import PrismConfig

from .baselines import (
    MeanPoolingSelector,
    mean_pooling_from_pooled,
    selection_density,
    tune_threshold,
)
from .data import MissingResourceError
from .probe import FullAttentionProbe

PROBE_NAME = "prism-eval-full"
PRISM_NAME = "prism-eval-prism"
MEAN_POOL_NAME = "prism-eval-meanpool"
PRESET_NAME = "prism-eval-preset"

# Positions per chunk of the output projection, so logits never hold N x vocab at once.
_LOGIT_CHUNK = 1024


@dataclass
class EvalSettings:
    """Settings of :func:`run_perplexity_eval` (the ``prism eval`` options).

    Attributes
    ----------
    tokens : int
        Length of the evaluation window (and of the calibration chunk).
    block_size : int
    threshold : float
        Prism's top-p threshold for both bands.
    backend : {"auto", "prism", "masked_sdpa"}
        Attention stage of the sparse passes; ``"auto"`` takes ``masked_sdpa``
        on the CPU and ``prism`` (Triton kernels) on CUDA.
    preset : str or None
        A :meth:`PrismConfig.preset` name run as a fifth pass beside Prism and
        mean pooling (default ``"accurate"``); ``None`` skips it.
    """

    tokens: int = 4096
    block_size: int = 128
    threshold: float = 0.95
    backend: str = "auto"
    preset: str | None = "accurate"

    def prism_config(self) -> PrismConfig:
        return PrismConfig(block_size=self.block_size, high_threshold=self.threshold,
                           low_threshold=self.threshold)

    def resolved_backend(self, device: torch.device) -> str:
        if self.backend != "auto":
            return self.backend
        return "prism" if device.type == "cuda" else "masked_sdpa"


def token_windows(tokenizer, text: str, tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The evaluation window and the held-out calibration chunk, as token ids (1, tokens).

    The evaluation window is the first ``tokens`` tokens of ``text`` (after a
    BOS token when the tokenizer has one); the calibration chunk is the next
    ``tokens`` tokens, or ``None`` when the text is too short for it.

    Raises
    ------
    MissingResourceError
        If the text holds fewer than ``tokens`` tokens.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [bos] + ids
    if len(ids) < tokens:
        raise MissingResourceError(
            f"the text holds {len(ids)} tokens, fewer than --tokens {tokens}; pass a longer "
            "--text or a smaller --tokens"
        )
    eval_ids = torch.tensor([ids[:tokens]])
    rest = ids[tokens : 2 * tokens]
    if len(rest) < tokens:
        return eval_ids, None
    if bos is not None:
        rest = [bos] + rest[:-1]
    return eval_ids, torch.tensor([rest])


def _split_head(model):
    """``(decoder, lm_head)`` when logits are a plain projection of the decoder output."""
    config = model.config
    plain = (getattr(config, "final_logit_softcapping", None) is None
             and getattr(config, "logit_scale", None) is None)
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if plain and isinstance(decoder, torch.nn.Module) and isinstance(head, torch.nn.Module):
        return decoder, head
    return None, None


@torch.no_grad()
def sequence_nll(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one sequence, and the number of predictions.

    For models whose logits are a plain projection of the decoder output (Llama,
    Mistral, Qwen, SmolLM2), the projection and the cross-entropy run in chunks
    of positions, so the (N, vocab) logits are never held at once.

    Parameters
    ----------
    model : transformers causal LM
    input_ids : Tensor (1, N)

    Returns
    -------
    (nll_sum, count) : (float, int) with ``count = N - 1``.
    """
    targets = input_ids[0, 1:]
    decoder, head = _split_head(model)
    if decoder is None:
        logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum")), \
            targets.numel()
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[0, :-1]
    total = 0.0
    for start in range(0, hidden.shape[0], _LOGIT_CHUNK):
        logits = head(hidden[start : start + _LOGIT_CHUNK]).float()
        total += float(torch.nn.functional.cross_entropy(
            logits, targets[start : start + _LOGIT_CHUNK], reduction="sum"))
    return total, targets.numel()


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers (for progress reporting), or ``[]`` if not found."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


class _LayerProgress:
    """Advance a progress bar by one step per decoder layer run."""

    def __init__(self, model, bar):
        self.bar = bar
        self.handles = [layer.register_forward_hook(self._tick)
                        for layer in decoder_layers(model)]

    def _tick(self, *_):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        for handle in self.handles:
            handle.remove()


def _timed_nll(model, ids, implementation: str) -> tuple[float, int, float]:
    model.set_attn_implementation(implementation)
    start = time.perf_counter()
    nll, count = sequence_nll(model, ids)
    return nll, count, time.perf_counter() - start


def _by_layer(values: dict[int, float]) -> list[float]:
    return [values[layer] for layer in sorted(values)]


def _preset_result(name: str, run, count: int) -> dict:
    """The preset pass's entry: perplexity, density and times; recall not measured."""
    config, stats, nll, seconds = run
    timing = stats.seconds_by_layer()
    return {
        "label": f"preset {name} (p={config.high_threshold:g})",
        "preset": name,
        "config": asdict(config),
        "perplexity": math.exp(nll / count),
        "nll_per_token": nll / count,
        "density": stats.mean_density(),
        "density_by_layer": _by_layer(stats.density_by_layer()),
        "recall": None,
        "pass_seconds": seconds,
        "selection_seconds": sum(t["selection"] for t in timing.values()),
        "attention_seconds": sum(t["attention"] for t in timing.values()),
    }


def run_perplexity_eval(model, tokenizer, text: str, settings: EvalSettings, *,
                        progress: bool = True) -> dict:
    """Run the four passes described in the module docstring and return the results.

    Parameters
    ----------
    model : transformers causal LM with RoPE attention (eval mode)
    tokenizer : its tokenizer
    text : str
        At least ``settings.tokens`` tokens; twice that for a held-out
        calibration chunk (otherwise the evaluation window calibrates itself,
        and the result says so).
    settings : EvalSettings
    progress : bool
        Show a tqdm progress bar (one step per layer per pass).

    Returns
    -------
    dict
        JSON-ready: settings, calibration, and per method (``full``, ``prism``,
        ``mean_pooling``) perplexity, density and recall (mean and per layer)
        and timings.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    config = settings.prism_config()
    backend = settings.resolved_backend(device)
    eval_ids, calib_ids = token_windows(tokenizer, text, settings.tokens)
    held_out = calib_ids is not None
    if not held_out:
        calib_ids = eval_ids
    eval_ids, calib_ids = eval_ids.to(device), calib_ids.to(device)
    previous = model.config._attn_implementation

    n_layers = len(decoder_layers(model))
    passes = 5 if settings.preset else 4
    bar = tqdm(total=passes * n_layers if n_layers else None, unit="layer", disable=not progress,
               desc="prism eval")
    ticker = _LayerProgress(model, bar)
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        # 1. Calibration: Prism's density on held-out full-attention activations.
        bar.set_description("calibration (full attention)")
        calib_probe = FullAttentionProbe(config, measure_mass=False)
        AttentionInterface.register(PROBE_NAME, calib_probe)
        AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)
        _timed_nll(model, calib_ids, PROBE_NAME)
        records = [calib_probe.layers[i] for i in sorted(calib_probe.layers)]
        target = selection_density([r.prism_mask for r in records], [r.layout for r in records])
        threshold, calib_density = tune_threshold(
            [(r.q_pooled, r.k_pooled, r.layout) for r in records], target)

        # 2. Full attention, with the probe measuring tile masses for recall.
        bar.set_description("full attention + recall")
        probe = FullAttentionProbe(config, measure_mass=True)
        AttentionInterface.register(PROBE_NAME, probe)
        full_nll, count, full_seconds = _timed_nll(model, eval_ids, PROBE_NAME)
        layers = sorted(probe.layers)
        n_queries = eval_ids.shape[1]
        prism_recall, pool_recall, prism_tf, pool_tf = {}, {}, {}, {}
        for layer in layers:
            rec = probe.layers[layer]
            pool_mask = mean_pooling_from_pooled(rec.q_pooled, rec.k_pooled, rec.layout,
                                                 threshold)
            prism_recall[layer] = float(recall_from_mass(rec.prism_mask, rec.mass,
                                                         n_queries).mean())
            pool_recall[layer] = float(recall_from_mass(pool_mask, rec.mass, n_queries).mean())
            prism_tf[layer] = selection_density([rec.prism_mask], [rec.layout])
            pool_tf[layer] = selection_density([pool_mask], [rec.layout])
        full_attention_seconds = sum(probe.layers[i].attention_seconds for i in layers)

        # 3. Prism, through the transformers integration.
        bar.set_description("prism")
        prism_stats = register(PRISM_NAME, config, stats=PrismStats(), backend=backend)
        prism_nll, _, prism_seconds = _timed_nll(model, eval_ids, PRISM_NAME)

        # 4. Plain mean pooling at the threshold that matches Prism's density.
        bar.set_description("mean pooling")
        pool_stats = register(MEAN_POOL_NAME, config, stats=PrismStats(), backend=backend,
                              selector=MeanPoolingSelector(threshold))
        pool_nll, _, pool_seconds = _timed_nll(model, eval_ids, MEAN_POOL_NAME)

        # 5. The preset (the accurate mode by default), through the same integration.
        preset_run = None
        if settings.preset:
            bar.set_description(f"preset {settings.preset}")
            preset_config = PrismConfig.preset(settings.preset, block_size=settings.block_size)
            preset_stats = register(PRESET_NAME, preset_config, stats=PrismStats(),
                                    backend=backend)
            preset_run = (preset_config, preset_stats,
                          *_timed_nll(model, eval_ids, PRESET_NAME)[::2])
    finally:
        ticker.close()
        bar.close()
        model.set_attn_implementation(previous)

    def sparse_result(nll, seconds, stats, recall, teacher_forced, extra):
        timing = stats.seconds_by_layer()
        return {
            **extra,
            "perplexity": math.exp(nll / count),
            "nll_per_token": nll / count,
            "density": stats.mean_density(),
            "density_by_layer": _by_layer(stats.density_by_layer()),
            "recall": sum(recall.values()) / len(recall),
            "recall_by_layer": _by_layer(recall),
            "full_activation_density": sum(teacher_forced.values()) / len(teacher_forced),
            "full_activation_density_by_layer": _by_layer(teacher_forced),
            "pass_seconds": seconds,
            "selection_seconds": sum(t["selection"] for t in timing.values()),
            "attention_seconds": sum(t["attention"] for t in timing.values()),
        }

    return {
        "task": "perplexity",
        "tokens": settings.tokens,
        "predictions": count,
        "num_layers": len(layers),
        "backend": backend,
        "config": asdict(config),
        "calibration": {
            "held_out": held_out,
            "prism_density": target,
            "mean_pooling_threshold": threshold,
            "mean_pooling_density": calib_density,
        },
        "methods": {
            "full": {
                "label": "full attention (SDPA)",
                "perplexity": math.exp(full_nll / count),
                "nll_per_token": full_nll / count,
                "density": 1.0,
                "recall": 1.0,
                "pass_seconds": full_seconds,
                "attention_seconds": full_attention_seconds,
                "recall_probe_seconds": sum(probe.layers[i].probe_seconds for i in layers),
            },
            **({} if preset_run is None else {"preset": _preset_result(
                settings.preset, preset_run, count)}),
            "prism": sparse_result(prism_nll, prism_seconds, prism_stats, prism_recall, prism_tf,
                                   {"label": f"Prism p={settings.threshold:g}",
                                    "threshold": settings.threshold}),
            "mean_pooling": sparse_result(pool_nll, pool_seconds, pool_stats, pool_recall,
                                          pool_tf, {"label": f"mean pooling p={threshold:.4f}",
                                                    "threshold": threshold}),
        },
    }


__all__ = ["EvalSettings", "decoder_layers", "run_perplexity_eval", "sequence_nll",
           "token_windows"]
