"""prism.optimized on a CUDA GPU: the checks of test_optimized.py at long shapes and in bf16.

Skipped without CUDA (marker ``gpu``). Each test records its measured errors
and tie counts with ``record_property``, so ``pytest --junitxml=...`` keeps
them; benchmarks/results/ holds the log of the last run on the H200.
"""

from __future__ import annotations

import pytest
import torch
from test_optimized import check_attention, check_selection, random_tile_mask

from helpers import TOLERANCE, make_qkv, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda(*tensors):
    return tuple(t.cuda() for t in tensors)


SELECTION_SHAPES = [
    # (batch, q heads, kv heads, nq, nk, head_dim, block_size)
    (2, 8, 2, 4096, 4096, 128, 128),
    (1, 8, 2, 32768, 32768, 128, 128),
    (1, 8, 2, 5000, 32768, 128, 64),  # KV prefix not a tile multiple
    (1, 4, 1, 16384, 16384, 64, 16),  # 1024 key tiles: tensor-core rows
    (1, 4, 1, 32768, 32768, 64, 16),  # 2048 key tiles: the widest tensor-core rows
    (1, 2, 1, 131072, 131072, 64, 16),  # 8192 key tiles per row: CUDA-core rows
]


# The 8192-tile row runs once, in bf16.
SELECTION_CASES = [(shape, dtype) for shape in SELECTION_SHAPES for dtype in DTYPES
                   if shape[4] <= 40000 or dtype == torch.bfloat16]


@pytest.mark.parametrize("shape,dtype", SELECTION_CASES,
                         ids=lambda x: str(x).split(".")[-1] if isinstance(x, torch.dtype)
                         else f"{x[3]}x{x[4]}-bs{x[6]}")
def test_selection_long(shape, dtype, record_property):
    b, hq, hkv, nq, nk, d, bs = shape
    q, k, _ = make_qkv(b, hq, hkv, nq, nk, d, base=500000.0, dtype=dtype, seed=nq + bs,
                       sharpness=2.0)
    q, k = _cuda(q, k)
    ties = check_selection(q, k, block_size=bs)
    record_property("boundary_ties", ties)


ATTENTION_SHAPES = [
    (2, 8, 2, 4096, 4096, 128, 128, 0.3),
    (1, 8, 2, 32768, 32768, 128, 128, 0.15),
    (1, 8, 2, 32768, 32768, 128, 128, 1.0),
    (1, 8, 2, 3000, 20000, 128, 64, 0.5),  # prefix not a tile multiple
    (1, 4, 4, 8192, 8192, 64, 32, 0.4),
    # Written for the warp-specialised loop (now opt-in; the default plain loop
    # reads K and V by descriptor): a KV prefix with tile-aligned queries, two key
    # blocks per 256-token tile, and a prefix that is not a multiple of 128.
    (1, 8, 2, 4096, 20480, 128, 128, 0.4),
    (1, 8, 2, 8192, 8192, 128, 256, 0.4),
    (1, 8, 2, 3000, 20000, 128, 128, 0.5),
    # Launch shapes of the measured table (optimized.attention.default_config): D 256
    # (128 x 64 on 8 warps with TMA; 64 x 32 with TMA at tile 64), D 80 and 96 (padded
    # to 128 in registers), D 64 (64 x 64 with TMA at tiles 64 and 128), tile 64 with
    # TMA (D 128 there: 64 x 32; at tile 128, 128 x 64 on 4 warps, the cases above).
    (1, 8, 2, 8192, 8192, 256, 128, 0.3),
    (1, 8, 2, 8192, 8192, 256, 64, 0.3),
    (1, 8, 2, 8192, 8192, 80, 128, 0.3),
    (2, 8, 8, 4096, 4096, 96, 64, 0.3),
    (1, 8, 1, 8192, 8192, 64, 128, 0.3),
    (1, 8, 2, 8192, 8192, 64, 64, 0.3),
    (1, 8, 2, 5000, 8192, 128, 64, 0.3),
]


# Dense 32K in fp32 runs IEEE products on CUDA cores for minutes; the sparse
# 32K fp32 case covers that path.
ATTENTION_CASES = [(shape, dtype) for shape in ATTENTION_SHAPES for dtype in DTYPES
                   if not (dtype == torch.float32 and shape[4] > 20000 and shape[7] == 1.0)]


