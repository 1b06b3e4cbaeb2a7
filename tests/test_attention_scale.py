"""Softmax scales of zero and below (contract §7: an explicit ``scale`` is any finite number).

The attention kernel keeps each row's running maximum of the raw scores and
scales it afterwards, which is right only for a positive scale; the launch
code hands it ``-q`` and ``|scale|`` for a negative scale, and ``0 * q`` with
scale 1 for a zero one (``prism.optimized.attention.positive_scale``). These
tests compare every public attention entry point of ``prism.optimized`` with
the reference at such scales: dense, packed (varlen) and paged, alone and
through ``prism_attention``. On the CPU the kernels run in Triton's
interpreter (fp32); the ``gpu`` tests run bf16 on the real launch shapes.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from test_varlen import make_batch, to_pages  # noqa: E402
from test_varlen_kernel import _kernels, random_masks  # noqa: E402

from helpers import assert_attention_close, make_qkv  # noqa: E402
from prism import reference  # noqa: E402

SCALES = [0.0, -0.0, -0.3, -2.0]


def _finite(*tensors):
    for t in tensors:
        assert torch.isfinite(t).all(), "NaN or Inf in an output"


def _dense_case(device, dtype, nq=80, nk=80):
    q, k, v = make_qkv(1, 4, 2, nq, nk, 32, dtype=dtype, seed=3)
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(1, 4, -(-nq // 32), -(-nk // 32), generator=gen) < 0.6
    return [t.to(device) for t in (q, k, v, mask)]


@pytest.mark.interpret
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("causal", [True, False])
def test_dense_attention_at_non_positive_scales(scale, causal):
    optimized, _, device = _kernels()
    q, k, v, mask = _dense_case(device, torch.float32)
    out, lse = optimized.block_sparse_attention(q, k, v, mask, block_size=32, causal=causal,
                                                scale=scale, return_lse=True)
    exp_out, exp_lse = reference.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(),
                                                        block_size=32, causal=causal,
                                                        scale=scale, return_lse=True)
    reads = exp_lse > float("-inf")
    _finite(out[reads.to(out.device)], lse[reads.to(lse.device)])
    assert_attention_close(out.cpu(), lse.cpu(), exp_out, exp_lse, q.cpu(), k.cpu(), v.cpu(),
                           scale=scale)
    if scale == 0.0:
        # Every score is 0: lse is ln(keys read), the output their values' mean.
        assert torch.allclose(lse.cpu()[reads], exp_lse[reads], rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_prism_attention_at_non_positive_scales(scale):
    optimized, _, device = _kernels()
    q, k, v, _ = _dense_case(device, torch.float32, nq=64, nk=96)
    out, lse = optimized.prism_attention(q, k, v, block_size=32, scale=scale, return_lse=True)
    mask = reference.select_blocks(q.cpu(), k.cpu(), block_size=32)
    exp_out, exp_lse = reference.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), mask,
                                                        block_size=32, scale=scale,
                                                        return_lse=True)
    _finite(out, lse)
    assert_attention_close(out.cpu(), lse.cpu(), exp_out, exp_lse, q.cpu(), k.cpu(), v.cpu(),
                           scale=scale)


@pytest.mark.interpret
@pytest.mark.parametrize("scale", [0.0, -0.7])
def test_varlen_and_paged_attention_at_non_positive_scales(scale):
    optimized, _, device = _kernels()
    lengths = [40, 1, 70]
    seqs, (q, k, v), cu_q, cu_k = make_batch(lengths, lengths, hq=4, hkv=2, d=32, seed=11,
                                             device=device)
    masks = random_masks(lengths, lengths, 4, 32, True, seed=2, device=device)
    out, lse = optimized.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, max(lengths),
                                                       max(lengths), masks, block_size=32,
                                                       scale=scale, return_lse=True)
    k_cache, v_cache, table, seq_lens = to_pages(k.cpu(), v.cpu(), lengths, 16)
    k_cache, v_cache, table, seq_lens = (t.to(device) for t in (k_cache, v_cache, table,
                                                                 seq_lens))
    paged, paged_lse = optimized.prism_attention_paged(
        q, k_cache, v_cache, table, seq_lens, cu_q, max(lengths), block_size=32, scale=scale,
        return_lse=True)
    ref_paged, ref_paged_lse = reference.prism_attention_paged(
        q.cpu(), k_cache.cpu(), v_cache.cpu(), table.cpu(), seq_lens.cpu(), cu_q.cpu(),
        max(lengths), block_size=32, scale=scale, return_lse=True)
    _finite(out, paged, paged_lse)  # (random masks leave some rows without keys: lse -inf)
    start = 0
    for (sq, sk, sv), mask, n in zip(seqs, masks, lengths, strict=True):
        exp_out, exp_lse = reference.block_sparse_attention(
            sq.cpu(), sk.cpu(), sv.cpu(), mask.cpu(), block_size=32, scale=scale,
            return_lse=True)
        got = out[start:start + n].transpose(0, 1)[None].cpu()
        got_lse = lse[:, start:start + n][None].cpu()
        assert_attention_close(got, got_lse, exp_out, exp_lse, sq.cpu(), sk.cpu(), sv.cpu(),
                               scale=scale)
        start += n
    assert torch.allclose(paged.cpu(), ref_paged, rtol=1e-4, atol=1e-5)
    assert torch.allclose(paged_lse.cpu(), ref_paged_lse, rtol=1e-4, atol=1e-5)


@pytest.mark.interpret
def test_non_positive_scales_leave_q_alone():
    optimized, _, device = _kernels()
    q, k, v, mask = _dense_case(device, torch.float32)
    before = q.clone()
    for scale in (-1.0, 0.0):
        optimized.block_sparse_attention(q, k, v, mask, block_size=32, scale=scale)
    assert torch.equal(q, before)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [0.0, -0.125])
def test_gpu_non_positive_scales_bf16(scale):
    import prism.optimized as optimized

    q, k, v = make_qkv(2, 8, 2, 1024, 1024, 128, dtype=torch.bfloat16, seed=7)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    for _ in range(3):  # the repeats run the cached launch plans
        out, lse = optimized.prism_attention(q, k, v, scale=scale, return_lse=True)
    mask = reference.select_blocks(q.cpu().float(), k.cpu().float())
    exp_out, exp_lse = reference.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), mask,
                                                        scale=scale, return_lse=True)
    _finite(out, lse)
    assert_attention_close(out.cpu(), lse.cpu(), exp_out, exp_lse, q.cpu(), k.cpu(), v.cpu(),
                           scale=scale)
