"""Accuracy against density: perplexity and passkey over threshold sweeps.

``prism eval --task sweep`` runs full attention once, then one sparse pass per
(method, threshold) point, and writes the JSON after every point so a long run
that is stopped keeps what it finished. Methods: ``mean_pooling`` (plain mean
pooling, :mod:`~prism.evaluation.baselines`) and every estimator of the
registry (:mod:`prism.reference.registry`, docs/estimators.rst). The point's
threshold is ``high_threshold`` and ``low_threshold``; what it moves is the
registry's ``threshold_moves`` (for example the antidiagonal top-p of
``antidiagonal_vertical_slash``, whose ``vertical_slash_threshold`` stays at
the sweep's fixed value). The estimator parameters come from
:class:`SweepSettings`.

Each point records perplexity, the mean causal tile density of its own pass,
the selection time per layer, and (optionally) passkey accuracy. Estimators
that score only candidate tiles (a ``"prism_candidates"`` stage, the
``"cascade"``) also record ``candidate_density``: candidate / admissible tile
pairs over the pass, the fraction of tiles their token-level scoring reads.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from prism.integrations.transformers import PrismStats, register
from prism.reference import PrismConfig
from prism.reference.registry import ESTIMATOR_REGISTRY, REFERENCE_STAGES
from prism.reference.scoring import admissible_tiles
from prism.reference.select import estimator_mask
from prism.reference.tiles import tile_layout
from prism.reference.validation import validate_qk

from .baselines import MeanPoolingSelector
from .passkey import build_passkey_prompt, first_number, greedy_decode
from .perplexity import sequence_nll, token_windows
from .report import write_json

SWEEP_METHODS = ("prism", "mean_pooling",
                 *(name for name in ESTIMATOR_REGISTRY if name != "prism"))
SWEEP_NAME = "prism-eval-sweep"


@dataclass
class SweepSettings:
    """Settings of :func:`run_sweep`.

    Attributes
    ----------
    tokens : int
        Perplexity window in tokens.
    points : sequence of (method, threshold)
        Methods from :data:`SWEEP_METHODS`.
    block_size : int
    antidiagonal_stride, last_queries, subtile_factor, sampled_queries : int
        Parameters of the antidiagonal, vertical-slash, sub-tile and
        sampled-query estimators (each method takes the registry's
        ``sweep_parameters`` from here).
    candidate_threshold : float
        Prism's top-p that names the candidate tiles of the ``"cascade"``.
    sampled_weight : float
        Weight of the ``"cascade"``'s sampled-query stage (0: none).
    vertical_slash_threshold : float
        Top-p of the vertical and slash distributions in the estimators that
        unite them with other tiles (``vertical_slash`` alone moves it with
        the point's threshold instead).
    passkey_lengths, passkey_depths : sequences
        Passkey prompts per point; empty lengths skip the passkey task.
    new_tokens, seed : int
        Passkey decoding length and key seed (as in ``prism eval --task passkey``).
    backend : str
        As in :class:`~prism.evaluation.perplexity.EvalSettings`.
    """

    tokens: int = 4096
    points: Sequence[tuple[str, float]] = ()
    block_size: int = 128
    antidiagonal_stride: int = 8
    last_queries: int = 64
    vertical_slash_threshold: float = 0.9
    subtile_factor: int = 4
    sampled_queries: int = 4
    candidate_threshold: float = 0.99
    sampled_weight: float = 0.0
    passkey_lengths: Sequence[int] = ()
    passkey_depths: Sequence[float] = (0.1, 0.5, 0.9)
    new_tokens: int = 10
    seed: int = 0
    backend: str = "auto"
    extra: dict = field(default_factory=dict)


class CandidateCounter:
    """The reference selection of a candidate-scoring estimator, counting its candidates.

    A ``selector`` for :func:`prism.integrations.transformers.register`: the
    mask is :func:`prism.reference.select.estimator_mask`'s (so
    :func:`prism.reference.select_blocks`'s); its ``"prism_candidates"``
    stage is the registry's, wrapped to add up candidate and admissible tile
    pairs.
    """

    def __init__(self):
        self.candidate_tiles = 0
        self.admissible_tiles = 0

    def __repr__(self) -> str:
        return "CandidateCounter()"

    def _candidates(self, q, k, cfg, causal, trace):
        tiles = REFERENCE_STAGES["prism_candidates"](q, k, cfg, causal, trace)
        layout = tile_layout(q.shape[2], k.shape[2], cfg.block_size, causal)
        admissible = admissible_tiles(layout, causal, q.device)
        self.candidate_tiles += int((tiles & admissible).sum())
        self.admissible_tiles += int(admissible.sum()) * tiles.shape[0] * tiles.shape[1]
        return tiles

    def __call__(self, q, k, config, causal: bool = True) -> torch.Tensor:
        validate_qk(q, k, causal=causal)
        return estimator_mask(q, k, config, causal, stages={"prism_candidates": self._candidates})

    def density(self) -> float | None:
        """Candidate / admissible tile pairs so far (``None`` before any call)."""
        return self.candidate_tiles / self.admissible_tiles if self.admissible_tiles else None


def method_selection(method: str, threshold: float, settings: SweepSettings):
    """The ``(PrismConfig, selector)`` pair that runs ``method`` at ``threshold``.

    Raises
    ------
    ValueError
        If ``method`` is not one of :data:`SWEEP_METHODS`.
    """
    base = {"block_size": settings.block_size, "high_threshold": threshold,
            "low_threshold": threshold}
    if method == "mean_pooling":
        return PrismConfig(block_size=settings.block_size), MeanPoolingSelector(threshold)
    spec = ESTIMATOR_REGISTRY.get(method)
    if spec is None:
        raise ValueError(f"unknown sweep method {method!r}; choose from {SWEEP_METHODS}")
    fixed = {name: getattr(settings, name) for name in spec.sweep_parameters}
    selector = CandidateCounter() if "prism_candidates" in spec.stages else None
    return PrismConfig(**base, estimator=method, **fixed), selector


def with_preset(settings: SweepSettings, name: str, *, only: bool = False) -> SweepSettings:
    """``settings`` with the point of :meth:`PrismConfig.preset` ``name`` and its estimator fields.

    The preset's estimator parameters replace the settings' (the sweep's
    fixed values, e.g. ``vertical_slash_threshold`` of the accurate preset),
    and its ``(estimator, high_threshold)`` point joins the points, or
    replaces them when ``only``.

    Raises
    ------
    ValueError
        If ``name`` is not a preset.
    """
    config = PrismConfig.preset(name, block_size=settings.block_size)
    point = (config.estimator, config.high_threshold)
    spec = ESTIMATOR_REGISTRY[config.estimator]
    fixed = {field: getattr(config, field) for field in spec.sweep_parameters}
    points = [point] if only else [*settings.points,
                                   *([point] if point not in settings.points else [])]
    return replace(settings, points=tuple(points), **fixed)


def _passkey_trials(model, tokenizer, haystack, settings: SweepSettings, implementation,
                    stats: PrismStats | None) -> list[dict]:
    device = next(model.parameters()).device
    rng = random.Random(settings.seed)
    keys = {(length, depth): rng.randrange(10000, 100000)
            for length in settings.passkey_lengths for depth in settings.passkey_depths}
    model.set_attn_implementation(implementation)
    trials = []
    for (length, depth), key in keys.items():
        prompt = build_passkey_prompt(tokenizer, haystack, length - settings.new_tokens,
                                      depth, key)
        if stats is not None:
            stats.reset()
        answer_ids = greedy_decode(model, torch.tensor([prompt], device=device),
                                   settings.new_tokens)
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
        trials.append({"length": length, "depth": depth, "key": key, "answer": answer,
                       "success": first_number(answer) == key,
                       "density": stats.mean_density() if stats is not None else 1.0})
    return trials


def _passkey_summary(trials: list[dict]) -> dict:
    if not trials:
        return {}
    by_length = {}
    for length in sorted({t["length"] for t in trials}):
        hits = [t["success"] for t in trials if t["length"] == length]
        by_length[str(length)] = sum(hits) / len(hits)
    return {"passkey_accuracy": sum(t["success"] for t in trials) / len(trials),
            "passkey_correct": sum(t["success"] for t in trials),
            "passkey_trials": len(trials), "passkey_by_length": by_length,
            "passkey_density": sum(t["density"] for t in trials) / len(trials),
            "passkey_detail": trials}


@torch.no_grad()
def run_sweep(model, tokenizer, text: str, settings: SweepSettings, *, out_path=None,
              header: dict | None = None, progress: bool = True) -> dict:
    """Full attention, then every (method, threshold) point of ``settings``.

    Parameters
    ----------
    model, tokenizer : a transformers causal LM with RoPE attention, and its tokenizer
    text : str
        At least ``settings.tokens`` tokens (and the longest passkey length).
    settings : SweepSettings
    out_path : path, optional
        When given, the JSON is rewritten after every point.
    header : dict, optional
        Extra keys for the JSON (model, text, command, environment).

    Returns
    -------
    dict
        JSON-ready: ``full`` (perplexity, passkey) and ``points``, one entry per
        point with method, threshold, config, perplexity, ratio to full,
        density, selection seconds and passkey results.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    backend = settings.backend
    if backend == "auto":
        backend = "prism" if device.type == "cuda" else "masked_sdpa"
    eval_ids, _ = token_windows(tokenizer, text, settings.tokens)
    eval_ids = eval_ids.to(device)
    haystack = (tokenizer(text, add_special_tokens=False)["input_ids"]
                if settings.passkey_lengths else [])
    previous = model.config._attn_implementation
    result = {**(header or {}), "task": "sweep", "tokens": settings.tokens, "backend": backend,
              "settings": {**asdict(settings), "points": [list(p) for p in settings.points],
                           "passkey_lengths": list(settings.passkey_lengths),
                           "passkey_depths": list(settings.passkey_depths)},
              # Stays False in every file written before the last point is done.
              "complete": False, "points": []}
    bar = tqdm(total=len(settings.points) + 1, unit="point", disable=not progress,
               desc="sweep")
    try:
        model.set_attn_implementation("sdpa")
        start = time.perf_counter()
        full_nll, count = sequence_nll(model, eval_ids)
        full = {"perplexity": math.exp(full_nll / count), "nll_per_token": full_nll / count,
                "density": 1.0, "pass_seconds": time.perf_counter() - start}
        full.update(_passkey_summary(_passkey_trials(model, tokenizer, haystack, settings,
                                                     "sdpa", None)))
        result.update(predictions=count, full=full)
        if out_path is not None:
            write_json(result, out_path)
        bar.update(1)
        for method, threshold in settings.points:
            bar.set_description(f"{method} p={threshold:g}")
            config, selector = method_selection(method, threshold, settings)
            stats = register(SWEEP_NAME, config, stats=PrismStats(), backend=backend,
                             selector=selector)
            model.set_attn_implementation(SWEEP_NAME)
            start = time.perf_counter()
            nll, _ = sequence_nll(model, eval_ids)
            seconds = time.perf_counter() - start
            timing = stats.seconds_by_layer()
            point = {"method": method, "threshold": threshold, "config": asdict(config),
                     "perplexity": math.exp(nll / count), "nll_per_token": nll / count,
                     "ratio_to_full": math.exp((nll - full_nll) / count),
                     "density": stats.mean_density(), "pass_seconds": seconds,
                     "selection_seconds": sum(t["selection"] for t in timing.values()),
                     "selection_seconds_per_layer":
                         sum(t["selection"] for t in timing.values()) / max(len(timing), 1)}
            if isinstance(selector, CandidateCounter):
                point["candidate_density"] = selector.density()
            point.update(_passkey_summary(_passkey_trials(model, tokenizer, haystack, settings,
                                                          SWEEP_NAME, stats)))
            result["points"].append(point)
            if out_path is not None:
                write_json(result, out_path)
            bar.update(1)
        result["complete"] = True
        if out_path is not None:
            write_json(result, out_path)
    finally:
        bar.close()
        model.set_attn_implementation(previous)
    return result


def parse_points(text: str) -> list[tuple[str, float]]:
    """Parse ``"prism=0.9,0.95;mean_pooling=0.95"`` into ``[(method, threshold), ...]``.

    Raises
    ------
    ValueError
        On an unknown method or a threshold outside (0, 1].
    """
    points = []
    for group in text.split(";"):
        if not group.strip():
            continue
        method, _, values = group.partition("=")
        method = method.strip()
        if method not in SWEEP_METHODS:
            raise ValueError(f"unknown sweep method {method!r}; choose from {SWEEP_METHODS}")
        for value in values.split(","):
            threshold = float(value)
            if not 0.0 < threshold <= 1.0:
                raise ValueError(f"threshold {threshold} of {method} is outside (0, 1]")
            points.append((method, threshold))
    if not points:
        raise ValueError("no sweep points given; use e.g. 'prism=0.9,0.95;mean_pooling=0.95'")
    return points


__all__ = ["CandidateCounter", "SWEEP_METHODS", "SweepSettings", "method_selection",
           "parse_points", "run_sweep", "with_preset"]
