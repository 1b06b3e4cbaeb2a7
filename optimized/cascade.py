"""The ``"cascade"`` estimator's stages on the GPU (docs/estimators.rst, "cascade").

* ``"prism_candidates"``: Prism's own selection kernels
  (:func:`prism.optimized.selection.select_tiles`) with both bands' top-p at
  ``candidate_threshold``; the mask includes the forced tiles, as the
  reference's :func:`~prism.reference.estimators.prism_candidate_tiles`.
* ``"candidate_antidiagonal"``: the packed antidiagonal kernel
  (:mod:`prism.optimized.antidiagonal_packed`) with the candidate mask as an
  input: each query group's softmax runs over the key groups of its query
  tile's candidate tiles only, and a program scores only the key tiles in
  which some of its rows has a candidate, listed once by a scan of its
  candidate rows and gathered into key blocks (that is where the cascade costs
  less than the dense antidiagonal scores; a GQA group too large for one
  program is split over several). Shapes the packed kernel does not take (groups
  per tile not a power of two) run the reference stage in torch.

:func:`prism.optimized.estimator_path.estimator_select` runs both, then the
selection's finishing launch (:func:`prism.optimized.tile_union.union_tiles`)
normalises, top-p's and unites with the vertical-slash and forced tiles.
"""

from __future__ import annotations

import functools

import torch

from prism.reference.bands import band_sizes
from prism.reference.estimators import candidate_antidiagonal_probabilities
from prism.reference.select import trace_selection
from prism.reference.tiles import TileLayout, tile_layout

from ._runtime import check_device
from .antidiagonal_packed import (
    _packed_kernel,
    antidiagonal_packed_applies,
    antidiagonal_packed_probabilities,
)
from .pooling import nonfinite_flag
from .selection import MAX_WIDTH, select_tiles


@functools.lru_cache(maxsize=256)
def _as_prism(cfg, threshold: float | None = None):
    """``cfg`` as Prism's own configuration; with ``threshold``, both bands' top-p at it
    (made once per configuration)."""
    if threshold is None:
        return cfg.replace(estimator="prism")
    return cfg.replace(estimator="prism", high_threshold=threshold, low_threshold=threshold)


def prism_mask(q, k, v, cfg, causal, layout, threshold: float | None = None,
               after_pooling=None):
    """Prism's selection (bands and forced tiles) by its kernels, and the pooling's
    NaN/Inf flag (which covers q, k and v); ``threshold`` replaces both band thresholds.
    ``after_pooling`` (no arguments) is called once the pooling is queued (after
    the whole selection on the reference's path for rows wider than the kernels')."""
    prism_cfg = _as_prism(cfg, threshold)
    if layout.num_key_tiles > MAX_WIDTH:
        mask = trace_selection(q, k, prism_cfg, causal=causal).mask
        if after_pooling is not None:
            after_pooling()
        return mask, nonfinite_flag(q, k, k if v is None else v)
    high_dim, low_dim = band_sizes(q.shape[-1], cfg.high_dim, cfg.low_dim)
    mask, _, _, nonfinite = select_tiles(q, k, prism_cfg, causal, layout, high_dim, low_dim,
                                         write_mask=True, write_indices=False, v=v,
                                         after_pooling=after_pooling)
    return mask, nonfinite


def prism_candidate_tiles_kernel(q: torch.Tensor, k: torch.Tensor, cfg, causal: bool,
                                 trace=None) -> torch.Tensor:
    """:func:`prism.reference.estimators.prism_candidate_tiles` by Prism's kernels.

    Same signature (``trace`` is not used) and result, up to contract §6's
    boundary ties at ``candidate_threshold``.

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool
    """
    layout = tile_layout(q.shape[2], k.shape[2], cfg.block_size, causal)
    return prism_mask(q, k, None, cfg, causal, layout, cfg.candidate_threshold)[0]


def check_candidates(candidates, q: torch.Tensor, layout: TileLayout) -> None:
    """A clear ``ValueError`` unless ``candidates`` is a (B, Hq, nq, nk) bool tensor on
    ``q``'s device."""
    shape = (q.shape[0], q.shape[1], layout.num_query_tiles, layout.num_key_tiles)
    if not isinstance(candidates, torch.Tensor) or candidates.dtype != torch.bool or (
            tuple(candidates.shape) != shape or candidates.device != q.device):
        raise ValueError(f"candidates must be a bool tensor of shape {shape} on {q.device}")


def candidate_antidiagonal_tile_scores(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                                       stride: int, causal: bool, *, normalize: bool,
                                       candidates: torch.Tensor,
                                       nonfinite: torch.Tensor | None = None,
                                       sampled: torch.Tensor | None = None) -> torch.Tensor:
    """Candidate-restricted antidiagonal tile probabilities on validated inputs.

    ``normalize=False`` returns the rows before their division by their sums
    (defined at the admissible tiles). ``nonfinite`` is set only by what the
    kernel reads (skipped key blocks are not read): callers rely on the
    candidate selection's pooling launch for the full check. ``sampled``: where
    :func:`~prism.optimized.antidiagonal_packed.fused_sampled_applies`, the same
    launch writes the sampled stage's rows there.
    """
    if antidiagonal_packed_applies(layout, stride):
        return antidiagonal_packed_probabilities(
            q, k, layout, stride, causal, normalize=normalize, nonfinite=nonfinite,
            candidates=candidates.contiguous(), sampled=sampled)
    if sampled is not None:
        raise ValueError("the sampled stage runs in the antidiagonal launch only where "
                         "fused_sampled_applies")
    return candidate_antidiagonal_probabilities(q, k, layout, stride, candidates, causal)


def candidate_antidiagonal_tile_probabilities(q: torch.Tensor, k: torch.Tensor,
                                              layout: TileLayout, stride: int,
                                              candidates: torch.Tensor,
                                              causal: bool = True) -> torch.Tensor:
    """:func:`prism.reference.estimators.candidate_antidiagonal_probabilities` by the
    packed antidiagonal kernel (same signature and result, up to fp32 rounding).

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    layout : TileLayout
    stride : int
        Divides ``layout.block_size``.
    candidates : Tensor (B, Hq, nq, nk), bool
    causal : bool

    Returns
    -------
    Tensor (B, Hq, nq, nk), float32
        Zero outside the admissible candidate tiles; rows with one sum to 1.
    """
    from .estimators import _validate

    _validate(q, k, layout, stride, causal)
    check_candidates(candidates, q, layout)
    check_device(_packed_kernel, q=q, k=k)
    return candidate_antidiagonal_tile_scores(q, k, layout, stride, causal, normalize=True,
                                              candidates=candidates)


__all__ = ["candidate_antidiagonal_tile_probabilities", "candidate_antidiagonal_tile_scores",
           "check_candidates", "prism_candidate_tiles_kernel", "prism_mask"]
