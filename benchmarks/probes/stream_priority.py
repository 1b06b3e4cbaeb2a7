"""Stream priorities and the two-stream selections: does the block scheduler's
preference shorten the accurate preset's selection (vertical-slash stage on a
side stream beside the main chain), or Prism's (narrow rows on a side stream)?

Per length, eager and CUDA-graph ms of ``select_blocks`` under each variant, in
interleaved order, and whether every variant's mask equals the default's:

* ``default``: every stream at priority 0;
* ``side_high``: the side stream at the device's greatest priority (its chain
  is preferred);
* ``main_high``: the call made on a stream of the greatest priority, the side
  stream at 0 (the main chain is preferred); ``main_normal`` is the same
  wrapping on a priority-0 stream, its control;

and the preset's vertical-slash distributions (32 last queries) under each
``--vs-tunings`` launch shape (``bench_estimators._vs_shapes``).

    python3 benchmarks/probes/stream_priority.py --lengths 8192,32768,131072 --out x.json

(``PRISM_VS_TUNINGS``, ';'-separated ``max_rows,block_n,stats_block_n,num_warps,
num_stages,programs``, sets the distribution shapes; empty: none.)
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_estimators import _vs_shapes  # noqa: E402
from bench_prism import structured_inputs  # noqa: E402
from probe_cli import run, time_variants  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import call_plan, plan_items  # noqa: E402
from prism.reference import PrismConfig, tile_layout  # noqa: E402

_STATE = {"wrap": None}


def _set(side=None, wrap=None):
    plan_items.SIDE_PRIORITIES.clear()
    if side is not None:
        plan_items.SIDE_PRIORITIES.update({0: side, 1: side})
    plan_items._SIDE_STREAMS.clear()
    _STATE["wrap"] = wrap


def _call(q, k, cfg):
    wrap = _STATE["wrap"]
    if wrap is None:
        return optimized.select_blocks(q, k, cfg)
    current = torch.cuda.current_stream()
    wrap.wait_stream(current)
    with torch.cuda.stream(wrap):
        out = optimized.select_blocks(q, k, cfg)
    current.wait_stream(wrap)
    return out


def row(n):
    q, k, _ = structured_inputs(n)
    _, greatest = torch.cuda.Stream.priority_range()
    high = torch.cuda.Stream(priority=greatest)
    normal = torch.cuda.Stream(priority=0)
    out = {"tokens": n, "greatest_priority": greatest}
    base = [("default", lambda: _set()), ("side_high", lambda: _set(side=greatest)),
            ("main_high", lambda: _set(wrap=high)), ("main_normal", lambda: _set(wrap=normal))]
    for name, cfg in (("preset", PrismConfig.preset("accurate")), ("prism", PrismConfig())):
        timings = {}
        masks = time_variants(lambda c=cfg: _call(q, k, c), base + base, timings, _set)
        out[name] = timings
        out[f"{name}_masks_equal_default"] = {
            variant: bool(torch.equal(mask, masks["default"])) for variant, mask in masks.items()}
    tunings = [t for t in os.environ.get("PRISM_VS_TUNINGS", "").split(";") if t]
    if tunings:
        preset = PrismConfig.preset("accurate")
        out["vs_shapes"] = _vs_shapes(q, k, tile_layout(n, n, preset.block_size, True),
                                      tunings, preset.last_queries)
    out["plan_stats"] = dict(call_plan.PLAN_STATS)
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    run(row, __doc__, "stream_priority.py", "--lengths", "8192,32768,131072", argv)


if __name__ == "__main__":
    main()
