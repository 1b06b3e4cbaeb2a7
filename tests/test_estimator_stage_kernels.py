"""The kernels of the accurate modes' later stages against the reference.

The vertical-slash stage (the last queries' column and diagonal distributions,
their top-p over long rows, the mapping to tiles), the tile top-p, and the
one- and two-pass packed antidiagonal scoring. As in
``test_optimized_estimators.py``, the kernels run in Triton's interpreter on a
machine without CUDA and on the GPU otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from test_optimized_estimators import DEVICE, _qk

from prism.reference import tile_layout, top_p_select
from prism.reference.estimators import antidiagonal_probabilities, vertical_slash_tiles
from prism.reference.scoring import admissible_tiles


@pytest.mark.parametrize("b, hq, hkv, nq, nk, d, last, bs, causal, dtype", [
    (1, 4, 2, 150, 290, 32, 16, 32, True, torch.float32),    # KV prefix, 2 heads/program
    (2, 2, 2, 100, 100, 16, 64, 32, True, torch.float16),    # more last queries than a tile
    (1, 3, 1, 120, 200, 16, 20, 32, False, torch.float32),   # non-causal: negative offsets
    (1, 2, 1, 300, 300, 16, 200, 32, True, torch.float32),   # two row blocks of 128
    (1, 8, 1, 64, 64, 16, 8, 16, True, torch.bfloat16),      # 8 heads in one program
])
def test_last_query_distributions_kernel_matches_reference(b, hq, hkv, nq, nk, d, last, bs,
                                                           causal, dtype):
    from prism.optimized.vertical_slash import last_query_distributions_kernel
    from prism.reference.estimators import last_query_distributions

    q, k = _qk(b, hq, hkv, nq, nk, d, seed=nq + last, dtype=dtype, transposed=nq > 110,
               scale=2.0)
    layout = tile_layout(nq, nk, bs, causal)
    q_before, k_before = q.clone(), k.clone()
    vertical, slash = last_query_distributions_kernel(q, k, layout, last, causal)
    ref_vertical, ref_slash = last_query_distributions(q, k, layout, last, causal)
    assert vertical.shape == ref_vertical.shape and slash.shape == ref_slash.shape
    torch.testing.assert_close(vertical, ref_vertical, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(slash, ref_slash, rtol=1e-5, atol=1e-7)
    # Both are distributions per head (each last query's probabilities sum to 1).
    torch.testing.assert_close(vertical.sum(-1), torch.ones(b, hq, device=q.device))
    torch.testing.assert_close(slash.sum(-1), torch.ones(b, hq, device=q.device))
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


@given(nq=st.integers(1, 90), prefix=st.integers(0, 70), d=st.sampled_from([8, 16, 24]),
       last=st.integers(1, 40), heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
       causal=st.booleans(), seed=st.integers(0, 2**16))
@example(nq=1, prefix=0, d=8, last=1, heads=(1, 1), causal=True, seed=0)
def test_last_query_distributions_kernel_property(nq, prefix, d, last, heads, causal, seed):
    from prism.optimized.vertical_slash import last_query_distributions_kernel
    from prism.reference.estimators import last_query_distributions

    hq, hkv = heads
    nk = nq + prefix
    q, k = _qk(1, hq, hkv, nq, nk, d, seed=seed, scale=1.5)
    layout = tile_layout(nq, nk, 16, causal)
    vertical, slash = last_query_distributions_kernel(q, k, layout, last, causal)
    ref_vertical, ref_slash = last_query_distributions(q, k, layout, last, causal)
    torch.testing.assert_close(vertical, ref_vertical, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(slash, ref_slash, rtol=1e-5, atol=1e-7)


def test_vertical_slash_kernel_finds_planted_columns_and_diagonals():
    """Expected values by construction: head 0 attends to key 5, head 1 to offset 3."""
    from prism.optimized.vertical_slash import last_query_distributions_kernel

    n, d = 96, 16
    q = torch.zeros(1, 2, n, d, device=DEVICE)
    k = torch.zeros(1, 1, n, d, device=DEVICE)
    q[0, 0, :, 0] = 10.0
    k[0, 0, 5, 0] = 10.0                      # one hot column for head 0
    # Head 1: query i matches key i - 3 only (position codes on dims 1..), a slash line.
    codes = torch.nn.functional.one_hot(torch.arange(n) % 12, 12).float().to(DEVICE) * 10.0
    q[0, 1, :, 2:14] = codes
    k[0, 0, :, 2:14] = torch.roll(codes, shifts=-3, dims=0)  # key j: code of j + 3
    layout = tile_layout(n, n, 32, True)
    vertical, slash = last_query_distributions_kernel(q, k, layout, 8, True)
    assert vertical[0, 0].argmax().item() == 5 and vertical[0, 0, 5] > 0.99
    # Offset o sits at index o + Nk - 1; codes repeat every 12, so the causal keys at
    # offsets 3, 15, 27, ... score alike and share the mass.
    lines = slash[0, 1, n - 1 :]
    assert lines[3::12].sum() > 0.99 and lines[3] >= lines[15] > 0.05
    assert lines[torch.arange(lines.numel(), device=DEVICE) % 12 != 3].sum() < 0.01


def test_vertical_slash_kernel_sees_each_heads_own_rows():
    """Four query heads of one KV head in one program: each must keep its own column."""
    from prism.optimized.vertical_slash import last_query_distributions_kernel

    q = torch.zeros(1, 4, 128, 16, device=DEVICE)
    k = torch.zeros(1, 1, 128, 16, device=DEVICE)
    for head in range(4):
        q[0, head, :, head] = 8.0
        k[0, 0, 20 * head + 7, head] = 8.0
    vertical, _ = last_query_distributions_kernel(q, k, tile_layout(128, 128, 32, True), 16,
                                                  True)
    for head in range(4):
        assert vertical[0, head].argmax().item() == 20 * head + 7, head


@pytest.mark.parametrize("call, error, words", [
    (lambda f, q, k, lay: f(q, k, lay, 0, True), ValueError, "last_queries"),
    (lambda f, q, k, lay: f(q, k, lay, 4.0, True), TypeError, "last_queries"),
    (lambda f, q, k, lay: f(q, torch.cat([k, k], 2), lay, 4, True), ValueError, "layout"),
    (lambda f, q, k, lay: f(q, k, lay, 4, 1), TypeError, "causal"),
    (lambda f, q, k, lay: f(q, k.half(), lay, 4, True), (TypeError, ValueError), "dtype"),
])
def test_vertical_slash_kernel_bad_arguments(call, error, words):
    from prism.optimized.vertical_slash import last_query_distributions_kernel

    q, k = _qk(1, 2, 1, 64, 64, 16, seed=0)
    with pytest.raises(error, match=words):
        call(last_query_distributions_kernel, q, k, tile_layout(64, 64, 32, True))


def test_vertical_slash_tile_mask_matches_reference():
    from prism.optimized.vertical_slash import vertical_slash_tile_mask

    q, k = _qk(1, 4, 2, 200, 260, 16, seed=21, scale=3.0)
    layout = tile_layout(200, 260, 32, True)
    actual = vertical_slash_tile_mask(q, k, layout, 16, 0.5, True)
    expected = vertical_slash_tiles(q, k, layout, 16, 0.5, True)
    assert torch.equal(actual, expected)
    assert expected.any() and not expected[admissible_tiles(layout, True, q.device)
                                           .expand_as(expected)].all()


@pytest.mark.parametrize("nq, nk, bs, causal, threshold", [
    (300, 300, 32, True, 0.9),
    (150, 290, 32, True, 0.5),     # KV prefix: rows start at absolute tile 4
    (120, 200, 16, False, 0.7),
    (96, 96, 32, True, 1.0),       # p = 1 keeps exactly the non-zero tiles
])
def test_tile_top_p_kernel_matches_reference(nq, nk, bs, causal, threshold):
    from prism.optimized.estimators import tile_top_p_kernel
    from prism.reference.registry import top_p_tiles

    layout = tile_layout(nq, nk, bs, causal)
    admissible = admissible_tiles(layout, causal, DEVICE)
    gen = torch.Generator().manual_seed(nq + nk)
    logits = torch.randn(2, 3, layout.num_query_tiles, layout.num_key_tiles, generator=gen) * 2
    # Exact ties (the index tie-break decides) and exact zeros (never kept).
    logits[..., 1::3] = logits[..., :1].clone()
    probs = torch.softmax(logits.to(DEVICE).masked_fill(~admissible, float("-inf")), -1)
    probs = torch.nan_to_num(probs, nan=0.0)
    probs[0, 0, :, 2] = 0.0
    probs_before = probs.clone()
    actual = tile_top_p_kernel(probs, layout, causal, threshold)
    expected = top_p_tiles(probs, layout, causal, threshold)
    _, mass_before = top_p_select(probs, admissible, threshold)
    # Entries whose mass before lies within fp32 rounding of p may go either way.
    boundary = ((mass_before - threshold).abs() <= 1e-5) & admissible
    assert actual.dtype == torch.bool and actual.shape == expected.shape
    assert not ((actual != expected) & ~boundary).any()
    assert torch.equal(probs, probs_before)
    assert expected.any() and (admissible.expand_as(expected) & ~expected).any()


@pytest.mark.parametrize("n, threshold", [(5000, 0.5), (3000, 0.9), (100, 1.0), (7, 0.3)])
def test_long_top_p_kernel_matches_reference(n, threshold):
    """The vertical-slash top-p over long rows (several chunks), with ties and zeros."""
    from prism.optimized.vertical_slash import long_top_p_kernel

    gen = torch.Generator().manual_seed(n)
    x = torch.softmax(torch.randn(4, n, generator=gen) * 3, -1)
    x[0, ::7] = x[0, 3]                      # a tie group
    x[1, : n // 2] = 0.0                     # zeros are never kept
    x = x / x.sum(-1, keepdim=True)
    x[2] *= 0.2                              # whole mass below p: every non-zero value
    x[3] = 1.0 / n                           # all tied: the index decides
    x = x.to(DEVICE)
    before = x.clone()
    actual = long_top_p_kernel(x, threshold)
    keep, mass_before = top_p_select(x, torch.ones((), dtype=torch.bool, device=DEVICE),
                                     threshold)
    expected = keep & (x > 0)
    boundary = (mass_before - threshold).abs() <= 1e-5
    assert actual.dtype == torch.bool and actual.shape == x.shape
    assert not ((actual != expected) & ~boundary).any()
    assert torch.equal(x, before)
    if threshold < 1.0:  # the tie row keeps a prefix by index: ceil(p * n) values
        assert actual[3].sum().item() == math.ceil(threshold * n - 1e-4)
        assert actual[3, : int(actual[3].sum())].all()


@pytest.mark.parametrize("threshold", [0.9, 0.99])
def test_long_top_p_kernel_cut_far_below_the_mean(threshold):
    """Rows whose cut lies below their mean value (three quarters of the values carry
    0.4 of the mass and most of them are kept): the search starts its bracket at
    (total - p - 1e-5) / n, which must stay below the cut."""
    from prism.optimized.vertical_slash import long_top_p_kernel

    gen = torch.Generator().manual_seed(5)
    n = 4000
    x = torch.full((2, n), 0.4 / 3000)
    x[:, :1000] = 0.6 / 1000
    x = x * (1 + 0.01 * torch.rand(2, n, generator=gen))
    x[1] = x[1].flip(0)
    x = (x / x.sum(-1, keepdim=True)).to(DEVICE)
    actual = long_top_p_kernel(x, threshold)
    keep, mass_before = top_p_select(x, torch.ones((), dtype=torch.bool, device=DEVICE),
                                     threshold)
    boundary = (mass_before - threshold).abs() <= 1e-5
    assert not ((actual != (keep & (x > 0))) & ~boundary).any()
    assert (actual.sum(-1) > 1000 + 2000 * (threshold > 0.95)).all()


@pytest.mark.parametrize("stride, bs, hq, hkv, nq, nk, causal", [
    (128, 128, 4, 1, 300, 700, True),   # one group per tile, KV prefix
    (64, 128, 4, 2, 256, 256, True),
    (8, 32, 4, 4, 100, 130, False),     # four groups per tile, non-causal
    (8, 128, 4, 1, 200, 300, True),     # sixteen groups per tile, KV prefix
    (16, 128, 4, 1, 200, 300, True),    # eight groups per tile (the preset), KV prefix
])
@pytest.mark.parametrize("one_pass", [0, 1])
def test_packed_one_and_two_pass_match_the_reference(stride, bs, hq, hkv, nq, nk, causal,
                                                     one_pass):
    from prism.optimized.antidiagonal_packed import (
        PackedTuning,
        antidiagonal_packed_probabilities,
    )

    q, k = _qk(1, hq, hkv, nq, nk, 16, seed=stride + nk, scale=2.0)
    layout = tile_layout(nq, nk, bs, causal)
    expected = antidiagonal_probabilities(q, k, layout, stride, causal)
    for tuning in (PackedTuning(one_pass=one_pass),
                   PackedTuning(target_rows=128, block_kg=128, num_warps=8, one_pass=one_pass)):
        actual = antidiagonal_packed_probabilities(q, k, layout, stride, causal, tuning)
        torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("stride, bs, hq, hkv, nq, nk, causal", [
    (4, 32, 4, 2, 256, 256, True),      # causal: blocks left of each program's first group
    (4, 32, 2, 2, 150, 290, True),      # KV prefix, last query tile partial
    # The first program's first real group is 14 (prefix 56): block [0, 16) holds key
    # group 15, inadmissible for that row; unmasking it one group early changes it.
    (4, 32, 2, 2, 200, 256, True),
    (8, 32, 4, 1, 96, 256, False),      # non-causal: every block of a whole tile is full
])
@pytest.mark.parametrize("one_pass", [0, 1])
def test_packed_unmasked_blocks_match_the_reference(stride, bs, hq, hkv, nq, nk, causal,
                                                    one_pass):
    """Key blocks of 16 groups: most of a program's blocks hold only admissible scores
    and take the dense kernel's unmasked step (scale folded into the exponent, row sums
    from the tile sums); the rest take the masked one."""
    from prism.optimized.antidiagonal_packed import (
        PackedTuning,
        antidiagonal_packed_probabilities,
    )

    q, k = _qk(1, hq, hkv, nq, nk, 16, seed=stride + nq, scale=2.0)
    layout = tile_layout(nq, nk, bs, causal)
    expected = antidiagonal_probabilities(q, k, layout, stride, causal)
    tuning = PackedTuning(target_rows=16, block_kg=16, num_warps=4, one_pass=one_pass)
    actual = antidiagonal_packed_probabilities(q, k, layout, stride, causal, tuning)
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_unmasked_blocks_through_descriptors(dtype):
    """16-group key blocks whose rows come through tensor descriptors (tma=1): the
    unmasked and the masked steps on descriptor loads give the reference's scores."""
    from prism.optimized import antidiagonal_packed as ap

    q, k = _qk(1, 4, 2, 256, 256, 16, seed=3, scale=2.0, dtype=dtype)
    layout = tile_layout(256, 256, 32, True)
    tuning = ap.PackedTuning(target_rows=16, block_kg=16, num_warps=4, one_pass=1, tma=1)
    assert ap._tma_applies(q, k, layout, 4, 16, 2, 8, 16)
    expected = antidiagonal_probabilities(q, k, layout, 4, True)
    actual = ap.antidiagonal_packed_probabilities(q, k, layout, 4, True, tuning)
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which, row, dim", [("q", 0, 0), ("q", 63, 15), ("k", 5, 3),
                                             ("k", 127, 15)])
