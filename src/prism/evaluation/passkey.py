"""Passkey retrieval: find a number hidden at some depth of a long real text.

The prompt is an instruction, then real text (the haystack) with the paragraph
"The pass key is 12345. Remember it. 12345 is the pass key." inserted at a
relative depth, then "What is the pass key? The pass key is". The model
greedily decodes a few tokens; a trial succeeds when the first number in them
is the key. Prism runs the prefill (every layer, through
:func:`prism.integrations.transformers.register`) and the decode steps fall
back to dense attention; full attention (SDPA) runs the same prompts.
"""

from __future__ import annotations

import inspect
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from prism.integrations.transformers import PrismStats, register
from prism.reference import PrismConfig

from .data import EvalInputError, MissingResourceError

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
# On its own paragraph: SmolLM2-135M finds it far more often than inside a sentence.
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
PRISM_NAME = "prism-eval-passkey"


@dataclass
class PasskeySettings:
    """Settings of :func:`run_passkey_eval`.

    Attributes
    ----------
    lengths : sequence of int
        Total lengths (prompt plus decoded tokens) to test, in tokens.
    depths : sequence of float
        Relative positions of the key in the haystack, in [0, 1].
    block_size, threshold : Prism settings (both bands share the threshold).
    new_tokens : int
        Greedy tokens decoded after the prompt.
    seed : int
        Seeds the keys (one 5-digit key per length and depth).
    backend : {"auto", "prism", "masked_sdpa"}
        As in :class:`~prism.evaluation.perplexity.EvalSettings`.
    """

    lengths: Sequence[int] = (2048, 4096, 8192)
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)
    block_size: int = 128
    threshold: float = 0.95
    new_tokens: int = 10
    seed: int = 0
    backend: str = "auto"


def build_passkey_prompt(tokenizer, haystack_ids: Sequence[int], prompt_length: int,
                         depth: float, key: int) -> list[int]:
    """Token ids of one passkey prompt of exactly ``prompt_length`` tokens.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    haystack_ids : sequence of int
        Token ids of the filler text (at least as many as the prompt needs).
    prompt_length : int
    depth : float in [0, 1]
        Where the key sentence goes: after that fraction of the haystack tokens.
    key : int

    Returns
    -------
    list of int
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bos = getattr(tokenizer, "bos_token_id", None)
    head = ([bos] if bos is not None else []) + encode(INTRO)
    needle, question = encode(NEEDLE.format(key=key)), encode(QUESTION)
    filler = prompt_length - len(head) - len(needle) - len(question)
    if filler < 0:
        raise EvalInputError(
            f"a passkey prompt of {prompt_length} tokens is too short: the instruction, key "
            f"sentence and question alone take {prompt_length - filler}; use longer --lengths")
    if len(haystack_ids) < filler:
        raise MissingResourceError(
            f"the haystack holds {len(haystack_ids)} tokens, the prompt needs {filler}; "
            "pass a longer --text")
    hay = list(haystack_ids[:filler])
    cut = round(depth * filler)
    return head + hay[:cut] + needle + hay[cut:] + question


def _returned_cache(output):
    """The KV cache of a model output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@torch.no_grad()
def greedy_decode(model, prompt_ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (1, N) with a KV cache; returns the new token ids.

    The prompt is one prefill call; every new token is one decode call of one
    query (which Prism's integration runs densely).
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    parameters = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
    # Only the last position's logits are needed: skip the (N, vocab) projection.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    out = model(input_ids=prompt_ids, use_cache=True, **last_only)
    generated = []
    next_id = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    for step in range(new_tokens):
        generated.append(int(next_id))
        if step == new_tokens - 1:
            break
        out = model(input_ids=next_id, use_cache=True, **{cache_kwarg: _returned_cache(out)})
        next_id = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    return generated


def first_number(text: str) -> int | None:
    """The first run of digits in ``text`` as an int, or ``None``."""
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def run_passkey_eval(model, tokenizer, text: str, settings: PasskeySettings, *,
                     progress: bool = True) -> dict:
    """Passkey retrieval accuracy of full attention and Prism at each length and depth.

    Returns
    -------
    dict
        JSON-ready: settings, one entry per trial (length, depth, key, answer,
        success, Prism density, seconds) and accuracy per method and length.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    backend = settings.backend
    if backend == "auto":
        backend = "prism" if device.type == "cuda" else "masked_sdpa"
    config = PrismConfig(block_size=settings.block_size, high_threshold=settings.threshold,
                         low_threshold=settings.threshold)
    stats = register(PRISM_NAME, config, stats=PrismStats(), backend=backend)
    haystack = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(settings.seed)
    keys = {(length, depth): rng.randrange(10000, 100000)
            for length in settings.lengths for depth in settings.depths}
    methods = (("full", "sdpa"), ("prism", PRISM_NAME))
    previous = model.config._attn_implementation
    trials = []
    bar = tqdm(total=len(keys) * len(methods), unit="prompt", disable=not progress,
               desc="passkey")
    try:
        for (length, depth), key in keys.items():
            prompt = build_passkey_prompt(tokenizer, haystack, length - settings.new_tokens,
                                          depth, key)
            ids = torch.tensor([prompt], device=device)
            for method, implementation in methods:
                bar.set_description(f"passkey {length} tokens, depth {depth:g}, {method}")
                model.set_attn_implementation(implementation)
                stats.reset()
                start = time.perf_counter()
                answer_ids = greedy_decode(model, ids, settings.new_tokens)
                answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
                trials.append({
                    "method": method, "length": length, "depth": depth, "key": key,
                    "answer": answer, "success": first_number(answer) == key,
                    "density": stats.mean_density() if method == "prism" else 1.0,
                    "seconds": time.perf_counter() - start,
                })
                bar.update(1)
    finally:
        bar.close()
        model.set_attn_implementation(previous)

    accuracy = {}
    for method, _ in methods:
        per_length = {}
        for length in settings.lengths:
            hits = [t["success"] for t in trials if t["method"] == method and t["length"] == length]
            per_length[str(length)] = sum(hits) / len(hits)
        mine = [t["success"] for t in trials if t["method"] == method]
        accuracy[method] = {"overall": sum(mine) / len(mine), "by_length": per_length}
    densities = {}
    for length in settings.lengths:
        values = [t["density"] for t in trials if t["method"] == "prism" and t["length"] == length]
        densities[str(length)] = sum(values) / len(values)
    return {
        "task": "passkey",
        "backend": backend,
        "settings": {**asdict(settings), "lengths": list(settings.lengths),
                     "depths": list(settings.depths)},
        "config": asdict(config),
        "accuracy": accuracy,
        "prism_density_by_length": densities,
        "trials": trials,
    }


__all__ = ["PasskeySettings", "build_passkey_prompt", "first_number", "greedy_decode",
           "run_passkey_eval"]
