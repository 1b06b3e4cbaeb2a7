"""Packed variable-length batches and paged KV caches on the Triton kernels (docs/serving.rst).

Same signatures and results as :mod:`prism.reference.varlen` and
:mod:`prism.reference.paged`. The per-sequence loop, the validation and the
page gather are the reference's code; each sequence then runs
:mod:`prism.optimized`'s public ``select_blocks``, ``block_sparse_attention``
or ``prism_attention`` on (1, H, N_i, D) views of the packed tensors (or
(count, H, N, D) views for runs of equal-shape sequences), whose strides the
kernels read directly (no copy of q, k or v).

What this costs against one dense launch (measured in
``benchmarks/bench_varlen.py``):

* one selection and one attention call per run of adjacent sequences with
  the same ``(Nq_i, Nk_i)`` (one per sequence when all lengths differ), each
  with its own host work, and one host read of ``cu_seqlens`` (a device sync
  when they live on the GPU);
* one copy of each run's output into the packed output (and of its
  log-sum-exp), since the public functions return fresh tensors;
* with a paged cache, one gather of the K and V the call reads
  (:func:`prism.reference.paged.gather_tokens`); the kernels do not read
  pages in place yet.

Chunked prefill with :class:`~prism.reference.PooledKeyCache` runs the
selection stages after key pooling as the reference's torch code on the
GPU (small: chunk tiles x key tiles per head) and attention on the kernel.
"""

from __future__ import annotations

import importlib

from prism.reference.config import PrismConfig, resolve_config
from prism.reference.paged import run_paged_prism, run_paged_select
from prism.reference.validation import validate_scale
from prism.reference.varlen import (
    check_masks,
    run_attention,
    run_prism,
    run_select,
    validate_varlen,
)


def _impl():
    """The public functions of :mod:`prism.optimized` (imported late: this module is
    part of that package)."""
    return importlib.import_module("prism.optimized")


def select_blocks_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                         max_seqlen_k: int, config: PrismConfig | None = None, *,
                         causal: bool = True, **overrides) -> list:
    """Per-sequence tile selection of a packed batch, on the GPU.

    Same contract as :func:`prism.reference.select_blocks_varlen`: a list of B
    bool masks (1, Hq, n_query_tiles_i, n_key_tiles_i).
    """
    cfg = resolve_config(config, **overrides)
    ranges = validate_varlen(q, k, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, causal=causal)
    return run_select(_impl(), q, k, ranges, cfg, causal)


def block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                                  max_seqlen_k: int, block_masks, *, block_size: int = 128,
                                  causal: bool = True, scale: float | None = None,
                                  return_lse: bool = False):
    """Block-sparse attention of a packed batch on per-sequence masks, on the GPU.

    Same contract as :func:`prism.reference.block_sparse_attention_varlen`:
    ``o`` (total_q, Hq, Dv) and, with ``return_lse``, ``lse`` (Hq, total_q).
    """
    ranges = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal=causal)
    validate_scale(scale)
    masks = check_masks(block_masks, len(ranges))
    return run_attention(_impl(), q, k, v, ranges, masks, block_size=block_size,
                         causal=causal, scale=scale, return_lse=return_lse)


def prism_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                           max_seqlen_k: int, config: PrismConfig | None = None, *,
                           causal: bool = True, scale: float | None = None,
                           return_lse: bool = False, return_mask: bool = False, **overrides):
    """Prism end to end on a packed variable-length batch, on the GPU.

    Same contract as :func:`prism.reference.prism_attention_varlen`; each
    sequence runs :func:`prism.optimized.prism_attention` (selection hands its
    compact indices straight to attention).
    """
    cfg = resolve_config(config, **overrides)
    ranges = validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal=causal)
    validate_scale(scale)
    return run_prism(_impl(), q, k, v, ranges, cfg, causal=causal, scale=scale,
                     return_lse=return_lse, return_mask=return_mask)


def select_blocks_paged(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q: int,
                        config: PrismConfig | None = None, *, causal: bool = True,
                        pooled_keys=None, **overrides) -> list:
    """Tile selection over a paged key cache, on the GPU.

    Same contract as :func:`prism.reference.select_blocks_paged`.
    """
    return run_paged_select(_impl(), q, k_cache, block_table, seq_lens, cu_seqlens_q,
                            max_seqlen_q, config, causal, pooled_keys, overrides)


def prism_attention_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                          max_seqlen_q: int, config: PrismConfig | None = None, *,
                          causal: bool = True, scale: float | None = None,
                          return_lse: bool = False, return_mask: bool = False,
                          pooled_keys=None, **overrides):
    """Prism end to end over a paged KV cache, on the GPU.

    Same contract as :func:`prism.reference.prism_attention_paged`.
    """
    return run_paged_prism(_impl(), q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                           max_seqlen_q, config, causal=causal, scale=scale,
                           return_lse=return_lse, return_mask=return_mask,
                           pooled_keys=pooled_keys, overrides=overrides)
