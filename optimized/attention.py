"""Block-sparse flash attention forward over compact tile indices (contract §7).

Each program owns ``BLOCK_M`` queries of one query tile of one (batch, q head)
and visits only the key tiles listed for that tile (``kv_indices``), reading
K and V of the query head's KV head in place (GQA, never repeated). Per key
block it runs the online softmax of FlashAttention in base 2:

    s    = (q k^T) * scale * log2(e)                  (scale folded into one multiply)
    m'   = max(m, rowmax(s))
    p    = 2^(s - m'),      alpha = 2^(m - m')
    l'   = alpha * l + rowsum(p)
    acc' = alpha * acc + p v

and finishes with ``o = acc / l`` and ``lse = (m + log2 l) * ln 2`` (natural
log). Rows that read no key keep ``l = 0`` and return ``o = 0``, ``lse = -inf``.

Only the last listed tile can need a token mask: with ascending indices it is
the diagonal tile (causal, ``n <= p``) or the partial last key tile
(``n < Nk``). Every other tile runs the mask-free loop.

Positions follow contract §2: query row ``r`` sits at ``query_start + r`` on the
absolute grid and lies in tile ``(query_start + r) // block_size``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation
from triton.tools.tensor_descriptor import TensorDescriptor

from ._runtime import device_capability, next_power_of_2

LOG2_E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionConfig:
    """Launch shape of :func:`_sparse_attention_kernel`.

    ``block_m`` and ``block_n`` must divide the selection tile size.
    ``kv_major`` orders programs by (batch, KV head) first, so the programs
    that run at the same time read one KV head's K and V and share them in L2;
    otherwise every head of one query tile runs together.
    ``warp_specialize`` runs the key loop under Triton's Hopper warp
    specialisation (a producer warp group feeding two consumer groups) with
    Q, K and V read through descriptors built in the kernel; it needs what
    :func:`warp_specialize_compatible` checks, and ``num_warps`` 4 (the size
    of one consumer group).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = False
    warp_specialize: bool = False
    kv_major: bool = True

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 \
                    or value & (value - 1):
                raise ValueError(f"AttentionConfig.{name} must be a power of two >= 16, "
                                 f"got {value!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"AttentionConfig.num_warps must be 1, 2, 4, 8 or 16, got "
                             f"{self.num_warps!r}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) \
                or self.num_stages < 1:
            raise ValueError(f"AttentionConfig.num_stages must be an int >= 1, got "
                             f"{self.num_stages!r}")
        if self.warp_specialize and self.num_stages > 2:
            # Seen on the H200 with Triton 3.6 (benchmarks/results/h200_tune_1b04e82.json):
            # every warp-specialised launch with 3 or 4 stages left non-finite outputs.
            raise ValueError("AttentionConfig(warp_specialize=True) needs num_stages <= 2 "
                             f"(deeper pipelines give wrong outputs), got {self.num_stages}")


def supported_block_size(block_size: int) -> bool:
    """The kernel tiles queries and keys in power-of-two blocks of 16 to 128 tokens
    that divide the selection tile, so it needs ``block_size % 16 == 0``."""
    return block_size >= 16 and block_size % 16 == 0


def default_config(block_size: int, head_dim: int, dtype: torch.dtype,
                   interpreted: bool) -> AttentionConfig:
    """Block sizes and pipelining for one call: a table measured on the H200.

    ``benchmarks/bench_matrix.py --parts tune`` (``benchmarks/bench_tune.py``)
    times a pruned grid of candidates, each checked against a plain reference
    launch, on 32/8 heads, bf16, 8K and 32K tokens at densities 0.05, 0.15 and
    1.0; a candidate replaces an entry only when its median over those six
    cells of (old time / new time) exceeds 1.03. The winners, 16-bit inputs:

    ======================  =========  =============================================
    tile (largest 2^k)      D          launch shape
    ======================  =========  =============================================
    >= 128                  <= 64      64 x 64, 4 warps, 2 stages, TMA (1.13x)
    >= 128                  128        128 x 128, warp-specialised, 2 stages
    >= 128                  other      128 x 128, 8 warps, 2 stages (D 80, 96)
    >= 128                  > 128      128 x 64, warp-specialised, 2 stages
    64                      <= 64      64 x 64, 4 warps, 2 stages, TMA (1.15x)
    64                      65 - 128   64 x 64, 4 warps, 3 stages, TMA
    64                      > 128      64 x 32, 4 warps, 2 stages, TMA (1.13x)
    16, 32                  any        tile x tile, 4 warps, 3 stages, TMA
    ======================  =========  =============================================

    In brackets: the median speed-up over the entry it replaced
    (``benchmarks/results/h200_tune_1b04e82.json``, measured at D 64 and 256).
    Warp-specialised shapes with 3 or 4 stages gave non-finite or unwritten
    outputs there (D 64 and 128, Triton 3.6), so every table entry that uses
    warp specialisation has 2 stages. Warp-specialised shapes fall back to
    :func:`fallback_config` where :func:`warp_specialize_compatible` refuses the
    inputs; TMA needs :func:`tma_compatible` and is skipped otherwise.
    """
    divisor = block_size & -block_size  # largest power of two dividing block_size
    if interpreted:
        # The interpreter's cost grows with block area; 32 keeps CPU tests quick.
        tile = min(32, divisor)
        return AttentionConfig(tile, tile, 4, 1)
    if dtype == torch.float32:
        return AttentionConfig(min(64, divisor), min(32, divisor), 4, 2)
    if divisor < 64:
        return AttentionConfig(divisor, divisor, 4, 3, use_tma=True)
    if head_dim <= 64:
        return AttentionConfig(64, 64, 4, 2, use_tma=True)
    if divisor == 64:
        if head_dim > 128:
            return AttentionConfig(64, 32, 4, 2, use_tma=True)
        return AttentionConfig(64, 64, 4, 3, use_tma=True)
    if head_dim > 128:
        return AttentionConfig(128, 64, 4, 2, warp_specialize=True)
    if head_dim == 128:
        return AttentionConfig(128, 128, 4, 2, use_tma=True, warp_specialize=True)
    return AttentionConfig(128, 128, 8, 2)


def fallback_config(block_size: int, head_dim: int = 128) -> AttentionConfig:
    """The 16-bit launch shape when warp specialisation does not apply."""
    divisor = block_size & -block_size
    if head_dim > 128 and divisor >= 128:
        return AttentionConfig(128, 64, 8, 2)
    return AttentionConfig(min(128, divisor), min(128, divisor), 8, 3, use_tma=True)


def tma_compatible(k: torch.Tensor, v: torch.Tensor, d_pad: int, dv_pad: int) -> bool:
    """Whether K and V can be read through Hopper tensor descriptors (TMA).

    Needs a CUDA device of compute capability 9.0 or newer, head dims that are
    powers of two, unit-stride head dims, 16-byte aligned strides and bases.
    """
    if not (k.is_cuda and device_capability(k.device)[0] >= 9):
        return False
    if d_pad != k.shape[3] or dv_pad != v.shape[3]:
        return False
    for t in (k, v):
        if t.stride(3) != 1 or t.data_ptr() % 16:
            return False
        if any((t.stride(i) * t.element_size()) % 16 for i in range(3)):
            return False
    return True


def warp_specialize_compatible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d_pad: int,
                               dv_pad: int, query_start: int, block_m: int) -> bool:
    """Whether the warp-specialised loop applies: a Hopper GPU (compute
    capability 9.x, where Triton 3.6 partitions such loops), 16-bit inputs, Q
    as well as K and V readable through tensor descriptors, and query blocks
    aligned to ``query_start`` (each block of queries starts at a row >= 0)."""
    if not (q.is_cuda and device_capability(q.device)[0] == 9):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or query_start % block_m:
        return False
    return tma_compatible(k, v, d_pad, dv_pad) and tma_compatible(q, v, d_pad, dv_pad)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def _scratch_allocator():
    """Descriptors built inside a kernel need a global scratch buffer per launch;
    supply one from torch's caching allocator unless the caller set their own."""
    slot = getattr(_allocation, "_allocator", None)
    if slot is None:  # another Triton layout: set it the public way, for good
        triton.set_allocator(_torch_scratch)
        yield
        return
    if not isinstance(slot.get(), _allocation.NullAllocator):
        yield
        return
    token = slot.set(_torch_scratch)
    try:
        yield
    finally:
        slot.reset(token)


