"""The public functions of ``prism.optimized``: the reference's API on Triton kernels.

Each function takes exactly the arguments of its :mod:`prism.reference`
namesake, validates them with the same shared code (contract §8), and returns the
same outputs, computed by the kernels of :mod:`~prism.optimized.pooling`,
:mod:`~prism.optimized.selection`, :mod:`~prism.optimized.indices` and
:mod:`~prism.optimized.attention`.

Where the kernels do not apply, a documented exact path runs instead:

* ``block_sparse_attention`` with a ``block_size`` that is not a multiple of 16
  runs :func:`prism.reference.block_sparse_attention` (same device, same result);
* selection with more than ``MAX_WIDTH`` (32768) key tiles runs
  :func:`prism.reference.select_blocks`;
* selection with a non-default ``estimator`` (docs/estimators.rst) runs
  :func:`prism.optimized.estimators.estimator_select_blocks` (its kernels where
  a stage has one, the reference's torch code elsewhere, same device).
  ``prism_attention`` still runs the Triton attention kernel on that mask.

No host synchronisation on the CUDA path: NaN/Inf checks run inside the
kernels that read the data (pooling for q, k and v; a one-pass check for
``block_sparse_attention``) and set a device flag. An eager call reads that
flag once, at its end, and raises the reference's ``ValueError``. Under
``torch.compile`` the functions trace into the custom operators of
:mod:`~prism.optimized.ops` (no graph break), and neither there nor during
CUDA graph capture is the flag read: NaN input then gives an undefined
selection and NaN output rows instead of an error.

A repeated eager ``select_blocks``, ``prism_attention`` or
``block_sparse_attention`` call (same shapes, strides, dtypes, devices,
config object and options as an earlier one; any values) skips validation
and the general path's per-call work: it replays the launches recorded from
an earlier call of that signature (:mod:`~prism.optimized.call_plan`), with
the same results bit for bit. Under ``torch.compile``, ``prism_attention``
is one operator (``prism::prism_attention``) whose body replays the same
plan at run time; so do ``prism::select`` and
``prism::block_sparse_attention``.

``select_blocks`` returns a :class:`~prism.reference.tile_mask.TileMask`
carrying the kernel's compact indices, which ``block_sparse_attention`` uses
instead of rebuilding them (under ``torch.compile`` it returns the plain bool
tensor).
"""

from __future__ import annotations

import torch

from prism.reference.config import PrismConfig, resolve_config
from prism.reference.tile_mask import TileMask
from prism.reference.validation import (
    check_finite,
    validate_block_mask,
    validate_block_size,
    validate_scale,
)

from . import gradients, ops
from ._runtime import check_device, validate_qk, validate_qkv
from .attention import _sparse_attention_kernel
from .indices import _mask_to_indices_kernel, mask_rows_to_indices
from .selection import _select_tiles_kernel

_DEFAULT_CONFIG = PrismConfig()


_RESOLVED: dict = {}


def _resolve(config, overrides) -> PrismConfig:
    """``resolve_config``, returning one config object per (config, overrides) in eager calls.

    Nothing overridden: the given (or default) config itself. Otherwise the
    resolved config is remembered, so repeated calls with the same overrides
    get the same object (the kernels' launch caches key on its identity).
    """
    if not overrides:
        if config is None:
            return _DEFAULT_CONFIG
        if type(config) is PrismConfig:
            return config
    if torch.compiler.is_compiling():
        if type(config) is PrismConfig:
            # Every field replaced, so that the new config's checks see no symbolic value
            # (ops.traced_constant).
            overrides = {**{name: getattr(config, name) for name in ops.FIELD_NAMES},
                         **overrides}
        return resolve_config(config, **{name: ops.traced_constant(value)
                                         for name, value in overrides.items()})
    try:
        # Values with their types: 64 and 64.0 (or 1 and True) hash alike.
        key = (id(config), *overrides.items(), *map(type, overrides.values()))
        cached = _RESOLVED.get(key)
    except TypeError:  # an unhashable override value: resolve_config says what is wrong
        return resolve_config(config, **overrides)
    if cached is None or cached[0] is not config:
        if len(_RESOLVED) > 256:
            _RESOLVED.clear()
        cached = _RESOLVED[key] = (config, resolve_config(config, **overrides))
    return cached[1]


