"""Edge cases of the dense public calls, found by a red-team pass (docs/api.rst).

* second derivatives through the kernels' outputs (a gradient penalty) are the
  reference's, not the first-order ones alone;
* gradients of empty inputs are zeros, not an error from deep inside the backward;
* inputs that are not dense tensors get the reference's TypeError;
* a tile far longer than the sequence costs what the data costs, and tiles past
  int64 positions are refused with a ValueError;
* a scale too large for the kernels' float32 ``scale * log2(e)`` is refused;
* a TileMask written through ``.data`` serves attention after ``forget_indices``;
* on the GPU, exact scores at large logits are normalised to contract §10's
  exact-logit bound (the kernel subtracts the row maximum inside one fma).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import kernel_test_setup  # noqa: E402
from prism import optimized, reference  # noqa: E402
from prism.reference.tolerances import attention_tolerances  # noqa: E402

INTERPRETED, DEVICE, MARKS = kernel_test_setup()


def KERNELS(test):  # noqa: N802 - a decorator, named like pytest's marks
    """The interpret mark, and a skip where neither the interpreter nor a GPU exists."""
    for mark in MARKS:
        test = mark(test)
    return test


def _qkv(nq=64, nk=64, d=16, seed=0, b=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 2, nq, d, generator=gen)
    k = torch.randn(b, 1, nk, d, generator=gen)
    v = torch.randn(b, 1, nk, d, generator=gen)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def _penalty_gradients(impl, q0, k0, v0, block_size):
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    out = impl.prism_attention(q, k, v, block_size=block_size)
    (dq,) = torch.autograd.grad((out ** 2).sum(), q, create_graph=True)
    (dq.pow(2).sum()).backward()
    return q.grad, k.grad, v.grad


@KERNELS
@pytest.mark.parametrize("block_size", [32, 64])
def test_second_derivatives_are_the_references(block_size):
    """d/dq, d/dk, d/dv of |dL/dq|^2: the backward is recorded under create_graph."""
    q, k, v = _qkv(seed=1)
    expected = _penalty_gradients(reference, q, k, v, block_size)
    got = _penalty_gradients(optimized, q, k, v, block_size)
    for name, g, e in zip("qkv", got, expected, strict=True):
        assert g is not None, name
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=name)


@KERNELS
@pytest.mark.parametrize("b, nq, nk, causal", [(0, 16, 16, True), (1, 0, 16, True),
                                                (1, 16, 0, False)])
def test_gradients_of_empty_inputs_are_zeros(b, nq, nk, causal):
    q, k, v = (t.requires_grad_() for t in _qkv(nq, nk, b=b))
    out = optimized.prism_attention(q, k, v, block_size=32, causal=causal)
    (out.sum() + q.sum() + k.sum() + v.sum()).backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.ones_like(t))  # only the direct sums' ones


@pytest.mark.parametrize("impl", [reference, optimized], ids=["reference", "optimized"])
@pytest.mark.parametrize("bad", ["list", "none", "sparse"])
def test_inputs_that_are_not_dense_tensors_are_type_errors(impl, bad):
    q, k, v = (t.requires_grad_() for t in _qkv())
    value = {"list": [[1.0]], "none": None, "sparse": v.detach().to_sparse()}[bad]
    with pytest.raises(TypeError, match=r"^v must be a"):
        impl.prism_attention(q, k, value, block_size=32)
    with pytest.raises(TypeError, match=r"^v must be a"):
        impl.block_sparse_attention(q, k, value, torch.ones(1, 1, 2, 2, dtype=torch.bool,
                                                            device=q.device), block_size=32)


@pytest.mark.parametrize("block_size", [2**62 + 1, 2**70])
def test_tiles_past_int64_positions_are_refused(block_size):
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=r"block_size must be at most 2\*\*62"):
        reference.PrismConfig(block_size=block_size)
    with pytest.raises(ValueError, match=r"block_size must be at most 2\*\*62"):
        reference.block_sparse_attention(q, k, k, torch.ones(1, 1, 1, 1, dtype=torch.bool),
                                         block_size=block_size)


@KERNELS
@pytest.mark.parametrize("causal", [True, False])
def test_a_tile_far_longer_than_the_sequence(causal):
    """block_size 2**40 on 64 tokens: one tile, the reference's output; the pooling and
    check loops and the attention grid follow the 64 tokens (before, the interpreter
    ran about block_size / 32 loop steps per tile and never finished)."""
    q, k, v = _qkv(nq=40, nk=64, seed=2)
    from prism.optimized.attention import launch_block_size

    assert launch_block_size(2**40, 64, 64) == 128 and launch_block_size(64, 200, 64) == 64
    assert launch_block_size(2**40, 40, 300) == 512 and launch_block_size(96, 40, 64) == 96
    got, mask = optimized.prism_attention(q, k, v, block_size=2**40, causal=causal,
                                          return_mask=True)
    expected = reference.prism_attention(q, k, v, block_size=2**40, causal=causal)
    assert mask.shape == (1, 2, 1, 1) and bool(mask.all())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@KERNELS
def test_a_scale_past_float32_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale 3e\\+38 is too large for the kernels"):
        optimized.prism_attention(q, k, v, block_size=32, scale=3e38)
    # Tiny scores times a scale near the limit: finite scaled scores, the reference's.
    q = q * 1e-38
    full = torch.ones(1, 1, 2, 2, dtype=torch.bool, device=q.device)
    got = optimized.block_sparse_attention(q, k, v, full, block_size=32, scale=2e38)
    expected = reference.block_sparse_attention(q, k, v, full, block_size=32, scale=2e38)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@KERNELS
def test_a_mask_written_through_data_serves_after_forget_indices():
    q, k, v = _qkv(nq=96, nk=96, seed=3)
    mask = optimized.select_blocks(q, k, block_size=32)
    assert mask.carried_indices(block_size=32, causal=True, num_queries=96,
                                num_keys=96) is not None or not mask.is_cuda
    mask.data[..., 1:, 0] = False  # not counted by torch's version counter
    assert mask.forget_indices() is mask
    bits = mask.as_tensor().clone()
    got = optimized.block_sparse_attention(q, k, v, mask, block_size=32)
    expected = reference.block_sparse_attention(q, k, v, bits, block_size=32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask.kv_num_blocks.cpu(), reference.mask_to_indices(bits)[0].cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("lead", [5, 10, 20])
def test_exact_scores_at_large_logits_meet_the_exact_bound(lead):
    """Small integers with scale 1: every fp32 score is exact (up to 8 * lead^2 = 3200),
    rows nearly tied; contract §10 then bounds |o - o_64| by max|v| * 1e-5."""
    gen = torch.Generator().manual_seed(lead)
    n, d = 256, 16
    q = torch.randint(-1, 2, (1, 2, n, d), generator=gen).float()
    k = torch.randint(-1, 2, (1, 1, n, d), generator=gen).float()
    q[..., :8] = lead
    k[..., :8] = lead
    v = torch.randint(-4, 5, (1, 1, n, d), generator=gen).float()
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    got = optimized.block_sparse_attention(q.cuda(), k.cuda(), v.cuda(), mask.cuda(),
                                           block_size=64, scale=1.0).cpu().double()
    scores = q.double() @ k.double().transpose(-1, -2)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v.double()  # float64, one KV head for both
    tol = attention_tolerances(q, k, v, 1.0, exact_logits=True)["out"]
    assert (got - expected).abs().max().item() <= tol
