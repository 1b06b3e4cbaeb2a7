"""prism.integrations.masked_sdpa and prism.integrations.flex against the reference.

Both run Prism's block-sparse attention through another library (torch SDPA
on an expanded token mask, FlexAttention on a ``BlockMask``) and must give
what :func:`prism.reference.block_sparse_attention` gives.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import make_qkv, oracle_attention, relative_error
from prism.integrations.flex import to_block_mask
from prism.integrations.masked_sdpa import masked_sdpa_attention
from prism.reference import (
    block_sparse_attention,
    mask_to_indices,
    select_blocks,
    tile_layout,
    token_mask,
)

# --------------------------------------------------------------------------
# masked SDPA
# --------------------------------------------------------------------------

MASK_CASES = [
    # (batch, q_heads, kv_heads, nq, nk, block, causal)
    (2, 4, 2, 100, 100, 16, True),
    (1, 4, 1, 40, 77, 16, True),   # prefix 37: first query tile partial
    (1, 2, 2, 50, 64, 16, False),
    (1, 2, 1, 1, 33, 16, True),    # one query
    (2, 2, 2, 16, 16, 16, True),   # one tile
    (1, 3, 1, 30, 200, 8, True),   # long prefix
]


@pytest.mark.parametrize("case", MASK_CASES)
def test_masked_sdpa_matches_reference(case):
    b, hq, hkv, nq, nk, bs, causal = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, 32, seed=nq, causal=causal, value_dim=24)
    mask = select_blocks(q, k, block_size=bs, causal=causal, high_threshold=0.6,
                         low_threshold=0.6, force_sink=False, force_diagonal=False)
    mask[0, 0, -1] = False  # a tile row that reads nothing: contract §7 wants zeros
    expected = block_sparse_attention(q, k, v, mask, block_size=bs, causal=causal, scale=0.3)
    out = masked_sdpa_attention(q, k, v, mask, block_size=bs, causal=causal, scale=0.3)
    assert relative_error(out, expected) < 1e-5
    assert torch.equal(out[0, 0, -1], torch.zeros_like(out[0, 0, -1]))
    oracle = oracle_attention(q, k, v, mask, block_size=bs, causal=causal, scale=0.3)
    oracle = oracle[0] if isinstance(oracle, tuple) else oracle
    assert relative_error(out, torch.as_tensor(oracle)) < 1e-5


def test_masked_sdpa_broadcast_mask_and_half_precision():
    q, k, v = make_qkv(2, 4, 2, 64, 64, 32, dtype=torch.float16, seed=3)
    mask = select_blocks(q, k, block_size=16, high_threshold=0.5, low_threshold=0.5)[:1, :1]
    out = masked_sdpa_attention(q, k, v, mask, block_size=16)
    expected = block_sparse_attention(q, k, v, mask, block_size=16)
    assert out.dtype == torch.float16
    assert relative_error(out, expected) < 2e-3


def test_masked_sdpa_validates_like_the_reference():
    q, k, v = make_qkv(1, 2, 2, 32, 32, 16)
    with pytest.raises(ValueError, match="block_mask must have shape"):
        masked_sdpa_attention(q, k, v, torch.ones(1, 2, 3, 3, dtype=torch.bool), block_size=16)
    with pytest.raises(TypeError, match="bool"):
        masked_sdpa_attention(q, k, v, torch.ones(1, 2, 2, 2), block_size=16)
    with pytest.raises(ValueError, match="Nq <= Nk"):
        masked_sdpa_attention(q, k[:, :, :16], v[:, :, :16],
                              torch.ones(1, 2, 2, 1, dtype=torch.bool), block_size=16)


def test_masked_sdpa_memory_is_bounded_by_the_sequence_not_the_tile(monkeypatch):
    """A tile far larger than the sequence builds token masks of (rows x Nk) only."""
    import prism.integrations.masked_sdpa as module

    q, k, v = make_qkv(1, 2, 1, 40, 56, 16, seed=3)
    bs = 2**15  # one tile; expanding it to bs x bs tokens would take 1 GiB of bools
    mask = torch.ones(1, 2, 1, 1, dtype=torch.bool)
    shapes = []
    real_token_mask = module.token_mask

    def spy(*args, **kwargs):
        result = real_token_mask(*args, **kwargs)
        shapes.append(tuple(result.shape))
        return result

    monkeypatch.setattr(module, "token_mask", spy)
    out = masked_sdpa_attention(q, k, v, mask, block_size=bs)
    assert shapes and all(rows <= 40 and keys <= 56 for *_, rows, keys in shapes)
    assert relative_error(out, block_sparse_attention(q, k, v, mask, block_size=bs)) < 1e-5


# --------------------------------------------------------------------------
# FlexAttention
# --------------------------------------------------------------------------

FLEX_CASES = [
    (2, 4, 2, 100, 100, 16, True),
    (1, 4, 1, 40, 77, 16, True),    # prefix 37: flex blocks straddle two Prism tiles
    (1, 2, 2, 50, 64, 16, False),
    (1, 2, 1, 1, 33, 16, True),
    (1, 2, 2, 48, 80, 16, True),    # prefix 32: aligned grids, full blocks
]


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("case", FLEX_CASES)
def test_flex_attention_matches_block_sparse_attention(case, compact):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    b, hq, hkv, nq, nk, bs, causal = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, 32, seed=nk, causal=causal)
    mask = select_blocks(q, k, block_size=bs, causal=causal, high_threshold=0.6,
                         low_threshold=0.6)
    source = mask_to_indices(mask) if compact else mask
    block_mask = to_block_mask(source, nq, nk, block_size=bs, causal=causal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
        out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=0.2, enable_gqa=True,
                                  return_aux=AuxRequest(lse=True))
    expected, lse = block_sparse_attention(q, k, v, mask, block_size=bs, causal=causal,
                                           scale=0.2, return_lse=True)
    assert relative_error(out, expected) < 1e-5
    assert relative_error(aux.lse, lse) < 1e-5


@pytest.mark.parametrize("case", FLEX_CASES)
def test_flex_block_lists_cover_exactly_the_allowed_tokens(case):
    """Listed blocks hold every allowed token; "full" blocks hold only allowed tokens."""
    b, hq, hkv, nq, nk, bs, causal = case
    q, k, _ = make_qkv(b, hq, hkv, nq, nk, 32, seed=nk, causal=causal)
    mask = select_blocks(q, k, block_size=bs, causal=causal, high_threshold=0.6,
                         low_threshold=0.6)
    block_mask = to_block_mask(mask, nq, nk, block_size=bs, causal=causal)
    layout = tile_layout(nq, nk, bs, causal)
    allowed = token_mask(mask, layout, torch.arange(nq), causal)  # (B, H, Nq, Nk)
    n_rows, n_cols = -(-nq // bs), -(-nk // bs)
    padded = torch.zeros(b, hq, n_rows * bs, n_cols * bs, dtype=torch.bool)
    padded[:, :, :nq, :nk] = allowed
    valid = torch.zeros_like(padded)
    valid[:, :, :nq, :nk] = True
    blocks = padded.view(b, hq, n_rows, bs, n_cols, bs)
    any_allowed = blocks.any(dim=(3, 5))
    all_allowed = (blocks | ~valid.view(b, hq, n_rows, bs, n_cols, bs)).all(dim=(3, 5))

    def listed(num, idx):
        out = torch.zeros(b, hq, n_rows, n_cols, dtype=torch.bool)
        for t in range(n_rows):
            for bb in range(b):
                for h in range(hq):
                    out[bb, h, t, idx[bb, h, t, : num[bb, h, t]].long()] = True
        return out

    partial = listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any()
    assert torch.equal(any_allowed & ~(partial | full), torch.zeros_like(any_allowed))
    assert bool((all_allowed | ~full).all())
    if causal and (nk - nq) % bs == 0 and nq > bs:
        assert full.any()  # aligned grids: blocks below the diagonal are full


def test_to_block_mask_validates():
    q, k, _ = make_qkv(1, 2, 2, 32, 32, 16)
    mask = select_blocks(q, k, block_size=16)
    with pytest.raises(TypeError, match="bool tile mask"):
        to_block_mask(mask.float(), 32, 32, block_size=16)
    with pytest.raises(ValueError, match=r"\(B, H, 2, 3\)"):
        to_block_mask(mask, 32, 48, block_size=16)
    with pytest.raises(ValueError, match="num_queries <= num_keys"):
        to_block_mask(mask, 48, 32, block_size=16)
    num, idx = mask_to_indices(mask)
    with pytest.raises(ValueError, match="key tile"):
        to_block_mask((num, idx + 5), 32, 32, block_size=16)
    with pytest.raises(TypeError, match="integer"):
        to_block_mask((num.float(), idx), 32, 32, block_size=16)
