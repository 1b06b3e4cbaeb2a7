"""Where an eager ``select_blocks`` call of the accurate preset spends its host time,
against Prism's default, at several lengths.

Per length and setting: eager (do_bench) and CUDA-graph ms; host microseconds per
call with the eager NaN-flag read off (the host never waits; calls back to back,
one sync at the end); and the top functions of a cProfile of such calls (own
time per call). Call plans are on, as for users.

    python3 benchmarks/probes/preset_host.py --lengths 8192,32768 --out x.json
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import host_us, structured_qkv  # noqa: E402
from bench_prism import bench, graph_ms  # noqa: E402
from probe_cli import run  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import call_plan, ops  # noqa: E402
from prism.reference import PrismConfig  # noqa: E402

CALLS = 200


def top_functions(fn, calls=CALLS, top=25):
    """cProfile of ``calls`` calls: the functions of most own time, us per call."""
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    rows = []
    for (path, line, name), (_, ncalls, own, cumulative, _) in stats.items():
        rows.append({"function": f"{os.path.basename(path)}:{line}:{name}",
                     "calls_per_call": ncalls / calls, "own_us": own * 1e6 / calls,
                     "cumulative_us": cumulative * 1e6 / calls})
    rows.sort(key=lambda r: -r["own_us"])
    return rows[:top]


def row(n):
    q, k, _ = structured_qkv(n)
    out = {"tokens": n}
    for name, cfg in (("preset", PrismConfig.preset("accurate")), ("prism", PrismConfig())):
        fn = lambda c=cfg: optimized.select_blocks(q, k, c)  # noqa: E731
        out[f"{name}_eager_ms"] = bench(fn)
        out[f"{name}_graph_ms"] = graph_ms(fn)
        saved = ops.tracing
        ops.tracing = lambda: True
        try:
            out[f"{name}_host_us"] = host_us(fn, CALLS)  # flag read off: no waiting
            out[f"{name}_profile"] = top_functions(fn)
        finally:
            ops.tracing = saved
    out["plan_stats"] = dict(call_plan.PLAN_STATS)
    out["last_refusal"] = call_plan.LAST_REFUSAL
    print(json.dumps({key: value for key, value in out.items() if "profile" not in key}),
          flush=True)
    return out


def main(argv=None):
    run(row, __doc__, "preset_host.py", "--lengths", "8192,32768", argv)


if __name__ == "__main__":
    main()
