"""Render the Estimators page's tables from the registry and the committed results.

Called from ``conf.py`` on every build, so docs/estimators.rst holds the
specification (hand-written) and includes, never retypes, the numbers:

* ``_generated/estimator_registry.rst`` - the estimator registry
  (:mod:`prism.reference.registry`) and the Triton kernels of its stages;
* ``_generated/estimator_sweeps.rst`` - every ``prism eval --task sweep`` point
  under ``benchmarks/results/eval/sweeps/`` (``summarize.py`` there);
* ``_generated/estimator_h200.rst`` - every ``benchmarks/bench_estimators.py``
  run on the H200 (``benchmarks/results/h200_estimators_*.json``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def _list_table(title: str, header, rows) -> str:
    lines = [f".. list-table:: {title}", "   :header-rows: 1", ""]
    for row in (header, *rows):
        lines.append("   * - " + "\n     - ".join(str(cell) for cell in row))
    return "\n".join(lines) + "\n"


def registry_table() -> str:
    from prism.optimized.estimators import KERNEL_STAGES
    from prism.reference.registry import ESTIMATOR_REGISTRY

    rows = []
    for spec in ESTIMATOR_REGISTRY.values():
        stages = ", ".join(f"{stage} (kernel)" if stage in KERNEL_STAGES else stage
                           for stage in spec.stages) or "Prism's selection kernels"
        params = ", ".join(f"``{name}``" for name in spec.parameters) or "-"
        rows.append((f"``{spec.name}``", f":ref:`{spec.docs}`", spec.summary, params, stages,
                     spec.threshold_moves))
    return _list_table("The estimator registry (prism.reference.registry)",
                       ("estimator", "section", "what scores the tiles", "fields it reads",
                        "scoring stages (CUDA)", "high_threshold moves"), rows)


def sweep_tables(root: Path) -> str:
    path = root / "benchmarks" / "results" / "eval" / "sweeps" / "summarize.py"
    spec = importlib.util.spec_from_file_location("prism_sweep_summary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tables()


def h200_tables(root: Path) -> str:
    parts = []
    for path in sorted((root / "benchmarks" / "results").glob("h200_estimators_*.json")):
        data = json.loads(path.read_text())
        commit = data.get("environment", {}).get("commit", path.stem.split("_")[-1])
        if not data["rows"]:
            parts.append(_stage_tables(path.name, commit, data))
            continue
        settings = [entry["setting"] for entry in data["rows"][0]["estimators"]]
        rows = []
        for row in data["rows"]:
            cells = [f"{row['tokens'] // 1024}K"]
            for entry in row["estimators"]:
                cells.append(f"{entry['ms']:.3g} ms (d {entry['density']:.2f})"
                             if "ms" in entry else "error")
            cells.append(f"{row['sdpa_ms']['cudnn']:.3g} ms")
            rows.append(cells)
        commit = data.get("environment", {}).get("commit", path.stem.split("_")[-1])
        parts.append(_list_table(
            f"``{path.name}`` (commit {commit}): selection time, median per call, and "
            "causal tile density d", ("tokens", *settings, "cuDNN dense attention"), rows))
        if data.get("stages"):
            parts.append(_stage_tables(path.name, commit, data))
    return "\n".join(parts) if parts else "No H200 estimator run is committed.\n"


def _stage_tables(name: str, commit: str, data: dict) -> str:
    """``bench_estimators.py --stages``: each stage alone, and the launch shapes tried."""
    rows = []
    for row in data["stages"]:
        vs, tp = row["vertical_slash"], row["tile_top_p"]
        anti = {}
        for entry in row["antidiagonal"]:
            if "ms" in entry:
                best = anti.get(entry["stride"])
                anti[entry["stride"]] = min(best, entry["ms"]) if best else entry["ms"]
        rows.append((f"{row['tokens'] // 1024}K",
                     ", ".join(f"S {s}: {ms:.3g} ms" for s, ms in sorted(anti.items())),
                     f"{vs['distributions_kernel_ms']:.3g} ms",
                     f"{vs['tiles_kernel_ms']:.3g} ms",
                     f"{vs['tiles_reference_torch_ms']:.3g} ms",
                     f"{tp['kernel_ms']:.3g} ms", f"{tp['reference_sort_ms']:.3g} ms"))
    parts = [_list_table(
        f"``{name}`` (commit {commit}): each stage alone, median per call (antidiagonal: "
        "fastest launch shape measured)",
        ("tokens", "antidiagonal scores", "vertical-slash distributions (kernels)",
         "vertical-slash tiles (the stage on the CUDA path at that commit)",
         "vertical-slash tiles (reference torch)", "tile top-p (kernel)",
         "tile top-p (reference sort)"), rows)]
    longest = data["stages"][-1]
    shapes = [(str(e["stride"]), e["tuning"].replace("PackedTuning", ""),
               f"{e['ms']:.3g} ms" if "ms" in e else "-",
               f"{e['tflops']:.0f}" if "ms" in e else e.get("error", "")[:60])
              for e in longest["antidiagonal"]]
    parts.append(_list_table(
        f"``{name}``: packed antidiagonal kernel launch shapes at "
        f"{longest['tokens'] // 1024}K tokens (first row per stride: the default then)",
        ("stride", "launch shape", "time", "TFLOP/s (or error)"), shapes))
    return "\n".join(parts)


def render(root: Path) -> None:
    out = root / "docs" / "_generated"
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimator_registry.rst").write_text(registry_table())
    (out / "estimator_sweeps.rst").write_text(sweep_tables(root))
    (out / "estimator_h200.rst").write_text(h200_tables(root))


if __name__ == "__main__":
    render(Path(__file__).resolve().parent.parent)
