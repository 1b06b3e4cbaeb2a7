"""Call plans on the GPU: replays of every public call kind against the general path.

Each test records a call's plan, replays it on other values (and inside a CUDA
graph capture) and checks the general path's bits; NaN input still raises. The
plan mechanics on fake launches are in ``tests/test_call_plan.py``.
"""

from __future__ import annotations

import pytest
import torch

import prism.optimized as optimized
from prism.optimized import attention, call_plan, ops
from prism.reference import PrismConfig, tile_layout

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n, d", [(4096, 128), (2000, 64)])
def test_replay_equals_the_general_path_on_the_gpu(n, d):
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
               for h in (8, 2, 2))
    copies = [t.clone() for t in (q, k, v)]
    call_plan._PLANS.clear()
    general = [optimized.prism_attention(q, k, v, return_lse=True) for _ in range(2)]
    masks = [optimized.select_blocks(q, k) for _ in range(2)]
    hits = call_plan.PLAN_STATS["hit"]
    out, lse = optimized.prism_attention(q, k, v, return_lse=True)
    mask = optimized.select_blocks(q, k)
    assert call_plan.PLAN_STATS["hit"] == hits + 2
    assert torch.equal(out, general[0][0]) and torch.equal(lse, general[0][1])
    assert torch.equal(mask.as_tensor(), masks[0].as_tensor())
    assert torch.equal(mask.kv_num_blocks, masks[0].kv_num_blocks)
    assert torch.equal(mask.kv_indices, masks[0].kv_indices)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies, strict=True))
    # Under CUDA graph capture: the replay is captured and gives the same bits.
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured, captured_lse = optimized.prism_attention(q, k, v, return_lse=True)
    graph.replay()
    torch.cuda.synchronize()
    assert call_plan.PLAN_STATS["hit"] == hits + 3
    assert torch.equal(captured, out) and torch.equal(captured_lse, lse)
    bad = q.clone()
    bad[0, 3, 100, 5] = float("inf")
    with pytest.raises(ValueError, match="q contains 1 NaN or Inf"):
        optimized.prism_attention(bad, k, v, return_lse=True)
    assert call_plan.PLAN_STATS["hit"] == hits + 4