@triton.jit
def _load_kv(k_head, v_head, K_DESC, V_DESC, b, hk, key_base, key_start, stride_kn, stride_kd,
             stride_vn, stride_vd, num_keys, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr,
             DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr):
    """K^T (D_PAD, BLOCK_N) and V (BLOCK_N, DV_PAD) of keys [key_start, key_start + BLOCK_N).

    Keys at or past ``num_keys`` load as zeros (the caller masks their scores).
    ``key_base`` is the first key row of the sequence in a packed (varlen)
    descriptor (0 for a dense batch).
    """
    if USE_TMA:
        # Bulk tensor copies; the descriptor zero-fills rows past the head's Nk.
        k = K_DESC.load([b, hk, key_base + key_start, 0]).reshape(BLOCK_N, D_PAD).T
        v = V_DESC.load([b, hk, key_base + key_start, 0]).reshape(BLOCK_N, DV_PAD)
        if VARLEN and MASKED:
            # A packed descriptor runs on into the next sequence's rows: their scores
            # are masked, and their values are zeroed so that p = 0 meets no Inf.
            key_ok = key_start + tl.arange(0, BLOCK_N) < num_keys
            v = tl.where(key_ok[:, None], v, 0.0)
    else:
        keys = key_start + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, D_PAD)
        dims_v = tl.arange(0, DV_PAD)
        k_ptrs = k_head + keys.to(tl.int64)[None, :] * stride_kn + dims[:, None] * stride_kd
        v_ptrs = v_head + keys.to(tl.int64)[:, None] * stride_vn + dims_v[None, :] * stride_vd
        key_ok = keys < num_keys
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
                  IEEE: tl.constexpr):
    """One online-softmax step over keys ``[key_start, key_start + BLOCK_N)``."""
    # s = q k^T, in fp32 (exact fp32 products when the inputs are fp32).
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    if MASKED:
        # Key offset j in this block is allowed when j <= limit: one compare per score.
        last_key = num_keys - 1
        if CAUSAL:
            last_key = tl.minimum(positions, last_key)
        limit = last_key - key_start
        s = tl.where(tl.arange(0, BLOCK_N)[None, :] <= limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        # A row with no allowed key so far keeps m = -inf; shift it by 0 instead.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_shift = m_new
    # p = 2^(s*scale*log2e - m'), alpha = 2^(m - m').
    p = tl.math.exp2(s * qk_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # acc = alpha * acc + p v, with p rounded to V's dtype as FlashAttention does.
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _sparse_attention_kernel(
    Q, K, V, O, LSE, NUM, IDX, K_DESC, V_DESC, TILES,
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
    """
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
    if VARLEN:
        q_head += q_row0 * stride_qn
        o_head += q_row0 * stride_on
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
                                          qk_scale, True, CAUSAL, BLOCK_N, IEEE)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
        # Mask-free tiles: every key is valid and precedes every query here.
        for step in tl.range(0, (num_tiles - num_masked) * subs_n):
            tile = tl.load(idx_row + step // subs_n)
            key_start = tile * block_size + (step % subs_n) * BLOCK_N
            k, v = _load_kv(k_head, v_head, K_DESC, V_DESC, b, hk, key_base, key_start,
                            stride_kn, stride_kd, stride_vn, stride_vd, num_keys, False, USE_TMA,
                            HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, VARLEN)
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k, v, key_start, positions,
                                          num_keys, qk_scale, False, CAUSAL, BLOCK_N, IEEE)
        # The last tile with a token mask, only over key blocks some query can see.
        if num_masked > 0:
            for key_start in range(tile_start, key_end, BLOCK_N):
                k, v = _load_kv(k_head, v_head, K_DESC, V_DESC, b, hk, key_base, key_start,
                                stride_kn, stride_kd, stride_vn, stride_vd, num_keys, True,
                                USE_TMA, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, BLOCK_N, VARLEN)
                acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k, v, key_start, positions,
                                              num_keys, qk_scale, True, CAUSAL, BLOCK_N, IEEE)

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


def _launch_config(config, q, k, v, d_pad: int, dv_pad: int, query_start: int,
                   block_size: int, interpreted: bool) -> AttentionConfig:
    """The launch shape: ``config``, or the measured default (falling back where warp
    specialisation does not apply). q, k, v are (B, H, N, D) tensors or views."""
    d = q.shape[3]
    if config is None:
        config = default_config(block_size, d, q.dtype, interpreted)
        if config.warp_specialize and not warp_specialize_compatible(
                q, k, v, d_pad, dv_pad, query_start, config.block_m):
            config = fallback_config(block_size, d)
    elif config.warp_specialize and not warp_specialize_compatible(
            q, k, v, d_pad, dv_pad, query_start, config.block_m):
        raise ValueError("AttentionConfig(warp_specialize=True) needs a compute capability 9.x "
                         "GPU, fp16/bf16 inputs with 16-byte aligned strides, power-of-two head "
                         "dims and query_start divisible by block_m; use warp_specialize=False")
    return config


def launch_constants(config: AttentionConfig, causal: bool, return_lse: bool, d: int, dv: int,
                     dtype: torch.dtype, use_tma: bool, *, varlen: bool) -> dict:
    """The constexpr and launch keywords of :func:`_sparse_attention_kernel` (dense and
    packed launches alike)."""
    return dict(
        CAUSAL=causal, WRITE_LSE=return_lse,
        HEAD_DIM=d, HEAD_DIM_V=dv, D_PAD=max(16, next_power_of_2(d)),
        DV_PAD=max(16, next_power_of_2(dv)),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, IEEE=dtype == torch.float32,
        USE_TMA=use_tma, WARP_SPECIALIZE=config.warp_specialize, KV_MAJOR=config.kv_major,
        VARLEN=varlen, num_warps=config.num_warps, num_stages=config.num_stages,
    )


def sparse_attention_forward(q, k, v, kv_num_blocks, kv_indices, *, block_size: int,
                             causal: bool, scale: float | None, return_lse: bool,
                             first_query_tile: int, query_start: int, interpreted: bool,
                             out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                             config: AttentionConfig | None = None):
    """Launch the block-sparse attention kernel on validated inputs.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    v : Tensor (B, Hkv, Nk, Dv)
    kv_num_blocks : Tensor (B or 1, Hq or 1, n_query_tiles), int32
    kv_indices : Tensor (B or 1, Hq or 1, n_query_tiles, >= max count), int32
        Ascending admissible key tiles of each query tile; dims of size 1 broadcast.
    block_size : int
        Selection tile size; must satisfy :func:`supported_block_size`.
    causal : bool
    scale : float or None
        Softmax scale, default ``1 / sqrt(D)``.
    return_lse : bool
    first_query_tile, query_start : int
        From the tile layout.
    interpreted : bool
        Kernels run in Triton's interpreter (picks a small launch shape).
    out, lse : Tensor, optional
        Preallocated outputs, (B, Hq, Nq, Dv) of q's dtype and (B, Hq, Nq) fp32
        (tests pass NaN-filled ones to prove every element is written).
    config : AttentionConfig, optional
        Launch shape; defaults to :func:`default_config`.

    Returns
    -------
    out, and lse (or None when ``return_lse`` is False)
    """
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    nqt = kv_num_blocks.shape[-1]
    if out is None:
        out = torch.empty(b, hq, nq, dv, dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
    d_pad, dv_pad = max(16, next_power_of_2(d)), max(16, next_power_of_2(dv))
    config = _launch_config(config, q, k, v, d_pad, dv_pad, query_start, block_size,
                            interpreted)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    nb_strides = [0 if kv_num_blocks.shape[i] == 1 else kv_num_blocks.stride(i) for i in (0, 1)]
    idx_strides = [0 if kv_indices.shape[i] == 1 else kv_indices.stride(i) for i in (0, 1)]
    use_tma = config.use_tma and not config.warp_specialize and tma_compatible(k, v, d_pad, dv_pad)
    k_desc = v_desc = None
    if use_tma:
        k_desc = TensorDescriptor.from_tensor(k, [1, 1, config.block_n, d_pad])
        v_desc = TensorDescriptor.from_tensor(v, [1, 1, config.block_n, dv_pad])
    grid = (nqt * -(-block_size // config.block_m) * b * hq,)
    scratch = _scratch_allocator() if config.warp_specialize else contextlib.nullcontext()
    with scratch:
        _sparse_attention_kernel[grid](
            q, k, v, out, lse if return_lse else out, kv_num_blocks, kv_indices, k_desc, v_desc,
            None,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *nb_strides, *idx_strides, kv_indices.stride(2),
            b * hq, hq, hq // hkv, nq, nk, query_start, first_query_tile, nqt, block_size,
            scale * LOG2_E,
            **launch_constants(config, causal, return_lse, d, dv, q.dtype, use_tma,
                               varlen=False),
        )
    return out, (lse if return_lse else None)