@pytest.mark.parametrize("d", [128, 96])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_on_strided_views(dtype, d, record_property):
    """(B, N, H, D) tensors seen as (B, H, N, D), as transformers passes them: the
    K/V descriptors read the real strides (at D 96 through a 128-wide box); a
    batch of two, a non-causal call and one with a KV prefix."""
    from prism.reference import tile_layout

    def as_heads_view(x):
        return x.transpose(1, 2).contiguous().transpose(1, 2)

    for causal, nq, nk in ((True, 4096, 4096), (False, 2048, 6144), (True, 2048, 6144)):
        q, k, v = (as_heads_view(t) for t in
                   _cuda(*make_qkv(2, 8, 2, nq, nk, d, dtype=dtype, seed=nq + nk,
                                   causal=causal)))
        assert q.stride(2) != q.shape[3]
        layout = tile_layout(nq, nk, 128, causal)
        mask = random_tile_mask((2, 8, layout.num_query_tiles, layout.num_key_tiles), 0.4,
                                torch.Generator().manual_seed(nq), causal=causal,
                                first_tile=layout.first_query_tile, keep_diagonal=True)
        out_error, lse_error = check_attention(q, k, v, mask.cuda(), block_size=128,
                                               causal=causal)
        record_property(f"out_error_causal{int(causal)}_{nq}x{nk}", out_error)


def test_warp_specialized_matches_plain_loop(record_property):
    """The opt-in warp-specialised launch and the plain loop give the same outputs
    on one mask (run alone: under GPU sharing the specialised one is not safe)."""
    from prism.optimized.attention import (
        AttentionConfig,
        default_config,
        fallback_config,
        sparse_attention_forward,
        warp_specialize_compatible,
    )
    from prism.optimized.indices import mask_rows_to_indices
    from prism.reference import tile_layout

    q, k, v = _cuda(*make_qkv(1, 8, 2, 8192, 8192, 128, dtype=torch.bfloat16, seed=11))
    if not warp_specialize_compatible(q, k, v, 128, 128, 0, 128):
        pytest.skip("warp specialisation needs a compute capability 9.x GPU")
    layout = tile_layout(8192, 8192, 128, True)
    mask = random_tile_mask((1, 8, layout.num_query_tiles, layout.num_key_tiles), 0.3,
                            torch.Generator().manual_seed(5), causal=True, first_tile=0,
                            keep_diagonal=True).cuda()
    num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)
    outs = [sparse_attention_forward(q, k, v, num, idx, block_size=128, causal=True, scale=None,
                                     return_lse=True, first_query_tile=0, query_start=0,
                                     interpreted=False, config=config)
            for config in (AttentionConfig(128, 128, 4, 2, use_tma=True, warp_specialize=True),
                           fallback_config(128))]
    # The default is the plain loop (the warp-specialised one left NaN rows with
    # other processes on the GPU, optimized.attention.default_config).
    assert not default_config(128, 128, torch.bfloat16, False).warp_specialize
    out_diff = float((outs[0][0].float() - outs[1][0].float()).abs().max())
    lse_diff = float((outs[0][1] - outs[1][1]).abs().max())
    record_property("out_max_abs_diff", out_diff)
    record_property("lse_max_abs_diff", lse_diff)
    assert out_diff <= 1e-2 and lse_diff <= 1e-4


@pytest.mark.parametrize("d, dv, tile, nq, nk", [
    (96, 96, 128, 4096, 4096), (80, 80, 128, 3000, 20000), (96, 96, 64, 5000, 8192),
    (80, 80, 64, 4096, 4096),
    (192, 128, 128, 4096, 4096),  # DeepSeek-style widths: K in a 256 box, V in 128
    (160, 160, 64, 2048, 6144),
])
def test_padded_head_dims_through_descriptors(d, dv, tile, nq, nk, record_property):
    """Head dims that are not powers of two read K and V through a descriptor box
    of the padded width: the copy zero-fills the columns past the rows, as the
    masked pointer loads do. Both launches against the reference, and against
    each other (same math, same keys: a box column past the tensor must add
    nothing)."""
    from prism.optimized.attention import (
        AttentionConfig,
        sparse_attention_forward,
        tma_compatible,
    )
    from prism.optimized.indices import mask_rows_to_indices
    from prism.reference import block_sparse_attention, tile_layout

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need compute capability 9.0 or newer")
    q, k, v = _cuda(*make_qkv(1, 8, 2, nq, nk, d, dtype=torch.bfloat16, seed=d + tile,
                              value_dim=dv))
    d_pad, dv_pad = 1 << (d - 1).bit_length(), 1 << (dv - 1).bit_length()
    # Boxes of 128 and 256 over narrower rows (80, 96, 160, 192) are accepted.
    assert tma_compatible(k, v, d_pad, dv_pad), (d, dv)
    layout = tile_layout(nq, nk, tile, True)
    mask = random_tile_mask((1, 8, layout.num_query_tiles, layout.num_key_tiles), 0.3,
                            torch.Generator().manual_seed(nk), causal=True,
                            first_tile=layout.first_query_tile, keep_diagonal=True).cuda()
    num, idx = mask_rows_to_indices(mask, layout.first_query_tile, causal_trim=True)
    block_m = min(tile, 128)
    outs = [sparse_attention_forward(q, k, v, num, idx, block_size=tile, causal=True,
                                     scale=None, return_lse=True,
                                     first_query_tile=layout.first_query_tile,
                                     query_start=layout.query_start, interpreted=False,
                                     config=AttentionConfig(block_m, 64 if d <= 128 else 32,
                                                            4, 2, use_tma=tma))
            for tma in (True, False)]
    ref_out, ref_lse = block_sparse_attention(q, k, v, mask, block_size=tile, causal=True,
                                              return_lse=True)
    errors = [relative_error(out, ref_out) for out, _ in outs]
    record_property("out_error_tma", errors[0])
    record_property("out_error_pointer", errors[1])
    assert torch.isfinite(outs[0][0]).all()
    assert max(errors) <= TOLERANCE[torch.bfloat16], errors
    assert relative_error(outs[0][1], ref_lse) <= 1e-5
    assert float((outs[0][0].float() - outs[1][0].float()).abs().max()) <= 1e-2
    # The public call, with the table's launch shape for this head dim.
    from prism import optimized

    public = optimized.block_sparse_attention(q, k, v, mask, block_size=tile)
    record_property("out_error_public", relative_error(public, ref_out))
    assert relative_error(public, ref_out) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("shape,dtype", ATTENTION_CASES,
                         ids=lambda x: str(x).split(".")[-1] if isinstance(x, torch.dtype)
                         else f"{x[3]}x{x[4]}-bs{x[6]}-D{x[5]}-density{x[7]}")
