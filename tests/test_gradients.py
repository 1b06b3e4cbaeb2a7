"""Gradients through the optimized attention calls (prism.optimized.gradients).

The kernels compute forward passes only; with grad mode on and an input that
requires grad, the outputs carry a backward that recomputes contract §7's
softmax per chunk of query rows. Checked against autograd through the
reference (a different computation: the reference's own ops, differentiated
by torch), eager and under ``torch.compile``, on the CPU in Triton's
interpreter (the same code runs on CUDA).
"""

from __future__ import annotations

import pytest
import torch

import prism.optimized as optimized
from helpers import kernel_test_setup, make_qkv
from prism import reference

INTERPRETED, DEVICE, pytestmark = kernel_test_setup()


def _inputs(nq, nk, hq, hkv, d=16, dv=16, seed=0, dtype=torch.float32, needs=(1, 1, 1)):
    q, k, v = make_qkv(1, hq, hkv, nq, nk, d, seed=seed, dtype=dtype, sharpness=2.0)
    if dv != d:
        v = torch.randn(1, hkv, nk, dv, generator=torch.Generator().manual_seed(seed + 1),
                        dtype=dtype)
    return tuple(t.to(DEVICE).requires_grad_(bool(n)) for t, n in zip((q, k, v), needs,
                                                                      strict=True))


def _loss_weights(o, lse, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(o.shape, generator=gen).to(o.device),
            torch.randn(lse.shape, generator=gen).to(o.device))


def _grads(loss, tensors):
    wanted = [t for t in tensors if t.requires_grad]
    found = iter(torch.autograd.grad(loss, wanted))
    return [next(found) if t.requires_grad else None for t in tensors]


def _close(got, expected, rtol=2e-5):
    for g, e in zip(got, expected, strict=True):
        if e is None:
            assert g is None
            continue
        assert g.dtype == e.dtype and g.shape == e.shape
        scale = e.float().abs().max().clamp_min(1e-6)
        assert float((g.float() - e.float()).abs().max() / scale) <= rtol


CASES = [  # nq, nk, hq, hkv, dv, causal
    (64, 64, 4, 2, 16, True),
    (48, 80, 4, 1, 16, True),    # KV prefix, GQA 4
    (64, 64, 2, 2, 24, False),   # non-causal, no GQA, Dv != D
]


@pytest.mark.parametrize("nq,nk,hq,hkv,dv,causal", CASES)
def test_prism_attention_gradients_equal_autograd_through_the_reference(nq, nk, hq, hkv, dv,
                                                                        causal):
    q, k, v = _inputs(nq, nk, hq, hkv, dv=dv, seed=nq + nk)
    o, lse, mask = optimized.prism_attention(q, k, v, block_size=16, causal=causal,
                                             return_lse=True, return_mask=True)
    assert o.grad_fn is not None and lse.grad_fn is not None
    w_o, w_lse = _loss_weights(o, lse, seed=3)
    got = _grads((o * w_o).sum() + (lse * w_lse).sum(), (q, k, v))
    ref_o, ref_lse = reference.block_sparse_attention(q, k, v, mask.as_tensor(), block_size=16,
                                                      causal=causal, return_lse=True)
    expected = _grads((ref_o * w_o).sum() + (ref_lse * w_lse).sum(), (q, k, v))
    _close(got, expected)
    # The forward values are the kernels' own, as without gradients.
    with torch.no_grad():
        plain = optimized.prism_attention(q, k, v, block_size=16, causal=causal)
    assert torch.equal(o.detach(), plain)


def test_block_sparse_gradients_for_some_inputs_over_several_chunks(monkeypatch):
    """Only q and v require grad (dk is never formed), and the query tiles run one
    chunk each, so dq is written chunk by chunk and dv summed over them."""
    from prism.optimized import gradients

    q, k, v = _inputs(80, 80, 4, 2, seed=5, needs=(1, 0, 1))
    mask = optimized.select_blocks(q.detach(), k, block_size=16)
    expected_o = reference.block_sparse_attention(q, k, v, mask.as_tensor(), block_size=16)
    w_o = _loss_weights(expected_o, expected_o[..., 0], seed=7)[0]
    expected = _grads((expected_o * w_o).sum(), (q, k, v))
    monkeypatch.setattr(gradients, "CHUNK_BYTES", 1)  # one query tile per chunk
    o = optimized.block_sparse_attention(q, k, v, mask, block_size=16)
    got = _grads((o * w_o).sum(), (q, k, v))
    assert got[1] is None
    _close(got, expected)


def test_half_precision_gradients_come_in_the_input_dtype():
    q, k, v = _inputs(64, 64, 2, 1, seed=9, dtype=torch.float16)
    o = optimized.prism_attention(q, k, v, block_size=16)
    dq, dk, dv = _grads(o.float().sum(), (q, k, v))
    assert (dq.dtype, dk.dtype, dv.dtype) == (torch.float16,) * 3
    mask = optimized.select_blocks(q.detach(), k.detach(), block_size=16).as_tensor()
    ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask, block_size=16)
    _close((dq.float(), dk.float(), dv.float()),
           [g.float() for g in _grads(ref.sum(), (q, k, v))], rtol=2e-3)


