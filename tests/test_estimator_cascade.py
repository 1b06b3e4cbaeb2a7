"""The cascade estimator (docs/estimators.rst, E8): antidiagonal scores on Prism's candidates."""

from __future__ import annotations

import math

import pytest
import torch

from prism.reference import PrismConfig, select_blocks, trace_selection
from prism.reference.estimators import (
    antidiagonal_probabilities,
    candidate_antidiagonal_probabilities,
    last_tile_exact_tiles,
    prism_candidate_tiles,
    vertical_slash_tiles,
)
from prism.reference.scoring import admissible_tiles
from prism.reference.select import forced_tiles
from prism.reference.tiles import tile_layout


def _qk(b=1, hq=4, hkv=2, nq=200, nk=328, d=32, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, hq, nq, d, generator=gen),
            scale * torch.randn(b, hkv, nk, d, generator=gen))


def _cfg(**overrides):
    fields = {"estimator": "cascade", "block_size": 32, "antidiagonal_stride": 8,
              "last_queries": 16, "high_threshold": 0.8, "vertical_slash_threshold": 0.3,
              "candidate_threshold": 0.6}
    return PrismConfig(**{**fields, **overrides})


@pytest.mark.parametrize("nq, nk, causal", [(200, 328, True), (96, 96, False)])
def test_candidates_everywhere_give_the_plain_antidiagonal_bit_for_bit(nq, nk, causal):
    q, k = _qk(nq=nq, nk=nk)
    layout = tile_layout(nq, nk, 32, causal)
    admissible = admissible_tiles(layout, causal, q.device).expand(1, 4, -1, -1)
    plain = antidiagonal_probabilities(q, k, layout, 8, causal)
    assert torch.equal(candidate_antidiagonal_probabilities(q, k, layout, 8, admissible, causal),
                       plain)
    # candidate_threshold 1.0: every admissible tile is a candidate here (no band
    # probability underflows), so the mask is E5's plus the last query tile's
    # exact top tiles at (1 + p) / 2.
    cfg = _cfg(candidate_threshold=1.0)
    assert torch.equal(prism_candidate_tiles(q, k, cfg, causal, trace_selection), admissible)
    last = last_tile_exact_tiles(q, k, layout, 16, (1 + cfg.high_threshold) / 2, causal)
    assert torch.equal(select_blocks(q, k, cfg, causal=causal),
                       select_blocks(q, k, cfg.replace(estimator="antidiagonal_vertical_slash"),
                                     causal=causal) | last)


