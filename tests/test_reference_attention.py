"""prism.reference.block_sparse_attention and prism_attention against contract §7."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import (
    TOLERANCE,
    assert_attention_close,
    make_qkv,
    oracle_attention,
    relative_error,
)
from prism.reference import (
    block_sparse_attention,
    indices_to_mask,
    mask_to_indices,
    prism_attention,
    select_blocks,
    tile_layout,
)

FP32 = TOLERANCE[torch.float32]


@st.composite
def attention_cases(draw):
    block_size = draw(st.sampled_from([16, 32, 64]))
    kv_heads = draw(st.sampled_from([1, 2]))
    causal = draw(st.booleans())
    nk = draw(st.integers(1, 4 * block_size))
    nq = draw(st.integers(1, nk)) if causal else draw(st.integers(1, 3 * block_size))
    return dict(batch=draw(st.sampled_from([1, 2])), kv_heads=kv_heads,
                q_heads=kv_heads * draw(st.sampled_from([1, 2])), nq=nq, nk=nk,
                head_dim=draw(st.sampled_from([32, 64])), block_size=block_size,
                causal=causal, seed=draw(st.integers(0, 2**16)),
                value_dim=draw(st.sampled_from([None, 16])),
                density=draw(st.floats(0.0, 1.0)))


def _random_mask(case, gen):
    layout = tile_layout(case["nq"], case["nk"], case["block_size"], case["causal"])
    shape = (case["batch"], case["q_heads"], layout.num_query_tiles, layout.num_key_tiles)
    return torch.rand(shape, generator=gen) < case["density"]


@given(case=attention_cases())
@example(case=dict(batch=1, kv_heads=1, q_heads=2, nq=1, nk=50, head_dim=32, block_size=16,
                   causal=True, seed=0, value_dim=None, density=0.5))
@example(case=dict(batch=1, kv_heads=2, q_heads=4, nq=40, nk=100, head_dim=64, block_size=32,
                   causal=True, seed=1, value_dim=16, density=0.6))
def test_any_mask_equals_token_level_masked_softmax(case):
    q, k, v = make_qkv(case["batch"], case["q_heads"], case["kv_heads"], case["nq"],
                       case["nk"], case["head_dim"], seed=case["seed"], causal=case["causal"],
                       value_dim=case["value_dim"])
    mask = _random_mask(case, torch.Generator().manual_seed(case["seed"]))
    o, lse = block_sparse_attention(q, k, v, mask, block_size=case["block_size"],
                                    causal=case["causal"], return_lse=True)
    o_ref, lse_ref = oracle_attention(q, k, v, mask, block_size=case["block_size"],
                                      causal=case["causal"])
    assert relative_error(o, o_ref) <= FP32
    # Contract §10's bounds on o and lse; -inf exactly where nothing is read.
    assert_attention_close(o, lse, o_ref, lse_ref, q, k, v)
    finite = torch.isfinite(lse_ref)
    assert torch.all(o[~finite] == 0)


@pytest.mark.parametrize("nq,nk,bs", [(256, 256, 64), (100, 300, 64), (1, 77, 16), (37, 37, 128)])
@pytest.mark.parametrize("groups", [1, 3])
def test_all_true_mask_equals_dense_causal_sdpa(nq, nk, bs, groups):
    q, k, v = make_qkv(2, 2 * groups, 2, nq, nk, 64, seed=nq + nk)
    layout = tile_layout(nq, nk, bs, True)
    mask = torch.ones(2, 2 * groups, layout.num_query_tiles, layout.num_key_tiles,
                      dtype=torch.bool)
    o = block_sparse_attention(q, k, v, mask, block_size=bs)
    # Bottom-right causal alignment: query r sees keys n <= nk - nq + r.
    allowed = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)
    expected = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(groups, 1),
                                              v.double().repeat_interleave(groups, 1),
                                              attn_mask=allowed)
    assert relative_error(o, expected) <= FP32


def test_non_causal_all_true_equals_dense_sdpa():
    q, k, v = make_qkv(1, 4, 2, 90, 130, 32, causal=False, seed=3)
    mask = torch.ones(1, 4, 2, 3, dtype=torch.bool)
    o = block_sparse_attention(q, k, v, mask, block_size=64, causal=False)
    expected = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                              v.double().repeat_interleave(2, 1))
    assert relative_error(o, expected) <= FP32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    q, k, v = make_qkv(1, 2, 1, 200, 260, 64, dtype=dtype, seed=8)
    mask = select_blocks(q, k, block_size=64)
    o, lse = block_sparse_attention(q, k, v, mask, block_size=64, return_lse=True)
    assert o.dtype == dtype and lse.dtype == torch.float32
    o_ref, _ = oracle_attention(q, k, v, mask, block_size=64)
    assert relative_error(o, o_ref) <= TOLERANCE[dtype]


def test_chunked_prefill_rows_equal_full_rows():
    """Rows of a chunk after a KV prefix equal the same rows of the full computation."""
    q, k, v = make_qkv(1, 4, 2, 500, 500, 64, seed=21)
    bs = 64
    full_mask = select_blocks(q, k, block_size=bs)
    o_full, lse_full = block_sparse_attention(q, k, v, full_mask, block_size=bs,
                                              return_lse=True)
    for start in (100, 192, 499):  # a prefix that is and is not a tile multiple
        q_chunk = q[:, :, start:]
        first_tile = start // bs
        chunk_mask = full_mask[:, :, first_tile:]
        o, lse = block_sparse_attention(q_chunk, k, v, chunk_mask, block_size=bs,
                                        return_lse=True)
        assert relative_error(o, o_full[:, :, start:]) <= FP32
        assert torch.allclose(lse, lse_full[:, :, start:], atol=1e-5)


def test_rows_with_no_key_give_zero_and_minus_inf():
    q, k, v = make_qkv(1, 2, 1, 64, 64, 32, causal=False, seed=2)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[:, :, 1, 0] = True  # only the second query tile reads anything
    o, lse = block_sparse_attention(q, k, v, mask, block_size=32, causal=False,
                                    return_lse=True)
    assert torch.all(o[:, :, :32] == 0) and torch.all(lse[:, :, :32] == -math.inf)
    assert torch.isfinite(lse[:, :, 32:]).all() and not torch.isnan(o).any()


def test_mask_may_broadcast_over_batch_and_heads():
    q, k, v = make_qkv(2, 4, 2, 128, 128, 32, seed=6)
    tile_mask = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    broadcast = block_sparse_attention(q, k, v, tile_mask, block_size=32)
    explicit = block_sparse_attention(q, k, v, tile_mask.expand(2, 4, 4, 4).clone(),
                                      block_size=32)
    assert torch.equal(broadcast, explicit)


def test_custom_scale():
    q, k, v = make_qkv(1, 1, 1, 64, 64, 32, seed=2)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    o = block_sparse_attention(q, k, v, mask, block_size=32, scale=0.3)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              is_causal=True, scale=0.3)
    assert relative_error(o, expected) <= FP32


def test_prism_attention_is_select_then_attend():
    q, k, v = make_qkv(1, 4, 2, 300, 420, 64, seed=17, sharpness=2.0)
    o, lse, mask = prism_attention(q, k, v, block_size=64, return_lse=True, return_mask=True)
    assert torch.equal(mask, select_blocks(q, k, block_size=64))
    o2, lse2 = block_sparse_attention(q, k, v, mask, block_size=64, return_lse=True)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    only_o = prism_attention(q, k, v, block_size=64)
    assert torch.equal(only_o, o)
    o3, mask3 = prism_attention(q, k, v, block_size=64, return_mask=True)
    assert torch.equal(o3, o) and torch.equal(mask3, mask)


def test_full_threshold_prism_equals_dense_attention():
    q, k, v = make_qkv(1, 2, 1, 256, 256, 64, seed=4)
    o = prism_attention(q, k, v, block_size=64, high_threshold=1.0, low_threshold=1.0)
    expected = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                              v.double().repeat_interleave(2, 1),
                                              is_causal=True)
    assert relative_error(o, expected) <= FP32


def test_empty_queries_give_empty_outputs():
    q = torch.zeros(1, 2, 0, 32)
    k, v = torch.randn(1, 1, 10, 32), torch.randn(1, 1, 10, 32)
    o, lse = prism_attention(q, k, v, block_size=4, return_lse=True)
    assert o.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)


@given(mask=st.lists(st.lists(st.booleans(), min_size=1, max_size=9), min_size=1,
                     max_size=6).filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_mask_to_indices_round_trip(mask):
    m = torch.tensor(mask, dtype=torch.bool)
    num, idx = mask_to_indices(m)
    assert num.dtype == torch.int32 and idx.dtype == torch.int32
    for i, row in enumerate(mask):
        selected = [j for j, on in enumerate(row) if on]
        assert num[i].item() == len(selected)
        assert idx[i, : len(selected)].tolist() == selected
        assert idx[i, len(selected):].tolist() == [-1] * (len(row) - len(selected))
    assert torch.equal(indices_to_mask(num, idx, m.shape[-1]), m)


def test_lse_tolerance_uses_the_reference_lse_magnitude():
    """Contract §10: tol_lse = rtol32 * (1 + L + max|lse_ref|), max over lse_ref's finite entries.

    With q = 0 the logit bound L is 0 while every lse_ref is ln(Nk), so a bound
    that put L in place of max|lse_ref| would be ln(Nk) + 1 times too tight.
    """
    from prism.reference.tolerances import lse_magnitude

    nk = 64
    gen = torch.Generator().manual_seed(0)
    q = torch.zeros(1, 1, 4, 8)
    k = torch.randn(1, 1, nk, 8, generator=gen)
    v = torch.randn(1, 1, nk, 8, generator=gen)
    full = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    out, lse = block_sparse_attention(q, k, v, full, block_size=64, causal=False,
                                      return_lse=True)
    assert torch.allclose(lse.double(), torch.full((1, 1, 4), math.log(nk),
                                                   dtype=torch.float64))
    bound = 1e-5 * (1 + 0 + math.log(nk))  # the contract's, with L = 0
    inside, outside = 0.6 * bound, 1.4 * bound
    assert inside > 1e-5 * (1 + 0)  # what L in place of max|lse_ref| would allow
    assert_attention_close(out, lse + inside, out, lse, q, k, v)
    with pytest.raises(AssertionError, match="lse error"):
        assert_attention_close(out, lse + outside, out, lse, q, k, v)
    # Rows of -inf (no key read) do not count in max|lse_ref|.
    assert lse_magnitude(torch.tensor([-math.inf, -3.0, 2.0])) == 3.0
    assert lse_magnitude(torch.tensor([-math.inf, -math.inf])) == 0.0
    assert lse_magnitude(torch.zeros(0)) == 0.0
