"""Where a program of the long-row top-p spends its time, phase by phase.

``optimized/vertical_slash_tiles.py``'s source is copied to a temporary module
with timer reads (``globaltimer``, ns) inserted between the phases of
``_top_p_program``; each program stores them at the end of its own scratch row,
with the number of bisection steps it took. The estimator path is pointed at
that module's ``vertical_slash_bins`` and ``select_blocks`` runs a setting of
``constant_variants.py`` on the structured inputs (eager, after a warm-up
call, call plans off); the production module is not touched. The stamps cost
registers (ptxas for sm_90 reports spills the plain kernel does not have), so
the phases add up to a little more than the launch's usual time. Reported per phase: the median
and the largest duration over the launch's programs (us), by kind of row
(columns, offsets, the cascade's last-tile rule), and the launch's span.

    python3 benchmarks/probes/top_p_phases.py --cases 8192:preset,8192:e5,32768:preset
"""

from __future__ import annotations

import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import structured_qkv  # noqa: E402
from constant_variants import SETTINGS  # noqa: E402
from probe_cli import load_package_module, run  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import call_plan, estimator_path  # noqa: E402
from prism.optimized import vertical_slash_tiles as production  # noqa: E402

#: Phases, each stamped at its end: (name, source line the stamp goes before).
PHASES = [
    ("totals", "    # Bracket: F(lo) >= p > F(hi)"),
    ("passes and copy", "                slots = tl.arange(0, CAND)\n"),
    ("register steps", "    single = count_lo - count_hi == 1\n"),
    ("zero bins", "    seen = tl.zeros((), dtype=tl.int32)\n"),
]
SLOTS = 8  # the scratch row's last SLOTS floats: start, phases, end, steps


def _stamp(slot: int, indent: str = "    ") -> str:
    return (f"{indent}tl.store(SCRATCH + row.to(tl.int64) * CAND + CAND - {SLOTS} + {slot}, "
            f"(_now() & 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True))\n")


def instrumented_source() -> str:
    src = inspect.getsource(production)
    head = 'def _top_p_program('
    start = src.index(head)
    body = src.index('    if row < rows_x:\n', start)
    src = src[:body] + _stamp(0) + src[body:]
    for slot, (_, anchor) in enumerate(PHASES, start=1):
        if src.count(anchor) != 1:
            raise SystemExit(f"anchor not found once: {anchor!r} (the kernel changed)")
        indent = anchor[:len(anchor) - len(anchor.lstrip())]
        src = src.replace(anchor, _stamp(slot, indent) + anchor)
    tail = "        seen += ties\n"
    end = src.index(tail, src.index(head)) + len(tail)
    steps = (f"    tl.store(SCRATCH + row.to(tl.int64) * CAND + CAND - {SLOTS} + "
             f"{len(PHASES) + 2}, step.to(tl.float32))\n")
    src = src[:end] + _stamp(len(PHASES) + 1) + steps + src[end:]
    src = src.replace("import triton.language as tl\n",
                      "import triton.language as tl\n"
                      "from triton.language.extra.cuda import globaltimer as _now\n", 1)
    # Keep each launch's scratch (zeroed, so unstamped phases read 0).
    src = src.replace("    scratch = torch.empty((sum(rows) + sum_rows) * CANDIDATES",
                      "    scratch = torch.zeros((sum(rows) + sum_rows) * CANDIDATES", 1)
    src = src.replace("    args = []\n", "    SCRATCHES.append((scratch, list(rows), sum_rows))\n"
                      "    args = []\n", 1)
    return src.replace("from __future__ import annotations\n",
                       "from __future__ import annotations\n\nSCRATCHES = []\n", 1)


def load_instrumented():
    return load_package_module(instrumented_source(), "_top_p_phases")


def _summary(stamps: torch.Tensor) -> dict:
    """stamps: (programs, SLOTS) ns (low 31 bits) -> per-phase median / max us."""
    t = stamps[:, : len(PHASES) + 2].double()
    start = t[:, :1]
    rel = torch.remainder(t - start, 2.0 ** 31) / 1000.0
    # A phase not run (a branch not taken) keeps the previous stamp's time.
    for j in range(1, rel.shape[1]):
        missing = stamps[:, j] == 0
        rel[missing, j] = rel[missing, j - 1]
    names = ["start"] + [p[0] for p in PHASES] + ["keep pass"]
    out = {}
    for j in range(1, rel.shape[1]):
        d = rel[:, j] - rel[:, j - 1]
        out[names[j]] = [round(d.median().item(), 2), round(d.max().item(), 2)]
    out["program"] = [round(rel[:, -1].median().item(), 2), round(rel[:, -1].max().item(), 2)]
    out["steps"] = [int(stamps[:, -1].median().item()), int(stamps[:, -1].max().item())]
    return out


def phases(n: int, setting: str) -> dict:
    module = load_instrumented()
    q, k, _ = structured_qkv(n)
    config = SETTINGS[setting]()
    saved = estimator_path.vertical_slash_bins, call_plan.ENABLED
    estimator_path.vertical_slash_bins = module.vertical_slash_bins
    call_plan.ENABLED = False  # every call runs the Python path (and fills SCRATCHES)
    try:
        optimized.select_blocks(q, k, config=config)  # compile
        torch.cuda.synchronize()
        module.SCRATCHES.clear()
        optimized.select_blocks(q, k, config=config)
        torch.cuda.synchronize()
    finally:
        estimator_path.vertical_slash_bins, call_plan.ENABLED = saved
    if not module.SCRATCHES:
        raise SystemExit(f"{setting} at {n}: the top-p launch did not run")
    scratch, rows, sum_rows = module.SCRATCHES[-1]
    cand = module.CANDIDATES
    stamps = scratch.view(-1, cand)[:, cand - SLOTS:].cpu()
    ints = stamps.view(torch.int32)
    steps = len(PHASES) + 2  # the slot after the end stamp
    stamps = torch.cat([ints[:, :steps].double(), stamps[:, steps:steps + 1].double()], 1)
    starts = stamps[:, 0]
    ends = stamps[:, len(PHASES) + 1]
    kinds = {"columns": slice(0, rows[0]), "offsets": slice(rows[0], rows[0] + rows[1]),
             "last-tile rule": slice(rows[0] + rows[1], rows[0] + rows[1] + sum_rows)}
    out = {"tokens": n, "setting": setting, "programs": int(stamps.shape[0]),
           "launch_span_us": round(((ends.max() - starts.min()) % 2 ** 31).item() / 1000, 2)}
    for name, part in kinds.items():
        if part.stop > part.start:
            out[name] = _summary(stamps[part])
    return out


def _case(text: str) -> tuple:
    tokens, _, setting = text.partition(":")
    if setting not in SETTINGS:
        raise SystemExit(f"unknown setting {setting!r}; one of {sorted(SETTINGS)}")
    return int(tokens), setting


def main(argv=None):
    return run(phases, __doc__, "top_p_phases.py", "--cases", "8192:preset", argv, parse=_case)


if __name__ == "__main__":
    for row in main():
        print(row, flush=True)
