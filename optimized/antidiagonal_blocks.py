"""One key block's work in the packed antidiagonal kernel (:mod:`.antidiagonal_packed`).

The ``@triton.jit`` helpers its kernel calls: the ``u`` products of a block and
their masks, the online-softmax step and the one-pass scratch, the candidate
list and mask, and the stores of a block's tile sums. :func:`online_softmax_step`
and :func:`masked_scores` also serve the other estimator kernels' first passes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(m_i, l_i, s):
    """One block of the online softmax statistics, base 2: the new running max and sum.

    ``s`` (rows, cols) holds scaled scores, -inf where not admissible; ``m_i`` and
    ``l_i`` the running max and the sum of ``2^(s - m_i)``. A row with nothing
    admissible yet keeps ``m = -inf`` and ``l = 0`` (it is shifted by 0, never by
    -inf). Shared by every estimator kernel's first pass.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_new = l_i * tl.math.exp2(m_i - m_shift) + tl.sum(tl.math.exp2(s - m_shift[:, None]), 1)
    return m_new, l_new


@triton.jit
def _program_heads(pid, programs_per_head, group, heads, num_kv_heads):
    """``(block, bh, b, hk, head0)`` of program ``pid`` of a launch over (batch, KV head,
    which ``heads`` of its GQA group, query-tile block): the block (heaviest, i.e.
    last, query tiles first), the (batch, KV head) index, its parts and the
    program's first query head."""
    block = programs_per_head - 1 - pid % programs_per_head
    bh_part = pid // programs_per_head
    parts = group // heads
    bh = bh_part // parts
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    return block, bh, b, hk, hk * group + (bh_part % parts) * heads


