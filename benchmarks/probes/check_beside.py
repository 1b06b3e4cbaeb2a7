"""``block_sparse_attention`` with its NaN/Inf check beside the attention launch (on a
side stream, ``ops.CHECK_BESIDE_ATTENTION``) or before it on the call's stream, with
the queries checked by that launch or by the attention kernel
(``ops.CHECK_QUERIES_IN_KERNEL``), on
Prism's own masks of the structured inputs: eager and CUDA-graph ms, two
interleaved rounds each, whether the outputs agree bit for bit, and the two parts
alone (the check's launch; the attention on the same indices without the check).

    python3 benchmarks/probes/check_beside.py --shapes 4096,32768/128/32/32/1 --out x.json

Shapes as ``bench_matrix.py --graph-lengths``: ``N`` or ``N/D/HQ/HKV/B``.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import parse_shape, structured_qkv  # noqa: E402
from bench_prism import bench, graph_ms  # noqa: E402
from probe_cli import run  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import call_plan, ops  # noqa: E402
from prism.optimized.pooling import nonfinite_flag  # noqa: E402


def row(spec: str) -> dict:
    n, d, hq, hkv, b = parse_shape(spec)
    q, k, v = structured_qkv(n, hq=hq, hkv=hkv, d=d, b=b)
    mask = optimized.select_blocks(q, k)
    nt = mask.shape[-1]
    out = {"tokens": n, "head_dim": d, "q_heads": hq, "kv_heads": hkv, "batch": b,
           "density": float(mask.sum()) / (b * hq * nt * (nt + 1) / 2)}

    def call():
        return optimized.block_sparse_attention(q, k, v, mask)

    outputs = {}
    # (name, check launch beside the attention launch, queries checked by the kernel);
    # a6af80c's run also had the side stream at a higher priority (no difference).
    variants = [("before", False, False), ("beside", True, False),
                ("fused_beside", True, True)]
    try:
        for name, beside, fused in variants + variants:
            ops.CHECK_BESIDE_ATTENTION = beside
            ops.CHECK_QUERIES_IN_KERNEL = fused
            call_plan._PLANS.clear()
            outputs[name] = call().clone()
            out.setdefault(f"{name}_eager_ms", []).append(bench(call))
            out.setdefault(f"{name}_graph_ms", []).append(graph_ms(call))
    finally:
        ops.CHECK_BESIDE_ATTENTION = True
        ops.CHECK_QUERIES_IN_KERNEL = True
        call_plan._PLANS.clear()
    out["outputs_equal"] = all(torch.equal(outputs["before"], o) for o in outputs.values())
    out["check_alone_ms"] = graph_ms(lambda: nonfinite_flag(q, k, v))
    counts = mask.carried_indices(block_size=128, causal=True, num_queries=n, num_keys=n)[0]
    out["check_unread_alone_ms"] = graph_ms(lambda: nonfinite_flag(
        q, k, v, unread=(counts, 128, 0, 0)))
    num, idx = mask.carried_indices(block_size=128, causal=True, num_queries=n, num_keys=n)
    out["attention_alone_ms"] = graph_ms(lambda: ops.attention(
        q, k, v, mask, num, idx, 128, True, None, False, False))
    print(out, flush=True)
    return out


if __name__ == "__main__":
    run(row, __doc__, "check_beside.py", "--shapes",
        "4096,8192/64/32/8/1,32768/128/32/32/1,131072", parse=str)
