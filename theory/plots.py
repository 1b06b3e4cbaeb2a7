"""Figures of the theory page, drawn with matplotlib's Agg canvas.

Every function builds a :class:`matplotlib.figure.Figure` directly (no
``pyplot``), so drawing never touches a global backend or opens a window,
and writes one PNG. :func:`write_all_figures` makes the set the docs use.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from prism.reference import band_sizes

from .blind_spot import (
    LABEL_PRISM_UNCALIBRATED,
    METHOD_MEAN_POOLING,
    METHOD_PRISM,
    BlindSpotResult,
    compare_selections,
)
from .frequency import cutoff_frequency, pooling_gain, rope_frequencies
from .recall import full_attention_probabilities
from .synthetic import SyntheticHead, synthetic_positional_head

#: File names written by :func:`write_all_figures`, in that order.
FIGURE_NAMES = (
    "gain_vs_frequency.png",
    "gain_per_pair.png",
    "blind_spot_map.png",
    "blind_spot_map_base1e4.png",
    "blind_spot_recall.png",
)

_DPI = 120
_METHOD_COLOURS = {
    METHOD_MEAN_POOLING: "tab:red",
    METHOD_PRISM: "tab:blue",
    LABEL_PRISM_UNCALIBRATED: "tab:gray",
}


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    return path


def plot_gain_vs_frequency(path: str, block_sizes=(32, 64, 128, 256)) -> str:
    """Signed pooling gain against frequency, one curve per tile size.

    Parameters
    ----------
    path : str
        PNG file to write (folders are created).
    block_sizes : sequence of int
        Tile sizes to draw; each gets a dotted line at its cut-off ``2 pi / B``.

    Returns
    -------
    str
        ``path``.
    """
    omega = np.logspace(-4, math.log10(math.pi), 4000)
    figure = _new_figure(7.0, 4.0)
    axes = figure.add_subplot()
    for block_size in block_sizes:
        line, = axes.plot(omega, pooling_gain(omega, block_size), label=f"B = {block_size}")
        axes.axvline(cutoff_frequency(block_size), color=line.get_color(), linestyle=":",
                     linewidth=1)
    axes.axhline(0.0, color="black", linewidth=0.5)
    axes.set_xscale("log")
    axes.set_xlabel(r"RoPE pair frequency $\omega$ (rad / token); dotted: $2\pi/B$")
    axes.set_ylabel(r"gain $\sin(B\omega/2)\,/\,(B\sin(\omega/2))$")
    axes.set_title("Mean pooling over a tile is a low-pass filter")
    axes.legend(loc="lower left")
    return _save(figure, path)


def plot_gain_per_pair(path: str, head_dim: int = 128, block_size: int = 128,
                       bases=(1e4, 1e5, 5e5, 1e6)) -> str:
    """Gain of every RoPE pair of one head at several bases, with contract §4's bands.

    Parameters
    ----------
    path : str
        PNG file to write.
    head_dim : int
        ``D`` (default 128, i.e. 64 pairs).
    block_size : int
        Tile size (default 128).
    bases : sequence of float

    Returns
    -------
    str
        ``path``.
    """
    n_pairs = head_dim // 2
    pairs = np.arange(n_pairs)
    figure = _new_figure(7.0, 4.0)
    axes = figure.add_subplot()
    high_dims, low_dims = band_sizes(head_dim)
    high_pairs, low_pairs = high_dims // 2, low_dims // 2
    axes.axvspan(-0.5, high_pairs - 0.5, color="tab:orange", alpha=0.12, label="high band")
    axes.axvspan(n_pairs - low_pairs - 0.5, n_pairs - 0.5, color="tab:green", alpha=0.12,
                 label="low band")
    for base in bases:
        gains = pooling_gain(rope_frequencies(head_dim, base), block_size).numpy()
        axes.plot(pairs, gains, marker="o", markersize=3, label=f"base {base:.0e}")
    axes.axhline(0.0, color="black", linewidth=0.5)
    axes.set_xlabel(f"pair m (frequency base^(-2m/{head_dim}))")
    axes.set_ylabel("gain")
    axes.set_title(f"Per-pair pooling gain, D = {head_dim}, B = {block_size}")
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def _max_pool(image: np.ndarray, factor: int) -> np.ndarray:
    """Downsample by the maximum of ``factor x factor`` blocks, so thin lines survive."""
    n_rows, n_cols = image.shape
    rows, cols = n_rows // factor, n_cols // factor
    trimmed = image[: rows * factor, : cols * factor]
    return trimmed.reshape(rows, factor, cols, factor).max(axis=(1, 3))


def plot_blind_spot_map(path: str, head: SyntheticHead | None = None, *,
                        block_size: int = 128, threshold: float = 0.95) -> str:
    """Token attention map of the synthetic head with each method's tiles outlined.

    Parameters
    ----------
    path : str
        PNG file to write.
    head : SyntheticHead, optional
        Defaults to :func:`synthetic_positional_head` at base 5e5.
    block_size : int
    threshold : float
        Top-p of every method.

    Returns
    -------
    str
        ``path``.
    """
    from matplotlib.patches import Rectangle

    if head is None:
        head = synthetic_positional_head()
    results, masks = compare_selections(head, block_size=block_size, threshold=threshold)
    probabilities = full_attention_probabilities(head.q, head.k)[0, 0].numpy()
    n = head.num_tokens
    factor = max(1, n // 512)
    image = np.log10(_max_pool(probabilities, factor) + 1e-12)

    figure = _new_figure(4.2 * len(results), 4.6)
    for index, result in enumerate(results):
        axes = figure.add_subplot(1, len(results), index + 1)
        shown = axes.imshow(image, cmap="magma", vmin=-6, vmax=0, extent=(0, n, n, 0),
                            interpolation="nearest")
        mask = masks[result.label][0, 0]
        colour = _METHOD_COLOURS[result.label]
        for i, j in torch.nonzero(mask).tolist():
            axes.add_patch(Rectangle((j * block_size, i * block_size), block_size, block_size,
                                     fill=False, edgecolor=colour, linewidth=1.2))
        axes.set_title(f"{result.label}\nrecall {result.recall:.3f}, density "
                       f"{result.density:.3f}", fontsize="medium")
        axes.set_xlabel("key position")
        if index == 0:
            axes.set_ylabel("query position")
    colorbar = figure.colorbar(shown, ax=figure.axes, shrink=0.8)
    colorbar.set_label("log10 attention probability")
    figure.suptitle(f"Synthetic head, base {head.base:.0e}, slash at offset "
                    f"{head.slash_offset}, tiles of {block_size}, top-p {threshold}")
    return _save(figure, path)


def plot_blind_spot_recall(path: str, rows: list[BlindSpotResult]) -> str:
    """Bar chart of recall and density per base and method.

    Parameters
    ----------
    path : str
        PNG file to write.
    rows : list of BlindSpotResult
        Typically :func:`prism.theory.blind_spot_table`; rows of mean pooling
        at other thresholds than Prism's are left out.

    Returns
    -------
    str
        ``path``.
    """
    prism_thresholds = {row.threshold for row in rows if row.method == METHOD_PRISM}
    kept = [row for row in rows if row.threshold in prism_thresholds]
    bases = sorted({row.base for row in kept})
    labels = list(dict.fromkeys(row.label for row in kept))
    width = 0.8 / len(labels)
    figure = _new_figure(10.0, 4.0)
    for panel, metric in enumerate(("recall", "density")):
        axes = figure.add_subplot(1, 2, panel + 1)
        for offset, label in enumerate(labels):
            values = [next(getattr(r, metric) for r in kept if r.base == base and r.label == label)
                      for base in bases]
            positions = np.arange(len(bases)) + (offset - (len(labels) - 1) / 2) * width
            axes.bar(positions, values, width, label=label, color=_METHOD_COLOURS.get(label))
        axes.set_xticks(np.arange(len(bases)), [f"{base:.0e}" for base in bases])
        axes.set_xlabel("RoPE base")
        axes.set_ylim(0, 1.05)
        axes.set_title(f"{metric} (top-p {sorted(prism_thresholds)[0]})")
        if metric == "recall":
            axes.axhline(0.95, color="black", linestyle=":", linewidth=1)
    figure.axes[0].legend(loc="lower left", fontsize="small")
    return _save(figure, path)


def write_all_figures(directory: str, rows: list[BlindSpotResult] | None = None) -> list[str]:
    """Write every figure of the theory page into ``directory``.

    Parameters
    ----------
    directory : str
        Created if missing.
    rows : list of BlindSpotResult, optional
        Results for the recall chart; computed with
        :func:`prism.theory.blind_spot_table` when None.

    Returns
    -------
    list of str
        The paths written, named as in :data:`FIGURE_NAMES`.
    """
    from .blind_spot import blind_spot_table

    if rows is None:
        rows = blind_spot_table()
    os.makedirs(directory, exist_ok=True)
    names = iter(FIGURE_NAMES)
    return [
        plot_gain_vs_frequency(os.path.join(directory, next(names))),
        plot_gain_per_pair(os.path.join(directory, next(names))),
        plot_blind_spot_map(os.path.join(directory, next(names))),
        plot_blind_spot_map(os.path.join(directory, next(names)),
                            synthetic_positional_head(1e4)),
        plot_blind_spot_recall(os.path.join(directory, next(names)), rows),
    ]
