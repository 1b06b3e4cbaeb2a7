"""The block-sparse attention kernel body (contract §7); launched by :mod:`.attention`.

The module docstring of :mod:`prism.optimized.attention` describes the online
softmax this kernel runs and the positions it follows. This file holds only the
``@triton.jit`` functions, so the kernel and its launch code can change apart.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_kv(k_head, v_head, K_DESC, V_DESC, b, hk, key_base, key_start, stride_kn, stride_kd,
             stride_vn, stride_vd, num_keys, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
             DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr,
             pages, stride_kpage, stride_vpage, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """K^T (D_PAD, BLOCK_N) and V (BLOCK_N, DV_PAD) of keys [key_start, key_start + BLOCK_N).

    Keys at or past ``num_keys`` load as zeros (the caller masks their scores).
    ``key_base`` is the first key row of the sequence in a packed (varlen)
    descriptor (0 for a dense batch).

    ``PAGED``: ``k_head``/``v_head`` point at the KV head in page 0 of a
    (num_pages, PAGE_SIZE, Hkv, D) cache and ``pages`` at the sequence's row
    of the block table; key ``n`` is slot ``n % PAGE_SIZE`` of page
    ``pages[n // PAGE_SIZE]``. A block never crosses a page when PAGE_SIZE is
    a multiple of BLOCK_N (``key_start`` is a multiple of BLOCK_N), so one page
    index serves the block and its rows are contiguous: then ``USE_TMA`` may
    read it by bulk copy, the descriptors spanning the cache's rows as
    (1, Hkv, num_pages * PAGE_SIZE, D) (the host checks the page size);
    otherwise pointer loads.
    """
    if USE_TMA:
        # Bulk tensor copies; the descriptor zero-fills rows past the head's Nk.
        if PAGED:
            # key_start < num_keys in every block the kernel visits: its page is used.
            row = (tl.load(pages + key_start // PAGE_SIZE).to(tl.int32) * PAGE_SIZE
                   + key_start % PAGE_SIZE)
        else:
            row = key_base + key_start
        k = K_DESC.load([b, hk, row, 0]).reshape(BLOCK_N, D_PAD).T
        v = V_DESC.load([b, hk, row, 0]).reshape(BLOCK_N, DV_PAD)
        if VARLEN and MASKED:
            # A packed descriptor runs on into the next sequence's rows (a paged one
            # into the page's other slots): their scores are masked, and their
            # values are zeroed so that p = 0 meets no Inf or NaN.
            key_ok = key_start + tl.arange(0, BLOCK_N) < num_keys
            v = tl.where(key_ok[:, None], v, 0.0)
            if PAGED:
                # Unused slots may hold NaN, which a min(s, cap) mask would keep.
                k = tl.where(key_ok[None, :], k, 0.0)
    else:
        keys = key_start + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, D_PAD)
        dims_v = tl.arange(0, DV_PAD)
        key_ok = keys < num_keys
        if PAGED:
            if PAGE_SIZE % BLOCK_N == 0:
                # key_start < num_keys in every block the kernel visits: its page is used.
                page = tl.load(pages + key_start // PAGE_SIZE).to(tl.int64)
                slots = (key_start % PAGE_SIZE + tl.arange(0, BLOCK_N)).to(tl.int64)
            else:
                # Entries past the sequence's last page may hold anything: not read.
                page = tl.load(pages + keys // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
                slots = (keys % PAGE_SIZE).to(tl.int64)
            k_rows = page * stride_kpage + slots * stride_kn
            v_rows = page * stride_vpage + slots * stride_vn
        else:
            k_rows = keys.to(tl.int64) * stride_kn
            v_rows = keys.to(tl.int64) * stride_vn
        k_ptrs = k_head + k_rows[None, :] + dims[:, None] * stride_kd
        v_ptrs = v_head + v_rows[:, None] + dims_v[None, :] * stride_vd
        if MASKED:
            k = tl.load(k_ptrs, mask=(dims[:, None] < HEAD_DIM) & key_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=key_ok[:, None] & (dims_v[None, :] < HEAD_DIM_V), other=0.0)
        elif HEAD_DIM == D_PAD and HEAD_DIM_V == DV_PAD:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=dims[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=dims_v[None, :] < HEAD_DIM_V, other=0.0)
    return k, v


@triton.jit
def _attend_block(acc, l_i, m_i, q, k, v, key_start, positions, num_keys, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                  IEEE: tl.constexpr, MIN_MASK: tl.constexpr = False):
    """One online-softmax step over keys ``[key_start, key_start + BLOCK_N)``."""
    # s = q k^T, in fp32 (exact fp32 products when the inputs are fp32).
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    if MASKED:
        # Key offset j in this block is allowed when j <= limit.
        last_key = num_keys - 1
        if CAUSAL:
            last_key = tl.minimum(positions, last_key)
        limit = last_key - key_start
        if MIN_MASK:
            # s = min(s, cap) with cap = (limit + 1/2 - j) 2^100 (exact in fp32): >= 2^99
            # where key j is allowed, <= -2^99 where not. Two float operations per score
            # and no predicates (ptxas packs those into bit masks across the wgmma of
            # the warp-specialised loop: 939 -> 627 instructions per 128 x 128 block
            # and consumer thread at D 128, Triton 3.6). Masked scores then give p = 0;
            # a row whose block is wholly masked gets m = -inf below, as with -inf.
            cap = ((limit.to(tl.float32) + 0.5) * 1.2676506002282294e30)[:, None] \
                - (tl.arange(0, BLOCK_N).to(tl.float32) * 1.2676506002282294e30)[None, :]
            s = tl.minimum(s, cap, propagate_nan=tl.PropagateNan.ALL)
            row_max = tl.max(s, axis=1)
            row_max = tl.where(row_max < -3.1691265005705735e29, float("-inf"), row_max)
            m_new = tl.maximum(m_i, row_max * qk_scale)
        else:
            s = tl.where(tl.arange(0, BLOCK_N)[None, :] <= limit[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        # A row with no allowed key so far keeps m = -inf; shift it by 0 instead.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_shift = m_new
    # p = 2^(s*scale*log2e - m'), alpha = 2^(m - m'). One fused multiply-add, so the
    # product s * qk_scale is not rounded before m' is subtracted: m' carries one
    # rounding common to the whole row (it cancels in o), and the exponent's own
    # error then scales with |s * qk_scale - m'|, not with |s|. Contract §10 asks
    # for exact normalisation of exact scores at any magnitude; rounding the product
    # first would err by |s| * 2^-24 per weight. (Triton's interpreter, which runs
    # the CPU tests, evaluates fma as a rounded product plus a sum.)
    p = tl.math.exp2(tl.fma(s, qk_scale, -m_shift[:, None]))
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    # acc = alpha * acc + p v, with p rounded to V's dtype as FlashAttention does.
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _flag_nonfinite_rows(l_i, NONFINITE):
    """Set ``NONFINITE`` when a query row of this program that read a key holds NaN/Inf.

    Such a row's softmax sum ``l_i`` is then NaN or infinite: every score the
    row enters is NaN or infinite (Inf * 0 is NaN), and an infinite maximum
    gives ``2^(Inf - Inf)``. A key it read that holds NaN/Inf does the same. Rows
    that read no key (``l_i == 0``: their query tile's list is empty) are left to
    the check launch (``pooling.nonfinite_flag`` with ``unread``); loading them
    here kept enough state live past the key loops to make ptxas spill inside them.
    """
    bad = tl.sum((l_i - l_i != 0).to(tl.int32), axis=0)
    tl.store(NONFINITE, 1.0, mask=bad > 0)


@triton.jit
def _sparse_attention_kernel(
    Q, K, V, O, LSE, NUM, IDX, K_DESC, V_DESC, NONFINITE, TILES,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_nb, stride_nh, stride_ib, stride_ih, stride_ir,
    num_batch_heads, num_q_heads, group, num_queries, num_keys, query_start,
    first_query_tile, num_query_tiles, block_size, qk_scale,
    CAUSAL: tl.constexpr, WRITE_LSE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, KV_MAJOR: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_TABLE=None, stride_kpage=0, stride_vpage=0, PAGED: tl.constexpr = False,
    PAGE_SIZE: tl.constexpr = 1, MIN_MASK: tl.constexpr = False, SUBS_N: tl.constexpr = 0,
    CHECK_FINITE: tl.constexpr = False,
):
    """Attention of ``BLOCK_M`` queries over their selected key tiles.

    Fuses the reference's ``token_mask`` (tile selection plus causal ``n <= p``)
    and the masked softmax and ``probs @ v`` of ``block_sparse_attention``,
    visiting only the listed tiles. Programs run the query tiles with the most
    keys first (highest tile index first); see ``AttentionConfig.kv_major``.

    ``VARLEN`` (packed batches, :func:`packed_attention_forward`): Q, K, V, O
    are packed (tokens, H, D) tensors passed as one batch entry (``stride_*b``
    unused), and the launch's ``num_query_tiles`` rows are those of a tile
    table (``TILES``, ``prism.optimized.varlen.TILE_FIELDS`` int32 per query
    tile of every sequence): its sequence's first q and k rows, Nq, Nk and
    ``query_start``, its absolute tile, and where its row of compact indices
    sits. One launch covers every query tile of every sequence, each on its
    own tile grid, with one table read before the indices (as a dense
    program reads its count first).

    ``PAGED`` (with ``VARLEN``; :mod:`prism.optimized.paged_kv`): K and V are
    (num_pages, PAGE_SIZE, Hkv, D) caches (``stride_kn`` the slot stride,
    ``stride_kpage`` the page stride), and a tile-table row's "first k row"
    is where its sequence's row of ``BLOCK_TABLE`` starts: keys are read
    through the block table in place (no warp specialisation; TMA only with
    pages of whole key blocks, :func:`_load_kv`).

    ``CHECK_FINITE``: NaN/Inf in a query row that reads a key sets ``NONFINITE``
    (:func:`_flag_nonfinite_rows`); ``block_sparse_attention``'s check launch then
    reads k, v and only the query rows of tiles with an empty list.
    """
    if PAGED:
        tl.static_assert(VARLEN and not WARP_SPECIALIZE, "PAGED needs VARLEN, no warp "
                         "specialisation")
        tl.static_assert(not USE_TMA or PAGE_SIZE % BLOCK_N == 0,
                         "PAGED bulk copies need pages of whole key blocks")
    # Program -> (batch*head, query tile, sub-block), heaviest (last) tiles first.
    subs_m = tl.cdiv(block_size, BLOCK_M)
    pid = tl.program_id(0)
    if KV_MAJOR:
        # One (batch, KV head) after another; inside it, sub-blocks from the last,
        # the group's query heads together. Concurrent programs then draw on one
        # KV head's K/V, which keeps sparse (random) tile lists L2-resident.
        per_kv_head = num_query_tiles * subs_m * group
        bkv = pid // per_kv_head
        rest = pid % per_kv_head
        tile_sub = num_query_tiles * subs_m - 1 - rest // group
        num_kv_heads = num_q_heads // group
        b = bkv // num_kv_heads
        hk = bkv % num_kv_heads
        h = hk * group + rest % group
        bh = b * num_q_heads + h
    else:
        # Every head of one sub-block together.
        bh = pid % num_batch_heads
        tile_sub = num_query_tiles * subs_m - 1 - pid // num_batch_heads
        b = bh // num_q_heads
        h = bh % num_q_heads
        hk = h // group
    tile_row = tile_sub // subs_m
    sub = tile_sub % subs_m
    if VARLEN:
        # This program's row of the tile table replaces the launch-wide layout
        # arguments (independent loads: one round trip before the indices).
        entry = TILES + tile_row * 10
        q_row0 = tl.load(entry).to(tl.int64)
        k_row0 = tl.load(entry + 1)
        lse_stride_h = num_queries  # the host passes total_q here
        num_queries = tl.load(entry + 2)
        num_keys = tl.load(entry + 3)
        query_start = tl.load(entry + 4)
        t_abs = tl.load(entry + 5)
        num_base = NUM + tl.load(entry + 6) + h * tl.load(entry + 7)
        idx_row = IDX + tl.load(entry + 8).to(tl.int64) + h.to(tl.int64) * tl.load(entry + 9)
        key_base = k_row0
    else:
        key_base = 0
        t_abs = first_query_tile + tile_row

    # Absolute positions of this program's queries, and which of them exist.
    positions = t_abs * block_size + sub * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (positions >= query_start) & (positions < query_start + num_queries)
    rows = positions - query_start
    dims = tl.arange(0, D_PAD)
    dims_v = tl.arange(0, DV_PAD)
    q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_head = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    k_head = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_head = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    pages = BLOCK_TABLE
    if VARLEN:
        q_head += q_row0 * stride_qn
        o_head += q_row0 * stride_on
        if PAGED:
            pages += k_row0
        else:
            k_head += k_row0.to(tl.int64) * stride_kn
            v_head += k_row0.to(tl.int64) * stride_vn
    q_ptrs = q_head + rows.to(tl.int64)[:, None] * stride_qn + dims[None, :] * stride_qd

    # The row of the tile list: count, then ascending key-tile indices.
    if VARLEN:
        num_tiles = tl.load(num_base)
    else:
        idx_row = (IDX + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
                   + tile_row * stride_ir)
        num_tiles = tl.load(NUM + b.to(tl.int64) * stride_nb + h.to(tl.int64) * stride_nh
                            + tile_row)
    # Programs whose queries all lie outside [query_start, query_start + Nq) read nothing.
    num_tiles = tl.where(tl.max(row_ok.to(tl.int32), axis=0) > 0, num_tiles, 0)
    if VARLEN:
        # A sequence without keys has rows of width 0: read nothing there.
        last_tile = tl.load(idx_row + tl.maximum(num_tiles - 1, 0), mask=num_tiles > 0, other=0)
    else:
        last_tile = tl.load(idx_row + tl.maximum(num_tiles - 1, 0))
    last_masked = (last_tile + 1) * block_size > num_keys
    if CAUSAL:
        last_masked = last_masked | (last_tile >= t_abs)
    num_masked = tl.where((num_tiles > 0) & last_masked, 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    if SUBS_N > 0:
        # Key blocks per tile known at compile time: the loops' step // subs_n and
        # step % subs_n become shifts and masks instead of a 32-bit division (about
        # 25 instructions per key block in the loop, Triton 3.6).
        subs_n = SUBS_N
    else:
        subs_n = tl.cdiv(block_size, BLOCK_N)
    # Key blocks of the last tile that some query of this program can see.
    tile_start = last_tile * block_size
    key_end = tl.minimum(tile_start + block_size, num_keys)
    if CAUSAL:
        last_query = tl.minimum(t_abs * block_size + (sub + 1) * BLOCK_M,
                                query_start + num_queries)
        key_end = tl.minimum(key_end, last_query)

    if WARP_SPECIALIZE:
        # Hopper warp specialisation (Triton's automatic partitioning): one producer
        # warp group issues the bulk copies, two consumer groups of 64 rows each do
        # the math. The partitioner handles exactly one loop whose loads come from
        # descriptors built here, so Q comes by descriptor (the host guarantees
        # query_start % BLOCK_M == 0, so the block's rows start at a row >= 0) and
        # every block runs the masked step; the mask is a no-op on full tiles.
        if VARLEN:
            desc_keys = tl.maximum(num_keys, 1)  # a sequence without keys loads nothing
        else:
            desc_keys = num_keys
        q_desc = tl.make_tensor_descriptor(q_head, shape=[num_queries, HEAD_DIM],
                                           strides=[stride_qn, 1], block_shape=[BLOCK_M, D_PAD])
        k_desc = tl.make_tensor_descriptor(k_head, shape=[desc_keys, HEAD_DIM],
                                           strides=[stride_kn, 1], block_shape=[BLOCK_N, D_PAD])
        v_desc = tl.make_tensor_descriptor(v_head, shape=[desc_keys, HEAD_DIM_V],
                                           strides=[stride_vn, 1], block_shape=[BLOCK_N, DV_PAD])
        # Blocks wholly before query_start have no steps; clamp their (unused) row.
        q = q_desc.load([tl.maximum(t_abs * block_size + sub * BLOCK_M - query_start, 0), 0])
        num_steps = ((num_tiles - num_masked) * subs_n
                     + num_masked * tl.cdiv(key_end - tile_start, BLOCK_N))
        for step in tl.range(0, num_steps, warp_specialize=True):
            tile = tl.load(idx_row + step // subs_n)
            key_start = tile * block_size + (step % subs_n) * BLOCK_N
            k = k_desc.load([key_start, 0]).T
            v = v_desc.load([key_start, 0])
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k, v, key_start, positions, num_keys,
                                          qk_scale, True, CAUSAL, BLOCK_N, IEEE, MIN_MASK)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
        # Mask-free tiles: every key is valid and precedes every query here.
        for step in tl.range(0, (num_tiles - num_masked) * subs_n):
            tile = tl.load(idx_row + step // subs_n)
            key_start = tile * block_size + (step % subs_n) * BLOCK_N
            k, v = _load_kv(k_head, v_head, K_DESC, V_DESC, b, hk, key_base, key_start,
                            stride_kn, stride_kd, stride_vn, stride_vd, num_keys, False, USE_TMA,
                            HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, VARLEN,
                            pages, stride_kpage, stride_vpage, PAGED, PAGE_SIZE)
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k, v, key_start, positions,
                                          num_keys, qk_scale, False, CAUSAL, BLOCK_N, IEEE)
        # The last tile with a token mask, only over key blocks some query can see.
        if num_masked > 0:
            for key_start in range(tile_start, key_end, BLOCK_N):
                k, v = _load_kv(k_head, v_head, K_DESC, V_DESC, b, hk, key_base, key_start,
                                stride_kn, stride_kd, stride_vn, stride_vd, num_keys, True,
                                USE_TMA, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, VARLEN,
                                pages, stride_kpage, stride_vpage, PAGED, PAGE_SIZE)
                acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k, v, key_start, positions,
                                              num_keys, qk_scale, True, CAUSAL, BLOCK_N, IEEE,
                                              MIN_MASK)

    # o = acc / l (0 where no key was read); lse in natural log.
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = o_head + rows.to(tl.int64)[:, None] * stride_on + dims_v[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dims_v[None, :] < HEAD_DIM_V))
    if WRITE_LSE:
        # ln(sum_n e^{scale s_n}) = (m + log2 l) / log2(e), m being in base-2 units.
        log2_sum = m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))
        lse = tl.where(has_keys, log2_sum * 0.6931471805599453, float("-inf"))
        if VARLEN:
            # (Hq, total_q): flash-attn's varlen layout.
            lse_ptrs = LSE + h.to(tl.int64) * lse_stride_h + q_row0 + rows
        else:
            lse_ptrs = LSE + bh.to(tl.int64) * num_queries + rows
        tl.store(lse_ptrs, lse, mask=row_ok)
    if CHECK_FINITE:
        _flag_nonfinite_rows(l_i, NONFINITE)
