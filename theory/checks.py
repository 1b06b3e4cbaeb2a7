"""Numerical checks of the pooling filter, each returning what it measured.

Write pair ``m`` of a RoPE'd vector at position ``p`` as the complex number
``x_m exp(i p w_m)``. The three results checked here are:

(a) the pooling identity: the mean over ``B`` consecutive positions from
    ``s`` is ``D_B(w_m) x_m exp(i c w_m)`` with ``c = s + (B - 1)/2``;
(b) the score filter: with content constant inside two tiles, the pooled
    score is ``sum_m D_B(w_m)^2 Re(a_m conj(b_m) exp(i (c_q - c_k) w_m))``;
(c) the band energy: the pooled energy of a band is the band's mean squared
    gain times the token energy, which is what contract §5's calibration divides out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import torch

from prism.reference import apply_rope, band_sizes, band_temperature, pair_dims, pool_tiles
from prism.reference.config import ROPE_LAYOUTS

from .frequency import (
    pooling_gain,
    rope_frequencies,
    validate_base,
    validate_block_size,
    validate_head_dim,
)


def _validate_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(
            f"{name} must be an int (a token position), got {type(value).__name__} {value!r}"
        )
    return int(value)


def validate_layout(rope_layout) -> str:
    """Return ``rope_layout`` after checking it names a contract §4 layout."""
    if rope_layout not in ROPE_LAYOUTS:
        raise ValueError(
            f"rope_layout must be one of {ROPE_LAYOUTS}, got {rope_layout!r}; Hugging Face "
            "Llama-style models use 'half', GPT-J style models use 'interleaved'"
        )
    return rope_layout


def _content_vector(name: str, content, head_dim: int, generator: torch.Generator):
    """Return ``content`` as a float64 (D,) tensor, or a standard normal draw when None."""
    if content is None:
        return torch.randn(head_dim, dtype=torch.float64, generator=generator)
    if not isinstance(content, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({head_dim},) or None, "
                        f"got {type(content).__name__}")
    if content.shape != (head_dim,):
        raise ValueError(f"{name} must have shape ({head_dim},) to match head_dim, got "
                         f"{tuple(content.shape)}")
    if not content.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got dtype {content.dtype}")
    if not bool(torch.isfinite(content).all()):
        raise ValueError(f"{name} contains NaN or Inf; pass finite values")
    return content.detach().to(torch.float64).cpu()


def _as_pairs(x: torch.Tensor, rope_layout: str) -> torch.Tensor:
    """View the last dim (D,) as D/2 complex numbers, pair 0 first."""
    dims = pair_dims(x.shape[-1], rope_layout)
    return torch.complex(x[..., dims[:, 0]], x[..., dims[:, 1]])


def pooling_identity_residuals(
    head_dim: int,
    base: float,
    block_size: int,
    start: int = 0,
    *,
    rope_layout: str = "half",
    content: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Check (a): the tile mean of rotated copies is the gain times the centre rotation.

    Builds ``B`` copies of one content vector, rotates them with
    :func:`prism.reference.apply_rope` at positions ``start .. start+B-1``,
    averages them, and compares each pair with
    ``pooling_gain(w_m, B) * x_m * exp(i (start + (B-1)/2) w_m)``.

    Parameters
    ----------
    head_dim : int
        ``D``, positive and even.
    base : float
        RoPE base, > 1.
    block_size : int
        ``B``, tokens in the tile, >= 1.
    start : int
        Position of the first token of the tile (any integer).
    rope_layout : {"half", "interleaved"}
        Which dims form a pair (contract §4).
    content : Tensor (D,), optional
        The un-rotated vector; a standard normal draw from ``seed`` when None.
    seed : int
        Seed of that draw.

    Returns
    -------
    Tensor (D/2,), float64
        Per pair, ``|mean - prediction| / |x_m|`` (the absolute error where
        ``x_m = 0``). Everything is float64, so the residual sits at rounding
        level; the rounding of the angle ``p w_m`` itself grows with the
        position, about ``(start + B) * 2**-53`` for pair 0.
    """
    head_dim = validate_head_dim(head_dim)
    base = validate_base(base)
    block_size = validate_block_size(block_size)
    start = _validate_int("start", start)
    rope_layout = validate_layout(rope_layout)
    generator = torch.Generator().manual_seed(_validate_int("seed", seed))
    x = _content_vector("content", content, head_dim, generator)

    tokens = apply_rope(x.expand(block_size, head_dim), base, rope_layout=rope_layout,
                        start=start)
    pooled = _as_pairs(tokens.mean(dim=0), rope_layout)

    freqs = rope_frequencies(head_dim, base)
    centre = start + (block_size - 1) / 2.0
    prediction = pooling_gain(freqs, block_size) * _as_pairs(x, rope_layout) * torch.polar(
        torch.ones_like(freqs), centre * freqs
    )
    scale = _as_pairs(x, rope_layout).abs()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (pooled - prediction).abs() / scale


