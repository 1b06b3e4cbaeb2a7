"""The attention kernel through the cached launcher of prism.optimized.launch (CUDA).

The cached attention launch (warp-specialised, host tensor descriptors, plain
pointers) must give bitwise the outputs of Triton's own ``kernel[grid]``
launch, and replay under CUDA graph capture. tests/test_launch.py covers the
launcher itself.
"""

from __future__ import annotations

import pytest
import torch

from prism.optimized import launch as fast

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# ---------------------------------------------------------------------------
# The attention kernel through the cached launcher (CUDA).
# ---------------------------------------------------------------------------

def _attention_case(d, bs, dtype, n=2048, hq=8, hkv=2, density=0.4, seed=0):
    from prism.optimized.indices import mask_rows_to_indices

    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=dtype, generator=gen)
               for h in (hq, hkv, hkv))
    nt = n // bs
    mask = torch.rand(1, hq, nt, nt, device="cuda", generator=gen) < density
    mask |= torch.eye(nt, dtype=torch.bool, device="cuda")
    num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)
    return q, k, v, num, idx


def _attend(q, k, v, num, idx, bs, config, **outputs):
    from prism.optimized.attention import sparse_attention_forward

    return sparse_attention_forward(q, k, v, num, idx, block_size=bs, causal=True, scale=None,
                                    return_lse=True, first_query_tile=0, query_start=0,
                                    interpreted=False, config=config, **outputs)


def _poisoned(q, v):
    return dict(out=torch.full((*q.shape[:3], v.shape[3]), float("nan"), dtype=q.dtype,
                               device="cuda"),
                lse=torch.full(q.shape[:3], float("nan"), device="cuda"))


_WS = "warp-specialised"
_TMA = "host descriptors"
_PLAIN = "pointers"


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("d,bs,dtype,config,path", [
    ("ws", 128, torch.bfloat16, None, _WS),  # opt-in warp specialisation (D 128)
    (128, 128, torch.bfloat16, None, _TMA),  # the default at D 128, tile 128
    (64, 128, torch.bfloat16, None, _TMA),  # 64 x 64, TMA
    (128, 64, torch.float16, None, _TMA),   # tile 64: 3 stages, TMA
    (96, 128, torch.bfloat16, None, _TMA),  # a 128-wide box over 96-wide rows
    (100, 128, torch.bfloat16, None, _PLAIN),  # 200-byte rows: no descriptor
    ("fallback", 128, torch.bfloat16, None, _TMA),
], ids=lambda x: str(x).replace("torch.", "") if x is not None else "default")
def test_attention_fast_launch_is_bitwise_triton(d, bs, dtype, config, path):
    """Warp-specialised (global scratch), host-descriptor (TMA) and plain launches of the
    attention kernel through the cached launcher give Triton's launch's bits."""
    from prism.optimized import attention

    if d == "fallback":  # what a warp-specialised config falls back to: TMA, 8 warps
        d, config = 128, attention.fallback_config(bs, 128)
    elif d == "ws":
        d, config = 128, attention.AttentionConfig(128, 128, 4, 2, use_tma=True,
                                                   warp_specialize=True)
    q, k, v, num, idx = _attention_case(d, bs, dtype)
    attention._PLANS.clear()
    _attend(q, k, v, num, idx, bs, config)  # compiles; plans the launch
    (grid, prepared, _, blocks), = attention._PLANS.values()
    assert prepared.kwargs["WARP_SPECIALIZE"] == (path == _WS)
    assert (blocks is not None) == (path == _TMA) == prepared.kwargs["USE_TMA"]
    before = fast.STATS["fast"]
    fresh = _attend(q, k, v, num, idx, bs, config)
    written = _poisoned(q, v)
    _attend(q, k, v, num, idx, bs, config, **written)
    # A given contiguous output shares the plan (and its cached launch) of a fresh one.
    assert fast.STATS["fast"] - before == 2 and len(attention._PLANS) == 1
    saved = fast._get_device
    fast._get_device = None  # every launch through kernel[grid]
    try:
        expected = _poisoned(q, v)
        _attend(q, k, v, num, idx, bs, config, **expected)
    finally:
        fast._get_device = saved
    assert not expected["out"].isnan().any() and not expected["lse"].isnan().any()
    for got in (fresh, (written["out"], written["lse"])):
        assert torch.equal(got[0], expected["out"]) and torch.equal(got[1], expected["lse"])
    # New data through the cached entry (new descriptors, new scratch): Triton's bits still.
    q2 = torch.randn_like(q)
    again = _attend(q2, k, v, num, idx, bs, config)
    fast._get_device = None
    try:
        plain = _attend(q2, k, v, num, idx, bs, config)
    finally:
        fast._get_device = saved
    assert torch.equal(again[0], plain[0]) and torch.equal(again[1], plain[1])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("d", ["ws", 128, 64], ids=["warp-specialised", "d128-tma", "d64-tma"])
