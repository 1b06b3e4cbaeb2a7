"""Random packed batches through the serving calls (docs/serving.rst), against the reference.

test_gpu_fuzz.py draws dense batches. Engines call the packed forms instead:
sequences of mixed lengths (empty, one token, a KV prefix) in one
``(tokens, H, D)`` tensor, K and V in shuffled pages of a cache, prompts in
chunks over a cached prefix, with Prism's default or the accurate preset.
Each case here is drawn from a generator seeded with its number
(``pytest -k "case_7"`` reruns one) and checks, sequence by sequence:

* ``prism_attention_varlen``: each sequence's mask is the reference's
  ``select_blocks`` on that sequence alone, up to boundary ties
  (``boundary_ties`` of the sequence, which covers every top-p decision of the
  accurate preset too); the output and log-sum-exp equal the reference's
  block-sparse attention on the returned masks;
* ``prism_attention_paged`` on a shuffled paged copy of the same keys: the same
  checks (causal cases);
* chunked prefill (causal cases): the queries in two chunks over the paged
  cache, with Prism's pooled-key caches, each chunk checked against the
  reference on (chunk, prefix + chunk);
* no input is modified.

``PRISM_GPU_FUZZ_CASES`` sets the number of cases on the GPU (default 40) and
``PRISM_GPU_FUZZ_FIRST`` the first seed. Without a GPU, three cases shrunk to
interpreter sizes run the same checks in Triton's interpreter.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch
from test_varlen import make_batch, to_pages

from helpers import TOLERANCE, relative_error
from prism import optimized, reference
from prism.reference import PooledKeyCache, PrismConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CASES = int(os.environ.get("PRISM_GPU_FUZZ_CASES", "40"))
FIRST = int(os.environ.get("PRISM_GPU_FUZZ_FIRST", "0"))
#: Looser than contract §6's constants: the kernels sum in other fp32 orders, and a
#: long row's neighbouring probabilities can differ by a few 1e-7 (test_optimized.py).
TIE_MARGIN, TIE_RELATIVE = 1e-4, 1e-5


@dataclass(frozen=True)
class ServingCase:
    seed: int
    lengths_q: tuple
    lengths_k: tuple
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    page_size: int
    causal: bool
    dtype: torch.dtype
    layout: str
    preset: str


def draw_case(seed: int, small: bool = not CUDA) -> ServingCase:
    """One random case; the same seed gives the same case. ``small``: interpreter sizes."""
    rng = random.Random(seed)
    longest = 80 if small else 4096
    causal = rng.random() < 0.8
    lengths_q, lengths_k = [], []
    for _ in range(rng.randint(1, 3 if small else 6)):
        nk = rng.choice([0, 1, rng.randint(1, longest), rng.randint(1, longest)])
        if causal:
            nq = nk if rng.random() < 0.5 else rng.randint(0, nk)
        else:
            nq = rng.choice([0, 1, rng.randint(1, longest)])
        lengths_q.append(nq)
        lengths_k.append(nk)
    kv_heads = rng.choice([1, 2])
    return ServingCase(
        seed=seed, lengths_q=tuple(lengths_q), lengths_k=tuple(lengths_k),
        q_heads=kv_heads * rng.choice([1, 2, 4] if small else [1, 2, 4, 8]),
        kv_heads=kv_heads, head_dim=rng.choice([16, 32] if small else [64, 96, 128]),
        block_size=rng.choice([16, 32] if small else [64, 128]),
        page_size=rng.choice([16, 24] if small else [16, 64, 128, 256]),
        causal=causal,
        dtype=rng.choice([torch.float32, torch.float16] if small
                         else [torch.bfloat16, torch.float16]),
        layout=rng.choice(["half", "interleaved"]),
        preset=rng.choice(["paper", "paper", "accurate"]))


def _label(seed: int) -> str:
    c = draw_case(seed)
    return (f"case_{seed}-{c.preset}-h{c.q_heads}x{c.kv_heads}-d{c.head_dim}-bs{c.block_size}"
            f"-p{c.page_size}-{'causal' if c.causal else 'noncausal'}-n{len(c.lengths_q)}")


def _config(case: ServingCase) -> PrismConfig:
    return PrismConfig.preset(case.preset, block_size=case.block_size, rope_layout=case.layout)


def _check_sequence(mask, q, k, v, cfg, causal, out, lse, label):
    """One sequence ((1, H, N, D) views): mask up to ties, outputs on that mask."""
    expected = reference.select_blocks(q, k, cfg, causal=causal)
    assert mask.shape == expected.shape, label
    ties = reference.boundary_ties(q, k, cfg, causal=causal, margin=TIE_MARGIN,
                                   relative=TIE_RELATIVE)
    differ = reference.mask_differences(mask.cpu(), expected.cpu(), ties.cpu())
    assert differ.numel() == 0, f"{label}: mask differs at {differ[:5].tolist()}"
    if q.shape[2] == 0:
        return  # no query row: nothing to attend
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, mask, block_size=cfg.block_size,
                                                        causal=causal, return_lse=True)
    error = relative_error(out.float(), ref_out[0].transpose(0, 1).float())
    assert error <= TOLERANCE[q.dtype], f"{label}: output error {error:.2e}"
    finite = torch.isfinite(ref_lse[0])
    assert torch.equal(torch.isfinite(lse), finite), f"{label}: -inf rows differ"
    if finite.any():
        lse_error = relative_error(lse[finite], ref_lse[0][finite])
        assert lse_error <= 1e-5, f"{label}: lse error {lse_error:.2e}"


def _batch(case: ServingCase):
    return make_batch(case.lengths_q, case.lengths_k, hq=case.q_heads, hkv=case.kv_heads,
                      d=case.head_dim, layout=case.layout, dtype=case.dtype,
                      causal=case.causal, seed=case.seed, device=DEVICE)


def run_varlen_and_paged(case: ServingCase):
    cfg = _config(case)
    seqs, (q, k, v), cu_q, cu_k = _batch(case)
    before = [t.clone() for t in (q, k, v, cu_q, cu_k)]
    max_q, max_k = max(case.lengths_q), max(case.lengths_k)
    out, lse, masks = optimized.prism_attention_varlen(
        q, k, v, cu_q, cu_k, max_q, max_k, cfg, causal=case.causal, return_lse=True,
        return_mask=True)
    for i, (sq, sk, sv) in enumerate(seqs):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        _check_sequence(masks[i], sq, sk, sv, cfg, case.causal, out[rows], lse[:, rows],
                        f"varlen sequence {i}")
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, cu_q, cu_k), strict=True))
    if not case.causal:
        return
    k_cache, v_cache, table, seq_lens = to_pages(k.cpu(), v.cpu(), list(case.lengths_k),
                                                 case.page_size, seed=case.seed)
    k_cache, v_cache, table, seq_lens = (t.to(DEVICE) for t in (k_cache, v_cache, table,
                                                                 seq_lens))
    out, lse, masks = optimized.prism_attention_paged(
        q, k_cache, v_cache, table, seq_lens, cu_q, max_q, cfg, return_lse=True,
        return_mask=True)
    for i, (sq, sk, sv) in enumerate(seqs):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        _check_sequence(masks[i], sq, sk, sv, cfg, True, out[rows], lse[:, rows],
                        f"paged sequence {i}")


def run_chunked(case: ServingCase):
    """Every sequence's queries in two chunks over its paged cache (causal)."""
    cfg = _config(case)
    seqs, (q, k, v), cu_q, _ = _batch(case)
    k_cache, v_cache, table, _ = to_pages(k.cpu(), v.cpu(), list(case.lengths_k),
                                          case.page_size, seed=case.seed)
    k_cache, v_cache, table = (t.to(DEVICE) for t in (k_cache, v_cache, table))
    prefixes = [nk - nq for nq, nk in zip(case.lengths_q, case.lengths_k, strict=True)]
    cuts = [nq // 2 for nq in case.lengths_q]
    # A cache holds a sequence's pooled key tiles from its start: prefixed sequences
    # (whose prefix was never prefilled here) run without one, and so does every
    # estimator but Prism's (the others read raw keys; the call refuses caches there).
    caches = [PooledKeyCache(case.block_size) if p == 0 and cfg.estimator == "prism" else None
              for p in prefixes]
    for part in range(2):
        lo = [0 if part == 0 else c for c in cuts]
        hi = [c if part == 0 else nq for c, nq in zip(cuts, case.lengths_q, strict=True)]
        rows = [torch.arange(int(cu_q[i]) + lo[i], int(cu_q[i]) + hi[i], device=DEVICE)
                for i in range(len(seqs))]
        chunk_q = q[torch.cat(rows)] if rows else q[:0]
        sizes = [h - lo_i for lo_i, h in zip(lo, hi, strict=True)]
        cu = torch.tensor([0, *sizes], device=DEVICE).cumsum(0).to(torch.int32)
        seq_lens = torch.tensor([p + h for p, h in zip(prefixes, hi, strict=True)],
                                dtype=torch.int32, device=DEVICE)
        out, lse, masks = optimized.prism_attention_paged(
            chunk_q, k_cache, v_cache, table, seq_lens, cu, max(sizes), cfg, return_lse=True,
            return_mask=True, pooled_keys=caches)
        for i, (sq, sk, sv) in enumerate(seqs):
            end = prefixes[i] + hi[i]
            _check_sequence(masks[i], sq[:, :, lo[i]:hi[i]], sk[:, :, :end], sv[:, :, :end],
                            cfg, True, out[int(cu[i]):int(cu[i + 1])],
                            lse[:, int(cu[i]):int(cu[i + 1])], f"chunk {part} sequence {i}")


SEEDS = list(range(FIRST, FIRST + CASES))


@pytest.mark.gpu
@pytest.mark.parametrize("seed", SEEDS, ids=_label)
def test_varlen_and_paged(seed):
    run_varlen_and_paged(draw_case(seed))


@pytest.mark.gpu
@pytest.mark.parametrize("seed", SEEDS, ids=_label)
def test_chunked_prefill(seed):
    case = draw_case(seed)
    if not case.causal:
        pytest.skip("chunked prefill is causal")
    run_chunked(case)


@pytest.mark.interpret
@pytest.mark.parametrize("seed", [3, 5, 14, 0])
def test_the_checks_on_shrunk_cases(seed):
    """The same checks at interpreter sizes, so this file's code runs in CI: the accurate
    preset over KV prefixes, a batch of three empty sequences, Prism's default with
    prefixes and an empty sequence, and a non-causal case."""
    if CUDA:
        pytest.skip("the GPU runs the full-size cases")
    case = draw_case(seed, small=True)
    run_varlen_and_paged(case)
    if case.causal:
        run_chunked(case)


def test_cases_cover_the_serving_shapes():
    """The drawn cases include what engines send: empty and one-token sequences, prefixes,
    both presets, every page size."""
    cases = [draw_case(s, small=False) for s in range(40)]
    lengths = [n for c in cases for n in c.lengths_q]
    assert 0 in lengths and 1 in lengths
    assert any(nk > nq for c in cases for nq, nk in zip(c.lengths_q, c.lengths_k,
                                                         strict=True))
    assert {c.preset for c in cases} == {"paper", "accurate"}
    assert {c.page_size for c in cases} == {16, 64, 128, 256}
    assert {c.causal for c in cases} == {True, False}


def test_the_sequence_check_can_fail():
    """A flipped tile away from the ties, or an output off by more than the tolerance,
    is reported."""
    case = draw_case(14, small=True)
    cfg = _config(case)
    seqs, _, _, _ = make_batch(case.lengths_q[:1], case.lengths_k[:1], hq=case.q_heads,
                               hkv=case.kv_heads, d=case.head_dim, dtype=torch.float32,
                               causal=True, seed=case.seed)
    q, k, v = seqs[0]
    mask = reference.select_blocks(q, k, cfg)
    out, lse = reference.block_sparse_attention(q, k, v, mask, block_size=cfg.block_size,
                                                return_lse=True)
    out, lse = out[0].transpose(0, 1), lse[0]
    _check_sequence(mask, q, k, v, cfg, True, out, lse, "as computed")
    flipped = mask.clone()
    flipped[0, 0, -1, 1] = ~flipped[0, 0, -1, 1]
    with pytest.raises(AssertionError, match="mask differs"):
        _check_sequence(flipped, q, k, v, cfg, True, out, lse, "flipped")
    with pytest.raises(AssertionError, match="output error"):
        _check_sequence(mask, q, k, v, cfg, True, out + 0.1, lse, "shifted")
