"""Launch-shape options of the packed antidiagonal kernel against the reference.

``PackedTuning.heads`` (query heads of a GQA group per program; groups too large
for one program split over several) and ``PackedTuning.d_split`` (each product in
pieces of the head dim; head dims above 128 on the tuned shapes), dense and
candidate-restricted (benchmarks/NOTES.md item 49). Runs in Triton's interpreter
on the CPU (tests/conftest.py) or on CUDA; the GPU-marked tests take the tuned
shapes at 4K tokens on the H200.
"""

from __future__ import annotations

import pytest
import torch
from test_estimator_cascade_kernel import _random_candidates
from test_optimized_estimators import _qk

from prism.reference import tile_layout
from prism.reference.estimators import antidiagonal_probabilities

pytestmark = pytest.mark.interpret


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("batch, hq, hkv, nq, nk, bs, stride, causal, dtype, tma", [
    (2, 4, 1, 128, 192, 32, 4, True, torch.bfloat16, True),   # KV prefix
    (1, 8, 2, 104, 104, 32, 8, True, torch.float16, True),    # last query tile partial
    (1, 8, 2, 100, 100, 32, 8, True, torch.float16, False),   # a partial group
    (1, 4, 1, 64, 128, 32, 8, False, torch.float32, False),   # non-causal
])
def test_packed_heads_per_program_match_the_reference(heads, batch, hq, hkv, nq, nk, bs,
                                                      stride, causal, dtype, tma):
    """Programs holding ``heads`` of a GQA group's query heads (PackedTuning.heads),
    with tensor descriptors where they apply, give the reference's scores for every
    head and batch entry; with one head the query rows are one 2-D box."""
    from prism.optimized import antidiagonal_packed as ap

    q, k = _qk(batch, hq, hkv, nq, nk, 16, seed=heads + nq, scale=2.0, dtype=dtype)
    layout = tile_layout(nq, nk, bs, causal)
    expected = antidiagonal_probabilities(q, k, layout, stride, causal)
    per_tile = bs // stride
    tuning = ap.PackedTuning(target_rows=2 * heads * per_tile, block_kg=16, one_pass=1,
                             tma=1, heads=heads)
    assert ap._tma_applies(q, k, layout, stride, 2 * heads * per_tile, heads,
                           2 * per_tile, 16) == tma
    actual = ap.antidiagonal_packed_probabilities(q, k, layout, stride, causal, tuning)
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("hq, hkv, dtype", [(16, 1, torch.float32), (18, 2, torch.float16),
                                            (32, 2, torch.bfloat16)])
def test_gqa_groups_too_large_for_one_program_are_split(hq, hkv, dtype):
    """Groups whose rows pass MAX_ROWS (16 groups per tile x 16 or 9 heads) take
    the packed kernel split over programs of fewer heads (the tuned shapes' rows
    filled: 8 or 1 heads dense, 4 or 1 candidate-restricted), with tensor
    descriptors for 16-bit inputs, and give the reference's scores."""
    from prism.optimized import antidiagonal_packed as ap
    from prism.optimized.cascade import candidate_antidiagonal_tile_probabilities
    from prism.optimized.estimators import antidiagonal_tile_probabilities
    from prism.reference.estimators import candidate_antidiagonal_probabilities

    nq, nk, bs, stride = 64, 96, 32, 2
    group, per_tile = hq // hkv, bs // stride
    assert group * per_tile > ap.MAX_ROWS
    heads = ap.fitting_heads(group, per_tile)
    assert group % heads == 0 and heads * per_tile <= ap.MAX_ROWS
    assert heads == {16: 8, 9: 1}[group]
    assert ap.default_tuning(per_tile, group, 16).heads == heads
    assert ap.default_tuning(per_tile, group, 16, True).heads == {16: 4, 9: 1}[group]
    layout = tile_layout(nq, nk, bs, True)
    assert ap.antidiagonal_packed_applies(layout, stride)
    q, k = _qk(1, hq, hkv, nq, nk, 16, seed=hq, scale=2.0, dtype=dtype)
    calls = []
    real = ap.antidiagonal_packed_probabilities

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import prism.optimized.cascade as cascade_module
    import prism.optimized.estimators as estimators_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(estimators_module, "antidiagonal_packed_probabilities", counted)
        mp.setattr(cascade_module, "antidiagonal_packed_probabilities", counted)
        expected = antidiagonal_probabilities(q, k, layout, stride, True)
        actual = antidiagonal_tile_probabilities(q, k, layout, stride, True)
        torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)
        # Random candidates plus the forced sink and diagonal, admissible ones only.
        cand = _random_candidates(layout, hq, True, seed=hq, density=0.5)
        expected = candidate_antidiagonal_probabilities(q, k, layout, stride, cand, True)
        actual = candidate_antidiagonal_tile_probabilities(q, k, layout, stride, cand, True)
        torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)
    assert len(calls) == 2


@pytest.mark.parametrize("d, d_split, dtype, candidates", [
    (32, 2, torch.float32, False),    # pointer loads, two 16-wide pieces
    (48, 2, torch.float32, True),     # padded to 64: the second piece half masked
    (32, 2, torch.float16, False),    # tensor descriptors, 16-wide boxes
    (64, 4, torch.bfloat16, True),
])
def test_packed_products_split_along_the_head_dim(d, d_split, dtype, candidates):
    """Each u product in d_split pieces of the head dim (PackedTuning.d_split, what
    head dims above 128 take with the tuned shapes) gives the reference's scores,
    dense and candidate-restricted."""
    from prism.optimized import antidiagonal_packed as ap
    from prism.reference.estimators import candidate_antidiagonal_probabilities

    nq, nk, bs, stride = 96, 160, 32, 4
    q, k = _qk(1, 4, 2, nq, nk, d, seed=d + d_split, scale=2.0, dtype=dtype)
    layout = tile_layout(nq, nk, bs, True)
    tuning = ap.PackedTuning(target_rows=16, block_kg=16, num_warps=4, one_pass=1,
                             tma=int(dtype != torch.float32), d_split=d_split)
    if candidates:
        cand = _random_candidates(layout, 4, True, seed=d, density=0.5)
        expected = candidate_antidiagonal_probabilities(q, k, layout, stride, cand, True)
        actual = ap.antidiagonal_packed_probabilities(q, k, layout, stride, True, tuning,
                                                      candidates=cand)
    else:
        expected = antidiagonal_probabilities(q, k, layout, stride, True)
        actual = ap.antidiagonal_packed_probabilities(q, k, layout, stride, True, tuning)
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)


