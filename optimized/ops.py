"""The kernels as PyTorch custom operators, so compiled models and CUDA graphs can hold them.

Three operators, registered with :func:`torch.library.define`:

* ``prism::prism_attention`` - what a compiled ``prism_attention`` call is:
  selection and attention in one operator, returning the output, the LSE
  and the tile mask (empty ``(0,)`` tensors where not asked for);
* ``prism::select`` - pooling and selection (a compiled ``select_blocks``):
  the tile mask, its compact indices and a NaN/Inf flag, from ``q``, ``k``
  (and ``v``, only checked);
* ``prism::block_sparse_attention`` - attention over the listed tiles (or
  over a bool mask whose indices it builds), its LSE, and a flag (empty
  unless ``check_values``; a compiled ``block_sparse_attention`` does not
  ask for it).

Each has a fake (meta) implementation that gives the output shapes and dtypes
without running anything, which is what ``torch.compile`` traces and what
``torch.library.opcheck`` checks. To Dynamo and Inductor the operators are
opaque: the Triton kernels inside are launched as they are in eager mode.
Every output is a fresh tensor, never an input or a view of one.

At run time an operator's body costs what a repeated eager call does: it
replays the call plan of its signature (:mod:`prism.optimized.call_plan`;
recorded on the second run of a compiled graph, never while Dynamo traces
or a CUDA graph is captured, where the general path runs). The fused
operator replays the plan an eager ``prism_attention`` would, ``prism::select``
that of ``select_blocks``, ``prism::block_sparse_attention`` that of
``block_sparse_attention``. One operator instead of two for
``prism_attention``, and the configuration as one string, also cut the
dispatcher's share: the configuration is the ``repr`` of the
:class:`~prism.reference.config.PrismConfig` field values
(:func:`config_string`), which Dynamo folds into a constant of the graph and
the body turns back into one cached config object (:func:`config_from_string`);
unlike an object id, the string means the same configuration in another
process, so a graph from Inductor's cache stays correct.

The operators never wait for the GPU. NaN or Inf in an input sets the flag (a
device tensor); :mod:`prism.optimized.api` reads it at the end of an eager
call and raises the reference's ``ValueError``. Under ``torch.compile`` and
CUDA graph capture nobody reads it: the selection is then undefined
(typically only the forced sink and diagonal tiles survive) and the outputs
of the affected heads are NaN.

Eager calls run the implementations directly (:func:`planned_select`,
:func:`planned_attention`, :func:`planned_block_sparse`, or :func:`select`
and :func:`attention` below), without the dispatcher's per-call cost; under
tracing the API calls ``torch.ops.prism.*``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math

import torch
from torch.fx.experimental.symbolic_shapes import guard_scalar

from prism import reference
from prism.reference.bands import band_sizes
from prism.reference.config import PrismConfig
from prism.reference.tiles import tile_layout

from . import gradients
from ._runtime import kernels_interpreted
from .attention import _sparse_attention_kernel, sparse_attention_forward, supported_block_size
from .estimator_path import estimator_select
from .indices import mask_rows_to_indices
from .plan_items import fork, join, side_stream, zero_
from .pooling import nonfinite_flag
from .selection import MAX_WIDTH, select_tiles

# Fixed when triton is imported (TRITON_INTERPRET), so asked once.
_INTERPRETED = kernels_interpreted(_sparse_attention_kernel)

FIELD_NAMES = tuple(f.name for f in dataclasses.fields(PrismConfig))

#: ``block_sparse_attention``'s NaN/Inf check launch (k and v; the attention kernel
#: checks most of the queries) runs on a side stream beside the attention launch; the call's stream
#: waits for it before returning (an eager call then reads the flag). False: it runs
#: first, on the call's stream. On the H200 with the check of q, k and v
#: (results/h200_check_beside_a6af80c.json, Prism's masks of the structured inputs):
#: CUDA-graph replays 0.3-2.3% faster beside (the two launches share the memory
#: bandwidth rather than overlap); eager calls within host noise (5-9% faster at 4K
#: and 8K D 64 in that run, 3-5% slower at 8K in h200_check_beside_e089f01.json).
CHECK_BESIDE_ATTENTION = True
#: The attention kernel checks the query rows that read a key for NaN/Inf, so that the
#: check launch reads k, v and only the query rows of tiles with an empty list (False:
#: that launch reads all of q too; benchmarks compare). On the H200, both beside the
#: attention launch (results/h200_check_beside_fc100fc.json): 6-7.5% off the call's
#: CUDA-graph replay at 4K, 8K and 128K; with 32/32 heads at 32K one round of two.
CHECK_QUERIES_IN_KERNEL = True


def config_values(cfg: PrismConfig) -> tuple:
    """The field values of ``cfg`` in :data:`FIELD_NAMES` order (traceable by Dynamo)."""
    return tuple(getattr(cfg, name) for name in FIELD_NAMES)


def config_string(cfg: PrismConfig) -> str:
    """``cfg`` as the operators' ``config`` argument: the ``repr`` of its field values.

    Dynamo folds it to a constant string of the traced graph (one ``str``
    argument costs the dispatcher less than one argument per field), and
    unlike an id it means the same configuration in another process (a graph
    from Inductor's cache).

    Under ``torch.compile(..., dynamic=True)`` the values are specialised first
    (:func:`traced_constant`): ``repr`` of a symbolic float is a graph break.
    """
    return repr(tuple(map(traced_constant, config_values(cfg))))


def traced_constant(value):
    """``value``, with an int or float that a trace made symbolic specialised to its
    value (a guard on it); anything else, and every value in eager calls, unchanged.

    ``torch.compile(..., dynamic=True)`` makes the floats and ints read from a
    config object symbolic. The operators take the configuration as a constant
    string, and the config's own checks (``math.isinf``) and ``repr`` cannot
    take a symbolic value, so they are specialised first: another threshold
    then compiles another graph, as a constant would.
    """
    if (torch.compiler.is_compiling() and isinstance(value, (int, float))
            and not isinstance(value, bool)):
        return guard_scalar(value)
    return value


@functools.lru_cache(maxsize=1024)
def config_from_values(values: tuple) -> PrismConfig:
    """Inverse of :func:`config_values`."""
    return PrismConfig(**dict(zip(FIELD_NAMES, values, strict=True)))


@functools.lru_cache(maxsize=1024)
def config_from_string(config: str) -> PrismConfig:
    """Inverse of :func:`config_string`: one config object per string (call plans key on
    its identity)."""
    try:  # (no field of a valid PrismConfig takes nan or inf, which repr would not round-trip)
        values = ast.literal_eval(config)
    except (ValueError, SyntaxError):
        values = None
    if type(values) is not tuple or len(values) != len(FIELD_NAMES):
        raise ValueError(f"a prism operator's config must be config_string(PrismConfig(...)) "
                         f"with {len(FIELD_NAMES)} values, got {config!r}")
    return config_from_values(values)


@functools.lru_cache(maxsize=4096)
def _cached_layout(nq: int, nk: int, block_size: int, causal: bool):
    return tile_layout(nq, nk, block_size, causal)


def _layout(nq: int, nk: int, block_size: int, causal: bool):
    """``tile_layout``, cached in eager calls (Dynamo traces the plain function)."""
    if torch.compiler.is_compiling():
        return tile_layout(nq, nk, block_size, causal)
    return _cached_layout(nq, nk, block_size, causal)


_BANDS: dict = {}


def _band_sizes(head_dim: int, high_dim, low_dim):
    """``band_sizes``, remembered per argument triple (bad widths raise and are not kept)."""
    key = (head_dim, high_dim, low_dim)
    sizes = _BANDS.get(key)
    if sizes is None:
        sizes = band_sizes(head_dim, high_dim, low_dim)
        if len(_BANDS) > 1024:
            _BANDS.clear()
        _BANDS[key] = sizes
    return sizes


def select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, cfg: PrismConfig,
           causal: bool):
    """Selection on validated inputs: ``(mask, kv_num_blocks, kv_indices, nonfinite)``.

    One dispatch for every case: the estimators' GPU path
    (:func:`prism.optimized.estimator_path.estimator_select`) for any
    ``estimator`` other than ``"prism"``, empty grids, the reference for rows
    of more than ``MAX_WIDTH`` key tiles, and the Prism kernels otherwise.
    ``v`` (optional) is only checked for NaN/Inf.
    """
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    # Run only eagerly or inside the operator (never traced): the cached layout.
    layout = _cached_layout(nq, nk, cfg.block_size, causal)
    nqt, nkt = layout.num_query_tiles, layout.num_key_tiles
    if nqt and nkt and cfg.estimator == "prism" and nkt <= MAX_WIDTH:
        high_dim, low_dim = _band_sizes(d, cfg.high_dim, cfg.low_dim)
        return select_tiles(q, k, cfg, causal, layout, high_dim, low_dim, write_mask=True,
                            write_indices=True, v=v)
    if cfg.estimator != "prism":
        # Scoring kernels and one finishing launch that writes the mask and the
        # indices and checks what no scoring kernel read (estimator_path).
        return estimator_select(q, k, v, cfg, causal, layout)
    nonfinite = nonfinite_flag(q, k, k if v is None else v)
    if nqt == 0 or nkt == 0:
        mask = torch.zeros(b, hq, nqt, nkt, dtype=torch.bool, device=q.device)
    else:
        mask = reference.select_blocks(q, k, cfg, causal=causal)
    mask = mask.as_subclass(torch.Tensor).contiguous()
    num, idx = mask_rows_to_indices(mask)
    return mask, num, idx, nonfinite


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
              kv_num_blocks: torch.Tensor | None, kv_indices: torch.Tensor | None,
              block_size: int, causal: bool, scale: float | None, return_lse: bool,
              check_values: bool):
    """Block-sparse attention on validated inputs: ``(out, lse, nonfinite)``.

    With ``kv_num_blocks``/``kv_indices`` (causal-trimmed for a causal call)
    the mask is not read; without them the indices are built from it. ``lse``
    is None unless ``return_lse``; ``nonfinite`` is None unless
    ``check_values``, when it flags NaN/Inf in q, k or v: the attention kernel
    checks the query rows that read a key, and one launch reads k, v and the
    query rows of tiles with an empty list (on a side stream
    beside the attention launch, :data:`CHECK_BESIDE_ATTENTION`, joined before
    returning). Paths without the kernel (tiles it does not take, empty inputs)
    check all three in that launch. (The operator returns empty tensors in
    their place.)
    """
    nq, nk, dv = q.shape[2], k.shape[2], v.shape[3]
    kernel = supported_block_size(block_size) and nq > 0 and nk > 0
    in_kernel = kernel and CHECK_QUERIES_IN_KERNEL
    if kernel:
        layout = _cached_layout(nq, nk, block_size, causal)
        if kv_num_blocks is None:
            kv_num_blocks, kv_indices = mask_rows_to_indices(
                block_mask.as_subclass(torch.Tensor), layout.first_query_tile, causal_trim=causal)
    nonfinite = main = side = None
    if check_values:
        nonfinite = torch.empty(1, dtype=torch.float64, device=q.device)
        zero_(nonfinite)
        unread = ((kv_num_blocks, block_size, layout.first_query_tile, layout.query_start)
                  if in_kernel else None)
        if CHECK_BESIDE_ATTENTION and q.is_cuda:
            side = side_stream(q.device, 2)
            main = fork(side)
            with torch.cuda.stream(side):
                nonfinite_flag(q, k, v, unread=unread, flag=nonfinite)
        else:
            nonfinite_flag(q, k, v, unread=unread, flag=nonfinite)
    if not supported_block_size(block_size):
        result = reference.block_sparse_attention(
            q, k, v, block_mask.as_subclass(torch.Tensor), block_size=block_size, causal=causal,
            scale=scale, return_lse=True)
        out, lse = result
    elif not kernel:
        out = torch.zeros(*q.shape[:3], dv, dtype=q.dtype, device=q.device)
        lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
    else:
        out, lse = sparse_attention_forward(
            q, k, v, kv_num_blocks, kv_indices, block_size=block_size, causal=causal,
            scale=scale, return_lse=return_lse, first_query_tile=layout.first_query_tile,
            query_start=layout.query_start,
            interpreted=_INTERPRETED, nonfinite=nonfinite if in_kernel else None)
    if side is not None:
        join(main, side)
    return out, (lse if return_lse else None), nonfinite


def select_general(q, k, v, cfg: PrismConfig, causal: bool):
    """The general path of a selection, as call plans record it: ``((mask, num, idx),
    nonfinite)``."""
    mask, num, idx, nonfinite = select(q, k, v, cfg, causal)
    return (mask, num, idx), nonfinite


def attention_general(q, k, v, cfg: PrismConfig, causal: bool, scale, return_lse: bool,
                      return_mask: bool):
    """``prism_attention``'s general path: ``((out, lse[, mask, num, idx]), nonfinite)``."""
    mask, num, idx, nonfinite = select(q, k, v, cfg, causal)
    out, lse, _ = attention(q, k, v, mask, num, idx, cfg.block_size, causal, scale,
                            return_lse, False)
    return ((out, lse, mask, num, idx) if return_mask else (out, lse)), nonfinite


def planned_select(q, k, v, cfg: PrismConfig, causal: bool, validate=None):
    """A selection through its call plan: ``((mask, num, idx), buffer, flag)``, the
    NaN/Inf flag ``buffer[flag]`` (the general path's when nothing was replayed).

    ``validate`` (the public function's argument checks) runs before the general
    path only: a replayed signature was validated when its plan was made.
    """
    key = call_plan.call_key("select", q, k, v, cfg, causal)
    planned = call_plan.planned(key, (q, k, v), cfg)
    if planned is not None:
        return planned
    if validate is not None:
        validate()
    outputs, nonfinite = call_plan.record(lambda: select_general(q, k, v, cfg, causal), key,
                                          (q, k, v), cfg)
    return outputs, nonfinite, 0


def planned_attention(q, k, v, cfg: PrismConfig, causal: bool, scale, return_lse: bool,
                      return_mask: bool, validate=None):
    """``prism_attention`` through its call plan: ``(outputs, buffer, flag)`` as in
    :func:`planned_select` (``validate`` too), ``outputs`` as :func:`attention_general`'s."""
    key = call_plan.call_key("attention", q, k, v, cfg, causal, scale, return_lse, return_mask)
    planned = call_plan.planned(key, (q, k, v), cfg)
    if planned is not None:
        return planned
    if validate is not None:
        validate()
    outputs, nonfinite = call_plan.record(
        lambda: attention_general(q, k, v, cfg, causal, scale, return_lse, return_mask),
        key, (q, k, v), cfg)
    return outputs, nonfinite, 0


def planned_block_sparse(q, k, v, block_mask, num, idx, block_size: int, causal: bool, scale,
                         return_lse: bool, check_values: bool, validate=None):
    """:func:`attention` through its call plan: ``((out, lse), buffer, flag)``, the flag
    ``buffer[flag]`` (None unless ``check_values``); ``validate`` as in
    :func:`planned_select`."""
    key = call_plan.block_sparse_key(q, k, v, block_mask, num, idx, block_size, causal, scale,
                                     return_lse, check_values)
    inputs = (q, k, v, block_mask, num, idx)
    planned = call_plan.planned(key, inputs)
    if planned is not None:
        return planned
    if validate is not None:
        validate()

    def general():
        out, lse, nonfinite = attention(q, k, v, block_mask, num, idx, block_size, causal,
                                        scale, return_lse, check_values)
        return (out, lse), nonfinite

    outputs, nonfinite = call_plan.record(general, key, inputs)
    return outputs, nonfinite, 0


# ---------------------------------------------------------------------------
# Registration. The operators return fresh tensors only (no aliasing of inputs),
# and take the configuration as one string (config_string). Their bodies replay
# call plans like eager calls (recorded at compiled run time, never while tracing
# or capturing); the NaN/Inf flag they return is nobody's to read.
# ---------------------------------------------------------------------------

def _tile_shape(q, k, block_size: int, causal: bool) -> tuple:
    layout = tile_layout(q.shape[2], k.shape[2], block_size, causal)
    return (q.shape[0], q.shape[1], layout.num_query_tiles, layout.num_key_tiles)


torch.library.define(
    "prism::select",
    "(Tensor q, Tensor k, Tensor? v, bool causal, str config) "
    "-> (Tensor, Tensor, Tensor, Tensor)")


@torch.library.impl("prism::select", "default")
def _select_op(q, k, v, causal, config):
    (mask, num, idx), nonfinite, flag = planned_select(q, k, v, config_from_string(config),
                                                       causal)
    return mask, num, idx, nonfinite[flag:flag + 1]


@torch.library.register_fake("prism::select")
def _select_fake(q, k, v, causal, config):
    shape = _tile_shape(q, k, config_from_string(config).block_size, causal)
    return (q.new_empty(shape, dtype=torch.bool), q.new_empty(shape[:3], dtype=torch.int32),
            q.new_empty(shape, dtype=torch.int32), q.new_empty((1,), dtype=torch.float64))


torch.library.define(
    "prism::prism_attention",
    "(Tensor q, Tensor k, Tensor v, str config, bool causal, float? scale, bool return_lse, "
    "bool return_mask) -> (Tensor, Tensor, Tensor)")


@torch.library.impl("prism::prism_attention", "default")
def _prism_attention_op(q, k, v, config, causal, scale, return_lse, return_mask):
    outputs = planned_attention(q, k, v, config_from_string(config), causal, scale,
                                return_lse, return_mask)[0]
    lse = outputs[1]
    if lse is None:
        lse = q.new_empty((0,), dtype=torch.float32)
    return outputs[0], lse, outputs[2] if return_mask else q.new_empty((0,), dtype=torch.bool)


@torch.library.register_fake("prism::prism_attention")
def _prism_attention_fake(q, k, v, config, causal, scale, return_lse, return_mask):
    mask = (_tile_shape(q, k, config_from_string(config).block_size, causal) if return_mask
            else (0,))
    return (q.new_empty((*q.shape[:3], v.shape[3])),
            q.new_empty(q.shape[:3] if return_lse else (0,), dtype=torch.float32),
            q.new_empty(mask, dtype=torch.bool))


torch.library.define(
    "prism::block_sparse_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor block_mask, Tensor? kv_num_blocks, "
    "Tensor? kv_indices, int block_size, bool causal, float? scale, bool return_lse, "
    "bool check_values) -> (Tensor, Tensor, Tensor)")


@torch.library.impl("prism::block_sparse_attention", "default")
def _attention_op(q, k, v, block_mask, kv_num_blocks, kv_indices, block_size, causal, scale,
                  return_lse, check_values):
    (out, lse), nonfinite, flag = planned_block_sparse(
        q, k, v, block_mask, kv_num_blocks, kv_indices, block_size, causal, scale, return_lse,
        check_values)
    if lse is None:
        lse = torch.empty(0, dtype=torch.float32, device=q.device)
    if check_values:
        nonfinite = nonfinite[flag:flag + 1]
    else:
        nonfinite = torch.empty(0, dtype=torch.float64, device=q.device)
    return out, lse, nonfinite


@torch.library.register_fake("prism::block_sparse_attention")
def _attention_fake(q, k, v, block_mask, kv_num_blocks, kv_indices, block_size, causal, scale,
                    return_lse, check_values):
    out = q.new_empty((*q.shape[:3], v.shape[3]))
    lse = q.new_empty(q.shape[:3] if return_lse else (0,), dtype=torch.float32)
    return out, lse, q.new_empty((1 if check_values else 0,), dtype=torch.float64)


# Gradients (optimized.gradients): the kernels compute forward passes only; the
# attention operators' backward is the reference's softmax gradient, recomputed
# over the selected key tiles of the operator's tile mask (prism_attention's own
# selection, made again when its mask was not returned).

def _lse_grad(grad_lse, return_lse: bool):
    return grad_lse if return_lse and grad_lse is not None and grad_lse.numel() else None


def _setup_block_sparse(ctx, inputs, output):
    q, k, v, block_mask, _, _, block_size, causal, scale, return_lse, _ = inputs
    ctx.save_for_backward(q, k, v, block_mask)
    ctx.options = (block_size, causal, scale, return_lse)


def _block_sparse_backward(ctx, grad_out, grad_lse, _):
    q, k, v, block_mask = ctx.saved_tensors
    block_size, causal, scale, return_lse = ctx.options
    grads = gradients.attention_gradients(q, k, v, block_mask, block_size, causal, scale,
                                          grad_out, _lse_grad(grad_lse, return_lse),
                                          ctx.needs_input_grad[:3])
    return (*grads, *(None,) * 8)


def _setup_prism(ctx, inputs, output):
    q, k, v, config, causal, scale, return_lse, return_mask = inputs
    ctx.save_for_backward(q, k, v, output[2] if return_mask else None)
    ctx.options = (config, causal, scale, return_lse)


def _prism_backward(ctx, grad_out, grad_lse, _):
    q, k, v, mask = ctx.saved_tensors
    config, causal, scale, return_lse = ctx.options
    if mask is None:  # the same selection again (deterministic kernels)
        mask = torch.ops.prism.select(q, k, None, causal, config)[0]
    grads = gradients.attention_gradients(q, k, v, mask, config_from_string(config).block_size,
                                          causal, scale, grad_out,
                                          _lse_grad(grad_lse, return_lse),
                                          ctx.needs_input_grad[:3])
    return (*grads, *(None,) * 5)


torch.library.register_autograd("prism::block_sparse_attention", _block_sparse_backward,
                                setup_context=_setup_block_sparse)
torch.library.register_autograd("prism::prism_attention", _prism_backward,
                                setup_context=_setup_prism)


_capturing = None


def tracing() -> bool:
    """True under ``torch.compile`` tracing or while the current CUDA stream is captured."""
    global _capturing
    if torch.compiler.is_compiling():
        return True
    if _capturing is None:  # asked once: torch.cuda.is_available() costs microseconds
        _capturing = (torch._C._cuda_isCurrentStreamCapturing if torch.cuda.is_available()
                      else bool)
    return _capturing()


# Call plans: a repeated call replays its recorded launches (imports tracing from here).
from . import call_plan  # noqa: E402
