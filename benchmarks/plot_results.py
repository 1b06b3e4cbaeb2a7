"""Plots of a ``bench_prism.py --mode full`` JSON file (runs anywhere, no GPU needed).

Usage::

    python benchmarks/plot_results.py benchmarks/results/h200_full_a1f05c6.json

Writes ``<json stem>_attention.png`` (times against tokens: dense SDPA, our
kernel and FlexAttention at each density) and ``<json stem>_selection.png``
(selection time and its peak extra memory against tokens) beside the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(path: str) -> list[Path]:
    data = json.loads(Path(path).read_text())
    rows = data["lengths"]
    env = data["environment"]
    tokens = [r["tokens"] for r in rows]
    title = f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"
    stem = Path(path).with_suffix("")
    written = []

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, style in (("cudnn", "k-"), ("flash", "k--")):
        ax.plot(tokens, [r["sdpa_ms"].get(name) for r in rows], style, label=f"SDPA {name} (dense)")
    densities = [e["density_target"] for e in rows[0]["sparse"]]
    colors = plt.cm.viridis([i / max(1, len(densities) - 1) for i in range(len(densities))])
    for density, color in zip(densities, colors, strict=True):
        ours = [next(e["kernel_ms"] for e in r["sparse"] if e["density_target"] == density)
                for r in rows]
        ax.plot(tokens, ours, "o-", color=color, label=f"Prism kernel, density {density}")
        flex = [(r["tokens"], e["flex_ms"]) for r in rows for e in r["sparse"]
                if e["density_target"] == density and "flex_ms" in e]
        if flex:
            ax.plot(*zip(*flex, strict=True), "x:", color=color,
                    label=f"FlexAttention, density {density}")
    ax.plot(tokens, [r["prism_structured"]["end_to_end_ms"] for r in rows], "s-", color="red",
            label="prism_attention end to end (structured input)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens (B=1, 32 q heads, 8 KV heads, D=128, bf16, tile 128, causal)")
    ax.set_ylabel("ms (median of do_bench)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    out = Path(f"{stem}_attention.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    written.append(out)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(tokens, [r["select_ms"] for r in rows], "o-", label="selection (mask + indices)")
    ax.plot(tokens, [r["select_blocks_ms"] for r in rows], "o--", label="select_blocks (mask)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("ms")
    memory = ax.twinx()
    memory.plot(tokens, [r["memory"]["peak_extra_mb_select_blocks"] for r in rows], "s:",
                color="gray", label="select_blocks peak extra MB")
    memory.plot(tokens, [r["memory"]["probability_tensor_mb"] for r in rows], "^:",
                color="orange", label="fp32 (H, 2nq, nk) probability tensor MB")
    memory.set_yscale("log")
    memory.set_ylabel("MB")
    lines = ax.get_legend_handles_labels()
    more = memory.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=8)
    out = Path(f"{stem}_selection.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    written.append(out)
    return written


if __name__ == "__main__":
    for written in plot(sys.argv[1]):
        print(written)