def test_rows_with_no_key_get_zero_gradients_not_nan():
    """A non-causal mask with an empty query tile: that tile's rows give o = 0 and
    lse = -inf, and zero gradients even when the loss reads lse elsewhere."""
    q, k, v = _inputs(64, 64, 2, 1, seed=13)
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool, device=DEVICE)
    mask[:, :, 1] = False
    o, lse = optimized.block_sparse_attention(q, k, v, mask, block_size=16, causal=False,
                                              return_lse=True)
    assert torch.isinf(lse[:, :, 16:32]).all()
    finite = torch.where(torch.isfinite(lse), lse, 0.0)
    dq, dk, dv = _grads(o.sum() + finite.sum(), (q, k, v))
    assert all(bool(torch.isfinite(g).all()) for g in (dq, dk, dv))
    assert not dq[:, :, 16:32].any() and dq[:, :, :16].abs().sum() > 0


def test_no_backward_when_no_gradient_is_wanted():
    q, k, v = _inputs(64, 64, 2, 1, seed=17, needs=(0, 0, 0))
    assert optimized.prism_attention(q, k, v, block_size=16).grad_fn is None
    q.requires_grad_(True)
    with torch.no_grad():
        assert optimized.prism_attention(q, k, v, block_size=16).grad_fn is None
        mask = optimized.select_blocks(q, k, block_size=16)
        assert optimized.block_sparse_attention(q, k, v, mask, block_size=16).grad_fn is None


@pytest.mark.parametrize("return_mask", [False, True])
def test_compiled_calls_differentiate_like_eager(return_mask):
    """Under torch.compile the operators' registered backward: without a returned mask
    the selection is made again for it (the same mask, deterministic kernels)."""
    q, k, v = _inputs(64, 64, 4, 2, seed=21)
    torch._dynamo.reset()

    def layer(q, k, v):
        result = optimized.prism_attention(q, k, v, block_size=16, return_lse=True,
                                           return_mask=return_mask)
        return result[:2]

    def two_calls(q, k, v):
        mask = optimized.select_blocks(q, k, block_size=16)
        return optimized.block_sparse_attention(q, k, v, mask, block_size=16,
                                                return_lse=True)

    for fn in (layer, two_calls):
        o, lse = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
        w_o, w_lse = _loss_weights(o, lse, seed=23)
        got = _grads((o * w_o).sum() + (lse * w_lse).sum(), (q, k, v))
        eager_o, eager_lse = fn(q, k, v)
        expected = _grads((eager_o * w_o).sum() + (eager_lse * w_lse).sum(), (q, k, v))
        _close(got, expected, rtol=1e-6)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)


def test_varlen_gradients_equal_autograd_through_the_reference():
    """A packed batch with an empty, a one-token and prefixed sequences: each sequence's
    gradients are its own, as autograd through the reference's per-sequence loop."""
    q_lens, k_lens = [40, 0, 1, 56], [40, 8, 20, 70]
    gen = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(sum(lens), heads, 16, generator=gen).to(DEVICE).requires_grad_()
               for lens, heads in ((q_lens, 4), (k_lens, 2), (k_lens, 2)))
    args = (_cu(q_lens), _cu(k_lens), max(q_lens), max(k_lens))
    o, lse, masks = optimized.prism_attention_varlen(q, k, v, *args, block_size=16,
                                                     return_lse=True, return_mask=True)
    assert o.grad_fn is not None
    w_o, w_lse = _loss_weights(o, lse, seed=33)

    def loss(o, lse):  # lse is -inf on rows without keys (none here, but kept general)
        return (o * w_o).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * w_lse).sum()

    got = _grads(loss(o, lse), (q, k, v))
    plain = [m.as_tensor() for m in masks]
    ref_o, ref_lse = reference.block_sparse_attention_varlen(q, k, v, *args, plain,
                                                             block_size=16, return_lse=True)
    _close(got, _grads(loss(ref_o, ref_lse), (q, k, v)))
    with torch.no_grad():
        assert torch.equal(o, optimized.prism_attention_varlen(q, k, v, *args, block_size=16))


def test_paged_calls_refuse_to_drop_gradients():
    q = torch.randn(32, 2, 16, device=DEVICE, requires_grad=True)
    cache = torch.randn(2, 16, 1, 16, device=DEVICE)
    table = torch.arange(2, dtype=torch.int32, device=DEVICE).reshape(1, 2)
    args = (q, cache, cache, table, torch.tensor([32], dtype=torch.int32, device=DEVICE),
            _cu([32]), 32)
    with pytest.raises(TypeError, match="forward passes only.*prism_attention_varlen"):
        optimized.prism_attention_paged(*args, block_size=16)
    with torch.no_grad():
        assert optimized.prism_attention_paged(*args, block_size=16).shape == (32, 2, 16)
