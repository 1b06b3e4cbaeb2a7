"""``select_blocks``'s device work per call with a warm L2: kernels, their gaps, and the total.

``bench_selection.py`` times one graph replay at a time after flushing L2
(Triton's ``do_bench``), which is the convention for the memory-floor ratios.
This probe replays the captured call 100 times back to back instead, as a model's
layers would run it, and lists the device operations of one call in order
(name, start in us relative to the call's first operation, duration in us)
from ``torch.profiler``, for the last of a few replays. Inputs:
``bench_matrix.structured_qkv`` (32/8 heads, D 128, bf16, tile 128). Below
about 8K tokens Q and K fit in the H200's 50 MB L2, so the pooling kernel there
reads mostly from L2. A length may name a setting of ``constant_variants.py``
(``8192:preset``, ``32768:e5``; Prism's default otherwise), whose launches on the
side stream then show beside the main chain's in the start times.

    python3 benchmarks/probes/selection_timeline.py --lengths 4096,8192,32768,131072 --out x.json
    python3 benchmarks/probes/selection_timeline.py --lengths 8192:preset,8192:e5
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import structured_qkv  # noqa: E402
from constant_variants import SETTINGS  # noqa: E402
from probe_cli import run  # noqa: E402

from prism import optimized  # noqa: E402

#: Replays under the profiler; the last one is reported (the first one's start is
#: delayed by the profiler itself: 26-55 us between the memset and pooling in a run
#: where the back-to-back call took 20 us in all).
REPLAYS = 5


def timeline(n: int, setting: str = "prism") -> dict:
    q, k, _ = structured_qkv(n)
    config = SETTINGS[setting]()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimized.select_blocks(q, k, config=config)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimized.select_blocks(q, k, config=config)
    for _ in range(20):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(7):
        start.record()
        for _ in range(100):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 100)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    ops = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    ops = ops[len(ops) - len(ops) // REPLAYS:]  # the last replay's operations
    t0 = ops[0].time_range.start if ops else 0
    return {"tokens": n, "setting": setting, "back_to_back_ms": sorted(samples)[len(samples) // 2],
            "ops": [(e.name[:40], round(e.time_range.start - t0, 1), round(e.device_time, 1))
                    for e in ops],
            "qk_bytes": (q.numel() + k.numel()) * q.element_size()}


def main(argv=None):
    return run(timeline, __doc__, "selection_timeline.py", "--lengths", "4096,8192", argv,
               parse=_case)


def _case(text: str) -> tuple:
    """``"8192"`` or ``"8192:preset"`` -> (tokens, setting)."""
    tokens, _, setting = text.partition(":")
    if setting and setting not in SETTINGS:
        raise SystemExit(f"unknown setting {setting!r}; one of {sorted(SETTINGS)}")
    return int(tokens), setting or "prism"


if __name__ == "__main__":
    for row in main():
        print(row, flush=True)
