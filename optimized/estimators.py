"""The antidiagonal tile scores as a Triton kernel, and the estimators' stage kernels.

:data:`KERNEL_STAGES` maps the registry's scoring stages
(:mod:`prism.reference.registry`) to Triton kernels with the reference
stage's signature and result: the antidiagonal scores below, the
sampled-query scores of :mod:`prism.optimized.sampled` (and the cascade's,
restricted to its candidates, of :mod:`prism.optimized.candidate_sampled`), the vertical-slash
stage of :mod:`prism.optimized.vertical_slash` and the top-p over tile
probabilities (:func:`tile_top_p_kernel`). A whole selection goes through
:func:`prism.optimized.estimator_path.estimator_select`, which calls the
scoring kernels without their normalisation and finishes in one kernel
(:mod:`prism.optimized.tile_union`); :func:`estimator_select_blocks` returns
its mask.

:func:`antidiagonal_tile_probabilities` computes exactly what
:func:`prism.reference.estimators.antidiagonal_probabilities` computes, without
the reference's ``(groups x groups)`` score matrix and without repeating K over
the query heads of a GQA group.

The score of query group ``g`` and key group ``g'`` (groups of ``S`` rows on the
absolute grid) is one antidiagonal of their ``S x S`` block of token scores::

    a[g, g'] = sum_{u < S} q[g*S + u] . k[g'*S + S-1-u] / (sqrt(D) * S)

which is the reference's ``sum_t q[g*S + S-1-t] . k[g'*S + t]`` with
``u = S-1-t``. Written as vectors of length ``S*D``, the query group is its
``S`` rows in natural order and the key group its ``S`` rows in reversed order,
so a block of scores is one matrix product. The kernel splits that product into
``S`` products of length ``D`` (one per row ``u``), which keeps the registers
bounded for large ``S * D``.

When the groups per tile are a power of two (strides 1 to 128 on tiles of
128), the kernel of :mod:`prism.optimized.antidiagonal_packed` runs instead: it
packs the query heads of a GQA group and several query tiles into one program
of about 64 rows. Otherwise the per-head kernel below runs.

One program handles one (batch, query head) and up to ``BLOCK_G`` query groups
of one query tile, in two passes over the admissible key groups:

1. online softmax statistics: each query group's running max ``m`` and sum of
   ``2^(a*log2(e) - m)``, in base 2 with the scale folded into ``qk_scale``;
2. the same scores again, normalised to probabilities, summed over the
   program's query groups and, through a one-hot reduction, over the key
   groups of each key tile: one row of ``nk`` tile probabilities.

The rows are then renormalised (in torch, or in the selection's last kernel).
Nothing of size ``groups x groups`` is ever written to memory.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from prism.reference.registry import top_p_tiles
from prism.reference.tiles import TileLayout, tile_layout
from prism.reference.validation import validate_stage_inputs

from ._runtime import check_device, kernels_interpreted, next_power_of_2
from .antidiagonal_packed import (
    antidiagonal_packed_applies,
    antidiagonal_packed_probabilities,
    masked_scores,
    online_softmax_step,
)
from .candidate_sampled import candidate_sampled_tile_probabilities
from .cascade import candidate_antidiagonal_tile_probabilities, prism_candidate_tiles_kernel
from .launch import launch
from .pooling import _flag_if_nonfinite
from .sampled import sampled_tile_probabilities
from .tile_union import MAX_UNION_WIDTH, union_tiles
from .vertical_slash import last_tile_exact_kernel, vertical_slash_tile_mask

#: Key groups scored per ``tl.dot`` (columns of one block of scores).
BLOCK_KEY_GROUPS = 64
#: Most query groups one program holds; larger tiles are split over programs.
MAX_BLOCK_QUERY_GROUPS = 64
# tl.dot needs every dimension to be at least 16 on the GPU.
_MIN_DOT = 16


@triton.jit
def _query_rows(q_head, stride_qn, stride_qd, groups, rows_ok, u, query_start, num_queries,
                STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """(BLOCK_G, D_PAD): row ``r`` is the query at absolute position ``groups[r]*S + u``.

    Positions outside ``[query_start, query_start + Nq)`` and padded dims load as 0,
    as the reference's zero-filled grid does.
    """
    rows = groups * STRIDE + u - query_start
    ok = rows_ok & (rows >= 0) & (rows < num_queries)
    dims = tl.arange(0, D_PAD)
    ptrs = q_head + rows.to(tl.int64)[:, None] * stride_qn + dims[None, :] * stride_qd
    return tl.load(ptrs, mask=ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _key_rows_reversed(k_head, stride_kn, stride_kd, key_groups, u, num_keys,
                       STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """(D_PAD, BLOCK_KG): column ``c`` is the key at ``key_groups[c]*S + S-1-u``.

    Reading row ``S-1-u`` of each key group against row ``u`` of each query group
    puts the product on the antidiagonal of the ``S x S`` sub-block. Keys at or
    past ``Nk`` load as 0.
    """
    keys = key_groups * STRIDE + (STRIDE - 1 - u)
    ok = (key_groups >= 0) & (keys < num_keys)
    dims = tl.arange(0, D_PAD)
    ptrs = k_head + keys.to(tl.int64)[None, :] * stride_kn + dims[:, None] * stride_kd
    return tl.load(ptrs, mask=ok[None, :] & (dims[:, None] < HEAD_DIM), other=0.0)


@triton.jit
def _antidiagonal_scores(q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd,
                         groups, rows_ok, key_groups, query_start, num_queries, num_keys,
                         STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_KG: tl.constexpr, IEEE: tl.constexpr,
                         UPCAST: tl.constexpr):
    """(BLOCK_G, BLOCK_KG) unscaled antidiagonal sums, fp32 accumulation.

    ``sum_u Q_u K_u`` with ``Q_u`` row ``u`` of every query group and ``K_u`` row
    ``S-1-u`` of every key group: ``S`` dots of depth ``D`` instead of one of depth
    ``S*D``, so only one ``D``-wide slice of each group is live at a time.
    """
    scores = tl.zeros((BLOCK_G, BLOCK_KG), dtype=tl.float32)
    for u in range(STRIDE):
        q_rows = _query_rows(q_head, stride_qn, stride_qd, groups, rows_ok, u, query_start,
                             num_queries, STRIDE, HEAD_DIM, D_PAD)
        k_rows = _key_rows_reversed(k_head, stride_kn, stride_kd, key_groups, u, num_keys,
                                    STRIDE, HEAD_DIM, D_PAD)
        if UPCAST:
            # Exact: products of 16-bit floats are exact in fp32, as in a 16-bit dot.
            q_rows = q_rows.to(tl.float32)
            k_rows = k_rows.to(tl.float32)
        if IEEE:
            scores = tl.dot(q_rows, k_rows, scores, input_precision="ieee")
        else:
            scores = tl.dot(q_rows, k_rows, scores)
    return scores


@triton.jit
def _antidiagonal_tile_kernel(
    Q, K, OUT, NONFINITE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_obh, stride_orow, stride_osub, stride_otile,
    num_batch_heads, num_q_heads, group, num_queries, num_keys, query_start,
    first_query_tile, num_query_tiles, num_key_tiles, num_key_groups, groups_per_tile,
    subs_per_tile, qk_scale,
    CAUSAL: tl.constexpr, STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_KG: tl.constexpr, TILES_PER_CHUNK: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, CHECK: tl.constexpr,
):
    """Unnormalised tile probabilities of ``BLOCK_G`` query groups of one query tile.

    Fuses the reference ``antidiagonal_probabilities`` stages: the zero-filled
    absolute grid, the group scores, the masked softmax per query group and the
    sum of group probabilities into (query tile, key tile) pairs. Writes
    ``OUT[bh, row, sub, :]``; the caller sums ``sub`` and renormalises. With
    ``CHECK`` a NaN/Inf in q or k sets ``NONFINITE``
    (:func:`~prism.optimized.antidiagonal_packed.masked_scores`).
    """
    # Program -> (query tile, batch*head, sub-block); the last (heaviest causal)
    # query tiles first.
    pid = tl.program_id(0)
    per_row = num_batch_heads * subs_per_tile
    row = num_query_tiles - 1 - pid // per_row
    rest = pid % per_row
    bh = rest // subs_per_tile
    sub = rest % subs_per_tile
    b = bh // num_q_heads
    h = bh % num_q_heads
    # GQA: query head h reads KV head h // group; K is never repeated.
    hk = h // group
    q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_head = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh

    # This program's query groups, as absolute group indices.
    tile_abs = first_query_tile + row
    local = sub * BLOCK_G + tl.arange(0, BLOCK_G)
    groups = tile_abs * groups_per_tile + local
    # Groups holding no real query (prefix padding, tail padding) contribute nothing.
    first_valid = query_start // STRIDE
    last_valid = (query_start + num_queries - 1) // STRIDE
    rows_ok = (local < groups_per_tile) & (groups >= first_valid) & (groups <= last_valid)
    # Key groups [0, key_end) are the only ones any row may see.
    key_end = num_key_groups
    if CAUSAL:
        key_end = tl.minimum(key_end, tl.max(tl.where(rows_ok, groups, -1), axis=0) + 1)
    else:
        key_end = tl.where(tl.max(rows_ok.to(tl.int32), axis=0) > 0, key_end, 0)

    # Pass 1: per query group, max m and sum l of 2^(a * qk_scale - m) over the
    # admissible key groups (online softmax, base 2, scale folded into qk_scale).
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    for key_start in range(0, key_end, BLOCK_KG):
        key_groups = key_start + tl.arange(0, BLOCK_KG)
        s = _antidiagonal_scores(q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd,
                                 groups, rows_ok, key_groups, query_start, num_queries,
                                 num_keys, STRIDE, HEAD_DIM, D_PAD, BLOCK_G, BLOCK_KG, IEEE,
                                 UPCAST)
        allowed = (key_groups < key_end)[None, :] & rows_ok[:, None]
        if CAUSAL:
            allowed = allowed & (key_groups[None, :] <= groups[:, None])
        m_i, l_i = online_softmax_step(m_i, l_i, masked_scores(s, allowed, qk_scale, CHECK))
    if CHECK:
        _flag_if_nonfinite(l_i, NONFINITE)

    # Pass 2: probabilities 2^(a * qk_scale - m) / l, summed over this program's
    # query groups (axis 0) and then over the key groups of each key tile.
    m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(rows_ok & (l_i > 0), 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    out_row = (OUT + bh.to(tl.int64) * stride_obh + row.to(tl.int64) * stride_orow
               + sub.to(tl.int64) * stride_osub)
    chunk_groups = TILES_PER_CHUNK * groups_per_tile
    tile_end = tl.cdiv(key_end, groups_per_tile)
    chunk_tiles = tl.arange(0, TILES_PER_CHUNK)
    for tile_start in range(0, tile_end, TILES_PER_CHUNK):
        # Chunks start on a tile boundary, so every key tile's sum is finished
        # inside one chunk and stored once (no read-modify-write).
        tile_sums = tl.zeros((TILES_PER_CHUNK,), dtype=tl.float32)
        group_start = tile_start * groups_per_tile
        chunk_end = tl.minimum(chunk_groups, key_end - group_start)
        for offset in range(0, chunk_end, BLOCK_KG):
            in_chunk = offset + tl.arange(0, BLOCK_KG)
            key_groups = group_start + in_chunk
            s = _antidiagonal_scores(q_head, k_head, stride_qn, stride_qd, stride_kn,
                                     stride_kd, groups, rows_ok, key_groups, query_start,
                                     num_queries, num_keys, STRIDE, HEAD_DIM, D_PAD, BLOCK_G,
                                     BLOCK_KG, IEEE, UPCAST)
            allowed = (in_chunk < chunk_end)[None, :] & rows_ok[:, None]
            if CAUSAL:
                allowed = allowed & (key_groups[None, :] <= groups[:, None])
            s = tl.where(allowed, s * qk_scale, float("-inf"))
            p = tl.math.exp2(s - m_shift[:, None])
            column_mass = tl.sum(p * inv_l[:, None], axis=0)
            # One-hot (key group -> tile of this chunk) reduction.
            hit = (in_chunk // groups_per_tile)[:, None] == chunk_tiles[None, :]
            tile_sums += tl.sum(tl.where(hit, column_mass[:, None], 0.0), axis=0)
        tiles = tile_start + chunk_tiles
        tl.store(out_row + tiles.to(tl.int64) * stride_otile, tile_sums,
                 mask=tiles < num_key_tiles)


def _validate(q, k, layout, stride, causal, name: str = "stride",
              example: str = "8 or 16") -> None:
    """Argument checks of :func:`antidiagonal_tile_probabilities` (clear errors, contract
    §8); ``name`` and ``example`` word them for another per-tile divisor (the sampled
    queries of :mod:`prism.optimized.candidate_sampled`)."""
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise TypeError(f"{name} must be an int, got {type(stride).__name__} {stride!r}")
    validate_stage_inputs(q, k, layout, causal)
    if stride < 1 or layout.block_size % stride:
        raise ValueError(f"{name} must be >= 1 and divide layout.block_size "
                         f"({layout.block_size}), got {stride}; use e.g. {example}")


def antidiagonal_tile_probabilities(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                                    stride: int, causal: bool = True) -> torch.Tensor:
    """Tile probabilities from strided antidiagonal scores, by a Triton kernel.

    Same result as :func:`prism.reference.estimators.antidiagonal_probabilities`
    (docs/estimators.rst, "antidiagonal"), up to fp32 rounding. The kernel fuses that
    function's zero-filled grid, group scores, masked softmax and tile sums in
    two passes per query group, never materialising the group score matrix;
    query head ``h`` reads KV head ``h // (Hq // Hkv)``.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
        fp32, fp16 or bf16, any strides; on CUDA, or on the CPU when Triton runs
        in its interpreter (``TRITON_INTERPRET=1``).
    k : Tensor (B, Hkv, Nk, D)
        Same dtype and device as ``q``; ``Hq % Hkv == 0``.
    layout : TileLayout
        ``prism.reference.tile_layout(Nq, Nk, block_size, causal)``.
    stride : int
        Rows per group ``S``; must divide ``layout.block_size``.
    causal : bool

    Returns
    -------
    Tensor (B, Hq, nq, nk), float32
        Zero outside the admissible tiles; each row with an admissible tile
        sums to 1; rows without one are zero.

    Raises
    ------
    ValueError, TypeError
        On shapes, dtypes, a layout that does not match the inputs, a stride
        that does not divide the tile, or tensors Triton cannot run on.
    """
    _validate(q, k, layout, stride, causal)
    check_device(_antidiagonal_tile_kernel, q=q, k=k)
    return antidiagonal_tile_scores(q, k, layout, stride, causal, normalize=True)


def antidiagonal_tile_scores(q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
                             stride: int, causal: bool, *, normalize: bool,
                             nonfinite: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`antidiagonal_tile_probabilities` on validated inputs.

    ``normalize=False`` returns the rows before their division by their sums,
    defined at the admissible tiles only (the selection's last kernel,
    :func:`prism.optimized.tile_union.union_tiles`, divides). ``nonfinite`` (a
    float64 device flag) is set when q or k holds NaN/Inf.
    """
    if antidiagonal_packed_applies(layout, stride):
        # The query heads of a GQA group in one program (prism.optimized.antidiagonal_packed).
        return antidiagonal_packed_probabilities(q, k, layout, stride, causal,
                                                 normalize=normalize, nonfinite=nonfinite)
    b, hq, nq_tokens, d = q.shape
    hkv, nk_tokens = k.shape[1], k.shape[2]
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    if b * hq * nq * nk == 0:
        return torch.zeros(b, hq, nq, nk, dtype=torch.float32, device=q.device)

    per_tile = layout.block_size // stride
    block_g = min(MAX_BLOCK_QUERY_GROUPS, max(_MIN_DOT, next_power_of_2(per_tile)))
    subs = -(-per_tile // block_g)
    block_kg = BLOCK_KEY_GROUPS
    # Whole key tiles per chunk of pass 2, a power of two; 1 when a tile holds
    # more key groups than one block (the chunk then loops over blocks).
    tiles_per_chunk = 1 << max(0, (block_kg // per_tile).bit_length() - 1)
    d_pad = max(_MIN_DOT, next_power_of_2(d))
    # Triton 3.6's interpreter gets bf16 tl.dot wrong (garbage products), so there
    # bf16 tiles are widened to fp32 first; the GPU takes the 16-bit dot.
    upcast = q.dtype == torch.bfloat16 and kernels_interpreted(_antidiagonal_tile_kernel)
    partial = torch.zeros(b * hq, nq, subs, nk, dtype=torch.float32, device=q.device)
    grid = (nq * b * hq * subs,)
    launch(
        _antidiagonal_tile_kernel, grid, q, k, partial,
        nonfinite if nonfinite is not None else partial,
        *q.stride(), *k.stride(), *partial.stride(),
        b * hq, hq, hq // hkv, nq_tokens, nk_tokens, layout.query_start,
        layout.first_query_tile, nq, nk, -(-nk_tokens // stride), per_tile, subs,
        math.log2(math.e) / (math.sqrt(d) * stride),
        CAUSAL=causal, STRIDE=stride, HEAD_DIM=d, D_PAD=d_pad, BLOCK_G=block_g,
        BLOCK_KG=block_kg, TILES_PER_CHUNK=tiles_per_chunk,
        IEEE=q.dtype == torch.float32 or upcast, UPCAST=upcast, CHECK=nonfinite is not None,
        num_warps=8 if d_pad >= 256 else 4,
    )
    tiles = partial.sum(dim=2).view(b, hq, nq, nk)
    if not normalize:
        return tiles
    # Renormalise each query tile's row (its query groups' probabilities sum to
    # the number of real groups in it); rows with no admissible tile stay 0.
    return tiles.div_(tiles.sum(dim=-1, keepdim=True).clamp_min_(1e-30))


#: Widest row of key tiles the top-p kernel keeps in registers; wider rows take
#: the reference's sort.
MAX_TOP_P_WIDTH = MAX_UNION_WIDTH


def tile_top_p_kernel(probs: torch.Tensor, layout: TileLayout, causal: bool,
                      threshold: float) -> torch.Tensor:
    """:func:`prism.reference.registry.top_p_tiles` by a Triton kernel.

    Same signature and result (up to fp32 summation order at the top-p
    boundary): contract §6's top-p with the index tie-break over each row of
    admissible tiles, never keeping a zero-probability tile, without sorting
    (the top-p of :func:`prism.optimized.tile_union.union_tiles`). Rows wider
    than :data:`MAX_TOP_P_WIDTH` tiles run the reference.

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool
    """
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    if probs.dim() != 4 or probs.shape[2:] != (nq, nk):
        raise ValueError(f"probs must be (B, Hq, {nq}, {nk}) for this layout, got "
                         f"{tuple(probs.shape)}")
    if nk > MAX_TOP_P_WIDTH or probs.numel() == 0:
        return top_p_tiles(probs, layout, causal, threshold)
    check_device(_antidiagonal_tile_kernel, probs=probs)
    return union_tiles(layout, causal, probs.shape[:2], probs=probs.float().contiguous(),
                       threshold=threshold)[0]


#: Registry stage name -> the Triton kernel that computes it (same signature and
#: result as the reference stage of ``prism.reference.registry.REFERENCE_STAGES``).
KERNEL_STAGES = {
    "antidiagonal": antidiagonal_tile_probabilities,
    "sampled": sampled_tile_probabilities,
    "vertical_slash": vertical_slash_tile_mask,
    "tile_top_p": tile_top_p_kernel,
    "prism_candidates": prism_candidate_tiles_kernel,
    "candidate_antidiagonal": candidate_antidiagonal_tile_probabilities,
    "candidate_sampled": candidate_sampled_tile_probabilities,
    "last_tile_exact": last_tile_exact_kernel,
}


def estimator_select_blocks(q: torch.Tensor, k: torch.Tensor, cfg, causal: bool) -> torch.Tensor:
    """The mask of ``cfg.estimator`` on validated CUDA (or interpreted) inputs.

    :func:`prism.optimized.estimator_path.estimator_select` without the
    indices and the NaN/Inf flag; equals :func:`prism.reference.select_blocks`
    up to top-p boundary ties.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    cfg : PrismConfig
    causal : bool

    Returns
    -------
    Tensor (B, Hq, nq, nk), bool
    """
    from .estimator_path import estimator_select

    layout = tile_layout(q.shape[2], k.shape[2], cfg.block_size, causal)
    return estimator_select(q, k, None, cfg, causal, layout, write_indices=False)[0]


__all__ = ["antidiagonal_tile_probabilities", "antidiagonal_tile_scores",
           "estimator_select_blocks", "KERNEL_STAGES", "tile_top_p_kernel", "MAX_TOP_P_WIDTH",
           "BLOCK_KEY_GROUPS", "MAX_BLOCK_QUERY_GROUPS"]
