"""A whole estimator selection on the GPU: scoring kernels, then one kernel that finishes it.

:func:`estimator_select` is what :func:`prism.optimized.ops.select` runs for
every estimator other than ``"prism"``. It reads the estimator's row of the
registry (:mod:`prism.reference.registry`), never its name:

* its probability stage (``"antidiagonal"``, ``"sampled"`` or
  ``"candidate_antidiagonal"``, each followed by ``"tile_top_p"``) runs its
  scoring kernel, whose rows stay unnormalised;
* with ``"prism_candidates"`` (the cascade), Prism's selection kernels at
  ``candidate_threshold`` write the candidate tiles first, and the probability
  stage scores only those (:mod:`prism.optimized.cascade`); with
  ``"candidate_sampled"`` and ``sampled_weight`` > 0, the sampled queries'
  exact attention on those tiles is scored by the antidiagonal launch itself
  where the samples are its query groups (:data:`SAMPLED_FUSED`,
  :mod:`prism.optimized.antidiagonal_sampled`), else by one more launch
  (:mod:`prism.optimized.candidate_sampled`), on CUDA on its own stream beside
  the antidiagonal kernel (:data:`SAMPLED_BESIDE`); the finishing launch mixes
  the two rows;
* its ``"vertical_slash"`` stage runs the last queries' distributions and
  their top-p as tile bins (:func:`~prism.optimized.vertical_slash_tiles.vertical_slash_bins`);
  with ``"last_tile_exact"`` (the cascade) the same launch also runs the last
  query tile's rule (the vertical distribution summed into key tiles, top-p);
* with Prism's bands, Prism's selection kernel writes its mask (forced tiles
  included) first;

then one launch of :func:`prism.optimized.tile_union.union_tiles` normalises
and top-p's the probabilities, unites them with the vertical-slash tiles
(and the last query tile's rule's tiles),
Prism's mask and the forced tiles within the admissible ones, and writes the
bool mask and the compact indices. That is the reference's
:func:`prism.reference.select.estimator_mask` (or, with Prism's bands, its
mask united with the estimator's tiles) and ``mask_to_indices``, with no
torch operation between the kernels.

NaN/Inf: the scoring kernels set a device flag when a score they compute is
not finite (:func:`prism.optimized.antidiagonal_packed.masked_scores`), which
covers every row of k, and every row of q for the antidiagonal scores; the
finishing launch checks, in extra programs, whatever no scoring kernel read
whole (q for the sampled and vertical-slash estimators, v when given). With
Prism's bands, or Prism's candidates, its pooling launch checks q, k and v. Nothing waits for the
GPU; :mod:`prism.optimized.api` reads the flag at the end of an eager call.

Any other composition of stages (the sub-tile estimator), and rows wider than
:data:`~prism.optimized.tile_union.MAX_UNION_WIDTH` key tiles, take the
general path: the registry's own tiles function on the stage kernels, then
the same finishing launch (or, for the widest rows, torch and a separate
check).
"""

from __future__ import annotations

import torch

from prism.reference.registry import (
    EstimatorSpec,
    estimator_spec,
    estimator_tiles,
    last_tile_threshold,
)
from prism.reference.select import trace_selection
from prism.reference.tiles import TileLayout

from .antidiagonal_packed import fused_sampled_applies
from .candidate_sampled import candidate_sampled_mix_, candidate_sampled_scores
from .cascade import _as_prism, candidate_antidiagonal_tile_scores, prism_mask
from .estimators import KERNEL_STAGES, antidiagonal_tile_scores
from .indices import mask_rows_to_indices
from .plan_items import fork, join, side_stream, zero_
from .pooling import nonfinite_flag
from .sampled import sampled_tile_probabilities
from .tile_union import MAX_UNION_WIDTH, union_tiles
from .vertical_slash import last_query_distributions_unchecked
from .vertical_slash_tiles import vertical_slash_bins

