"""The reference at the edges of the contract: large logits, huge tiles, meta
tensors, threshold 1 and the widened tie rule (contract §6, §7, §10)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_attention_close, make_qkv, oracle_attention, oracle_select
from prism.reference import (
    PrismConfig,
    apply_rope,
    block_sparse_attention,
    boundary_ties,
    mask_differences,
    prism_attention,
    select_blocks,
    top_p_select,
    trace_selection,
)

ONE_TILE = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def _running_mean(v):
    """Causal attention with equal scores is the running mean of v (float64)."""
    n = v.shape[2]
    return v.double().cumsum(2) / torch.arange(1, n + 1, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("magnitude", [1e0, 1e1, 1e2, 1e3, 1e4])
def test_equal_scores_give_the_running_mean_at_any_magnitude(magnitude):
    q = torch.full((1, 1, 64, 32), magnitude)
    v = torch.randn(1, 1, 64, 32, generator=torch.Generator().manual_seed(0))
    expected = _running_mean(v)
    o = block_sparse_attention(q, q.clone(), v, ONE_TILE, block_size=64)
    sdpa = F.scaled_dot_product_attention(q, q.clone(), v, is_causal=True)
    ours = (o.double() - expected).abs().max().item()
    theirs = (sdpa.double() - expected).abs().max().item()
    assert ours <= 1e-6, ours
    assert ours <= 10 * theirs + 1e-6
    # Prism end to end on the CPU goes through the same attention.
    o2 = prism_attention(q, q.clone(), v, block_size=64)
    assert (o2.double() - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("magnitude", [1e0, 1e1, 1e2, 1e3, 1e4])
def test_random_inputs_match_float64_within_the_logit_scaled_tolerance(magnitude):
    gen = torch.Generator().manual_seed(int(math.log10(magnitude)))
    q = magnitude * torch.randn(1, 2, 48, 16, generator=gen)
    k = magnitude * torch.randn(1, 1, 48, 16, generator=gen)
    v = torch.randn(1, 1, 48, 16, generator=gen)
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    o, lse = block_sparse_attention(q, k, v, mask, block_size=16, return_lse=True)
    o64, lse64 = oracle_attention(q, k, v, mask, block_size=16)
    assert_attention_close(o, lse, o64, lse64, q, k, v)
    # ... and no worse than torch's own fp32 attention against float64.
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    sdpa = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    assert (o.double() - o64).abs().max() <= 4 * (sdpa.double() - o64).abs().max() + 1e-6


def test_lse_is_natural_log_and_stable_at_large_logits():
    q = torch.full((1, 1, 8, 4), 300.0)
    v = torch.randn(1, 1, 8, 4)
    _, lse = block_sparse_attention(q, q.clone(), v, ONE_TILE, block_size=8, return_lse=True)
    score = 300.0 * 300.0 * 4 / 2  # q.k * 1/sqrt(4)
    expected = score + torch.log(torch.arange(1, 9, dtype=torch.float64))
    assert torch.allclose(lse[0, 0].double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("block_size", [2**20, 2**24, 2**40])
def test_memory_follows_the_data_not_the_tile_size(block_size):
    """One tile longer than the sequence: same mask as a tile of exactly N."""
    q, k, v = make_qkv(1, 8, 8, 100, 100, 64, seed=3)
    mask = select_blocks(q, k, block_size=block_size)
    assert mask.shape == (1, 8, 1, 1) and bool(mask.all())
    trace = trace_selection(q, k, block_size=block_size)
    assert torch.allclose(trace.q_pooled[:, :, 0], q.mean(2), atol=1e-6)
    o = prism_attention(q, k, v, block_size=block_size)
    assert torch.equal(o, prism_attention(q, k, v, block_size=100))
    ties = boundary_ties(q, k, block_size=block_size)
    assert not bool(ties.any())


def test_huge_tile_with_prefix_pools_two_partial_tiles():
    q, k, _ = make_qkv(1, 1, 1, 30, 100, 16, seed=4)
    # Tile 2**20 holds all 100 positions: one query tile, one key tile.
    trace = trace_selection(q, k, block_size=2**20)
    assert trace.layout.num_query_tiles == 1 and trace.layout.num_key_tiles == 1
    assert torch.allclose(trace.k_pooled[0, 0, 0], k[0, 0].mean(0), atol=1e-6)


def test_meta_tensors_give_shape_only_results():
    q = torch.empty(2, 4, 100, 32, device="meta")
    k = torch.empty(2, 2, 130, 32, device="meta")
    v = torch.empty(2, 2, 130, 16, device="meta")
    mask = select_blocks(q, k, block_size=16)
    assert mask.device.type == "meta" and mask.shape == (2, 4, 8, 9)
    o, lse = prism_attention(q, k, v, block_size=16, return_lse=True)
    assert o.device.type == "meta" and o.shape == (2, 4, 100, 16) and lse.shape == (2, 4, 100)
    # Tiles longer than the tokens (the default 128 over 100 and 130 tokens: pooling
    # takes its per-tile path there, whose bounds come from the host).
    mask = select_blocks(q, k)
    assert mask.device.type == "meta" and mask.shape == (2, 4, 2, 2)  # positions 30-129
    o = prism_attention(q, k, v, PrismConfig.preset("accurate", block_size=256))
    assert o.device.type == "meta" and o.shape == (2, 4, 100, 16)


def test_threshold_one_never_keeps_a_zero_probability_tile():
    # fp32 mass before the last entry is 0.99999988 < 1, and its probability is 0.
    probs = torch.tensor([[0.6, 0.39999988, 0.0]])
    admissible = torch.ones(1, 3, dtype=torch.bool)
    assert torch.cumsum(probs, -1)[0, 1] < 1.0
    for threshold in (1.0, 0.99999999):
        keep, _ = top_p_select(probs, admissible, threshold)
        assert keep.tolist() == [[True, True, False]], threshold
    # A sum that reaches 1.0 in fp32 before the tail still keeps the tail.
    probs = torch.tensor([[1.0 - 2**-25, 1e-9, 1e-12]])
    keep, before = top_p_select(probs, admissible, 1.0)
    assert before[0, 2] >= 1.0 and keep.tolist() == [[True, True, True]]


def test_threshold_one_end_to_end_drops_underflowed_tiles():
    # Key tile 0 scores far above the others: their probabilities underflow to 0.
    q = torch.zeros(1, 1, 8, 4)
    k = torch.zeros(1, 1, 8, 4)
    q[..., 0] = 1.0
    k[:, :, :2, 0] = 400.0  # logit gap 200: exp(-200) is 0 in fp32
    trace = trace_selection(q, k, block_size=2, calibrate=False, force_sink=False,
                            force_diagonal=False, high_threshold=1.0, low_threshold=1.0,
                            high_dim=4, low_dim=4)
    zero = (trace.high_probs == 0) & trace.admissible
    assert bool(zero.any())
    assert not bool((trace.mask & zero & (trace.low_probs == 0)).any())


def _issue_case(seed=57):
    """D 16, N 76, tile 8, the same content on every token, base 1e6."""
    gen = torch.Generator().manual_seed(seed)
    content = torch.randn(1, 1, 1, 16, generator=gen).expand(1, 1, 76, 16).contiguous()
    x = apply_rope(content, 1e6)
    return x, x.clone(), dict(block_size=8, low_dim=2, calibrate=False, low_threshold=0.519)


def test_near_equal_probabilities_far_from_the_mass_boundary_are_ties():
    q, k, cfg = _issue_case()
    trace = trace_selection(q, k, **cfg)
    # The last row has ten tiles of probability 0.1 to within 1e-7 in the low band.
    row = trace.low_probs[0, 0, -1]
    assert torch.allclose(row, torch.full_like(row, 0.1), rtol=3e-7)
    ties = boundary_ties(q, k, **cfg)
    expected = torch.from_numpy(oracle_select(q, k, **cfg))
    differ = trace.mask != expected
    assert bool(differ.any()), "float64 and the fp32 reference keep different tiles"
    assert mask_differences(trace.mask, expected, ties).numel() == 0
    # The margin rule alone would not flag them: their mass is far from p.
    far = (trace.low_mass_before - 0.519).abs() > 1e-3
    assert bool((differ & far).any())


def test_boundary_ties_passes_relative_through():
    """``boundary_ties(relative=...)`` reaches the near-equal rule; the default is TIE_RELATIVE."""
    from prism.reference import TIE_MARGIN, TIE_RELATIVE, ties_from_trace

    q, k, _ = make_qkv(1, 2, 1, 256, 256, 32, seed=3)
    trace = trace_selection(q, k, block_size=16)
    default = boundary_ties(q, k, block_size=16)
    assert torch.equal(default, boundary_ties(q, k, block_size=16, relative=TIE_RELATIVE))
    assert torch.equal(default, ties_from_trace(trace, TIE_MARGIN, TIE_RELATIVE))
    # A wide relative margin flags probabilities near the cut's neighbours.
    wide = boundary_ties(q, k, block_size=16, relative=0.5)
    assert torch.equal(wide, ties_from_trace(trace, TIE_MARGIN, 0.5))
    assert int(wide.sum()) > int(default.sum())
    assert not bool((default & ~wide).any())


@pytest.mark.parametrize("seed", [1, 45, 55, 59])
def test_widened_rule_covers_more_seeds(seed):
    q, k, cfg = _issue_case(seed)
    ties = boundary_ties(q, k, **cfg)
    expected = torch.from_numpy(oracle_select(q, k, **cfg))
    assert mask_differences(select_blocks(q, k, **cfg), expected, ties).numel() == 0


def test_identical_key_tiles_are_exact_ties_decided_by_index():
    """Copies of one key tile have equal probabilities everywhere: no tie flags."""
    gen = torch.Generator().manual_seed(2)
    tile = torch.randn(1, 1, 4, 8, generator=gen)
    k = tile.repeat(1, 1, 6, 1)  # six identical key tiles of 4 tokens
    q = torch.randn(1, 1, 4, 8, generator=gen)
    cfg = dict(block_size=4, force_sink=False, high_threshold=0.4, low_threshold=0.4)
    trace = trace_selection(q, k, causal=False, **cfg)
    assert torch.equal(trace.high_probs, trace.high_probs[..., :1].expand_as(trace.high_probs))
    # Each tile has probability 1/6: masses 0, 1/6, 2/6 < 0.4 keep the first three.
    assert trace.mask[0, 0, 0].tolist() == [True, True, True, False, False, False]
    assert not bool(boundary_ties(q, k, causal=False, **cfg).any())


def test_a_near_copy_among_identical_tiles_makes_them_ties():
    gen = torch.Generator().manual_seed(2)
    tile = torch.randn(1, 1, 4, 8, generator=gen)
    k = tile.repeat(1, 1, 6, 1)
    k[0, 0, 20, 1] += 1e-6  # tile 5 now differs in the last bits of both bands
    q = torch.randn(1, 1, 4, 8, generator=gen)
    cfg = dict(block_size=4, force_sink=False, high_threshold=0.4, low_threshold=0.4)
    ties = boundary_ties(q, k, causal=False, **cfg)
    assert bool(ties[0, 0, 0, 5]) and bool(ties[0, 0, 0, 2])


def test_threshold_one_ties_are_only_underflowed_tiles():
    """At p = 1 the masses decide nothing: only fp32 underflow may differ (float64 keeps it)."""
    from prism.reference import ties_from_trace
    from prism.reference.golden_cases import CASES, make_inputs

    case = next(c for c in CASES if c.name == "threshold_one")
    q, k, _ = make_inputs(case)
    trace = trace_selection(q, k, **case.config)
    ties = ties_from_trace(trace)
    tiny = torch.finfo(torch.float32).tiny
    underflow = (trace.high_probs < tiny) | (trace.low_probs < tiny)
    assert bool(ties.any()) and not bool((ties & ~underflow).any())
    # Tail tiles whose fp32 running sum already reached 1 are kept, and are no ties.
    tail = (trace.low_mass_before >= 1.0) & (trace.low_probs >= tiny) & trace.admissible
    assert bool(tail.any()) and bool(trace.mask[tail].all()) and not bool(ties[tail].any())
    expected = torch.from_numpy(oracle_select(q, k, **case.config))
    assert mask_differences(trace.mask, expected, ties).numel() == 0
