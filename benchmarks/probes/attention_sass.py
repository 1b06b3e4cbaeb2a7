"""The attention kernel's sm_90a machine code, compiled on a machine without a GPU.

For each ``D x tile`` (optionally ``:bm/bn/warps/stages`` for a launch shape other
than the table's), compiles ``_sparse_attention_kernel`` with the specialisations a
real bf16 launch gets (unit head-dim strides, 16-divisible pointers, strides and
lengths; K/V descriptors where the shape reads them) and reports ptxas's registers
and spill bytes, and per loop of the SASS (a backward branch closes a loop) its
instruction count, tensor-core instructions (HGMMA), exponentials (MUFU.EX2),
block barriers and local-memory spills (STL/LDL). Static counts only: where time
goes needs the GPU (Nsight Compute).

    python benchmarks/probes/attention_sass.py --cases 128x128,96x128,64x128:128/64/4/2
    python benchmarks/probes/attention_sass.py --cases 128x128p64,128x128p16  # paged
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from sm90 import ptxas_report, sass, sass_loops, sm90_compile  # noqa: E402

from prism.optimized.attention import (  # noqa: E402
    AttentionConfig,
    default_config,
    descriptor_rows,
    launch_constants,
)
from prism.optimized.attention_kernel import _sparse_attention_kernel  # noqa: E402
from prism.optimized.paged_launch import paged_config  # noqa: E402

KERNEL = _sparse_attention_kernel


def compile_case(d: int, tile: int, shape: str = "", page: int = 0, check: bool = False):
    """(config, compiled kernel) for head dim ``d`` and tile ``tile``; with ``page`` > 0
    the paged launch over ``page``-token pages (its shape from ``paged_config``, and
    descriptors where the pages hold whole key blocks, as ``packed_attention_forward``
    decides); ``check``: with the query NaN/Inf flag of ``block_sparse_attention``'s
    eager calls (``CHECK_FINITE``)."""
    if shape:
        bm, bn, warps, stages = (int(x) for x in shape.split("/"))
        config = AttentionConfig(bm, bn, warps, stages, use_tma=True)
    elif page:
        d_pad = max(16, triton.next_power_of_2(d))
        q4 = torch.empty(1, 1, 1, d, dtype=torch.bfloat16)
        config = paged_config(None, q4, q4, q4, d_pad, d_pad, 0, tile, False, page_size=page)
    else:
        config = default_config(tile, d, torch.bfloat16, False)
    d_pad = max(16, triton.next_power_of_2(d))
    tma = config.use_tma and descriptor_rows(d, 2) and (not page or page % config.block_n == 0)
    constants = launch_constants(config, True, True, d, d, torch.bfloat16, tma,
                                 varlen=bool(page), block_size=tile, check_finite=check)
    warps, stages = constants.pop("num_warps"), constants.pop("num_stages")
    constants.pop("maxnreg", None)
    constants.update(stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
    pointers = {name: "*bf16" for name in ("Q", "K", "V", "O")}
    pointers.update(LSE="*fp32", NUM="*i32", IDX="*i32")
    if check:
        pointers.update(NONFINITE="*fp64")
    if page:
        constants.update(PAGED=True, PAGE_SIZE=page)
        pointers.update(TILES="*i32", BLOCK_TABLE="*i32")
    else:
        constants.update(TILES=None, BLOCK_TABLE=None, PAGED=False, PAGE_SIZE=1)
    if tma:
        box = f"tensordesc<bf16[1, 1, {config.block_n}, {d_pad}]>"
        pointers.update(K_DESC=box, V_DESC=box)
    else:
        constants.update(K_DESC=None, V_DESC=None)
    divisible = [n for n in KERNEL.arg_names if n.startswith("stride_")
                 and n not in constants and n != "stride_ir"]
    divisible += ["num_queries", "num_keys", "block_size"]
    if page:
        divisible += ["stride_kpage", "stride_vpage"]
    compiled = sm90_compile(KERNEL, constants, pointers, floats=("qk_scale",),
                            divisible=divisible, num_warps=warps, num_stages=stages)
    return config, compiled


def report(case: str) -> dict:
    """``DxT[pP][:bm/bn/warps/stages]``: head dim D, tile T, optionally the paged
    launch over P-token pages, optionally a launch shape other than the table's."""
    dims, _, shape = case.partition(":")
    dims, _, page = dims.partition("p")
    d, tile = (int(x) for x in dims.split("x"))
    config, compiled = compile_case(d, tile, shape, int(page or 0))
    registers, spills = ptxas_report(compiled)
    return {"case": case, "config": repr(config), "registers": registers,
            "spill_store_bytes": spills, "loops": sass_loops(sass(compiled))}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="128x128,96x128,64x128,256x128")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    rows = []
    for case in args.cases.split(","):
        rows.append(report(case))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