def test_attention_long(shape, dtype, record_property):
    b, hq, hkv, nq, nk, d, bs, density = shape
    from prism.reference import tile_layout

    q, k, v = _cuda(*make_qkv(b, hq, hkv, nq, nk, d, dtype=dtype, seed=nk + bs))
    layout = tile_layout(nq, nk, bs, True)
    mask = random_tile_mask((b, hq, layout.num_query_tiles, layout.num_key_tiles), density,
                            torch.Generator().manual_seed(nk), causal=True,
                            first_tile=layout.first_query_tile, keep_diagonal=True)
    out_error, lse_error = check_attention(q, k, v, mask.cuda(), block_size=bs)
    record_property("out_error", out_error)
    record_property("lse_error", lse_error)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prism_attention_long(dtype, record_property):
    from test_optimized import TOLERANCE

    from helpers import relative_error
    from prism import optimized, reference

    q, k, v = _cuda(*make_qkv(1, 8, 2, 16384, 16384, 128, base=500000.0, dtype=dtype, seed=3,
                              sharpness=2.0))
    o, lse, mask = optimized.prism_attention(q, k, v, return_lse=True, return_mask=True)
    ties = reference.boundary_ties(q, k)
    assert reference.mask_differences(mask, reference.select_blocks(q, k), ties).numel() == 0
    ref_o, ref_lse = reference.block_sparse_attention(q, k, v, mask, return_lse=True)
    out_error = relative_error(o, ref_o)
    assert out_error <= TOLERANCE[dtype]
    assert relative_error(lse, ref_lse) <= 1e-5
    record_property("out_error", out_error)
    record_property("density", float(mask.float().mean()))


def test_selection_allocates_no_probability_tensor(record_property):
    """Peak memory of selection at 64K stays far below one (B, H, 2*nq, nk) fp32 tensor."""
    from prism import optimized
    from prism.optimized.api import _select
    from prism.reference import resolve_config

    n, hq, hkv, d, bs = 65536, 32, 8, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    cfg = resolve_config(None, block_size=bs)
    nt = n // bs
    probability_bytes = hq * 2 * nt * nt * 4
    optimized.select_blocks(q, k, cfg)  # compile outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mask = optimized.select_blocks(q, k, cfg)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # The returned TileMask holds the bits and the compact indices.
    outputs = mask.numel() + 4 * mask.kv_num_blocks.numel() + 4 * mask.kv_indices.numel()
    scratch = peak - outputs
    record_property("peak_extra_bytes", peak)
    record_property("scratch_bytes", scratch)
    record_property("probability_tensor_bytes", probability_bytes)
    assert scratch < probability_bytes / 4
    del mask
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mask, num, idx, _ = _select(q, k, cfg, True, write_indices=True)
    torch.cuda.synchronize()
    scratch = (torch.cuda.max_memory_allocated() - base
               - mask.numel() - 4 * num.numel() - 4 * idx.numel())
    record_property("scratch_bytes_with_indices", scratch)
    assert scratch < probability_bytes / 4
