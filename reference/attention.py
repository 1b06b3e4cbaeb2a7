"""Contract §7: block-sparse attention on a tile mask, and Prism end to end."""

from __future__ import annotations

import math

import torch

from .config import PrismConfig, resolve_config
from .select import select_blocks
from .tiles import tile_layout
from .validation import (
    validate_block_mask,
    validate_block_size,
    validate_qkv,
    validate_scale,
)

# Rows of queries handled at once, so the (rows x Nk) fp32 score matrix stays
# near this many bytes per (batch, head) group whatever the sequence length.
_CHUNK_BYTES = 256 * 2**20


def token_mask(block_mask: torch.Tensor, layout, rows: torch.Tensor, causal: bool) -> torch.Tensor:
    """Expand a tile mask to the token level for some query rows.

    Query row ``r`` (absolute position ``p = query_start + r``) may read key
    ``n`` iff tile ``n // bs`` is selected for tile ``p // bs`` and, when
    causal, ``n <= p``.

    Returns
    -------
    Tensor (B', H', len(rows), Nk), bool
    """
    bs = layout.block_size
    positions = layout.query_start + rows
    row_tiles = positions // bs - layout.first_query_tile
    keys = torch.arange(layout.num_keys, device=rows.device)
    tiles = block_mask[:, :, row_tiles]
    # Each key tile covers ``bs`` consecutive keys, so the key axis is the tile
    # axis with every entry repeated; a broadcast copy is far cheaper than a
    # gather. A tile longer than the keys repeats only as often as there are keys.
    repeat = min(bs, layout.num_keys)
    allowed = tiles.unsqueeze(-1).expand(*tiles.shape, repeat).flatten(-2)[..., :layout.num_keys]
    if causal:
        allowed = allowed & (keys[None, :] <= positions[:, None])
    return allowed


def block_sparse_attention(q, k, v, block_mask, *, block_size: int = 128, causal: bool = True,
                           scale: float | None = None, return_lse: bool = False):
    """Attention restricted to the selected tiles (contract §7).

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    v : Tensor (B, Hkv, Nk, Dv)
        Un-repeated; query head ``h`` reads KV head ``h // (Hq // Hkv)``.
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
        As returned by :func:`select_blocks` with the same ``block_size`` and
        ``causal``; its batch and head dims may be 1 to broadcast.
    block_size : int
    causal : bool
        Queries are the last ``Nq`` positions and read keys ``n <= p``.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    return_lse : bool
        Also return the natural-log log-sum-exp of the scaled scores.

    Returns
    -------
    o : Tensor (B, Hq, Nq, Dv), dtype of ``q``
    lse : Tensor (B, Hq, Nq), float32, only if ``return_lse``
        Rows with no key to read give ``o = 0`` and ``lse = -inf``.

    Notes
    -----
    Scores and softmax run in fp32 with the row maximum subtracted, so the
    result is as exact as fp32 scores allow at any finite magnitude (contract
    §7). Memory is one (rows x Nk) fp32 score block per chunk of query rows,
    whatever ``block_size``. Meta tensors give shape-only results.
    """
    validate_qkv(q, k, v, causal=causal)
    validate_block_size(block_size)
    validate_scale(scale)
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    layout = tile_layout(nq, nk, block_size, causal)
    validate_block_mask(block_mask, q, (layout.num_query_tiles, layout.num_key_tiles))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    out = torch.zeros(b, hq, nq, dv, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, nq), float("-inf"), dtype=torch.float32, device=q.device)
    if nq == 0 or nk == 0 or q.device.type == "meta":
        # Meta tensors carry shapes only: return shape-only results.
        return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)

    # Grouped views: the G query heads of a KV head share one K/V without copies.
    kf = k.float().unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    vf = v.float().unsqueeze(2)
    chunk = max(1, _CHUNK_BYTES // max(1, 4 * b * hq * nk))
    for r0 in range(0, nq, chunk):
        rows = torch.arange(r0, min(nq, r0 + chunk), device=q.device)
        qf = q[:, :, rows].float().reshape(b, hkv, group, rows.numel(), d)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, Hkv, G, r, Nk)
        scores = scores.reshape(b, hq, rows.numel(), nk)
        allowed = token_mask(block_mask, layout, rows, causal)
        scores = scores.masked_fill(~allowed, float("-inf"))
        # Softmax weights relative to the row maximum: the largest weight is
        # exactly 1 and the row sum lies in [1, Nk], so normalising never
        # depends on an fp32 log-sum-exp, whose rounding at large logits
        # (|s| ~ 1e6) would make the weights sum to anything but 1.
        row_max = scores.amax(dim=-1)  # -inf where nothing is allowed
        safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(scores - safe_max[..., None])  # exp(-inf) = 0 for masked keys
        total = weights.sum(dim=-1)  # 0 exactly where nothing is allowed
        weighted = torch.matmul(weights.reshape(b, hkv, group, rows.numel(), nk), vf)
        weighted = weighted.reshape(b, hq, rows.numel(), dv)
        nonempty = total > 0
        out[:, :, rows] = torch.where(nonempty[..., None],
                                      weighted / torch.where(nonempty, total, 1.0)[..., None],
                                      torch.zeros_like(weighted))
        lse[:, :, rows] = safe_max + torch.log(total)  # log 0 = -inf for empty rows
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def prism_attention(q, k, v, config: PrismConfig | None = None, *, causal: bool = True,
                    scale: float | None = None, return_lse: bool = False,
                    return_mask: bool = False, **overrides):
    """Prism end to end: :func:`select_blocks`, then :func:`block_sparse_attention`.

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

    Examples
    --------
    >>> import torch
    >>> from prism.reference import prism_attention
    >>> q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    >>> o, mask = prism_attention(q, k, v, block_size=64, return_mask=True)
    >>> o.shape, mask.shape
    (torch.Size([1, 2, 256, 32]), torch.Size([1, 2, 4, 4]))
    """
    cfg = resolve_config(config, **overrides)
    validate_qkv(q, k, v, causal=causal)
    validate_scale(scale)
    mask = select_blocks(q, k, cfg, causal=causal)
    result = block_sparse_attention(q, k, v, mask, block_size=cfg.block_size, causal=causal,
                                    scale=scale, return_lse=return_lse)
    if not return_mask:
        return result
    return (*result, mask) if return_lse else (result, mask)
