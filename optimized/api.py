"""The public functions of ``prism.optimized``: the reference's API on Triton kernels.

Each function takes exactly the arguments of its :mod:`prism.reference`
namesake, validates them with the same shared code (SPEC 8), and returns the
same outputs, computed by the kernels of :mod:`~prism.optimized.pooling`,
:mod:`~prism.optimized.selection`, :mod:`~prism.optimized.indices` and
:mod:`~prism.optimized.attention`.

Where the kernels do not apply, a documented exact path runs instead:

* ``block_sparse_attention`` with a ``block_size`` that is not a multiple of 16
  runs :func:`prism.reference.block_sparse_attention` (same device, same result);
* selection with more than ``MAX_WIDTH`` (32768) key tiles runs
  :func:`prism.reference.select_blocks`;
* selection with ``estimator="antidiagonal"`` or
  ``"antidiagonal_vertical_slash"`` (docs/estimators.rst) scores tiles with the
  Triton kernel of :mod:`~prism.optimized.estimators`, then runs the
  reference's top-p, vertical-slash and forced-tile code in torch on the same
  device;
* selection with another non-default ``estimator`` runs
  :func:`prism.reference.select_blocks` on the same device. ``prism_attention``
  still runs the Triton attention kernel on that mask.
"""

from __future__ import annotations

import torch

from prism import reference
from prism.reference.bands import band_sizes
from prism.reference.config import PrismConfig, resolve_config
from prism.reference.estimators import estimator_mask
from prism.reference.tiles import tile_layout
from prism.reference.validation import (
    validate_block_mask,
    validate_block_size,
    validate_qk,
    validate_qkv,
    validate_scale,
)

from ._runtime import check_device, check_finite_fast, kernels_interpreted
from .attention import _sparse_attention_kernel, sparse_attention_forward, supported_block_size
from .estimators import antidiagonal_tile_probabilities
from .indices import _mask_to_indices_kernel, mask_rows_to_indices
from .selection import MAX_WIDTH, _select_tiles_kernel, select_tiles

# Estimators whose O(N^2) scoring runs as the kernel of :mod:`.estimators`.
_ANTIDIAGONAL_ESTIMATORS = ("antidiagonal", "antidiagonal_vertical_slash")


def select_blocks(q, k, config: PrismConfig | None = None, *, causal: bool = True,
                  **overrides) -> torch.Tensor:
    """Choose the (query tile, key tile) pairs to compute (SPEC 3 to 6), on the GPU.

    Same contract as :func:`prism.reference.select_blocks`.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
        Queries after RoPE; fp32, fp16 or bf16, on a CUDA device.
    k : Tensor (B, Hkv, Nk, D)
        Keys after RoPE, un-repeated (``Hq % Hkv == 0``).
    config : PrismConfig, optional
    causal : bool
    **overrides
        Any :class:`PrismConfig` field.

    Returns
    -------
    Tensor (B, Hq, n_query_tiles, n_key_tiles), bool

    Raises
    ------
    ValueError, TypeError
        On bad input (SPEC 8), NaN/Inf included, and on CPU tensors.
    """
    cfg = resolve_config(config, **overrides)
    validate_qk(q, k, causal=causal, check_values=False)
    check_device(_select_tiles_kernel, q=q, k=k)
    mask, _, _, _ = _select(q, k, cfg, causal, write_indices=False)
    return mask


