"""The vertical-slash distribution kernel's registers, compiled for sm_90 on the CPU.

Full key blocks skip the masks and the three sums over the rows share one
reduction, which took the kernel from 184 to 118 registers per thread and
its time at 128K from 0.49 to 0.36 ms on the H200 (benchmarks/NOTES.md item
38 (b)). This compiles the preset's launch (32 last queries of two heads per
program, D 128, bf16, blocks of 64 keys, 4 warps, 3 stages) with the ptxas
that ships with Triton, with the specialisations Triton gives the real call
(unit head-dim strides, other strides and lengths divisible by 16), and
fails on any spill or on more than 128 registers per thread (four programs
per SM, against two at 184).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys


def _distribution_kernel_resources() -> tuple[int, int]:
    """(registers, spill-store bytes) per thread of the preset's distribution launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from prism.optimized import vertical_slash

    kernel = vertical_slash._distribution_kernel
    constexprs = dict(CAUSAL=True, HEADS=2, LB=32, BN=64, HEAD_DIM=128, D_PAD=128, IEEE=False,
                      UPCAST=False, DIRECT_VERT=True, stride_qd=1, stride_kd=1)
    pointers = {"Q": "*bf16", "K": "*bf16", "M_PART": "*fp32", "L_PART": "*fp32",
                "VERT": "*fp32", "SLASH": "*fp32"}
    divisible = ("stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
                 "rows", "num_queries", "num_keys", "query_start", "num_key_blocks")
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else pointers.get(n) or
                 ("fp32" if n == "qk_scale" else "i32") for n in names}
    source = ASTSource(kernel, signature,
                       {(names.index(n),): v for n, v in constexprs.items()},
                       {(names.index(n),): [["tt.divisibility", 16]]
                        for n in (*pointers, *divisible)})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 3})
    ptx = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"prism_vs_{os.getpid()}.ptx")
    with open(ptx, "w") as f:
        f.write(compiled.asm["ptx"])
    try:
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", ptx, "-o",
                                 os.devnull], capture_output=True, text=True, check=True).stderr
    finally:
        os.remove(ptx)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill stores", report))
    return registers, spills


def test_distribution_launch_fits_four_programs_per_sm():
    # A fresh process, where triton.jit makes compilable kernels (this one may run
    # them in the interpreter).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ("import sys; sys.path.insert(0, sys.argv[1]); "
              "from test_vs_launch import _distribution_kernel_resources as r; print(*r())")
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    registers, spills = map(int, done.stdout.split()[-2:])
    assert spills == 0
    assert registers <= 128, f"{registers} registers per thread"
