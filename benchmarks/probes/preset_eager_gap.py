"""Why the accurate preset's eager ``select_blocks`` reads longer than its CUDA-graph
replay, and whether queuing the main stream's launches before the vertical-slash
stage's (``estimator_path.MAIN_STREAM_FIRST``) closes the gap.

Per length: eager (do_bench, L2 flushed before each call) and graph ms of the preset
with the switch off and on, twice each, interleaved; Prism's default beside them;
host ms per eager call (wall clock around calls that each end in the NaN-flag
read); and, for one eager call of each variant under ``torch.profiler``, every
kernel's stream, start and end in microseconds from the call's first host event,
so the device's idle time inside the call shows.

    python3 benchmarks/probes/preset_eager_gap.py --lengths 8192,32768,131072 --out x.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import structured_qkv  # noqa: E402
from bench_prism import bench, graph_ms  # noqa: E402
from probe_cli import run, time_variants  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import call_plan, estimator_path  # noqa: E402
from prism.reference import PrismConfig  # noqa: E402


def host_ms(fn, calls=20):
    """Wall-clock ms per call of ``fn`` back to back (each eager call ends in a sync)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def timeline(fn):
    """Kernels of one eager call after an L2 flush: (name, stream, start us, end us)
    relative to the call's host start, and the device's busy union over the call."""
    from torch.profiler import ProfilerActivity, profile, record_function

    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        flush.zero_()
        with record_function("the_call"):
            fn()
        torch.cuda.synchronize()
    events = prof.events()
    call = next(e for e in events if e.name == "the_call")
    t0 = call.time_range.start
    kernels = []
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.start >= t0:
            kernels.append((e.name[:40], getattr(e, "device_resource_id", None),
                            round(e.time_range.start - t0, 1), round(e.time_range.end - t0, 1)))
    kernels.sort(key=lambda x: x[2])
    busy, last = 0.0, None
    for _, _, s, e in kernels:
        if last is None or s > last:
            busy += e - s
            last = e
        elif e > last:
            busy += e - last
            last = e
    span = (kernels[-1][3] - kernels[0][2]) if kernels else 0.0
    return {"kernels": kernels, "host_call_us": round(call.time_range.end - t0, 1),
            "device_span_us": round(span, 1), "device_busy_us": round(busy, 1)}


def row(n):
    q, k, _ = structured_qkv(n)
    out = {"tokens": n}
    preset = PrismConfig.preset("accurate")

    def main_first(on):
        estimator_path.MAIN_STREAM_FIRST = on

    fn = lambda: optimized.select_blocks(q, k, preset)  # noqa: E731
    settings = [("side_first" if not on else "main_first", lambda on=on: main_first(on))
                for on in (False, True, False, True)]
    masks = time_variants(fn, settings, out, lambda: main_first(True))
    out["masks_equal"] = all(torch.equal(m, masks["side_first"]) for m in masks.values())
    for on in (False, True):
        main_first(on)
        call_plan._PLANS.clear()
        name = "main_first" if on else "side_first"
        out[f"{name}_host_ms"] = host_ms(fn)
        out[f"{name}_timeline"] = timeline(fn)
    main_first(True)
    out["plan_stats"] = dict(call_plan.PLAN_STATS)
    out["last_refusal"] = call_plan.LAST_REFUSAL
    paper = PrismConfig()
    out["prism_eager_ms"] = bench(lambda: optimized.select_blocks(q, k, paper))
    out["prism_graph_ms"] = graph_ms(lambda: optimized.select_blocks(q, k, paper))
    out["prism_host_ms"] = host_ms(lambda: optimized.select_blocks(q, k, paper))
    print(json.dumps({key: value for key, value in out.items() if "timeline" not in key}),
          flush=True)
    return out


def main(argv=None):
    run(row, __doc__, "preset_eager_gap.py", "--lengths", "8192,32768,131072", argv)


if __name__ == "__main__":
    main()
