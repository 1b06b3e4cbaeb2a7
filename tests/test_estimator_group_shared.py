"""``share_kv_group``: the antidiagonal estimators scored once per GQA group.

The reference's definition (docs/estimators.rst, "GQA-group-shared scoring"),
the configuration and sweep plumbing, and the CUDA path (Triton's interpreter
on the CPU) against the reference.
"""

from __future__ import annotations

import pytest
import torch
from test_optimized_estimators import DEVICE, _assert_masks_agree, _reference_boundary

from prism import optimized, reference
from prism.reference import PrismConfig, select_blocks, tile_layout
from prism.reference.estimators import (
    antidiagonal_probabilities,
    group_mean_queries,
    last_query_distributions,
    vertical_slash_tiles_from_distributions,
)
from prism.reference.registry import top_p_tiles
from prism.reference.select import forced_tiles

SHARED = ("antidiagonal", "antidiagonal_vertical_slash")


def _cfg(estimator, **overrides):
    return PrismConfig(**{"block_size": 32, "estimator": estimator, "antidiagonal_stride": 8,
                          "high_threshold": 0.6, "vertical_slash_threshold": 0.1,
                          "last_queries": 16, **overrides})


def _q_k(hq, hkv, n=256, d=16, seed=0, scale=4.0):
    """Sharpened random q, k (the top-p keeps some tiles and drops others), bf16-exact values."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(1, hq, n, d, generator=gen) * scale).bfloat16().float()
    k = torch.randn(1, hkv, n, d, generator=gen).bfloat16().float()
    return q.to(DEVICE), k.to(DEVICE)


def test_group_mean_queries_is_the_groups_mean_in_the_input_dtype():
    q, _ = _q_k(6, 2)
    for dtype in (torch.float32, torch.bfloat16):
        mean = group_mean_queries(q.to(dtype), 2)
        assert mean.shape == (1, 2, 256, 16) and mean.dtype == dtype
        for j in range(2):
            expected = (q[:, 3 * j] + q[:, 3 * j + 1] + q[:, 3 * j + 2]).double() / 3
            torch.testing.assert_close(mean[:, j].double(), expected.to(dtype).double(),
                                       rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("estimator", SHARED)
def test_shared_mask_is_the_groups_mask_on_every_head(estimator):
    """E1 on the group's mean query, E2 on the group's averaged distributions, per KV head."""
    q, k = _q_k(6, 2)
    cfg = _cfg(estimator, share_kv_group=True)
    shared = select_blocks(q, k, cfg)
    per_head = select_blocks(q, k, cfg.replace(share_kv_group=False))
    layout = tile_layout(256, 256, 32, True)
    probs = antidiagonal_probabilities(group_mean_queries(q, 2), k, layout, 8)
    expected = top_p_tiles(probs, layout, True, 0.6)
    if estimator == "antidiagonal_vertical_slash":
        vertical, slash = last_query_distributions(q, k, layout, 16)
        expected = expected | vertical_slash_tiles_from_distributions(
            vertical.view(1, 2, 3, -1).mean(2), slash.view(1, 2, 3, -1).mean(2), layout, 0.1)
    expected = expected | forced_tiles(layout, True, True, True)
    assert torch.equal(shared, expected.repeat_interleave(3, dim=1))
    # Not vacuous: the group's heads choose differently on their own.
    assert not torch.equal(shared, per_head)
    assert not all(torch.equal(per_head[:, h], per_head[:, 3 * (h // 3)]) for h in range(6))


@pytest.mark.parametrize("estimator", SHARED)
def test_gqa_ratio_one_or_identical_heads_give_the_per_head_mode(estimator):
    cfg = _cfg(estimator, share_kv_group=True)
    q, k = _q_k(2, 2, seed=1)
    assert torch.equal(select_blocks(q, k, cfg), select_blocks(q, k, cfg.replace(
        share_kv_group=False)))
    base, k = _q_k(2, 2, seed=2)
    q = base.repeat_interleave(3, dim=1)  # every group of 3 heads holds one query
    assert torch.equal(select_blocks(q, k, cfg), select_blocks(q, k, cfg.replace(
        share_kv_group=False)))


def test_config_and_sweep_plumbing():
    from prism.cli import _sweep_settings, build_parser
    from prism.evaluation.sweep import method_selection

    for estimator in ("prism", "vertical_slash", "sampled_vertical_slash"):
        with pytest.raises(ValueError, match="share_kv_group=True is not supported"):
            PrismConfig(estimator=estimator, share_kv_group=True)
    with pytest.raises(TypeError, match="share_kv_group must be True or False"):
        PrismConfig(estimator="antidiagonal", share_kv_group=1)
    args = build_parser().parse_args(["eval", "--task", "sweep", "--share-kv-group", "--points",
                                      "antidiagonal_vertical_slash=0.9;prism=0.95"])
    settings = _sweep_settings(args)
    assert settings.share_kv_group
    config, _ = method_selection("antidiagonal_vertical_slash", 0.9, settings)
    assert config.share_kv_group
    config, _ = method_selection("prism", 0.95, settings)  # not an option of Prism's bands
    assert not config.share_kv_group
    args = build_parser().parse_args(["eval", "--task", "sweep"])
    assert not _sweep_settings(args).share_kv_group


@pytest.mark.interpret
@pytest.mark.parametrize("estimator", SHARED)
def test_cuda_path_matches_the_reference(estimator):
    from prism.optimized.api import _select

    q, k = _q_k(4, 2, n=150, seed=3)
    cfg = _cfg(estimator, share_kv_group=True)
    mask, num, idx, _ = _select(q, k, cfg, True, write_indices=True)
    expected = reference.select_blocks(q, k, cfg)
    boundary = _reference_boundary(group_mean_queries(q, 2), k, cfg, True, 1e-4)
    _assert_masks_agree(mask, expected, boundary.repeat_interleave(2, dim=1))
    assert torch.equal(mask, optimized.select_blocks(q, k, cfg))
    assert all(torch.equal(mask[:, h], mask[:, 2 * (h // 2)]) for h in range(4))
    assert torch.equal(num.long(), mask.sum(-1))
    assert torch.equal(idx.long(), reference.mask_to_indices(mask)[1].long())
