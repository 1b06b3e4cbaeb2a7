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
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from sm90 import ptxas_report, sm90_compile  # noqa: E402

from prism.optimized.attention import (  # noqa: E402
    AttentionConfig,
    default_config,
    descriptor_rows,
    launch_constants,
)
from prism.optimized.attention_kernel import _sparse_attention_kernel  # noqa: E402

KERNEL = _sparse_attention_kernel


def compile_case(d: int, tile: int, shape: str = ""):
    """(config, compiled kernel) for head dim ``d`` and tile ``tile``."""
    if shape:
        bm, bn, warps, stages = (int(x) for x in shape.split("/"))
        config = AttentionConfig(bm, bn, warps, stages, use_tma=True)
    else:
        config = default_config(tile, d, torch.bfloat16, False)
    d_pad = max(16, triton.next_power_of_2(d))
    tma = config.use_tma and descriptor_rows(d, d_pad, 2)
    constants = launch_constants(config, True, True, d, d, torch.bfloat16, tma, varlen=False,
                                 block_size=tile)
    warps, stages = constants.pop("num_warps"), constants.pop("num_stages")
    constants.update(TILES=None, BLOCK_TABLE=None, PAGED=False, PAGE_SIZE=1,
                     stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
    pointers = {name: "*bf16" for name in ("Q", "K", "V", "O")}
    pointers.update(LSE="*fp32", NUM="*i32", IDX="*i32")
    if tma:
        box = f"tensordesc<bf16[1, 1, {config.block_n}, {d_pad}]>"
        pointers.update(K_DESC=box, V_DESC=box)
    else:
        constants.update(K_DESC=None, V_DESC=None)
    divisible = [n for n in KERNEL.arg_names if n.startswith("stride_")
                 and n not in constants and n != "stride_ir"]
    divisible += ["num_queries", "num_keys", "block_size"]
    compiled = sm90_compile(KERNEL, constants, pointers, floats=("qk_scale",),
                            divisible=divisible, num_warps=warps, num_stages=stages)
    return config, compiled


def loops(sass: str) -> list:
    """Per loop (a predicated backward branch), counts over the instructions it spans."""
    lines = [line for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
    address = [int(re.search(r"/\*([0-9a-f]{4,})\*/", line).group(1), 16) for line in lines]
    labels = {}
    for i, line in enumerate(sass.splitlines()):
        match = re.match(r"^(\.L_x_\d+):", line.strip())
        if match:
            following = [j for j, text in enumerate(lines) if text in sass.splitlines()[i:]]
            if following:
                labels[match.group(1)] = following[0]
    found = []
    for j, line in enumerate(lines):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        # A loop closes with a predicated backward branch; the unconditional ones
        # return from out-of-line barrier-wait stubs, and two-line ones are those
        # stubs' own polling.
        if (target and "@" in line and target.group(1) in labels
                and j - labels[target.group(1)] > 8):
            body = lines[labels[target.group(1)]:j + 1]
            found.append({"start": hex(address[labels[target.group(1)]]),
                          "instructions": len(body),
                          **{key: sum(key in text for text in body)
                             for key in ("HGMMA", "MUFU.EX2", "BAR.SYNC", "STL", "LDL")}})
    return found


def report(case: str) -> dict:
    dims, _, shape = case.partition(":")
    d, tile = (int(x) for x in dims.split("x"))
    config, compiled = compile_case(d, tile, shape)
    cubin = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"prism_attention_{os.getpid()}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    try:
        sass = subprocess.run([tool, "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.remove(cubin)
    registers, spills = ptxas_report(compiled)
    return {"case": case, "config": repr(config), "registers": registers,
            "spill_store_bytes": spills, "loops": loops(sass)}


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
