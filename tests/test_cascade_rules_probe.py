"""The research rules of ``benchmarks/probes/cascade_rules.py`` (NOTES items 52 and 56).

The probe's results are recorded in the docs (docs/estimator_results.rst), so
its rules are checked here against small hand-worked cases and against the
reference cascade they modify.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "probes"))

import cascade_rules as probe  # noqa: E402

from prism.reference import PrismConfig, select_blocks  # noqa: E402
from prism.reference.scoring import admissible_tiles  # noqa: E402
from prism.reference.select import estimator_mask  # noqa: E402
from prism.reference.tiles import tile_layout  # noqa: E402


@pytest.mark.parametrize("text", ["none", "min_tiles=4", "entropy_p=0.5:0.95",
                                  "prism_count=0.95", "global_p=head", "global_p=layer",
                                  "reduce=lse", "reduce=max", "hybrid=count", "hybrid=rank",
                                  "mix=8:0.5", "last_tile=half", "last_tile=0.97", "no_vs",
                                  "vs_coarse=0.7"])
def test_rule_labels_round_trip(text):
    assert probe.rule_label(probe.parse_rule(text)) == text


@pytest.mark.parametrize("text", ["global_p=row", "reduce=median", "hybrid=both", "mix=0:0.5",
                                  "mix=8:1.5", "prism_count=0", "bogus=1", "vs_coarse=0",
                                  "vs_coarse=1.5"])
def test_bad_rules_are_refused(text):
    with pytest.raises(ValueError):
        probe.parse_rule(text)


def test_global_top_p_spends_the_mass_across_rows():
    # Three rows of mass 1; at p = 0.9 the head keeps 2.7 of 3. Taking the
    # largest values first (1.0, 0.6, 0.5, 0.5, 0.3) the mass before the sixth
    # (0.1) is 2.9 >= 2.7, so it and the zeros are dropped; row 3 keeps 0.9 of
    # its mass, row 2 all of it.
    probs = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.6, 0.3, 0.1]]]])
    keep = probe.global_top_p(probs, 0.9, "head")
    expected = torch.tensor([[[[True, False, False], [True, True, False],
                               [True, True, False]]]])
    assert torch.equal(keep, expected)
    # Row by row, top-p at 0.9 would keep all three tiles of row 3.
    assert keep[0, 0, 2].sum() == 2


def test_global_top_p_layer_scope_pools_the_heads():
    flat = torch.tensor([0.25, 0.25, 0.25, 0.25])
    peaked = torch.tensor([0.97, 0.01, 0.01, 0.01])
    probs = torch.stack([flat, peaked])[None, :, None, :]  # (1, 2 heads, 1 row, 4)
    by_head = probe.global_top_p(probs, 0.9, "head")
    by_layer = probe.global_top_p(probs, 0.9, "layer")
    assert by_head[0, 0].sum() == 4 and by_head[0, 1].sum() == 1
    # Pooled: 0.97 then the four 0.25s reach 1.8 = 0.9 * 2 before any 0.01.
    assert by_layer[0, 0].sum() == 4 and by_layer[0, 1].sum() == 1
    probs2 = torch.stack([flat, torch.tensor([0.5, 0.3, 0.1, 0.1])])[None, :, None, :]
    pooled = probe.global_top_p(probs2, 0.7, "layer")
    # Budget 1.4: 0.5, 0.3, then the four 0.25s: masses before them 0.8, 1.05, 1.3 -> three kept.
    assert pooled[0, 1].tolist()[0] == [True, True, False, False]
    assert pooled[0, 0].sum() == 3


def test_add_min_tiles_takes_per_row_minimums():
    g = torch.Generator().manual_seed(0)
    layout = tile_layout(8 * 32, 8 * 32, 32, True)
    admissible = admissible_tiles(layout, True)
    probs = torch.rand(1, 2, 8, 8, generator=g) * admissible
    mask = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    mask[..., 0] = True
    m = torch.randint(1, 6, (1, 2, 8, 1), generator=g)
    out = probe.add_min_tiles(mask, probs, admissible, m)
    assert torch.equal(out & mask, mask) and not (out & ~admissible).any()
    for h in range(2):
        for row in range(8):
            n_admissible = int(admissible[row].sum())
            want = min(max(int(m[0, h, row, 0]), 1), n_admissible)
            assert int(out[0, h, row].sum()) == want
            added = out[0, h, row] & ~mask[0, h, row]
            if added.any():
                free = admissible[row] & ~mask[0, h, row]
                left = free & ~added
                if left.any():
                    assert probs[0, h, row][added].min() >= probs[0, h, row][left].max()


def _qk(seed=0, n=512, d=32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, n, d, generator=g) * 2
    k = torch.randn(1, 2, n, d, generator=g) * 2
    return q, k


CONFIG = PrismConfig.preset("accurate", block_size=64, high_threshold=0.6,
                            low_threshold=0.6, candidate_threshold=0.9,
                            vertical_slash_threshold=0.2, sampled_weight=0.0)


def test_mix_with_weight_zero_and_none_are_the_plain_cascade():
    q, k = _qk()
    plain = estimator_mask(q, k, CONFIG, True)
    for text in ("none", "mix=8:0"):
        assert torch.equal(probe.RuleSelector(probe.parse_rule(text))(q, k, CONFIG), plain)


def test_prism_count_keeps_at_least_prisms_count_per_row():
    q, k = _qk(1, n=1024)
    plain = estimator_mask(q, k, CONFIG, True)
    out = probe.RuleSelector(probe.parse_rule("prism_count=0.95"))(q, k, CONFIG)
    prism = select_blocks(q, k, CONFIG.replace(estimator="prism", high_threshold=0.95,
                                               low_threshold=0.95)).bool()
    assert torch.equal(out & plain, plain)
    assert (out.sum(-1) >= torch.maximum(prism.sum(-1), plain.sum(-1))).all()
    assert (out.sum(-1) > plain.sum(-1)).any()


def test_hybrids_are_the_plain_cascade_when_its_scores_are_exact():
    """At stride 1 the cascade's scores are the exact masses, so neither split changes it."""
    q, k = _qk(2)
    cfg = CONFIG.replace(antidiagonal_stride=1)
    plain = estimator_mask(q, k, cfg, True)
    for text in ("hybrid=count", "hybrid=rank"):
        assert torch.equal(probe.RuleSelector(probe.parse_rule(text))(q, k, cfg), plain)
    # At the preset's stride the two splits differ from each other.
    q, k = _qk(2, n=1024)
    count, rank = (probe.RuleSelector(probe.parse_rule(t))(q, k, CONFIG)
                   for t in ("hybrid=count", "hybrid=rank"))
    assert not torch.equal(count, rank)


