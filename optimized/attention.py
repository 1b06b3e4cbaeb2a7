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

import math
from dataclasses import dataclass

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from ._runtime import device_capability, next_power_of_2
from .attention_kernel import _sparse_attention_kernel  # noqa: F401  (re-exported)
from .launch import Prepared
from .launch import scratch_allocator as _scratch_allocator  # noqa: F401  (varlen, tests)

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
    of one consumer group). Experimental: with Triton 3.6 it left NaN or
    unwritten rows when other processes shared the GPU (:func:`default_config`),
    so no default uses it. ``min_mask`` masks the scores of masked key blocks
    as ``min(s, cap)`` with a per-row, per-key float bound instead of
    compare-and-select, which Triton 3.6 compiles to predicates that ptxas
    packs into bit masks across the tensor-core wait in the warp-specialised
    loop (where every block takes the mask): 939 -> 627 instructions per
    128 x 128 block and consumer thread at D 128. Outputs are bitwise the
    same. ``None`` (default): on in the warp-specialised loop only (the plain
    loops mask only their last tile, and compile a few instructions longer
    with it). ``static_steps`` (plain loops only)
    compiles the number of key blocks per tile (tile / ``block_n``) into the
    kernel, so that the key loop splits its step into tile and block with
    shifts rather than a 32-bit division: 2-6% faster at D 64 and 256
    (``benchmarks/results/h200_tune_steps_4f8c77c.json``). The
    warp-specialised loop keeps the run-time count: with the constant it left
    non-finite outputs in one cell of eight there (D 128, 32K, density 0.15).
    ``max_registers`` caps the registers per thread (ptxas's ``maxnreg``), so
    that more programs fit an SM's register file (65536 per SM: 4 programs of 4
    warps at 128 registers, 5 at 96); ``None`` leaves the choice to ptxas.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = False
    warp_specialize: bool = False
    kv_major: bool = True
    min_mask: bool | None = None
    static_steps: bool = True
    max_registers: int | None = None

    def __post_init__(self):
        if self.max_registers is not None and (
                isinstance(self.max_registers, bool) or not isinstance(self.max_registers, int)
                or not 24 <= self.max_registers <= 255):
            raise ValueError(f"AttentionConfig.max_registers must be None or an int from 24 "
                             f"to 255, got {self.max_registers!r}")
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
    >= 128                  128        128 x 64, 4 warps, 2 stages, TMA (1.10-1.17x)
    >= 128                  65 - 127   128 x 64, 4 warps, 2 stages, TMA (1.24x)
    >= 128                  > 128      128 x 64, 8 warps, 2 stages, TMA (1.11x)
    64                      <= 64      64 x 64, 4 warps, 2 stages, TMA (1.15x)
    64                      128        64 x 32, 4 warps, 2 stages, TMA (1.09x)
    64                      65 - 127   64 x 32, 4 warps, 2 stages, TMA (1.12x)
    64                      > 128      64 x 32, 4 warps, 2 stages, TMA (1.13x)
    16, 32                  any        tile x tile, 4 warps, 3 stages, TMA
    ======================  =========  =============================================

    In brackets: the median speed-up over the entry it replaced
    (``benchmarks/results/h200_tune_1b04e82.json``, measured at D 64 and 256;
    the D 128 and D > 128 entries of 2026-12-03 from
    ``h200_tune_{g1,b4,g4}_7da8a40.json`` and ``h200_tune_shapes_75d7f97.json``,
    ``PRISM_TUNE_CANDIDATES=occupancy``, which also time densities 0, i.e. the
    sink and diagonal alone; the D 65-127 entries, measured at D 80 and 96, from
    ``h200_tune_padded_3afe9a7.json``, when K and V of such head dims first went
    through descriptors with a box of the padded width: before, they took
    pointer loads on 128 x 128 / 8 warps, or 64 x 64 / 3 stages at tile 64).
    Those D 128 shapes hold less shared memory per program than the
    128 x 128 / 8-warp / 3-stage shape they replace (96 KB against 224 KB at
    tile 128), so two programs share an SM; it paid at every
    density measured, most in rows of few tiles (32 query / 32 KV heads at 32K,
    sink and diagonal only: 0.656 -> 0.519 ms) and at batch 4 (8K, 1.17x). Earlier
    grids kept D 128 to 8 warps and never timed them. At D > 128 the descriptor
    loads (TMA) were simply off.

    No entry is warp-specialised any more. Until 2026-12-03 D 128 and D > 128 at
    tiles of 128 ran Triton 3.6's warp-specialised loop (128 x 128 and 128 x 64,
    4 warps, 2 stages; 1.04-1.12x faster than these plain loops at 128K). With
    several processes sharing the GPU it left NaN or unwritten output rows: at
    32K tokens, density 1.0, bf16, six processes of 40 calls each
    (``benchmarks/probes/attention_repeat.py``,
    ``benchmarks/results/h200_attention_repeat_aec516a.json``) 31 to 40 calls
    of every process had such rows, in query tiles past ~120 (the long rows);
    alone, 0 of 60; the plain loop under the same sharing, 0 of 240. Correct
    outputs come first: ``AttentionConfig(warp_specialize=True)`` is still
    accepted, for experiments only.

    Where the table stood before the entries of 2026-12-03 (D 128 and D 256 at
    tile 128 then ran the warp-specialised loop; the newest figures are the
    shape matrix of the performance docs) (``h200_tune_ac4020a.json`` and
    ``h200_tune_steps_4f8c77c.json``, one H200 run each, 32/8 heads, bf16,
    batch 1, causal random tile masks; compiled FlexAttention time / ours at
    densities 0.05 / 0.15 / 0.3, and ours / cuDNN at 1.0; plain loops with
    ``static_steps``, the warp-specialised loop with ``min_mask``):

    ===========  ==========================  ==========================
    D, tile      8K                          32K
    ===========  ==========================  ==========================
    64, 128      1.29 / 1.16 / 1.17; 1.12x   1.20 / 1.14 / 1.09; 1.20x
    64, 64       1.42 / 1.06 / 1.10; 1.08x   1.15 / 1.16 / 1.12; 1.11x
    128, 128     1.10-1.18 / 1.20-1.22 /     1.32-1.41 / 1.33 / 1.20-1.30;
                 1.24-1.30; 1.09-1.16x       1.07-1.11x
    256, 128     1.79 / 1.89 / 2.00; 1.05x   2.25 / 1.98 / 1.91; 1.06x
    256, 64      1.39 / 1.28 / 1.17; 1.81x   1.34 / 1.14 / 1.05; 1.72x
    ===========  ==========================  ==========================

    (D 128, tile 128: the two runs, whose cuDNN times differ by 8% at 8K.)
    Candidates measured there and not taken: warp specialisation at D 64
    (128 x 128: 0.77x the default, median over the eight cells; 128 x 64
    slower still), conditional rescaling (FlashAttention-4's, plain loops:
    0.96-0.97x at D 64 and 256; not kept), 128 x 64 at D 128 (0.88x), and compare-and-select in the
    warp-specialised loop (0.98x against ``min_mask`` at D 128, 1.00x at D 256).
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
        return AttentionConfig(64, 32, 4, 2, use_tma=True)
    if head_dim <= 128:
        # One warp group on 128 x 64 blocks, 2 stages: 96 KB of shared memory at D
        # 128 (D 80 and 96 are padded to 128), so two programs share an SM
        # (h200_tune_*_7da8a40.json, h200_tune_padded_3afe9a7.json; not
        # warp-specialised, see the docstring).
        return AttentionConfig(128, 64, 4, 2, use_tma=True)
    return fallback_config(block_size, head_dim)