@dataclass(frozen=True)
class ScoreFilterCheck:
    """Result of :func:`score_filter_residual`.

    Attributes
    ----------
    pooled_score : float
        ``qbar . kbar`` of the two pooled tiles.
    predicted_score : float
        ``sum_m gain_m^2 * pair_scores[m]``.
    pair_scores : Tensor (D/2,), float64
        Each pair's relative-position score: the token score of a query at the
        query tile's centre with a key at the key tile's centre.
    gains : Tensor (D/2,), float64
        ``pooling_gain(w_m, B)``.
    residual : float
        ``|pooled_score - predicted_score| / sum_m |a_m| |b_m|``, the error
        relative to the largest value the score could take.
    """

    pooled_score: float
    predicted_score: float
    pair_scores: torch.Tensor
    gains: torch.Tensor
    residual: float


def score_filter_residual(
    head_dim: int,
    base: float,
    block_size: int,
    query_start: int,
    key_start: int,
    *,
    rope_layout: str = "half",
    query_content: torch.Tensor | None = None,
    key_content: torch.Tensor | None = None,
    seed: int = 0,
) -> ScoreFilterCheck:
    """Check (b): pooling filters the score pair by pair with the squared gain.

    A query tile of ``B`` tokens from ``query_start`` holds the content ``a``
    on every token and a key tile from ``key_start`` holds ``b``, both rotated
    by :func:`prism.reference.apply_rope`. The pooled score ``qbar . kbar``
    should equal ``sum_m gain_m^2 Re(a_m conj(b_m) exp(i (c_q - c_k) w_m))``,
    the full-resolution score between the two tile centres with pair ``m``
    weighted by ``gain_m^2``.

    Parameters
    ----------
    head_dim : int
        ``D``, positive and even.
    base : float
        RoPE base, > 1.
    block_size : int
        ``B``, >= 1.
    query_start, key_start : int
        First position of each tile (any integers; the tiles may overlap).
    rope_layout : {"half", "interleaved"}
    query_content, key_content : Tensor (D,), optional
        Un-rotated contents ``a`` and ``b``; standard normal draws from
        ``seed`` when None.
    seed : int

    Returns
    -------
    ScoreFilterCheck
    """
    head_dim = validate_head_dim(head_dim)
    base = validate_base(base)
    block_size = validate_block_size(block_size)
    query_start = _validate_int("query_start", query_start)
    key_start = _validate_int("key_start", key_start)
    rope_layout = validate_layout(rope_layout)
    generator = torch.Generator().manual_seed(_validate_int("seed", seed))
    a = _content_vector("query_content", query_content, head_dim, generator)
    b = _content_vector("key_content", key_content, head_dim, generator)

    q_tile = apply_rope(a.expand(block_size, head_dim), base, rope_layout=rope_layout,
                        start=query_start)
    k_tile = apply_rope(b.expand(block_size, head_dim), base, rope_layout=rope_layout,
                        start=key_start)
    pooled_score = float(q_tile.mean(dim=0) @ k_tile.mean(dim=0))

    freqs = rope_frequencies(head_dim, base)
    # Equal tile sizes: the centre offset is the start offset.
    offset = query_start - key_start
    a_pairs, b_pairs = _as_pairs(a, rope_layout), _as_pairs(b, rope_layout)
    pair_scores = (a_pairs * b_pairs.conj() * torch.polar(torch.ones_like(freqs),
                                                          offset * freqs)).real
    gains = pooling_gain(freqs, block_size)
    predicted = float((gains**2 * pair_scores).sum())
    bound = float((a_pairs.abs() * b_pairs.abs()).sum())
    residual = abs(pooled_score - predicted) / bound if bound > 0 else abs(pooled_score)
    return ScoreFilterCheck(pooled_score=pooled_score, predicted_score=predicted,
                            pair_scores=pair_scores, gains=gains, residual=residual)


