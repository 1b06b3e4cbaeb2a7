"""The accurate preset's selection with its vertical-slash stage on a second stream or
not, and Prism's selection, at several lengths in one run: eager and CUDA-graph ms,
and whether the masks agree bit for bit. (Run at 76130aa it also timed
``VSTuning.stats_max_rows``, a grouping of the statistics pass since removed.)

    python3 benchmarks/probes/overlap_ab.py --lengths 8192,32768,131072 --out x.json
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import structured_qkv  # noqa: E402
from bench_prism import bench, graph_ms  # noqa: E402
from probe_cli import run, time_variants  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import call_plan, estimator_path  # noqa: E402
from prism.reference import PrismConfig  # noqa: E402


def row(n):
    q, k, _ = structured_qkv(n)
    out = {"tokens": n}
    preset = PrismConfig.preset("accurate")

    def overlap(on):
        estimator_path.OVERLAP_VERTICAL_SLASH = on

    settings = [("preset_overlap" if on else "preset_one_stream", lambda on=on: overlap(on))
                for on in (False, True, False, True)]
    masks = time_variants(lambda: optimized.select_blocks(q, k, preset), settings, out,
                          lambda: overlap(True))
    out["masks_equal"] = all(torch.equal(mask, masks["preset_one_stream"])
                             for mask in masks.values())
    paper = PrismConfig()
    out["prism_eager_ms"] = bench(lambda: optimized.select_blocks(q, k, paper))
    out["prism_graph_ms"] = graph_ms(lambda: optimized.select_blocks(q, k, paper))
    out["plan_stats"] = dict(call_plan.PLAN_STATS)
    out["last_refusal"] = call_plan.LAST_REFUSAL
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    run(row, __doc__, "overlap_ab.py", "--lengths", "8192,32768,131072", argv)


if __name__ == "__main__":
    main()
