"""Opt-in estimators (docs/estimators.rst): config, naive oracles, masks, optimized fallback."""

from __future__ import annotations

import math

import pytest
import torch

from prism.reference import (
    PrismConfig,
    antidiagonal_probabilities,
    last_query_distributions,
    select_blocks,
    tile_layout,
    top_p_select,
    trace_selection,
    vertical_slash_tiles,
)
from prism.reference.scoring import admissible_tiles

ALTERNATIVES = ("antidiagonal", "vertical_slash", "prism_vertical_slash", "subtile",
                "antidiagonal_vertical_slash", "sampled", "sampled_vertical_slash")


def _qk(b=1, hq=4, hkv=2, nq=200, nk=328, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, nq, d, generator=gen), torch.randn(b, hkv, nk, d, generator=gen))


# ---------------------------------------------------------------- configuration


def test_default_is_spec_v1():
    cfg = PrismConfig()
    assert cfg.estimator == "prism"
    q, k = _qk()
    assert torch.equal(select_blocks(q, k, block_size=64),
                       trace_selection(q, k, block_size=64).mask)


@pytest.mark.parametrize("overrides, error, words", [
    ({"estimator": "xattention"}, ValueError, "estimator must be one of"),
    ({"estimator": "antidiagonal", "antidiagonal_stride": 48}, ValueError, "multiple of"),
    ({"estimator": "antidiagonal_vertical_slash", "antidiagonal_stride": 48}, ValueError,
     "multiple of"),
    ({"antidiagonal_stride": 0}, ValueError, "antidiagonal_stride must be >= 1"),
    ({"antidiagonal_stride": 8.0}, TypeError, "antidiagonal_stride must be an int"),
    ({"last_queries": 0}, ValueError, "last_queries must be >= 1"),
    ({"last_queries": True}, TypeError, "last_queries must be an int"),
    ({"estimator": "subtile", "subtile_factor": 3}, ValueError, "subtile_factor"),
    ({"subtile_factor": 0}, ValueError, "subtile_factor must be >= 1"),
    ({"vertical_slash_threshold": 1.5}, ValueError, "vertical_slash_threshold must lie"),
    ({"vertical_slash_threshold": "0.9"}, TypeError, "vertical_slash_threshold must be"),
    ({"estimator": "sampled", "sampled_queries": 3}, ValueError, "multiple of sampled_queries"),
    ({"estimator": "sampled_vertical_slash", "block_size": 64, "sampled_queries": 128},
     ValueError, "multiple of sampled_queries"),
    ({"sampled_queries": 0}, ValueError, "sampled_queries must be >= 1"),
    ({"sampled_queries": 2.0}, TypeError, "sampled_queries must be an int"),
])
def test_bad_estimator_fields(overrides, error, words):
    with pytest.raises(error, match=words):
        PrismConfig(**overrides)


# ---------------------------------------------------------------- naive oracles


