"""The blind spot of mean pooling, shown on a synthetic positional head.

The head has three kinds of structure, each on its own RoPE pairs:

* a slash: every query attends sharply to the key ``slash_offset`` tokens
  back. It lives on the fastest pairs (``0 .. slash_pairs-1``), because a
  sharp peak in the relative position needs high frequencies;
* sink and vertical tiles: whole spans of keys that every query likes, on the
  slowest pairs, where RoPE barely turns over the sequence;
* slowly varying content on the pairs just faster than those, which gives the
  other tiles realistic, non-uniform pooled scores;

plus a little white noise on every dim. Mean pooling multiplies each pair's
contribution to the tile score by ``gain_m^2`` (:func:`prism.theory.score_filter_residual`),
which is small on the slash pairs beyond the cut-off ``2 pi / B``, so in one
softmax over the whole head the slash's tile drowns beside the sink and
vertical tiles. Prism scores the fast band on its own and calibrates it by its
energy (contract §5), so the remnant of the slash that survives pooling can still
rank its tile first there (at low bases, where almost every slash pair is
beyond the cut-off, it often does not, and Prism pays in density).

Everything is measured against full attention: *recall* is the softmax mass
of full attention that falls on the selected tiles, averaged over queries, and
*density* is the share of causally admissible tiles selected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from prism.metrics import query_tile_mass, recall_from_mass, tile_density
from prism.reference import (
    apply_rope,
    pair_dims,
    select_blocks,
    tile_layout,
)
from prism.reference.mean_pooling import mean_pooling_select
from prism.reference.validation import validate_block_mask, validate_qk

from .checks import validate_layout
from .frequency import rope_frequencies, validate_base, validate_block_size

#: Bases of the default blind-spot table: Llama-2 (1e4), then long-context bases.
DEFAULT_BLIND_SPOT_BASES = (1e4, 1e5, 5e5, 1e6)

METHOD_MEAN_POOLING = "mean pooling"
METHOD_PRISM = "prism"
#: Label of Prism run with ``calibrate=False`` (see :attr:`BlindSpotResult.label`).
LABEL_PRISM_UNCALIBRATED = "prism (calibrate=False)"

def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_real(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"threshold must be a float in (0, 1], got {type(threshold).__name__}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(
            f"threshold must lie in (0, 1], got {threshold}; 0.95 keeps 95% of the tile "
            "probability mass"
        )
    return float(threshold)


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
    num_tokens = _check_int("num_tokens", num_tokens, 1)
    head_dim = _check_int("head_dim", head_dim, 2)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE pairs), got {head_dim}")
    rope_layout = validate_layout(rope_layout)
    slash_offset = _check_int("slash_offset", slash_offset, 1)
    n_pairs = head_dim // 2
    slash_pairs = _check_int("slash_pairs", slash_pairs, 1)
    vertical_pairs = _check_int("vertical_pairs", vertical_pairs, 1)
    content_pairs = _check_int("content_pairs", content_pairs, 0)
    if slash_pairs + content_pairs + vertical_pairs > n_pairs:
        raise ValueError(
            f"slash_pairs + content_pairs + vertical_pairs must be <= D/2 = {n_pairs}, got "
            f"{slash_pairs} + {content_pairs} + {vertical_pairs}; give each structure fewer pairs"
        )
    slash_logit = _check_real("slash_logit", slash_logit)
    vertical_logit = _check_real("vertical_logit", vertical_logit)
    content_logit = _check_real("content_logit", content_logit)
    content_length = _check_int("content_length", content_length, 1)
    noise = _check_real("noise", noise)
    spans = tuple((int(a), int(b)) for a, b in vertical_spans)
    for start, stop in spans:
        if not 0 <= start < stop <= num_tokens:
            raise ValueError(
                f"vertical_spans must hold (start, stop) with 0 <= start < stop <= num_tokens "
                f"= {num_tokens}, got ({start}, {stop})"
            )
    generator = torch.Generator().manual_seed(_check_int("seed", seed, 0))

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


def full_attention_probabilities(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True,
                                 scale: float | None = None) -> torch.Tensor:
    """Dense softmax attention weights in float64 (memory ``B * Hq * Nq * Nk * 8`` bytes).

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    causal : bool
        Query row ``r`` sits at position ``Nk - Nq + r`` and reads keys ``n <= p``.
    scale : float, optional
        Default ``1 / sqrt(D)``.

    Returns
    -------
    Tensor (B, Hq, Nq, Nk), float64
        Each row sums to 1 (rows with no admissible key are all zero).
    """
    validate_qk(q, k, causal=causal)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else _check_real("scale", scale, positive=True)
    qf = q.double().reshape(b, hkv, hq // hkv, nq, d)
    scores = (qf @ k.double().unsqueeze(2).transpose(-1, -2)).reshape(b, hq, nq, nk) * scale
    if causal:
        positions = torch.arange(nk - nq, nk, device=q.device)
        allowed = torch.arange(nk, device=q.device)[None, :] <= positions[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def tile_attention_mass(probabilities: torch.Tensor, *, block_size: int = 128,
                        causal: bool = True) -> torch.Tensor:
    """Per query row, the full-attention mass that falls in each key tile.

    Summing once per key tile lets many tile selections be scored against the
    same attention matrix at the cost of a gather each. This keeps one row per
    query (for per-query analysis, :func:`kept_attention_mass`); summed over the
    rows of each query tile it is :func:`prism.metrics.query_tile_mass`, from
    which the recall of :mod:`prism.metrics` is computed.

    Parameters
    ----------
    probabilities : Tensor (B, Hq, Nq, Nk)
        From :func:`full_attention_probabilities`.
    block_size : int
    causal : bool
        When causal, keys after the query (``n > p``) are left out even if
        ``probabilities`` holds mass there.

    Returns
    -------
    Tensor (B, Hq, Nq, n_key_tiles), float64
    """
    if not isinstance(probabilities, torch.Tensor) or probabilities.dim() != 4:
        raise TypeError("probabilities must be a (B, Hq, Nq, Nk) tensor from "
                        "full_attention_probabilities")
    block_size = validate_block_size(block_size)
    b, h, nq, nk = probabilities.shape
    n_key_tiles = -(-nk // block_size)
    weights = probabilities.double()
    if causal:
        positions = torch.arange(nk - nq, nk, device=weights.device)
        allowed = torch.arange(nk, device=weights.device)[None, :] <= positions[:, None]
        weights = weights * allowed
    padded = torch.zeros(b, h, nq, n_key_tiles * block_size, dtype=torch.float64,
                         device=weights.device)
    padded[..., :nk] = weights
    return padded.view(b, h, nq, n_key_tiles, block_size).sum(dim=-1)


def kept_attention_mass(probabilities: torch.Tensor, block_mask: torch.Tensor, *,
                        block_size: int = 128, causal: bool = True) -> torch.Tensor:
    """Per query, the full-attention mass that falls on its selected tiles.

    Query ``p`` keeps key ``n`` iff ``tile(n)`` is selected for ``tile(p)``
    and, when causal, ``n <= p`` (contract §7).

    Parameters
    ----------
    probabilities : Tensor (B, Hq, Nq, Nk)
        From :func:`full_attention_probabilities`.
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
        Tile selection on the contract §3 grid; batch and head dims may be 1.
    block_size : int
    causal : bool

    Returns
    -------
    Tensor (B, Hq, Nq), float64
    """
    tile_mass = tile_attention_mass(probabilities, block_size=block_size, causal=causal)
    nq, nk = probabilities.shape[2], probabilities.shape[3]
    layout = tile_layout(nq, nk, block_size, causal)
    validate_block_mask(block_mask, probabilities,
                        (layout.num_query_tiles, layout.num_key_tiles))
    positions = layout.query_start + torch.arange(nq, device=tile_mass.device)
    rows = positions // block_size - layout.first_query_tile
    selected = block_mask[:, :, rows].to(torch.float64)  # (B', H', Nq, n_key_tiles)
    return (tile_mass * selected).sum(dim=-1)


def attention_recall(q: torch.Tensor, k: torch.Tensor, block_mask: torch.Tensor, *,
                     block_size: int = 128, causal: bool = True,
                     scale: float | None = None) -> torch.Tensor:
    """Full-attention mass kept by a tile selection, averaged over queries.

    The attention recall of :mod:`prism.metrics`, computed in float64 from
    ``q`` and ``k``: :func:`prism.metrics.query_tile_mass`, then
    :func:`prism.metrics.recall_from_mass`.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
    block_size : int
    causal : bool
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.

    Returns
    -------
    Tensor (B, Hq), float64
        1 means the selection loses nothing; each query counts equally.
    """
    block_size = validate_block_size(block_size)
    if scale is not None:
        scale = _check_real("scale", scale, positive=True)
    layout = tile_layout(q.shape[2], k.shape[2], block_size, causal)
    validate_block_mask(block_mask, q, (layout.num_query_tiles, layout.num_key_tiles))
    mass = query_tile_mass(q, k, block_size, causal=causal, scale=scale, dtype=torch.float64)
    return recall_from_mass(block_mask, mass, q.shape[2])


def causal_density(block_mask: torch.Tensor, *, num_queries: int, num_keys: int,
                   block_size: int = 128, causal: bool = True) -> torch.Tensor:
    """Selected admissible tiles over admissible tiles: :func:`prism.metrics.tile_density`.

    Parameters
    ----------
    block_mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
    num_queries, num_keys : int
        ``Nq`` and ``Nk`` of the selection.
    block_size : int
    causal : bool

    Returns
    -------
    Tensor (B, Hq), float64
        1 is dense attention (every admissible tile computed).
    """
    num_queries = _check_int("num_queries", num_queries, 1)
    num_keys = _check_int("num_keys", num_keys, 1)
    block_size = validate_block_size(block_size)
    return tile_density(block_mask, tile_layout(num_queries, num_keys, block_size, causal), causal)


@dataclass(frozen=True)
class BlindSpotResult:
    """Recall and density of one selection method on one synthetic head.

    Attributes
    ----------
    base : float
        RoPE base of the head.
    block_size : int
    slash_offset : int
    method : str
        ``"mean pooling"`` or ``"prism"``.
    calibrate : bool or None
        Prism's contract §5 calibration; None for mean pooling.
    threshold : float
        Top-p (both bands for Prism).
    recall : float
        Mean over queries of the full-attention mass on the selected tiles.
    density : float
        Selected admissible tiles over admissible tiles.
    """

    base: float
    block_size: int
    slash_offset: int
    method: str
    calibrate: bool | None
    threshold: float
    recall: float
    density: float

    @property
    def label(self) -> str:
        """Short name of the method, e.g. ``"prism (calibrate=False)"``."""
        if self.method == METHOD_PRISM and self.calibrate is False:
            return LABEL_PRISM_UNCALIBRATED
        return self.method


def compare_selections(
    head: SyntheticHead,
    *,
    block_size: int = 128,
    threshold: float = 0.95,
    mean_pooling_thresholds=None,
) -> tuple[list[BlindSpotResult], dict]:
    """Score mean pooling and Prism (calibrated or not) against full attention on one head.

    Parameters
    ----------
    head : SyntheticHead
    block_size : int
    threshold : float
        Top-p of every method (both bands for Prism).
    mean_pooling_thresholds : sequence of float, optional
        Further top-p values at which to run mean pooling, to see what
        density it needs to catch up.

    Returns
    -------
    results : list of BlindSpotResult
        Mean pooling at ``threshold``, Prism calibrated, Prism with
        ``calibrate=False``, then mean pooling at each extra threshold.
    masks : dict
        The (1, 1, nq, nk) bool masks keyed by each result's ``label`` (the
        first three only), for plotting.
    """
    if not isinstance(head, SyntheticHead):
        raise TypeError(f"head must be a SyntheticHead, got {type(head).__name__}; build one "
                        "with synthetic_positional_head()")
    block_size = validate_block_size(block_size)
    threshold = _check_threshold(threshold)
    q, k = head.q, head.k
    n = head.num_tokens
    # One mass table, many masks: each recall is then a masked sum.
    mass = query_tile_mass(q, k, block_size, dtype=torch.float64)

    def measure(mask, method, calibrate, top_p):
        recall = recall_from_mass(mask, mass, n).mean()
        density = causal_density(mask, num_queries=n, num_keys=n, block_size=block_size)
        return BlindSpotResult(base=head.base, block_size=block_size,
                               slash_offset=head.slash_offset, method=method,
                               calibrate=calibrate, threshold=top_p, recall=float(recall),
                               density=float(density.mean()))

    masks = {
        METHOD_MEAN_POOLING: mean_pooling_select(q, k, block_size=block_size,
                                                 threshold=threshold),
        METHOD_PRISM: select_blocks(q, k, block_size=block_size, high_threshold=threshold,
                                    low_threshold=threshold, rope_layout=head.rope_layout),
        LABEL_PRISM_UNCALIBRATED: select_blocks(
            q, k, block_size=block_size, high_threshold=threshold, low_threshold=threshold,
            rope_layout=head.rope_layout, calibrate=False),
    }
    results = [
        measure(masks[METHOD_MEAN_POOLING], METHOD_MEAN_POOLING, None, threshold),
        measure(masks[METHOD_PRISM], METHOD_PRISM, True, threshold),
        measure(masks[LABEL_PRISM_UNCALIBRATED], METHOD_PRISM, False, threshold),
    ]
    for extra in mean_pooling_thresholds or ():
        extra = _check_threshold(extra)
        mask = mean_pooling_select(q, k, block_size=block_size, threshold=extra)
        results.append(measure(mask, METHOD_MEAN_POOLING, None, extra))
    return results, masks


def blind_spot_table(
    bases=DEFAULT_BLIND_SPOT_BASES,
    *,
    block_size: int = 128,
    threshold: float = 0.95,
    mean_pooling_thresholds=None,
    **head_options,
) -> list[BlindSpotResult]:
    """Run :func:`compare_selections` on the synthetic head for several RoPE bases.

    Parameters
    ----------
    bases : sequence of float
        RoPE bases (default 1e4, 1e5, 5e5, 1e6).
    block_size : int
    threshold : float
    mean_pooling_thresholds : sequence of float, optional
        Passed to :func:`compare_selections`.
    **head_options
        Keyword arguments of :func:`synthetic_positional_head` (not ``base``).

    Returns
    -------
    list of BlindSpotResult
        Grouped by base, in the order of ``bases``.
    """
    if "base" in head_options:
        raise TypeError("pass RoPE bases through bases=, not base=")
    rows = []
    for base in bases:
        head = synthetic_positional_head(base, **head_options)
        results, _ = compare_selections(head, block_size=block_size, threshold=threshold,
                                        mean_pooling_thresholds=mean_pooling_thresholds)
        rows.extend(results)
    return rows


def format_blind_spot_table(rows: list[BlindSpotResult]) -> str:
    """Render :class:`BlindSpotResult` rows as a fixed-width text table.

    Parameters
    ----------
    rows : list of BlindSpotResult

    Returns
    -------
    str
        A header line and one line per row.
    """
    lines = [f"{'base':>8} {'B':>4} {'offset':>6}  {'method':<24} {'top-p':>6} "
             f"{'recall':>7} {'density':>8}"]
    for row in rows:
        lines.append(f"{row.base:>8.0e} {row.block_size:>4} {row.slash_offset:>6}  "
                     f"{row.label:<24} {row.threshold:>6.3f} {row.recall:>7.3f} "
                     f"{row.density:>8.3f}")
    return "\n".join(lines)
