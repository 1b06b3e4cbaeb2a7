"""The packed and paged calls under ``torch.compile(fullgraph=True)`` (optimized.varlen_ops).

Their offsets are read on the host, so while tracing each call becomes one
operator whose body is the eager call. Checked on the CPU in Triton's
interpreter (``aot_eager``), or on CUDA: equal to eager, one graph for batches
of other offsets, eager's errors at run time, and clear errors for what a
compiled call cannot give (masks, a pooled-key cache, gradients).
"""

from __future__ import annotations

import pytest
import torch
from test_varlen import make_batch, to_pages

import prism.optimized as optimized
from helpers import kernel_test_setup
from prism.reference import PooledKeyCache

INTERPRETED, DEVICE, pytestmark = kernel_test_setup()


def _compiled(fn, graphs):
    def backend(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


def _prism_ops(graphs):
    return [n.target for g in graphs for n in g.graph.nodes
            if n.op == "call_function" and "prism" in str(n.target)]


def test_compiled_varlen_call_is_one_operator_equal_to_eager():
    graphs = []

    def layer(q, k, v, cu_q, cu_k):
        o, lse = optimized.prism_attention_varlen(q, k, v, cu_q, cu_k, 64, 80, block_size=16,
                                                  return_lse=True, high_threshold=0.9)
        return o * 1.0, lse

    compiled = _compiled(layer, graphs)
    # Two batches of the same total length and other offsets: one graph serves both.
    for lengths_q, lengths_k in (([40, 0, 56], [40, 8, 80]), ([64, 31, 1], [64, 31, 33])):
        _, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k, d=16, device=DEVICE)
        got = compiled(q, k, v, cu_q, cu_k)
        expected = layer(q, k, v, cu_q, cu_k)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert _prism_ops(graphs) == [torch.ops.prism.prism_attention_varlen]
    # Bad offsets raise the eager call's ValueError when the compiled code runs.
    bad = torch.tensor([0, 60, 40, 96], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens"):
        compiled(q, k, v, bad, cu_k)


def test_compiled_paged_call_is_one_operator_equal_to_eager():
    lengths = [40, 23]
    _, (q, k, v), cu, _ = make_batch(lengths, lengths, d=16, device=DEVICE, seed=3)
    k_cache, v_cache, table, seq_lens = (t.to(DEVICE) for t in to_pages(k.cpu(), v.cpu(),
                                                                        lengths, 16))
    graphs = []

    def layer(q, k_cache, v_cache, table, seq_lens, cu):
        return optimized.prism_attention_paged(q, k_cache, v_cache, table, seq_lens, cu, 40,
                                               block_size=16) + 0.0

    got = _compiled(layer, graphs)(q, k_cache, v_cache, table, seq_lens, cu)
    assert torch.equal(got, layer(q, k_cache, v_cache, table, seq_lens, cu))
    assert _prism_ops(graphs) == [torch.ops.prism.prism_attention_paged]


def test_compiled_packed_calls_refuse_what_they_cannot_give():
    lengths = [32, 16]
    _, (q, k, v), cu, _ = make_batch(lengths, lengths, d=16, device=DEVICE, seed=5)
    k_cache, v_cache, table, seq_lens = (t.to(DEVICE) for t in to_pages(k.cpu(), v.cpu(),
                                                                        lengths, 16))
    calls = {
        "return_mask": lambda: optimized.prism_attention_varlen(q, k, v, cu, cu, 32, 32,
                                                                return_mask=True),
        "pooled_keys": lambda: optimized.prism_attention_paged(
            q, k_cache, v_cache, table, seq_lens, cu, 32, block_size=16,
            pooled_keys=[PooledKeyCache(16), PooledKeyCache(16)]),
    }
    for name, call in calls.items():
        torch._dynamo.reset()
        with pytest.raises(Exception, match=f"{name}.*not available under torch.compile"):
            torch.compile(call, fullgraph=True, backend="aot_eager")()
    q.requires_grad_(True)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="forward passes only"):
        torch.compile(lambda: optimized.prism_attention_varlen(q, k, v, cu, cu, 32, 32),
                      fullgraph=True, backend="aot_eager")()


def test_opcheck_accepts_the_packed_operators():
    """Schemas, fake implementations against real runs, and AOT dispatch with dynamic
    shapes (``torch.library.opcheck``)."""
    from prism.optimized import ops

    lengths = [32, 20]
    _, (q, k, v), cu, _ = make_batch(lengths, lengths, d=16, device=DEVICE, seed=7)
    k_cache, v_cache, table, seq_lens = (t.to(DEVICE) for t in to_pages(k.cpu(), v.cpu(),
                                                                        lengths, 16))
    config = ops.config_string(optimized.PrismConfig(block_size=16))
    for return_lse in (False, True):
        torch.library.opcheck(torch.ops.prism.prism_attention_varlen.default,
                              (q, k, v, cu, cu, 32, 32, config, True, None, return_lse))
        torch.library.opcheck(torch.ops.prism.prism_attention_paged.default,
                              (q, k_cache, v_cache, table, seq_lens, cu, 32, config, True, None,
                               return_lse))