def _naive_antidiagonal(q, k, bs, stride, causal, reduce="mean"):
    """Loop-by-loop XAttention scoring on the absolute grid, for tiny inputs.

    A product whose query or key is padding counts as 0 (the grid is zero-filled).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    layout = tile_layout(nq, nk, bs, causal)
    start = layout.query_start
    n_key_groups = -(-nk // stride)
    first_group = layout.first_query_tile * bs // stride
    n_groups_q = layout.num_query_tiles * bs // stride
    out = torch.zeros(b, hq, layout.num_query_tiles, layout.num_key_tiles, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for gq in range(first_group, first_group + n_groups_q):
                positions = [gq * stride + stride - 1 - t for t in range(stride)]
                if not any(start <= p < start + nq for p in positions):
                    continue
                logits = {}
                for gk in range(n_key_groups):
                    if causal and gk > gq:
                        continue
                    products = []
                    for t in range(stride):
                        p, n = positions[t], gk * stride + t
                        real = start <= p < start + nq and n < nk
                        products.append(float(q[bi, h, p - start].double()
                                              @ k[bi, kv, n].double()) / math.sqrt(d)
                                        if real else 0.0)
                    if reduce == "mean":
                        logits[gk] = sum(products) / stride
                    elif reduce == "lse":
                        logits[gk] = math.log(sum(math.exp(x) for x in products) / stride)
                    else:
                        logits[gk] = max(products)
                top = max(logits.values())
                norm = sum(math.exp(v - top) for v in logits.values())
                row = gq * stride // bs - layout.first_query_tile
                for gk, v in logits.items():
                    out[bi, h, row, gk * stride // bs] += math.exp(v - top) / norm
    admissible = admissible_tiles(layout, causal)
    out = out * admissible
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30), layout


@pytest.mark.parametrize("nq, nk, causal", [(200, 328, True), (64, 64, True), (40, 100, False),
                                            (1, 77, True)])
def test_antidiagonal_matches_naive(nq, nk, causal):
    q, k = _qk(nq=nq, nk=nk, d=16, seed=nq)
    expected, layout = _naive_antidiagonal(q, k, 32, 8, causal)
    actual = antidiagonal_probabilities(q, k, layout, 8, causal)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduce", ["lse", "max"])
@pytest.mark.parametrize("nq, nk, causal", [(200, 328, True), (40, 100, False)])
def test_antidiagonal_research_reductions_match_naive(reduce, nq, nk, causal):
    """The probes' ``reduce="lse"`` / ``"max"`` variants (NOTES item 56) against loops."""
    q, k = _qk(nq=nq, nk=nk, d=16, seed=nq + 1)
    expected, layout = _naive_antidiagonal(q, k, 32, 8, causal, reduce)
    actual = antidiagonal_probabilities(q, k, layout, 8, causal, reduce=reduce)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(actual, antidiagonal_probabilities(q, k, layout, 8, causal))


def test_antidiagonal_reductions_agree_at_stride_one_and_refuse_unknown_names():
    q, k = _qk(nq=96, nk=96, d=16)
    layout = tile_layout(96, 96, 32, True)
    mean = antidiagonal_probabilities(q, k, layout, 1, True)
    for reduce in ("lse", "max"):
        torch.testing.assert_close(antidiagonal_probabilities(q, k, layout, 1, True,
                                                              reduce=reduce), mean)
    with pytest.raises(ValueError, match="reduce must be"):
        antidiagonal_probabilities(q, k, layout, 8, True, reduce="median")


