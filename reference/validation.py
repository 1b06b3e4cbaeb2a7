"""Input validation shared by ``prism.reference`` and ``prism.optimized`` (contract §8).

Every check runs before any computation and raises ``ValueError`` or
``TypeError`` with a message that names the argument, what was expected, what
arrived and how to fix the call. Nothing here modifies a tensor.

The shape and type checks of :func:`validate_qk` and :func:`validate_qkv`
depend only on each tensor's type, shape, dtype and device and on ``causal``;
signatures that passed are remembered, so a repeated call (the common case:
every layer of a model, every decoding step of one length) skips the checks.
Failing inputs are never remembered and raise every time; value checks
(``check_values``) always run.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, rank: int = 4, layout: str = "(B, H, N, D)") -> None:
    """Check that ``t`` is a float tensor of the given rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(
            f"{name} must have {rank} dimensions {layout}, got {_describe(t)}; "
            "Prism uses the torch SDPA layout (batch, heads, tokens, head_dim): "
            "transpose (B, N, H, D) inputs with .transpose(1, 2)"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float32, float16 or bfloat16, got {t.dtype}; "
            f"convert with {name}.float() or {name}.to(torch.bfloat16)"
        )


def check_finite(name: str, t: torch.Tensor) -> None:
    """Reject NaN or Inf entries (they would poison every pooled tile they touch).

    Meta tensors hold no values and pass (their results are shape-only).
    """
    if t.device.type == "meta":
        return
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN or Inf value(s) ({_describe(t)}); "
            "Prism's selection is undefined on non-finite inputs: clean or clamp them first"
        )


def check_same_dtype_device(**tensors: torch.Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        t = tensors[name]
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {names[0]} has {first.dtype}; mixed dtypes are "
                f"not supported: cast both, e.g. {name}.to({names[0]}.dtype)"
            )
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {names[0]} is on {first.device}; "
                f"move them to one device, e.g. {name}.to({names[0]}.device)"
            )


#: Signatures of inputs that passed the shape/type checks (cleared when it grows large).
_PASSED: dict = {}


def _signature(causal, q, k, v=None):
    """A hashable summary of what the shape/type checks read, or None (not cacheable).

    None under ``torch.compile`` tracing (the checks are traced, not skipped),
    for a non-bool ``causal`` and for anything that is not a tensor.
    """
    if (type(causal) is not bool or not isinstance(q, torch.Tensor)
            or not isinstance(k, torch.Tensor) or torch.compiler.is_compiling()):
        return None
    key = (causal, type(q), q.shape, q.dtype, q.device, type(k), k.shape, k.dtype, k.device)
    if v is not None:
        if not isinstance(v, torch.Tensor):
            return None
        key += (type(v), v.shape, v.dtype, v.device)
    return key


def _known(key) -> bool:
    if key is None:
        return False
    try:
        return key in _PASSED
    except TypeError:  # symbolic sizes are not hashable
        return False


def _remember(key) -> None:
    if key is not None:
        if len(_PASSED) > 4096:
            _PASSED.clear()
        try:
            _PASSED[key] = True
        except TypeError:  # symbolic sizes: such calls are simply checked every time
            return


def validate_qk(q, k, *, causal: bool, check_values: bool = True) -> None:
    """Validate query and key tensors (contract §2 and §8).

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    causal : bool
        When causal, ``Nq <= Nk`` is required (queries are the last Nq positions).
    check_values : bool
        Also reject NaN/Inf entries.
    """
    key = _signature(causal, q, k)
    if _known(key):
        if check_values:
            check_finite("q", q)
            check_finite("k", k)
        return
    _check_qk(q, k, causal)
    _remember(key)
    if check_values:
        check_finite("q", q)
        check_finite("k", k)


