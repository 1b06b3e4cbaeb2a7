"""Render the Performance page's tables from the committed benchmark JSON.

Called from ``conf.py`` on every build, so the page always shows what
``benchmarks/results/`` holds and never numbers typed by hand.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path


def _run_date(path: Path) -> str:
    """When the run happened: its own ``environment.date`` (ISO 8601), else the
    date of the commit that added the file. A clone's file times are checkout
    times and say nothing about which run is newer."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict):
        date = data.get("date") or data.get("environment", {}).get("date")
        if date:
            return str(date)
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cI", "--", path.name],
                             cwd=path.parent, capture_output=True, text=True, check=False)
        return out.stdout.strip()
    except OSError:
        return ""


def _latest(results: Path, pattern: str) -> Path | None:
    files = sorted(results.glob(pattern), key=lambda p: (_run_date(p), p.name))
    return files[-1] if files else None


def _fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}g}"


def _table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = " ".join("=" * w for w in widths)
    fmt = lambda r: " ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True))
    return "\n".join([line, fmt(header), line, *map(fmt, rows), line, ""])


def render(root: Path) -> None:
    results = root / "benchmarks" / "results"
    out_dir = root / "docs" / "_generated"
    static = root / "docs" / "_static" / "perf"
    out_dir.mkdir(parents=True, exist_ok=True)
    static.mkdir(parents=True, exist_ok=True)
    full = _latest(results, "h200_full_*.json")
    parts = []
    if full is None:
        parts.append("No full benchmark run is committed yet.\n")
    else:
        data = json.loads(full.read_text())
        env, ceil = data["environment"], data["ceilings"]
        parts.append(
            f"Run ``{full.name}``: {env['gpu']}, torch {env['torch']}, Triton {env['triton']}, "
            f"commit ``{env['commit']}``, {env['date'][:10]}. Measured ceilings in the same "
            f"run: bf16 matmul {ceil['matmul_bf16_tflops']:.0f} TFLOP/s, device copy "
            f"{ceil['copy_tb_s']:.2f} TB/s.\n"
        )
        rows = []
        for entry in data["lengths"]:
            cudnn = entry["sdpa_ms"]["cudnn"]
            by_density = {round(s["density_target"], 2): s for s in entry["sparse"]}
            row = [f"{entry['tokens'] // 1024}K", _fmt(cudnn, 4), _fmt(entry["select_ms"])]
            for d in (1.0, 0.3, 0.15, 0.05):
                s = by_density.get(d)
                row.append("n/a" if s is None
                           else f"{s['kernel_ms']:.4g} ({s['kernel_vs_cudnn']:.2f}x)")
            flex = by_density.get(0.15, {}).get("flex_ms")
            row.append(_fmt(flex, 4))
            rows.append(row)
        parts.append(".. rubric:: Sparse attention on random causal tile masks (ms; ratio to "
                     "cuDNN dense in parentheses)\n")
        parts.append(_table(["tokens", "cuDNN dense", "selection", "density 1.0", "0.3",
                             "0.15", "0.05", "Flex at 0.15"], rows))
        rows = []
        for entry in data["lengths"]:
            p = entry.get("prism_structured")
            if not p:
                continue
            rows.append([f"{entry['tokens'] // 1024}K", f"{p['density']:.3f}",
                         _fmt(p["select_ms"]), _fmt(p["kernel_ms"], 4),
                         _fmt(p["end_to_end_ms"], 4), f"{p['cudnn_over_end_to_end']:.2f}x",
                         _fmt(p.get("flex_ms"), 4)])
        parts.append(".. rubric:: Prism end to end on structured inputs (ms)\n")
        parts.append(_table(["tokens", "density", "selection", "attention", "end to end",
                             "cuDNN / ours", "Flex, same mask"], rows))
        mem = data["lengths"][-1]["memory"]
        parts.append(
            f"Peak extra memory of ``select_blocks`` at {data['lengths'][-1]['tokens'] // 1024}K:"
            f" {mem['peak_extra_mb_select_blocks']:.0f} MiB, of which "
            f"{mem['mask_mb']:.0f} MiB is the returned mask; the fp32 probability tensor that "
            f"the paper's code allocates would be {mem['probability_tensor_mb']:.0f} MiB.\n"
        )
        for png in results.glob(full.stem + "*.png"):
            shutil.copy(png, static / png.name)
            parts.append(f".. image:: /_static/perf/{png.name}\n   :width: 90%\n")
    parts.extend(_test_parts(results))
    parts.extend(_matrix_parts(results))
    (out_dir / "performance_tables.rst").write_text("\n".join(parts))


