"""The frequency response of mean pooling under RoPE.

RoPE turns pair ``m`` of a head into a complex number that turns by
``w_m = base ** (-2 m / D)`` radians per token. Averaging ``B`` consecutive
tokens of constant content therefore averages ``B`` points on a circle, and
the average is the content rotated to the tile centre and scaled by the
normalised Dirichlet kernel

    D_B(w) = sin(B w / 2) / (B sin(w / 2)).

This module evaluates that kernel carefully and tabulates where it cuts off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch

from prism.reference import rope_frequencies as _reference_rope_frequencies

#: Below this value of ``B * |r|`` (``r`` the angle reduced to ``[-pi, pi]``)
#: the kernel is evaluated by its Taylor series. The first dropped term is
#: ``(B r)**4 / 1920``, under 1e-19 here, while the direct quotient of two
#: tiny sines would underflow to 0/0 for subnormal ``r``.
_SERIES_LIMIT = 1e-4

#: Bases and sizes of the cut-off table (contract §1 and §4 use D = 128, B = 128).
DEFAULT_TABLE_BASES = (1e4, 1e5, 5e5, 1e6)
DEFAULT_TABLE_BLOCK_SIZES = (32, 64, 128, 256)
DEFAULT_TABLE_HEAD_DIMS = (64, 128)


def validate_block_size(block_size) -> int:
    """Return ``block_size`` as an int after checking it is a whole number >= 1."""
    if isinstance(block_size, bool) or not isinstance(block_size, Integral):
        raise TypeError(
            f"block_size must be an int (tokens per tile), got {type(block_size).__name__} "
            f"{block_size!r}; pass e.g. 128"
        )
    if block_size < 1:
        raise ValueError(
            f"block_size must be >= 1, got {block_size}; pass a tile size such as 64 or 128"
        )
    return int(block_size)


def validate_base(base) -> float:
    """Return ``base`` as a float after checking it is a finite number > 1."""
    if isinstance(base, bool) or not isinstance(base, Real):
        raise TypeError(
            f"base must be a real number (RoPE theta), got {type(base).__name__} {base!r}; "
            "pass e.g. 10000.0"
        )
    if not (math.isfinite(base) and base > 1):
        raise ValueError(
            f"base must be a finite number > 1 (RoPE theta), got {base!r}; e.g. 10000 or 5e5"
        )
    return float(base)


def validate_head_dim(head_dim) -> int:
    """Return ``head_dim`` as an int after checking it is a positive even number."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, Integral):
        raise TypeError(
            f"head_dim must be an int, got {type(head_dim).__name__} {head_dim!r}; pass e.g. 128"
        )
    if head_dim < 2 or head_dim % 2:
        raise ValueError(
            f"head_dim must be a positive even number (RoPE rotates pairs of dims), got "
            f"{head_dim}; pass e.g. 64 or 128"
        )
    return int(head_dim)