@pytest.mark.gpu
@cuda
def test_block_sparse_replay_equals_the_general_path_on_the_gpu():
    """Masks of other values through one plan, a TileMask's carried indices, lse: the
    replay gives the general path's bits, which are those of the call with its NaN/Inf
    check on the call's stream; the plans fork and join the check's side stream; NaN
    in q, k or v still raises, replayed too."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(1, h, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
               for h in (8, 2, 2))
    eye = torch.eye(32, dtype=torch.bool, device="cuda")
    masks = [(torch.rand(1, 8, 32, 32, device="cuda", generator=gen) < p) | eye
             for p in (0.1, 0.5, 1)]
    masks.append(optimized.select_blocks(q, k))
    call_plan._PLANS.clear()
    call_plan.ENABLED = False
    try:
        general = [optimized.block_sparse_attention(q, k, v, m, return_lse=True) for m in masks]
    finally:
        call_plan.ENABLED = True
    assert not call_plan._PLANS  # nothing recorded with plans off
    hits = call_plan.PLAN_STATS["block_sparse"]
    for _ in range(3):  # bool masks: seen, recorded, 7 replays; the TileMask: 1 replay
        for m, (out, lse) in zip(masks, general, strict=True):
            got, got_lse = optimized.block_sparse_attention(q, k, v, m, return_lse=True)
            assert torch.equal(got, out) and torch.equal(got_lse, lse)
    assert call_plan.PLAN_STATS["block_sparse"] == hits + 8
    plans = [plan for plan in call_plan._PLANS.values() if plan]
    assert plans and all(any(step.sync == "fork" for step in plan.steps) for plan in plans)
    ops.CHECK_BESIDE_ATTENTION = False
    try:
        call_plan._PLANS.clear()
        one_stream = [optimized.block_sparse_attention(q, k, v, m, return_lse=True)
                      for m in masks]
    finally:
        ops.CHECK_BESIDE_ATTENTION = True
    for (out, lse), (got, got_lse) in zip(general, one_stream, strict=True):
        assert torch.equal(got, out) and torch.equal(got_lse, lse)
    call_plan._PLANS.clear()
    for name, position in (("v", 2), ("q", 0), ("k", 1)):
        args = [q, k, v]
        args[position] = args[position].clone()
        args[position][0, 1, 300, 7] = float("nan")
        for _ in range(3):  # seen, recorded, replayed
            with pytest.raises(ValueError, match=f"{name} contains 1 NaN or Inf"):
                optimized.block_sparse_attention(*args, masks[0], return_lse=True)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cfg", [
    PrismConfig.preset("accurate"),
    PrismConfig.preset("accurate", estimator="antidiagonal_vertical_slash",
                       antidiagonal_stride=32),
    PrismConfig.preset("accurate", sampled_weight=0.0),
], ids=["accurate-preset", "antidiagonal-vertical-slash", "cascade-without-sampled-stage"])
def test_estimator_calls_replay_plans_on_the_gpu(cfg):
    """The estimators' selections launch through ``launch.launch``: their calls get plans,
    and a replay on other values gives the general path's bits (also captured in a CUDA
    graph); NaN input still raises."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    inputs = [tuple(torch.randn(1, h, 4096, 128, device="cuda", dtype=torch.bfloat16,
                                generator=gen) for h in (8, 2, 2)) for _ in range(2)]
    call_plan._PLANS.clear()
    call_plan.ENABLED = False
    try:
        general = [(optimized.select_blocks(q, k, cfg), optimized.prism_attention(q, k, v, cfg))
                   for q, k, v in inputs]
    finally:
        call_plan.ENABLED = True
    stats = dict(call_plan.PLAN_STATS)
    q, k, v = inputs[0]
    for _ in range(2):  # seen, recorded
        optimized.select_blocks(q, k, cfg)
        optimized.prism_attention(q, k, v, cfg)
    assert call_plan.PLAN_STATS["made"] == stats["made"] + 2, call_plan.LAST_REFUSAL
    for (q, k, v), (mask, out) in zip(inputs, general, strict=True):
        got = optimized.select_blocks(q, k, cfg)
        assert torch.equal(got.as_tensor(), mask.as_tensor())
        assert torch.equal(got.kv_num_blocks, mask.kv_num_blocks)
        assert torch.equal(got.kv_indices, mask.kv_indices)
        assert torch.equal(optimized.prism_attention(q, k, v, cfg), out)
    assert call_plan.PLAN_STATS["hit"] == stats["hit"] + 4
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = optimized.prism_attention(q, k, v, cfg)
    graph.replay()
    torch.cuda.synchronize()
    assert call_plan.PLAN_STATS["hit"] == stats["hit"] + 5
    assert torch.equal(captured, general[1][1])
    bad = k.clone()
    bad[0, 1, 2000, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        optimized.select_blocks(q, bad, cfg)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_sparse_plan_replays_other_masks_bit_for_bit(dtype):
    """One ``block_sparse_attention`` signature recorded on a sparse mask and replayed on
    a full one and a sparser one (the order of ``test_gpu.py``'s long cases, where one
    run saw NaN rows once): every replay equals the kernel called directly, bit for bit."""
    from prism.optimized.indices import mask_rows_to_indices

    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, h, 8192, 128, generator=gen).to("cuda", dtype)
               for h in (8, 2, 2))
    layout = tile_layout(8192, 8192, 128, True)
    shape = (1, 8, layout.num_query_tiles, layout.num_key_tiles)
    keys = torch.arange(shape[-1])
    causal = keys[None, :] <= keys[:, None]
    call_plan._PLANS.clear()
    made = call_plan.PLAN_STATS["made"]
    for density in (0.15, 1.0, 0.05):
        mask = ((torch.rand(shape, generator=gen) < density) | torch.eye(shape[-1],
                                                                         dtype=torch.bool))
        mask = (mask & causal).cuda()
        num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)
        direct, direct_lse = attention.sparse_attention_forward(
            q, k, v, num, idx, block_size=128, causal=True, scale=None, return_lse=True,
            first_query_tile=0, query_start=0, interpreted=False)
        for _ in range(3):
            out, lse = optimized.block_sparse_attention(q, k, v, mask, block_size=128,
                                                        causal=True, return_lse=True)
            assert torch.isfinite(out).all()
            assert torch.equal(out, direct) and torch.equal(lse, direct_lse)
    assert call_plan.PLAN_STATS["made"] == made + 1  # one plan, replayed on every mask


@pytest.mark.gpu
@cuda
def test_selection_on_two_streams_replays_its_plan_on_the_gpu():
    """Prism's selection with three launches (the narrower two on the side stream) and the
    accurate preset (its vertical-slash stage on its own stream) get plans; their replays,
    eager and captured in a CUDA graph, equal the general path and the one-stream path
    bit for bit."""
    from prism.optimized import estimator_path

    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k = (torch.randn(1, h, 16384, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
            for h in (4, 2))
    for cfg in (PrismConfig(block_size=16), PrismConfig.preset("accurate", block_size=16)):
        estimator_path.OVERLAP_VERTICAL_SLASH = False
        try:
            one_stream = optimized.select_blocks(q, k, cfg)
        finally:
            estimator_path.OVERLAP_VERTICAL_SLASH = True
        call_plan._PLANS.clear()
        made, hits = call_plan.PLAN_STATS["made"], call_plan.PLAN_STATS["hit"]
        calls = [optimized.select_blocks(q, k, cfg) for _ in range(4)]  # seen, recorded, 2
        assert call_plan.PLAN_STATS["made"] == made + 1, call_plan.LAST_REFUSAL
        assert call_plan.PLAN_STATS["hit"] == hits + 2
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            captured = optimized.select_blocks(q, k, cfg)
        graph.replay()
        torch.cuda.synchronize()
        for got in (*calls, captured):
            assert torch.equal(got.as_tensor(), one_stream.as_tensor())
            assert torch.equal(got.kv_num_blocks, one_stream.kv_num_blocks)
            assert torch.equal(got.kv_indices, one_stream.kv_indices)
