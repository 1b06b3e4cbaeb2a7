"""A synthetic positional head: a slash, sink and vertical tiles, and content, on chosen RoPE pairs.

The head has three kinds of structure, each on its own RoPE pairs:

* a slash: every query attends sharply to the key ``slash_offset`` tokens
  back. It lives on the fastest pairs (``0 .. slash_pairs-1``), because a
  sharp peak in the relative position needs high frequencies;
* sink and vertical tiles: whole spans of keys that every query likes, on the
  slowest pairs, where RoPE barely turns over the sequence;
* slowly varying content on the pairs just faster than those, which gives the
  other tiles realistic, non-uniform pooled scores;

plus a little white noise on every dim. :mod:`prism.theory.blind_spot` uses it
to show what mean pooling loses and Prism keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prism.reference import apply_rope, pair_dims

from ._args import check_int, check_real
from .checks import validate_layout
from .frequency import rope_frequencies, validate_base


@dataclass(frozen=True)
class SyntheticHead:
    """A RoPE'd query/key pair built by :func:`synthetic_positional_head`.

    Attributes
    ----------
    q, k : Tensor (1, 1, N, D), float32
        Queries and keys after RoPE; query ``p`` and key ``p`` sit at position ``p``.
    base : float
    rope_layout : str
    slash_offset : int
        The slash joins query ``p`` to key ``p - slash_offset``.
    slash_pairs : range
        Pairs that carry the slash (the fastest).
    content_pairs : range
        Pairs that carry the slowly varying content.
    vertical_pairs : range
        Pairs that carry the sink and vertical tiles (the slowest).
    vertical_spans : tuple of (int, int)
        Key positions ``[start, stop)`` that every query attends to; the first
        is the sink.
    """

    q: torch.Tensor
    k: torch.Tensor
    base: float
    rope_layout: str
    slash_offset: int
    slash_pairs: range
    content_pairs: range
    vertical_pairs: range
    vertical_spans: tuple

    @property
    def num_tokens(self) -> int:
        """``N``."""
        return self.q.shape[2]


def _smooth_field(num_tokens: int, width: int, length: int, generator) -> torch.Tensor:
    """White noise averaged over a sliding window of ``length`` tokens, unit variance."""
    white = torch.randn(num_tokens + length, width, dtype=torch.float64, generator=generator)
    running = torch.cat([torch.zeros(1, width, dtype=torch.float64), white.cumsum(dim=0)])
    return (running[length:length + num_tokens] - running[:num_tokens]) / math.sqrt(length)


def _set_pairs(x: torch.Tensor, dims: torch.Tensor, pairs: range, values: torch.Tensor) -> None:
    """Write complex ``values`` (..., len(pairs)) into the real dims of ``pairs``."""
    index = torch.tensor(list(pairs), dtype=torch.long)
    x[..., dims[index, 0]] = values.real
    x[..., dims[index, 1]] = values.imag


def synthetic_positional_head(
    base: float = 5e5,
    *,
    num_tokens: int = 2048,
    head_dim: int = 128,
    rope_layout: str = "half",
    slash_offset: int = 384,
    slash_pairs: int = 24,
    slash_logit: float = 12.0,
    vertical_spans=((0, 128), (640, 768), (1280, 1408)),
    vertical_pairs: int = 16,
    vertical_logit: float = 6.0,
    content_pairs: int = 24,
    content_logit: float = 1.0,
    content_length: int = 96,
    noise: float = 0.3,
    seed: int = 0,
) -> SyntheticHead:
    """Build the blind-spot demo head: a fast-pair slash beside slow-pair verticals.

    Written as complex pairs before RoPE (pair ``m`` turns by ``w_m`` per token):

    * slash, pairs ``0 .. slash_pairs-1``: query ``A e^{i phi_m}``, key
      ``A e^{i (phi_m + slash_offset w_m)}``, the same on every token, with
      random phases ``phi_m``. After RoPE the score of query ``p`` with key
      ``n`` is ``A^2 sum_m cos((p - n - slash_offset) w_m)``: all cosines
      agree only at ``p - n = slash_offset``. ``A`` makes that peak equal
      ``slash_logit`` after the ``1/sqrt(D)`` scale;
    * sink and verticals, the last ``vertical_pairs`` pairs: every query holds
      ``V e^{i psi_m}``; keys inside ``vertical_spans`` hold the same, other
      keys nothing. Their score is about ``vertical_logit`` for every key of a
      span (these pairs turn little over ``N`` tokens);
    * content, the ``content_pairs`` pairs below those: independent smooth
      random fields for queries and keys (white noise averaged over
      ``content_length`` tokens), scaled so that their token score has standard
      deviation ``content_logit``;
    * white noise of standard deviation ``noise`` on every dim of q and k.

    Parameters
    ----------
    base : float
        RoPE base, > 1.
    num_tokens : int
        ``N``, the sequence length (queries and keys alike, causal).
    head_dim : int
        ``D``, even.
    rope_layout : {"half", "interleaved"}
    slash_offset : int
        Relative position of the slash, >= 1.
    slash_pairs, vertical_pairs, content_pairs : int
        Number of pairs given to each structure; together at most ``D/2``.
    slash_logit, vertical_logit, content_logit : float
        Logit scales described above, >= 0.
    vertical_spans : sequence of (start, stop)
        Key positions of the sink and vertical spans, within ``[0, N)``.
    content_length : int
        Smoothing window of the content, in tokens.
    noise : float
        Standard deviation of the white noise, >= 0.
    seed : int
        Seeds the phases, content and noise.

    Returns
    -------
    SyntheticHead
        ``q`` and ``k`` of shape (1, 1, N, D), float32, after
        :func:`prism.reference.apply_rope`.
    """
    base = validate_base(base)
    num_tokens = check_int("num_tokens", num_tokens, 1)
    head_dim = check_int("head_dim", head_dim, 2)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE pairs), got {head_dim}")
    rope_layout = validate_layout(rope_layout)
    slash_offset = check_int("slash_offset", slash_offset, 1)
    n_pairs = head_dim // 2
    slash_pairs = check_int("slash_pairs", slash_pairs, 1)
    vertical_pairs = check_int("vertical_pairs", vertical_pairs, 1)
    content_pairs = check_int("content_pairs", content_pairs, 0)
    if slash_pairs + content_pairs + vertical_pairs > n_pairs:
        raise ValueError(
            f"slash_pairs + content_pairs + vertical_pairs must be <= D/2 = {n_pairs}, got "
            f"{slash_pairs} + {content_pairs} + {vertical_pairs}; give each structure fewer pairs"
        )
    slash_logit = check_real("slash_logit", slash_logit)
    vertical_logit = check_real("vertical_logit", vertical_logit)
    content_logit = check_real("content_logit", content_logit)
    content_length = check_int("content_length", content_length, 1)
    noise = check_real("noise", noise)
    spans = tuple((int(a), int(b)) for a, b in vertical_spans)
    for start, stop in spans:
        if not 0 <= start < stop <= num_tokens:
            raise ValueError(
                f"vertical_spans must hold (start, stop) with 0 <= start < stop <= num_tokens "
                f"= {num_tokens}, got ({start}, {stop})"
            )
    generator = torch.Generator().manual_seed(check_int("seed", seed, 0))

    slash_range = range(0, slash_pairs)
    vertical_range = range(n_pairs - vertical_pairs, n_pairs)
    content_range = range(vertical_range.start - content_pairs, vertical_range.start)
    dims = pair_dims(head_dim, rope_layout)
    freqs = rope_frequencies(head_dim, base)
    q = torch.zeros(num_tokens, head_dim, dtype=torch.float64)
    k = torch.zeros(num_tokens, head_dim, dtype=torch.float64)
    root_d = math.sqrt(head_dim)

    phases = 2 * math.pi * torch.rand(slash_pairs, dtype=torch.float64, generator=generator)
    amplitude = math.sqrt(slash_logit * root_d / slash_pairs)
    slash_freqs = freqs[:slash_pairs]
    _set_pairs(q, dims, slash_range, amplitude * torch.polar(torch.ones_like(phases), phases))
    # Advancing the key's phase by offset * w_m is what moves the peak to that offset.
    _set_pairs(k, dims, slash_range, amplitude * torch.polar(
        torch.ones_like(phases), phases + slash_offset * slash_freqs))

    vertical_phases = 2 * math.pi * torch.rand(vertical_pairs, dtype=torch.float64,
                                               generator=generator)
    vertical = math.sqrt(vertical_logit * root_d / vertical_pairs) * torch.polar(
        torch.ones_like(vertical_phases), vertical_phases)
    _set_pairs(q, dims, vertical_range, vertical)
    in_span = torch.zeros(num_tokens, dtype=torch.bool)
    for start, stop in spans:
        in_span[start:stop] = True
    vertical_keys = torch.zeros(num_tokens, vertical_pairs, dtype=torch.complex128)
    vertical_keys[in_span] = vertical
    _set_pairs(k, dims, vertical_range, vertical_keys)

    if content_pairs:
        # q.k over 2 * content_pairs unit-variance products has standard
        # deviation sqrt(2 * content_pairs) * scale^2; set it to content_logit * sqrt(D).
        scale = math.sqrt(content_logit * root_d / math.sqrt(2 * content_pairs))
        content_dims = dims[list(content_range)].flatten()
        q[:, content_dims] += scale * _smooth_field(num_tokens, 2 * content_pairs,
                                                    content_length, generator)
        k[:, content_dims] += scale * _smooth_field(num_tokens, 2 * content_pairs,
                                                    content_length, generator)

    q += noise * torch.randn(num_tokens, head_dim, dtype=torch.float64, generator=generator)
    k += noise * torch.randn(num_tokens, head_dim, dtype=torch.float64, generator=generator)
    q = apply_rope(q, base, rope_layout=rope_layout).float()
    k = apply_rope(k, base, rope_layout=rope_layout).float()
    return SyntheticHead(
        q=q[None, None], k=k[None, None], base=base, rope_layout=rope_layout,
        slash_offset=slash_offset, slash_pairs=slash_range, content_pairs=content_range,
        vertical_pairs=vertical_range, vertical_spans=spans,
    )
