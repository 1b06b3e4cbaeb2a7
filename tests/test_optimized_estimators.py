"""The Triton estimator kernels and every estimator's CUDA path against the reference.

On a machine without CUDA the kernel runs in Triton's interpreter on CPU tensors
(tests/conftest.py sets ``TRITON_INTERPRET=1``); with CUDA the same tests run on
the GPU. The reference runs on the same device in both cases.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import TOLERANCE, relative_error
from prism import optimized, reference
from prism.optimized.estimators import antidiagonal_tile_probabilities
from prism.reference import PrismConfig, tile_layout, top_p_select
from prism.reference.estimators import antidiagonal_probabilities, vertical_slash_tiles
from prism.reference.scoring import admissible_tiles
from prism.reference.select import forced_tiles

pytestmark = pytest.mark.interpret

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ESTIMATORS = ("antidiagonal", "antidiagonal_vertical_slash")


def _qk(b, hq, hkv, nq, nk, d, *, seed, dtype=torch.float32, transposed=False, scale=1.0):
    """Random q, k on DEVICE; ``transposed`` gives (B, N, H, D) storage viewed as (B, H, N, D)."""
    gen = torch.Generator().manual_seed(seed)
    shape_q, shape_k = (b, nq, hq, d), (b, nk, hkv, d)
    if not transposed:
        shape_q, shape_k = (b, hq, nq, d), (b, hkv, nk, d)
    q = (torch.randn(*shape_q, generator=gen) * scale).to(dtype).to(DEVICE)
    k = torch.randn(*shape_k, generator=gen).to(dtype).to(DEVICE)
    if transposed:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return q, k


# ---------------------------------------------------------------- the identity


def _scores_by_reversed_keys(q, k, layout, stride):
    """Group scores with queries in natural order and keys reversed (the kernel's form)."""
    b, hq, nq_tokens, d = q.shape
    hkv, nk_tokens = k.shape[1], k.shape[2]
    bs = layout.block_size
    q_grid = torch.zeros(b, hq, layout.num_query_tiles * bs, d, dtype=torch.float64)
    lead = layout.query_start % bs
    q_grid[:, :, lead : lead + nq_tokens] = q.double().cpu()
    k_grid = torch.zeros(b, hkv, layout.num_key_tiles * bs, d, dtype=torch.float64)
    k_grid[:, :, :nk_tokens] = k.double().cpu()
    q_groups = q_grid.reshape(b, hq, -1, stride * d)
    k_groups = k_grid.reshape(b, hkv, -1, stride, d).flip(3).reshape(b, hkv, -1, stride * d)
    k_groups = k_groups.repeat_interleave(hq // hkv, dim=1)  # fine for a test oracle
    return q_groups @ k_groups.transpose(-1, -2) / (math.sqrt(d) * stride)


def test_reversed_key_groups_give_the_reference_antidiagonal():
    """sum_u q[gS+u] . k[g'S+S-1-u] is the documented sum_t q[gS+S-1-t] . k[g'S+t]."""
    q, k = _qk(1, 2, 1, 37, 100, 16, seed=1)
    bs, stride = 32, 4
    layout = tile_layout(37, 100, bs, True)
    scores = _scores_by_reversed_keys(q, k, layout, stride)
    first_group = layout.first_query_tile * bs // stride
    qd, kd = q.double().cpu(), k.double().cpu()
    # A few entries straight from the docs' formula, position by position.
    for h, gq, gk in [(0, 20, 3), (1, 24, 24), (0, 15, 0), (1, 17, 9)]:
        total = 0.0
        for t in range(stride):
            p, n = gq * stride + stride - 1 - t, gk * stride + t
            if layout.query_start <= p < layout.query_start + 37 and n < 100:
                total += float(qd[0, h, p - layout.query_start] @ kd[0, 0, n])
        expected = total / (math.sqrt(16) * stride)
        assert scores[0, h, gq - first_group, gk].item() == pytest.approx(expected, abs=1e-12)
    # And the probabilities built from these scores are the reference's.
    n_key_groups = -(-100 // stride)
    groups = torch.arange(first_group, first_group + scores.shape[2])
    key_groups = torch.arange(scores.shape[3])
    allowed = (key_groups[None, :] <= groups[:, None]) & (key_groups[None, :] < n_key_groups)
    valid = (groups >= layout.query_start // stride) & (groups <= (layout.query_start + 36)
                                                         // stride)
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) * valid[:, None]
    per_tile = bs // stride
    tiles = probs.reshape(1, 2, layout.num_query_tiles, per_tile, layout.num_key_tiles,
                          per_tile).sum(dim=(3, 5))
    tiles = tiles / tiles.sum(-1, keepdim=True)
    reference_probs = antidiagonal_probabilities(q, k, layout, stride, True)
    assert relative_error(reference_probs.cpu(), tiles) <= 1e-6


# ---------------------------------------------------------------- kernel vs reference


@st.composite
def _cases(draw):
    bs = draw(st.sampled_from([16, 32, 64]))
    stride = draw(st.sampled_from([4, 8]))
    group = draw(st.sampled_from([1, 2, 4]))
    hkv = draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([16, 32, 64]))
    causal = draw(st.booleans())
    nk = draw(st.integers(1, 300))
    nq = draw(st.integers(1, nk)) if causal else draw(st.integers(1, 300))
    return dict(b=draw(st.integers(1, 2)), hq=hkv * group, hkv=hkv, nq=nq, nk=nk, d=d,
                bs=bs, stride=stride, causal=causal, transposed=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _check_against_reference(case, dtype=torch.float32):
    q, k = _qk(case["b"], case["hq"], case["hkv"], case["nq"], case["nk"], case["d"],
               seed=case["seed"], dtype=dtype, transposed=case["transposed"])
    layout = tile_layout(case["nq"], case["nk"], case["bs"], case["causal"])
    actual = antidiagonal_tile_probabilities(q, k, layout, case["stride"], case["causal"])
    expected = antidiagonal_probabilities(q, k, layout, case["stride"], case["causal"])
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert actual.device == q.device
    error = relative_error(actual, expected)
    assert error <= TOLERANCE[dtype], (case, error)
    # Zero exactly where the reference is zero (inadmissible tiles, empty rows).
    assert torch.equal(actual == 0, expected == 0), case


@given(case=_cases())
@example(case=dict(b=1, hq=2, hkv=1, nq=1, nk=77, d=16, bs=32, stride=8, causal=True,
                   transposed=False, seed=0))
@example(case=dict(b=1, hq=1, hkv=1, nq=64, nk=64, d=32, bs=64, stride=8, causal=True,
                   transposed=False, seed=1))
# Prefix 101 - 38 = 63: query_start is neither tile- nor group-aligned.
@example(case=dict(b=1, hq=4, hkv=2, nq=38, nk=101, d=16, bs=32, stride=4, causal=True,
                   transposed=True, seed=2))
@example(case=dict(b=2, hq=2, hkv=2, nq=45, nk=130, d=32, bs=16, stride=8, causal=False,
                   transposed=True, seed=3))
def test_probabilities_match_reference_fp32(case):
    _check_against_reference(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_probabilities_match_reference_low_precision(dtype):
    case = dict(b=1, hq=4, hkv=2, nq=150, nk=200, d=32, bs=32, stride=8, causal=True,
                transposed=False, seed=5)
    _check_against_reference(case, dtype)


@pytest.mark.parametrize("bs, stride, d, nq, nk", [
    (128, 1, 16, 140, 260),  # 128 groups per tile: two query sub-blocks, split key tiles
    (48, 8, 16, 70, 150),    # 6 groups per tile: not a power of two
    (32, 32, 16, 50, 90),    # one group per tile
    (32, 4, 48, 60, 70),     # head_dim 48: padded to 64 with a mask
])
def test_probabilities_match_reference_unusual_tiles(bs, stride, d, nq, nk):
    for causal in (True, False):
        _check_against_reference(dict(b=1, hq=2, hkv=1, nq=nq, nk=nk, d=d, bs=bs,
                                      stride=stride, causal=causal, transposed=False,
                                      seed=bs + stride))


def test_sharp_scores_do_not_overflow():
    """Large logits: the online max must keep exp2 in range (no inf/NaN, same answer)."""
    q, k = _qk(1, 2, 1, 96, 96, 32, seed=7, scale=60.0)
    layout = tile_layout(96, 96, 32, True)
    actual = antidiagonal_tile_probabilities(q, k, layout, 4, True)
    expected = antidiagonal_probabilities(q, k, layout, 4, True)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= 1e-5


def test_gqa_reads_each_query_heads_own_kv_head():
    """KV heads that differ strongly: any other head mapping gives other probabilities."""
    gen = torch.Generator().manual_seed(11)
    d, n = 32, 128
    q = torch.randn(1, 4, n, d, generator=gen)
    k = torch.randn(1, 2, n, d, generator=gen) * 0.1
    hot = torch.zeros(d)
    hot[3] = 1.0
    q += 2.0 * hot
    k[0, 1, 40:48] = 30.0 * hot  # only KV head 1 (query heads 2, 3) holds a hot key group
    q, k = q.to(DEVICE), k.to(DEVICE)
    layout = tile_layout(n, n, 32, True)
    actual = antidiagonal_tile_probabilities(q, k, layout, 8, True)
    expected = antidiagonal_probabilities(q, k, layout, 8, True)
    assert relative_error(actual, expected) <= 1e-5
    # The test can tell the mappings apart: heads 2, 3 put their mass on key tile 1.
    assert (actual[0, 2:, 2:, 1] > 0.9).all()
    assert (actual[0, :2, 2:, 1] < 0.5).all()
    # Each head matches the reference run on that head and its own KV head alone.
    for h in range(4):
        alone = antidiagonal_probabilities(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], layout,
                                           8, True)
        assert relative_error(actual[:, h : h + 1], alone) <= 1e-5


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("nq, nk, causal", [(0, 100, True), (0, 0, True), (5, 0, False),
                                            (0, 0, False)])
def test_empty_inputs(nq, nk, causal):
    q, k = _qk(1, 2, 1, nq, nk, 16, seed=0)
    layout = tile_layout(nq, nk, 32, causal)
    actual = antidiagonal_tile_probabilities(q, k, layout, 8, causal)
    assert actual.shape == (1, 2, layout.num_query_tiles, layout.num_key_tiles)
    assert actual.dtype == torch.float32 and not actual.any()
    for estimator in ESTIMATORS:
        mask = optimized.select_blocks(q, k, block_size=32, causal=causal,
                                       estimator=estimator)
        assert torch.equal(mask, reference.select_blocks(q, k, block_size=32, causal=causal,
                                                         estimator=estimator))


@pytest.mark.parametrize("n", [5, 32])
def test_single_tile_has_probability_one(n):
    q, k = _qk(2, 2, 2, n, n, 16, seed=n)
    layout = tile_layout(n, n, 32, True)
    actual = antidiagonal_tile_probabilities(q, k, layout, 8, True)
    assert actual.shape == (2, 2, 1, 1)
    assert torch.allclose(actual, torch.ones_like(actual), rtol=0, atol=1e-6)


def test_inputs_are_not_modified():
    q, k = _qk(1, 4, 2, 70, 150, 16, seed=4, transposed=True)
    q_before, k_before = q.clone(), k.clone()
    strides = (q.stride(), k.stride())
    antidiagonal_tile_probabilities(q, k, tile_layout(70, 150, 32, True), 8, True)
    for estimator in ESTIMATORS:
        optimized.select_blocks(q, k, block_size=32, estimator=estimator,
                                antidiagonal_stride=8, last_queries=16)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
    assert (q.stride(), k.stride()) == strides


@pytest.mark.parametrize("call, error, words", [
    (lambda q, k, L: antidiagonal_tile_probabilities(q, k, L, 5), ValueError, "divide"),
    (lambda q, k, L: antidiagonal_tile_probabilities(q, k, L, 0), ValueError, "stride"),
    (lambda q, k, L: antidiagonal_tile_probabilities(q, k, L, 4.0), TypeError, "int"),
    (lambda q, k, L: antidiagonal_tile_probabilities(q, k, (32, 8), 4), TypeError, "layout"),
    (lambda q, k, L: antidiagonal_tile_probabilities(q, k, tile_layout(40, 64, 32, True), 4),
     ValueError, "layout does not describe"),
    (lambda q, k, L: antidiagonal_tile_probabilities(q, k, L, 4, causal=False), ValueError,
     "layout does not describe"),
    (lambda q, k, L: antidiagonal_tile_probabilities(q, k, L, 4, causal=1), TypeError,
     "causal"),
    (lambda q, k, L: antidiagonal_tile_probabilities(q, k[:, :, :, :8], L, 4), ValueError,
     "head_dim"),
    (lambda q, k, L: antidiagonal_tile_probabilities(q[:, :3], k, L, 4), ValueError, "GQA"),
    (lambda q, k, L: antidiagonal_tile_probabilities(q, k.half(), L, 4), TypeError, "dtype"),
    (lambda q, k, L: antidiagonal_tile_probabilities(q.int(), k, L, 4), TypeError, "dtype"),
    (lambda q, k, L: antidiagonal_tile_probabilities(q[0], k, L, 4), ValueError,
     "4 dimensions"),
])
def test_bad_arguments(call, error, words):
    q, k = _qk(1, 4, 2, 50, 64, 16, seed=0)
    with pytest.raises(error, match=words):
        call(q, k, tile_layout(50, 64, 32, True))


def test_select_blocks_rejects_non_finite_inputs():
    q, k = _qk(1, 2, 1, 40, 40, 16, seed=0)
    k[0, 0, 3, 1] = float("nan")
    for estimator in ESTIMATORS:
        with pytest.raises(ValueError, match="NaN or Inf"):
            optimized.select_blocks(q, k, block_size=32, estimator=estimator)


# ---------------------------------------------------------------- masks


def _reference_boundary(q, k, cfg, causal, margin):
    """Entries of the antidiagonal top-p whose keep/drop may flip under fp32 rounding.

    Admissible, not forced, and either the reference's mass ranked before the
    entry lies within ``margin`` of ``high_threshold``, or its probability is
    within ``1e-5`` (relative) of an entry of the same row that the reference
    keeps differently (the two may swap ranks).
    """
    layout = tile_layout(q.shape[2], k.shape[2], cfg.block_size, causal)
    admissible = admissible_tiles(layout, causal, q.device)
    probs = antidiagonal_probabilities(q, k, layout, cfg.antidiagonal_stride, causal)
    keep, mass_before = top_p_select(probs, admissible, cfg.high_threshold)
    keep = keep & (probs > 0)
    near = (mass_before - cfg.high_threshold).abs() <= margin
    close = (probs[..., :, None] - probs[..., None, :]).abs() <= 1e-5 * probs[..., :, None]
    flips = keep[..., :, None] != keep[..., None, :]
    swappable = (close & flips & admissible[..., None, :]).any(-1)
    forced = forced_tiles(layout, causal, cfg.force_sink, cfg.force_diagonal, q.device)
    return (near | swappable) & admissible & ~forced


def _assert_masks_agree(actual, expected, boundary):
    """Masks equal except at boundary entries; reports the first differences otherwise."""
    assert actual.shape == expected.shape and actual.dtype == torch.bool
    wrong = ((actual != expected) & ~boundary).nonzero()
    assert wrong.numel() == 0, (f"{wrong.shape[0]} mask entries differ away from the top-p "
                                f"boundary, first (b, h, i, j): {wrong[:5].tolist()}")


def test_mask_check_can_fail():
    """The comparison above flags a difference that is not a boundary tie."""
    q, k = _qk(1, 2, 1, 96, 96, 16, seed=3)
    cfg = PrismConfig(block_size=32, estimator="antidiagonal", antidiagonal_stride=8,
                      high_threshold=0.5)
    expected = reference.select_blocks(q, k, cfg)
    boundary = _reference_boundary(q, k, cfg, True, 1e-4)
    flipped = expected.clone()
    candidates = (~boundary & admissible_tiles(tile_layout(96, 96, 32, True), True,
                                               q.device)).nonzero()
    assert candidates.numel(), "no entry away from the boundary to flip"
    b, h, i, j = candidates[0].tolist()
    flipped[b, h, i, j] = ~flipped[b, h, i, j]
    with pytest.raises(AssertionError, match="differ away from the top-p boundary"):
        _assert_masks_agree(flipped, expected, boundary)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("nq, nk, causal, threshold", [
    (256, 256, True, 0.9),
    (150, 290, True, 0.6),    # KV prefix of 140 tokens: not tile-aligned
    (120, 200, False, 0.8),
])
def test_masks_match_reference(estimator, nq, nk, causal, threshold):
    # Sharpened queries: the top-p keeps some tiles and drops others.
    q, k = _qk(1, 4, 2, nq, nk, 32, seed=nq + nk, transposed=True, scale=4.0)
    cfg = PrismConfig(block_size=32, estimator=estimator, antidiagonal_stride=8,
                      high_threshold=threshold, vertical_slash_threshold=0.3,
                      last_queries=16)
    actual = optimized.select_blocks(q, k, cfg, causal=causal)
    expected = reference.select_blocks(q, k, cfg, causal=causal)
    boundary = _reference_boundary(q, k, cfg, causal, 1e-4)
    _assert_masks_agree(actual, expected, boundary)
    # Not vacuous: the mask is neither the forced tiles alone nor everything.
    layout = tile_layout(nq, nk, 32, causal)
    admissible = admissible_tiles(layout, causal, q.device)
    forced = forced_tiles(layout, causal, True, True, q.device)
    assert (expected != admissible).any() and (expected != forced).any()


def test_vertical_slash_union_and_indices():
    """antidiagonal_vertical_slash is the antidiagonal mask united with the vertical-slash tiles."""
    q, k = _qk(1, 2, 1, 192, 192, 16, seed=9)
    common = dict(block_size=32, antidiagonal_stride=4, high_threshold=0.5, last_queries=16,
                  vertical_slash_threshold=0.4)
    e1 = optimized.select_blocks(q, k, estimator="antidiagonal", **common)
    e5 = optimized.select_blocks(q, k, estimator="antidiagonal_vertical_slash", **common)
    layout = tile_layout(192, 192, 32, True)
    slash = vertical_slash_tiles(q, k, layout, 16, 0.4, True)
    assert torch.equal(e5, e1 | slash)
    from prism.optimized.api import _select

    cfg = PrismConfig(estimator="antidiagonal_vertical_slash", **common)
    mask, num, idx, _ = _select(q, k, cfg, True, write_indices=True)
    assert torch.equal(mask, e5)
    assert torch.equal(num.long(), e5.sum(-1))
    ref_num, ref_idx = reference.mask_to_indices(e5)
    assert torch.equal(idx.long(), ref_idx.long())


# ---------------------------------------------------------------- sampled queries, registry


def _stage_boundary(probs, cfg, layout, causal, margin=1e-4):
    """Top-p boundary entries of a stage's tile probabilities (as ``_reference_boundary``)."""
    admissible = admissible_tiles(layout, causal, probs.device)
    keep, mass_before = top_p_select(probs, admissible, cfg.high_threshold)
    keep = keep & (probs > 0)
    near = (mass_before - cfg.high_threshold).abs() <= margin
    close = (probs[..., :, None] - probs[..., None, :]).abs() <= 1e-5 * probs[..., :, None]
    swappable = (close & (keep[..., :, None] != keep[..., None, :])
                 & admissible[..., None, :]).any(-1)
    forced = forced_tiles(layout, causal, cfg.force_sink, cfg.force_diagonal, probs.device)
    return (near | swappable) & admissible & ~forced


@pytest.mark.parametrize("case", [
    dict(hq=4, hkv=2, nq=150, nk=220, bs=32, samples=4, causal=True, dtype=torch.float32),
    dict(hq=3, hkv=1, nq=200, nk=200, bs=32, samples=2, causal=True, dtype=torch.float16),
    dict(hq=4, hkv=4, nq=100, nk=130, bs=32, samples=1, causal=False, dtype=torch.float32),
    dict(hq=6, hkv=2, nq=70, nk=333, bs=48, samples=3, causal=True, dtype=torch.bfloat16),
    dict(hq=2, hkv=1, nq=1, nk=77, bs=16, samples=4, causal=True, dtype=torch.float32),
])
def test_sampled_kernel_matches_reference(case):
    from prism.optimized.sampled import sampled_tile_probabilities
    from prism.reference.estimators import sampled_query_probabilities

    q, k = _qk(1, case["hq"], case["hkv"], case["nq"], case["nk"], 32, seed=case["nq"],
               dtype=case["dtype"], transposed=case["nq"] > 100, scale=2.0)
    layout = tile_layout(case["nq"], case["nk"], case["bs"], case["causal"])
    q_before, k_before = q.clone(), k.clone()
    actual = sampled_tile_probabilities(q, k, layout, case["samples"], case["causal"])
    expected = sampled_query_probabilities(q, k, layout, case["samples"], case["causal"])
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    # fp32 sums in another order; 16-bit inputs are exact products in both.
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
    rows = expected.sum(-1)
    assert ((rows - 1).abs() < 1e-5).any()


def test_sampled_kernel_sees_each_heads_own_samples():
    """Rows of different query heads in one program must not mix: plant one hot key per head."""
    from prism.optimized.sampled import sampled_tile_probabilities

    q = torch.zeros(1, 4, 256, 16, device=DEVICE)
    k = torch.zeros(1, 2, 256, 16, device=DEVICE)
    for head in range(4):
        q[0, head, :, head] = 8.0               # head h looks along dim h
        k[0, head // 2, 40 * head + 3, head] = 8.0  # ... at key 40h + 3 of its KV head
    layout = tile_layout(256, 256, 32, True)
    probs = sampled_tile_probabilities(q, k, layout, 2, True)
    for head in range(4):
        tile = (40 * head + 3) // 32
        assert (probs[0, head, tile + 1:, tile] > 0.5).all(), head


# The antidiagonal rows are compared in test_masks_match_reference above.
@pytest.mark.parametrize("estimator", [name for name in reference.ESTIMATORS
                                       if name != "prism" and "antidiagonal" not in name])
def test_estimator_select_blocks_matches_reference_for_every_registry_row(estimator):
    from prism.optimized.estimators import KERNEL_STAGES, estimator_select_blocks
    from prism.reference.registry import REFERENCE_STAGES, estimator_spec

    q, k = _qk(1, 2, 1, 112, 160, 16, seed=11, scale=3.0)
    cfg = PrismConfig(block_size=32, estimator=estimator, antidiagonal_stride=8,
                      sampled_queries=2, subtile_factor=2, high_threshold=0.7,
                      low_threshold=0.7, vertical_slash_threshold=0.2, last_queries=8)
    actual = estimator_select_blocks(q, k, cfg, True)
    expected = reference.select_blocks(q, k, cfg)
    layout = tile_layout(112, 160, 32, True)
    boundary = torch.zeros_like(expected)
    spec = estimator_spec(estimator)
    for stage in spec.stages:
        # Stages whose kernel returns tile probabilities (top-p follows in torch).
        if stage in KERNEL_STAGES and stage in ("antidiagonal", "sampled"):
            argument = (cfg.antidiagonal_stride if stage == "antidiagonal"
                        else cfg.sampled_queries)
            probs = REFERENCE_STAGES[stage](q, k, layout, argument, True)
            boundary = boundary | _stage_boundary(probs, cfg, layout, True)
    if spec.prism_bands:
        boundary = boundary | reference.boundary_ties(q, k, cfg.replace(estimator="prism"))
    _assert_masks_agree(actual, expected, boundary)
    forced = forced_tiles(layout, True, True, True, q.device)
    assert (expected & ~forced).any()


@pytest.mark.parametrize("stride, bs, hq, hkv, nq, nk, causal, dtype", [
    (32, 128, 4, 1, 256, 300, True, torch.float32),   # 4 groups per tile, 4 heads: 64 rows
    (16, 64, 6, 2, 90, 333, True, torch.float16),     # GQA 3, KV prefix of 243
    (8, 32, 4, 4, 100, 130, False, torch.bfloat16),
])
def test_packed_and_per_head_kernels_agree_with_the_reference(stride, bs, hq, hkv, nq, nk,
                                                              causal, dtype):
    from prism.optimized.antidiagonal_packed import (
        antidiagonal_packed_applies,
        antidiagonal_packed_probabilities,
    )

    q, k = _qk(1, hq, hkv, nq, nk, 16, seed=stride + nq, dtype=dtype, scale=2.0)
    layout = tile_layout(nq, nk, bs, causal)
    assert antidiagonal_packed_applies(layout, stride)
    expected = antidiagonal_probabilities(q, k, layout, stride, causal)
    packed = antidiagonal_packed_probabilities(q, k, layout, stride, causal)
    torch.testing.assert_close(packed, expected, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(antidiagonal_tile_probabilities(q, k, layout, stride, causal),
                               expected, rtol=2e-5, atol=1e-6)