def fallback_config(block_size: int, head_dim: int = 128) -> AttentionConfig:
    """The 16-bit launch shape when warp specialisation does not apply."""
    divisor = block_size & -block_size
    if head_dim > 128 and divisor >= 128:
        return AttentionConfig(128, 64, 8, 2, use_tma=True)
    return AttentionConfig(min(128, divisor), min(128, divisor), 8, 3, use_tma=True)


def descriptor_rows(width: int, element_size: int, padded: int | None = None) -> bool:
    """Whether rows ``width`` elements wide can be read through a descriptor box of
    ``padded`` columns (a power of two; by default the kernel's padded width,
    ``max(16, next_power_of_2(width))``): rows of a multiple of 16 bytes and a box
    of at least the rows and at most 256 columns; the copy zero-fills the box past
    the rows. Checked on the H200 at D 80 and 96 (box 128) and at D 160, 192 and
    Q/K 192 with V 128 (box 256): outputs bit for bit those of the pointer loads
    (``benchmarks/probes/wide_padded_boxes.py``,
    ``benchmarks/results/h200_wide_boxes_6cab374.json``)."""
    if padded is None:
        padded = max(16, next_power_of_2(width))
    return width <= padded <= 256 and (width * element_size) % 16 == 0


def tma_compatible(k: torch.Tensor, v: torch.Tensor, d_pad: int, dv_pad: int) -> bool:
    """Whether K and V can be read through Hopper tensor descriptors (TMA).

    Needs a CUDA device of compute capability 9.0 or newer, unit-stride head
    dims whose rows :func:`descriptor_rows` accepts, 16-byte aligned strides and
    bases. A head dim that is not a power of two (80, 96, 160, 192) is read
    through a box of the padded width ``d_pad``: the copy fills the columns past
    the tensor's last one with zeros, which is what the pointer loads' mask gives.
    """
    if not (k.is_cuda and device_capability(k.device)[0] >= 9):
        return False
    for t, pad in ((k, d_pad), (v, dv_pad)):
        if not descriptor_rows(t.shape[3], t.element_size(), pad):
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
    capability 9.x, where Triton 3.6 partitions such loops), 16-bit inputs,
    power-of-two head dims, Q as well as K and V readable through tensor
    descriptors, and query blocks aligned to ``query_start`` (each block of
    queries starts at a row >= 0)."""
    if not (q.is_cuda and device_capability(q.device)[0] == 9):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or query_start % block_m:
        return False
    if d_pad != q.shape[3] or dv_pad != v.shape[3]:
        return False  # padded boxes were checked on the plain loop only
    return tma_compatible(k, v, d_pad, dv_pad) and tma_compatible(q, v, d_pad, dv_pad)


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
                     dtype: torch.dtype, use_tma: bool, *, varlen: bool,
                     block_size: int | None = None, check_finite: bool = False) -> dict:
    """The constexpr and launch keywords of :func:`_sparse_attention_kernel` (dense and
    packed launches alike); ``block_size`` (the tile) makes the key blocks per tile a
    compile-time constant where ``config.static_steps``; ``check_finite`` flags NaN/Inf
    in the queries (the launch then passes a flag tensor as ``NONFINITE``)."""
    static = block_size is not None and config.static_steps and not config.warp_specialize
    return dict(
        CAUSAL=causal, WRITE_LSE=return_lse,
        HEAD_DIM=d, HEAD_DIM_V=dv, D_PAD=max(16, next_power_of_2(d)),
        DV_PAD=max(16, next_power_of_2(dv)),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, IEEE=dtype == torch.float32,
        USE_TMA=use_tma, WARP_SPECIALIZE=config.warp_specialize, KV_MAJOR=config.kv_major,
        VARLEN=varlen,
        MIN_MASK=config.warp_specialize if config.min_mask is None else config.min_mask,
        SUBS_N=-(-block_size // config.block_n) if static else 0,
        CHECK_FINITE=check_finite,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({} if config.max_registers is None else {"maxnreg": config.max_registers}),
    )


def host_descriptor(t: torch.Tensor, block_shape: list) -> TensorDescriptor:
    """``TensorDescriptor.from_tensor(t, block_shape)`` without its checks, for a tensor
    that :func:`tma_compatible` accepted (the plan is keyed by what it checked)."""
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides = t, t.shape, t.stride()
    desc.block_shape, desc.padding = block_shape, "zero"
    return desc


#: Launch plans by call signature (shapes, strides, alignment, settings).
_PLANS: dict = {}


def _plan(q, k, v, kv_num_blocks, kv_indices, out_strides, block_size, causal, scale,
          return_lse, first_query_tile, query_start, interpreted, config, check_finite):
    """Everything of a launch that does not depend on the data: ``(grid, Prepared,
    out shape, K and V descriptor block shapes or None)``.

    Asks :func:`tma_compatible` and :func:`warp_specialize_compatible` (through
    :func:`_launch_config`) once per signature; the caller's key holds what they
    read (device, dtype, shapes, strides, 16-byte alignment of q, k and v).
    """
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    nqt = kv_num_blocks.shape[-1]
    d_pad, dv_pad = max(16, next_power_of_2(d)), max(16, next_power_of_2(dv))
    config = _launch_config(config, q, k, v, d_pad, dv_pad, query_start, block_size,
                            interpreted)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    nb_strides = [0 if kv_num_blocks.shape[i] == 1 else kv_num_blocks.stride(i) for i in (0, 1)]
    idx_strides = [0 if kv_indices.shape[i] == 1 else kv_indices.stride(i) for i in (0, 1)]
    use_tma = config.use_tma and not config.warp_specialize and tma_compatible(k, v, d_pad, dv_pad)
    blocks = ([1, 1, config.block_n, d_pad], [1, 1, config.block_n, dv_pad]) if use_tma else None
    out_shape = (b, hq, nq, dv)
    if out_strides is None:  # a fresh (or given) contiguous output
        out_strides = (hq * nq * dv, nq * dv, dv, 1)
    grid = (nqt * -(-block_size // config.block_m) * b * hq,)
    prepared = Prepared(
        (None,  # TILES: packed launches only
         *q.stride(), *k.stride(), *v.stride(), *out_strides,
         *nb_strides, *idx_strides, kv_indices.stride(2),
         b * hq, hq, hq // hkv, nq, nk, query_start, first_query_tile, nqt, block_size,
         scale * LOG2_E),
        launch_constants(config, causal, return_lse, d, dv, q.dtype, use_tma, varlen=False,
                         block_size=block_size, check_finite=check_finite))
    return grid, prepared, out_shape, blocks


#: Largest finite float32.
_FP32_MAX = 3.4028234663852886e38


def positive_scale(q: torch.Tensor, scale: float | None):
    """``(q', scale')`` with ``scale' > 0`` (or None) and ``scale' * q'.k == scale * q.k``.

    The kernel takes each row's running maximum of the raw scores and scales it
    afterwards, which is the maximum of the scaled scores only for a positive
    scale; contract §7 allows any finite one. A negative scale runs on ``-q``
    (negation is exact, so the scores are exactly the negated ones), a zero
    scale on ``0 * q`` with scale 1 (every score 0: the mean of the values read;
    NaN in ``q`` stays NaN). Both copy ``q``; the default and positive scales
    return ``q`` itself.
    """
    if scale is not None and abs(float(scale)) * LOG2_E > _FP32_MAX:
        raise ValueError(
            f"scale {float(scale):g} is too large for the kernels, which take scale * log2(e) "
            f"as a float32: use |scale| <= {_FP32_MAX / LOG2_E:.3g} (or prism.reference)")
    if scale is None or float(scale) > 0.0:
        return q, scale
    if float(scale) < 0.0:
        return torch.neg(q), -float(scale)
    return q * 0.0, 1.0


def launch_block_size(block_size: int, query_end: int, num_keys: int) -> int:
    """The tile size to launch with: ``block_size``, or a smaller power of two (128 at
    least, the tuned tile) when one tile holds every query position (below
    ``query_end``) and every key either way.

    The grid has ``ceil(block_size / BLOCK_M)`` programs per query tile, so a tile far
    longer than the sequence (contract §3 allows any) would launch programs in
    proportion to ``block_size``, not to the data. With a single tile on both sides
    every tile index is 0 under either size, so the launch computes the same thing.
    """
    extent = max(query_end, num_keys, 1)
    if block_size < extent:
        return block_size
    smaller = max(128, next_power_of_2(extent))
    return smaller if smaller < block_size else block_size


def sparse_attention_forward(q, k, v, kv_num_blocks, kv_indices, *, block_size: int,
                             causal: bool, scale: float | None, return_lse: bool,
                             first_query_tile: int, query_start: int, interpreted: bool,
                             out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                             config: AttentionConfig | None = None,
                             nonfinite: torch.Tensor | None = None):
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
    nonfinite : Tensor, optional
        A float64 device flag the kernel sets (stores 1 in) when a query row that
        reads a key holds NaN/Inf (``_flag_nonfinite_rows`` in
        :mod:`.attention_kernel`; also when a row's fp32 sums overflow). Rows of
        tiles with an empty list, and the keys and values, are not covered: only
        the selected tiles are read.

    Returns
    -------
    out, and lse (or None when ``return_lse`` is False)

    The launch plan (configuration, TMA and warp-specialisation checks, scalar
    arguments) is kept per call signature, and the kernel is launched through
    :class:`prism.optimized.launch.Prepared`: a repeated call allocates its
    outputs and launches, nothing else. A scale of 0 or below runs on a copy
    of ``q`` (:func:`positive_scale`).
    """
    q, scale = positive_scale(q, scale)
    block_size = launch_block_size(block_size, query_start + q.shape[2], k.shape[2])
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), kv_num_blocks.shape,
           kv_num_blocks.stride(), kv_indices.shape, kv_indices.stride(), q.dtype, q.device,
           q.data_ptr() % 16 == 0, k.data_ptr() % 16 == 0, v.data_ptr() % 16 == 0,
           None if out is None or out.is_contiguous() else out.stride(), block_size, causal,
           scale, return_lse,
           first_query_tile, query_start, interpreted, config, nonfinite is not None)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(q, k, v, kv_num_blocks, kv_indices, key[15], block_size, causal, scale,
                     return_lse, first_query_tile, query_start, interpreted, config,
                     nonfinite is not None)
        if len(_PLANS) >= 1024:
            _PLANS.clear()
        _PLANS[key] = plan
    grid, prepared, out_shape, blocks = plan
    if out is None:
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(out_shape[:3], dtype=torch.float32, device=q.device)
    k_desc = v_desc = None
    if blocks is not None:
        k_desc, v_desc = host_descriptor(k, blocks[0]), host_descriptor(v, blocks[1])
    prepared.launch(_sparse_attention_kernel, grid, q, k, v, out, lse if return_lse else out,
                    kv_num_blocks, kv_indices, k_desc, v_desc, nonfinite)
    return out, (lse if return_lse else None)
