"""Input validation shared by ``prism.reference`` and ``prism.optimized`` (contract §8).

Every check runs before any computation and raises ``ValueError`` or
``TypeError`` with a message that names the argument, what was expected, what
arrived and how to fix the call. Nothing here modifies a tensor.

Every function here checks on every call: like the rest of the reference it
keeps no hidden state and caches nothing. :mod:`prism.optimized` wraps
:func:`validate_qk` and :func:`validate_qkv` with a remembered-signature fast
path of its own (:mod:`prism.optimized._runtime`) to cut its host time.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Largest tile accepted: tile bounds are int64 token positions (any tile at least as
#: long as the sequence already holds all of it).
MAX_BLOCK_SIZE = 2**62


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, rank: int = 4, layout: str = "(B, H, N, D)", *,
                 any_float: bool = False) -> None:
    """Check that ``t`` is a float tensor of the given rank.

    The dtype is one of :data:`FLOAT_DTYPES`, or any floating dtype (float64
    included) when ``any_float``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; pass a "
                        f"tensor, e.g. torch.as_tensor({name})")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; "
                        f"convert it with {name}.to_dense()")
    if t.dim() != rank:
        raise ValueError(
            f"{name} must have {rank} dimensions {layout}, got {_describe(t)}; "
            "Prism uses the torch SDPA layout (batch, heads, tokens, head_dim): "
            "transpose (B, N, H, D) inputs with .transpose(1, 2)"
        )
    if any_float and t.is_floating_point():
        return
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


def _is_int(value) -> bool:
    """A Python int (or a symbolic size under ``torch.compile``), never a bool."""
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def check_head_dim(head_dim, name: str = "head_dim") -> None:
    """Check that ``head_dim`` is a positive even int (RoPE rotates pairs of dims, §2)."""
    if not _is_int(head_dim):
        raise TypeError(
            f"{name} must be an int, got {type(head_dim).__name__} {head_dim!r}; pass the "
            "last dim of q, e.g. q.shape[-1]"
        )
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(
            f"{name} must be a positive even number (RoPE rotates pairs of dims), got "
            f"{head_dim}; pad the head dim to an even size or pass the q/k of a RoPE model"
        )


def check_band_width(value, name: str, head_dim: int | None = None) -> None:
    """Check one band width (§4, §8): an even int ``> 0``, and ``<= head_dim`` when the
    head dim is known (a config is checked before any tensor is seen)."""
    if not _is_int(value):
        raise TypeError(
            f"{name} must be an int or None, got {type(value).__name__} {value!r}; "
            "pass a whole number of head dims such as 64, or None for the default"
        )
    if head_dim is None:
        if value <= 0 or value % 2:
            raise ValueError(
                f"{name} must be a positive even number of head dims (whole RoPE pairs), "
                f"got {value}; use e.g. 64, or None for the default"
            )
    elif value <= 0 or value % 2 or value > head_dim:
        raise ValueError(
            f"{name} must be a positive even number <= head_dim ({head_dim}), got "
            f"{value}; pick whole RoPE pairs that fit the head, e.g. "
            f"{max(2, head_dim // 2 // 2 * 2)}, or None for the default"
        )


def check_band_widths(head_dim: int, high_dim: int, low_dim: int) -> None:
    """Check resolved band widths: each even, positive and at most ``head_dim`` (§4, §8)."""
    check_band_width(high_dim, "high_dim", head_dim)
    check_band_width(low_dim, "low_dim", head_dim)


