"""Prism: spectral-aware block-sparse attention.

The top-level functions dispatch by device: CUDA tensors run the Triton
kernels of :mod:`prism.optimized`, everything else runs the PyTorch oracle
:mod:`prism.reference`. Both implement the contract (docs/semantics.rst) and share one signature.
"""

from __future__ import annotations

import torch

from prism import reference
from prism.reference import (
    TIE_MARGIN,
    TIE_RELATIVE,
    PrismConfig,
    boundary_ties,
    mask_to_indices,
    resolve_config,
)
from prism.reference.tile_mask import TileMask

__version__ = "0.1.0"


def _implementation(*tensors):
    """``prism.optimized`` when every tensor is on a CUDA device, else the reference."""
    if tensors and all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        from prism import optimized

        return optimized
    return reference


def select_blocks(q, k, config=None, *, causal=True, **overrides):
    """Dispatching :func:`prism.reference.select_blocks` (optimized on CUDA).

    Returns a :class:`~prism.reference.tile_mask.TileMask`: the bool mask, which
    also carries its compact indices (written by the selection kernel on CUDA,
    computed on first use elsewhere). Under ``torch.compile``, a plain bool tensor.
    """
    mask = _implementation(q, k).select_blocks(q, k, config, causal=causal, **overrides)
    if isinstance(mask, TileMask) or torch.compiler.is_compiling():
        return mask
    return TileMask(mask, block_size=resolve_config(config, **overrides).block_size,
                    causal=causal, num_queries=q.shape[2], num_keys=k.shape[2])


def block_sparse_attention(q, k, v, block_mask, *, block_size=128, causal=True, scale=None,
                           return_lse=False):
    """Dispatching :func:`prism.reference.block_sparse_attention` (optimized on CUDA)."""
    impl = _implementation(q, k, v)
    return impl.block_sparse_attention(q, k, v, block_mask, block_size=block_size,
                                       causal=causal, scale=scale, return_lse=return_lse)


def prism_attention(q, k, v, config=None, *, causal=True, scale=None, return_lse=False,
                    return_mask=False, **overrides):
    """Dispatching :func:`prism.reference.prism_attention` (optimized on CUDA)."""
    impl = _implementation(q, k, v)
    return impl.prism_attention(q, k, v, config, causal=causal, scale=scale,
                                return_lse=return_lse, return_mask=return_mask, **overrides)



def select_blocks_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         config=None, *, causal=True, **overrides):
    """Dispatching :func:`prism.reference.select_blocks_varlen` (optimized on CUDA)."""
    return _implementation(q, k).select_blocks_varlen(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config, causal=causal,
        **overrides)


def block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, block_masks, *, block_size=128, causal=True,
                                  scale=None, return_lse=False):
    """Dispatching :func:`prism.reference.block_sparse_attention_varlen` (optimized on CUDA)."""
    return _implementation(q, k, v).block_sparse_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_masks,
        block_size=block_size, causal=causal, scale=scale, return_lse=return_lse)


def prism_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           config=None, *, causal=True, scale=None, return_lse=False,
                           return_mask=False, **overrides):
    """Dispatching :func:`prism.reference.prism_attention_varlen` (optimized on CUDA)."""
    return _implementation(q, k, v).prism_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config,
        causal=causal, scale=scale, return_lse=return_lse, return_mask=return_mask,
        **overrides)


def select_blocks_paged(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                        config=None, *, causal=True, pooled_keys=None, **overrides):
    """Dispatching :func:`prism.reference.select_blocks_paged` (optimized on CUDA)."""
    return _implementation(q, k_cache).select_blocks_paged(
        q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, config, causal=causal,
        pooled_keys=pooled_keys, **overrides)


def prism_attention_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                          max_seqlen_q, config=None, *, causal=True, scale=None,
                          return_lse=False, return_mask=False, pooled_keys=None, **overrides):
    """Dispatching :func:`prism.reference.prism_attention_paged` (optimized on CUDA)."""
    return _implementation(q, k_cache, v_cache).prism_attention_paged(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, config,
        causal=causal, scale=scale, return_lse=return_lse, return_mask=return_mask,
        pooled_keys=pooled_keys, **overrides)

__all__ = [
    "__version__",
    "PrismConfig",
    "TIE_MARGIN",
    "TIE_RELATIVE",
    "resolve_config",
    "select_blocks",
    "block_sparse_attention",
    "prism_attention",
    "mask_to_indices",
    "TileMask",
    "boundary_ties",
    "select_blocks_varlen",
    "block_sparse_attention_varlen",
    "prism_attention_varlen",
    "select_blocks_paged",
    "prism_attention_paged",
    "reference",
]
