"""Contract §4: which head dims make up the high- and low-frequency bands."""

from __future__ import annotations

from .rope import pair_dims
from .validation import check_band_widths, check_head_dim


def _round_even(x: float) -> int:
    """Nearest even integer, halves rounded up (so 15 -> 16, 14.5 -> 14)."""
    return 2 * int(x / 2 + 0.5)


def band_sizes(head_dim: int, high_dim: int | None = None, low_dim: int | None = None):
    """Resolve the band widths ``(h, l)`` in head dims for head dim ``D``.

    Defaults: ``h = D/2`` and ``l = 3D/4``, each rounded to an even number
    (64 and 96 for ``D = 128``). Both must be even, positive and at most ``D``,
    and ``D`` must be a positive even int (contract §2, §4).

    Raises
    ------
    ValueError, TypeError
        For an odd or non-positive ``head_dim`` or a width breaking the rule above.

    >>> band_sizes(128)
    (64, 96)
    """
    check_head_dim(head_dim)
    h = high_dim if high_dim is not None else max(2, _round_even(head_dim / 2))
    l = low_dim if low_dim is not None else max(2, _round_even(3 * head_dim / 4))
    check_band_widths(head_dim, h, l)
    return h, l


def band_dims(
    head_dim: int,
    high_dim: int | None = None,
    low_dim: int | None = None,
    rope_layout: str = "half",
    device=None,
):
    """Head-dim indices of both bands, each in ascending order.

    The high band holds pairs ``0 .. h/2 - 1`` (fastest rotations); the low
    band holds pairs ``D/2 - l/2 .. D/2 - 1`` (slowest). With the defaults the
    two bands overlap.

    Returns
    -------
    (Tensor (h,), Tensor (l,)) of int64 dims.

    >>> high, low = band_dims(8, 4, 4, "half")
    >>> high.tolist(), low.tolist()
    ([0, 1, 4, 5], [2, 3, 6, 7])
    >>> high, low = band_dims(8, 4, 4, "interleaved")
    >>> high.tolist(), low.tolist()
    ([0, 1, 2, 3], [4, 5, 6, 7])
    """
    h, l = band_sizes(head_dim, high_dim, low_dim)
    pairs = pair_dims(head_dim, rope_layout)
    n_pairs = head_dim // 2
    high = pairs[: h // 2].flatten().sort().values
    low = pairs[n_pairs - l // 2 :].flatten().sort().values
    return high.to(device), low.to(device)