@triton.jit
def _extent_sum(n, a, t, T: tl.constexpr, kb):
    """``sum_{j < n} min(kb, cdiv(a + (j + 1) * t, T))`` in closed form (int64): the key
    blocks of one-pass scratch the first ``n`` query-tile blocks of a causal launch
    need, block ``j`` holding query tiles up to ``a + (j + 1) * t`` (absolute) and
    ``T`` tiles a key block; one of ``t`` and ``T`` divides the other (the caller
    checks). The launcher sizes the buffer with the same closed form on the host
    (:func:`~prism.optimized.antidiagonal_shapes.extent_sum`); tests/test_packed_scratch.py
    checks both against the sum taken term by term."""
    # Blocks below the cap kb: a + (j + 1) t <= (kb - 1) T.
    room = (kb - 1) * T - a
    capped_from = tl.minimum(n, tl.where(room > 0, room, 0) // t)
    x0 = a + t + T - 1  # cdiv(a + (j + 1) t, T) = floor((x0 + j t) / T)
    m = capped_from
    if t >= T:
        linear = (x0 // T) * m + (t // T) * (m * (m - 1) // 2)
    else:
        # floor((x0 + j t) / T) = floor((y + j) / r) with y = floor(x0 / t), r = T / t;
        # sum_{i < x} floor(i / r) = r q (q - 1) / 2 + q (x mod r), q = x // r.
        r = T // t
        y = x0 // t
        hi = y + m
        q_hi = hi // r
        q_lo = y // r
        linear = (r * q_hi * (q_hi - 1) // 2 + q_hi * (hi - q_hi * r)
                  - r * q_lo * (q_lo - 1) // 2 - q_lo * (y - q_lo * r))
    return linear + (n - capped_from) * kb


@triton.jit
def _scratch_rows(pid, programs_per_head, block, first_query_tile, tiles_per_program,
                  scratch_blocks, EXTENTS: tl.constexpr, TILES_PER_CHUNK: tl.constexpr):
    """``(start, blocks)``: where program ``pid``'s one-pass scratch starts, in key blocks
    of every row of ROWS (int64), and how many key blocks a row of it holds. With
    ``EXTENTS`` (a causal call, ``antidiagonal_shapes.causal_extents``) a program needs
    only the key blocks up to its last query tile, so the programs of a (batch, head
    part) share the sum of their own extents, laid out in ``pid`` order (the heaviest
    block first); otherwise, or where the tiles per program and per key block do not
    divide one another, every program holds ``scratch_blocks`` (as
    :func:`~prism.optimized.antidiagonal_shapes.scratch_extents` sizes it)."""
    kb = scratch_blocks.to(tl.int64)
    t = tiles_per_program.to(tl.int64)
    start = pid.to(tl.int64) * kb
    mine = kb
    if EXTENTS:
        if (t % TILES_PER_CHUNK == 0) or (TILES_PER_CHUNK % t == 0):
            a = first_query_tile.to(tl.int64)
            n = programs_per_head.to(tl.int64)
            j = block.to(tl.int64)
            total = _extent_sum(n, a, t, TILES_PER_CHUNK, kb)
            start = ((pid // programs_per_head).to(tl.int64) * total
                     + total - _extent_sum(j + 1, a, t, TILES_PER_CHUNK, kb))
            mine = tl.minimum(kb, (a + (j + 1) * t + TILES_PER_CHUNK - 1) // TILES_PER_CHUNK)
    return start, mine


@triton.jit
def masked_scores(raw, allowed, qk_scale, CHECK: tl.constexpr):
    """``raw * qk_scale`` where ``allowed``, else -inf; with ``CHECK``, NaN wherever
    ``raw`` is NaN or +-Inf, allowed or not.

    The estimator kernels find NaN/Inf input without a pass of their own: a
    NaN/Inf in a row of q or k makes every score it enters non-finite (Inf * 0
    is NaN too, so zero-padded rows and masked keys count), a NaN in a block
    makes its row's online-softmax sum NaN, and each program flags its sums
    once at the end (pooling's ``_flag_if_nonfinite``). Finite scores are
    unchanged (``raw - raw`` is 0).
    """
    scaled = tl.where(allowed, raw * qk_scale, float("-inf"))
    if CHECK:
        scaled = scaled + (raw - raw)
    return scaled


@triton.jit
def _u_loads(u, q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd, groups, rows_ok,
             key_groups, query_start, num_queries, num_keys, q_desc, k_desc, q_head_row,
             q_group, k_head_row, key_groups_start, STRIDE: tl.constexpr, D_PAD: tl.constexpr,
             HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_KG: tl.constexpr,
             UPCAST: tl.constexpr, TMA: tl.constexpr, GATHER: tl.constexpr = False, part=0,
             D_SPLIT: tl.constexpr = 1):
    """The operands of :func:`_u_product`: row ``u`` of every query group (ROWS, D part)
    and row ``S-1-u`` of every key group, transposed (D part, BLOCK_KG)."""
    D_PART: tl.constexpr = D_PAD // D_SPLIT
    dims = part * D_PART + tl.arange(0, D_PART)
    dims_ok = dims < HEAD_DIM
    if TMA:
        # Rows of every head of the group at once: (GROUP, ROWS / GROUP, D_PART) boxes
        # of q seen as (heads, groups, S * D).
        q_rows = tl.reshape(q_desc.load([q_head_row, q_group, u * HEAD_DIM + part * D_PART]),
                            (ROWS, D_PART))
    else:
        positions = groups * STRIDE + u - query_start
        ok = rows_ok & (positions >= 0) & (positions < num_queries)
        q_rows = tl.load(q_head[:, None] + positions.to(tl.int64)[:, None] * stride_qn
                         + dims[None, :] * stride_qd,
                         mask=ok[:, None] & dims_ok[None, :], other=0.0)
    if TMA and not GATHER:
        # Key groups past Nk come back as zeros.
        k_cols = tl.trans(tl.reshape(
            k_desc.load([k_head_row, key_groups_start,
                         (STRIDE - 1 - u) * HEAD_DIM + part * D_PART]),
            (BLOCK_KG, D_PART)))
    else:
        keys = key_groups * STRIDE + (STRIDE - 1 - u)
        k_cols = tl.load(k_head + keys.to(tl.int64)[None, :] * stride_kn
                         + dims[:, None] * stride_kd,
                         mask=(keys < num_keys)[None, :] & dims_ok[:, None], other=0.0)
    if UPCAST:
        q_rows = q_rows.to(tl.float32)
        k_cols = k_cols.to(tl.float32)
    return q_rows, k_cols


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` (fp32), exact fp32 products with ``IEEE``."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _u_product(s, u, q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd, groups,
               rows_ok, key_groups, query_start, num_queries, num_keys, q_desc, k_desc,
               q_head_row, q_group, k_head_row, key_groups_start, STRIDE: tl.constexpr,
               D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_KG: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
               TMA: tl.constexpr, GATHER: tl.constexpr = False, part=0,
               D_SPLIT: tl.constexpr = 1):
    """``s + Q_u K_{S-1-u}^T``: row ``u`` of every query group (``q_head[r]`` is row
    ``r``'s query head) against row ``S-1-u`` of every key group, one product of depth
    ``D`` (with ``D_SPLIT > 1``, of depth ``D_PAD / D_SPLIT``: head dims ``part`` of
    that many equal pieces). With ``TMA`` the rows come through the descriptors (box
    origins ``q_head_row, q_group`` and ``k_head_row, key_groups_start``) instead of
    pointer loads; with ``GATHER`` the key groups need not be consecutive
    (:func:`_gathered_key_groups`) and the keys always come by pointer loads."""
    q_rows, k_cols = _u_loads(u, q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd,
                              groups, rows_ok, key_groups, query_start, num_queries, num_keys,
                              q_desc, k_desc, q_head_row, q_group, k_head_row,
                              key_groups_start, STRIDE, D_PAD, HEAD_DIM, ROWS, BLOCK_KG,
                              UPCAST, TMA, GATHER, part, D_SPLIT)
    return _dot(q_rows, k_cols, s, IEEE)


@triton.jit
def _admissible_scores(s, groups, rows_ok, key_groups, key_end, qk_scale, CAUSAL: tl.constexpr,
                       CHECK: tl.constexpr, cand=None, CANDIDATES: tl.constexpr = False):
    """The block's summed products times ``qk_scale``, -inf where not admissible. With
    ``CANDIDATES``, ``cand`` (ROWS, BLOCK_KG) bool restricts each row to its candidate
    key groups (:func:`_candidate_block`)."""
    allowed = (key_groups < key_end)[None, :] & rows_ok[:, None]
    if CAUSAL:
        allowed = allowed & (key_groups[None, :] <= groups[:, None])
    if CANDIDATES:
        allowed = allowed & cand
    return masked_scores(s, allowed, qk_scale, CHECK)


@triton.jit
def _raw_scores(q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd, groups, rows_ok,
                key_groups, query_start, num_queries, num_keys, q_desc, k_desc, q_head_row,
                q_group, k_head_row, key_groups_start, STRIDE: tl.constexpr,
                D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_KG: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                TMA: tl.constexpr, GATHER: tl.constexpr = False, D_SPLIT: tl.constexpr = 1):
    """(ROWS, BLOCK_KG) antidiagonal products of one key block, unscaled and unmasked:
    ``sum_u Q_u K_{S-1-u}^T`` (:func:`_u_product`), each product in ``D_SPLIT``
    pieces of the head dim, one pipelined loop step each (so a step's loads are
    those of a ``D_PAD / D_SPLIT``-wide product)."""
    s = tl.zeros((ROWS, BLOCK_KG), dtype=tl.float32)
    for step in range(STRIDE * D_SPLIT):
        s = _u_product(s, step // D_SPLIT, q_head, k_head, stride_qn, stride_qd, stride_kn,
                       stride_kd, groups, rows_ok, key_groups, query_start, num_queries,
                       num_keys, q_desc, k_desc, q_head_row, q_group, k_head_row,
                       key_groups_start, STRIDE, D_PAD, HEAD_DIM, ROWS, BLOCK_KG, IEEE, UPCAST,
                       TMA, GATHER, step % D_SPLIT, D_SPLIT)
    return s


@triton.jit
def _scaled_scores(q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd, groups, rows_ok,
                   key_groups, key_end, query_start, num_queries, num_keys, qk_scale,
                   q_desc, k_desc, q_head_row, q_group, k_head_row, key_groups_start,
                   CAUSAL: tl.constexpr, STRIDE: tl.constexpr, D_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_KG: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr, CHECK: tl.constexpr,
                   TMA: tl.constexpr, cand=None, CANDIDATES: tl.constexpr = False,
                   GATHER: tl.constexpr = False, D_SPLIT: tl.constexpr = 1):
    """(ROWS, BLOCK_KG) antidiagonal scores of one key block: :func:`_raw_scores`, then
    :func:`_admissible_scores`."""
    s = _raw_scores(q_head, k_head, stride_qn, stride_qd, stride_kn, stride_kd, groups, rows_ok,
                    key_groups, query_start, num_queries, num_keys, q_desc, k_desc, q_head_row,
                    q_group, k_head_row, key_groups_start, STRIDE, D_PAD, HEAD_DIM, ROWS,
                    BLOCK_KG, IEEE, UPCAST, TMA, GATHER, D_SPLIT)
    return _admissible_scores(s, groups, rows_ok, key_groups, key_end, qk_scale, CAUSAL, CHECK,
                              cand, CANDIDATES)


@triton.jit
def _first_pass_step(m_i, l_i, bad, raw, full, groups, rows_ok, key_groups, key_end, qk_scale,
                     e_rows, mb_rows, key_start, chunk_tiles, CAUSAL: tl.constexpr,
                     CHECK: tl.constexpr, ROWS: tl.constexpr, BLOCK_KG: tl.constexpr,
                     PER_TILE: tl.constexpr, ONE_PASS: tl.constexpr, cand=None,
                     CANDIDATES: tl.constexpr = False):
    """Pass 1 on one key block of raw products: the online softmax statistics and, with
    ``ONE_PASS``, the block's per-tile sums of ``2^(s - m_block)`` and ``m_block`` into
    the scratch. Returns the new running max, sum and ``bad``.

    The same statistics as scaling and masking the scores first
    (:func:`_admissible_scores`), in fewer instructions per score (the block's
    softmax work runs while the tensor cores wait):

    - ``full`` (no candidate mask, and every key group of the block admissible for
      every real row) skips the masks;
    - the scale is folded into the exponent (``2^(raw * c - m)`` with ``m`` the scaled
      running max: ``max(raw) * c`` is ``max(raw * c)`` exactly, as ``c > 0``);
    - each row's sum is the sum of its per-tile sums, not a second pass over the
      scores;
    - with ``CHECK``, a full block adds ``sum(raw) * 0`` to ``bad`` (NaN when a score
      is NaN or +-Inf) instead of ``raw - raw`` per score; a masked block keeps
      :func:`masked_scores`' per-score form.
    """
    TILES_PER_CHUNK: tl.constexpr = BLOCK_KG // PER_TILE
    if full:
        s = raw
        if CHECK:
            bad += tl.sum(raw, axis=1) * 0.0
    else:
        allowed = (key_groups < key_end)[None, :] & rows_ok[:, None]
        if CAUSAL:
            allowed = allowed & (key_groups[None, :] <= groups[:, None])
        if CANDIDATES:
            allowed = allowed & cand
        s = masked_scores(raw, allowed, 1.0, CHECK)
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_shift[:, None])
    e = tl.sum(tl.reshape(p, (ROWS, TILES_PER_CHUNK, PER_TILE)), axis=2)
    l_new = l_i * tl.math.exp2(m_i - m_shift) + tl.sum(e, axis=1)
    if ONE_PASS:
        tl.store(e_rows + (key_start // PER_TILE + chunk_tiles)[None, :], e)
        tl.store(mb_rows + key_start // BLOCK_KG, m_shift)
    return m_new, l_new, bad


@triton.jit
def _candidate_block(cand_rows, rows_ok, key_groups, num_key_tiles, stride_ck,
                     PER_TILE: tl.constexpr):
    """(ROWS, BLOCK_KG) bool: key group ``c`` lies in a candidate key tile of row ``r``'s
    (query head, query tile); rows holding no real query have none."""
    key_tiles = key_groups // PER_TILE
    return tl.load(cand_rows[:, None] + key_tiles.to(tl.int64)[None, :] * stride_ck,
                   mask=rows_ok[:, None] & (key_tiles < num_key_tiles)[None, :],
                   other=0) != 0


@triton.jit
def _one_pass_sums(e_rows, key_start, chunk_tiles, m_block, m_shift, inv_l,
                   PER_TILE: tl.constexpr):
    """Pass 2 of the one-pass form on one key block: the scratch's per-tile sums of
    ``2^(s - m_block)`` rescaled to probabilities; a sum of 0 (nothing admissible yet)
    stays 0 whatever ``m_block``."""
    e = tl.load(e_rows + (key_start // PER_TILE + chunk_tiles)[None, :])
    return tl.where(e > 0, e * (tl.math.exp2(m_block - m_shift) * inv_l)[:, None], 0.0)


@triton.jit
def _tile_sums(s, m_shift, inv_l, ROWS: tl.constexpr, BLOCK_KG: tl.constexpr,
               PER_TILE: tl.constexpr):
    """Pass 2 on one key block: the normalised scores summed into key tiles (exact fp32
    sums), (ROWS, BLOCK_KG // PER_TILE)."""
    p = tl.math.exp2(s - m_shift[:, None]) * inv_l[:, None]
    return tl.sum(tl.reshape(p, (ROWS, BLOCK_KG // PER_TILE, PER_TILE)), axis=2)


@triton.jit
def _store_pair_sums(out_rows, pair_ok, by_tile, tiles, num_key_tiles, stride_otile,
                     PAIRS: tl.constexpr, PER_TILE: tl.constexpr,
                     TILES_PER_CHUNK: tl.constexpr):
    """One key block's per-row tile sums ``by_tile`` summed over each (head, query
    tile) pair's rows and stored at the key tiles ``tiles`` (TILES_PER_CHUNK,) (past
    the last tile: not stored)."""
    by_pair = tl.sum(tl.reshape(by_tile, (PAIRS, PER_TILE, TILES_PER_CHUNK)), axis=1)
    tl.store(out_rows + tiles.to(tl.int64)[None, :] * stride_otile, by_pair,
             mask=pair_ok[:, None] & (tiles < num_key_tiles)[None, :])


@triton.jit
def _candidate_tiles(cand_pairs, pair_ok, scan_end, stride_ck, LIST, out_rows, stride_otile,
                     PAIRS: tl.constexpr, SCAN_TILES: tl.constexpr,
                     STORE_ZEROS: tl.constexpr = True, out_rows2=None,
                     SECOND: tl.constexpr = False):
    """The key tiles of ``[0, scan_end)`` in which some (head, query tile) pair of the
    program has a candidate, ascending, written to ``LIST``; returns how many. With
    ``STORE_ZEROS`` every other tile of that range gets a zero in each pair's output
    row here (the listed ones are stored by the second pass); with ``SECOND`` also in
    ``out_rows2``."""
    count = 0
    scan = tl.arange(0, SCAN_TILES)
    zeros = tl.zeros((PAIRS, SCAN_TILES), dtype=tl.float32)
    for t0 in range(0, scan_end, SCAN_TILES):
        tiles = t0 + scan
        in_range = tiles < scan_end
        hit = tl.load(cand_pairs[:, None] + tiles.to(tl.int64)[None, :] * stride_ck,
                      mask=pair_ok[:, None] & in_range[None, :], other=0) != 0
        active = (tl.max(hit.to(tl.int32), axis=0) > 0) & in_range
        taken = active.to(tl.int32)
        slot = count + tl.cumsum(taken, axis=0) - taken
        tl.store(LIST + slot, tiles, mask=active)
        if STORE_ZEROS:
            tl.store(out_rows + tiles.to(tl.int64)[None, :] * stride_otile, zeros,
                     mask=pair_ok[:, None] & (in_range & ~active)[None, :])
        if SECOND:
            tl.store(out_rows2 + tiles.to(tl.int64)[None, :] * stride_otile, zeros,
                     mask=pair_ok[:, None] & (in_range & ~active)[None, :])
        count += tl.sum(taken, axis=0)
    return count


@triton.jit
def _listed_tiles(LIST, first, count, num_key_tiles, WIDTH: tl.constexpr):
    """(WIDTH,) entries ``first ..`` of a program's tile list; past ``count``,
    ``num_key_tiles`` (a tile past every key, so masked everywhere)."""
    slots = first + tl.arange(0, WIDTH)
    return tl.load(LIST + slots, mask=slots < count, other=num_key_tiles)


@triton.jit
def _gathered_key_groups(LIST, first, count, num_key_tiles, BLOCK_KG: tl.constexpr,
                         PER_TILE: tl.constexpr):
    """(BLOCK_KG,) key groups of the ``BLOCK_KG // PER_TILE`` listed tiles from entry
    ``first`` on, each tile's groups in order; entries past ``count`` give groups of
    tile ``num_key_tiles``, at or past ``num_key_groups``: every mask drops them and
    their keys load as zeros."""
    cols = tl.arange(0, BLOCK_KG)
    slots = first + cols // PER_TILE
    tiles = tl.load(LIST + slots, mask=slots < count, other=num_key_tiles)
    return tiles * PER_TILE + cols % PER_TILE


__all__ = ["masked_scores", "online_softmax_step"]
