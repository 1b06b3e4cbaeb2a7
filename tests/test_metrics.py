"""prism.metrics: density, query-tile mass and recall against brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_qkv
from prism.metrics import (
    query_tile_mass,
    recall_from_mass,
    selection_density,
    tile_counts,
    tile_density,
)
from prism.reference import tile_layout
from prism.reference.mean_pooling import mean_pooling_select
from prism.theory import attention_recall, causal_density, kept_attention_mass


def _brute_mass(q, k, bs, scale, causal):
    """Softmax probabilities by a dense float64 pass, summed into tiles by a loop."""
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    kr = k.double().repeat_interleave(hq // hkv, 1)
    scores = (q.double() @ kr.transpose(-1, -2)) * scale
    start = nk - nq if causal else 0
    if causal:
        pos = torch.arange(start, nk)
        scores = scores.masked_fill(torch.arange(nk)[None, :] > pos[:, None], -math.inf)
    probs = scores.softmax(-1)
    first = start // bs
    mass = torch.zeros(b, hq, (start + nq - 1) // bs - first + 1, -(-nk // bs),
                       dtype=torch.float64)
    for r in range(nq):
        for n in range(nk):
            mass[:, :, (start + r) // bs - first, n // bs] += probs[:, :, r, n]
    return mass, probs


@pytest.mark.parametrize("shape", [(1, 4, 2, 64, 64, 16, True), (2, 3, 1, 37, 90, 8, True),
                                   (1, 2, 2, 30, 41, 8, False)])
def test_query_tile_mass_and_recall_match_brute_force(shape):
    b, hq, hkv, nq, nk, bs, causal = shape
    q, k, _ = make_qkv(b, hq, hkv, nq, nk, 16, seed=nk, sharpness=2.0, causal=causal)
    mass = query_tile_mass(q, k, bs, causal=causal, scale=0.3)
    expected, probs = _brute_mass(q, k, bs, 0.3, causal)
    assert mass.dtype == torch.float32
    assert torch.allclose(mass.double(), expected, atol=1e-5)
    mass64 = query_tile_mass(q, k, bs, causal=causal, scale=0.3, dtype=torch.float64)
    assert torch.allclose(mass64, expected, atol=1e-12)
    mask = mean_pooling_select(q, k, 0.5, block_size=bs, causal=causal)
    layout = tile_layout(nq, nk, bs, causal)
    rows = (torch.arange(nq) + layout.query_start) // bs - layout.first_query_tile
    kept = mask[:, :, rows][..., torch.arange(nk) // bs]  # (B, H, Nq, Nk)
    brute = (probs * kept).sum(dim=(-2, -1)) / nq  # (B, H)
    recall = recall_from_mass(mask, mass, nq)
    assert recall.shape == (b, hq) and recall.dtype == torch.float64
    assert torch.allclose(recall, brute, atol=1e-5)
    assert torch.allclose(recall_from_mass(torch.ones_like(mask), mass, nq),
                          torch.ones(b, hq, dtype=torch.float64), atol=1e-5)
    assert float(brute.mean()) < 0.999
    with pytest.raises(ValueError, match="tiles"):
        recall_from_mass(mask[..., :1], mass, nq)


def test_theory_recall_is_the_metrics_recall():
    """prism.theory's q/k helper and its per-query mass agree with the shared definition."""
    q, k, _ = make_qkv(1, 2, 1, 96, 96, 16, seed=4, sharpness=2.0)
    mask = mean_pooling_select(q, k, 0.6, block_size=16)
    recall = attention_recall(q, k, mask, block_size=16)
    mass = query_tile_mass(q, k, 16, dtype=torch.float64)
    assert torch.allclose(recall, recall_from_mass(mask, mass, 96), rtol=1e-12)
    probs = torch.softmax(
        ((q.double() @ k.double().transpose(-1, -2)) / 4).masked_fill(
            torch.ones(96, 96, dtype=torch.bool).triu(1), -math.inf), dim=-1)
    per_query = kept_attention_mass(probs, mask, block_size=16)
    assert torch.allclose(per_query.mean(dim=-1), recall, rtol=1e-9)


def test_density_counts_admissible_pairs_only():
    layout = tile_layout(40, 64, 16, causal=True)  # query tiles 1..3 of key tiles 0..3
    mask = torch.ones(2, 3, 3, 4, dtype=torch.bool)
    selected, admissible = tile_counts(mask, layout, causal=True)
    assert admissible == 2 + 3 + 4  # j <= i for absolute query tiles 1, 2, 3
    assert selected.tolist() == [[9, 9, 9]] * 2
    mask[1, 2] = False
    mask[1, 2, :, 0] = True
    density = tile_density(mask, layout)
    assert density[0].tolist() == [1.0, 1.0, 1.0]
    assert density[1, 2].item() == pytest.approx(3 / 9)
    noncausal = tile_layout(40, 64, 16, causal=False)
    assert tile_counts(torch.ones(1, 1, 3, 4, dtype=torch.bool), noncausal, False)[1] == 12
    # The pooled density weighs every tile pair equally.
    other = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    pooled = selection_density([mask, other], [layout, layout])
    assert pooled == pytest.approx((9 * 5 + 3) / (9 * 7))
    # The theory's wrapper is the same density.
    assert torch.equal(causal_density(mask, num_queries=40, num_keys=64, block_size=16),
                       density)
    with pytest.raises(ValueError, match="block_mask"):
        tile_density(mask[..., :2], layout)
