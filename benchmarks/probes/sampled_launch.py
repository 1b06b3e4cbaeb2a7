"""Launch shapes of the cascade's sampled-stage kernel, timed in the whole selection.

For each length (the structured inputs of ``bench_matrix.py``: 32/8 heads, D 128,
bf16, tile 128, causal), the accurate preset's selection (the stage beside the
restricted antidiagonal kernel) with the stage's kernel on 4 or 8 warps, Triton's
pipelining depth 2, 3 (its default) or 4, and key chunks of 128 or 64 keys
(``candidate_sampled.NUM_WARPS``, ``NUM_STAGES``, ``BLOCK_N``), interleaved, twice
each, as eager and CUDA-graph ms; whether every shape's mask equals the default's.

    python3 benchmarks/probes/sampled_launch.py --lengths 8192,32768,131072 --out x.json
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import structured_qkv  # noqa: E402
from probe_cli import run, time_variants  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import candidate_sampled  # noqa: E402
from prism.reference import PrismConfig  # noqa: E402

#: name -> (warps, stages, keys per chunk); 0 is the default.
SHAPES = {"default": (0, 0, 0), "8_warps": (8, 0, 0), "2_stages": (0, 2, 0),
          "4_stages": (0, 4, 0), "chunks_64": (0, 0, 64), "8_warps_chunks_64": (8, 0, 64),
          "2_warps": (2, 0, 0)}


def row(n):
    q, k, _ = structured_qkv(n)
    cfg = PrismConfig.preset("accurate")
    out = {"tokens": n}

    def shape(warps, stages, block_n):
        def apply():
            candidate_sampled.NUM_WARPS = warps
            candidate_sampled.NUM_STAGES = stages
            candidate_sampled.BLOCK_N = block_n
        return apply

    settings = [(name, shape(*values)) for name, values in SHAPES.items()] * 2
    masks = time_variants(lambda: optimized.select_blocks(q, k, cfg), settings, out,
                          shape(0, 0, 0))
    out["masks_equal"] = {name: bool(masks[name].equal(masks["default"])) for name in SHAPES}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    run(row, __doc__, "sampled_launch.py", "--lengths", "8192,32768,131072", argv)


if __name__ == "__main__":
    main()