def _raise_if_nonfinite(nonfinite: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Raise the reference's ``ValueError`` if a kernel flagged NaN/Inf (eager calls only).

    Reading the flag is the one host wait of an eager call; under compilation
    or graph capture it is skipped. The flag can also be set by a finite block
    whose fp32 sum overflows, so each tensor is confirmed before raising.
    """
    if nonfinite is None or ops.tracing():
        return
    if bool(nonfinite):  # one element: a copy to the host, no extra kernel
        for name, t in tensors.items():
            check_finite(name, t)


def select_blocks(q, k, config: PrismConfig | None = None, *, causal: bool = True,
                  **overrides) -> torch.Tensor:
    """Choose the (query tile, key tile) pairs to compute (contract §3 to §6), on the GPU.

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
    TileMask (B, Hq, n_query_tiles, n_key_tiles), bool
        A bool tensor that also carries the compact indices the selection
        kernel wrote (:class:`prism.reference.tile_mask.TileMask`). Under
        ``torch.compile`` a plain bool tensor.

    Raises
    ------
    ValueError, TypeError
        On bad input (contract §8), NaN/Inf included (eager calls), and on CPU tensors.
    """
    cfg = _resolve(config, overrides)

    def validate():
        validate_qk(q, k, causal=causal, check_values=False)
        if not (q.is_cuda and k.is_cuda):
            check_device(_select_tiles_kernel, q=q, k=k)

    if torch.compiler.is_compiling():
        validate()
        return torch.ops.prism.select(q, k, None, causal, ops.config_string(cfg))[0]
    # A repeated call replays its plan (validated when the plan was made).
    (mask, num, idx), flags, at = ops.planned_select(q, k, None, cfg, causal, validate)
    _raise_if_nonfinite(flags[at:at + 1], q=q, k=k)
    return TileMask.from_selection(mask, cfg.block_size, causal, q.shape[2], k.shape[2], num,
                                   idx)


def _select(q, k, cfg: PrismConfig, causal: bool, *, write_indices: bool = True):
    """Selection on validated inputs: ``(mask, kv_num_blocks, kv_indices, layout)``."""
    mask, num, idx, _ = ops.select(q, k, None, cfg, causal)
    return mask, num, idx, ops._layout(q.shape[2], k.shape[2], cfg.block_size, causal)


def block_sparse_attention(q, k, v, block_mask, *, block_size: int = 128, causal: bool = True,
                           scale: float | None = None, return_lse: bool = False):
    """Attention restricted to the selected tiles (contract §7), on the GPU.

    Same contract as :func:`prism.reference.block_sparse_attention`.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    v : Tensor (B, Hkv, Nk, Dv)
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
        Batch and head dims may be 1 to broadcast. Tiles a causal query tile
        cannot see (``j`` above its diagonal) contribute nothing. A
        :class:`~prism.reference.tile_mask.TileMask` from ``select_blocks``
        for the same call hands over its compact indices.
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
    num = idx = None
    if isinstance(block_mask, TileMask) and type(q) is torch.Tensor and type(k) is torch.Tensor:
        carried = block_mask.carried_indices(block_size=block_size, causal=causal,
                                             num_queries=q.shape[2], num_keys=k.shape[2])
        if carried is not None and carried[0].device == q.device:
            num, idx = carried
    mask = block_mask.as_tensor() if isinstance(block_mask, TileMask) else block_mask

    def validate():
        validate_qkv(q, k, v, causal=causal, check_values=False)
        validate_block_size(block_size)
        if scale is not None:
            validate_scale(scale)
        layout = ops._layout(q.shape[2], k.shape[2], block_size, causal)
        validate_block_mask(block_mask, q, (layout.num_query_tiles, layout.num_key_tiles))
        if not (q.is_cuda and k.is_cuda and v.is_cuda):
            check_device(_sparse_attention_kernel, q=q, k=k, v=v)

    if torch.compiler.is_compiling():  # nobody reads the NaN/Inf flag of compiled code
        validate()
        out, lse, _ = torch.ops.prism.block_sparse_attention(
            q, k, v, mask, num, idx, block_size, causal, scale, return_lse, False)
    else:
        def forward():
            (out, lse), flags, at = ops.planned_block_sparse(
                q, k, v, mask, num, idx, block_size, causal, scale, return_lse, True, validate)
            _raise_if_nonfinite(flags[at:at + 1], q=q, k=k, v=v)
            return out, lse

        if gradients.needs_gradients(q, k, v):  # the kernels' output, the reference's backward
            validate()
            return gradients.with_gradients(q, k, v, mask, forward, block_size=block_size,
                                            causal=causal, scale=scale)
        out, lse = forward()
    return (out, lse) if return_lse else out


def prism_attention(q, k, v, config: PrismConfig | None = None, *, causal: bool = True,
                    scale: float | None = None, return_lse: bool = False,
                    return_mask: bool = False, **overrides):
    """Prism end to end on the GPU: selection, then block-sparse attention.

    Same contract as :func:`prism.reference.prism_attention`. The selection
    kernel hands its compact tile indices straight to the attention kernel,
    and the pooling launch also checks ``v`` for NaN/Inf.

    Parameters
    ----------
    q, k, v, causal, scale, return_lse
        As in :func:`block_sparse_attention`.
    config : PrismConfig, optional
    return_mask : bool
        Also return the selected tile mask (a ``TileMask`` in eager mode).
    **overrides
        Any :class:`PrismConfig` field.

    Returns
    -------
    o, or a tuple ``(o, lse)``, ``(o, mask)`` or ``(o, lse, mask)`` in that order.
    """
    cfg = _resolve(config, overrides)

    def validate():
        validate_qkv(q, k, v, causal=causal, check_values=False)
        if scale is not None:
            validate_scale(scale)
        if not (q.is_cuda and k.is_cuda and v.is_cuda):
            check_device(_sparse_attention_kernel, q=q, k=k, v=v)

    if torch.compiler.is_compiling():  # one operator, whose body replays the call's plan
        validate()
        out, lse, mask = torch.ops.prism.prism_attention(
            q, k, v, ops.config_string(cfg), causal, scale, return_lse, return_mask)
        return _attention_result(out, lse, mask, None, None, cfg, causal, q, k, return_lse,
                                 return_mask, wrap=False)
    if gradients.needs_gradients(q, k, v):
        # Selection, then attention whose backward is the reference's (optimized.gradients);
        # the same outputs as the fused call.
        mask = select_blocks(q, k, cfg, causal=causal)
        out, lse = block_sparse_attention(q, k, v, mask, block_size=cfg.block_size,
                                          causal=causal, scale=scale, return_lse=True)
        return _attention_result(out, lse, mask, None, None, cfg, causal, q, k, return_lse,
                                 return_mask, wrap=False)
    outputs, flags, at = ops.planned_attention(q, k, v, cfg, causal, scale, return_lse,
                                               return_mask, validate)
    _raise_if_nonfinite(flags[at:at + 1], q=q, k=k, v=v)
    return _attention_result(*outputs, *(None,) * (5 - len(outputs)), cfg, causal, q, k,
                             return_lse, return_mask)


def _attention_result(out, lse, mask, num, idx, cfg, causal, q, k, return_lse, return_mask,
                      wrap=True):
    """``prism_attention``'s return value; ``wrap``: the mask of an eager call's plan, made a
    ``TileMask`` here (traced calls return a plain tensor, the gradient path's is one)."""
    result = (out, lse) if return_lse else out
    if not return_mask:
        return result
    if wrap:
        mask = TileMask.from_selection(mask, cfg.block_size, causal, q.shape[2], k.shape[2],
                                       num, idx)
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
