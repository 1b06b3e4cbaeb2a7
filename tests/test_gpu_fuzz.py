"""Random shapes through the public CUDA functions, against the reference.

The other GPU tests pin the shapes the kernels were tuned on. Users call Prism
at shapes nobody listed: odd lengths, KV prefixes, head dims that are not powers
of two, GQA ratios of 3 or 6, strided views, batches. Each case here is drawn
from a generator seeded with the case's number (``pytest -k "case_17"`` reruns
one), and checks on that one input:

* Prism's selection (``select_blocks``, the paper's default and other band
  settings) equals the reference's mask and indices up to contract §6's
  boundary ties (``check_selection`` of test_optimized.py);
* the attention kernel on the reference's mask, and the public
  ``block_sparse_attention``, equal the reference within contract §10's
  tolerances (``check_attention``), and ``prism_attention`` returns exactly
  ``block_sparse_attention`` on ``select_blocks``' mask;
* the accurate preset: its candidate-restricted antidiagonal scores and its
  vertical-slash distributions equal the reference stages' (fp32 summation
  order apart), and its whole mask the reference's away from the top-p
  boundaries;
* ``antidiagonal_vertical_slash`` (stride 8): its antidiagonal tile
  probabilities equal the reference's, and its mask the reference's away from
  the boundary.

``PRISM_GPU_FUZZ_CASES`` sets the number of cases (default 40) and
``PRISM_GPU_FUZZ_FIRST`` the first case's seed (default 0). Without a GPU
(CI), two cases shrunk to interpreter sizes run the same checks in Triton's
interpreter, so this file's code runs everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from dataclasses import dataclass

import pytest
import torch
from test_estimator_cascade_kernel import _last_tile_boundary
from test_optimized import check_attention, check_selection
from test_optimized_estimators import _assert_masks_agree, _stage_boundary

from helpers import make_qkv
from prism import optimized, reference
from prism.optimized.cascade import (
    candidate_antidiagonal_tile_probabilities,
    prism_candidate_tiles_kernel,
)
from prism.optimized.estimators import antidiagonal_tile_probabilities
from prism.optimized.vertical_slash import last_query_distributions_kernel
from prism.reference import PrismConfig, tile_layout
from prism.reference.estimators import (
    antidiagonal_probabilities,
    candidate_antidiagonal_probabilities,
    last_query_distributions,
    prism_candidate_tiles,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

CASES = int(os.environ.get("PRISM_GPU_FUZZ_CASES", "40"))
#: Seed of the first case: a run from another seed draws cases no earlier run drew.
FIRST = int(os.environ.get("PRISM_GPU_FUZZ_FIRST", "0"))
#: Largest B x Hq x Nq x Nk of a case (the reference attention holds that many fp32
#: scores).
MAX_SCORES = 1 << 28


@dataclass(frozen=True)
class Case:
    seed: int
    batch: int
    q_heads: int
    kv_heads: int
    num_queries: int
    num_keys: int
    head_dim: int
    value_dim: int
    block_size: int
    causal: bool
    dtype: torch.dtype
    strided: bool
    rope_layout: str
    sharpness: float


def draw_case(seed: int) -> Case:
    """One random case; the same seed gives the same case."""
    rng = random.Random(seed)
    head_dim = rng.choice([64, 64, 80, 96, 128, 128, 128, 160, 192, 256])
    value_dim = 128 if head_dim == 192 and rng.random() < 0.5 else head_dim
    kv_heads = rng.choice([1, 2])
    group = rng.choice([1, 2, 3, 4, 6, 8])
    block_size = rng.choice([32, 64, 128, 128])
    causal = rng.random() < 0.8
    num_keys = rng.randint(1, 9000)
    if causal:
        # Often a whole-length call, else a chunk over a KV prefix.
        num_queries = num_keys if rng.random() < 0.5 else rng.randint(1, num_keys)
    else:
        num_queries = rng.randint(1, 9000)
    batch = rng.choice([1, 1, 2, 3])
    while batch * kv_heads * group * num_queries * num_keys > MAX_SCORES:
        num_queries = max(1, num_queries // 2)
        num_keys = max(num_queries if causal else 1, num_keys // 2)
    return Case(seed=seed, batch=batch, q_heads=kv_heads * group, kv_heads=kv_heads,
                num_queries=num_queries, num_keys=num_keys, head_dim=head_dim,
                value_dim=value_dim, block_size=block_size, causal=causal,
                dtype=rng.choice([torch.bfloat16, torch.float16]),
                strided=rng.random() < 0.3, rope_layout=rng.choice(["half", "interleaved"]),
                sharpness=rng.choice([1.0, 2.0, 3.0]))


def make_inputs(case: Case):
    """q, k, v on the GPU; as (B, N, H, D) storage seen through transposes when strided."""
    q, k, v = make_qkv(case.batch, case.q_heads, case.kv_heads, case.num_queries,
                       case.num_keys, case.head_dim, base=500000.0, layout=case.rope_layout,
                       dtype=case.dtype, seed=case.seed, causal=case.causal,
                       value_dim=case.value_dim, sharpness=case.sharpness)
    if case.strided:
        return tuple(t.transpose(1, 2).contiguous().to(DEVICE).transpose(1, 2) for t in (q, k, v))
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def _label(seed: int) -> str:
    case = draw_case(seed)
    return (f"case_{seed}-b{case.batch}-h{case.q_heads}x{case.kv_heads}-"
            f"{case.num_queries}x{case.num_keys}-d{case.head_dim}-bs{case.block_size}"
            f"{'' if case.causal else '-noncausal'}{'-strided' if case.strided else ''}")


SEEDS = list(range(FIRST, FIRST + CASES))


@pytest.mark.parametrize("seed", SEEDS, ids=_label)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_prism_selection_and_attention(seed, record_property):
    case = draw_case(seed)
    q, k, v = make_inputs(case)
    originals = [t.clone() for t in (q, k, v)]
    rng = random.Random(seed + 1)
    overrides = dict(block_size=case.block_size, rope_layout=case.rope_layout,
                     high_threshold=rng.choice([0.8, 0.9, 0.95]),
                     low_threshold=rng.choice([0.8, 0.9, 0.95]))
    record_property("boundary_ties", check_selection(q, k, causal=case.causal, **overrides))
    cfg = PrismConfig(**overrides)
    mask = reference.select_blocks(q, k, cfg, causal=case.causal)
    out_error, lse_error = check_attention(q, k, v, mask, block_size=case.block_size,
                                           causal=case.causal)
    record_property("out_error", out_error)
    record_property("lse_error", lse_error)
    selected = optimized.select_blocks(q, k, cfg, causal=case.causal)
    expected = optimized.block_sparse_attention(q, k, v, selected, block_size=case.block_size,
                                                causal=case.causal)
    got = optimized.prism_attention(q, k, v, cfg, causal=case.causal)
    assert torch.equal(got, expected)
    for before, after in zip(originals, (q, k, v), strict=True):
        assert torch.equal(before, after), "an input was modified"


def _estimator_inputs(seed: int):
    """The case, its q and its k (strides 8 and 16 divide every tile drawn)."""
    case = draw_case(seed)
    q, k, _ = make_inputs(case)
    return case, q, k


@pytest.mark.parametrize("seed", SEEDS, ids=_label)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_accurate_preset(seed):
    case, q, k = _estimator_inputs(seed)
    cfg = PrismConfig.preset("accurate").replace(block_size=case.block_size,
                                                 rope_layout=case.rope_layout)
    layout = tile_layout(case.num_queries, case.num_keys, case.block_size, case.causal)
    stride = cfg.antidiagonal_stride
    cand = prism_candidate_tiles_kernel(q, k, cfg, case.causal)
    got = candidate_antidiagonal_tile_probabilities(q, k, layout, stride, cand, case.causal)
    probs = candidate_antidiagonal_probabilities(q, k, layout, stride, cand, case.causal)
    torch.testing.assert_close(got, probs, rtol=1e-4, atol=1e-5)
    vertical, slash = last_query_distributions_kernel(q, k, layout, cfg.last_queries,
                                                      case.causal)
    ref_vertical, ref_slash = last_query_distributions(q, k, layout, cfg.last_queries,
                                                       case.causal)
    torch.testing.assert_close(vertical, ref_vertical, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(slash, ref_slash, rtol=1e-4, atol=1e-6)
    mask = optimized.select_blocks(q, k, cfg, causal=case.causal)
    expected = reference.select_blocks(q, k, cfg, causal=case.causal)
    # Rows whose Prism candidates differ from the reference's (boundary ties of the
    # candidate top-p) may differ anywhere; elsewhere only at the top-p boundaries.
    same = (prism_candidate_tiles(q, k, cfg, case.causal, reference.trace_selection)
            == cand).all(-1)
    boundary = (_stage_boundary(probs, cfg, layout, case.causal) | ~same[..., None]
                | _last_tile_boundary(q, k, cfg, layout, case.causal))
    _assert_masks_agree(mask.as_subclass(torch.Tensor), expected, boundary)
    assert same.float().mean() >= 0.9, "candidates differ in more than a tenth of the rows"


@pytest.mark.parametrize("seed", SEEDS, ids=_label)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_antidiagonal_vertical_slash(seed):
    case, q, k = _estimator_inputs(seed)
    cfg = PrismConfig(block_size=case.block_size, estimator="antidiagonal_vertical_slash",
                      antidiagonal_stride=8, vertical_slash_threshold=0.5, last_queries=64,
                      high_threshold=0.9)
    layout = tile_layout(case.num_queries, case.num_keys, case.block_size, case.causal)
    probs = antidiagonal_probabilities(q, k, layout, 8, case.causal)
    got = antidiagonal_tile_probabilities(q, k, layout, 8, case.causal)
    torch.testing.assert_close(got, probs, rtol=1e-4, atol=1e-5)
    mask = optimized.select_blocks(q, k, cfg, causal=case.causal)
    expected = reference.select_blocks(q, k, cfg, causal=case.causal)
    _assert_masks_agree(mask.as_subclass(torch.Tensor), expected,
                        _stage_boundary(probs, cfg, layout, case.causal))


def _shrunk(seed: int) -> Case:
    """The case of ``seed`` at interpreter sizes: at most 300 tokens, a quarter of the
    head dim (a multiple of 8), batch at most 2, fp16 (the interpreter's bf16 products
    are wrong)."""
    case = _DRAW(seed)
    d = max(16, case.head_dim // 4 // 8 * 8)
    dv = d if case.value_dim == case.head_dim else max(16, case.value_dim // 4 // 8 * 8)
    nk = min(case.num_keys, 300)
    nq = min(case.num_queries, nk if case.causal else 300)
    return dataclasses.replace(case, num_keys=nk, num_queries=nq, batch=min(case.batch, 2),
                               head_dim=d, value_dim=dv, dtype=torch.float16)


_DRAW = draw_case


@pytest.mark.interpret
@pytest.mark.skipif(CUDA, reason="the GPU runs the full-size cases")
@pytest.mark.parametrize("seed", [2, 4, 7])
def test_the_checks_on_shrunk_cases(seed, monkeypatch):
    """The three checks above on a case shrunk to interpreter sizes (no GPU here)."""
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "draw_case", _shrunk)
    test_prism_selection_and_attention(seed, lambda *args: None)
    test_accurate_preset(seed)
    test_antidiagonal_vertical_slash(seed)