#: On CUDA, run the vertical-slash stage (the last queries' distributions and their
#: top-p) on a second stream, concurrently with the other stages; False: one stream.
OVERLAP_VERTICAL_SLASH = True
#: With the overlap, estimators that run Prism's kernels first (the cascade, Prism
#: plus vertical-slash) fork the vertical-slash stage right after Prism's pooling
#: launch when the layout has at most this many key tiles (so the stage starts once
#: the pooling has finished, and runs beside the selection and the scores), and
#: before the pooling otherwise (0: always before). On the H200 (the accurate
#: preset, 32/8 heads, D 128, graph replays; results/h200_vs_after_pooling_175d4d2.json)
#: after the pooling took 0.148 / 0.516 / 2.665 ms at 8K / 32K / 128K tokens against
#: 0.159 / 0.514 / 2.520 before it: at 8K the two chains are short and the stage
#: no longer delays the pooling; at 128K the main chain is the longer one and the
#: stage's passes over k then compete with it instead. Read at each call (a replayed
#: call plan keeps the order it recorded).
VS_AFTER_POOLING_MAX_KEY_TILES = 64
#: ... and at least this many: below it the stage is forked before the pooling again.
#: On the H200 (the same preset and shape, graph replays,
#: results/h200_vs_fork_a60fdf7.json and h200_vs_fork_mid_a60fdf7.json) before the
#: pooling took 0.0751-0.0755 ms at 4K (32 key tiles) against 0.0817-0.0822 after it,
#: while after it stayed faster at 5K / 6K / 8K (40 / 48 / 64 tiles: 0.1021-0.1031 /
#: 0.1034-0.1037 / 0.1257-0.1261 against 0.1035-0.1038 / 0.1065-0.1068 /
#: 0.1263-0.1267) and slower at 12K (96 tiles: 0.1836 against 0.1664-0.1670).
VS_AFTER_POOLING_MIN_KEY_TILES = 33

#: The cascade's sampled stage (``sampled_weight`` > 0): True, it writes its own rows
#: (:func:`~prism.optimized.candidate_sampled.candidate_sampled_scores`), on CUDA on a
#: stream of its own beside the antidiagonal kernel once the candidates are written,
#: and the finishing launch mixes the two rows; False, it runs after the antidiagonal
#: kernel and mixes in place (:func:`~prism.optimized.candidate_sampled.candidate_sampled_mix_`).
#: Read at each call (a replayed call plan keeps the form it recorded).
SAMPLED_BESIDE = True
#: ... and where the samples are the antidiagonal's query groups
#: (``sampled_queries == block_size // antidiagonal_stride``, the accurate preset;
#: :func:`~prism.optimized.antidiagonal_packed.fused_sampled_applies`), True: the
#: restricted antidiagonal kernel scores them itself from the keys it loads
#: (:mod:`prism.optimized.antidiagonal_sampled`) and no stage launch runs. Its
#: one-pass scratch is then twice the kernel's own (causal: 1.26 GiB at 128K tokens,
#: 5.0 GiB at 256K, for 32/8 heads, tile 128, stride 16; reused by torch's allocator
#: across calls); where that passes ``antidiagonal_shapes.ONE_PASS_MAX_SCRATCH_BYTES``
#: the stage's own launch runs instead. Read at each call.
SAMPLED_FUSED = True
#: Side-stream slot (:func:`~prism.optimized.plan_items.side_stream`) of that stage.
SAMPLED_SLOT = 3

#: Probability stages the fused path runs: stage name -> (scoring function on
#: validated inputs, the PrismConfig field of its argument, whether it reads
#: every query row).
PROBABILITY_STAGES = {
    "antidiagonal": (antidiagonal_tile_scores, "antidiagonal_stride", True),
    "sampled": (sampled_tile_probabilities, "sampled_queries", False),
    "candidate_antidiagonal": (candidate_antidiagonal_tile_scores, "antidiagonal_stride", True),
}
#: Stages that make the candidate tiles a probability stage scores (the cascade's).
CANDIDATE_STAGES = frozenset({"prism_trace", "prism_candidates"})
#: A stage mixed into the probability stage's output on the candidates, when its
#: weight (``sampled_weight``) is above 0.
MIX_STAGE = "candidate_sampled"

_FORMS: dict = {}


def fused_form(spec: EstimatorSpec):
    """``(probability stage or None, with vertical-slash, on Prism's candidates, with the
    last-tile rule, with the mixed sampled stage)`` when :func:`estimator_select`
    computes ``spec``'s tiles in its fused form, else None (the general path)."""
    form = _FORMS.get(spec.name, False)
    if form is not False:
        return form
    stages = set(spec.stages)
    with_vs = "vertical_slash" in stages
    with_last = "last_tile_exact" in stages
    scoring = stages - {"vertical_slash", "tile_top_p", "last_tile_exact"}
    candidates = "prism_candidates" in stages
    with_mix = candidates and MIX_STAGE in stages
    if candidates:
        scoring -= CANDIDATE_STAGES | {MIX_STAGE}
    form = None
    if spec.tiles is not None:
        if spec.prism_bands or not scoring:
            # Prism's mask or nothing, united with the vertical-slash tiles.
            form = (None, True, False, False, False) if stages == {"vertical_slash"} else None
        elif len(scoring) == 1 and scoring <= PROBABILITY_STAGES.keys() and (
                "tile_top_p" in stages):
            form = (scoring.pop(), with_vs, candidates, with_last, with_mix)
    _FORMS[spec.name] = form
    return form


