"""Tables, JSON and plots of ``prism eval`` results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

METHOD_ORDER = ("full", "prism", "mean_pooling", "preset")


def environment() -> dict:
    """Versions, threads, date and git commit, recorded next to every result."""
    import torch

    import prism

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prism": prism.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
    }
    # Both entries are optional context: a missing library or git leaves them out.
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = Path(prism.__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=5, check=False)
        if commit.returncode == 0:
            info["commit"] = commit.stdout.strip()
    return info


def perplexity_table(result: dict) -> str:
    """The summary table of a perplexity run: one row per method."""
    methods = result["methods"]
    full_ppl = methods["full"]["perplexity"]
    lines = [f"{'method':<28} {'perplexity':>10} {'ratio':>6} {'density':>8} {'recall':>7} "
             f"{'pass s':>7} {'attn s':>7}"]
    for name in METHOD_ORDER:
        if name not in methods:
            continue
        m = methods[name]
        recall = "-" if m.get("recall") is None else f"{m['recall']:.3f}"
        lines.append(
            f"{m['label']:<28} {m['perplexity']:>10.3f} {m['perplexity'] / full_ppl:>6.3f} "
            f"{m['density']:>8.3f} {recall:>7} {m['pass_seconds']:>7.1f} "
            f"{m['attention_seconds']:>7.1f}"
        )
    return "\n".join(lines)


def layer_table(result: dict) -> str:
    """Per-layer density (own pass) and recall (full-attention activations) of both selections."""
    prism_m, pool_m = result["methods"]["prism"], result["methods"]["mean_pooling"]
    lines = [f"{'layer':>5} {'prism density':>14} {'prism recall':>13} "
             f"{'meanpool density':>17} {'meanpool recall':>16}"]
    for layer in range(len(prism_m["recall_by_layer"])):
        lines.append(
            f"{layer:>5} {prism_m['density_by_layer'][layer]:>14.3f} "
            f"{prism_m['recall_by_layer'][layer]:>13.3f} "
            f"{pool_m['density_by_layer'][layer]:>17.3f} "
            f"{pool_m['recall_by_layer'][layer]:>16.3f}"
        )
    return "\n".join(lines)


def passkey_table(result: dict) -> str:
    """Accuracy per method (rows) and length (columns), with Prism's mean density."""
    lengths = [str(n) for n in result["settings"]["lengths"]]
    header = f"{'method':<16}" + "".join(f"{n + ' tok':>11}" for n in lengths) + f"{'all':>8}"
    lines = [header]
    for method, label in (("full", "full attention"), ("prism", "Prism")):
        acc = result["accuracy"][method]
        lines.append(f"{label:<16}" + "".join(f"{acc['by_length'][n]:>11.2f}" for n in lengths)
                     + f"{acc['overall']:>8.2f}")
    density = result["prism_density_by_length"]
    lines.append(f"{'Prism density':<16}" + "".join(f"{density[n]:>11.3f}" for n in lengths))
    lines += ["", "retrieved (full attention / Prism) by depth:",
              f"{'depth':<16}" + "".join(f"{n + ' tok':>11}" for n in lengths)]
    outcome = {(t["method"], str(t["length"]), t["depth"]): t["success"]
               for t in result["trials"]}
    for depth in result["settings"]["depths"]:
        cells = []
        for n in lengths:
            marks = ["yes" if outcome[(method, n, depth)] else "no"
                     for method in ("full", "prism")]
            cells.append(f"{' / '.join(marks):>11}")
        lines.append(f"{depth:<16g}" + "".join(cells))
    return "\n".join(lines)


def sweep_table(result: dict) -> str:
    """One row per sweep point (and full attention): threshold, density, perplexity, passkey."""
    full = result["full"]
    lines = [f"{'method':<22} {'p':>7} {'density':>8} {'perplexity':>10} {'ratio':>6} "
             f"{'passkey':>8} {'sel s/layer':>11}"]

    def passkey(entry):
        if "passkey_trials" not in entry:
            return "-"
        return f"{entry['passkey_correct']}/{entry['passkey_trials']}"

    lines.append(f"{'full attention':<22} {'-':>7} {1.0:>8.3f} {full['perplexity']:>10.3f} "
                 f"{1.0:>6.3f} {passkey(full):>8} {'-':>11}")
    for point in result["points"]:
        lines.append(
            f"{point['method']:<22} {point['threshold']:>7.4g} {point['density']:>8.3f} "
            f"{point['perplexity']:>10.3f} {point['ratio_to_full']:>6.3f} "
            f"{passkey(point):>8} {point['selection_seconds_per_layer']:>11.4f}")
    return "\n".join(lines)


@contextlib.contextmanager
def _atomic_target(path: Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    A reader never sees a half-written file: it finds the old file or the new
    one. On an error the temporary file is removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write ``result`` as indented JSON, atomically, creating the folder; returns the path."""
    path = Path(path)
    with _atomic_target(path) as temporary:
        temporary.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def plot_layers(result: dict, path: str | os.PathLike) -> Path:
    """Recall and density per layer of Prism and mean pooling, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    fig, (ax_recall, ax_density) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for name, color in (("prism", "tab:blue"), ("mean_pooling", "tab:orange")):
        m = methods[name]
        layers = range(len(m["recall_by_layer"]))
        label = f"{m['label']} (ppl {m['perplexity']:.2f})"
        ax_recall.plot(layers, m["recall_by_layer"], marker="o", ms=3, color=color, label=label)
        ax_density.plot(layers, m["density_by_layer"], marker="o", ms=3, color=color,
                        label=label)
    ax_recall.set_ylabel("attention recall")
    ax_recall.set_title(
        f"{result.get('model', 'model')}: {result['tokens']} tokens, "
        f"tile {result['config']['block_size']} (full attention ppl "
        f"{methods['full']['perplexity']:.2f})", fontsize=10)
    ax_recall.legend(fontsize=8)
    ax_recall.grid(alpha=0.3)
    ax_density.set_ylabel("causal tile density")
    ax_density.set_xlabel("layer")
    ax_density.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with _atomic_target(path) as temporary:
        fig.savefig(temporary, dpi=120, format="png")
    plt.close(fig)
    return path


def plot_passkey(result: dict, path: str | os.PathLike) -> Path:
    """Passkey accuracy per length for full attention and Prism, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [str(n) for n in result["settings"]["lengths"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    bars = (("full", "full attention", -width / 2), ("prism", "Prism", width / 2))
    for method, label, offset in bars:
        values = [result["accuracy"][method]["by_length"][n] for n in lengths]
        ax.bar([i + offset for i in range(len(lengths))], values, width, label=label)
    ax.set_xticks(range(len(lengths)), [f"{n} tokens" for n in lengths])
    ax.set_ylim(0, 1.25)  # room for the legend above the bars
    ax.set_ylabel("retrieval accuracy")
    ax.set_title(f"passkey retrieval, {len(result['settings']['depths'])} depths per length",
                 fontsize=10)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    path = Path(path)
    with _atomic_target(path) as temporary:
        fig.savefig(temporary, dpi=120, format="png")
    plt.close(fig)
    return path


__all__ = ["environment", "layer_table", "passkey_table", "perplexity_table", "plot_layers",
           "plot_passkey", "write_json"]
