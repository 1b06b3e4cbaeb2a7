"""``prism.optimized``: Prism's public API on Triton kernels (CUDA tensors).

The functions have the signatures and the semantics of :mod:`prism.reference`
(the contract, docs/semantics.rst); ``prism.select_blocks`` and friends dispatch CUDA tensors here.

Kernels, one module each:

* :mod:`~prism.optimized.pooling` - one launch pools query and key tiles on the
  absolute grid and sums the calibration energies (contract §3, §5);
* :mod:`~prism.optimized.selection` - band logits, softmax, top-p by bisection,
  union and forced tiles, written as the bool mask and compact indices, with
  no probability tensor in global memory (contract §5, §6);
* :mod:`~prism.optimized.indices` - a bool tile mask to compact indices;
* :mod:`~prism.optimized.attention` - block-sparse flash attention forward
  over the compact indices, GQA-native, causal with bottom-right alignment (contract §7);
* :mod:`~prism.optimized.varlen` - packed variable-length batches and paged KV
  caches: selection per run of equal-shape sequences, then one attention
  launch over every sequence of the batch (docs/serving.rst);
* :mod:`~prism.optimized.estimators`, :mod:`~prism.optimized.vertical_slash`,
  :mod:`~prism.optimized.antidiagonal_packed`, :mod:`~prism.optimized.sampled` -
  the kernels of the other estimators (docs/estimators.rst);
* :mod:`~prism.optimized.launch` - replays compiled kernels through Triton's
  launcher after the first call, to cut the per-launch host cost;
* :mod:`~prism.optimized.ops` - the ``torch.library`` operators that
  ``torch.compile`` and CUDA graphs trace (:mod:`~prism.optimized.varlen_ops`:
  the packed and paged calls as opaque operators);
* :mod:`~prism.optimized.gradients` - the kernels compute forward passes; with
  inputs that require grad, the attention outputs backpropagate the
  reference's gradients, recomputed in torch over the selected key tiles.

CPU tensors are refused with a message pointing at :mod:`prism.reference`,
unless Triton runs in its interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is imported), which the CPU test-suite uses.
"""

from prism.reference.config import TIE_MARGIN, PrismConfig, resolve_config

from .api import block_sparse_attention, mask_to_indices, prism_attention, select_blocks
from .varlen import (
    block_sparse_attention_varlen,
    prism_attention_paged,
    prism_attention_varlen,
    select_blocks_paged,
    select_blocks_varlen,
)

__all__ = [
    "PrismConfig",
    "TIE_MARGIN",
    "resolve_config",
    "select_blocks",
    "block_sparse_attention",
    "prism_attention",
    "mask_to_indices",
    "select_blocks_varlen",
    "block_sparse_attention_varlen",
    "prism_attention_varlen",
    "select_blocks_paged",
    "prism_attention_paged",
]
