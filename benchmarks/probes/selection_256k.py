"""Prism's default selection at 256K (and 128K) on the structured inputs: where its time
goes and which switches move it, in one run.

Times ``select_blocks`` eagerly and as a CUDA-graph replay with call plans on and off,
with the narrow launches beside the wide one (``SelectionTuning.overlap``) and not, and
with ``dot_max_width`` 1024 (the default) and 2048; lists each launch of one call (grid,
duration) from torch.profiler. Written to check 256K's select_blocks (4.27 ms at
3a22a03, 6.03 ms at eb06ef2 in ``bench_matrix.py --graph-lengths 262144``).

    python3 benchmarks/probes/selection_256k.py --lengths 131072,262144 --out x.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import structured_qkv  # noqa: E402
from probe_cli import run, time_variants  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import call_plan, selection  # noqa: E402


def launches(fn):
    """Each CUDA kernel of one call: name and duration (ms), in start order."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.time_range.start)
    return [(e.name[:40], round(e.device_time / 1000, 4)) for e in events]


def row(n):
    q, k, _ = structured_qkv(n)
    out = {"tokens": n}
    default = selection._DEFAULT_TUNING
    variants = {
        "default": (default, True),
        "no_plans": (default, False),
        "no_overlap": (dataclasses.replace(default, overlap=False), True),
        "dot_2048": (dataclasses.replace(default, dot_max_width=2048), True),
    }

    def use(tuning, plans):
        selection._DEFAULT_TUNING = tuning
        call_plan.ENABLED = plans

    fn = lambda: optimized.select_blocks(q, k)  # noqa: E731
    masks = time_variants(fn, [(name, lambda v=v: use(*v)) for name, v in variants.items()],
                          out, lambda: use(default, True))
    out["launches"] = launches(fn)
    out["masks_equal"] = {name: bool(torch.equal(mask, masks["default"]))
                          for name, mask in masks.items()}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    run(row, __doc__, "selection_256k.py", "--lengths", "131072,262144", argv)


if __name__ == "__main__":
    main()
