"""What a backward pass through Prism costs, on a CUDA GPU (prism.optimized.gradients).

The kernels compute forward passes; with inputs that require grad the outputs
backpropagate the reference's gradients, recomputed in torch per chunk of
query rows. Per length (32/8 heads, D 128, bf16, the structured inputs of
``bench_prism.py``), medians of ``do_bench``:

* ``prism_forward_ms``: ``prism_attention`` under ``torch.no_grad()``;
* ``prism_train_ms``: ``prism_attention`` on inputs that require grad, then
  ``backward`` of the output's sum (selection, the kernels' forward, the
  recomputed gradients);
* ``sdpa_forward_ms`` / ``sdpa_train_ms``: torch SDPA (causal, its default
  backend) the same way, measured in the same run;
* ``max_abs_grad_error``: the largest difference between Prism's ``dq`` and
  autograd through ``prism.reference.block_sparse_attention`` on the same mask
  (the check that the timed path is the right one; up to 8K tokens).

Usage (GPU machine, repository root)::

    python benchmarks/bench_gradients.py --lengths 4096,8192 --out x.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_prism import bench, structured_inputs  # noqa: E402

from prism import optimized, reference  # noqa: E402

CHECK_MAX_TOKENS = 8192


def _train_step(fn, q, k, v):
    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).float().sum().backward()
    return step


def _prism(q, k, v):
    return optimized.prism_attention(q, k, v)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def measure(n: int) -> dict:
    q, k, v = structured_inputs(n)
    with torch.no_grad():
        prism_forward = bench(lambda: _prism(q, k, v))
        sdpa_forward = bench(lambda: _sdpa(q, k, v))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    prism_train = bench(_train_step(_prism, *leaves))
    sdpa_train = bench(_train_step(_sdpa, *leaves))
    # The timed path's dq against autograd through the reference on the same mask
    # (up to CHECK_MAX_TOKENS: the reference's autograd keeps the dense scores).
    leaves[0].grad = None
    out, mask = optimized.prism_attention(*leaves, return_mask=True)
    out.float().sum().backward()
    row = {"tokens": n,
           "prism_forward_ms": prism_forward, "prism_train_ms": prism_train,
           "sdpa_forward_ms": sdpa_forward, "sdpa_train_ms": sdpa_train,
           "train_over_sdpa_train": prism_train / sdpa_train,
           "density": float(mask.float().mean())}
    if n <= CHECK_MAX_TOKENS:
        q32 = q.detach().float().requires_grad_()
        reference.block_sparse_attention(q32, k.float(), v.float(),
                                         mask.as_tensor()).sum().backward()
        row["max_abs_grad_error"] = float((leaves[0].grad.float() - q32.grad).abs().max())
        row["max_abs_grad"] = float(q32.grad.abs().max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--out")
    parser.add_argument("--commit", default="")
    args = parser.parse_args()
    rows = [measure(int(n)) for n in args.lengths.split(",")]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "commit": args.commit,
              "command": "python3 benchmarks/bench_gradients.py " + " ".join(sys.argv[1:]),
              "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
