"""Tables of the committed ``prism eval --task sweep`` results (docs/estimators.rst).

Run from the repository root::

    python benchmarks/results/eval/sweeps/summarize.py

prints, as reStructuredText list-tables, (1) every measured point and (2) each
method's perplexity at matched densities, linearly interpolated between the two
measured points of its curve that bracket the density (never extrapolated), with
its selection cost (the density at the default's perplexity is "<= d" when the
curve's sparsest measured point, at density d, already has a perplexity no
higher); and draws the curves into ``curves.png`` beside this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MATCHED = (0.3, 0.4)
LABELS = {
    "prism": "Prism (contract v1)",
    "mean_pooling": "mean pooling",
    "antidiagonal-8": "antidiagonal, stride 8",
    "antidiagonal-4": "antidiagonal, stride 4",
    "antidiagonal-16": "antidiagonal, stride 16",
    "vertical_slash": "vertical-slash, 64 last queries",
    "prism_vertical_slash-0.3": "Prism + vertical-slash (vs p=0.3)",
    "prism_vertical_slash-0.8": "Prism + vertical-slash (vs p=0.8)",
    "subtile": "Prism on 32-token sub-tiles",
    "antidiagonal_vertical_slash-8-0.3": "antidiagonal stride 8 + vertical-slash (vs p=0.3)",
    "antidiagonal_vertical_slash-4-0.3": "antidiagonal stride 4 + vertical-slash (vs p=0.3)",
    "antidiagonal_vertical_slash-8-0.5": "antidiagonal stride 8 + vertical-slash (vs p=0.5)",
}
#: Runs of ``share_kv_group`` measured before its final definition (docs/estimators.rst,
#: "GQA-group-shared scoring"): folder -> curve suffix.
VARIANTS = {"bible-4k-advs-vs50-s32-kvshared": "kvshared_meanq",
            "bible-4k-advs-vs50-s32-kvshared-high": "kvshared_meanq",
            "bible-4k-advs-vs50-s32-kvshared-probmean": "kvshared_probmean"}
#: Curve suffix -> label suffix, and the scoring FLOPs divisor of each part
#: (antidiagonal, vertical-slash) per query head (SmolLM2: 3 query heads per KV head).
SHARED = {"kvshared": (", GQA-group-shared", (3, 1)),
          "kvshared_meanq": (", GQA-group-shared, mean query in both parts", (3, 3)),
          "kvshared_probmean": (", GQA-group-shared, mean of the heads' tile probabilities",
                                (1, 1))}


def curve_key(point: dict) -> str:
    """The curve of a point: its method, stride or samples, vertical-slash top-p, the
    vertical-slash stage's last queries when not 64, sharing."""
    key = _method_key(point)
    last = point["config"].get("last_queries", 64)
    if "vertical_slash" in point["method"] or point["method"] == "cascade":
        key = key if last == 64 else f"{key}-L{last}"
    shared = point.get("_variant") or (
        "kvshared" if point["config"].get("share_kv_group") else None)
    return key if shared is None else f"{key}-{shared}"


def _method_key(point: dict) -> str:
    method, config = point["method"], point["config"]
    if method == "cascade":
        return (f"cascade-{config['antidiagonal_stride']}-{config['candidate_threshold']:g}"
                f"-{config['vertical_slash_threshold']:g}")
    if method == "antidiagonal_vertical_slash":
        return (f"antidiagonal_vertical_slash-{config['antidiagonal_stride']}"
                f"-{config['vertical_slash_threshold']:g}")
    if method == "antidiagonal":
        return f"antidiagonal-{config['antidiagonal_stride']}"
    if method == "prism_vertical_slash":
        return f"prism_vertical_slash-{config['vertical_slash_threshold']:g}"
    if method == "sampled_vertical_slash":
        return (f"sampled_vertical_slash-{config['sampled_queries']}"
                f"-{config['vertical_slash_threshold']:g}")
    if method == "sampled":
        return f"sampled-{config['sampled_queries']}"
    return method


def label(key: str) -> str:
    """The table label of a curve key (LABELS, or one built from the key's parts)."""
    if key in LABELS:
        return LABELS[key]
    if key.rsplit("-", 1)[-1] in SHARED:
        base, shared = key.rsplit("-", 1)
        return label(base) + SHARED[shared][0]
    if key.rsplit("-", 1)[-1].startswith("L"):
        base, last = key.rsplit("-", 1)
        return label(base) + f", last {last[1:]} queries"
    method, *parts = key.split("-")
    if method == "cascade":
        return (f"cascade: Prism p={parts[1]} candidates, antidiagonal stride {parts[0]} "
                f"+ vertical-slash (vs p={parts[2]})")
    if method == "antidiagonal_vertical_slash":
        return f"antidiagonal stride {parts[0]} + vertical-slash (vs p={parts[1]})"
    if method == "prism_vertical_slash":
        return f"Prism + vertical-slash (vs p={parts[0]})"
    if method == "sampled_vertical_slash":
        return f"{parts[0]} sampled queries/tile + vertical-slash (vs p={parts[1]})"
    if method == "sampled":
        return f"{parts[0]} sampled queries/tile"
    return key


