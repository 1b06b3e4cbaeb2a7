"""The packed and paged end-to-end calls as ``torch.library`` operators, for compiled code.

:func:`prism.optimized.varlen.prism_attention_varlen` and
:func:`~prism.optimized.varlen.prism_attention_paged` read their offsets on the
host (docs/serving.rst), which a trace cannot do: under ``torch.compile`` each
becomes one opaque operator (``prism::prism_attention_varlen``,
``prism::prism_attention_paged``) whose body is the eager call, run when the
compiled code runs, and whose fake implementation gives the output shapes
from the input shapes alone. So a model that calls them compiles with
``fullgraph=True``, with the offsets as ordinary tensor inputs: a new batch
of the same total length reuses the graph. Validation happens in the body,
so bad offsets raise the eager call's ``ValueError`` when the compiled code
runs.

Under compilation these calls return no masks (their shapes depend on the
offsets' values), take no ``pooled_keys`` cache (a Python object), and give no
gradients (forward only; eager packed calls do): each raises a clear error
while tracing instead.
"""

from __future__ import annotations

import importlib

import torch

from . import gradients, ops


def _check_traced(name: str, q, k, v, return_mask: bool, pooled_keys=None) -> None:
    if return_mask:
        raise ValueError(f"{name}(return_mask=True) is not available under torch.compile: "
                         "the masks' shapes depend on the offsets' values; call it outside "
                         "the compiled region for the masks")
    if pooled_keys is not None:
        raise ValueError(f"{name}(pooled_keys=...) is not available under torch.compile (the "
                         "cache is a Python object updated in place); run chunked prefill "
                         "outside the compiled region")
    if gradients.needs_gradients(q, k, v):
        raise TypeError(f"compiled {name} calls compute forward passes only, but an input "
                        "requires grad; call it under torch.no_grad(), or eagerly (the eager "
                        "packed call backpropagates)")


def prism_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           config=None, *, causal=True, scale=None, return_lse=False,
                           return_mask=False, **overrides):
    """:func:`prism.optimized.varlen.prism_attention_varlen` while tracing: one operator."""
    from .api import _resolve

    _check_traced("prism_attention_varlen", q, k, v, return_mask)
    out, lse = torch.ops.prism.prism_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        ops.config_string(_resolve(config, overrides)), causal, scale, return_lse)
    return (out, lse) if return_lse else out


def prism_attention_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                          max_seqlen_q, config=None, *, causal=True, scale=None,
                          return_lse=False, return_mask=False, pooled_keys=None, **overrides):
    """:func:`prism.optimized.varlen.prism_attention_paged` while tracing: one operator."""
    from .api import _resolve

    _check_traced("prism_attention_paged", q, k_cache, v_cache, return_mask, pooled_keys)
    out, lse = torch.ops.prism.prism_attention_paged(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
        ops.config_string(_resolve(config, overrides)), causal, scale, return_lse)
    return (out, lse) if return_lse else out


def _define(name: str, arguments: str) -> None:
    """``prism::<name>``: the leading ``arguments`` of the eager call, then its config string,
    ``causal``, ``scale`` and ``return_lse``; returns ``(out, lse)`` (``lse`` empty unless
    asked for). The body runs :mod:`prism.optimized.varlen`'s function of that name."""
    torch.library.define(f"prism::{name}", f"({arguments}, str config, bool causal, "
                         "float? scale, bool return_lse) -> (Tensor, Tensor)")

    def body(*args):
        *leading, config, causal, scale, return_lse = args
        eager = getattr(importlib.import_module("prism.optimized.varlen"), name)
        result = eager(*leading, ops.config_from_string(config), causal=causal, scale=scale,
                       return_lse=return_lse)
        return result if return_lse else (result, leading[0].new_empty((0,),
                                                                       dtype=torch.float32))

    def fake(*args):
        q, v, return_lse = args[0], args[2], args[-1]  # v: packed (T, H, Dv) or paged
        lse = (q.shape[1], q.shape[0]) if return_lse else (0,)
        return (q.new_empty((q.shape[0], q.shape[1], v.shape[-1])),
                q.new_empty(lse, dtype=torch.float32))

    torch.library.impl(f"prism::{name}", "default")(body)
    torch.library.register_fake(f"prism::{name}")(fake)


_define("prism_attention_varlen", "Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k")
_define("prism_attention_paged", "Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor seq_lens, Tensor cu_seqlens_q, SymInt max_seqlen_q")


__all__ = ["prism_attention_paged", "prism_attention_varlen"]