def test_packed_unmasked_blocks_flag_nan_and_inf(value, which, row, dim):
    """Non-causal with whole key blocks: every block takes the unmasked step. NaN and
    +Inf also reach the softmax sums; the other side's column ``dim`` is positive, so
    -Inf makes only -Inf scores, the softmax stays finite, and only the unmasked
    step's check (``sum(raw) * 0`` per row) can flag it."""
    from prism.optimized.antidiagonal_packed import (
        PackedTuning,
        antidiagonal_packed_probabilities,
    )

    q, k = _qk(1, 4, 1, 64, 128, 16, seed=row, scale=2.0)
    other = k if which == "q" else q
    other[..., dim] = other[..., dim].abs() + 0.5
    layout = tile_layout(64, 128, 32, False)
    tuning = PackedTuning(target_rows=16, block_kg=16, num_warps=4, one_pass=1)
    flag = torch.zeros((), dtype=torch.float64, device=q.device)
    antidiagonal_packed_probabilities(q, k, layout, 8, False, tuning, nonfinite=flag)
    assert flag.item() == 0
    (q if which == "q" else k)[0, -1, row, dim] = value
    antidiagonal_packed_probabilities(q, k, layout, 8, False, tuning, nonfinite=flag)
    assert flag.item() != 0


@pytest.mark.parametrize("stride, bs, nq, nk, causal", [
    (8, 32, 128, 128, True),
    (16, 32, 80, 144, True),     # KV prefix of two tiles; the last query tile is partial
    (8, 32, 64, 96, False),
])
def test_packed_descriptor_loads_match_the_reference(stride, bs, nq, nk, causal):
    """Rows loaded through tensor descriptors (tma=1) give the reference's scores."""
    from prism.optimized import antidiagonal_packed as ap

    q, k = _qk(1, 4, 1, nq, nk, 16, seed=stride + nq, scale=2.0, dtype=torch.bfloat16)
    layout = tile_layout(nq, nk, bs, causal)
    tuning = ap.PackedTuning(tma=1)
    assert not ap._tma_applies(q.float(), k.float(), layout, stride, 64, 4, 16, 16)
    rows = max(16, 4 * (bs // stride) * (64 // (4 * (bs // stride))))
    assert ap._tma_applies(q, k, layout, stride, rows, 4, rows // 4, 16)
    expected = antidiagonal_probabilities(q, k, layout, stride, causal)
    actual = ap.antidiagonal_packed_probabilities(q, k, layout, stride, causal, tuning)
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("stride", [8, 16, 32])
def test_packed_tuned_shapes_match_the_reference_on_the_gpu(stride):
    """The tuned launch shapes (``TUNED``: up to 256 key groups a block, tensor
    descriptors, two or three stages) at 8K tokens, 32/8 heads, D 128, bf16: the
    reference's probabilities, and the same bits on every call (a buffer refilled
    while a warp group still reads it would make calls differ)."""
    from prism.optimized.antidiagonal_packed import (
        TUNED,
        antidiagonal_packed_probabilities,
        default_tuning,
    )

    q, k = _qk(1, 32, 8, 8192, 8192, 128, seed=stride, dtype=torch.bfloat16, scale=2.0)
    layout = tile_layout(8192, 8192, 128, True)
    assert default_tuning(128 // stride, 4, 128) == TUNED[128 // stride]
    expected = antidiagonal_probabilities(q, k, layout, stride, True)
    calls = [antidiagonal_packed_probabilities(q, k, layout, stride, True) for _ in range(3)]
    torch.testing.assert_close(calls[0], expected, rtol=2e-5, atol=1e-6)
    for again in calls[1:]:
        assert torch.equal(again, calls[0])
    # As the selection calls it: the NaN/Inf check on, rows left unnormalised.
    flag = torch.zeros((), dtype=torch.float64, device=q.device)
    rows = antidiagonal_packed_probabilities(q, k, layout, stride, True, normalize=False,
                                             nonfinite=flag)
    admissible = expected > 0
    rows = torch.where(admissible, rows, 0.0)
    torch.testing.assert_close(rows / rows.sum(-1, keepdim=True).clamp_min(1e-30), expected,
                               rtol=2e-5, atol=1e-6)
    assert flag.item() == 0


def test_packed_tuning_is_checked():
    from prism.optimized.antidiagonal_packed import (
        PackedTuning,
        antidiagonal_packed_probabilities,
    )

    q, k = _qk(1, 4, 1, 128, 128, 16, seed=0)
    layout = tile_layout(128, 128, 32, True)
    with pytest.raises(ValueError, match="block_kg"):
        antidiagonal_packed_probabilities(q, k, layout, 8, True, PackedTuning(block_kg=48))
    with pytest.raises(ValueError, match="num_warps"):
        antidiagonal_packed_probabilities(q, k, layout, 8, True, PackedTuning(num_warps=0))


def test_long_top_p_kernel_two_row_sets_in_one_launch():
    """Columns and offsets (rows of two lengths) in one launch: each set as if alone."""
    from prism.optimized.vertical_slash import long_top_p_kernel

    gen = torch.Generator().manual_seed(5)
    a = torch.softmax(torch.randn(2, 3, 300, generator=gen) * 3, -1).to(DEVICE)
    b = torch.softmax(torch.randn(2, 3, 1100, generator=gen) * 3, -1).to(DEVICE)
    keep_a, keep_b = long_top_p_kernel(a, 0.6, b)
    assert torch.equal(keep_a, long_top_p_kernel(a, 0.6))
    assert torch.equal(keep_b, long_top_p_kernel(b, 0.6))
    assert keep_a.shape == a.shape and keep_b.shape == b.shape and keep_b.any()


def _distributions(b, hq, nq, nk, layout, causal, seed):
    """Random column and offset distributions shaped as the last queries' (ties, zeros)."""
    gen = torch.Generator().manual_seed(seed)
    n_offsets = layout.query_start + nq + nk - 1
    vertical = torch.softmax(torch.randn(b, hq, nk, generator=gen) * 3, -1)
    slash = torch.softmax(torch.randn(b, hq, n_offsets, generator=gen) * 3, -1)
    vertical[0, 0, ::5] = vertical[0, 0, 1]          # a tie group
    vertical[..., -1, : nk // 3] = 0.0               # zeros are never kept
    if causal:  # negative offsets hold no mass under the causal mask
        slash[..., : nk - 1] = 0.0
    slash = slash / slash.sum(-1, keepdim=True)
    vertical = vertical / vertical.sum(-1, keepdim=True)
    return vertical.to(DEVICE), slash.to(DEVICE)


@pytest.mark.parametrize("nq, nk, bs, causal, threshold, candidates", [
    (300, 300, 32, True, 0.5, 4096),
    (150, 290, 32, True, 0.7, 4096),    # KV prefix: query tiles from absolute tile 4
    (120, 200, 16, False, 0.5, 4096),   # non-causal: negative offsets carry mass
    (200, 200, 24, True, 0.9, 8),       # tile of 24; passes over the row before the bracket
    (64, 64, 32, True, 1.0, 4096),      # p = 1: every non-zero column and offset
])
def test_vertical_slash_tiles_kernel_matches_reference(nq, nk, bs, causal, threshold,
                                                       candidates, monkeypatch):
    """Top-p of columns and offsets straight to tiles equals the reference's sort and bins."""
    from prism.optimized import vertical_slash_tiles as vst
    from prism.reference.estimators import vertical_slash_tiles_from_distributions

    monkeypatch.setattr(vst, "CANDIDATES", candidates)
    if candidates < 4096:  # rows over several blocks: copied out, after passes
        monkeypatch.setattr(vst, "LONG_TOP_P_BLOCK", 64)
    layout = tile_layout(nq, nk, bs, causal)
    vertical, slash = _distributions(2, 3, nq, nk, layout, causal, seed=nq + bs)
    before = (vertical.clone(), slash.clone())
    actual = vst.vertical_slash_tiles_kernel(vertical, slash, layout, threshold, causal)
    expected = vertical_slash_tiles_from_distributions(vertical, slash, layout, threshold,
                                                       causal)
    assert actual.dtype == torch.bool and actual.shape == expected.shape
    assert torch.equal(actual, expected)
    assert torch.equal(vertical, before[0]) and torch.equal(slash, before[1])
    admissible = admissible_tiles(layout, causal, DEVICE).expand_as(expected)
    assert expected.any() and not (expected & ~admissible).any()
    if threshold < 1.0:
        assert (admissible & ~expected).any()


@pytest.mark.parametrize("points", [1, 8])
def test_long_top_p_kernel_row_passes_and_candidates_agree(points, monkeypatch):
    """The bracket finished in registers or by passes over the row, by plain bisection
    (1 point per step) or several points per step: one answer."""
    from prism.optimized import vertical_slash_tiles as vst

    gen = torch.Generator().manual_seed(11)
    x = torch.softmax(torch.randn(3, 2000, generator=gen) * 4, -1)
    x[1, 100:400] = x[1, 50]                 # ties at various places
    x[2, ::2] = 0.0
    x = (x / x.sum(-1, keepdim=True)).to(DEVICE)
    keep, mass_before = top_p_select(x, torch.ones((), dtype=torch.bool, device=DEVICE), 0.6)
    expected = keep & (x > 0)
    boundary = (mass_before - 0.6).abs() <= 1e-5
    monkeypatch.setattr(vst, "TOP_P_POINTS", points)
    # Blocks of 8192: each row is one block, searched in registers; of 256: the rows
    # span blocks, so the bracket is copied out (blocks without its values skip the
    # copy's scan), after passes over the row when it holds more than CANDIDATES.
    for block in (8192, 256):
        for candidates in (4096, 64, 2):
            monkeypatch.setattr(vst, "LONG_TOP_P_BLOCK", block)
            monkeypatch.setattr(vst, "CANDIDATES", candidates)
            actual = vst.long_top_p_kernel(x, 0.6)
            assert not ((actual != expected) & ~boundary).any(), (block, candidates)


def test_long_top_p_kernel_cut_among_close_values_and_inside_ties(monkeypatch):
    """The cut among values a few ulps apart (shuffled, and sorted), and inside a
    group of exact ties, whether the bracket is finished in registers or by passes
    over the row, by one or several thresholds per pass: the reference's answer (no
    mass within 1e-4 of p, so no entry is a boundary case). Rows of one block (the
    search on the row in registers) and of six (copied out, with and without passes
    over the row; the ties' ranks carried across blocks)."""
    from prism.optimized import vertical_slash_tiles as vst

    n = 3000
    gen = torch.Generator().manual_seed(4)
    close = 1e-3 * (1 + torch.arange(500, dtype=torch.float64) * 2.0 ** -22)
    rows = torch.full((3, n), 0.5 / (n - 500), dtype=torch.float64)
    rows[0, torch.randperm(n, generator=gen)[:500]] = close[torch.randperm(500, generator=gen)]
    rows[1, 1:1001:2] = 1e-3              # 500 exact ties, the cut inside them
    rows[2, 200:700] = close.flip(0)      # sorted, descending
    x = rows.float().to(DEVICE)
    threshold = 0.2505  # ~250.5 values of ~1e-3 above the small ones: quota mid-group
    keep, mass_before = top_p_select(x, torch.ones((), dtype=torch.bool, device=DEVICE),
                                     threshold)
    assert ((mass_before - threshold).abs() > 1e-4).all()
    expected = keep & (x > 0)
    assert (expected.sum(-1) == 251).all()
    for points, block, candidates in [(1, 4096, 4096), (8, 4096, 4096), (1, 512, 4096),
                                      (1, 512, 8), (8, 512, 8)]:
        monkeypatch.setattr(vst, "TOP_P_POINTS", points)
        monkeypatch.setattr(vst, "LONG_TOP_P_BLOCK", block)
        monkeypatch.setattr(vst, "CANDIDATES", candidates)
        assert torch.equal(vst.long_top_p_kernel(x, threshold), expected), (points, block,
                                                                             candidates)


@pytest.mark.parametrize("programs", [1, 3])
def test_last_query_distributions_several_key_blocks_per_program(programs, monkeypatch):
    """A distribution program walking several key blocks gives the same distributions."""
    from prism.optimized import vertical_slash
    from prism.reference.estimators import last_query_distributions

    monkeypatch.setattr(vertical_slash, "DISTRIBUTION_PROGRAMS", programs)
    q, k = _qk(1, 4, 2, 150, 290, 16, seed=3, scale=2.0)
    layout = tile_layout(150, 290, 32, True)
    vertical, slash = vertical_slash.last_query_distributions_kernel(q, k, layout, 16, True)
    ref_vertical, ref_slash = last_query_distributions(q, k, layout, 16, True)
    torch.testing.assert_close(vertical, ref_vertical, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(slash, ref_slash, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tuning", [
    dict(block_n=128),                                  # key blocks wider than the rows
    dict(max_rows=32, stats_block_n=32, programs=3),    # one head per program, runs of blocks
])
def test_last_query_distributions_launch_shapes(tuning):
    """Every launch shape gives the reference's distributions (rotation, chunks, blocks)."""
    from prism.optimized.vertical_slash import VSTuning, last_query_distributions_kernel
    from prism.reference.estimators import last_query_distributions

    q, k = _qk(1, 4, 2, 150, 290, 16, seed=5, scale=2.0)
    layout = tile_layout(150, 290, 32, True)
    vertical, slash = last_query_distributions_kernel(q, k, layout, 20, True,
                                                      tuning=VSTuning(**tuning))
    ref_vertical, ref_slash = last_query_distributions(q, k, layout, 20, True)
    torch.testing.assert_close(vertical, ref_vertical, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(slash, ref_slash, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("field, value", [("block_n", 48), ("max_rows", 8), ("num_stages", 0),
                                          ("programs", -1), ("stats_block_n", True)])
def test_last_query_distributions_bad_launch_shape(field, value):
    from prism.optimized.vertical_slash import VSTuning, last_query_distributions_kernel

    q, k = _qk(1, 2, 1, 64, 64, 16, seed=0)
    with pytest.raises(ValueError, match=field):
        last_query_distributions_kernel(q, k, tile_layout(64, 64, 32, True), 4, True,
                                        tuning=VSTuning(**{field: value}))
