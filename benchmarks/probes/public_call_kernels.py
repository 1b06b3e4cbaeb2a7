"""Where the public calls' GPU time goes: CUDA kernels per call, by name.

For each shape (``N/D/HQ/HKV/B`` as in ``bench_matrix.py --graph-lengths``) on the
structured inputs, times and profiles ``prism_attention``, ``select_blocks``,
``block_sparse_attention`` on the returned ``TileMask`` and on its plain bool
tensor, and compiled FlexAttention on the same mask, all in one run. Writes JSON.

    python3 benchmarks/probes/public_call_kernels.py --shapes 8192/128/32/8/4,131072 --out x.json
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import flex_ms, parse_shape, structured_qkv  # noqa: E402
from bench_prism import bench  # noqa: E402
from probe_cli import run  # noqa: E402

from prism import optimized  # noqa: E402


def kernels(fn, calls=20):
    """Mean CUDA time per call of each kernel name (ms) over ``calls`` calls."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total[event.name[:70]] += event.device_time / 1000 / calls
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def shape_row(spec):
    """Times, kernels and Flex on the same mask for one shape."""
    n, d, hq, hkv, b = parse_shape(spec)
    q, k, v = structured_qkv(n, hq=hq, hkv=hkv, d=d, b=b)
    mask = optimized.select_blocks(q, k)
    plain = mask.as_tensor().clone()
    calls = {
        "prism_attention": lambda: optimized.prism_attention(q, k, v),
        "select_blocks": lambda: optimized.select_blocks(q, k),
        "block_sparse_attention_tilemask": lambda: optimized.block_sparse_attention(
            q, k, v, mask),
        "block_sparse_attention_bool": lambda: optimized.block_sparse_attention(
            q, k, v, plain),
    }
    row = {"shape": spec, "tokens": n, "head_dim": d, "q_heads": hq, "kv_heads": hkv,
           "batch": b}
    for name, fn in calls.items():
        row[f"{name}_ms"] = bench(fn)
        row[f"{name}_kernels"] = kernels(fn)
    row["flex_same_mask_ms"] = flex_ms(q, k, v, plain, 128)
    print(json.dumps({key: value for key, value in row.items()
                      if not key.endswith("_kernels")}), flush=True)
    for name in calls:
        print(" ", name, {key: round(value, 4)
                          for key, value in list(row[f"{name}_kernels"].items())[:8]},
              flush=True)
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    run(shape_row, __doc__, "public_call_kernels.py", "--shapes", "8192/128/32/8/4,131072",
        argv, parse=str)


if __name__ == "__main__":
    main()
