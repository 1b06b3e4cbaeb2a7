"""contract §9: where the paper's code and the contract must agree, and where they differ.

``paper_style_select`` re-states the paper's published procedure from its
description (zero-padded pooling, K repeated per query head, pooled means in
the input dtype, tail-aligned tiles, unstable sort, running-sum threshold).
It is written here for the comparison only; it is not Prism's semantics.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import make_qkv
from prism.reference import band_dims, boundary_ties, mask_differences, select_blocks


def paper_style_select(q, k, block_size=128, high_dim=64, low_dim=96, threshold=0.95):
    b, hq, nq, d = q.shape
    hkv = k.shape[1]

    def pooled(x):
        pad = (-x.shape[2]) % block_size
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(b, x.shape[1], -1, block_size, d).mean(3)

    qb = pooled(q)
    kb = pooled(k.repeat_interleave(hq // hkv, dim=1))
    nqt, nkt = qb.shape[2], kb.shape[2]
    # Tail alignment: the last query tile faces the last key tile.
    causal = torch.arange(nkt)[None, :] <= torch.arange(nqt)[:, None] + (nkt - nqt)
    rms = lambda x: x.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
    masks = []
    for width, high in ((high_dim, True), (low_dim, False)):
        dims = band_dims(d, width, 2, "half")[0] if high else band_dims(d, 2, width, "half")[1]
        tau = (math.sqrt(width / d) * rms(qb[..., dims]) / rms(qb).clamp(min=1e-6)
               * rms(kb[..., dims]) / rms(kb).clamp(min=1e-6))
        logits = qb[..., dims] @ kb[..., dims].transpose(-1, -2) / (math.sqrt(width) * tau)
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")).float(), dim=-1)
        values, order = torch.sort(probs, dim=-1, descending=True)
        keep_sorted = (values.cumsum(-1) - values) < threshold
        masks.append(torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted))
    mask = masks[0] | masks[1]
    mask[..., 0] = True
    rows = torch.arange(nqt)
    mask[:, :, rows, rows + (nkt - nqt)] = True
    return mask


@given(tiles=st.integers(1, 6), heads=st.sampled_from([(2, 1), (4, 2), (3, 3)]),
       block_size=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**16),
       base=st.floats(3.0, 7.0))
def test_masks_equal_paper_procedure_when_no_partial_tiles(tiles, heads, block_size, seed,
                                                           base):
    n = tiles * block_size
    q, k, _ = make_qkv(1, heads[0], heads[1], n, n, 128, base=10 ** base, seed=seed,
                       sharpness=2.0)
    ours = select_blocks(q, k, block_size=block_size)
    theirs = paper_style_select(q, k, block_size=block_size)
    ties = boundary_ties(q, k, block_size=block_size)
    assert mask_differences(ours, theirs, ties).numel() == 0