def load_runs() -> list[dict]:
    """Every ``sweep.json`` under this folder, sorted by path."""
    runs = []
    for path in sorted(HERE.glob("*/sweep.json")):
        run = json.loads(path.read_text())
        run["_path"] = str(path.relative_to(HERE))
        variant = VARIANTS.get(path.parent.name)
        for point in run["points"] if variant else ():
            point["_variant"] = variant
        runs.append(run)
    return runs


def text_label(run: dict) -> str:
    return "Python docs" if "Python" in run.get("text", "") else "KJV Bible"


def passkey_cell(entry: dict) -> str:
    """Keys found / trials, with the prompt lengths tried."""
    if "passkey_trials" not in entry:
        return "-"
    lengths = "+".join(f"{int(n) // 1024}K" for n in entry["passkey_by_length"])
    return f"{entry['passkey_correct']}/{entry['passkey_trials']} ({lengths})"


def selection_flops(method: str, tokens: int, head_dim: int = 64, block: int = 128,
                    last: int = 64, factor: int = 4, candidates: float = 1.0) -> float:
    """Multiply-add FLOPs of one head's tile scoring (pooling and sorting left out).

    A GQA-group-shared curve (suffix in :data:`SHARED`) scores each part once
    per group: its FLOPs per query head are divided by the group's size. A
    cascade scores antidiagonals on the ``candidates`` fraction of the tiles
    (its curve's mean ``candidate_density``), after Prism's bands.
    """
    if method.rsplit("-", 1)[-1] in SHARED:
        base, shared = method.rsplit("-", 1)
        per_part = SHARED[shared][1]
        if not base.startswith("antidiagonal_vertical_slash"):
            return selection_flops(base, tokens, head_dim, block, last, factor) / per_part[0]
        vs = 2 * last * tokens * head_dim
        scores = selection_flops(base, tokens, head_dim, block, last, factor) - vs
        return scores / per_part[0] + vs / per_part[1]
    tiles = tokens / block
    bands = head_dim // 2 + (3 * head_dim) // 4  # contract §4 default band widths
    if method == "prism":
        return 2 * tiles**2 * bands
    if method == "mean_pooling":
        return 2 * tiles**2 * head_dim
    if method.startswith("sampled"):
        samples = int(method.split("-")[1])
        vs = 2 * last * tokens * head_dim if method.startswith("sampled_vertical") else 0
        return 2 * samples * tiles * tokens * head_dim + vs
    if method.startswith("cascade"):
        stride = int(method.split("-")[1])
        return (2 * tiles**2 * bands + candidates * 2 * tokens**2 * head_dim / stride
                + 2 * last * tokens * head_dim)
    if method.startswith("antidiagonal_vertical_slash"):
        stride = int(method.split("-")[1])
        return 2 * tokens**2 * head_dim / stride + 2 * last * tokens * head_dim
    if method.startswith("antidiagonal"):
        return 2 * tokens**2 * head_dim / int(method.split("-")[1])
    if method == "vertical_slash":
        return 2 * last * tokens * head_dim
    if method.startswith("prism_vertical_slash"):
        return 2 * tiles**2 * bands + 2 * last * tokens * head_dim
    if method == "subtile":
        return 2 * (tiles * factor) ** 2 * bands
    raise ValueError(method)


def curve(run: dict, method: str) -> list[tuple[float, float]]:
    """(density, perplexity) points of one method, sorted by density, duplicates averaged."""
    points = sorted((p["density"], p["perplexity"]) for p in run["points"]
                    if curve_key(p) == method)
    return points


def interpolate(points: list[tuple[float, float]], density: float) -> float | None:
    for (d0, p0), (d1, p1) in zip(points, points[1:], strict=False):
        if d0 <= density <= d1 and d1 > d0:
            return p0 + (p1 - p0) * (density - d0) / (d1 - d0)
    return None


def density_at(points: list[tuple[float, float]], perplexity: float) -> float | None:
    """Density at which a curve reaches ``perplexity`` (perplexity falls with density)."""
    for (d0, p0), (d1, p1) in zip(points, points[1:], strict=False):
        if p1 <= perplexity <= p0 and p0 > p1:
            return d0 + (d1 - d0) * (p0 - perplexity) / (p0 - p1)
    return None


def merged(runs: list[dict]) -> dict:
    """Points grouped by (text, tokens), all runs of that setting together."""
    groups: dict = {}
    for run in runs:
        key = (text_label(run), run["tokens"])
        group = groups.setdefault(key, {"full": run["full"], "points": [], "runs": []})
        for point in run["points"]:
            # A point measured twice (same curve and threshold) is deterministic; keep
            # one entry, the one that also carries passkey results.
            same = [p for p in group["points"]
                    if (curve_key(p), p["threshold"]) == (curve_key(point), point["threshold"])]
            if same and "passkey_trials" not in point:
                continue
            for old in same:
                group["points"].remove(old)
            group["points"].append(point)
        group["runs"].append(run["_path"])
        if "passkey_trials" in run["full"]:
            group["full_passkey"] = run["full"]
    return groups