def _whole_suite(run: dict) -> bool:
    """Whether a GPU test run's command ran the whole ``tests`` folder (older runs name
    no command: they ran tests/test_gpu.py, the whole GPU suite then)."""
    command = run.get("command") or ""
    return not command or re.search(r"(^|\s)tests/?(\s|$)", command) is not None


def _test_parts(results: Path) -> list[str]:
    """The newest run of the whole GPU suite, then the newer runs of parts of it."""
    paths = sorted(results.glob("h200_gpu_tests_*.json"), key=lambda p: (_run_date(p), p.name))
    runs = [(p, json.loads(p.read_text())) for p in paths]
    whole = [i for i, (_, t) in enumerate(runs) if _whole_suite(t)]
    first = whole[-1] if whole else 0
    parts = []
    for i, (path, t) in enumerate(runs[first:], start=first):
        counts = t["counts"]
        label = "GPU test suite" if i == first and whole else "Later run of part of the suite"
        parts.append(
            f"{label} (``{path.name}``): "
            f"``{t.get('command') or 'pytest tests/test_gpu.py'}`` gave "
            f"{counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed and "
            f"{counts.get('skipped', 0)} skipped on {t.get('gpu') or 'the GPU'}. "
            f"Largest relative errors against the reference: "
            f"{_error_list(t.get('max_errors') or {})}.\n")
    return parts


def _error_list(err: dict) -> str:
    """``output fp32 1.5e-06, ..., LSE fp32 6.4e-07`` for the dtypes a test run recorded."""
    names = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    parts = [f"{kind} {short} {err[f'{key}_error_{dtype}']:.1e}"
             for kind, key in (("output", "out"), ("LSE", "lse"))
             for dtype, short in names.items() if f"{key}_error_{dtype}" in err]
    return ", ".join(parts) or "none recorded"


_SPARSE = (0.3, 0.15, 0.05)
#: issue #14's targets on the same tile mask: FlexAttention / ours at sparse
#: densities, ours / cuDNN at density 1.0.
_FLEX_TARGET, _DENSE_TARGET = 1.2, 1.05
_FULL_MATRIX = 3 * 3 * 3 * 2 * 2 + 1  # D x GQA x tokens x tile x batch, and 256K


def _in_grid(key) -> bool:
    """Whether (D, q heads, kv heads, tokens, tile, batch) is one of the issue's cells."""
    d, hq, hkv, n, bs, b = key
    return key == (128, 32, 8, 262144, 128, 1) or (
        d in (64, 128, 256) and hq == 32 and hkv in (32, 8, 4)
        and n in (8192, 32768, 131072) and bs in (64, 128) and b in (1, 4))


def _cell_key(cell):
    return (cell["head_dim"], cell["q_heads"], cell["kv_heads"], cell["tokens"], cell["tile"],
            cell["batch"])


