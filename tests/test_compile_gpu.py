"""Prism inside compiled code and CUDA graphs, on a CUDA GPU (marker ``gpu``).

* ``torch.compile(fullgraph=True)`` with Inductor traces the public functions
  into the custom operators and matches eager; at run time the operators
  replay call plans, bit for bit equal to eager;
* a CUDA graph captured around ``prism_attention`` replays to eager's result
  on new inputs copied into the captured buffers, and so does
  ``torch.compile(mode="reduce-overhead")``;
* a random-weight Llama-architecture model with ``attn_implementation="prism"``
  gives the same logits compiled with ``fullgraph=True`` and eager, with and
  without a padding mask, and with ``dynamic=True`` at two lengths.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from helpers import TOLERANCE, make_qkv, relative_error
from prism import optimized

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _cuda_qkv(nq=4096, nk=4096, d=128, hq=8, hkv=2, seed=0, dtype=torch.bfloat16):
    return tuple(t.cuda() for t in make_qkv(1, hq, hkv, nq, nk, d, base=500000.0, dtype=dtype,
                                            seed=seed, sharpness=2.0))


@pytest.mark.parametrize("d,bs", [(128, 128), (64, 64)])
def test_inductor_fullgraph_matches_eager(d, bs):
    q, k, v = _cuda_qkv(d=d, seed=d + bs)
    torch._dynamo.reset()

    def layer(q, k, v):
        o, lse = optimized.prism_attention(q, k, v, block_size=bs, return_lse=True)
        return o.float() * 2.0, lse

    o, lse = torch.compile(layer, fullgraph=True)(q, k, v)
    ref_o, ref_lse = optimized.prism_attention(q, k, v, block_size=bs, return_lse=True)
    assert relative_error(o, ref_o.float() * 2.0) <= 1e-6
    assert torch.equal(lse, ref_lse)


def test_compiled_calls_replay_call_plans_bit_for_bit():
    """At run time the operators' bodies replay call plans (from the third call on): the
    compiled outputs equal eager ones bit for bit, select/attend and fused alike."""
    from prism.optimized import call_plan

    q, k, v = _cuda_qkv(seed=11)
    torch._dynamo.reset()

    def layer(q, k, v):
        mask = optimized.select_blocks(q, k)
        return (*optimized.prism_attention(q, k, v, return_lse=True, return_mask=True),
                optimized.block_sparse_attention(q, k, v, mask), mask)

    compiled = torch.compile(layer, fullgraph=True)
    eager_out, eager_lse, eager_mask = optimized.prism_attention(q, k, v, return_lse=True,
                                                                 return_mask=True)
    stats = dict(call_plan.PLAN_STATS)
    for _ in range(4):
        out, lse, mask, sparse_out, selected = compiled(q, k, v)
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
        assert torch.equal(mask, eager_mask) and torch.equal(selected, eager_mask)
        assert torch.equal(sparse_out, optimized.block_sparse_attention(q, k, v, eager_mask))
    for kind in ("select", "attention"):
        assert call_plan.PLAN_STATS[kind] - stats[kind] == 2, kind
    # The compiled call (no NaN check) and the eager one (NaN check): 2 replays each.
    assert call_plan.PLAN_STATS["block_sparse"] - stats["block_sparse"] == 4


def test_inductor_select_then_attention_matches_eager():
    q, k, v = _cuda_qkv(seed=3)
    torch._dynamo.reset()

    def layer(q, k, v):
        mask = optimized.select_blocks(q, k)
        return optimized.block_sparse_attention(q, k, v, mask), mask

    o, mask = torch.compile(layer, fullgraph=True)(q, k, v)
    ref_mask = optimized.select_blocks(q, k)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(o, optimized.block_sparse_attention(q, k, v, ref_mask))


def test_cuda_graph_capture_and_replay_match_eager():
    q, k, v = _cuda_qkv(seed=5)
    static = [t.clone() for t in (q, k, v)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile the kernels before capture
            optimized.prism_attention(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out, captured_mask = optimized.prism_attention(*static, return_mask=True)
    for seed in (6, 7):
        fresh = _cuda_qkv(seed=seed)
        for buffer, value in zip(static, fresh, strict=True):
            buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_mask = optimized.prism_attention(*fresh, return_mask=True)
        assert torch.equal(captured_mask, ref_mask)
        assert relative_error(captured_out, ref_out) <= TOLERANCE[torch.bfloat16] / 10


def test_reduce_overhead_mode_matches_eager():
    q, k, v = _cuda_qkv(seed=8)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: optimized.prism_attention(q, k, v) + 0,
                             mode="reduce-overhead", fullgraph=True)
    for seed in (8, 9, 10):
        q, k, v = _cuda_qkv(seed=seed)
        out = compiled(q, k, v).clone()
        assert relative_error(out, optimized.prism_attention(q, k, v)) <= 1e-6


def _tiny_llama(attn_implementation):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    # fp32, so that compiled and eager differ by rounding only (bf16 logits of
    # Inductor's fused norms already differ from eager by about 1%).
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.float32).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def test_compiled_llama_with_prism_attention_matches_eager(record_property):
    """fullgraph=True through the integration: a batch without padding traces into Prism's
    operators (no mask is built, none decoded); a left-padded batch runs the masked call
    as one opaque operator. Both give eager's logits."""
    from prism.integrations.transformers import register

    register("prism", block_size=64)
    model = _tiny_llama("prism")
    ids = torch.randint(0, 1000, (2, 1024), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :300] = 0  # left padding of row 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for name, kwargs in (("unpadded", {}), ("padded", {"attention_mask": mask})):
            eager = model(ids, **kwargs).logits.float()
            logits = compiled(ids, **kwargs).logits.float()
            real = kwargs.get("attention_mask", torch.ones_like(ids)).bool()
            error = relative_error(logits[real], eager[real])
            record_property(f"logits_error_{name}", error)
            assert error <= 1e-3


def test_compiled_llama_with_dynamic_shapes_matches_eager(record_property):
    """``torch.compile(model, fullgraph=True, dynamic=True)``, as engines compile for
    varying prompt lengths: the config's floats are symbolic while tracing, and the
    operators still trace (no graph break); two lengths, one compile, eager's logits."""
    from prism.integrations.transformers import register

    register("prism", block_size=64)
    model = _tiny_llama("prism")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for length in (1024, 1600):
            ids = torch.randint(0, 1000, (1, length), device="cuda",
                                generator=torch.Generator(device="cuda").manual_seed(length))
            error = relative_error(compiled(ids).logits.float(), model(ids).logits.float())
            record_property(f"logits_error_{length}", error)
            assert error <= 1e-3