def test_attention_fast_launch_under_cuda_graph_capture(d):
    """Captured cached launches (scratch taken from the graph's pool, descriptors filled
    at capture) replay on new data in place: the opt-in warp-specialised launch and
    the defaults at D 128 and 64."""
    from prism.optimized.attention import AttentionConfig

    config = None
    if d == "ws":
        d, config = 128, AttentionConfig(128, 128, 4, 2, use_tma=True, warp_specialize=True)
    q, k, v, num, idx = _attention_case(d, 128, torch.bfloat16, seed=1)
    for _ in range(2):
        _attend(q, k, v, num, idx, 128, config)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = _attend(q, k, v, num, idx, 128, config)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    expected, expected_lse = _attend(q, k, v, num, idx, 128, config)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)


# ---------------------------------------------------------------------------
# Masking by min(s, cap) (AttentionConfig.min_mask; interpreter or GPU).
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_min_mask_matches_compare_and_select(causal):
    """The warp-specialised loop's masking, ``min(s, cap)``, forced on the plain loop:
    bitwise the outputs and LSE of compare-and-select, and the reference's, with a
    KV prefix (query_start > 0), a partial last key tile, rows with no tile, and
    tiles that are not the diagonal as a row's last."""
    from helpers import TOLERANCE, relative_error
    from prism import reference
    from prism.optimized._runtime import kernels_interpreted
    from prism.optimized.attention import (
        AttentionConfig,
        _sparse_attention_kernel,
        sparse_attention_forward,
    )
    from prism.optimized.indices import mask_rows_to_indices

    interpreted = kernels_interpreted(_sparse_attention_kernel)
    if not interpreted and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a CUDA GPU")
    device = "cpu" if interpreted else "cuda"
    bs, nq, nk, d = 32, 50, 90, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v = (3 * torch.randn(1, h, n, d, generator=gen) for h, n in ((2, nq), (1, nk), (1, nk)))
    q, k, v = (t.to(device, torch.float16) for t in (q, k, v))
    layout = reference.tile_layout(nq, nk, bs, causal)
    mask = torch.rand(1, 2, layout.num_query_tiles, layout.num_key_tiles, generator=gen) < 0.5
    mask[0, 1, 0] = False  # a query tile with no key tile
    mask = mask.to(device)
    num, idx = mask_rows_to_indices(mask, layout.first_query_tile, causal_trim=causal)
    results = []
    for min_mask in (True, False):
        out = torch.full((1, 2, nq, d), float("nan"), dtype=q.dtype, device=device)
        lse = torch.full((1, 2, nq), float("nan"), device=device)
        sparse_attention_forward(q, k, v, num, idx, block_size=bs, causal=causal, scale=None,
                                 return_lse=True, first_query_tile=layout.first_query_tile,
                                 query_start=layout.query_start, interpreted=interpreted,
                                 out=out, lse=lse,
                                 config=AttentionConfig(32, 32, 4, 1, min_mask=min_mask))
        results.append((out, lse))
    (out, lse), (plain_out, plain_lse) = results
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, mask, block_size=bs,
                                                        causal=causal, return_lse=True)
    assert relative_error(out, ref_out) <= TOLERANCE[q.dtype]
    assert relative_error(lse, ref_lse) <= 1e-5
    assert torch.isinf(lse[0, 1, :min(nq, bs - layout.query_start % bs)]).all()