def plot(groups: dict, path: Path) -> None:
    """Perplexity ratio against density, one panel per (text, tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        group = groups[key]
        full_ppl = group["full"]["perplexity"]
        for index, method in enumerate(curve_keys(groups)):
            points = curve({"points": group["points"]}, method)
            if points:
                # Ten colours cycle; later curves are dashed with square markers.
                style = "o-" if index < 10 else "s--"
                ax.plot([d for d, _ in points], [p / full_ppl for _, p in points], style,
                        label=label(method), markersize=3, color=f"C{index % 10}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.02, color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(f"{key[0]}, {key[1]} tokens", fontsize=9)
        ax.set_xlabel("mean causal tile density")
        ax.set_ylabel("perplexity / full attention")
        ax.set_ylim(0.99, 1.2)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def curve_keys(groups: dict) -> list[str]:
    """Every curve of the results: LABELS' order first, then the others sorted."""
    found = {curve_key(p) for group in groups.values() for p in group["points"]}
    return [key for key in LABELS if key in found] + sorted(found - set(LABELS))


def tables(groups: dict | None = None) -> str:
    """The two reStructuredText list-tables (every point; matched density)."""
    import io

    groups = merged(load_runs()) if groups is None else groups
    out = io.StringIO()
    out.write(".. list-table:: Every measured point\n   :header-rows: 1\n\n")
    header = ("text", "tokens", "method", "p", "density", "perplexity", "ratio", "passkey",
              "candidates")
    out.write("   * - " + "\n     - ".join(header) + "\n")
    for (text, tokens), group in sorted(groups.items()):
        full = group["full"]
        passkey = passkey_cell(group.get("full_passkey", full))
        row = (text, str(tokens), "full attention", "-", "1.000",
               f"{full['perplexity']:.3f}", "1.000", passkey, "-")
        out.write("   * - " + "\n     - ".join(row) + "\n")
        for p in sorted(group["points"], key=lambda p: (curve_key(p), p["threshold"])):
            row = (text, str(tokens), label(curve_key(p)), f"{p['threshold']:g}",
                   f"{p['density']:.3f}", f"{p['perplexity']:.3f}",
                   f"{p['ratio_to_full']:.3f}", passkey_cell(p),
                   f"{p['candidate_density']:.3f}" if "candidate_density" in p else "-")
            out.write("   * - " + "\n     - ".join(row) + "\n")
    out.write("\n.. list-table:: Perplexity ratio to full attention at matched density "
              "(interpolated)\n   :header-rows: 1\n\n")
    header = ("method", "text", "tokens", *(f"ratio at {d:g}" for d in MATCHED),
              "ratio at Prism p=0.95's density", "density at Prism p=0.95's perplexity",
              "scoring FLOPs / head",
              "selection s / layer (CPU)")
    out.write("   * - " + "\n     - ".join(header) + "\n")
    for (text, tokens), group in sorted(groups.items()):
        full_ppl = group["full"]["perplexity"]
        fake = {"points": group["points"]}
        default = [p for p in group["points"]
                   if p["method"] == "prism" and p["threshold"] == 0.95]
        for method in curve_keys(groups):
            points = curve(fake, method)
            if not points:
                continue
            cells = []
            for density in MATCHED:
                value = interpolate(points, density)
                cells.append("-" if value is None else f"{value / full_ppl:.3f}")
            same = interpolate(points, default[0]["density"]) if default else None
            if default and method == "prism":
                same = default[0]["perplexity"]
            cells.append("-" if same is None else f"{same / full_ppl:.3f}")
            reach = density_at(points, default[0]["perplexity"]) if default else None
            if default and method == "prism":
                reach = default[0]["density"]
            if reach is None and default and points[0][1] <= default[0]["perplexity"]:
                # The curve's sparsest measured point already does as well: an upper bound.
                cells.append(f"<= {points[0][0]:.3f}")
            else:
                cells.append("-" if reach is None else f"{reach:.3f}")
            mine = [p for p in group["points"] if curve_key(p) == method]
            times = [p["selection_seconds_per_layer"] for p in mine]
            scored = [p["candidate_density"] for p in mine if "candidate_density" in p]
            flops = selection_flops(method, tokens,
                                    candidates=sum(scored) / len(scored) if scored else 1.0)
            row = (label(method), text, str(tokens), *cells, f"{flops:.2e}",
                   f"{min(times):.4f}")
            out.write("   * - " + "\n     - ".join(row) + "\n")
    return out.getvalue()


def main() -> int:
    groups = merged(load_runs())
    plot(groups, HERE / "curves.png")
    sys.stdout.write(tables(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
