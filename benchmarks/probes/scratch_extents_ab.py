"""The packed antidiagonal kernel's causal scratch extents against the full layout.

Since 2026-12-05 a causal call gives each program of the packed kernel one-pass
scratch rows only for the key blocks up to its last query tile
(``antidiagonal_shapes.CAUSAL_EXTENTS``, NOTES item 60 (b)): half the scratch in a
full prefill, and at 256K tokens the one-pass form (stride 8) and the accurate
preset's fused sampled stage fit where they did not. This probe times, on the
structured inputs of ``bench_matrix.py`` (32/8 heads, D 128, bf16, tile 128,
causal), the accurate preset's whole selection (``select_blocks``) and the dense
stride-8 estimator (``antidiagonal_vertical_slash``) with the extents and with the
full layout, interleaved, eager and as CUDA-graph replays; whether the masks are
equal; and the peak memory of one call of each.

    python3 benchmarks/probes/scratch_extents_ab.py --lengths 32768,131072,262144 --out x.json
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import structured_qkv  # noqa: E402
from probe_cli import run, time_variants  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import antidiagonal_shapes, call_plan  # noqa: E402
from prism.reference import PrismConfig  # noqa: E402

CONFIGS = {"preset": PrismConfig.preset("accurate"),
           "e5_stride8": PrismConfig(estimator="antidiagonal_vertical_slash",
                                     antidiagonal_stride=8, high_threshold=0.88,
                                     vertical_slash_threshold=0.5)}


def _peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def row(n):
    q, k, _ = structured_qkv(n)
    out = {"tokens": n}
    chosen = {}

    def pick(name, extents):
        def apply():
            chosen["cfg"] = CONFIGS[name]
            antidiagonal_shapes.CAUSAL_EXTENTS = extents
        return apply

    def call():
        return optimized.select_blocks(q, k, chosen["cfg"])

    for name in CONFIGS:
        settings = [(f"{name}_extents", pick(name, True)),
                    (f"{name}_full", pick(name, False))] * 2
        masks = time_variants(call, settings, out, pick(name, True))
        out[f"{name}_masks_equal"] = bool(masks[f"{name}_extents"].equal(masks[f"{name}_full"]))
        for extents in (True, False):
            pick(name, extents)()
            call_plan._PLANS.clear()
            label = "extents" if extents else "full"
            out[f"{name}_{label}_peak_gib"] = round(_peak_gib(call), 3)
        pick(name, True)()
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    run(row, __doc__, "scratch_extents_ab.py", "--lengths", "32768,131072,262144", argv)


if __name__ == "__main__":
    main()