def rope_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Angular frequency of every RoPE pair, ``w_m = base ** (-2 m / D)``.

    Parameters
    ----------
    head_dim : int
        ``D``, positive and even.
    base : float
        RoPE base (``rope_theta``), finite and > 1.

    Returns
    -------
    Tensor (D/2,), float64
        Pair 0 turns by 1 radian per token; the frequencies fall geometrically
        with ``m``, so small ``m`` means high frequency (contract §4).

    Examples
    --------
    >>> rope_frequencies(4, 100.0).tolist()
    [1.0, 0.1]
    """
    head_dim = validate_head_dim(head_dim)
    base = validate_base(base)
    return _reference_rope_frequencies(head_dim, base, dtype=torch.float64)


def _dirichlet_float64(omega: torch.Tensor, block_size: int) -> torch.Tensor:
    """Normalised Dirichlet kernel of a float64 tensor (no validation)."""
    # Write w/2 = k*pi + y with |y| <= pi/2. For integer B,
    # sin(B w/2) = (-1)^(B k) sin(B y) and sin(w/2) = (-1)^k sin(y), so the kernel
    # is (-1)^((B-1) k) sin(B y) / (B sin y). The quotient then only meets 0/0 at
    # y = 0, which the series handles, and the limit at w = 2 pi k comes out as
    # the exact sign (+1 or -1) instead of a rounding-noise ratio.
    half = omega / 2.0
    turns = torch.round(half / math.pi)
    reduced = half - turns * math.pi
    sign = 1.0 - 2.0 * torch.remainder(turns * (block_size - 1), 2.0)
    bx = block_size * reduced
    small = bx.abs() < _SERIES_LIMIT
    # The quotient is computed everywhere and then discarded where it is 0/0;
    # the safe denominator keeps that branch free of NaN for autograd and warnings.
    safe_reduced = torch.where(small, torch.ones_like(reduced), reduced)
    quotient = torch.sin(block_size * safe_reduced) / (block_size * torch.sin(safe_reduced))
    series = 1.0 - (block_size**2 - 1) * reduced**2 / 6.0
    return sign * torch.where(small, series, quotient)


def pooling_gain(omega, block_size: int):
    """Signed gain of mean pooling on a RoPE pair: ``sin(B w/2) / (B sin(w/2))``.

    The normalised Dirichlet kernel: averaging ``B`` consecutive tokens whose
    content is constant multiplies a pair of frequency ``w`` by this factor
    (and moves it to the tile centre; see
    :func:`prism.theory.pooling_identity_residuals`). It equals 1 at
    ``w = 0``, is continuous everywhere, has zeros at ``w = 2 pi k / B``
    (``k = 1 .. B-1``), and at ``w = 2 pi k`` takes its limit ``(-1)^(k (B-1))``.

    Parameters
    ----------
    omega : float, numpy.ndarray or torch.Tensor (any shape)
        Angular frequencies in radians per token; finite real values.
    block_size : int
        ``B``, tokens per tile, >= 1.

    Returns
    -------
    float, numpy.ndarray or torch.Tensor
        Same kind and shape as ``omega``. Arrays come back as float64; tensors
        keep their floating dtype and device (integer tensors give float64).
        The value is computed in float64 in every case.

    Raises
    ------
    TypeError
        If ``omega`` is not a real number, array or tensor, or ``block_size``
        is not an int.
    ValueError
        If ``omega`` holds NaN or Inf, or ``block_size < 1``.

    Examples
    --------
    >>> pooling_gain(0.0, 128)
    1.0
    >>> round(pooling_gain(2 * math.pi / 128, 128), 12)
    0.0
    >>> pooling_gain(np.array([0.0, 2 * math.pi]), 4).tolist()
    [1.0, -1.0]
    """
    block_size = validate_block_size(block_size)
    if isinstance(omega, torch.Tensor):
        if omega.is_complex() or omega.dtype == torch.bool:
            raise TypeError(
                f"omega must hold real frequencies, got a tensor of dtype {omega.dtype}; "
                "pass a float tensor of radians per token"
            )
        _check_finite_frequencies(torch.isfinite(omega).all().item(), omega.shape)
        out_dtype = omega.dtype if omega.is_floating_point() else torch.float64
        return _dirichlet_float64(omega.to(torch.float64), block_size).to(out_dtype)
    if isinstance(omega, np.ndarray):
        if omega.dtype.kind not in "fiu":
            raise TypeError(
                f"omega must hold real frequencies, got an array of dtype {omega.dtype}; "
                "pass a float array of radians per token"
            )
        values = torch.from_numpy(np.ascontiguousarray(omega, dtype=np.float64))
        _check_finite_frequencies(torch.isfinite(values).all().item(), omega.shape)
        return _dirichlet_float64(values, block_size).numpy()
    if isinstance(omega, Real) and not isinstance(omega, bool):
        _check_finite_frequencies(math.isfinite(omega), ())
        value = torch.tensor(float(omega), dtype=torch.float64)
        return float(_dirichlet_float64(value, block_size))
    raise TypeError(
        f"omega must be a float, a numpy array or a torch tensor, got "
        f"{type(omega).__name__}; pass e.g. prism.theory.rope_frequencies(128, 5e5)"
    )


def _check_finite_frequencies(all_finite: bool, shape) -> None:
    if not all_finite:
        raise ValueError(
            f"omega (shape {tuple(shape)}) contains NaN or Inf; the pooling gain is defined "
            "for finite frequencies only"
        )


def cutoff_frequency(block_size: int) -> float:
    """First zero of the pooling gain, ``2 pi / B``, in radians per token.

    Pairs that turn faster than this by the end of a tile have gone round the
    circle at least once, so their tile mean is at most a side lobe
    (``|gain| <~ 0.22`` for large ``B``).

    Parameters
    ----------
    block_size : int
        ``B``, >= 1.

    Returns
    -------
    float
    """
    return 2.0 * math.pi / validate_block_size(block_size)


@dataclass(frozen=True)
class CutoffRow:
    """One line of :func:`cutoff_table`.

    Attributes
    ----------
    base : float
        RoPE base.
    block_size : int
        Tile size ``B``.
    head_dim : int
        ``D``; the head has ``D/2`` pairs.
    cutoff : float
        ``2 pi / B`` in radians per token.
    pairs_above_cutoff : int
        Pairs with ``w_m >= 2 pi / B`` (all of them at the start of the pair list).
    pairs_below_half : int
        Pairs whose ``|gain| < 0.5``.
    pairs_below_tenth : int
        Pairs whose ``|gain| < 0.1``.
    """

    base: float
    block_size: int
    head_dim: int
    cutoff: float
    pairs_above_cutoff: int
    pairs_below_half: int
    pairs_below_tenth: int

    @property
    def num_pairs(self) -> int:
        """``D/2``."""
        return self.head_dim // 2


def cutoff_table(
    bases=DEFAULT_TABLE_BASES,
    block_sizes=DEFAULT_TABLE_BLOCK_SIZES,
    head_dims=DEFAULT_TABLE_HEAD_DIMS,
) -> list[CutoffRow]:
    """Count the pairs that mean pooling suppresses, for every base, tile and head size.

    Parameters
    ----------
    bases : sequence of float
        RoPE bases (default 1e4, 1e5, 5e5, 1e6).
    block_sizes : sequence of int
        Tile sizes (default 32, 64, 128, 256).
    head_dims : sequence of int
        Head dims (default 64, 128).

    Returns
    -------
    list of CutoffRow
        ``len(head_dims) * len(bases) * len(block_sizes)`` rows, head dim
        slowest, tile size fastest.
    """
    rows = []
    for head_dim in head_dims:
        for base in bases:
            freqs = rope_frequencies(head_dim, base)
            for block_size in block_sizes:
                gains = pooling_gain(freqs, block_size).abs()
                cutoff = cutoff_frequency(block_size)
                rows.append(CutoffRow(
                    base=float(base),
                    block_size=int(block_size),
                    head_dim=int(head_dim),
                    cutoff=cutoff,
                    pairs_above_cutoff=int((freqs >= cutoff).sum()),
                    pairs_below_half=int((gains < 0.5).sum()),
                    pairs_below_tenth=int((gains < 0.1).sum()),
                ))
    return rows


def format_cutoff_table(rows: list[CutoffRow]) -> str:
    """Render :func:`cutoff_table` rows as a fixed-width text table.

    Parameters
    ----------
    rows : list of CutoffRow

    Returns
    -------
    str
        One header line and one line per row, no trailing newline.
    """
    header = (
        f"{'D':>4} {'base':>8} {'B':>4} {'2pi/B':>8} {'pairs':>5} "
        f"{'w>=2pi/B':>9} {'|g|<0.5':>8} {'|g|<0.1':>8}"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"{row.head_dim:>4} {row.base:>8.0e} {row.block_size:>4} {row.cutoff:>8.5f} "
            f"{row.num_pairs:>5} {row.pairs_above_cutoff:>9} {row.pairs_below_half:>8} "
            f"{row.pairs_below_tenth:>8}"
        )
    return "\n".join(lines)
