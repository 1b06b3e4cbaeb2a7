"""The vertical-slash distribution kernel's registers, compiled for sm_90 on the CPU.

Full key blocks skip the masks and the three sums over the rows share one
reduction, which took the kernel from 184 to 118 registers per thread and
its time at 128K from 0.49 to 0.36 ms on the H200 (benchmarks/NOTES.md item
38 (b)). Since every key block is scored with its load outside any branch
(item 47 (d)), Triton pipelines the loads: 135 registers, three programs per
SM instead of four, and the whole preset selection 2% faster at 128K. This
compiles the preset's launch (32 last queries of two heads per program, D
128, bf16, blocks of 64 keys, 4 warps, 3 stages) with the ptxas that ships
with Triton, with the specialisations Triton gives the real call (unit
head-dim strides, other strides and lengths divisible by 16), and fails on
any spill, on more than 168 registers per thread (fewer than three programs
per SM) or on key loads that are not asynchronous copies (``cp.async``, the
pipelined form).
"""

from __future__ import annotations

from sm90 import in_fresh_process


def _distribution_kernel_resources() -> tuple[int, int, int]:
    """(registers, spill-store bytes, asynchronous copies in the PTX) per thread of the
    preset's distribution launch."""
    from sm90 import ptxas_report, sm90_compile

    from prism.optimized import vertical_slash

    constexprs = dict(CAUSAL=True, HEADS=2, LB=32, BN=64, HEAD_DIM=128, D_PAD=128, IEEE=False,
                      UPCAST=False, DIRECT_VERT=True, stride_qd=1, stride_kd=1)
    pointers = {"Q": "*bf16", "K": "*bf16", "M_PART": "*fp32", "L_PART": "*fp32",
                "VERT": "*fp32", "SLASH": "*fp32"}
    divisible = ("stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
                 "rows", "num_queries", "num_keys", "query_start", "num_key_blocks")
    compiled = sm90_compile(vertical_slash._distribution_kernel, constexprs, pointers,
                            floats=("qk_scale",), divisible=divisible, num_warps=4,
                            num_stages=3)
    return (*ptxas_report(compiled), compiled.asm["ptx"].count("cp.async.cg"))


def test_distribution_launch_pipelines_its_key_loads():
    registers, spills, copies = in_fresh_process("test_vs_launch",
                                                 "_distribution_kernel_resources")
    assert spills == 0
    assert registers <= 168, f"{registers} registers per thread"
    assert copies > 0, "the key loads are not pipelined"
