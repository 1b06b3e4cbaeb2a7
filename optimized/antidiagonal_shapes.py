"""Launch shapes of the packed antidiagonal kernel (:mod:`prism.optimized.antidiagonal_packed`).

The tuned shapes by groups per tile (:data:`TUNED`, and :data:`CANDIDATE_TUNED`
for the cascade's candidate-restricted calls), how a GQA group too large for
one program is split (:func:`fitting_heads`), which shapes the kernel takes
(:func:`antidiagonal_packed_applies`), and a call's program shape and form
(one pass or two; with the cascade's sampled stage or not,
:func:`fused_sampled_applies`). :mod:`~prism.optimized.antidiagonal_packed`
re-exports these names; the tables are the same objects, so changing an
entry there changes it here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from prism.reference.tiles import TileLayout

from ._runtime import next_power_of_2

BLOCK_KEY_GROUPS = 64
TARGET_ROWS = 64
MAX_ROWS = 128
_MIN_DOT = 16
#: Largest number of groups per tile for which the one-pass form applies (stride 8
#: at tile 128: the scratch is 16 times the output).
ONE_PASS_MAX_PER_TILE = 16
#: Largest one-pass scratch (bytes); a larger call takes the two-pass form. Causally
#: each program holds only the key blocks up to its last query tile
#: (:func:`scratch_extents`): at 128K tokens, 32/8 heads, tile 128 and stride 8 the
#: scratch is 1.08 GiB (2.13 GiB non-causal), at 256K 4.28 GiB (8.5 GiB non-causal,
#: which takes the two-pass form).
ONE_PASS_MAX_SCRATCH_BYTES = 8 << 30
#: Causal calls give each program scratch rows only for the key blocks up to its last
#: query tile (:func:`scratch_extents`); False: every program holds every key block
#: (the layout until 2026-12-05, kept to time one against the other). Read at each call.
CAUSAL_EXTENTS = True


@dataclass(frozen=True)
class PackedTuning:
    """Launch shape of the packed kernel.

    Attributes
    ----------
    target_rows : int
        Rows (query groups x heads of a GQA group) a program aims to hold; at
        large strides more rows reuse each loaded key block more often.
    block_kg : int
        Key groups per matrix product (a power of two, a multiple of the groups
        per tile).
    num_warps, num_stages : int
        Triton's launch parameters (``num_stages`` pipelines the loop over the
        rows ``u`` of a group).
    one_pass : int
        1: score every key block once, keep each row's per-tile sums of
        ``2^(s - m_block)`` and each block's running max ``m_block`` in a
        scratch buffer, and rescale them by ``2^(m_block - m) / l`` at the end
        instead of recomputing the scores (applies when a tile holds at most
        :data:`ONE_PASS_MAX_PER_TILE` groups; the scratch is that many times
        the output). 0: two passes over the scores.
    tma : int
        1: load the query and key rows of each ``u`` through tensor
        descriptors (the bulk tensor copy engine on Hopper) over q and k seen
        as ``(heads, groups, S * D)``, where :func:`_tma_applies` says the
        shapes allow it (contiguous q and k, lengths and the KV prefix whole
        groups and tiles, the program's rows exactly its heads' groups);
        elsewhere, and with 0, pointer loads.
    heads : int
        Query heads of a GQA group one program holds (a divisor of the group;
        tensor descriptors need a power of two; 0: the whole group).
        :func:`default_tuning` splits only groups whose rows pass
        :data:`MAX_ROWS` (:func:`fitting_heads`). With one head and descriptors
        a program's query rows are one box of consecutive groups, which the
        matrix product reads straight from shared memory (several heads' rows
        are first copied to registers for every ``u``), but on the H200 that
        measured slower for the tuned shapes (benchmarks/NOTES.md item 49 (b)).
    d_split : int
        Pieces each ``u`` product is split into along the head dim (a power of
        two; each piece is one pipelined step with its own loads), so that a
        head dim of 256 runs a shape sized for 128 with the same shared memory.
    """

    target_rows: int = TARGET_ROWS
    block_kg: int = BLOCK_KEY_GROUPS
    num_warps: int = 4
    num_stages: int = 3
    one_pass: int = 1
    tma: int = 0
    heads: int = 0
    d_split: int = 1


#: Launch shapes by groups per tile (``block_size // stride``) for head dims up to
#: ``TUNED_MAX_HEAD_DIM``. Measured on the H200 (benchmarks/results/
#: h200_estimators_e37bc51.json, ``bench_estimators.py --stages``; 32/8 heads, D 128,
#: bf16, 128K tokens): 128 rows and 128 key groups on 8 warps ran strides 32/64/128
#: in 12.3/6.8/4.2 ms against 20.4/11.5/6.7 ms for the generic 64 x 64 on 4 warps.
#: Stride 8 (16 groups per tile, one pass; h200_estimators_6f0e6ce.json): 25.2 ms
#: against 34.3 ms for the generic shape and 45.2 ms for two passes. Loads through
#: tensor descriptors (h200_estimators_4a1c52e.json): stride 8 at 8K/32K/128K
#: 0.149/1.34/21.3 ms against 0.174/1.54/24.8 ms with pointer loads, stride 32
#: 0.083/0.475/5.63 against 0.131/0.529/6.28 ms; 128 x 256 and 256 x 128 shapes (two
#: stages) were then slower at every length (before the unmasked step below).
#: Strides 64 and 128 were not timed with them.
#: Stride 16 (8 groups per tile; h200_estimators_flat_stages_f3efba6.json, 128K): 12.0
#: ms with tensor descriptors against 21.8 for the generic shape.
#: Stride 8 since the dense path's unmasked step (h200_packed_shapes_dc0c941.json): 128
#: rows x 256 key groups on two stages, 19.33 / 1.251 ms at 128K / 32K against 21.01 /
#: 1.309 for 128 x 128 on three (which no longer fit shared memory at 256); before
#: that step 128 x 256 spilled 388 bytes a thread and was slower at 32K.
#: ``bench_estimators.py --use-fastest`` overwrites entries with a run's fastest.
TUNED: dict[int, PackedTuning] = {
    per_tile: PackedTuning(target_rows=128, block_kg=128, num_warps=8, num_stages=3,
                           one_pass=1, tma=int(per_tile in (4, 8, 16)))
    for per_tile in (1, 2, 4, 8)
}
TUNED[16] = PackedTuning(target_rows=128, block_kg=256, num_warps=8, num_stages=2, one_pass=1,
                         tma=1)
#: Launch shapes of candidate-restricted calls (the cascade), by groups per tile.
#: Few key blocks of a program are scored, so small programs and blocks win
#: (h200_estimators_b14b03c.json, stride 8 at 128K: 64 x 64 with tensor descriptors
#: 0.876 ms against 1.06 for the dense calls' 128 x 128; h200_estimators_f6fb415.json,
#: stride 16: 0.801 against 0.896 for the generic shape without them, 1.13 for
#: 128 x 128; both before the candidate tiles were gathered). With them gathered
#: (h200_candidate_shapes_634b2a0.json, the preset's whole selection, graph replays at
#: 8K / 32K / 128K): 64 x 64 on 3 stages 0.136 / 0.420-0.427 / 2.208-2.215 ms; on 4
#: stages 0.137 / 0.419 / 2.184; 64 x 32 0.134 / 0.427 / 2.188 (bd9e739's run); 32 rows
#: 0.150 / 0.492 / 2.51; 8 warps 0.140 / 0.443 / 2.35.
CANDIDATE_TUNED: dict[int, PackedTuning] = {
    per_tile: PackedTuning(target_rows=64, block_kg=64, num_warps=4, num_stages=3,
                           one_pass=1, tma=1)
    for per_tile in (8, 16)
}
#: Launch shapes of candidate-restricted calls that also score the cascade's sampled
#: stage (``sampled=``), by groups per tile. The products with the samples need more
#: registers: compiled for sm_90 with the call's specialisations (ptxas, D 128, one
#: pass, tensor descriptors; tests/test_packed_launch.py) 64 rows x 32 key groups on 4
#: warps spill 8 bytes a thread (255 registers), on 8 warps none (234); 64 x 64 on 8
#: warps none (226 on 3 stages, 225 on 2); 32 x 32 on 4 warps none (255); the
#: candidate shape (64 x 64 on 4 warps) 992 bytes. Yet on the H200
#: (results/h200_sampled_fused_ba9fec0.json, the preset's whole selection, 32/8
#: heads, D 128, graph replays, masks equal) 64 x 32 on 4 warps was the fastest:
#: 0.136 / 0.458 / 2.317-2.321 ms at 8K / 32K / 128K, against 0.156 / 0.548 / 2.84
#: on 8 warps, 0.160 / 0.562 / 2.92 for 64 x 64 on 8 warps, 0.162 / 0.550 / 2.79 for
#: 32 x 32, and 0.140 / 0.469 / 2.545-2.559 for the stage's own launch beside the
#: kernel. Read at each call.
SAMPLED_TUNED: dict[int, PackedTuning] = {
    per_tile: PackedTuning(target_rows=64, block_kg=32, num_warps=4, num_stages=3,
                           one_pass=1, tma=1)
    for per_tile in (8, 16)
}
#: The tuned shapes' shared memory is sized for this head dim; larger head dims take
#: them with each ``u`` product split into pieces of this width
#: (``PackedTuning.d_split``).
TUNED_MAX_HEAD_DIM = 128


def default_tuning(per_tile: int, group: int, head_dim: int = 128,
                   candidates: bool = False, sampled: bool = False) -> PackedTuning:
    """The launch shape used unless one is passed (:data:`TUNED`, or with
    ``candidates`` :data:`CANDIDATE_TUNED`, and with ``sampled`` too
    :data:`SAMPLED_TUNED`; else a generic one)."""
    table = SAMPLED_TUNED if candidates and sampled else (
        CANDIDATE_TUNED if candidates else TUNED)
    tuned = table.get(per_tile)
    if tuned is not None:
        heads = tuned.heads if tuned.heads and group % tuned.heads == 0 else 0
        if not heads and group * per_tile > MAX_ROWS:
            # The group's rows do not fit one program: the tuned shape over as many
            # of its heads as fill that shape's rows.
            heads = fitting_heads(group, per_tile, tuned.target_rows)
        if (heads or group) * per_tile <= tuned.target_rows:
            # Head dims above TUNED_MAX_HEAD_DIM in pieces of that width.
            d_split = max(1, next_power_of_2(head_dim) // TUNED_MAX_HEAD_DIM)
            if (heads, d_split) == (tuned.heads, tuned.d_split):
                return tuned  # the common case: no new object per call
            return dataclasses.replace(tuned, heads=heads, d_split=d_split)
    if group * per_tile > MAX_ROWS:
        # The group's rows do not fit one program: split it (fitting_heads).
        return PackedTuning(target_rows=MAX_ROWS, num_warps=8,
                            heads=fitting_heads(group, per_tile))
    rows = max(_MIN_DOT, next_power_of_2(group * per_tile))
    return PackedTuning(num_warps=4 if rows <= 64 else 8)


def fitting_heads(group: int, per_tile: int, rows: int = MAX_ROWS) -> int:
    """Query heads per program for a GQA group whose rows (``group * per_tile``)
    pass :data:`MAX_ROWS`: the largest power of two dividing ``group`` whose rows
    fit ``rows`` (1 for an odd group).

    Measured on the H200 (``results/h200_large_groups_42b8c73.json``, 32 query heads
    on one KV head, graph replays, masks equal): the accurate preset's selection
    0.126 / 0.388 ms at 8K / 32K against 1.32 / 15.7 with the reference restricted
    scores in torch that ran before; E5's dense stride-8 scores 0.147 / 1.25
    against 0.619 / 9.47 for the per-head kernel (1.25-1.27 ms for 32/8 heads at
    32K, ``h200_flatten_dense_dc227d3.json``). The generic 128-row shape instead of
    the tuned ones (16 heads a program for the restricted scores, 8 for the
    dense) was slower (``h200_large_groups_{7cb18ff,2c39b58}.json``, NOTES item 49).
    """
    heads = 1
    while group % (heads * 2) == 0 and heads * 2 * per_tile <= rows:
        heads *= 2
    return heads


def antidiagonal_packed_applies(layout: TileLayout, stride: int) -> bool:
    """Whether :func:`antidiagonal_packed_probabilities` takes this shape: groups per
    tile a power of two dividing ``BLOCK_KEY_GROUPS``. Any GQA group: one whose rows
    pass :data:`MAX_ROWS` is split over programs of :func:`fitting_heads` heads."""
    per_tile = layout.block_size // stride
    return per_tile & (per_tile - 1) == 0 and BLOCK_KEY_GROUPS % per_tile == 0


def _check_tuning(tuning: PackedTuning, per_tile: int, group: int, d_pad: int) -> None:
    for name in ("target_rows", "block_kg", "num_warps", "num_stages", "one_pass", "tma",
                 "heads", "d_split"):
        value = getattr(tuning, name)
        least = 0 if name in ("one_pass", "tma", "heads") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"PackedTuning.{name} must be an int >= {least}, got {value!r}")
    if tuning.block_kg & (tuning.block_kg - 1) or tuning.block_kg % per_tile:
        raise ValueError(f"PackedTuning.block_kg must be a power of two and a multiple of the "
                         f"{per_tile} groups per tile, got {tuning.block_kg}")
    if tuning.d_split & (tuning.d_split - 1):
        raise ValueError(f"PackedTuning.d_split must be a power of two, got {tuning.d_split}")
    if d_pad // tuning.d_split < _MIN_DOT:
        raise ValueError(f"PackedTuning.d_split={tuning.d_split} leaves pieces narrower than "
                         f"{_MIN_DOT} of the padded head dim {d_pad}; use a smaller d_split")
    if tuning.heads and group % tuning.heads:
        raise ValueError(f"PackedTuning.heads must divide the GQA group of {group} query heads "
                         f"(or be 0 for all of them), got {tuning.heads}")
    heads = tuning.heads or group
    if heads * per_tile > max(MAX_ROWS, tuning.target_rows):
        raise ValueError(f"{heads} query heads x {per_tile} groups per tile do not fit "
                         f"{max(MAX_ROWS, tuning.target_rows)} rows; set PackedTuning.heads "
                         f"to fewer heads per program")


def extent_sum(n: int, a: int, t: int, tiles_per_chunk: int, key_blocks: int) -> int:
    """``sum_{j < n} min(key_blocks, cdiv(a + (j + 1) * t, tiles_per_chunk))`` in closed
    form, as the kernel's :func:`~prism.optimized.antidiagonal_blocks._extent_sum` (``t``
    and ``tiles_per_chunk`` powers of two)."""
    big_t = tiles_per_chunk
    capped_from = min(n, max(0, (key_blocks - 1) * big_t - a) // t)
    x0, m = a + t + big_t - 1, capped_from
    if t >= big_t:
        linear = (x0 // big_t) * m + (t // big_t) * (m * (m - 1) // 2)
    else:
        r, y = big_t // t, x0 // t

        def below(x):  # sum_{i < x} floor(i / r)
            q = x // r
            return r * q * (q - 1) // 2 + q * (x - q * r)

        linear = below(y + m) - below(y)
    return linear + (n - capped_from) * key_blocks


def causal_extents(causal: bool) -> bool:
    """Whether a call's scratch takes the causal extents (:data:`CAUSAL_EXTENTS`)."""
    return bool(causal) and CAUSAL_EXTENTS