def _matrix_table(runs) -> list[str]:
    """One shape-matrix table over every run: each cell from the newest run holding it."""
    cells = {}
    for path, data in runs:
        for cell in data.get("matrix", []):
            commit = str(data.get("commit") or path.stem.rsplit("_", 1)[-1]).split()[0]
            cells[_cell_key(cell)] = (cell, commit)
    if not cells:
        return []
    rows, flex_ok, flex_seen, dense_ok, dense_seen = [], 0, 0, 0, 0
    for key in sorted(cells, key=lambda c: (c[3], c[0], -c[2], c[4], c[5])):
        cell, commit = cells[key]
        row = [cell["head_dim"], f"{cell['q_heads']}/{cell['kv_heads']}",
               f"{cell['tokens'] // 1024}K", cell["tile"], cell["batch"]]
        dense = cell.get("d1.0") or {}
        ratio = dense.get("ours_over_cudnn")
        row.append(f"{dense['ours_ms']:.3g} ({ratio:.2f}x)" if ratio else
                   _fmt(dense.get("ours_ms")))
        if ratio:
            dense_seen += 1
            dense_ok += ratio <= _DENSE_TARGET
        flex = [(cell.get(f"d{d}") or {}).get("flex_over_ours") for d in _SPARSE]
        row += [f"{e['ours_ms']:.3g} ({f:.2f})" if f else
                ("-" if e is None else f"{e['ours_ms']:.3g} (-)")
                for e, f in zip((cell.get(f"d{d}") for d in _SPARSE), flex, strict=True)]
        if all(flex):
            flex_seen += 1
            flex_ok += min(flex) >= _FLEX_TARGET
        row += [_fmt(cell.get("cudnn_ms")), commit]
        rows.append(row)
    return [
        ".. rubric:: The shape matrix: our kernel against FlexAttention and cuDNN\n",
        f"{sum(map(_in_grid, cells))} of the {_FULL_MATRIX} cells of issue #14's matrix (D "
        "64/128/256 x GQA 1/4/8 with 32 query heads x 8K/32K/128K x tile 64/128 x batch 1/4, "
        f"and 256K) are measured ({len(cells) - sum(map(_in_grid, cells))} more rows are "
        "other shapes), each "
        "from the newest run that holds it (last column: its commit). bf16, causal, random "
        "tile masks keeping the sink and the diagonal. Density 1.0: our kernel's ms and, in "
        "parentheses, ours over cuDNN dense (target at most "
        f"{_DENSE_TARGET}x; met in {dense_ok} of {dense_seen} cells). Densities 0.3, 0.15 "
        "and 0.05: our ms and FlexAttention (compiled, same tile mask) over ours (target "
        f"at least {_FLEX_TARGET} at every sparse density; met in {flex_ok} of "
        f"{flex_seen} cells with a FlexAttention number; '-': FlexAttention did not run).\n",
        _table(["D", "heads q/kv", "tokens", "tile", "batch", "density 1.0", "0.3", "0.15",
                "0.05", "cuDNN dense", "run"], rows),
    ]


def _graph_shape(e) -> str:
    """``D 128, 32/8, b1``: the shape of a graph row (older runs: the default shape)."""
    return (f"D {e.get('head_dim', 128)}, {e.get('q_heads', 32)}/{e.get('kv_heads', 8)}, "
            f"b{e.get('batch', 1)}")


def _graph_cells(runs) -> list[dict]:
    """Every graph cell (tokens, head dim, heads, batch) from the newest run that timed
    it, cells of newer runs first; each row gets its run's commit as ``run``."""
    cells = {}
    for _, data in reversed(runs):
        for e in data.get("graph") or []:
            key = (e.get("tokens"), e.get("head_dim", 128), e.get("q_heads", 32),
                   e.get("kv_heads", 8), e.get("batch", 1), e.get("shape"))
            cells.setdefault(key, {**e, "run": str(data.get("commit")).split()[0]})
    return list(cells.values())


def _graph_table(data) -> list[str]:
    rows = []
    for e in data.get("graph", []):
        if "error" in e:
            where = e.get("shape") or f"{e['tokens'] // 1024}K"
            rows.append([str(where), "", "failed: " + e["error"][:60], *[""] * 11])
            continue
        rows.append([f"{e['tokens'] // 1024}K", _graph_shape(e), e.get("run", ""),
                     f"{e['density']:.3f}",
                     _fmt(e.get("select_blocks_ms")), _fmt(e.get("block_sparse_attention_ms")),
                     _fmt(e["eager_ms"]), _fmt(e["compiled_ms"]), _fmt(e["graph_ms"]),
                     _fmt(e.get("cudnn_ms")), _fmt(e.get("flex_same_mask_ms")),
                     *(f"{e[f'cudnn_over_{m}']:.2f}x" if e.get(f"cudnn_over_{m}") else "n/a"
                       for m in ("eager", "compiled", "graph"))])
    if not rows:
        return []
    return [".. rubric:: ``prism_attention`` as users run it: eager, ``torch.compile"
            "(fullgraph=True)``, a replayed CUDA graph (structured inputs at their natural "
            "density, tile 128; ms), and its two halves as public eager calls\n",
            "Each cell from the newest run that timed it (its commit in the run "
            "column; all runs of one cell are in ``benchmarks/results/``). FlexAttention is "
            "compiled and runs on the "
            "tile mask Prism selected (attention only, no selection), as does the "
            "``block_sparse_attention`` column (the ``TileMask`` that ``select_blocks`` "
            "returned; n/a in runs before it was timed). Targets for cuDNN over "
            "ours: at least 1x at 4K, 2x at 8K, 6x at 128K.\n",
            _table(["tokens", "shape (D, heads q/kv, batch)", "run", "density", "select_blocks",
                    "block_sparse_attention", "eager", "compiled",
                    "CUDA graph", "cuDNN dense", "Flex, same mask", "cuDNN / eager",
                    "cuDNN / compiled", "cuDNN / graph"], rows)]


