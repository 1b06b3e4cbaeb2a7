"""Probe: does Triton 3.6's Hopper warp specialisation speed up a flash-attention loop?

Times one minimal dense (non-causal) attention loop, written for this probe, in
three launch shapes against torch SDPA in the same process, and writes JSON.
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench


@triton.jit
def _probe_attention(Q, K, V, O, IDX, N, scale, BM: tl.constexpr, BN: tl.constexpr,
                     D: tl.constexpr, WS: tl.constexpr):
    row_block = tl.program_id(0)
    head = tl.program_id(1)
    base = head.to(tl.int64) * N * D
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[N, D], strides=[D, 1], block_shape=[BM, D])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[N, D], strides=[D, 1], block_shape=[BN, D])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[N, D], strides=[D, 1], block_shape=[BN, D])
    o_desc = tl.make_tensor_descriptor(O + base, shape=[N, D], strides=[D, 1], block_shape=[BM, D])
    q = q_desc.load([row_block * BM, 0])
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for j in tl.range(0, N // BN, warp_specialize=WS):
        start = tl.load(IDX + j) * BN
        s = tl.dot(q, k_desc.load([start, 0]).T)
        m_new = tl.maximum(m, tl.max(s, 1) * scale)
        p = tl.math.exp2(s * scale - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(tl.bfloat16), v_desc.load([start, 0]), acc * alpha[:, None])
        m = m_new
    o_desc.store([row_block * BM, 0], (acc / l[:, None]).to(tl.bfloat16))


SHAPES = (  # name, BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize
    ("nw8_ns3", 128, 128, 8, 3, False),
    ("nw4_ns2_ws", 128, 128, 4, 2, True),
    ("nw4_ns3_ws_bn64", 128, 64, 4, 3, True),
    ("nw4_ns2_ws_bn64", 128, 64, 4, 2, True),
)


def probe_length(n, h=32, d=128):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * h * n * n * d
    runs = []
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = sdpa(q, k, v)
        t_ref = do_bench(lambda: sdpa(q, k, v), rep=200)
    runs.append({"n": n, "name": "sdpa_cudnn", "ms": t_ref, "tflops": flops / t_ref * 1e-9})
    scale = d ** -0.5 * 1.4426950408889634
    for name, bm, bn, nw, ns, ws in SHAPES:
        o = torch.empty_like(q)
        idx = torch.arange(n // bn, device="cuda", dtype=torch.int32)

        def launch(bm=bm, bn=bn, nw=nw, ns=ns, ws=ws, o=o, idx=idx):
            _probe_attention[(n // bm, h)](q, k, v, o, idx, n, scale, BM=bm, BN=bn, D=d, WS=ws,
                                          num_warps=nw, num_stages=ns)
        try:
            launch()
            err = (o.float() - ref.float()).abs().max().item()
            t = do_bench(launch, rep=200)
            runs.append({"n": n, "name": name, "ms": t, "tflops": flops / t * 1e-9,
                         "ratio_to_cudnn": t / t_ref, "max_err": err})
        except Exception as exc:  # record the failure, keep probing the others
            runs.append({"n": n, "name": name, "error": repr(exc)[:300]})
        print(runs[-1], flush=True)
    return runs


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    triton.set_allocator(
        lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    torch.manual_seed(0)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "runs": []}
    for n in (16384, 32768):
        res["runs"] += probe_length(n)
    with open(os.path.join(out_dir, "ws_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