def test_mix_changes_the_mask_and_sampled_alone_differs_from_the_antidiagonal():
    q, k = _qk(3, n=1024)
    plain = estimator_mask(q, k, CONFIG, True)
    half = probe.RuleSelector(probe.parse_rule("mix=8:0.5"))(q, k, CONFIG)
    alone = probe.RuleSelector(probe.parse_rule("mix=8:1"))(q, k, CONFIG)
    assert not torch.equal(half, plain) and not torch.equal(alone, plain)


def test_no_vs_is_the_cascade_without_its_vertical_slash_tiles():
    """The rule drops exactly the tiles only the vertical-slash stage holds."""
    q, k = _qk(4, n=1024)
    plain = estimator_mask(q, k, CONFIG, True)
    out = probe.RuleSelector(probe.parse_rule("no_vs"))(q, k, CONFIG)
    layout = tile_layout(q.shape[2], k.shape[2], CONFIG.block_size, True)
    none = torch.zeros_like(plain)
    expected = estimator_mask(q, k, CONFIG, True,
                              stages={"vertical_slash": lambda *a: none})
    assert torch.equal(out, expected)
    assert torch.equal(out & plain, out) and not torch.equal(out, plain)
    assert out[..., -1, :].sum() > 0 and layout.num_query_tiles == out.shape[2]


@pytest.mark.parametrize("nq,nk,bs", [(512, 512, 64), (300, 700, 64), (256, 1000, 128)])
def test_coarse_vertical_slash_at_one_is_the_fine_rule(nq, nk, bs):
    """At P = 1 every bin with mass is kept, as is every column and offset with mass,
    and a bin's two tile diagonals are those its offsets map to: the same tiles."""
    from prism.reference.estimators import vertical_slash_tiles

    q, k = torch.randn(1, 2, nq, 16), torch.randn(1, 1, nk, 16)
    layout = tile_layout(nq, nk, bs, True)
    fine = vertical_slash_tiles(q, k, layout, 8, 1.0, True)
    coarse = probe.coarse_vertical_slash_tiles(q, k, layout, 8, 1.0, True)
    assert torch.equal(coarse, fine)
    # Below 1 the bins' top-p keeps at most the tiles the full sets keep.
    half = probe.coarse_vertical_slash_tiles(q, k, layout, 8, 0.5, True)
    assert torch.equal(half & fine, half) and half.sum() < fine.sum()


def test_coarse_vertical_slash_keeps_the_heaviest_key_tile_column():
    """A key whose column the last queries all attend lands its whole tile column."""
    torch.manual_seed(5)
    q, k = torch.randn(1, 1, 512, 16), torch.randn(1, 1, 512, 16) * 0.1
    k[0, 0, 200] = q[0, 0, -8:].sum(0) * 4.0      # key 200 sits in tile 3 at bs 64
    layout = tile_layout(512, 512, 64, True)
    out = probe.coarse_vertical_slash_tiles(q, k, layout, 8, 0.3, True)
    admissible = admissible_tiles(layout, True, q.device)
    assert torch.equal(out[0, 0, :, 3], admissible[:, 3])
