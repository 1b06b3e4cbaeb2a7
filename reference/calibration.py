"""Contract §5: per-band energy calibration of the pooled scores.

Pooling shrinks a RoPE pair by its gain (see :mod:`prism.theory`), so the high
band of pooled vectors carries far less energy than the low band, and a shared
softmax temperature would make its distribution nearly flat. Calibration
measures each band's share of the pooled energy and divides its logits by it.
"""

from __future__ import annotations

import math

import torch


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the last two dims (tiles and dims); 0 when empty."""
    count = x.shape[-2] * x.shape[-1]
    if count == 0:
        return torch.zeros(x.shape[:-2], dtype=torch.float32, device=x.device)
    return torch.sqrt((x.float() ** 2).sum(dim=(-2, -1)) / count)


def band_temperature(
    q_pooled: torch.Tensor,
    k_pooled: torch.Tensor,
    dims: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Energy-calibrated temperature ``tau_b`` per (batch, query head).

    ``tau_b = sqrt(d_b / D) * (rq_b / max(rq, eps)) * (rk_b / max(rk, eps))``,
    clamped below at ``eps``, where ``rq`` is the RMS of the pooled queries over
    all query tiles and dims, ``rq_b`` the same over the band's dims, and
    ``rk``, ``rk_b`` likewise for the pooled keys of the head's KV head.

    Parameters
    ----------
    q_pooled : Tensor (B, Hq, n_query_tiles, D), float32
    k_pooled : Tensor (B, Hkv, n_key_tiles, D), float32
    dims : Tensor (d_b,) of int64
        The band's head dims.
    eps : float

    Returns
    -------
    Tensor (B, Hq), float32
    """
    head_dim = q_pooled.shape[-1]
    group = q_pooled.shape[1] // k_pooled.shape[1]
    rq = _rms(q_pooled)
    rq_band = _rms(q_pooled[..., dims])
    # One value per KV head, shared by its query heads: a (B, Hkv) table, not K.
    rk = _rms(k_pooled).repeat_interleave(group, dim=1)
    rk_band = _rms(k_pooled[..., dims]).repeat_interleave(group, dim=1)
    tau = (
        math.sqrt(dims.numel() / head_dim)
        * (rq_band / torch.clamp(rq, min=eps))
        * (rk_band / torch.clamp(rk, min=eps))
    )
    return torch.clamp(tau, min=eps)