def _naive_vertical_slash(q, k, bs, last, threshold, causal):
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    layout = tile_layout(nq, nk, bs, causal)
    rows = min(last, nq)
    mask = torch.zeros(b, hq, layout.num_query_tiles, layout.num_key_tiles, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            vertical = torch.zeros(nk, dtype=torch.float64)
            slash = {}
            for r in range(nq - rows, nq):
                p = layout.query_start + r
                keys = [n for n in range(nk) if not causal or n <= p]
                s = torch.tensor([float(q[bi, h, r].double() @ k[bi, kv, n].double())
                                  for n in keys]) / math.sqrt(d)
                probs = torch.softmax(s, 0) / rows
                for n, pr in zip(keys, probs.tolist(), strict=True):
                    vertical[n] += pr
                    slash[p - n] = slash.get(p - n, 0.0) + pr
            columns, _ = top_p_select(vertical.float(), torch.tensor(True), threshold)
            offsets = sorted(slash)
            keep_o, _ = top_p_select(torch.tensor([slash[o] for o in offsets]).float()[None],
                                     torch.tensor(True), threshold)
            chosen = [o for o, kept in zip(offsets, keep_o[0].tolist(), strict=True) if kept]
            for i, tile in enumerate(layout.query_tile_indices().tolist()):
                for j in range(layout.num_key_tiles):
                    hit = bool(columns[j * bs : (j + 1) * bs].any())
                    hit = hit or any(abs(o - (tile - j) * bs) <= bs - 1 for o in chosen)
                    mask[bi, h, i, j] = hit
    return mask & admissible_tiles(layout, causal), layout


@pytest.mark.parametrize("nq, nk, causal", [(200, 328, True), (96, 96, True), (30, 90, False)])
def test_vertical_slash_matches_naive(nq, nk, causal):
    q, k = _qk(nq=nq, nk=nk, d=16, seed=nq + 1)
    expected, layout = _naive_vertical_slash(q, k, 32, 16, 0.7, causal)
    actual = vertical_slash_tiles(q, k, layout, 16, 0.7, causal)
    assert torch.equal(actual, expected)


def test_last_query_distributions_sum_to_one():
    q, k = _qk()
    layout = tile_layout(200, 328, 64, True)
    vertical, slash = last_query_distributions(q, k, layout, 16, True)
    torch.testing.assert_close(vertical.sum(-1), torch.ones(1, 4))
    torch.testing.assert_close(slash.sum(-1), torch.ones(1, 4))


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("estimator", ALTERNATIVES)
@pytest.mark.parametrize("nq, nk, causal", [(200, 328, True), (128, 128, True), (1, 1, True),
                                            (50, 70, False)])
def test_masks_keep_forced_and_admissible(estimator, nq, nk, causal):
    q, k = _qk(nq=nq, nk=nk)
    mask = select_blocks(q, k, block_size=64, causal=causal, estimator=estimator,
                         antidiagonal_stride=16, high_threshold=0.5, low_threshold=0.5,
                         vertical_slash_threshold=0.5)
    layout = tile_layout(nq, nk, 64, causal)
    admissible = admissible_tiles(layout, causal)
    assert mask.shape == (1, 4, layout.num_query_tiles, layout.num_key_tiles)
    assert not (mask & ~admissible).any()
    assert mask[..., 0].all()
    if causal:
        rows = torch.arange(layout.num_query_tiles)
        assert mask[..., rows, layout.query_tile_indices()].all()


@pytest.mark.parametrize("estimator", ALTERNATIVES)
def test_empty_queries(estimator):
    q, k = _qk(nq=0, nk=100)
    assert select_blocks(q, k, block_size=64, estimator=estimator).shape == (1, 4, 0, 2)


def test_union_contains_both_parts():
    q, k = _qk(nq=512, nk=512)
    common = {"block_size": 64, "high_threshold": 0.6, "low_threshold": 0.6,
              "vertical_slash_threshold": 0.6}
    prism = select_blocks(q, k, **common)
    slash = select_blocks(q, k, estimator="vertical_slash", **{**common, "high_threshold": 0.6})
    union = select_blocks(q, k, estimator="prism_vertical_slash", **common)
    assert torch.equal(union, prism | slash)


def _antidiagonal_vertical_slash_oracle(q, k, bs, stride, last, high, vs, causal):
    """The union built from the naive oracles, plus forced tiles, inside the admissible set."""
    probs, layout = _naive_antidiagonal(q, k, bs, stride, causal)
    admissible = admissible_tiles(layout, causal)
    keep, _ = top_p_select(probs.float(), admissible, high)
    slash, _ = _naive_vertical_slash(q, k, bs, last, vs, causal)
    forced = torch.zeros_like(admissible)
    if layout.num_key_tiles:
        forced[:, 0] = True
        if causal:
            forced[torch.arange(layout.num_query_tiles), layout.query_tile_indices()] = True
    return ((keep & (probs > 0)) | slash | forced) & admissible


@pytest.mark.parametrize("nq, nk, causal", [(200, 328, True), (96, 96, True), (30, 90, False)])
def test_antidiagonal_vertical_slash_matches_naive_union(nq, nk, causal):
    q, k = _qk(nq=nq, nk=nk, d=16, seed=nq + 2)
    expected = _antidiagonal_vertical_slash_oracle(q, k, 32, 8, 16, 0.6, 0.4, causal)
    actual = select_blocks(q, k, block_size=32, causal=causal,
                           estimator="antidiagonal_vertical_slash", antidiagonal_stride=8,
                           last_queries=16, high_threshold=0.6, vertical_slash_threshold=0.4)
    assert actual.dtype == torch.bool
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("high, vs", [(0.5, 0.3), (0.3, 0.8), (0.9, 0.5)])
@pytest.mark.parametrize("nq, nk, causal", [(512, 512, True), (300, 700, True),
                                            (200, 300, False)])
def test_antidiagonal_vertical_slash_is_the_union(high, vs, nq, nk, causal):
    """Union of the antidiagonal mask (with forced tiles) and the vertical-slash tiles."""
    q, k = _qk(nq=nq, nk=nk, seed=nq + nk)
    common = {"block_size": 64, "causal": causal, "antidiagonal_stride": 16, "last_queries": 32}
    antidiagonal = select_blocks(q, k, estimator="antidiagonal", high_threshold=high, **common)
    layout = tile_layout(nq, nk, 64, causal)
    slash = vertical_slash_tiles(q, k, layout, 32, vs, causal)
    union = select_blocks(q, k, estimator="antidiagonal_vertical_slash", high_threshold=high,
                          vertical_slash_threshold=vs, **common)
    assert torch.equal(union, antidiagonal | slash)
    # low_threshold plays no part.
    assert torch.equal(union, select_blocks(q, k, estimator="antidiagonal_vertical_slash",
                                            high_threshold=high, low_threshold=0.1,
                                            vertical_slash_threshold=vs, **common))


def _planted_qk():
    """One head, 512 tokens: content that only early queries see, a key the last ones see."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 512, 32, generator=gen) * 0.1
    k = torch.randn(1, 1, 512, 32, generator=gen) * 0.1
    late, early = torch.zeros(32), torch.zeros(32)
    late[5], early[9] = 1.0, 1.0
    q[0, 0, 448:] += 3.0 * late  # the last queries (tile 7 of 64) attend to key 200 (tile 3)
    k[0, 0, 200] = 20.0 * late
    q[0, 0, 256:384] += 3.0 * early  # query tiles 4 and 5 attend to keys 140..149 (tile 2)
    k[0, 0, 140:150] = 20.0 * early
    return q, k


def test_antidiagonal_vertical_slash_keeps_both_planted_patterns():
    """The antidiagonal part finds the early content, the vertical part the late key."""
    q, k = _planted_qk()
    common = {"block_size": 64, "antidiagonal_stride": 16, "last_queries": 64,
              "high_threshold": 0.5}
    antidiagonal = select_blocks(q, k, estimator="antidiagonal", **common)[0, 0]
    slash = vertical_slash_tiles(q, k, tile_layout(512, 512, 64, True), 64, 0.5, True)[0, 0]
    union = select_blocks(q, k, estimator="antidiagonal_vertical_slash",
                          vertical_slash_threshold=0.5, **common)[0, 0]
    assert antidiagonal[4:6, 2].all() and not slash[4, 2]
    assert slash[4:6, 3].all() and not antidiagonal[4:6, 3].any()
    assert union[4:6, 2:4].all()
    assert torch.equal(union, antidiagonal | slash)


def test_antidiagonal_vertical_slash_threshold_defaults_to_high():
    q, k = _qk(nq=256, nk=384)
    common = {"block_size": 64, "estimator": "antidiagonal_vertical_slash",
              "antidiagonal_stride": 16}
    assert torch.equal(select_blocks(q, k, high_threshold=0.7, **common),
                       select_blocks(q, k, high_threshold=0.7, vertical_slash_threshold=0.7,
                                     **common))


def test_antidiagonal_vertical_slash_is_monotone():
    """Raising either threshold can only add tiles; the mask spans from forced to all."""
    q, k = _planted_qk()
    common = {"block_size": 64, "estimator": "antidiagonal_vertical_slash",
              "antidiagonal_stride": 16}
    grid = (0.1, 0.5, 0.9, 0.99, 1.0)
    masks = {(h, v): select_blocks(q, k, high_threshold=h, vertical_slash_threshold=v,
                                   **common)
             for h in grid for v in grid}
    for (h, v), mask in masks.items():
        for (h2, v2), other in masks.items():
            if h2 >= h and v2 >= v:
                assert not (mask & ~other).any(), ((h, v), (h2, v2))
    # Each threshold moves the mask on its own, so the check above is not vacuous.
    assert not torch.equal(masks[(0.1, 0.1)], masks[(1.0, 0.1)])
    assert not torch.equal(masks[(0.1, 0.1)], masks[(0.1, 1.0)])
    layout = tile_layout(512, 512, 64, True)
    forced = torch.zeros(8, 8, dtype=torch.bool)
    forced[:, 0] = True
    forced[torch.arange(8), torch.arange(8)] = True
    assert not (forced & ~masks[(0.1, 0.1)][0, 0]).any()
    assert torch.equal(masks[(1.0, 1.0)][0, 0], admissible_tiles(layout, True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_antidiagonal_vertical_slash_low_precision(dtype):
    q, k = _qk(nq=256, nk=256)
    common = {"block_size": 64, "estimator": "antidiagonal_vertical_slash",
              "antidiagonal_stride": 16, "high_threshold": 0.6, "vertical_slash_threshold": 0.6}
    mask = select_blocks(q.to(dtype), k.to(dtype), **common)
    assert mask.dtype == torch.bool and mask.shape == (1, 4, 4, 4)
    assert not (mask & ~admissible_tiles(tile_layout(256, 256, 64, True), True)).any()


def test_subtile_with_factor_one_is_prism():
    q, k = _qk(nq=300, nk=400)
    for causal in (True, False):
        expected = select_blocks(q, k, block_size=64, causal=causal)
        actual = select_blocks(q, k, block_size=64, causal=causal, estimator="subtile",
                               subtile_factor=1)
        assert torch.equal(actual, expected)


def test_subtile_probabilities_are_sums_of_finer_ones():
    from prism.reference import subtile_band_probabilities

    q, k = _qk(nq=256, nk=256)
    cfg = PrismConfig(block_size=64, estimator="subtile", subtile_factor=4)
    high, low = subtile_band_probabilities(q, k, cfg, True, trace_selection)
    fine = trace_selection(q, k, block_size=16)
    expected = fine.high_probs.reshape(1, 4, 4, 4, 4, 4).sum(dim=(3, 5))
    expected = expected * admissible_tiles(tile_layout(256, 256, 64, True), True)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(high, expected)
    torch.testing.assert_close(low.sum(-1), torch.ones(1, 4, 4))


def test_trace_refuses_estimators_without_bands():
    q, k = _qk()
    for estimator in ("antidiagonal", "antidiagonal_vertical_slash"):
        with pytest.raises(ValueError, match="select_blocks"):
            trace_selection(q, k, estimator=estimator)


def test_vertical_slash_finds_planted_key():
    """A key every late query attends to must be kept for every query tile."""
    torch.manual_seed(3)
    q = torch.randn(1, 1, 512, 32) * 0.1
    k = torch.randn(1, 1, 512, 32) * 0.1
    direction = torch.zeros(32)
    direction[5] = 1.0
    q += 3.0 * direction
    k[0, 0, 200] = 8.0 * direction  # key tile 3 of tile 64
    mask = select_blocks(q, k, block_size=64, estimator="vertical_slash",
                         vertical_slash_threshold=0.5)
    assert mask[0, 0, 3:, 3].all()


def test_optimized_estimators_on_cuda_match_the_reference():
    """On CUDA the optimized API gives the reference's masks for every estimator:
    exactly where it runs the reference selection, up to top-p boundary ties
    where the antidiagonal scores come from the Triton kernel."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from test_optimized_estimators import _assert_masks_agree, _reference_boundary

    from prism import optimized

    q, k = _qk()
    for estimator in ALTERNATIVES:
        cfg = PrismConfig(block_size=64, estimator=estimator)
        expected = select_blocks(q, k, cfg)
        actual = optimized.select_blocks(q.cuda(), k.cuda(), cfg).cpu()
        if estimator.startswith("antidiagonal"):
            _assert_masks_agree(actual, expected, _reference_boundary(q, k, cfg, True, 1e-4))
        else:
            assert torch.equal(actual, expected)


# ---------------------------------------------------------------- sampled queries


def _naive_sampled(q, k, bs, samples, causal):
    """Loop-by-loop sampled-query tile probabilities: the rule of docs/estimators.rst."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    layout = tile_layout(nq, nk, bs, causal)
    start = layout.query_start
    run = bs // samples
    out = torch.zeros(b, hq, layout.num_query_tiles, layout.num_key_tiles, dtype=torch.float64)
    for row in range(layout.num_query_tiles):
        tile = layout.first_query_tile + row
        for t in range(samples):
            positions = [p for p in range(tile * bs + t * run, tile * bs + (t + 1) * run)
                         if start <= p < start + nq]
            if not positions:
                continue
            p = positions[-1]
            keys = [n for n in range(nk) if not causal or n <= p]
            for bi in range(b):
                for h in range(hq):
                    kv = h // (hq // hkv)
                    logits = torch.stack([q[bi, h, p - start].double() @ k[bi, kv, n].double()
                                          for n in keys]) / math.sqrt(d)
                    probs = torch.softmax(logits, 0)
                    for n, value in zip(keys, probs, strict=True):
                        out[bi, h, row, n // bs] += value
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30), layout


@pytest.mark.parametrize("nq, nk, causal, bs, samples", [
    (120, 248, True, 64, 2),   # KV prefix of 128: tile-aligned
    (70, 150, True, 32, 2),    # prefix of 80: the first tile's early runs hold no query
    (40, 100, False, 32, 4),
    (1, 77, True, 16, 4),
])
def test_sampled_matches_naive(nq, nk, causal, bs, samples):
    from prism.reference.estimators import sampled_query_probabilities

    q, k = _qk(nq=nq, nk=nk, d=8, seed=nq + 1)
    expected, layout = _naive_sampled(q, k, bs, samples, causal)
    actual = sampled_query_probabilities(q, k, layout, samples, causal)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-6)


def test_sampled_positions_are_the_last_query_of_each_run():
    from prism.reference.estimators import sampled_query_positions

    # Queries 100..299 (prefix 100), tile 64, 4 runs of 16.
    layout = tile_layout(200, 300, 64, True)
    rows, positions, valid = sampled_query_positions(layout, 4)
    assert positions[0].tolist()[2:] == [111, 127] and valid[0].tolist() == [False, False,
                                                                             True, True]
    # Last tile 256..319 holds queries up to 299: the fourth run (304..319) has none.
    assert positions[-1].tolist()[:3] == [271, 287, 299]
    assert valid[-1].tolist() == [True, True, True, False]
    assert rows[valid].min() >= 0 and rows[valid].max() == 199


def test_sampled_with_every_query_is_exact_attention_mass():
    """samples == block_size: each tile row is the mean exact attention mass of its queries."""
    from prism.reference.estimators import sampled_query_probabilities

    q, k = _qk(nq=128, nk=128, d=16)
    layout = tile_layout(128, 128, 32, True)
    mask_probs = sampled_query_probabilities(q, k, layout, 32, True)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4.0
    scores = scores.masked_fill(torch.ones(128, 128, dtype=torch.bool).triu(1), float("-inf"))
    mass = scores.softmax(-1).reshape(1, 4, 4, 32, 4, 32).sum(dim=(3, 5))
    torch.testing.assert_close(mask_probs, mass / mass.sum(-1, keepdim=True))


def test_sampled_vertical_slash_is_the_union():
    q, k = _qk(nq=256, nk=320)
    q = q * 3.0  # sharper attention: each part keeps some tiles and drops others
    common = {"block_size": 32, "high_threshold": 0.3, "vertical_slash_threshold": 0.1,
              "sampled_queries": 2, "last_queries": 16}
    union = select_blocks(q, k, estimator="sampled_vertical_slash", **common)
    sampled = select_blocks(q, k, estimator="sampled", **common)
    slash = select_blocks(q, k, estimator="vertical_slash",
                          **{**common, "high_threshold": 0.1})
    assert torch.equal(union, sampled | slash)
    assert (union != sampled).any() and (union != slash).any()
