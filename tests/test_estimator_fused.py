"""An estimator's whole selection on the GPU path: scoring kernels, then one finishing launch.

``prism.optimized.tile_union.union_tiles`` (top-p, vertical-slash tiles, a given
mask, forced tiles, admissibility, mask and compact indices) against a torch
oracle; every estimator's ``ops.select`` against ``prism.reference`` (mask up
to top-p boundary ties, indices exactly the reference's ``mask_to_indices`` of
that mask); NaN/Inf raising as the reference does, with no separate pass.
Runs in Triton's interpreter on the CPU (tests/conftest.py) or on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from test_optimized_estimators import DEVICE, _assert_masks_agree, _qk, _stage_boundary

from prism import optimized, reference
from prism.optimized import estimator_path, ops
from prism.optimized.tile_union import union_tiles
from prism.reference import PrismConfig, tile_layout
from prism.reference.registry import REFERENCE_STAGES, estimator_spec, top_p_tiles
from prism.reference.scoring import admissible_tiles
from prism.reference.select import forced_tiles

# NaN/Inf inputs warn in the interpreter's numpy arithmetic.
pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

ESTIMATORS = [name for name in reference.ESTIMATORS if name != "prism"]


# ---------------------------------------------------------------- the finishing kernel


def _oracle(probs, columns, diagonals, other, layout, causal, threshold):
    """The union in torch: top-p | vertical-slash bins | other | forced, within admissible."""
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    b, hq = probs.shape[:2]
    admissible = admissible_tiles(layout, causal, probs.device)
    normalised = probs * admissible
    normalised = normalised / normalised.sum(-1, keepdim=True).clamp_min(1e-30)
    top = top_p_tiles(normalised, layout, causal, threshold)
    rows = torch.arange(nq, device=probs.device) + layout.first_query_tile
    diag_index = (rows[:, None] - torch.arange(nk, device=probs.device)[None, :] + nk).clamp(
        0, diagonals.shape[-1] - 1)
    vs = (columns.view(b, hq, 1, nk) != 0) | (diagonals.view(b, hq, -1)[..., diag_index] != 0)
    forced = forced_tiles(layout, causal, True, True, probs.device)
    parts = {"top": top, "vs": vs, "other": other, "forced": forced}
    mask = (top | vs | other | forced) & admissible
    return mask, parts, admissible


@pytest.mark.parametrize("nq, nk, bs, causal", [
    (128, 128, 32, True),
    (90, 300, 32, True),    # KV prefix of 210 tokens: first query tile 6
    (100, 170, 16, False),
    # Rows of 75 key tiles, launch width 128: programs of 16 causal rows run at a
    # quarter, a half and the whole width, one of them across two heads.
    (1100, 1200, 16, True),
])
def test_union_tiles_matches_a_torch_oracle(nq, nk, bs, causal):
    layout = tile_layout(nq, nk, bs, causal)
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    gen = torch.Generator().manual_seed(nq + nk)
    b, hq = 2, 3
    # Unnormalised probabilities with garbage outside the admissible tiles (never read).
    probs = (torch.rand(b, hq, nqt, nkt, generator=gen) ** 6).to(DEVICE)
    admissible = admissible_tiles(layout, causal, DEVICE)
    probs = torch.where(admissible, probs, torch.full_like(probs, 1e9))
    columns = (torch.rand(b * hq, nkt, generator=gen) < 0.1).to(torch.int8).to(DEVICE)
    n_diag = layout.first_query_tile + nqt + nkt + 1
    diagonals = (torch.rand(b * hq, n_diag, generator=gen) < 0.1).to(torch.int8).to(DEVICE)
    other = (torch.rand(b, hq, nqt, nkt, generator=gen) < 0.15).to(DEVICE)
    expected, parts, admissible = _oracle(probs.masked_fill(~admissible, 0), columns, diagonals,
                                          other, layout, causal, 0.8)
    poisoned = torch.ones(b, hq, nqt, nkt, dtype=torch.bool, device=DEVICE)
    mask, num, idx = union_tiles(layout, causal, (b, hq), probs=probs.contiguous(),
                                 normalize=True, threshold=0.8, columns=columns,
                                 diagonals=diagonals, other=other, force_sink=True,
                                 force_diagonal=True, mask=poisoned, write_indices=True)
    assert mask is poisoned
    assert torch.equal(mask, expected)
    ref_num, ref_idx = reference.mask_to_indices(expected)
    assert torch.equal(num.long(), ref_num.long()) and torch.equal(idx.long(), ref_idx.long())
    # Every part decides some tile, so leaving any out (or the admissible set) fails.
    for name in parts:
        rest = [p for n, p in parts.items() if n != name]
        without = (rest[0] | rest[1] | rest[2]) & admissible
        assert not torch.equal(without, expected), name
    assert (~admissible).any() == causal and not (expected & ~admissible).any()


def test_union_tiles_checks_rows_for_nan():
    layout = tile_layout(64, 64, 32, True)
    probs = torch.rand(1, 2, 2, 2, device=DEVICE)
    for name in ("q", "k", "v"):
        q, k = _qk(1, 2, 1, 64, 64, 16, seed=1)
        v = k.clone()
        tensors = {"q": q, "k": k, "v": v}
        flag = torch.zeros(1, dtype=torch.float64, device=DEVICE)
        union_tiles(layout, True, (1, 2), probs=probs, check=tensors, nonfinite=flag)
        assert flag.item() == 0
        tensors[name][0, 0, 63, 15] = float("inf")  # the last row and dim of one head
        union_tiles(layout, True, (1, 2), probs=probs, check=tensors, nonfinite=flag)
        assert flag.item() != 0, name


# ---------------------------------------------------------------- whole selections


def test_fused_forms_follow_the_registry():
    for name in ESTIMATORS:
        spec = estimator_spec(name)
        form = estimator_path.fused_form(spec)
        if form is None:  # the general path: any stage besides the fused ones
            assert set(spec.stages) - {"vertical_slash", "tile_top_p", "last_tile_exact",
                                       *estimator_path.PROBABILITY_STAGES}
            continue
        stage, with_vs, on_candidates, with_last, with_mix = form
        assert with_mix == ("candidate_sampled" in spec.stages)
        assert with_vs == ("vertical_slash" in spec.stages)
        assert with_last == ("last_tile_exact" in spec.stages)
        assert stage is None or stage in spec.stages
        assert on_candidates == ("prism_candidates" in spec.stages)


_CASES = [  # (b, hq, hkv, nq, nk, causal, transposed): KV prefix, GQA, non-causal
    (1, 4, 2, 100, 160, True, True),
    (1, 3, 1, 128, 128, True, False),
    (1, 2, 1, 96, 70, False, False),
]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_matches_the_reference_with_indices(estimator):
    b, hq, hkv, nq, nk, causal, transposed = _CASES[ESTIMATORS.index(estimator) % len(_CASES)]
    q, k = _qk(b, hq, hkv, nq, nk, 16, seed=len(estimator), transposed=transposed, scale=3.0)
    cfg = PrismConfig(block_size=32, estimator=estimator, antidiagonal_stride=8,
                      sampled_queries=2, subtile_factor=2, high_threshold=0.7,
                      low_threshold=0.7, vertical_slash_threshold=0.3, last_queries=8)
    mask, num, idx, flag = ops.select(q, k, None, cfg, causal)
    expected = reference.select_blocks(q, k, cfg, causal=causal)
    layout = tile_layout(nq, nk, 32, causal)
    boundary = torch.zeros_like(expected)
    spec = estimator_spec(estimator)
    for stage, (_, field, _) in estimator_path.PROBABILITY_STAGES.items():
        if stage in spec.stages:
            extra = ()
            if "prism_candidates" in spec.stages:  # the cascade: the reference's candidates
                extra = (REFERENCE_STAGES["prism_candidates"](q, k, cfg, causal,
                                                              reference.trace_selection),)
            probs = REFERENCE_STAGES[stage](q, k, layout, getattr(cfg, field), *extra, causal)
            boundary |= _stage_boundary(probs, cfg, layout, causal)
    if spec.prism_bands or "prism_trace" in spec.stages:
        boundary |= reference.boundary_ties(q, k, cfg.replace(estimator="prism"),
                                            causal=causal)
    _assert_masks_agree(mask, expected, boundary)
    ref_num, ref_idx = reference.mask_to_indices(mask)
    assert torch.equal(num.long(), ref_num.long()) and torch.equal(idx.long(), ref_idx.long())
    assert flag.item() == 0
    forced = forced_tiles(layout, causal, True, True, q.device)
    assert (expected & ~forced).any()


def test_fused_path_makes_no_separate_check_union_or_index_pass(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a separate pass ran")

    for name in ("nonfinite_flag", "mask_rows_to_indices"):
        monkeypatch.setattr(estimator_path, name, refuse)
    monkeypatch.setattr(ops, "nonfinite_flag", refuse)
    q, k = _qk(1, 2, 1, 40, 64, 16, seed=3)
    # One estimator per fused form with a separate check: antidiagonal (+ vertical-slash),
    # sampled alone (q checked by the finishing launch), vertical-slash alone.
    for estimator in ("antidiagonal_vertical_slash", "sampled", "vertical_slash"):
        assert estimator_path.fused_form(estimator_spec(estimator)) is not None
        cfg = PrismConfig(block_size=32, estimator=estimator, last_queries=8,
                          sampled_queries=2)
        mask, num, idx, flag = ops.select(q, k, q[:, :1], cfg, True)
        assert num is not None and idx is not None


def test_fused_path_reads_no_unwritten_memory(monkeypatch):
    """Every torch.empty of the fused path poisoned: the same selection, no NaN flagged.

    The scoring kernels leave inadmissible tiles unwritten when they do not
    normalise; the finishing launch must never read them.
    """
    q, k = _qk(1, 4, 2, 100, 160, 16, seed=8, scale=3.0)
    cfg = PrismConfig(block_size=32, antidiagonal_stride=8, sampled_queries=2, last_queries=8,
                      high_threshold=0.7, vertical_slash_threshold=0.3)
    estimators = ("antidiagonal_vertical_slash",)
    clean = [ops.select(q, k, None, cfg.replace(estimator=e), True) for e in estimators]
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else 1)

    monkeypatch.setattr(torch, "empty", poisoned)
    for estimator, expected in zip(estimators, clean, strict=True):
        actual = ops.select(q, k, None, cfg.replace(estimator=estimator), True)
        for a, e in zip(actual[:3], expected[:3], strict=True):
            assert torch.equal(a, e), estimator
        assert actual[3].item() == 0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_nan_and_inf_raise_the_reference_error(estimator):
    cfg = PrismConfig(block_size=32, estimator=estimator, last_queries=8, sampled_queries=2,
                      subtile_factor=2)
    # Query row 0 is read by no sampled or last-query scoring; key 70 is the last.
    for which, row, value in (("q", 0, float("nan")), ("k", 70, float("-inf"))):
        q, k = _qk(1, 2, 1, 40, 71, 16, seed=5)
        (q if which == "q" else k)[0, -1, row, 2] = value
        with pytest.raises(ValueError) as expected:
            reference.select_blocks(q, k, cfg)
        with pytest.raises(ValueError) as actual:
            optimized.select_blocks(q, k, cfg)
        assert str(actual.value) == str(expected.value)
        assert "NaN or Inf" in str(actual.value)


# ---------------------------------------------------------------- on the GPU only

# Every fused form (subtile's general path scores with the reference's torch code).
_GPU_ESTIMATORS = ("antidiagonal", "antidiagonal_vertical_slash", "sampled",
                   "sampled_vertical_slash", "prism_vertical_slash", "vertical_slash", "cascade")


@pytest.mark.gpu
def test_estimator_selection_replays_under_cuda_graph_capture():
    """Capture waits for nothing (no host read of the flag); replays equal eager calls."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 2048, 64, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 2, 2048, 64, device="cuda", generator=gen).to(torch.bfloat16)
    for estimator in _GPU_ESTIMATORS:
        cfg = PrismConfig(estimator=estimator, antidiagonal_stride=32)
        eager = ops.select(q, k, None, cfg, True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            optimized.select_blocks(q, k, cfg)  # warm-up (compiles) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = optimized.select_blocks(q, k, cfg)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured.as_subclass(torch.Tensor), eager[0]), estimator
        assert torch.equal(captured.kv_indices, eager[2]), estimator
        assert eager[3].item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_flagged_on_the_gpu(value):
    """Compiled kernels keep the score check (``raw - raw``) and the row checks."""
    for estimator in _GPU_ESTIMATORS:
        cfg = PrismConfig(estimator=estimator, antidiagonal_stride=16)
        for which, row in (("q", 0), ("q", 700), ("k", 5), ("k", 1023)):
            gen = torch.Generator(device="cuda").manual_seed(row)
            q = torch.randn(1, 4, 1024, 64, device="cuda", generator=gen).to(torch.bfloat16)
            k = torch.randn(1, 2, 1024, 64, device="cuda", generator=gen).to(torch.bfloat16)
            (q if which == "q" else k)[0, -1, row, 63] = value
            flag = ops.select(q, k, None, cfg, True)[3]
            assert flag.item() != 0, (estimator, which, row)
            with pytest.raises(ValueError, match="NaN or Inf"):
                optimized.select_blocks(q, k, cfg)
