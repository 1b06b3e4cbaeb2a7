"""Launch shapes of ``block_sparse_attention``'s NaN/Inf pass (``pooling.nonfinite_flag``):
device ms per call (CUDA-graph replays) and the read bandwidth each reaches, on the
public calls' shapes; each shape must also flag one NaN. (Run at 8a2d70a it also
timed a variant summing the loads elementwise, since removed: no faster at 1 warp.)

    python3 benchmarks/probes/nonfinite_shapes.py --out x.json
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_prism import graph_ms  # noqa: E402
from probe_cli import run  # noqa: E402

from prism.optimized.pooling import NONFINITE_SHAPE, nonfinite_flag  # noqa: E402

SHAPES = [NONFINITE_SHAPE, *[(rows, 32, warps) for rows in (128, 512) for warps in (1, 4, 8)],
          (256, 16, 2), (1024, 32, 2)]


def row(n, b, hq=32, hkv=8, d=128):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
               for h in (hq, hkv, hkv))
    gigabytes = sum(t.numel() * t.element_size() for t in (q, k, v)) / 1e9
    out = {"tokens": n, "batch": b, "gigabytes": gigabytes, "shapes": []}
    bad = v.clone()
    bad[-1, -1, n // 3, 5] = float("nan")
    for shape in SHAPES:
        entry = {"shape": list(shape)}
        try:
            clean = float(nonfinite_flag(q, k, v, shape=shape))
            flagged = float(nonfinite_flag(q, k, bad, shape=shape))
            entry["flags_nan"] = clean == 0.0 and flagged != 0.0
            entry["graph_ms"] = graph_ms(lambda s=shape: nonfinite_flag(q, k, v, shape=s))
            entry["tb_per_s"] = gigabytes / entry["graph_ms"]
        except Exception as error:  # noqa: BLE001 - a shape that does not compile
            entry["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        print(n, b, entry, flush=True)
        out["shapes"].append(entry)
    return out


def main(argv=None):
    run(row, __doc__, "nonfinite_shapes.py", "--cases", "131072/1,8192/4,4096/1", argv,
        parse=lambda case: tuple(map(int, case.split("/"))))


if __name__ == "__main__":
    main()