def _select(q, k, cfg: PrismConfig, causal: bool, *, write_indices: bool):
    """Selection on validated inputs: ``(mask, kv_num_blocks, kv_indices, layout)``."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    high_dim, low_dim = band_sizes(d, cfg.high_dim, cfg.low_dim)
    layout = tile_layout(nq, nk, cfg.block_size, causal)
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    if nqt == 0 or nkt == 0:
        check_finite_fast(q=q, k=k)
        mask = torch.zeros(b, hq, nqt, nkt, dtype=torch.bool, device=q.device)
    elif cfg.estimator in _ANTIDIAGONAL_ESTIMATORS:
        # E1/E5: the antidiagonal scores run as a Triton kernel; top-p, the
        # vertical-slash part and the forced tiles are the reference's torch code.
        check_finite_fast(q=q, k=k)
        mask = estimator_mask(q, k, cfg, causal, antidiagonal_fn=antidiagonal_tile_probabilities)
    elif nkt > MAX_WIDTH or cfg.estimator != "prism":
        mask = reference.select_blocks(q, k, cfg, causal=causal)
    else:
        mask, num, idx = select_tiles(q, k, cfg, causal, layout, high_dim, low_dim,
                                      write_mask=True, write_indices=write_indices)
        return mask, num, idx, layout
    if not write_indices:
        return mask, None, None, layout
    num, idx = mask_rows_to_indices(mask)
    return mask, num, idx, layout


def block_sparse_attention(q, k, v, block_mask, *, block_size: int = 128, causal: bool = True,
                           scale: float | None = None, return_lse: bool = False):
    """Attention restricted to the selected tiles (SPEC 7), on the GPU.

    Same contract as :func:`prism.reference.block_sparse_attention`.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    v : Tensor (B, Hkv, Nk, Dv)
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
        Batch and head dims may be 1 to broadcast. Tiles a causal query tile
        cannot see (``j`` above its diagonal) contribute nothing.
    block_size : int
        Tiles that are multiples of 16 run the Triton kernel; other sizes run
        the reference implementation on the same device.
    causal : bool
    scale : float, optional
        Default ``1 / sqrt(D)``.
    return_lse : bool

    Returns
    -------
    o : Tensor (B, Hq, Nq, Dv), dtype of ``q``
    lse : Tensor (B, Hq, Nq), float32, only if ``return_lse``
    """
    validate_qkv(q, k, v, causal=causal, check_values=False)
    validate_block_size(block_size)
    validate_scale(scale)
    b, hq, nq, _ = q.shape
    nk, dv = k.shape[2], v.shape[3]
    layout = tile_layout(nq, nk, block_size, causal)
    validate_block_mask(block_mask, q, (layout.num_query_tiles, layout.num_key_tiles))
    check_device(_sparse_attention_kernel, q=q, k=k, v=v)
    check_finite_fast(q=q, k=k, v=v)
    if not supported_block_size(block_size):
        return reference.block_sparse_attention(q, k, v, block_mask, block_size=block_size,
                                                causal=causal, scale=scale,
                                                return_lse=return_lse)
    if nq == 0 or nk == 0:
        return _empty_result(q, dv, return_lse)
    num, idx = mask_rows_to_indices(block_mask, layout.first_query_tile, causal_trim=causal)
    out, lse = sparse_attention_forward(
        q, k, v, num, idx, block_size=block_size, causal=causal, scale=scale,
        return_lse=return_lse, first_query_tile=layout.first_query_tile,
        query_start=layout.query_start,
        interpreted=kernels_interpreted(_sparse_attention_kernel))
    return (out, lse) if return_lse else out


def _empty_result(q, dv: int, return_lse: bool):
    """Outputs when no query has a key: ``o = 0``, ``lse = -inf``."""
    b, hq, nq, _ = q.shape
    out = torch.zeros(b, hq, nq, dv, dtype=q.dtype, device=q.device)
    if not return_lse:
        return out
    return out, torch.full((b, hq, nq), float("-inf"), dtype=torch.float32, device=q.device)


def prism_attention(q, k, v, config: PrismConfig | None = None, *, causal: bool = True,
                    scale: float | None = None, return_lse: bool = False,
                    return_mask: bool = False, **overrides):
    """Prism end to end on the GPU: selection, then block-sparse attention.

    Same contract as :func:`prism.reference.prism_attention`. The selection
    kernel hands its compact tile indices straight to the attention kernel.

    Parameters
    ----------
    q, k, v, causal, scale, return_lse
        As in :func:`block_sparse_attention`.
    config : PrismConfig, optional
    return_mask : bool
        Also return the selected tile mask.
    **overrides
        Any :class:`PrismConfig` field.

    Returns
    -------
    o, or a tuple ``(o, lse)``, ``(o, mask)`` or ``(o, lse, mask)`` in that order.
    """
    cfg = resolve_config(config, **overrides)
    validate_qkv(q, k, v, causal=causal, check_values=False)
    validate_scale(scale)
    check_device(_sparse_attention_kernel, q=q, k=k, v=v)
    check_finite_fast(v=v)
    mask, num, idx, layout = _select(q, k, cfg, causal, write_indices=True)
    nq, nk, dv = q.shape[2], k.shape[2], v.shape[3]
    if nq == 0 or nk == 0:
        result = _empty_result(q, dv, return_lse)
    elif not supported_block_size(cfg.block_size):
        result = reference.block_sparse_attention(q, k, v, mask, block_size=cfg.block_size,
                                                  causal=causal, scale=scale,
                                                  return_lse=return_lse)
    else:
        out, lse = sparse_attention_forward(
            q, k, v, num, idx, block_size=cfg.block_size, causal=causal, scale=scale,
            return_lse=return_lse, first_query_tile=layout.first_query_tile,
            query_start=layout.query_start,
            interpreted=kernels_interpreted(_sparse_attention_kernel))
        result = (out, lse) if return_lse else out
    if not return_mask:
        return result
    return (*result, mask) if return_lse else (result, mask)


def mask_to_indices(block_mask: torch.Tensor):
    """Per row, the number of selected key tiles and their indices in ascending order.

    Same contract as :func:`prism.reference.mask_to_indices`, computed by a
    Triton kernel (one program per row, a running prefix sum over the row).

    Parameters
    ----------
    block_mask : Tensor (..., nq, nk), bool

    Returns
    -------
    kv_num_blocks : Tensor (..., nq), int32
    kv_indices : Tensor (..., nq, nk), int32
        The first ``kv_num_blocks[..., i]`` entries of row ``i`` are the
        selected key tiles, ascending; the rest are -1.
    """
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise TypeError(
            "block_mask must be a bool tensor (..., n_query_tiles, n_key_tiles), got "
            f"{type(block_mask).__name__}"
            + (f" of dtype {block_mask.dtype}" if isinstance(block_mask, torch.Tensor) else "")
        )
    if block_mask.dim() < 2:
        raise ValueError(
            f"block_mask needs at least 2 dims (n_query_tiles, n_key_tiles), got shape "
            f"{tuple(block_mask.shape)}"
        )
    check_device(_mask_to_indices_kernel, block_mask=block_mask)
    return mask_rows_to_indices(block_mask)