def _vs_threshold(cfg) -> float:
    """The vertical-slash top-p (``high_threshold`` when not set; docs/estimators.rst)."""
    return cfg.high_threshold if cfg.vertical_slash_threshold is None else (
        cfg.vertical_slash_threshold)


def estimator_select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, cfg,
                     causal: bool, layout: TileLayout, *, write_indices: bool = True,
                     prism_source=None):
    """Selection of ``cfg.estimator`` (not ``"prism"``) on validated inputs.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    v : Tensor (B, Hkv, Nk, Dv), optional
        Only checked for NaN/Inf.
    cfg : PrismConfig
    causal : bool
    layout : TileLayout
        ``tile_layout(Nq, Nk, cfg.block_size, causal)``.
    write_indices : bool
        Also return the compact indices.
    prism_source : callable, optional
        ``prism_source(prism_cfg, after_pooling) -> (mask, nonfinite)``: Prism's
        mask for ``prism_cfg`` (the estimator's bands, or the cascade's
        candidates) from elsewhere than Prism's kernels on ``k``, called once,
        and with it the NaN/Inf flag the other stages add to. Chunked prefill
        passes :func:`prism.optimized.chunked.cached_select` on a
        :class:`~prism.reference.PooledKeyCache`. Not for estimators without
        Prism's pooled tiles.

    Returns
    -------
    mask : Tensor (B, Hq, nq, nk), bool
        :func:`prism.reference.select_blocks`'s mask (up to top-p boundary ties).
    kv_num_blocks : Tensor (B, Hq, nq) int32, or None
    kv_indices : Tensor (B, Hq, nq, nk) int32, or None
        As :func:`prism.reference.mask_to_indices`.
    nonfinite : Tensor (1,) float64
        Non-zero when q, k (or v) may hold NaN/Inf; the outputs are then undefined.
    """
    b, hq = q.shape[:2]
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    if b * hq * nq * nk == 0:
        mask = torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=q.device)
        num, idx = mask_rows_to_indices(mask) if write_indices else (None, None)
        return mask, num, idx, nonfinite_flag(q, k, k if v is None else v)
    spec = estimator_spec(cfg.estimator)
    form = fused_form(spec)
    if form is None or nk > MAX_UNION_WIDTH:
        return _general(q, k, v, cfg, causal, layout, spec, write_indices, prism_source)
    stage, with_vs, on_candidates, with_last, with_mix = form
    check = {} if v is None else {"v": v}
    other = None
    extra = {}
    # Prism's kernels run first (its mask, or the cascade's candidates); their
    # pooling launch checks q, k and v for NaN/Inf.
    runs_prism = spec.prism_bands or on_candidates
    if not runs_prism:
        nonfinite = torch.empty(1, dtype=torch.float64, device=q.device)
        zero_(nonfinite)  # a call plan replays this zeroing (a torch fill it would refuse)

    def vertical_slash():
        vertical, slash = last_query_distributions_unchecked(
            q, k, layout, cfg.last_queries, causal,
            None if runs_prism else nonfinite)
        # One launch: the bins' top-p and the last-tile rule's sums and top-p.
        columns, diagonals, last, _ = vertical_slash_bins(
            vertical, slash, layout, _vs_threshold(cfg), causal, with_bins=with_vs,
            last_threshold=last_tile_threshold(cfg) if with_last else None)
        return columns, diagonals, last

    side_results = []  # (main stream, columns, diagonals, last tiles) once queued

    def start_side():
        # The vertical-slash stage reads only q and k: it runs on its own stream
        # beside Prism's kernels and the scores, and the finishing launch waits for it.
        side = side_stream(q.device, 1)
        main = fork(side)
        with torch.cuda.stream(side):
            side_results.append((main, side, *vertical_slash()))

    uses_last_queries = with_vs or with_last
    overlap = uses_last_queries and OVERLAP_VERTICAL_SLASH and q.is_cuda
    later = runs_prism and VS_AFTER_POOLING_MIN_KEY_TILES <= nk <= VS_AFTER_POOLING_MAX_KEY_TILES
    if overlap and not later:
        start_side()
    after_pooling = start_side if overlap and later else None
    if runs_prism:
        threshold = cfg.candidate_threshold if on_candidates else None
        if prism_source is None:
            prism, nonfinite = prism_mask(q, k, v, cfg, causal, layout, threshold,
                                          after_pooling=after_pooling)
        else:
            # The cached pooling checks q and the keys after the cache (not v: kept in
            # check); the keys before it are read by the vertical-slash launch.
            prism, nonfinite = prism_source(_as_prism(cfg, threshold), after_pooling)
        if on_candidates:
            extra["candidates"] = prism
        else:
            other = prism
        if prism_source is None:
            check = {}  # the pooling launch checked q, k and v
    probs = second = None
    if stage is not None:
        scores, field, reads_every_query = PROBABILITY_STAGES[stage]
        mixed = with_mix and cfg.sampled_weight > 0
        fused = mixed and SAMPLED_FUSED and fused_sampled_applies(
            q, k, layout, cfg.antidiagonal_stride, cfg.sampled_queries, causal)
        if fused:
            second = torch.empty(b, hq, nq, nk, dtype=torch.float32, device=q.device)
            extra["sampled"] = second
        own_launch = mixed and not fused
        beside = own_launch and SAMPLED_BESIDE and q.is_cuda
        if beside:
            # The sampled stage reads only q, k and the candidates: it runs beside the
            # antidiagonal kernel, and the finishing launch mixes their rows.
            side = side_stream(q.device, SAMPLED_SLOT)
            main = fork(side)
            with torch.cuda.stream(side):
                second = candidate_sampled_scores(q, k, layout, cfg.sampled_queries,
                                                  extra["candidates"], causal)
        probs = scores(q, k, layout, getattr(cfg, field), causal, normalize=False,
                       nonfinite=nonfinite, **extra)
        if beside:
            join(main, side)
        elif own_launch and SAMPLED_BESIDE:
            second = candidate_sampled_scores(q, k, layout, cfg.sampled_queries,
                                              extra["candidates"], causal)
        elif own_launch:
            probs = candidate_sampled_mix_(probs, q, k, layout, cfg.sampled_queries,
                                           cfg.sampled_weight, extra["candidates"], causal)
        if not reads_every_query and not on_candidates:
            check["q"] = q
    columns = diagonals = last_tiles = None
    if uses_last_queries:
        if not overlap:
            columns, diagonals, last_tiles = vertical_slash()
        else:
            main, side, columns, diagonals, last_tiles = side_results[0]
            join(main, side)
        if stage is None and not runs_prism:
            check["q"] = q
    mask, num, idx = union_tiles(
        layout, causal, (b, hq), probs=probs, normalize=True, second=second,
        weight=cfg.sampled_weight, threshold=cfg.high_threshold,
        columns=columns, diagonals=diagonals, other=other, mask=other,
        force_sink=cfg.force_sink, force_diagonal=cfg.force_diagonal,
        last_tiles=last_tiles,
        write_indices=write_indices, check=check, nonfinite=nonfinite)
    return mask, num, idx, nonfinite