def scratch_extents(programs_per_head: int, first_query_tile: int, tiles: int,
                    tiles_per_chunk: int, key_blocks: int, causal: bool) -> int:
    """Key blocks of one-pass scratch per row that one (batch, head part)'s programs hold
    together. Causally, query-tile block ``j`` reaches key tile ``first_query_tile +
    (j + 1) * tiles`` at most, so it needs ``min(key_blocks, cdiv(that,
    tiles_per_chunk))`` key blocks (:func:`extent_sum`, where ``tiles`` and
    ``tiles_per_chunk`` divide one another); otherwise each needs all ``key_blocks``.
    The kernel lays the programs out the same way
    (:func:`~prism.optimized.antidiagonal_blocks._scratch_rows`)."""
    if not causal or (tiles % tiles_per_chunk and tiles_per_chunk % tiles):
        return programs_per_head * key_blocks
    return extent_sum(programs_per_head, first_query_tile, tiles, tiles_per_chunk, key_blocks)


def _shape(q, k, layout: TileLayout, stride: int, tuning, candidates: bool, sampled: bool,
           causal: bool = True):
    """``(per_tile, d_pad, tuning, heads, tiles, rows, programs, key_blocks, extents,
    one_pass)`` of a launch (``tuning`` None: :func:`default_tuning`; checked);
    ``extents`` counts the (row, key block) slots of its one-pass scratch."""
    b, hq, _, d = q.shape
    group = hq // k.shape[1]
    per_tile = layout.block_size // stride
    d_pad = max(_MIN_DOT, next_power_of_2(d))
    if tuning is None:
        tuning = default_tuning(per_tile, group, d_pad, candidates, sampled)
    _check_tuning(tuning, per_tile, group, d_pad)
    heads = tuning.heads or group
    tiles = max(1, tuning.target_rows // (heads * per_tile))
    rows = max(_MIN_DOT, next_power_of_2(heads * per_tile * tiles))
    programs = b * k.shape[1] * (group // heads) * -(-layout.num_query_tiles // tiles)
    key_groups = -(-k.shape[2] // stride)
    key_blocks = -(-key_groups // tuning.block_kg)
    per_head = -(-layout.num_query_tiles // tiles)
    extents = (programs // max(1, per_head)) * rows * scratch_extents(
        per_head, layout.first_query_tile, tiles, tuning.block_kg // per_tile, key_blocks,
        causal_extents(causal))
    # Per row, each key block a program holds takes its tile sums and its running max.
    scratch = extents * 4 * (tuning.block_kg // per_tile + 1)
    one_pass = (bool(tuning.one_pass) and per_tile <= ONE_PASS_MAX_PER_TILE
                and scratch * (2 if sampled else 1) <= ONE_PASS_MAX_SCRATCH_BYTES)
    return per_tile, d_pad, tuning, heads, tiles, rows, programs, key_blocks, extents, one_pass


def fused_sampled_applies(q, k, layout: TileLayout, stride: int, samples: int,
                          causal: bool = True) -> bool:
    """Whether :func:`antidiagonal_packed_probabilities` with candidates can also write
    the cascade's sampled stage (``sampled=``): the samples are the query groups'
    (``samples == block_size // stride``), the packed kernel takes the shape in its
    one-pass form and the head dim fits one product (no ``D_SPLIT``)."""
    if not antidiagonal_packed_applies(layout, stride) or samples != layout.block_size // stride:
        return False
    _, _, tuning, *_, one_pass = _shape(q, k, layout, stride, None, True, True, causal)
    return one_pass and tuning.d_split == 1


__all__ = ["BLOCK_KEY_GROUPS", "CANDIDATE_TUNED", "CAUSAL_EXTENTS", "MAX_ROWS",
           "ONE_PASS_MAX_PER_TILE", "causal_extents",
           "ONE_PASS_MAX_SCRATCH_BYTES", "PackedTuning", "SAMPLED_TUNED", "TARGET_ROWS", "TUNED",
           "TUNED_MAX_HEAD_DIM", "antidiagonal_packed_applies", "default_tuning", "extent_sum",
           "fitting_heads", "fused_sampled_applies", "scratch_extents"]