def _matrix_parts(results: Path) -> list[str]:
    """Tables of the ``h200_matrix_*.json`` runs (``benchmarks/bench_matrix.py``): the
    shape matrix over all runs; every other part from the newest run that has it."""
    paths = sorted(results.glob("h200_matrix_*.json"), key=lambda p: (_run_date(p), p.name))
    if not paths:
        return []
    runs = [(p, json.loads(p.read_text())) for p in paths]

    def newest(part):
        held = [d for _, d in runs if d.get(part)]
        return held[-1] if held else {}

    parts = [".. rubric:: Off the tuned shape (``bench_matrix.py``)\n",
             "Runs " + ", ".join(f"``{p.name}``" for p, _ in runs) + f": {runs[-1][1].get('gpu')}"
             f", torch {runs[-1][1].get('torch')}, Triton {runs[-1][1].get('triton')}.\n"]
    parts += _matrix_table(runs)
    parts += _graph_table({"graph": _graph_cells(runs)})
    data = {part: newest(part).get(part) or [] for part in ("e2e", "selection", "overhead")}
    rows = [[f"{e['tokens'] // 1024}K", f"{e['density']:.3f}", _fmt(e["select_blocks_ms"]),
             _fmt(e["attention_ms"]), _fmt(e["prism_ms"]), _fmt(e.get("cudnn_ms")),
             f"{e['cudnn_over_prism']:.2f}x" if e.get("cudnn_over_prism") else "n/a"]
            for e in data.get("e2e", [])]
    if rows:
        parts.append(".. rubric:: ``prism_attention`` on structured inputs at their natural "
                     "density (32/8 heads, D 128, tile 128; ms)\n")
        parts.append(_table(["tokens", "density", "select_blocks", "block_sparse_attention",
                             "prism_attention", "cuDNN dense", "cuDNN / ours"], rows))
    rows = [[f"{e['tokens'] // 1024}K", _fmt(e["floor_ms"]), _fmt(e["select_blocks_merged_ms"]),
             f"{e['over_floor']:.1f}x", _fmt(e.get("select_blocks_per_width_ms"))]
            for e in data.get("selection", [])]
    if rows:
        parts.append(".. rubric:: ``select_blocks`` against its memory floor (read Q and K, "
                     "write mask and indices at the copy ceiling; ms)\n")
        parts.append(_table(["tokens", "floor", "select_blocks", "over floor",
                             "one launch per width"], rows))
    over = data.get("overhead")
    if over:
        parts.append(
            f"Host time per eager call at {over['tokens'] // 1024}K (32/8 heads, D 128), the "
            f"host never waiting: ``prism_attention`` {over['prism_attention_us']:.0f} us, of "
            f"which {over['prism_attention_no_kernels_us']:.0f} us outside the Triton launches; "
            f"``select_blocks`` {over['select_blocks_us']:.0f} us "
            f"({over['select_blocks_no_kernels_us']:.0f} us); ``block_sparse_attention`` "
            f"{over['block_sparse_attention_us']:.0f} us "
            f"({over['block_sparse_attention_no_kernels_us']:.0f} us).\n")
    return parts
