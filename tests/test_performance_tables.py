"""The Performance page's generated tables (docs/performance_tables.py): which run each
row comes from when several committed runs time the same cells."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))
import performance_tables as tables  # noqa: E402


def _cell(tokens, graph_ms, head_dim=128):
    return {"tokens": tokens, "head_dim": head_dim, "q_heads": 32, "kv_heads": 8, "batch": 1,
            "density": 0.1, "eager_ms": 1.0, "compiled_ms": 1.0, "graph_ms": graph_ms}


def _write(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps(data))


def test_graph_rows_take_each_cell_from_the_newest_run_that_timed_it(tmp_path):
    _write(tmp_path, "h200_matrix_old.json", {
        "commit": "aaaaaaa", "date": "2026-01-01T00:00:00",
        "graph": [_cell(4096, 0.5), _cell(8192, 0.7, head_dim=64)]})
    _write(tmp_path, "h200_matrix_new.json", {
        "commit": "bbbbbbb", "date": "2026-02-01T00:00:00", "graph": [_cell(4096, 0.4)]})
    runs = [(p, json.loads(p.read_text())) for p in sorted(
        tmp_path.glob("h200_matrix_*.json"), key=lambda p: (tables._run_date(p), p.name))]
    cells = tables._graph_cells(runs)
    assert [(c["tokens"], c["graph_ms"], c["run"]) for c in cells] == [
        (4096, 0.4, "bbbbbbb"), (8192, 0.7, "aaaaaaa")]
    rendered = "\n".join(tables._graph_table({"graph": cells}))
    assert "bbbbbbb" in rendered and "aaaaaaa" in rendered and "0.5 " not in rendered


def test_test_runs_show_the_last_whole_suite_then_newer_partial_runs(tmp_path):
    def run(date, command, passed):
        return {"date": date, "command": command, "counts": {"passed": passed},
                "gpu": "G", "max_errors": {}}

    _write(tmp_path, "h200_gpu_tests_a.json", run("2026-01-01", "pytest -m gpu tests -n 8", 9))
    _write(tmp_path, "h200_gpu_tests_b.json", run("2026-01-02", "pytest -m gpu tests", 10))
    _write(tmp_path, "h200_gpu_tests_c.json",
           run("2026-01-03", "pytest -m gpu tests/test_paged_kernel.py", 3))
    parts = tables._test_parts(tmp_path)
    assert len(parts) == 2
    assert parts[0].startswith("GPU test suite (``h200_gpu_tests_b.json``)")
    assert "10 passed" in parts[0]
    assert parts[1].startswith("Later run of part of the suite (``h200_gpu_tests_c.json``)")