def test_restricted_probabilities_match_a_direct_computation():
    """Each query group's softmax over its candidate key groups, summed and renormalised."""
    q, k = _qk(hq=2, hkv=1, nq=64, nk=96, d=8, seed=3)
    layout = tile_layout(64, 96, 16, True)
    stride, bs = 4, 16
    gen = torch.Generator().manual_seed(1)
    candidates = (torch.rand(1, 2, layout.num_query_tiles, layout.num_key_tiles,
                             generator=gen) < 0.5)
    candidates |= forced_tiles(layout, True, True, True)
    got = candidate_antidiagonal_probabilities(q, k, layout, stride, candidates, True)
    offset = 96 - 64
    expected = torch.zeros_like(got)
    for h in range(2):
        for i in range(layout.num_query_tiles):
            tile = layout.first_query_tile + i
            row = torch.zeros(layout.num_key_tiles, dtype=torch.float64)
            for g in range(tile * bs // stride, (tile + 1) * bs // stride):
                keys = [gk for gk in range(g + 1) if candidates[0, h, i, gk * stride // bs]]
                scores = torch.tensor([sum(
                    float(q[0, h, g * stride + stride - 1 - t - offset].double()
                          @ k[0, 0, gk * stride + t].double()) for t in range(stride))
                    / (math.sqrt(8) * stride) for gk in keys], dtype=torch.float64)
                for gk, prob in zip(keys, torch.softmax(scores, 0), strict=True):
                    row[gk * stride // bs] += prob
            expected[0, h, i] = (row / row.sum()).float()
    assert torch.allclose(got, expected, atol=1e-6)
    assert not (got[~candidates] != 0).any()
    # Not the plain probabilities restricted and renormalised (query groups weigh alike).
    plain = antidiagonal_probabilities(q, k, layout, stride, True) * candidates
    plain = plain / plain.sum(-1, keepdim=True)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_mask_lies_in_candidates_vertical_slash_and_forced():
    q, k = _qk()
    cfg = _cfg()
    layout = tile_layout(200, 328, 32, True)
    candidates = prism_candidate_tiles(q, k, cfg, True, trace_selection)
    admissible = admissible_tiles(layout, True, q.device)
    assert (candidates & ~admissible).sum() == 0
    assert (admissible & ~candidates).any()  # the restriction prunes something here
    vs = vertical_slash_tiles(q, k, layout, 16, 0.3, True)
    forced = forced_tiles(layout, True, True, True)
    last = last_tile_exact_tiles(q, k, layout, 16, (1 + cfg.high_threshold) / 2, True)
    assert not last[:, :, :-1].any()  # only the last query tile's row
    mask = select_blocks(q, k, cfg)
    assert not (mask & ~(candidates | vs | last | forced)).any()
    assert (mask & candidates & ~vs & ~forced).any()  # the antidiagonal part keeps tiles
    assert not torch.equal(mask, select_blocks(q, k, cfg.replace(
        estimator="antidiagonal_vertical_slash")))


def test_mask_grows_with_the_antidiagonal_and_vertical_slash_thresholds():
    q, k = _qk(seed=5)
    previous = None
    for p in (0.5, 0.7, 0.9, 1.0):
        mask = select_blocks(q, k, _cfg(high_threshold=p))
        assert previous is None or not (previous & ~mask).any()
        previous = mask
    previous = None
    for vs in (0.1, 0.5, 0.9):
        mask = select_blocks(q, k, _cfg(vertical_slash_threshold=vs))
        assert previous is None or not (previous & ~mask).any()
        previous = mask


def test_candidate_threshold_is_validated():
    with pytest.raises(ValueError, match="candidate_threshold must lie in"):
        PrismConfig(candidate_threshold=0.0)
    with pytest.raises(TypeError, match="candidate_threshold must be a float"):
        PrismConfig(candidate_threshold="0.9")
    with pytest.raises(ValueError, match="multiple of"):
        PrismConfig(estimator="cascade", antidiagonal_stride=48)


def test_sweep_counts_candidates_and_selects_as_the_reference():
    from prism.cli import _sweep_settings, build_parser
    from prism.evaluation.sweep import CandidateCounter, method_selection

    args = build_parser().parse_args(["eval", "--task", "sweep", "--points", "cascade=0.85",
                                      "--candidate-threshold", "0.6", "--stride", "8",
                                      "--last-queries", "16", "--vs-threshold", "0.3",
                                      "--block-size", "32"])
    config, selector = method_selection("cascade", 0.85, _sweep_settings(args))
    assert isinstance(selector, CandidateCounter) and selector.density() is None
    assert config == _cfg(high_threshold=0.85, low_threshold=0.85)
    q, k = _qk()
    assert torch.equal(selector(q, k, config), select_blocks(q, k, config))
    candidates = prism_candidate_tiles(q, k, config, True, trace_selection)
    admissible = admissible_tiles(tile_layout(200, 328, 32, True), True, q.device)
    assert selector.density() == pytest.approx(
        candidates.sum().item() / (4 * admissible.sum().item()))
    _, selector = method_selection("antidiagonal_vertical_slash", 0.85, _sweep_settings(args))
    assert selector is None


@pytest.mark.parametrize("nq, nk, bs, last, causal", [
    (200, 328, 32, 16, True),   # KV prefix, key count not a tile multiple
    (96, 96, 32, 40, True),     # more last queries than a tile
    (64, 150, 32, 8, False),
])
def test_last_tile_rule_matches_a_direct_computation(nq, nk, bs, last, causal):
    """E8 step 4 from its definition, in float64: the last queries' exact softmax,
    averaged, summed per key tile, then a greedy top-p by descending mass (index
    order among equals) until the mass before a tile reaches the threshold."""
    q, k = _qk(seed=nq + nk, nq=nq, nk=nk)
    layout = tile_layout(nq, nk, bs, causal)
    threshold = 0.8
    got = last_tile_exact_tiles(q, k, layout, last, threshold, causal)
    assert not got[:, :, :-1].any()
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    rows = min(last, nq)
    offset = nk - nq
    for h in range(hq):
        mass = [0.0] * layout.num_key_tiles
        for r in range(nq - rows, nq):
            visible = [j for j in range(nk) if not causal or j <= r + offset]
            scores = torch.tensor([float(q[0, h, r].double() @ k[0, h // (hq // hkv), j].double())
                                   / math.sqrt(d) for j in visible], dtype=torch.float64)
            for j, prob in zip(visible, torch.softmax(scores, 0).tolist(), strict=True):
                mass[j // bs] += prob / rows
        order = sorted(range(len(mass)), key=lambda j: (-mass[j], j))
        expected, before = set(), 0.0
        for j in order:
            if before < threshold and mass[j] > 0:
                expected.add(j)
            before += mass[j]
        assert set(got[0, h, -1].nonzero().flatten().tolist()) == expected, h
    # It keeps some tiles and drops others here (the test is not vacuous).
    assert 0 < got[:, :, -1].sum() < got.shape[1] * layout.num_key_tiles
