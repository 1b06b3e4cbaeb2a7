"""The custom operators and the TileMask, on the CPU (kernels in Triton's interpreter).

What CI can check without a GPU: the operators' fake implementations give the
shapes and dtypes the real ones return, ``torch.library.opcheck`` accepts the
registrations, ``torch.compile(fullgraph=True)`` traces the public functions
without a graph break and matches eager, NaN input under tracing flags instead
of raising, and a TileMask behaves as the bool tensor it is.
tests/test_compile_gpu.py runs Inductor, CUDA graphs and a compiled model.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math

import pytest
import torch

import prism.optimized as optimized
from helpers import kernel_test_setup, make_qkv, relative_error
from prism import reference
from prism.optimized import ops
from prism.reference import PrismConfig, tile_layout
from prism.reference.tile_mask import TileMask

INTERPRETED, DEVICE, pytestmark = kernel_test_setup()


def _qkv(nq=96, nk=160, d=32, hq=4, hkv=2, seed=0, dtype=torch.float32):
    return tuple(t.to(DEVICE) for t in make_qkv(1, hq, hkv, nq, nk, d, seed=seed, dtype=dtype,
                                                 sharpness=2.0))


# --------------------------------------------------------------------------
# Fake implementations and registration
# --------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_fake_select_gives_the_real_shapes(causal):
    q, k, v = _qkv()
    config = ops.config_string(PrismConfig(block_size=32))
    real = torch.ops.prism.select(q, k, v, causal, config)
    fake = torch.ops.prism.select(q.to("meta"), k.to("meta"), v.to("meta"), causal, config)
    layout = tile_layout(96, 160, 32, causal)
    assert real[0].shape == (1, 4, layout.num_query_tiles, layout.num_key_tiles)
    for r, f in zip(real, fake, strict=True):
        assert f.device.type == "meta"
        assert (r.shape, r.dtype) == (f.shape, f.dtype)


@pytest.mark.parametrize("return_lse,check_values", [(True, True), (False, False)])
def test_fake_attention_gives_the_real_shapes(return_lse, check_values):
    q, k, v = _qkv()
    v = v[..., :24].contiguous()
    layout = tile_layout(96, 160, 32, True)
    mask = torch.ones(1, 4, layout.num_query_tiles, layout.num_key_tiles, dtype=torch.bool,
                      device=DEVICE)
    args = (mask, None, None, 32, True, None, return_lse, check_values)
    real = torch.ops.prism.block_sparse_attention(q, k, v, *args)
    meta = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in (q, k, v, *args)]
    fake = torch.ops.prism.block_sparse_attention(*meta)
    assert real[0].shape == (1, 4, 96, 24)
    for r, f in zip(real, fake, strict=True):
        assert (r.shape, r.dtype) == (f.shape, f.dtype)


def test_opcheck_accepts_the_operators():
    q, k, v = _qkv(nq=64, nk=64, d=16, hq=2, hkv=1)
    config = ops.config_string(PrismConfig(block_size=32))
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.prism.select.default, (q, k, v, True, config),
                          test_utils=tests)
    # The fused operator on 2 x 2 tiles, its outputs all asked for (test_faketensor: the
    # fake gives the real shapes and dtypes); without lse and mask, empty placeholders.
    small = [t[:, :, :32] for t in (q, k, v)]
    config = ops.config_string(PrismConfig(block_size=16))
    torch.library.opcheck(torch.ops.prism.prism_attention.default,
                          (*small, config, True, None, True, True), test_utils=tests)
    fake = torch.ops.prism.prism_attention(*(t.to("meta") for t in small), config, False, 0.3,
                                           False, False)
    assert [(tuple(t.shape), t.dtype) for t in fake] == [
        ((1, 2, 32, 16), q.dtype), ((0,), torch.float32), ((0,), torch.bool)]
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE)
    torch.library.opcheck(torch.ops.prism.block_sparse_attention.default,
                          (q, k, v, mask, None, None, 32, True, 0.3, True, True),
                          test_utils=tests)


def test_config_travels_as_one_string():
    cfg = PrismConfig(block_size=64, high_threshold=0.9, calibrate=False, rope_layout="interleaved",
                      vertical_slash_threshold=0.5, eps=1e-7)
    text = ops.config_string(cfg)
    assert ops.config_from_string(text) == cfg
    assert ops.config_from_string(text) is ops.config_from_string(str(text))  # one object
    assert ops.config_from_string(ops.config_string(PrismConfig())) == PrismConfig()
    with pytest.raises(ValueError, match="config_string"):
        ops.config_from_string("(1, 2)")
    for name in ("select", "prism_attention"):
        schema = str(getattr(torch.ops.prism, name).default._schema)
        assert "str config" in schema and "high_dim" not in schema


# --------------------------------------------------------------------------
# torch.compile traces the public functions whole
# --------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{"block_size": 32},
                                       {"block_size": 16, "high_threshold": 0.9, "causal": False}])
def test_compiled_prism_attention_has_no_graph_break_and_matches_eager(overrides):
    q, k, v = _qkv(seed=4, nk=96)
    torch._dynamo.reset()
    config = PrismConfig(block_size=64)  # overridden field by field below

    def layer(q, k, v):
        o, lse = optimized.prism_attention(q * 1.0, k, v, config, return_lse=True, **overrides)
        return o + 0.0, lse

    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    o, lse = compiled(q, k, v)
    ref_o, ref_lse = optimized.prism_attention(q, k, v, config, return_lse=True, **overrides)
    assert torch.equal(o, ref_o) and torch.equal(lse, ref_lse)
    # One fused operator, the resolved configuration folded into its string argument.
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function"
             and "prism" in str(n.target)]
    assert [n.target for n in calls] == [torch.ops.prism.prism_attention]
    resolved = dataclasses.replace(config, **{k: v for k, v in overrides.items()
                                              if k != "causal"})
    assert ops.config_from_string(calls[0].args[3]) == resolved


def test_compiled_accurate_preset_has_no_graph_break_and_matches_eager():
    """The accurate preset (the cascade estimator) travels whole through the operator."""
    q, k, v = _qkv(nq=64, nk=64, d=16, hq=2, hkv=1, seed=6)
    torch._dynamo.reset()
    config = PrismConfig.preset("accurate", block_size=16)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    def layer(q, k, v):
        o, mask = optimized.prism_attention(q * 1.0, k, v, config, return_mask=True)
        return o + 0.0, mask

    o, mask = torch.compile(layer, fullgraph=True, backend=backend)(q, k, v)
    ref_o, ref_mask = optimized.prism_attention(q, k, v, config, return_mask=True)
    assert torch.equal(o, ref_o) and torch.equal(mask, ref_mask)
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function"
             and "prism" in str(n.target)]
    assert [n.target for n in calls] == [torch.ops.prism.prism_attention]
    passed = ops.config_from_string(calls[0].args[3])
    assert passed == config and (passed.estimator, passed.candidate_threshold) == ("cascade", 0.99)


def test_compiled_select_then_attention_matches_eager():
    q, k, v = _qkv(seed=5)
    torch._dynamo.reset()

    def layer(q, k, v):
        mask = optimized.select_blocks(q, k, block_size=32)
        return optimized.block_sparse_attention(q, k, v, mask, block_size=32), mask

    o, mask = torch.compile(layer, fullgraph=True, backend="aot_eager")(q, k, v)
    ref_mask = optimized.select_blocks(q, k, block_size=32)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(o, optimized.block_sparse_attention(q, k, v, ref_mask, block_size=32))


def _prism_calls(graphs):
    return [n.target for g in graphs for n in g.graph.nodes
            if n.op == "call_function" and "prism" in str(n.target)]


def test_dynamic_shapes_trace_one_graph_for_every_length():
    """``torch.compile(dynamic=True)``: Dynamo makes the config's floats and ints
    symbolic; the operators' constant config string still forms (no graph break),
    and one graph with symbolic lengths serves every length, equal to eager."""
    torch._dynamo.reset()
    config = PrismConfig(block_size=16)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    def layer(q, k, v):  # overrides, so that a config is also built while tracing
        return optimized.prism_attention(q * 1.0, k, v, config, high_threshold=0.9,
                                         return_lse=True)

    def two_calls(q, k, v):
        mask = optimized.select_blocks(q, k, config)
        return optimized.block_sparse_attention(q, k, v, mask, block_size=16, scale=0.2), mask

    for fn, name in ((layer, "prism_attention"), (two_calls, "select")):
        graphs.clear()
        compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=True)
        for n in (64, 96, 80):
            q, k, v = _qkv(nq=n, nk=n, d=16, hq=2, hkv=1, seed=n)
            got, expected = compiled(q, k, v), fn(q, k, v)
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        calls = _prism_calls(graphs)
        assert getattr(torch.ops.prism, name) in calls and len(calls) == (1 if name ==
                                                                          "prism_attention" else 2)
        symbolic = [n for g in graphs for n in g.graph.nodes
                    if n.op == "placeholder" and isinstance(n.meta.get("example_value"),
                                                            torch.SymInt)]
        assert symbolic, "the lengths were not traced as symbols"


def test_dynamic_shapes_specialise_each_config_value():
    """Under ``dynamic=True`` a config's threshold is specialised, not frozen: a config
    with another threshold gets its own graph and its own (eager-equal) selection."""
    torch._dynamo.reset()
    q, k, _ = _qkv(nq=96, nk=96, d=16, hq=2, hkv=1, seed=11)

    def selection(q, k, cfg):
        return optimized.select_blocks(q, k, cfg)

    compiled = torch.compile(selection, fullgraph=True, backend="aot_eager", dynamic=True)
    masks = []
    for threshold in (0.3, 0.99):
        cfg = PrismConfig(block_size=16, high_threshold=threshold, low_threshold=threshold)
        got = compiled(q, k, cfg)
        assert torch.equal(got, selection(q, k, cfg))
        masks.append(got)
    assert not torch.equal(masks[0], masks[1]), "the two thresholds should select differently"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_nan_input_under_tracing_flags_and_gives_nan_rows():
    """What compiled or captured code gets for NaN input: no error, the flag set,
    NaN in the output of the head that read it."""
    q, k, v = _qkv(seed=6)
    q = q.clone()
    q[0, 1, 40, 3] = math.nan
    mask, num, idx, nonfinite = ops.select(q, k, v, PrismConfig(block_size=32), True)
    assert float(nonfinite) != 0
    out, _, _ = ops.attention(q, k, v, mask, num, idx, 32, True, None, False, False)
    assert torch.isnan(out[0, 1, 40]).all()
    assert torch.isfinite(out[0, 0]).all()
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: optimized.prism_attention(q, k, v, block_size=32),
                             fullgraph=True, backend="aot_eager")
    assert torch.isnan(compiled(q, k, v)[0, 1, 40]).all()
    with pytest.raises(ValueError, match="q contains"):
        optimized.prism_attention(q, k, v, block_size=32)


# --------------------------------------------------------------------------
# TileMask
# --------------------------------------------------------------------------

def test_select_blocks_returns_a_tile_mask_that_is_a_bool_tensor():
    q, k, _ = _qkv(seed=7)
    mask = optimized.select_blocks(q, k, block_size=32)
    ref = reference.select_blocks(q, k, block_size=32)
    assert isinstance(mask, TileMask) and isinstance(mask, torch.Tensor)
    assert mask.dtype == torch.bool and mask.shape == ref.shape
    assert (mask.block_size, mask.causal, mask.num_queries, mask.num_keys) == (32, True, 96, 160)
    assert type(mask.float()) is torch.Tensor and type(mask == ref) is torch.Tensor
    assert float(mask.float().mean()) == float(mask.as_tensor().float().mean())
    assert mask[0, 1].shape == ref[0, 1].shape
    # The documented loop rebuilds the bits from the compact form.
    dense = torch.zeros(mask.shape, dtype=torch.bool)
    num, idx = mask.kv_num_blocks.cpu(), mask.kv_indices.cpu()
    for b, h, i in torch.cartesian_prod(*(torch.arange(n) for n in mask.shape[:3])).tolist():
        for slot in range(int(num[b, h, i])):
            dense[b, h, i, idx[b, h, i, slot]] = True
        assert bool((idx[b, h, i, int(num[b, h, i]):] == -1).all())
    assert torch.equal(dense, mask.cpu())


def test_attention_uses_the_carried_indices_and_rebuilds_them_after_an_edit(monkeypatch):
    from prism.optimized import call_plan

    # Counted on the general path: on CUDA a repeated call replays its plan, which
    # launches the index kernel without this Python function.
    monkeypatch.setattr(call_plan, "ENABLED", False)
    q, k, v = _qkv(seed=8)
    mask = optimized.select_blocks(q, k, block_size=32)
    built = []
    original = ops.mask_rows_to_indices
    monkeypatch.setattr(ops, "mask_rows_to_indices",
                        lambda *a, **kw: built.append(1) or original(*a, **kw))
    out = optimized.block_sparse_attention(q, k, v, mask, block_size=32)
    assert built == []
    assert torch.equal(out, optimized.block_sparse_attention(q, k, v, mask.as_tensor(),
                                                             block_size=32))
    assert built == [1]
    mask[0, :, -1, 1] = ~mask[0, :, -1, 1]  # an edit: the carried indices are stale now
    edited = optimized.block_sparse_attention(q, k, v, mask, block_size=32)
    assert built == [1, 1]
    ref = reference.block_sparse_attention(q, k, v, mask.as_tensor(), block_size=32)
    assert relative_error(edited, ref) <= 1e-5
    # Indices of another call are not used either.
    other = optimized.select_blocks(q, k, block_size=32, causal=False)
    optimized.block_sparse_attention(q, k, v, other, block_size=32, causal=True)
    assert built == [1, 1, 1]


def test_calls_under_inference_mode_and_edits_of_their_masks():
    """Serving code runs under ``torch.inference_mode()``, whose tensors have no version
    counter: the TileMask of such a call cannot see an in-place edit, so it rebuilds its
    indices from the bits on every use instead of trusting them."""
    q, k, v = _qkv(seed=14)
    expected_mask = optimized.select_blocks(q, k, block_size=32)
    expected = optimized.prism_attention(q, k, v, block_size=32)
    with torch.inference_mode():
        qi, ki, vi = q.clone(), k.clone(), v.clone()
        for _ in range(3):  # repeated calls replay call plans
            assert torch.equal(optimized.prism_attention(qi, ki, vi, block_size=32), expected)
        mask = optimized.select_blocks(qi, ki, block_size=32)
        assert isinstance(mask, TileMask) and torch.equal(mask, expected_mask)
        assert torch.equal(optimized.block_sparse_attention(qi, ki, vi, mask, block_size=32),
                           expected)
        row = int(mask[0, 0, -1].nonzero()[-1])
        mask[0, 0, -1, row] = False  # an edit the version counter cannot record
        assert int(mask.kv_num_blocks[0, 0, -1]) == int(mask[0, 0, -1].sum())
        got = optimized.block_sparse_attention(qi, ki, vi, mask, block_size=32)
        edited = reference.block_sparse_attention(qi, ki, vi, mask.as_tensor(), block_size=32)
    assert not torch.equal(got, expected)
    assert relative_error(got, edited) <= 1e-5


def test_tile_mask_survives_copy_and_save():
    q, k, _ = _qkv(seed=9)
    mask = optimized.select_blocks(q, k, block_size=32)
    buffer = io.BytesIO()
    torch.save(mask, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(mask), torch.load(buffer, weights_only=False)):
        assert isinstance(other, TileMask) and torch.equal(other, mask)
        assert other.block_size == 32 and torch.equal(other.kv_indices, mask.kv_indices)


def test_tile_mask_rejects_what_is_not_a_4d_bool_tensor():
    with pytest.raises(TypeError, match="bool tensor"):
        TileMask(torch.zeros(1, 1, 2, 2), block_size=16, causal=True, num_queries=32,
                 num_keys=32)
    with pytest.raises(ValueError, match="both"):
        TileMask(torch.zeros(1, 1, 2, 2, dtype=torch.bool), block_size=16, causal=True,
                 num_queries=32, num_keys=32, kv_num_blocks=torch.zeros(1, 1, 2))


# --------------------------------------------------------------------------
# The transformers integration under torch.compile
# --------------------------------------------------------------------------

def _prism_through_kernels(monkeypatch):
    """Point the integration at prism.optimized (the Triton kernels; interpreted on the
    CPU), which traces whole, instead of the CPU reference, whose input checks read
    values on the host."""
    import prism.integrations.transformers as integration

    monkeypatch.setattr(integration.prism, "select_blocks", optimized.select_blocks)
    monkeypatch.setattr(integration.prism, "block_sparse_attention",
                        optimized.block_sparse_attention)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, rope_theta=10000.0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    with torch.no_grad():  # peaked attention, so that the tile choice matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def test_prism_mask_gives_no_mask_without_padding_even_while_tracing():
    pytest.importorskip("transformers")
    from transformers.masking_utils import sdpa_mask

    from prism.integrations.masks import prism_mask

    assert prism_mask(batch_size=2, q_length=8, kv_length=8) is None
    # The same call traced: sdpa_mask builds a full causal mask there (torch < 2.14).
    torch._dynamo.reset()
    traced = torch.compile(lambda x: (x, prism_mask(batch_size=2, q_length=8, kv_length=8)),
                           fullgraph=True, backend="eager")
    assert traced(torch.ones(1))[1] is None
    # A padding mask, a KV prefix or a sliding window: sdpa_mask's own mask.
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[1, :3] = False
    for kwargs in (dict(q_length=8, kv_length=8, attention_mask=padding),
                   dict(q_length=4, kv_length=8, q_offset=4),
                   dict(q_length=8, kv_length=8, local_size=4)):
        got, expected = prism_mask(batch_size=2, **kwargs), sdpa_mask(batch_size=2, **kwargs)
        assert (got is None) == (expected is None)
        if expected is not None:
            assert torch.equal(got, expected)
    assert not bool(prism_mask(batch_size=2, q_length=8, kv_length=8,
                               attention_mask=padding)[1, 0, :, :3].any())


@pytest.mark.slow
def test_compiled_llama_traces_the_integration_whole_and_matches_eager(monkeypatch):
    """fullgraph=True through the attention function: no mask (traced into Prism's
    operators) and a left-padded batch (the opaque masked-call operator), each equal
    to eager; the padded call still raises eager's errors. (``slow``: about 3 minutes
    in Triton's interpreter on a busy 2-core machine.)"""
    from prism.integrations.transformers import register

    _prism_through_kernels(monkeypatch)
    register("prism-test-compile", block_size=16, high_threshold=0.5, low_threshold=0.5)
    model = _tiny_llama()
    model.set_attn_implementation("prism-test-compile")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (2, 48), generator=gen).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding of row 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            eager = model(ids, **kwargs).logits
            got = compiled(ids, **kwargs).logits
            real = kwargs.get("attention_mask", torch.ones_like(ids)).bool()
            assert relative_error(got[real], eager[real]) <= 1e-5
        holes = mask.clone()
        holes[0, 20] = 0  # padding between real tokens: eager raises, so does compiled
        with pytest.raises(ValueError, match="padding between real tokens"):
            model(ids, attention_mask=holes)
        with pytest.raises(ValueError, match="padding between real tokens"):
            compiled(ids, attention_mask=holes)
