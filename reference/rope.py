"""Rotary position embeddings (RoPE), to build test and tutorial inputs.

Prism itself never applies RoPE: its inputs arrive already rotated. These
helpers make such inputs for any base and either pair layout (contract §4).
"""

from __future__ import annotations

import torch

from .config import ROPE_LAYOUTS


def rope_frequencies(head_dim: int, base: float = 10000.0, *, dtype=torch.float64, device=None):
    """Angular frequency of each RoPE pair: ``w_m = base ** (-2 m / D)``.

    Parameters
    ----------
    head_dim : int
        ``D``, even.
    base : float
        RoPE base (``rope_theta``), > 1.

    Returns
    -------
    Tensor (D/2,)
        Pair 0 is the highest frequency (1 rad per token); frequencies fall
        geometrically with ``m``.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not isinstance(base, (int, float)) or isinstance(base, bool) or not base > 1:
        raise ValueError(f"base must be a number > 1 (RoPE theta, e.g. 10000), got {base!r}")
    m = torch.arange(head_dim // 2, dtype=torch.float64, device=device)
    return (float(base) ** (-2.0 * m / head_dim)).to(dtype)


def pair_dims(head_dim: int, rope_layout: str = "half") -> torch.Tensor:
    """The two head dims of every RoPE pair, shape (D/2, 2), pair 0 first.

    ``"half"``: pair m is dims (m, m + D/2); ``"interleaved"``: (2m, 2m + 1).
    """
    if rope_layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {rope_layout!r}")
    m = torch.arange(head_dim // 2)
    if rope_layout == "half":
        return torch.stack([m, m + head_dim // 2], dim=1)
    return torch.stack([2 * m, 2 * m + 1], dim=1)


def apply_rope(
    x: torch.Tensor,
    base: float = 10000.0,
    *,
    rope_layout: str = "half",
    start: int = 0,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate every pair of ``x`` by ``position * w_m``; returns a new tensor.

    Parameters
    ----------
    x : Tensor (..., N, D)
    base : float
        RoPE base.
    rope_layout : {"half", "interleaved"}
    start : int
        Position of row 0 when ``positions`` is not given.
    positions : Tensor (N,), optional
        Explicit position of each row.

    Returns
    -------
    Tensor with the shape and dtype of ``x`` (rotation computed in float64).
    """
    n, d = x.shape[-2], x.shape[-1]
    freqs = rope_frequencies(d, base, device=x.device)
    if positions is None:
        positions = torch.arange(start, start + n, device=x.device)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]  # (N, D/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    dims = pair_dims(d, rope_layout).to(x.device)
    xf = x.to(torch.float64)
    first, second = xf[..., dims[:, 0]], xf[..., dims[:, 1]]
    out = torch.empty_like(xf)
    out[..., dims[:, 0]] = first * cos - second * sin
    out[..., dims[:, 1]] = first * sin + second * cos
    return out.to(x.dtype)
