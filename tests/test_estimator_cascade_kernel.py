"""The cascade estimator's GPU path (prism.optimized.cascade) against the reference.

The candidate-restricted packed antidiagonal kernel against
``candidate_antidiagonal_probabilities`` (both launch forms, GQA, a KV prefix,
non-causal, fp16), its skipping of key tiles without a candidate (NaN keys
there are never read), and the whole fused selection against
``reference.select_blocks(..., estimator="cascade")`` up to top-p boundary
ties. Runs in Triton's interpreter on the CPU (tests/conftest.py) or on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from test_optimized_estimators import DEVICE, _assert_masks_agree, _qk, _stage_boundary

from prism import optimized, reference
from prism.optimized import antidiagonal_packed, estimator_path
from prism.optimized.antidiagonal_packed import PackedTuning, antidiagonal_packed_probabilities
from prism.optimized.cascade import (
    candidate_antidiagonal_tile_probabilities,
    prism_candidate_tiles_kernel,
)
from prism.optimized.vertical_slash import last_query_distributions_kernel, last_tile_exact_kernel
from prism.optimized.vertical_slash_tiles import vertical_slash_bins
from prism.reference import PrismConfig, tile_layout
from prism.reference.estimators import (
    candidate_antidiagonal_probabilities,
    last_tile_exact_tiles,
    last_tile_masses,
    prism_candidate_tiles,
)
from prism.reference.registry import estimator_spec, last_tile_threshold
from prism.reference.scoring import admissible_tiles
from prism.reference.select import forced_tiles
from prism.reference.topp import top_p_select

pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def _random_candidates(layout, hq, causal, seed, density=0.4):
    gen = torch.Generator().manual_seed(seed)
    cand = torch.rand(1, hq, layout.num_query_tiles, layout.num_key_tiles, generator=gen)
    cand = (cand < density).to(DEVICE) | forced_tiles(layout, causal, True, True, DEVICE)
    return cand & admissible_tiles(layout, causal, DEVICE)


@pytest.mark.parametrize("hq, hkv, nq, nk, bs, stride, causal, dtype", [
    (4, 2, 72, 164, 32, 8, True, torch.float32),     # GQA 2, KV prefix of 92
    (4, 1, 128, 300, 128, 32, True, torch.float32),  # 4 groups per tile, 4 heads
    (2, 2, 64, 100, 32, 8, False, torch.float16),
    (4, 1, 256, 384, 128, 16, True, torch.float16),  # the preset's stride: descriptors
])
def test_restricted_kernel_matches_the_reference(hq, hkv, nq, nk, bs, stride, causal, dtype,
                                                 monkeypatch):
    q, k = _qk(1, hq, hkv, nq, nk, 16, seed=nq + stride, dtype=dtype, scale=2.0)
    layout = tile_layout(nq, nk, bs, causal)
    cand = _random_candidates(layout, hq, causal, seed=nk)
    expected = candidate_antidiagonal_probabilities(q, k, layout, stride, cand, causal)
    loads = []
    applies = antidiagonal_packed._tma_applies
    monkeypatch.setattr(antidiagonal_packed, "_tma_applies",
                        lambda *a: loads.append(applies(*a)) or loads[-1])
    got = candidate_antidiagonal_tile_probabilities(q, k, layout, stride, cand, causal)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)
    # Candidate calls at strides 8 and 16 of tile 128 load through descriptors.
    assert loads == ([True] if bs // stride in antidiagonal_packed.CANDIDATE_TUNED else [])
    # Not the plain probabilities: the restriction changes the rows.
    plain = candidate_antidiagonal_probabilities(q, k, layout, stride,
                                                 admissible_tiles(layout, causal, DEVICE)
                                                 .expand_as(cand), causal)
    assert (plain - expected).abs().max() > 1e-3
    if causal and stride == 8:
        # The two-pass form, with small gathered blocks so that a program takes
        # several (the one-pass form with skipped tiles: the test below).
        tuning = PackedTuning(target_rows=32, block_kg=16, one_pass=0)
        form = antidiagonal_packed_probabilities(q, k, layout, stride, causal, tuning,
                                                 candidates=cand)
        torch.testing.assert_close(form, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("scan_elements", [4096, 1])
def test_key_tiles_without_a_candidate_are_not_read(monkeypatch, scan_elements):
    """NaN keys in tiles no row has a candidate in: no flag, the reference's rows (with
    every torch.empty poisoned: unused one-pass scratch is never read, skipped tiles
    are written as zeros, and the list of scored tiles is the kernel's own), also
    when such tiles share a key block with a candidate tile. ``scan_elements=1``
    scans the candidate rows 16 tiles per step (two steps here)."""
    monkeypatch.setattr(antidiagonal_packed, "SCAN_ELEMENTS", scan_elements)
    hq, nq, nk, bs, stride = 2, 128, 640, 32, 8
    q, k = _qk(1, hq, 1, nq, nk, 16, seed=5, scale=2.0)
    layout = tile_layout(nq, nk, bs, True)
    cand = _random_candidates(layout, hq, True, seed=2, density=0.6)
    # Key tiles 4-7 and 12-15 (key groups 16-31 and 48-63: blocks 1 and 3 of 16
    # groups) are no row's candidate: skipped blocks between visited ones.
    cand[..., 4:8] = False
    cand[..., 12:16] = False
    poisoned = k.clone()
    poisoned[:, :, 4 * bs : 8 * bs] = float("nan")
    poisoned[:, :, 12 * bs : 16 * bs] = float("nan")
    expected = candidate_antidiagonal_probabilities(q, k, layout, stride, cand, True)
    tuning = PackedTuning(target_rows=32, block_kg=16)
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("inf") if out.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    for one_pass in (0, 1):
        flag = torch.zeros(1, dtype=torch.float64, device=DEVICE)
        got = antidiagonal_packed_probabilities(
            q, poisoned, layout, stride, True, PackedTuning(32, 16, one_pass=one_pass),
            nonfinite=flag, candidates=cand, normalize=False)
        assert flag.item() == 0, one_pass
        # Unnormalised rows are defined at the admissible tiles, skipped blocks included.
        got = torch.where(admissible_tiles(layout, True, DEVICE), got, 0.0)
        got = got / got.sum(-1, keepdim=True).clamp_min(1e-30)
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)
    # The check can fail: with one candidate in that block, the block is read.
    cand[0, 0, -1, 5] = True
    flag = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    antidiagonal_packed_probabilities(q, poisoned, layout, stride, True, tuning,
                                      nonfinite=flag, candidates=cand)
    assert flag.item() != 0
    # Only tile 5 of that block is read: NaN keys in its tiles 4, 6 and 7 alone go
    # unseen (the key block of 16 groups holding tile 5 is not scored whole).
    clean = k.clone()
    clean[:, :, 4 * bs : 5 * bs] = float("nan")
    clean[:, :, 6 * bs : 8 * bs] = float("nan")
    flag = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    got = antidiagonal_packed_probabilities(q, clean, layout, stride, True, tuning,
                                            candidates=cand, nonfinite=flag)
    assert flag.item() == 0
    expected = candidate_antidiagonal_probabilities(q, k, layout, stride, cand, True)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)


def test_fused_selection_matches_the_reference(monkeypatch):
    assert estimator_path.fused_form(estimator_spec("cascade")) == (
        "candidate_antidiagonal", True, True, True, True)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference stage ran")

    # The fused path scores with the kernel, never the reference stage.
    monkeypatch.setattr("prism.optimized.cascade.candidate_antidiagonal_probabilities", refuse)
    causal, nq, nk = True, 160, 256
    q, k = _qk(1, 2, 1, nq, nk, 32, seed=7, transposed=True, scale=4.0)
    cfg = PrismConfig(block_size=32, estimator="cascade", antidiagonal_stride=8,
                      candidate_threshold=0.7, high_threshold=0.8,
                      vertical_slash_threshold=0.3, last_queries=16)
    layout = tile_layout(nq, nk, 32, causal)
    cand = prism_candidate_tiles(q, k, cfg, causal, reference.trace_selection)
    # No candidate boundary tie in this case: the kernels' candidates are the reference's.
    assert torch.equal(prism_candidate_tiles_kernel(q, k, cfg, causal), cand)
    admissible = admissible_tiles(layout, causal, DEVICE)
    assert (cand != admissible).any() and (cand & ~forced_tiles(layout, causal, True, True,
                                                                 DEVICE)).any()
    mask, num, idx, flag = optimized.ops.select(q, k, None, cfg, causal)
    expected = reference.select_blocks(q, k, cfg, causal=causal)
    probs = candidate_antidiagonal_probabilities(q, k, layout, 8, cand, causal)
    _assert_masks_agree(mask, expected, _stage_boundary(probs, cfg, layout, causal))
    ref_num, ref_idx = reference.mask_to_indices(mask)
    assert torch.equal(num.long(), ref_num.long()) and torch.equal(idx.long(), ref_idx.long())
    assert flag.item() == 0
    # Not vacuous: neither the candidates nor the forced tiles alone.
    assert (expected != cand).any()
    # NaN anywhere in k is flagged (the candidate pooling reads every key).
    k_bad = k[:, :, :96].clone()
    k_bad[0, 0, 50, 3] = float("nan")
    assert optimized.ops.select(q[:, :, :64], k_bad, None, cfg, causal)[3].item() != 0


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 8192])
def test_cascade_on_the_gpu_bf16(n):
    """bf16, 8/2 heads, D 128, stride 32: kernel rows vs the reference's, and the mask."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, 8, n, 128, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 2, n, 128, device="cuda", generator=gen).to(torch.bfloat16)
    q[:, :, :, :32] *= 4  # a few dominant dims: non-uniform scores
    cfg = PrismConfig(estimator="cascade", antidiagonal_stride=32, candidate_threshold=0.9)
    layout = tile_layout(n, n, cfg.block_size, True)
    cand = prism_candidate_tiles_kernel(q, k, cfg, True)
    expected = candidate_antidiagonal_probabilities(q, k, layout, 32, cand, True)
    got = candidate_antidiagonal_tile_probabilities(q, k, layout, 32, cand, True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (expected[cand.logical_not()] == 0).all()
    mask = optimized.select_blocks(q, k, cfg)
    tiles = reference.select_blocks(q, k, cfg)
    # The reference's own candidates may differ at Prism's boundary ties; compare
    # the rows whose candidates agree.
    same = (prism_candidate_tiles(q, k, cfg, True, reference.trace_selection) == cand).all(-1)
    boundary = (_stage_boundary(expected, cfg, layout, True) | ~same[..., None]
                | _last_tile_boundary(q, k, cfg, layout, True))
    _assert_masks_agree(mask.as_subclass(torch.Tensor), tiles, boundary)


def _last_tile_boundary(q, k, cfg, layout, causal, margin=1e-5):
    """Last-row entries whose keep/drop may flip with the fp32 order of the tile sums:
    the mass ranked before them within ``margin`` of the rule's threshold, or a
    tile of nearly equal mass kept differently (the two may swap ranks)."""
    mass = last_tile_masses(q, k, layout, cfg.last_queries, causal)
    threshold = last_tile_threshold(cfg)
    keep, before = top_p_select(mass, torch.ones_like(mass, dtype=torch.bool), threshold)
    keep = keep & (mass > 0)
    near = (before - threshold).abs() <= margin
    close = (mass[..., :, None] - mass[..., None, :]).abs() <= 1e-5 * mass[..., :, None]
    swappable = (close & (keep[..., :, None] != keep[..., None, :])).any(-1)
    out = torch.zeros(*mass.shape[:2], layout.num_query_tiles, layout.num_key_tiles,
                      dtype=torch.bool, device=mass.device)
    out[:, :, -1] = near | swappable
    return out


@pytest.mark.parametrize("b, hq, hkv, nq, nk, bs, last, causal, dtype", [
    (1, 4, 2, 200, 328, 32, 16, True, torch.float32),   # KV prefix, GQA
    (2, 2, 1, 100, 300, 48, 8, True, torch.float16),    # tile of 48, rows of 3 tiles
    (1, 2, 2, 64, 150, 32, 40, False, torch.float32),   # non-causal, more queries than a tile
    (1, 2, 1, 1, 77, 16, 8, True, torch.float32),       # one query
])
def test_last_tile_stage_kernel_matches_the_reference(b, hq, hkv, nq, nk, bs, last, causal,
                                                      dtype):
    q, k = _qk(b, hq, hkv, nq, nk, 16, seed=nq + nk, dtype=dtype, scale=3.0)
    layout = tile_layout(nq, nk, bs, causal)
    threshold = 0.8
    cfg = PrismConfig(block_size=bs, last_queries=last, high_threshold=2 * threshold - 1)
    expected = last_tile_exact_tiles(q, k, layout, last, threshold, causal)
    got = last_tile_exact_kernel(q, k, layout, last, threshold, causal)
    _assert_masks_agree(got, expected, _last_tile_boundary(q, k, cfg, layout, causal))
    # The kernels' tile sums are the reference's up to fp32 order.
    vertical, slash = last_query_distributions_kernel(q, k, layout, last, causal)
    _, _, _, mass = vertical_slash_bins(vertical, slash, layout, 0.5, causal, with_bins=False,
                                        last_threshold=threshold)
    torch.testing.assert_close(mass.view(b, hq, -1),
                               last_tile_masses(q, k, layout, last, causal),
                               rtol=1e-5, atol=1e-6)
    # Some tiles kept, some dropped in the last row, none elsewhere.
    assert 0 < expected[:, :, -1].sum() < expected[:, :, -1].numel()
    assert not got[:, :, :-1].any()


def test_fused_cascade_adds_the_last_tile_rule():
    """The fused path's mask has the rule's tiles (here some tiles only the rule keeps)
    and gets them from the kernels, never from the reference stage."""
    causal, nq, nk = True, 160, 256
    q, k = _qk(1, 2, 1, nq, nk, 32, seed=11, transposed=True, scale=4.0)
    cfg = PrismConfig(block_size=32, estimator="cascade", antidiagonal_stride=8,
                      candidate_threshold=0.5, high_threshold=0.6,
                      vertical_slash_threshold=0.1, last_queries=16)
    layout = tile_layout(nq, nk, 32, causal)
    without = reference.estimator_mask(q, k, cfg, causal, stages={
        "last_tile_exact": lambda q, k, layout, *rest: torch.zeros(
            *q.shape[:2], layout.num_query_tiles, layout.num_key_tiles, dtype=torch.bool,
            device=q.device)})
    expected = reference.select_blocks(q, k, cfg, causal=causal)
    assert (expected & ~without).any(), "the rule adds no tile here"
    assert not (expected & ~without)[:, :, :-1].any()

    def refuse(*args, **kwargs):
        raise AssertionError("the reference's last-tile stage ran")

    import prism.reference.estimators as ref_estimators
    original = ref_estimators.last_tile_exact_tiles
    ref_estimators.last_tile_exact_tiles = refuse
    try:
        mask, _, _, flag = optimized.ops.select(q, k, None, cfg, causal)
    finally:
        ref_estimators.last_tile_exact_tiles = original
    cand = prism_candidate_tiles(q, k, cfg, causal, reference.trace_selection)
    probs = candidate_antidiagonal_probabilities(q, k, layout, 8, cand, causal)
    boundary = (_stage_boundary(probs, cfg, layout, causal)
                | _last_tile_boundary(q, k, cfg, layout, causal))
    assert not boundary[expected & ~without].any()  # the rule's own tiles are no ties
    _assert_masks_agree(mask, expected, boundary)
    assert flag.item() == 0
