"""Contract §8: bad input raises a clear error naming the argument; inputs are never modified."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import count_shape_checks
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


# --------------------------------------------------------------------------
# The reference keeps no validation cache: every call checks.
# --------------------------------------------------------------------------

def test_reference_validation_checks_every_call(monkeypatch):
    from prism.reference import validation

    calls = count_shape_checks(monkeypatch)
    for _ in range(3):
        validation.validate_qk(q, k, causal=True, check_values=False)
        validation.validate_qkv(q, k, v, causal=True, check_values=False)
    assert len(calls) == 6
    assert not hasattr(validation, "_PASSED")


# --------------------------------------------------------------------------
# Public helpers of prism.reference that validate their arguments (contract §8).
# --------------------------------------------------------------------------

def test_band_sizes_rejects_bad_head_dims_and_widths():
    from prism.reference import band_sizes

    assert band_sizes(128) == (64, 96)
    assert band_sizes(8, 4, 8) == (4, 8)
    _raises(ValueError, ["head_dim", "even", "7"], band_sizes, 7)
    _raises(ValueError, ["head_dim", "even"], band_sizes, 0)
    _raises(ValueError, ["head_dim", "even"], band_sizes, -4)
    _raises(TypeError, ["head_dim", "int"], band_sizes, 8.0)
    _raises(TypeError, ["head_dim", "int"], band_sizes, True)
    _raises(ValueError, ["high_dim", "<= head_dim (8)"], band_sizes, 8, 10, None)
    _raises(ValueError, ["low_dim", "even"], band_sizes, 8, None, 3)
    _raises(TypeError, ["low_dim", "int"], band_sizes, 8, None, 4.0)


def test_pool_tiles_rejects_bad_block_size_and_start():
    from prism.reference import pool_tiles, tile_layout, tile_token_counts

    x = torch.randn(1, 2, 10, 4)
    assert pool_tiles(x, 3, 4).shape == (1, 2, 4, 4)
    _raises(ValueError, ["block_size", ">= 1"], pool_tiles, x, 0, 0)
    _raises(ValueError, ["block_size", ">= 1"], pool_tiles, x, 0, -2)
    _raises(TypeError, ["block_size", "int"], pool_tiles, x, 0, 4.0)
    _raises(ValueError, ["start", ">= 0"], pool_tiles, x, -1, 4)
    _raises(TypeError, ["start", "int"], pool_tiles, x, 0.5, 4)
    _raises(ValueError, ["x", "4 dimensions"], pool_tiles, x[0], 0, 4)
    _raises(TypeError, ["x", "float"], pool_tiles, x.long(), 0, 4)
    _raises(ValueError, ["block_size", ">= 1"], tile_token_counts, 0, 10, 0)
    _raises(ValueError, ["block_size", ">= 1"], tile_layout, 10, 10, 0, True)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.0000001, 2.0, float("nan"), float("inf")])
def test_top_p_select_rejects_thresholds_outside_unit_interval(threshold):
    from prism.reference import top_p_select

    probs = torch.tensor([[0.5, 0.3, 0.2]])
    _raises(ValueError, ["threshold", "(0, 1]", str(threshold)], top_p_select, probs,
            torch.tensor(True), threshold)


def test_top_p_select_threshold_types():
    from prism.reference import top_p_select

    probs = torch.tensor([[0.5, 0.3, 0.2]])
    _raises(TypeError, ["threshold", "float"], top_p_select, probs, torch.tensor(True), "0.5")
    _raises(TypeError, ["threshold", "float"], top_p_select, probs, torch.tensor(True), True)
    _raises(TypeError, ["threshold", "float"], top_p_select, probs, torch.tensor(True),
            torch.tensor(0.5))
    keep, _ = top_p_select(probs, torch.tensor(True), 1)  # an int in range is fine
    assert keep.tolist() == [[True, True, True]]
    keep, _ = top_p_select(probs, torch.tensor(True), 0.6)
    assert keep.tolist() == [[True, True, False]]


def test_indices_to_mask_rejects_bad_compact_masks():
    from prism.reference import indices_to_mask

    num = torch.tensor([[2, 1]], dtype=torch.int32)
    idx = torch.tensor([[[0, 2, -1], [1, -1, -1]]], dtype=torch.int32)
    expected = torch.tensor([[[True, False, True], [False, True, False]]])
    assert torch.equal(indices_to_mask(num, idx, 3), expected)
    # Entries past kv_num_blocks are padding and never read, whatever they hold.
    padded = idx.clone()
    padded[0, 1, 1:] = 99
    assert torch.equal(indices_to_mask(num, padded, 3), expected)
    _raises(ValueError, ["kv_num_blocks", "[0, 3]", "got 4"], indices_to_mask,
            torch.tensor([[4, 1]]), idx, 3)
    _raises(ValueError, ["kv_num_blocks", "got -1"], indices_to_mask,
            torch.tensor([[-1, 1]]), idx, 3)
    _raises(ValueError, ["kv_indices", "[0, 2)", "got 2", "num_key_tiles"], indices_to_mask,
            num, idx, 2)
    negative = idx.clone()
    negative[0, 0, 1] = -1
    _raises(ValueError, ["kv_indices", "got -1", "(0, 0, 1)"], indices_to_mask,
            num, negative, 3)
    _raises(ValueError, ["kv_indices", "shape plus one dim"], indices_to_mask,
            num[0], idx, 3)
    _raises(TypeError, ["kv_indices", "integer"], indices_to_mask, num, idx.float(), 3)
    _raises(TypeError, ["kv_num_blocks", "integer"], indices_to_mask, num.bool(), idx, 3)
    _raises(TypeError, ["kv_num_blocks", "Tensor"], indices_to_mask, [[2, 1]], idx, 3)
    _raises(ValueError, ["num_key_tiles", ">= 0"], indices_to_mask, num, idx, -1)
    _raises(TypeError, ["num_key_tiles", "int"], indices_to_mask, num, idx, 3.0)


def test_band_width_above_head_dim_is_rejected_before_pooling(monkeypatch):
    """Contract §8: validate before computing; no tile is pooled for a bad band width."""
    from prism.reference import select as select_module
    from prism.reference import trace_selection

    pooled = []
    original = select_module.pool_tiles

    def recording(*args, **kwargs):
        pooled.append(args[1:])
        return original(*args, **kwargs)

    monkeypatch.setattr(select_module, "pool_tiles", recording)
    for fn in (select_blocks, trace_selection):
        for bad in ({"low_dim": 64}, {"high_dim": 34}):
            _raises(ValueError, [next(iter(bad)), "head_dim (32)"], fn, q, k, **bad)
    _raises(ValueError, ["low_dim"], prism_attention, q, k, v, low_dim=64)
    assert pooled == []
    select_blocks(q, k, block_size=32)  # the probe does see a good call's pooling
    assert pooled


# --------------------------------------------------------------------------
# Messages say how to fix the call (contract §8).
# --------------------------------------------------------------------------

FIX_HINTS = [
    ("batch", ValueError, ["batch", "split the call"], (torch.cat([q, q]), k, v)),
    ("head_dim", ValueError, ["head_dim", "same attention layer"], (q, k[..., :16], v)),
    ("odd D", ValueError, ["even", "pad the head dim"], (q[..., :31], k[..., :31], v)),
    ("v shape", ValueError, ["v must match k", "pass the v"], (q, k, v[:, :, :10])),
    ("v empty", ValueError, ["v", "Dv >= 1"], (q, k, v[..., :0])),
]


@pytest.mark.parametrize("name,exc,words,args", FIX_HINTS, ids=[c[0] for c in FIX_HINTS])
def test_shape_errors_say_how_to_fix(name, exc, words, args):
    _raises(exc, words, prism_attention, *args)


def test_scale_and_config_errors_say_how_to_fix():
    _raises(TypeError, ["scale", "float", "such as 0.125", "None for 1/sqrt"], prism_attention,
            q, k, v, scale="0.1")
    _raises(TypeError, ["high_dim", "int or None", "such as 64"], PrismConfig, high_dim=64.0)
    _raises(TypeError, ["low_temperature", "positive float", "such as 1.0"], PrismConfig,
            low_temperature="1")
    _raises(ValueError, ["eps", "> 0", "default is 1e-06"], PrismConfig, eps=0.0)
    _raises(ValueError, ["high_temperature", "> 0", "default is 1.0"], PrismConfig,
            high_temperature=-1.0)
    for name in ("calibrate", "force_sink", "force_diagonal"):
        _raises(TypeError, [name, "True or False", f"{name}=True"], PrismConfig, **{name: 1})