def _check_qk(q, k, causal) -> None:
    """The shape and type checks of :func:`validate_qk`."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    check_tensor("q", q)
    check_tensor("k", k)
    check_same_dtype_device(q=q, k=k)
    bq, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if bq != bk:
        raise ValueError(
            f"q and k must have the same batch size, got q batch {bq} and k batch {bk}"
        )
    if d != dk:
        raise ValueError(
            f"q and k must have the same head_dim, got q head_dim {d} and k head_dim {dk}"
        )
    if d == 0 or d % 2:
        raise ValueError(
            f"head_dim must be a positive even number (RoPE rotates pairs of dims), got {d}"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of KV heads (GQA), "
            f"got q heads {hq} and k heads {hkv}; pass k/v un-repeated with Hq % Hkv == 0"
        )
    if causal and nq > nk:
        raise ValueError(
            f"causal attention needs Nq <= Nk (queries are the last Nq of the Nk positions), "
            f"got q tokens {nq} > k tokens {nk}; pass the whole KV sequence including any "
            "prefix, or use causal=False"
        )


def validate_stage_inputs(q, k, layout, causal) -> None:
    """Checks shared by the estimators' scoring kernels (clear errors, contract §8).

    Like :func:`validate_qk` without its RoPE rule (any positive head_dim), plus
    ``layout`` being the :class:`~prism.reference.tiles.TileLayout` of these inputs.
    """
    from .tiles import TileLayout, tile_layout

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    check_tensor("q", q)
    check_tensor("k", k, layout="(B, Hkv, Nk, D)")
    check_same_dtype_device(q=q, k=k)
    b, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if b != bk:
        raise ValueError(f"q and k must have the same batch size, got q batch {b} and "
                         f"k batch {bk}")
    if d != dk or d == 0:
        raise ValueError(f"q and k must have the same positive head_dim, got q head_dim {d} "
                         f"and k head_dim {dk}")
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of KV heads (GQA), "
            f"got q heads {hq} and k heads {hkv}; pass k un-repeated with Hq % Hkv == 0")
    if causal and nq > nk:
        raise ValueError(f"causal scoring needs Nq <= Nk, got q tokens {nq} > k tokens {nk}; "
                         "pass the whole key sequence, or causal=False")
    if not isinstance(layout, TileLayout):
        raise TypeError("layout must be a prism.reference.TileLayout from tile_layout(...), "
                        f"got {type(layout).__name__}")
    if layout != tile_layout(nq, nk, layout.block_size, causal):
        raise ValueError(
            f"layout does not describe these inputs: got {layout}, but q has {nq} tokens, "
            f"k has {nk} and causal={causal}; build it with "
            f"tile_layout({nq}, {nk}, {layout.block_size}, {causal})")


def validate_qkv(q, k, v, *, causal: bool, check_values: bool = True) -> None:
    """Validate q, k and v (v is (B, Hkv, Nk, Dv))."""
    key = _signature(causal, q, k, v) if v is not None else None
    known = _known(key)
    if not known:
        _check_qk(q, k, causal)
    if check_values:
        check_finite("q", q)
        check_finite("k", k)
    if not known:
        _check_v(q, k, v)
        _remember(key)
    if check_values:
        check_finite("v", v)


def _check_v(q, k, v) -> None:
    """The shape and type checks of v in :func:`validate_qkv` (after q and k passed)."""
    check_tensor("v", v, layout="(B, Hkv, Nk, Dv)")
    check_same_dtype_device(q=q, v=v)
    if v.shape[0] != k.shape[0] or v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v must match k in batch, heads and tokens: k has {tuple(k.shape)}, "
            f"v has {tuple(v.shape)}"
        )
    if v.shape[3] == 0:
        raise ValueError("v must have a head_dim of at least 1, got 0")


def validate_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (scale == scale) or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}; None means 1/sqrt(head_dim)")


def validate_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(
            f"block_size must be an int, got {type(block_size).__name__} {block_size!r}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}; use e.g. 128")


def validate_block_mask(block_mask, q, expected_tiles: tuple[int, int]) -> None:
    """Validate a tile mask for ``block_sparse_attention``.

    The mask is bool, (B, Hq, n_query_tiles, n_key_tiles); its batch and head
    dims may also be 1 to broadcast.
    """
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(
            f"block_mask must be a bool tensor, got {block_mask.dtype}; "
            "use block_mask.bool() or the output of select_blocks"
        )
    if block_mask.device != q.device:
        raise ValueError(
            f"block_mask is on {block_mask.device} but q is on {q.device}; move it with "
            "block_mask.to(q.device)"
        )
    b, hq = q.shape[0], q.shape[1]
    nqt, nkt = expected_tiles
    shape = tuple(block_mask.shape)
    ok = (
        block_mask.dim() == 4
        and shape[0] in (1, b)
        and shape[1] in (1, hq)
        and shape[2] == nqt
        and shape[3] == nkt
    )
    if not ok:
        raise ValueError(
            f"block_mask must have shape (B, Hq, n_query_tiles, n_key_tiles) = "
            f"({b}, {hq}, {nqt}, {nkt}) for these inputs and block_size (B and Hq may be 1), "
            f"got {shape}; build it with select_blocks using the same block_size and causal"
        )
