"""
The Triton kernels: same API, on the GPU
========================================

:mod:`prism.optimized` implements the reference's public functions with
Triton kernels: one pass that pools queries and keys, a selection kernel
that scores both bands, runs top-p per row and writes the mask and the
compact indices directly (no probability tensor in memory), and a
flash-attention kernel that visits only the selected key tiles. The
top-level functions of :mod:`prism` dispatch to them for CUDA tensors.

The docs are built on a machine without a GPU, so this page shows the
results committed under ``benchmarks/results/`` by runs on an NVIDIA H200;
it never computes or invents timings here. On a CUDA machine the first cell
also runs the kernels and checks them against the reference.
"""

# %%
# The same call, two implementations
# ----------------------------------

import inspect
import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import prism
from prism import optimized, reference

for name in ("select_blocks", "block_sparse_attention", "prism_attention", "mask_to_indices"):
    same = inspect.signature(getattr(reference, name)) == inspect.signature(
        getattr(optimized, name))
    print(f"{name:24s} same signature: {same}")

if torch.cuda.is_available():
    q = reference.apply_rope(torch.randn(1, 8, 4096, 128), 5e5).cuda().bfloat16()
    k = reference.apply_rope(torch.randn(1, 2, 4096, 128), 5e5).cuda().bfloat16()
    v = torch.randn(1, 2, 4096, 128).cuda().bfloat16()
    out, mask = prism.prism_attention(q, k, v, return_mask=True)  # Triton kernels
    ref_mask = reference.select_blocks(q.cpu(), k.cpu())
    ties = reference.boundary_ties(q.cpu(), k.cpu())
    print("mask differences outside ties:",
          len(reference.mask_differences(mask.cpu(), ref_mask, ties)))
else:
    print("No CUDA device here: the kernels are exercised by the test suite through "
          "Triton's interpreter, and the timings below come from the committed H200 runs.")

# %%
# Committed H200 results
# ----------------------
# ``benchmarks/bench_prism.py --mode full`` measured selection, sparse
# attention at fixed densities, FlexAttention on the same masks, and torch
# SDPA (cuDNN and flash backends) in one run.

here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
results = next(p for p in (here.parent.parent / "benchmarks" / "results",
                           Path.cwd().parent / "benchmarks" / "results",
                           Path.cwd() / "benchmarks" / "results") if p.is_dir())
run = json.loads(sorted(results.glob("h200_full_*.json"))[-1].read_text())
env = run["environment"]
print(f"{env['gpu']}, torch {env['torch']}, Triton {env['triton']}, commit {env['commit']}")

tokens = [entry["tokens"] for entry in run["lengths"]]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for density in (1.0, 0.3, 0.15, 0.05):
    ratios = [next(s["kernel_vs_cudnn"] for s in entry["sparse"]
                   if round(s["density_target"], 2) == density) for entry in run["lengths"]]
    axes[0].plot(tokens, ratios, marker="o", label=f"density {density}")
axes[0].axhline(1.0, color="k", lw=0.8)
axes[0].set_xscale("log", base=2)
axes[0].set_xlabel("tokens")
axes[0].set_ylabel("time / cuDNN dense time")
axes[0].set_title("Block-sparse attention vs dense cuDNN")
axes[0].legend(fontsize=8)
axes[1].plot(tokens, [entry["select_ms"] for entry in run["lengths"]], marker="o",
             label="Prism selection (mask + indices)")
axes[1].plot(tokens, [entry["sdpa_ms"]["cudnn"] for entry in run["lengths"]], marker="o",
             label="dense cuDNN attention")
axes[1].set_xscale("log", base=2)
axes[1].set_yscale("log")
axes[1].set_xlabel("tokens")
axes[1].set_ylabel("ms")
axes[1].set_title("Selection cost against dense attention")
axes[1].legend(fontsize=8)
fig.tight_layout()

# %%
# At 128K tokens:

last = run["lengths"][-1]
structured = last["prism_structured"]
print(f"selection {last['select_ms']:.2f} ms; cuDNN dense {last['sdpa_ms']['cudnn']:.1f} ms; "
      f"Prism end to end {structured['end_to_end_ms']:.1f} ms at density "
      f"{structured['density']:.3f} ({structured['cudnn_over_end_to_end']:.1f}x faster)")

# %%
# The full tables, the targets and what limits each kernel are on
# :doc:`../performance`.