def _general(q, k, v, cfg, causal, layout, spec, write_indices, prism_source=None):
    """Any estimator: the registry's tiles on the stage kernels, then the forced tiles
    (``prism_source`` as in :func:`estimator_select`)."""
    stages = {**KERNEL_STAGES, "prism_trace": trace_selection}
    if prism_source is not None and "prism_candidates" in spec.stages:
        def candidates(q_, k_, cfg_, causal_, trace=None):
            return prism_source(_as_prism(cfg, cfg.candidate_threshold), None)[0]
        stages["prism_candidates"] = candidates
    tiles = estimator_tiles(q, k, cfg, layout, causal, stages)
    if spec.prism_bands:
        if prism_source is None:
            prism, _ = prism_mask(q, k, None, cfg, causal, layout)
        else:
            prism = prism_source(_as_prism(cfg), None)[0]
        tiles = tiles | prism
    if layout.num_key_tiles > MAX_UNION_WIDTH:
        from prism.reference.scoring import admissible_tiles
        from prism.reference.select import forced_tiles

        forced = forced_tiles(layout, causal, cfg.force_sink, cfg.force_diagonal, q.device)
        mask = ((tiles | forced) & admissible_tiles(layout, causal, q.device)).contiguous()
        num, idx = mask_rows_to_indices(mask) if write_indices else (None, None)
        return mask, num, idx, nonfinite_flag(q, k, k if v is None else v)
    nonfinite = torch.zeros(1, dtype=torch.float64, device=q.device)
    check = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    mask, num, idx = union_tiles(
        layout, causal, q.shape[:2], other=tiles.contiguous(), force_sink=cfg.force_sink,
        force_diagonal=cfg.force_diagonal, write_indices=write_indices, check=check,
        nonfinite=nonfinite)
    return mask, num, idx, nonfinite


__all__ = ["CANDIDATE_STAGES", "MIX_STAGE", "PROBABILITY_STAGES", "SAMPLED_BESIDE",
           "SAMPLED_FUSED", "estimator_select", "fused_form"]