def test_head_dims_above_128_take_the_tuned_shapes_split():
    from prism.optimized import antidiagonal_packed as ap

    for per_tile, candidates in ((16, False), (8, True)):
        tuned = (ap.CANDIDATE_TUNED if candidates else ap.TUNED)[per_tile]
        for d, split in ((128, 1), (192, 2), (256, 2)):
            got = ap.default_tuning(per_tile, 4, d, candidates)
            assert got.d_split == split
            assert (got.target_rows, got.block_kg, got.num_stages) == (
                tuned.target_rows, tuned.block_kg, tuned.num_stages)
    q, k = _qk(1, 4, 1, 64, 64, 32, seed=1)
    layout = tile_layout(64, 64, 32, True)
    for bad, match in ((3, "power of two"), (4, "narrower than")):
        with pytest.raises(ValueError, match=match):
            ap.antidiagonal_packed_probabilities(q, k, layout, 8, True,
                                                 ap.PackedTuning(d_split=bad))


def test_packed_heads_per_program_must_divide_the_group():
    from prism.optimized import antidiagonal_packed as ap

    q, k = _qk(1, 4, 1, 64, 64, 16, seed=1)
    layout = tile_layout(64, 64, 32, True)
    with pytest.raises(ValueError, match="PackedTuning.heads must divide"):
        ap.antidiagonal_packed_probabilities(q, k, layout, 8, True, ap.PackedTuning(heads=3))
    with pytest.raises(ValueError, match="PackedTuning.heads must be an int"):
        ap.antidiagonal_packed_probabilities(q, k, layout, 8, True, ap.PackedTuning(heads=-1))
    # A tuned shape whose heads do not divide a call's group falls back to the whole group.
    assert ap.default_tuning(16, 2).heads in (0, 1, 2)
    # Any divisor works (descriptors need a power of two, so these rows load by pointer).
    q, k = _qk(1, 6, 1, 64, 96, 16, seed=6, scale=2.0)
    layout = tile_layout(64, 96, 32, True)
    expected = antidiagonal_probabilities(q, k, layout, 8, True)
    actual = ap.antidiagonal_packed_probabilities(q, k, layout, 8, True,
                                                  ap.PackedTuning(target_rows=16, heads=3))
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)


def _tuned_calls_match_the_reference(q, k, stride, candidates):
    """The default launch at 4K (tile 128) against the reference, dense or restricted
    to random candidates plus the forced tiles, and the same bits on every call."""
    from prism.optimized import antidiagonal_packed as ap
    from prism.optimized.cascade import candidate_antidiagonal_tile_probabilities
    from prism.reference.estimators import candidate_antidiagonal_probabilities

    n, hq = q.shape[2], q.shape[1]
    layout = tile_layout(n, n, 128, True)
    if candidates:
        cand = _random_candidates(layout, hq, True, seed=stride, density=0.2)
        expected = candidate_antidiagonal_probabilities(q, k, layout, stride, cand, True)
        calls = [candidate_antidiagonal_tile_probabilities(q, k, layout, stride, cand, True)
                 for _ in range(3)]
    else:
        expected = antidiagonal_probabilities(q, k, layout, stride, True)
        calls = [ap.antidiagonal_packed_probabilities(q, k, layout, stride, True)
                 for _ in range(3)]
    torch.testing.assert_close(calls[0], expected, rtol=2e-5, atol=1e-6)
    for again in calls[1:]:
        assert torch.equal(again, calls[0])


@pytest.mark.gpu
@pytest.mark.parametrize("stride, candidates", [(8, False), (16, True)])
def test_split_gqa_groups_match_the_reference_on_the_gpu(stride, candidates):
    """32 query heads on one KV head at 4K, D 128, bf16: the group is split over
    programs of the tuned shapes (8 heads dense at stride 8, 8 heads restricted at
    stride 16)."""
    from prism.optimized import antidiagonal_packed as ap

    q, k = _qk(1, 32, 1, 4096, 4096, 128, seed=stride, dtype=torch.bfloat16, scale=2.0)
    tuning = ap.default_tuning(128 // stride, 32, 128, candidates)
    assert tuning.heads == 8 and tuning.tma == 1
    _tuned_calls_match_the_reference(q, k, stride, candidates)


@pytest.mark.gpu
@pytest.mark.parametrize("stride, candidates", [(8, False), (16, True)])
def test_head_dim_256_takes_the_split_tuned_shapes_on_the_gpu(stride, candidates):
    """D 256 at 4K, 32/8 heads, bf16: the tuned shapes with each product in two
    128-wide pieces (tensor descriptors)."""
    from prism.optimized import antidiagonal_packed as ap

    q, k = _qk(1, 32, 8, 4096, 4096, 256, seed=stride, dtype=torch.bfloat16, scale=2.0)
    assert ap.default_tuning(128 // stride, 4, 256, candidates).d_split == 2
    _tuned_calls_match_the_reference(q, k, stride, candidates)