def check_threshold(threshold, name: str = "threshold") -> float:
    """Check a top-p threshold in ``(0, 1]`` (§6.3) and return it as a float.

    Plain Python arithmetic only (no tensor, no device synchronisation).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(
            f"{name} must be a float in (0, 1], got {type(threshold).__name__}; pass a "
            "Python number such as 0.95 (float(t) for a 0-d tensor)"
        )
    if not 0.0 < threshold <= 1.0:  # NaN fails too
        raise ValueError(
            f"{name} must lie in (0, 1], got {threshold}; 0.95 is the default, 1.0 keeps "
            "every tile with non-zero probability"
        )
    return float(threshold)


def check_int(value, name: str, least: int, type_hint: str, value_hint: str) -> None:
    """Check that ``value`` is an int ``>= least``; the hints end the messages (how to
    fix the call)."""
    if not _is_int(value):
        raise TypeError(
            f"{name} must be an int, got {type(value).__name__} {value!r}; {type_hint}"
        )
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}; {value_hint}")


def check_position(value, name: str) -> None:
    """Check a token position or count: an int ``>= 0``."""
    check_int(value, name, 0, "pass a whole number of tokens such as 0",
              "positions count from 0")


def _first_true(flags: torch.Tensor):
    """The index (a tuple) of the first True entry of ``flags``, or None."""
    return tuple(flags.nonzero()[0].tolist()) if bool(flags.any()) else None


def validate_compact_indices(kv_num_blocks, kv_indices, num_key_tiles) -> None:
    """Validate a compact tile mask ``(kv_num_blocks, kv_indices)`` (as from ``mask_to_indices``).

    ``kv_num_blocks`` is (..., nq) and ``kv_indices`` (..., nq, slots), both
    integer tensors on one device; each count lies in ``[0, slots]`` and the
    first ``kv_num_blocks[..., i]`` indices of row ``i`` in
    ``[0, num_key_tiles)`` (the padding after them is not read). The value
    checks read the tensors on the host.
    """
    check_position(num_key_tiles, "num_key_tiles")
    for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; pass "
                            "the output of prism.reference.mask_to_indices")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}; convert "
                            f"with {name}.to(torch.int32) or pass mask_to_indices' output")
    if kv_indices.dim() < 1 or tuple(kv_indices.shape[:-1]) != tuple(kv_num_blocks.shape):
        raise ValueError(
            f"kv_indices must have kv_num_blocks' shape plus one dim (the slots), got "
            f"kv_num_blocks {tuple(kv_num_blocks.shape)} and kv_indices "
            f"{tuple(kv_indices.shape)}; pass the pair from mask_to_indices unchanged"
        )
    if kv_indices.device != kv_num_blocks.device:
        raise ValueError(
            f"kv_indices is on {kv_indices.device} but kv_num_blocks is on "
            f"{kv_num_blocks.device}; move them to one device, e.g. "
            "kv_indices.to(kv_num_blocks.device)"
        )
    if kv_num_blocks.device.type == "meta" or kv_num_blocks.numel() == 0:
        return
    slots = kv_indices.shape[-1]
    counts = kv_num_blocks.long()
    where = _first_true((counts < 0) | (counts > slots))
    if where is not None:
        raise ValueError(
            f"kv_num_blocks must lie in [0, {slots}] (kv_indices holds {slots} slots per "
            f"row), got {int(counts[where])} at {where}; each count says how many leading "
            "entries of its kv_indices row are used: pass the pair from mask_to_indices"
        )
    used = torch.arange(slots, device=kv_indices.device) < counts.unsqueeze(-1)
    indices = kv_indices.long()
    where = _first_true(used & ((indices < 0) | (indices >= num_key_tiles)))
    if where is not None:
        raise ValueError(
            f"kv_indices must hold key tiles in [0, {num_key_tiles}) in its first "
            f"kv_num_blocks entries per row, got {int(indices[where])} at {where}; check "
            "num_key_tiles (ceil(Nk / block_size)) and that the pair comes from "
            "mask_to_indices of a mask with that many key tiles"
        )


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
    _check_qk(q, k, causal)
    if check_values:
        check_finite("q", q)
        check_finite("k", k)


def _check_qk(q, k, causal) -> None:
    """The shape and type checks of :func:`validate_qk`."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}; pass a bool, "
                        "e.g. causal=bool(flag)")
    check_tensor("q", q)
    check_tensor("k", k)
    check_same_dtype_device(q=q, k=k)
    bq, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if bq != bk:
        raise ValueError(
            f"q and k must have the same batch size, got q batch {bq} and k batch {bk}; "
            "pass the q and k of the same batch (dim 0 of the (B, H, N, D) layout), or "
            "split the call per sequence"
        )
    if d != dk:
        raise ValueError(
            f"q and k must have the same head_dim, got q head_dim {d} and k head_dim {dk}; "
            "pass q and k from the same attention layer (dim 3 of the (B, H, N, D) layout)"
        )
    check_head_dim(d)
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
        raise TypeError(f"causal must be True or False, got {causal!r}; pass a bool, "
                        "e.g. causal=bool(flag)")
    check_tensor("q", q)
    check_tensor("k", k, layout="(B, Hkv, Nk, D)")
    check_same_dtype_device(q=q, k=k)
    b, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if b != bk:
        raise ValueError(f"q and k must have the same batch size, got q batch {b} and "
                         f"k batch {bk}; pass the q and k of the same batch")
    if d != dk or d == 0:
        raise ValueError(f"q and k must have the same positive head_dim, got q head_dim {d} "
                         f"and k head_dim {dk}; pass q and k from the same attention layer")
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
    _check_qk(q, k, causal)
    if check_values:
        check_finite("q", q)
        check_finite("k", k)
    _check_v(q, k, v)
    if check_values:
        check_finite("v", v)


def _check_v(q, k, v) -> None:
    """The shape and type checks of v in :func:`validate_qkv` (after q and k passed)."""
    check_tensor("v", v, layout="(B, Hkv, Nk, Dv)")
    check_same_dtype_device(q=q, v=v)
    if v.shape[0] != k.shape[0] or v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v must match k in batch, heads and tokens: k has {tuple(k.shape)}, "
            f"v has {tuple(v.shape)}; pass the v of the same layer and cache as k, in the "
            "(B, Hkv, Nk, Dv) layout (only Dv may differ from k's head_dim)"
        )
    if v.shape[3] == 0:
        raise ValueError("v must have a head_dim of at least 1, got 0; pass the value "
                         "tensor of the layer, (B, Hkv, Nk, Dv) with Dv >= 1")


def validate_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}; "
                        "pass a Python number such as 0.125 (float(t) for a 0-d tensor), "
                        "or None for 1/sqrt(head_dim)")
    if not (scale == scale) or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}; None means 1/sqrt(head_dim)")


def validate_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(
            f"block_size must be an int, got {type(block_size).__name__} {block_size!r}; "
            "pass a whole number of tokens such as 128"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}; use e.g. 128")
    if block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be at most 2**62 (tile bounds are int64 token "
                         f"positions), got {block_size}; a tile longer than the sequence "
                         "already holds all of it")


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
