"""Contract §8: bad input raises a clear error naming the argument; inputs are never modified."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prism.reference import (
    PrismConfig,
    block_sparse_attention,
    mask_to_indices,
    prism_attention,
    select_blocks,
)


def _qkv(b=1, hq=4, hkv=2, nq=64, nk=64, d=32, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(b, hq, nq, d, generator=gen).to(dtype),
            torch.randn(b, hkv, nk, d, generator=gen).to(dtype),
            torch.randn(b, hkv, nk, d, generator=gen).to(dtype))


def _raises(exc, words, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from error message: {message}"
    return message


q, k, v = _qkv()

BAD_QK = [
    ("rank of q", ValueError, ["q", "4 dimensions"], (q[0], k), {}),
    ("rank of k", ValueError, ["k", "4 dimensions"], (q, k[0]), {}),
    ("q not a tensor", TypeError, ["q", "Tensor"], (q.numpy(), k), {}),
    ("batch mismatch", ValueError, ["batch"], (torch.cat([q, q]), k), {}),
    ("head_dim mismatch", ValueError, ["head_dim"], (q, k[..., :16]), {}),
    ("GQA", ValueError, ["multiple", "heads"], (q[:, :3], k), {}),
    ("Nq > Nk causal", ValueError, ["Nq <= Nk", "causal=False"], (q, k[:, :, :10]), {}),
    ("int dtype", TypeError, ["q", "float"], (q.long(), k), {}),
    ("mixed dtypes", TypeError, ["k", "dtype"], (q, k.half()), {}),
    ("odd head dim", ValueError, ["head_dim", "even"], (q[..., :31], k[..., :31]), {}),
    ("block_size 0", ValueError, ["block_size", ">= 1"], (q, k), {"block_size": 0}),
    ("block_size float", TypeError, ["block_size"], (q, k), {"block_size": 64.0}),
    ("threshold 0", ValueError, ["high_threshold", "(0, 1]"], (q, k), {"high_threshold": 0.0}),
    ("threshold > 1", ValueError, ["low_threshold"], (q, k), {"low_threshold": 1.5}),
    ("odd band", ValueError, ["high_dim", "even"], (q, k), {"high_dim": 7}),
    ("zero band", ValueError, ["low_dim"], (q, k), {"low_dim": 0}),
    ("band > D", ValueError, ["low_dim", "head_dim"], (q, k), {"low_dim": 64}),
    ("layout", ValueError, ["rope_layout", "half"], (q, k), {"rope_layout": "neox"}),
    ("temperature", ValueError, ["high_temperature"], (q, k), {"high_temperature": 0.0}),
    ("unknown field", TypeError, ["unknown", "blocksize"], (q, k), {"blocksize": 64}),
    ("causal not bool", TypeError, ["causal"], (q, k), {"causal": "yes"}),
    ("config type", TypeError, ["config", "PrismConfig"], (q, k, {"block_size": 64}), {}),
]


@pytest.mark.parametrize("name,exc,words,args,kwargs", BAD_QK, ids=[c[0] for c in BAD_QK])
def test_select_blocks_rejects_bad_input(name, exc, words, args, kwargs):
    _raises(exc, words, select_blocks, *args, **kwargs)


@pytest.mark.parametrize("name,exc,words,args,kwargs", BAD_QK, ids=[c[0] for c in BAD_QK])
def test_prism_attention_rejects_bad_input(name, exc, words, args, kwargs):
    qq, kk = args[0], args[1]
    vv = v if not isinstance(kk, torch.Tensor) or kk.dim() != 4 else \
        torch.zeros(*kk.shape[:3], 32, dtype=kk.dtype)
    _raises(exc, words, prism_attention, qq, kk, vv, *args[2:], **kwargs)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("target", ["q", "k", "v"])
def test_non_finite_values_are_rejected(bad, target):
    tensors = dict(zip("qkv", _qkv(), strict=True))
    tensors[target] = tensors[target].clone()
    tensors[target][0, 0, 3, 5] = float(bad)
    _raises(ValueError, [target, "NaN or Inf"], prism_attention, tensors["q"], tensors["k"],
            tensors["v"])
    if target != "v":
        _raises(ValueError, [target, "NaN or Inf"], select_blocks, tensors["q"], tensors["k"])


def test_v_mismatch_and_device_errors():
    _raises(ValueError, ["v", "match k"], block_sparse_attention, q, k, v[:, :, :10],
            torch.ones(1, 4, 2, 2, dtype=torch.bool), block_size=32)
    _raises(TypeError, ["v", "dtype"], prism_attention, q, k, v.double())
    _raises(ValueError, ["v", "dimensions"], prism_attention, q, k, v[0])


def test_block_mask_errors():
    good = torch.ones(1, 4, 2, 2, dtype=torch.bool)
    _raises(TypeError, ["block_mask", "bool"], block_sparse_attention, q, k, v, good.int(),
            block_size=32)
    _raises(ValueError, ["block_mask", "(1, 4, 2, 2)", "block_size"], block_sparse_attention,
            q, k, v, good, block_size=16)
    _raises(ValueError, ["block_mask", "shape"], block_sparse_attention, q, k, v, good[0],
            block_size=32)
    _raises(TypeError, ["block_mask"], block_sparse_attention, q, k, v, [[True]],
            block_size=32)
    _raises(ValueError, ["block_size"], block_sparse_attention, q, k, v, good, block_size=-1)
    _raises(TypeError, ["scale"], block_sparse_attention, q, k, v, good, block_size=32,
            scale="0.1")
    _raises(TypeError, ["block_mask", "bool"], mask_to_indices, good.int())


def test_config_rejects_bad_fields_directly():
    _raises(ValueError, ["block_size"], PrismConfig, block_size=0)
    _raises(TypeError, ["calibrate"], PrismConfig, calibrate="yes")
    _raises(ValueError, ["eps"], PrismConfig, eps=-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PrismConfig().block_size = 3


def test_spec_defaults():
    cfg = PrismConfig()
    assert (cfg.block_size, cfg.high_dim, cfg.low_dim, cfg.high_threshold, cfg.low_threshold,
            cfg.calibrate, cfg.force_sink, cfg.force_diagonal, cfg.rope_layout, cfg.eps) == \
        (128, None, None, 0.95, 0.95, True, True, True, "half", 1e-6)


def test_inputs_are_never_modified():
    qq, kk, vv = _qkv(nq=100, nk=150, dtype=torch.float16)
    copies = [t.clone() for t in (qq, kk, vv)]
    mask = select_blocks(qq, kk, block_size=32)
    mask_copy = mask.clone()
    block_sparse_attention(qq, kk, vv, mask, block_size=32, return_lse=True)
    prism_attention(qq, kk, vv, block_size=32, return_lse=True, return_mask=True)
    mask_to_indices(mask)
    for original, copy in zip((qq, kk, vv, mask), (*copies, mask_copy), strict=True):
        assert torch.equal(original, copy)
