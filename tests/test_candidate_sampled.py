"""The cascade's sampled-query stage (``sampled_weight`` > 0): reference and kernel.

The reference stage against a loop oracle written from the definition in
docs/estimators.rst, the mix rule on hand-worked rows, the Triton kernel
(:mod:`prism.optimized.candidate_sampled`) against the reference stage and
mix, the whole fused selection against ``reference.select_blocks`` up to
top-p boundary ties, and the configuration checks. Runs in Triton's
interpreter on the CPU (tests/conftest.py) or on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_optimized_estimators import DEVICE, _assert_masks_agree, _qk, _stage_boundary

from prism import optimized, reference
from prism.optimized import candidate_sampled, estimator_path
from prism.optimized.antidiagonal_packed import (
    antidiagonal_packed_probabilities,
    fused_sampled_applies,
)
from prism.optimized.candidate_sampled import (
    candidate_sampled_mix_,
    candidate_sampled_scores,
    candidate_sampled_tile_probabilities,
)
from prism.optimized.tile_union import union_tiles
from prism.reference import PrismConfig, tile_layout
from prism.reference.estimators import (
    candidate_antidiagonal_probabilities,
    candidate_sampled_probabilities,
    mix_tile_probabilities,
    prism_candidate_tiles,
    sampled_query_probabilities,
)
from prism.reference.scoring import admissible_tiles
from prism.reference.select import forced_tiles

pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def _random_candidates(layout, hq, causal, seed, density=0.4, b=1):
    gen = torch.Generator().manual_seed(seed)
    cand = torch.rand(b, hq, layout.num_query_tiles, layout.num_key_tiles, generator=gen)
    cand = (cand < density).to(DEVICE) | forced_tiles(layout, causal, True, True, DEVICE)
    return cand & admissible_tiles(layout, causal, DEVICE)


def _oracle(q, k, layout, samples, candidates, causal):
    """The stage by loops, from its definition: sample ``t`` of query tile ``I`` is the
    last real query of run ``t`` (``block_size / samples`` positions); its softmax of
    ``q . k / sqrt(D)`` runs over the keys of the candidate tiles of its (head, tile)
    that it may see; its probabilities are summed into key tiles; a row is the sum
    over its samples divided by that sum."""
    b, hq, nq_tokens, d = q.shape
    group = hq // k.shape[1]
    bs = layout.block_size
    run = bs // samples
    first = layout.query_start
    last = first + nq_tokens - 1
    out = torch.zeros(b, hq, layout.num_query_tiles, layout.num_key_tiles, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(layout.num_query_tiles):
                tile = layout.first_query_tile + i
                for t in range(samples):
                    start = tile * bs + t * run
                    pos = min(start + run - 1, last)
                    if pos < max(start, first):
                        continue  # the run holds no query
                    keys = [j for j in range(k.shape[2])
                            if bool(candidates[bi, h, i, j // bs]) and (not causal or j <= pos)]
                    if not keys:
                        continue
                    qrow = q[bi, h, pos - first].double()
                    scores = torch.stack([qrow @ k[bi, h // group, j].double() for j in keys])
                    probs = torch.softmax(scores / math.sqrt(d), 0)
                    for j, p in zip(keys, probs, strict=True):
                        out[bi, h, i, j // bs] += p
    total = out.sum(-1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-300), out).float()


@pytest.mark.parametrize("nq, nk, bs, samples, causal", [
    (64, 64, 16, 4, True),
    (40, 72, 16, 8, True),    # KV prefix of 32, a partial last tile
    (48, 56, 16, 2, False),
])
def test_reference_stage_matches_the_loop_oracle(nq, nk, bs, samples, causal):
    q, k = _qk(1, 4, 2, nq, nk, 8, seed=nq + nk, scale=2.0)
    q, k = q.cpu(), k.cpu()
    layout = tile_layout(nq, nk, bs, causal)
    cand = _random_candidates(layout, 4, causal, seed=nk).cpu()
    got = candidate_sampled_probabilities(q, k, layout, samples, cand, causal)
    torch.testing.assert_close(got, _oracle(q, k, layout, samples, cand, causal),
                               rtol=1e-5, atol=1e-6)
    assert (got[~cand] == 0).all()
    # Each sample weighs 1 in its row: not the unrestricted stage cut to the candidates.
    cut = sampled_query_probabilities(q, k, layout, samples, causal) * cand
    cut = cut / cut.sum(-1, keepdim=True).clamp_min(1e-30)
    assert not torch.allclose(got, cut, atol=1e-4)


def test_reference_stage_on_every_tile_is_the_sampled_stage():
    q, k = _qk(2, 4, 1, 96, 96, 16, seed=5, scale=2.0)
    q, k = q.cpu(), k.cpu()
    layout = tile_layout(96, 96, 32, True)
    every = admissible_tiles(layout, True, "cpu").expand(2, 4, -1, -1)
    torch.testing.assert_close(candidate_sampled_probabilities(q, k, layout, 4, every, True),
                               sampled_query_probabilities(q, k, layout, 4, True),
                               rtol=1e-6, atol=1e-7)


def test_mix_rule_on_hand_worked_rows():
    first = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    second = torch.tensor([[0.0, 0.25, 0.75], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0]])
    got = mix_tile_probabilities(first, second, 0.4)
    expected = torch.tensor([[0.3, 0.4, 0.3],       # 0.6 * first + 0.4 * second
                             [0.0, 1.0, 0.0],       # a zero row takes the other's
                             [0.0, 0.0, 0.0],       # zero in both stays zero
                             [1.0, 0.0, 0.0]])
    torch.testing.assert_close(got, expected)
    assert torch.equal(mix_tile_probabilities(first, second, 0.0)[0], first[0])


@pytest.mark.parametrize("b, hq, hkv, nq, nk, bs, samples, causal, dtype", [
    (1, 4, 2, 72, 164, 32, 8, True, torch.float32),    # GQA 2, KV prefix of 92
    (2, 2, 2, 64, 100, 32, 4, False, torch.float16),   # non-causal, batch 2
    (1, 3, 1, 100, 100, 32, 8, True, torch.float32),   # odd group, partial last tile
    (1, 32, 1, 64, 64, 16, 8, True, torch.float32),    # group of 32: heads split
    (1, 2, 1, 96, 96, 16, 16, True, torch.float16),    # every query of a tile sampled
    (1, 2, 1, 200, 300, 256, 8, True, torch.float32),  # a tile of two key chunks
    (1, 2, 1, 90, 120, 48, 3, True, torch.float32),    # 3 samples: rows not a power of 2
])
def test_kernel_matches_the_reference(b, hq, hkv, nq, nk, bs, samples, causal, dtype):
    q, k = _qk(b, hq, hkv, nq, nk, 16, seed=nq + hq, dtype=dtype, scale=2.0)
    layout = tile_layout(nq, nk, bs, causal)
    cand = _random_candidates(layout, hq, causal, seed=nk + b, b=b)
    q0, k0, c0 = q.clone(), k.clone(), cand.clone()
    expected = candidate_sampled_probabilities(q, k, layout, samples, cand, causal)
    got = candidate_sampled_tile_probabilities(q, k, layout, samples, cand, causal)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)
    # The mix, in place over unnormalised antidiagonal rows (zero off the candidates).
    anti = candidate_antidiagonal_probabilities(q, k, layout, 8 if bs >= 32 else 4, cand,
                                                causal)
    raw = anti * torch.arange(1, anti.shape[2] + 1, device=DEVICE)[:, None].float()
    mixed = candidate_sampled_mix_(raw.clone(), q, k, layout, samples, 0.3, cand, causal)
    mixed = mixed / mixed.sum(-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(mixed, mix_tile_probabilities(anti, expected, 0.3),
                               rtol=2e-5, atol=1e-6)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(cand, c0)


@pytest.mark.parametrize("bs, scratch_tiles", [(32, 128), (32, 3), (256, 1)])
def test_two_pass_form_matches_the_one_pass_form(bs, scratch_tiles, monkeypatch):
    """Both forms, and a scratch too small for a program's list (its tail is scored
    again), give the same probabilities."""
    q, k = _qk(1, 4, 2, 300, 420, 16, seed=bs, scale=2.0)
    layout = tile_layout(300, 420, bs, True)
    cand = _random_candidates(layout, 4, True, seed=bs)
    raw = torch.rand(cand.shape, device=DEVICE) * cand
    monkeypatch.setattr(candidate_sampled, "SCRATCH_TILES", scratch_tiles)
    one = candidate_sampled_mix_(raw.clone(), q, k, layout, 8, 0.3, cand, True)
    monkeypatch.setattr(candidate_sampled, "ONE_PASS", False)
    two = candidate_sampled_mix_(raw.clone(), q, k, layout, 8, 0.3, cand, True)
    torch.testing.assert_close(one, two, rtol=2e-5, atol=1e-6)
    assert not torch.equal(one, raw)
    sampled = candidate_sampled_probabilities(q, k, layout, 8, cand, True)
    anti = raw / raw.sum(-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(one / one.sum(-1, keepdim=True).clamp_min(1e-30),
                               mix_tile_probabilities(anti, sampled, 0.3), rtol=2e-5,
                               atol=1e-6)


def test_kernel_leaves_tiles_off_the_candidates_alone():
    q, k = _qk(1, 2, 1, 64, 64, 16, seed=11, scale=2.0)
    layout = tile_layout(64, 64, 16, True)
    cand = _random_candidates(layout, 2, True, seed=3)
    probs = torch.full((1, 2, 4, 4), 7.0, device=DEVICE)
    candidate_sampled_mix_(probs, q, k, layout, 4, 0.5, cand, True)
    assert (probs[~cand] == 7.0).all()
    # On the candidates: half the even antidiagonal row, half the sampled one.
    on = torch.where(cand, probs, torch.zeros_like(probs))
    torch.testing.assert_close(on.sum(-1), torch.ones(1, 2, 4, device=DEVICE))
    sampled = candidate_sampled_probabilities(q, k, tile_layout(64, 64, 16, True), 4, cand, True)
    even = cand / cand.sum(-1, keepdim=True)
    torch.testing.assert_close(on, 0.5 * even + 0.5 * sampled, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_scores_form_rows_and_zeros(causal):
    """The form the fused path runs beside the antidiagonal kernel: each row's sum is
    its number of samples with a candidate key, a row over its sum is the reference
    stage's, and every admissible tile off the candidates holds an exact 0 (written
    by the kernel: an output that starts as NaN keeps none)."""
    q, k = _qk(1, 4, 2, 96, 160, 16, seed=5, scale=2.0)
    layout = tile_layout(96, 160, 32, causal)
    cand = _random_candidates(layout, 4, causal, seed=9)
    got = candidate_sampled_scores(q, k, layout, 8, cand, causal)
    garbage = torch.full_like(got, float("nan"))
    assert candidate_sampled._run_stage(garbage, q, k, layout, 8, 1.0, cand, causal,
                                        False) is garbage
    admissible = admissible_tiles(layout, causal, DEVICE).expand_as(cand)
    assert torch.equal(got[admissible & ~cand], torch.zeros_like(got[admissible & ~cand]))
    assert not garbage[admissible].isnan().any()
    torch.testing.assert_close(garbage[admissible], got[admissible], rtol=0, atol=0)
    rows = torch.where(admissible, got, torch.zeros_like(got)).sum(-1)
    assert torch.allclose(rows, rows.round(), atol=1e-4) and (rows >= 1).all()
    expected = candidate_sampled_probabilities(q, k, layout, 8, cand, causal)
    torch.testing.assert_close(torch.where(admissible, got, torch.zeros_like(got))
                               / rows[..., None], expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("b, hq, hkv, nq, nk, bs, stride, causal, dtype", [
    (1, 4, 2, 64, 64, 32, 8, True, torch.float32),
    (1, 4, 2, 72, 164, 32, 8, True, torch.float32),    # KV prefix, partial last group
    (2, 2, 2, 64, 100, 32, 4, False, torch.float16),   # non-causal, batch 2
    (1, 3, 1, 90, 120, 32, 4, True, torch.float32),    # odd group, partial last tile
    (1, 32, 1, 64, 64, 16, 4, True, torch.float32),    # group of 32: heads split
    (1, 8, 2, 384, 384, 128, 16, True, torch.float16),  # the preset's tile, stride, shape
])
def test_antidiagonal_kernel_writes_the_sampled_rows(b, hq, hkv, nq, nk, bs, stride, causal,
                                                     dtype):
    """With samples = block_size / stride the restricted antidiagonal launch scores
    each query group's sample from its own key loads (``sampled=``): the stage
    kernel's rows (exact zeros off the candidates, every admissible entry written),
    the reference stage's once normalised, and the antidiagonal rows unchanged."""
    q, k = _qk(b, hq, hkv, nq, nk, 16, seed=nq + nk, dtype=dtype, scale=2.0)
    layout = tile_layout(nq, nk, bs, causal)
    cand = _random_candidates(layout, hq, causal, seed=nq, b=b)
    samples = bs // stride
    assert fused_sampled_applies(q, k, layout, stride, samples)
    if bs == 128:  # the preset's launch shape, loads through tensor descriptors
        from prism.optimized.antidiagonal_shapes import SAMPLED_TUNED, default_tuning
        assert default_tuning(8, hq // hkv, 16, True, True) is SAMPLED_TUNED[8]
    second = torch.full(cand.shape, float("nan"), device=DEVICE)
    q0, k0, c0 = q.clone(), k.clone(), cand.clone()
    anti = antidiagonal_packed_probabilities(q, k, layout, stride, causal, normalize=False,
                                             candidates=cand.contiguous(), sampled=second)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(cand, c0)
    admissible = admissible_tiles(layout, causal, DEVICE).expand_as(cand)
    assert not second[admissible].isnan().any()
    assert torch.equal(second[admissible & ~cand], torch.zeros_like(second[admissible & ~cand]))
    alone = antidiagonal_packed_probabilities(q, k, layout, stride, causal, normalize=False,
                                              candidates=cand.contiguous())
    torch.testing.assert_close(anti[admissible], alone[admissible], rtol=1e-6, atol=1e-7)
    stage = candidate_sampled_scores(q, k, layout, samples, cand, causal)
    torch.testing.assert_close(second[admissible], stage[admissible], rtol=2e-5, atol=2e-6)
    rows = torch.where(admissible, second, torch.zeros_like(second))
    torch.testing.assert_close(rows / rows.sum(-1, keepdim=True).clamp_min(1e-30),
                               candidate_sampled_probabilities(q, k, layout, samples, cand,
                                                               causal),
                               rtol=2e-5, atol=1e-6)


@st.composite
def _fused_cases(draw):
    hkv = draw(st.sampled_from([1, 2]))
    bs = draw(st.sampled_from([16, 32, 64]))
    nk = draw(st.integers(1, 260))
    causal = draw(st.booleans())
    return dict(b=draw(st.sampled_from([1, 2])), hkv=hkv,
                hq=hkv * draw(st.sampled_from([1, 2, 3, 4, 8])), nk=nk,
                nq=draw(st.integers(1, nk if causal else 200)), bs=bs,
                stride=draw(st.sampled_from([s for s in (2, 4, 8, 16) if s < bs])),
                d=draw(st.sampled_from([8, 16, 24, 40, 64, 80])), causal=causal,
                dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                transposed=draw(st.booleans()), seed=draw(st.integers(0, 1000)))


@settings(max_examples=10)
@given(case=_fused_cases())
def test_fused_sampled_rows_match_the_reference_on_random_shapes(case):
    """The stage inside the antidiagonal launch on drawn shapes (head dims that are not
    powers of two, GQA groups of 1-8, KV prefixes, batch 2, transposed storage): its
    rows, normalised, are the reference stage's; the antidiagonal rows are those of
    the launch without it."""
    c = case
    q, k = _qk(c["b"], c["hq"], c["hkv"], c["nq"], c["nk"], c["d"], seed=c["seed"],
               dtype=c["dtype"], transposed=c["transposed"], scale=2.0)
    layout = tile_layout(c["nq"], c["nk"], c["bs"], c["causal"])
    samples = c["bs"] // c["stride"]
    if not fused_sampled_applies(q, k, layout, c["stride"], samples):
        return  # the shape takes another form (two passes, or D split); tested elsewhere
    cand = _random_candidates(layout, c["hq"], c["causal"], seed=c["seed"], b=c["b"])
    second = torch.full(cand.shape, float("nan"), device=DEVICE)
    anti = antidiagonal_packed_probabilities(q, k, layout, c["stride"], c["causal"],
                                             normalize=False, candidates=cand.contiguous(),
                                             sampled=second)
    alone = antidiagonal_packed_probabilities(q, k, layout, c["stride"], c["causal"],
                                              normalize=False, candidates=cand.contiguous())
    admissible = admissible_tiles(layout, c["causal"], DEVICE).expand_as(cand)
    assert not second[admissible].isnan().any()
    torch.testing.assert_close(anti[admissible], alone[admissible], rtol=1e-6, atol=1e-7)
    rows = torch.where(admissible, second, torch.zeros_like(second))
    expected = candidate_sampled_probabilities(q, k, layout, samples, cand, c["causal"])
    torch.testing.assert_close(rows / rows.sum(-1, keepdim=True).clamp_min(1e-30), expected,
                               rtol=2e-5, atol=1e-6)


def test_fused_stage_applies_only_to_group_samples():
    q, k = _qk(1, 2, 1, 64, 64, 16, seed=1)
    layout = tile_layout(64, 64, 32, True)
    assert fused_sampled_applies(q, k, layout, 8, 4)
    assert not fused_sampled_applies(q, k, layout, 8, 8)   # samples are not the groups
    assert not fused_sampled_applies(q, k, layout, 8, 2)
    # The preset's tile and stride at D 256: the tuned shape splits each product.
    wide_q, wide_k = _qk(1, 2, 1, 256, 256, 256, seed=1)
    wide = tile_layout(256, 256, 128, True)
    assert fused_sampled_applies(*_qk(1, 2, 1, 256, 256, 128, seed=1), wide, 16, 8)
    assert not fused_sampled_applies(wide_q, wide_k, wide, 16, 8)
    cand = _random_candidates(wide, 2, True, seed=1)
    with pytest.raises(ValueError, match="fused_sampled_applies"):
        antidiagonal_packed_probabilities(wide_q, wide_k, wide, 16, True, normalize=False,
                                          candidates=cand, sampled=torch.empty(cand.shape))


def test_union_mixes_a_second_row_as_the_reference():
    """``union_tiles(second=...)`` keeps the reference's top-p of the reference's mix of
    the two rows (tiles whose mass before them lies within 1e-5 of p excepted: fp32
    rounding of the two normalisations may take either side there)."""
    from prism.reference.topp import top_p_select

    gen = torch.Generator().manual_seed(4)
    layout = tile_layout(256, 256, 32, True)
    shape = (1, 2, layout.num_query_tiles, layout.num_key_tiles)
    admissible = admissible_tiles(layout, True, DEVICE)
    first = (torch.rand(shape, generator=gen) ** 4).to(DEVICE) * admissible * 5.0
    second = (torch.rand(shape, generator=gen) ** 4).to(DEVICE) * admissible * 3.0
    first[0, 0, 3] = 0.0  # a row with no first term takes the second's
    second[0, 1, 5] = 0.0  # and the converse
    norm = [x / x.sum(-1, keepdim=True).clamp_min(1e-30) for x in (first, second)]
    mixed = mix_tile_probabilities(*norm, 0.3)
    for p in (0.5, 0.8):
        mask, _, _ = union_tiles(layout, True, (1, 2), probs=first.clone(), normalize=True,
                                 second=second.clone(), weight=0.3, threshold=p)
        keep, before = top_p_select(mixed, admissible, p)
        close = (before - p).abs() < 1e-5
        assert torch.equal(mask & ~close, keep & ~close)
        assert keep.sum() > 2 * shape[2]  # more than the first tile or two per row
    with pytest.raises(ValueError, match="normalize=True"):
        union_tiles(layout, True, (1, 2), probs=first, second=second, weight=0.3)


def test_kernel_refuses_bad_arguments():
    q, k = _qk(1, 2, 1, 64, 64, 16, seed=1)
    layout = tile_layout(64, 64, 16, True)
    cand = _random_candidates(layout, 2, True, seed=1)
    with pytest.raises(ValueError, match="divide layout.block_size"):
        candidate_sampled_tile_probabilities(q, k, layout, 3, cand, True)
    with pytest.raises(TypeError, match="samples must be an int"):
        candidate_sampled_tile_probabilities(q, k, layout, 4.0, cand, True)
    with pytest.raises(ValueError, match="candidates must be a bool tensor"):
        candidate_sampled_tile_probabilities(q, k, layout, 4, cand.float(), True)


def _cfg(weight, samples=8, **kw):
    return PrismConfig(block_size=32, estimator="cascade", antidiagonal_stride=8,
                       candidate_threshold=0.9, high_threshold=0.6,
                       vertical_slash_threshold=0.1, last_queries=16, sampled_queries=samples,
                       sampled_weight=weight, **kw)


@pytest.mark.parametrize("form", ["fused", "beside", "in_place"])
@pytest.mark.parametrize("samples", [8, 4])
@pytest.mark.parametrize("weight, causal", [(0.3, True), (1.0, True), (0.5, False)])
def test_fused_selection_matches_the_reference(weight, causal, samples, form, monkeypatch):
    """Every form of the stage in the fused path: scored by the antidiagonal launch
    itself (4 samples = the groups of tile 32 at stride 8; with 8 that form does not
    apply and the next one runs), its own launch mixed by the finishing launch
    (beside the antidiagonal kernel on CUDA), or mixed in place after it."""
    monkeypatch.setattr(estimator_path, "SAMPLED_FUSED", form == "fused")
    monkeypatch.setattr(estimator_path, "SAMPLED_BESIDE", form != "in_place")
    nq, nk = (160, 256) if causal else (128, 128)
    q, k = _qk(1, 4, 2, nq, nk, 32, seed=7, transposed=True, scale=4.0)
    cfg = _cfg(weight, samples)
    layout = tile_layout(nq, nk, 32, causal)
    cand = prism_candidate_tiles(q, k, cfg, causal, reference.trace_selection)
    assert torch.equal(optimized.cascade.prism_candidate_tiles_kernel(q, k, cfg, causal), cand)
    mask, num, idx, flag = optimized.ops.select(q, k, None, cfg, causal)
    expected = reference.select_blocks(q, k, cfg, causal=causal)
    probs = mix_tile_probabilities(
        candidate_antidiagonal_probabilities(q, k, layout, 8, cand, causal),
        candidate_sampled_probabilities(q, k, layout, samples, cand, causal), weight)
    _assert_masks_agree(mask, expected, _stage_boundary(probs, cfg, layout, causal))
    assert flag.item() == 0
    # Not vacuous: the sampled stage changes the reference's mask on these inputs.
    assert not torch.equal(expected, reference.select_blocks(q, k, _cfg(0.0), causal=causal))


def test_weight_zero_runs_no_sampled_stage(monkeypatch):
    """Weight 0 runs no stage in any form (each refuses if called)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the sampled stage ran")

    monkeypatch.setattr(estimator_path, "candidate_sampled_mix_", refuse)
    monkeypatch.setattr(estimator_path, "candidate_sampled_scores", refuse)
    monkeypatch.setattr(estimator_path, "fused_sampled_applies", refuse)
    monkeypatch.setattr("prism.reference.registry.candidate_sampled_probabilities", refuse)
    q, k = _qk(1, 2, 1, 96, 96, 16, seed=2, scale=3.0)
    optimized.select_blocks(q, k, _cfg(0.0))
    reference.select_blocks(q, k, _cfg(0.0))
    with pytest.raises(AssertionError, match="sampled stage ran"):
        optimized.select_blocks(q, k, _cfg(0.3))


def test_config_checks_the_weight():
    with pytest.raises(ValueError, match=r"sampled_weight must lie in \[0, 1\]"):
        _cfg(1.5)
    with pytest.raises(ValueError, match=r"sampled_weight must lie in \[0, 1\]"):
        _cfg(float("nan"))
    with pytest.raises(TypeError, match="sampled_weight must be a float"):
        _cfg("0.3")
    with pytest.raises(ValueError, match="multiple of sampled_queries"):
        PrismConfig(block_size=96, estimator="cascade", sampled_queries=64, sampled_weight=0.3)
    # Without the stage, sampled_queries need not divide the tile.
    PrismConfig(block_size=96, estimator="cascade", antidiagonal_stride=8, sampled_queries=64)


def test_rows_per_program_stay_bounded():
    """A group whose samples pass MAX_ROWS is split over programs (the kernel's rows
    are then at most MAX_ROWS)."""
    assert candidate_sampled.MAX_ROWS == 128
    from prism.optimized.antidiagonal_packed import fitting_heads
    assert fitting_heads(32, 8, candidate_sampled.MAX_ROWS) * 8 <= 128


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 8192])
def test_sampled_stage_on_the_gpu_bf16(n):
    """bf16, 32/8 heads, D 128, the preset's shape with 8 samples: kernel rows vs the
    reference's, and the mix."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, 32, n, 128, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device="cuda", generator=gen).to(torch.bfloat16)
    q[:, :, :, :32] *= 4
    cfg = PrismConfig.preset("accurate", sampled_queries=8, sampled_weight=0.3)
    layout = tile_layout(n, n, cfg.block_size, True)
    cand = optimized.cascade.prism_candidate_tiles_kernel(q, k, cfg, True)
    expected = candidate_sampled_probabilities(q, k, layout, 8, cand, True)
    got = candidate_sampled_tile_probabilities(q, k, layout, 8, cand, True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    anti = candidate_antidiagonal_probabilities(q, k, layout, 16, cand, True)
    mixed = candidate_sampled_mix_(anti.clone(), q, k, layout, 8, 0.3, cand, True)
    mixed = mixed / mixed.sum(-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(mixed, mix_tile_probabilities(anti, expected, 0.3),
                               rtol=1e-4, atol=1e-5)
    # The form run beside the antidiagonal kernel: its rows over their sums.
    admissible = admissible_tiles(layout, True, "cuda")
    rows = candidate_sampled_scores(q, k, layout, 8, cand, True)
    rows = torch.where(admissible, rows, torch.zeros_like(rows))
    torch.testing.assert_close(rows / rows.sum(-1, keepdim=True).clamp_min(1e-30), expected,
                               rtol=1e-4, atol=1e-5)
    # The preset's form: the antidiagonal launch scores its groups' samples itself.
    assert fused_sampled_applies(q, k, layout, 16, 8)
    fused = torch.full_like(rows, float("nan"))
    antidiagonal_packed_probabilities(q, k, layout, 16, True, normalize=False,
                                      candidates=cand.contiguous(), sampled=fused)
    fused = torch.where(admissible, fused, torch.zeros_like(fused))
    torch.testing.assert_close(fused, rows, rtol=1e-4, atol=1e-5)