@dataclass(frozen=True)
class BandEnergy:
    """One band's line of :func:`band_energy_check`.

    Attributes
    ----------
    band : str
        ``"high"`` or ``"low"``.
    first_pair, last_pair : int
        The band holds pairs ``first_pair .. last_pair`` (inclusive).
    mean_gain_sq : float
        Predicted pooled / token energy ratio: the band's mean ``gain_m^2``.
    measured_ratio : float
        Mean pooled band energy per tile over mean token band energy per token.
    ratio_stderr : float
        Standard error of ``measured_ratio`` for this content model.
    predicted_tau : float
        contract §5 temperature predicted from the gains alone:
        ``sqrt(d_b / D) * G_b / G``, ``G_b`` and ``G`` the mean ``gain^2`` over
        the band and over all pairs.
    measured_tau : float
        :func:`prism.reference.band_temperature` on the pooled tiles.
    tau_log_stderr : float
        Standard error of ``log(measured_tau)``.
    """

    band: str
    first_pair: int
    last_pair: int
    mean_gain_sq: float
    measured_ratio: float
    ratio_stderr: float
    predicted_tau: float
    measured_tau: float
    tau_log_stderr: float

    @property
    def ratio_z(self) -> float:
        """``(measured_ratio - mean_gain_sq) / ratio_stderr``."""
        return (self.measured_ratio - self.mean_gain_sq) / self.ratio_stderr

    @property
    def tau_z(self) -> float:
        """``log(measured_tau / predicted_tau) / tau_log_stderr``."""
        return math.log(self.measured_tau / self.predicted_tau) / self.tau_log_stderr

    @property
    def logit_gain(self) -> float:
        """Factor by which calibration multiplies this band's logits (``1 / tau``)."""
        return 1.0 / self.measured_tau


def _log_ratio_variance(numerator: torch.Tensor, denominator: torch.Tensor,
                        num_tiles: int) -> float:
    """Variance of ``log(U / V)`` for ``U = sum_im numerator_m e_im``, ``V`` likewise.

    ``e_im = |x_im|^2`` is the energy of pair ``m`` in tile ``i``; for standard
    normal content it is chi-square with 2 degrees of freedom, whose variance
    equals its squared mean, so the delta method leaves only the weights.
    """
    spread = numerator / numerator.sum() - denominator / denominator.sum()
    return float((spread**2).sum()) / num_tiles


