"""The packed antidiagonal kernel's tuned launches, compiled for sm_90 on the CPU.

Two launches the notes time on the H200 (benchmarks/NOTES.md items 47 and 48):

* the dense stride-8 launch (``TUNED[16]``: 128 rows x 256 key groups on 8
  warps, 2 stages, loads through tensor descriptors), which fits without
  spilling only since unmasked key blocks skip the masks (item 47 (b));
* the accurate preset's candidate-restricted launch (``CANDIDATE_TUNED[8]``:
  64 x 64 on 4 warps, 3 stages), whose gathered key tiles are read by pointer
  loads: they must stay asynchronous copies (``cp.async``, pipelined across
  the ``u`` products) and not spill (item 48 (b)); and the same launch scoring
  the cascade's sampled stage too (``SAMPLED_TUNED[8]``, 64 x 32 on 4 warps).

Each is compiled with the ptxas that ships with Triton, with the
specialisations Triton gives the real call (unit head-dim strides, other
strides divisible by 16), in a process without Triton's interpreter.
"""

from __future__ import annotations

from sm90 import in_fresh_process


def _packed_resources(per_tile: int, candidates: int,
                      sampled: int = 0) -> tuple[int, int, int, int]:
    """(registers, spill-store bytes, cp.async count, tensor-copy count) per thread of
    the tuned launch at ``per_tile`` groups per tile (32/8 heads, D 128, bf16); with
    ``sampled``, the candidate launch that also scores the cascade's sampled stage."""
    from sm90 import ptxas_report, sm90_compile

    from prism.optimized import antidiagonal_packed as packed

    tuning = packed.default_tuning(per_tile, 4, 128, bool(candidates), bool(sampled))
    rows = tuning.target_rows
    constexprs = dict(CAUSAL=True, STRIDE=128 // per_tile, PER_TILE=per_tile, HEAD_DIM=128,
                      D_PAD=128, ROWS=rows, PAIRS=rows // per_tile, BLOCK_KG=tuning.block_kg,
                      IEEE=False, UPCAST=False, ONE_PASS=True, CHECK=True,
                      TMA=bool(tuning.tma), GROUP=4 if tuning.tma else 1,
                      CANDIDATES=bool(candidates), SCAN_TILES=512 if candidates else 16,
                      D_SPLIT=tuning.d_split, SAMPLED=bool(sampled),
                      stride_qd=1, stride_kd=1, stride_ck=1)
    pointers = {"Q": "*bf16", "K": "*bf16", "OUT": "*fp32", "E": "*fp32", "MB": "*fp32",
                "NONFINITE": "*fp64", "CAND": "*u8", "LIST": "*i32", "SECOND": "*fp32",
                "E2": "*fp32", "MB2": "*fp32"}
    divisible = ("stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh",
                 "stride_kn", "stride_ob", "stride_oh", "stride_orow")
    compiled = sm90_compile(packed._packed_kernel, constexprs, pointers, floats=("qk_scale",),
                            divisible=divisible, num_warps=tuning.num_warps,
                            num_stages=tuning.num_stages)
    ptx = compiled.asm["ptx"]
    return (*ptxas_report(compiled), ptx.count("cp.async.cg"),
            ptx.count("cp.async.bulk.tensor"))


def test_dense_stride_8_launch_does_not_spill():
    registers, spills, _, tensor_copies = in_fresh_process("test_packed_launch",
                                                           "_packed_resources", 16, 0)
    assert spills == 0, f"{spills} bytes spilled per thread ({registers} registers)"
    assert tensor_copies > 0, "q and k no longer load through tensor descriptors"


def test_gathered_candidate_launch_pipelines_its_key_loads():
    registers, spills, copies, tensor_copies = in_fresh_process("test_packed_launch",
                                                                "_packed_resources", 8, 1)
    assert spills == 0, f"{spills} bytes spilled per thread ({registers} registers)"
    assert copies > 0, "the gathered key loads are not asynchronous copies"
    assert tensor_copies > 0, "the query rows no longer load through tensor descriptors"
    # Two 4-warp programs per SM need at most 255 registers a thread (64K / 256).
    assert registers <= 255


def test_candidate_launch_with_the_sampled_stage_does_not_spill():
    """The accurate preset's restricted antidiagonal launch that also scores its
    sampled queries (``SAMPLED_TUNED[8]``, 64 x 32 on 4 warps) keeps its key loads
    asynchronous and spills at most the 8 bytes a thread it spilled when the H200
    measured it fastest (antidiagonal_shapes.SAMPLED_TUNED; 64 x 64 on 4 warps spilled
    992)."""
    registers, spills, copies, tensor_copies = in_fresh_process("test_packed_launch",
                                                                "_packed_resources", 8, 1, 1)
    assert spills <= 8, f"{spills} bytes spilled per thread ({registers} registers)"
    assert copies > 0, "the gathered key loads are not asynchronous copies"
    assert tensor_copies > 0, "the query rows no longer load through tensor descriptors"
    assert registers <= 255