def band_energy_check(
    head_dim: int = 128,
    base: float = 5e5,
    block_size: int = 128,
    num_tiles: int = 64,
    *,
    high_dim: int | None = None,
    low_dim: int | None = None,
    rope_layout: str = "half",
    seed: int = 0,
) -> tuple[BandEnergy, BandEnergy]:
    """Check (c): pooled band energy = mean squared gain x token band energy.

    Content model: every tile holds its own standard normal vector, the same on
    all of its ``B`` tokens, for queries and keys independently, rotated by
    :func:`prism.reference.apply_rope` at positions ``0 .. num_tiles*B - 1``
    and pooled by :func:`prism.reference.pool_tiles`. RoPE keeps every pair's
    norm, so a token's band energy is the content's, and by check (b) the
    pooled energy of pair ``m`` is exactly ``gain_m^2`` times it; the band
    ratio differs from the band's mean ``gain^2`` only because the pairs'
    energies differ at random. (White noise that changes every token would
    instead pool to ``1/B`` of its energy in every pair alike: the filter acts
    on content that stays put across a tile.)

    The same pooled tiles are passed to
    :func:`prism.reference.band_temperature`, which shows what contract §5's
    calibration rescales: its ``tau_b`` estimates
    ``sqrt(d_b / D) * G_b / G``, the band's energy loss relative to the whole
    head, and dividing the band logits by it gives every band the loudness of
    the whole head's pooled logits.

    Parameters
    ----------
    head_dim : int
        ``D`` (default 128).
    base : float
        RoPE base (default 5e5).
    block_size : int
        ``B`` (default 128).
    num_tiles : int
        Tiles of queries and of keys; the statistical error falls like
        ``1 / sqrt(num_tiles)``.
    high_dim, low_dim : int, optional
        Band widths in dims; contract §4 defaults when None (64 and 96 for D = 128,
        i.e. pairs 0..31 and 16..63).
    rope_layout : {"half", "interleaved"}
    seed : int

    Returns
    -------
    (BandEnergy, BandEnergy)
        The high band, then the low band. Their ``ratio_z`` and ``tau_z`` are
        standard normal up to the delta-method approximation: ``|z| < 4`` is
        the stated tolerance.
    """
    head_dim = validate_head_dim(head_dim)
    base = validate_base(base)
    block_size = validate_block_size(block_size)
    num_tiles = _validate_int("num_tiles", num_tiles)
    if num_tiles < 2:
        raise ValueError(f"num_tiles must be >= 2 for a statistical error, got {num_tiles}")
    rope_layout = validate_layout(rope_layout)
    high, low = band_sizes(head_dim, high_dim, low_dim)
    generator = torch.Generator().manual_seed(_validate_int("seed", seed))

    num_tokens = num_tiles * block_size
    pooled = {}
    for side in ("q", "k"):
        content = torch.randn(num_tiles, 1, head_dim, dtype=torch.float64, generator=generator)
        tokens = content.expand(num_tiles, block_size, head_dim).reshape(num_tokens, head_dim)
        tokens = apply_rope(tokens, base, rope_layout=rope_layout)
        pooled[side] = (tokens, pool_tiles(tokens[None, None], 0, block_size)[0, 0].double())

    gains_sq = pooling_gain(rope_frequencies(head_dim, base), block_size) ** 2
    n_pairs = head_dim // 2
    dims = pair_dims(head_dim, rope_layout)
    results = []
    for band, first, last in (("high", 0, high // 2 - 1), ("low", n_pairs - low // 2, n_pairs - 1)):
        in_band = torch.zeros(n_pairs, dtype=torch.float64)
        in_band[first:last + 1] = 1.0
        band_dims = dims[first:last + 1].flatten().sort().values
        tokens, tiles = pooled["q"]
        token_energy = (tokens[:, band_dims] ** 2).sum(dim=1).mean()
        tile_energy = (tiles[:, band_dims] ** 2).sum(dim=1).mean()
        mean_gain_sq = float(gains_sq[first:last + 1].mean())
        ratio_var = _log_ratio_variance(gains_sq * in_band, in_band, num_tiles)

        band_share = float(gains_sq[first:last + 1].mean() / gains_sq.mean())
        predicted_tau = math.sqrt(band_dims.numel() / head_dim) * band_share
        measured_tau = float(band_temperature(pooled["q"][1][None, None],
                                              pooled["k"][1][None, None], band_dims)[0, 0])
        # log tau is half the log energy-share of q plus half that of k,
        # two independent draws of the same law.
        tau_var = 0.5 * _log_ratio_variance(gains_sq * in_band, gains_sq, num_tiles)
        results.append(BandEnergy(
            band=band, first_pair=first, last_pair=last, mean_gain_sq=mean_gain_sq,
            measured_ratio=float(tile_energy / token_energy),
            ratio_stderr=mean_gain_sq * math.sqrt(ratio_var),
            predicted_tau=predicted_tau, measured_tau=measured_tau,
            tau_log_stderr=math.sqrt(tau_var),
        ))
    return results[0], results[1]
