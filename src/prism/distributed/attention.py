"""Context-parallel Prism attention: the sequence sharded across ranks.

At a million tokens the K/V of one layer no longer fits next to the
activations of one GPU, so prefill shards the sequence. Ring attention then
passes every K/V chunk to every rank. Prism needs less: a query tile reads
only the key tiles its selection keeps, and the selection reads only the
*pooled* keys, one ``D``-vector per tile. Each rank therefore

1. all-gathers the pooled key tiles (``bs`` times smaller than K, V not at all)
   and all-reduces the query energies that the calibration (contract §5) needs;
2. selects its query tiles' key tiles locally, reproducing the single-device
   :func:`prism.reference.select_blocks` mask;
3. asks each owner for the (batch, KV head, key tile) entries it selected and
   receives only those K/V tiles (one ``all_to_all_single`` with split sizes);
4. runs block-sparse attention against each source's tiles, with the
   log-sum-exp, and merges the partial results:
   ``lse = log sum_s exp(lse_s)``, ``o = sum_s exp(lse_s - lse) o_s``.

Every stage that exists on one device is called, not rewritten: pooling,
bands, calibration (:func:`~prism.reference.band_temperature`), scoring,
top-p, the admissible set and forced tiles of :mod:`prism.reference`, and
:func:`prism.block_sparse_attention` for the attention (the Triton kernel on
CUDA tensors, the reference elsewhere). What this module adds is the
communication and the merge of partial softmaxes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import prism
from prism.reference import (
    PrismConfig,
    admissible_tiles,
    band_dims,
    band_logits,
    band_probabilities,
    band_temperature,
    forced_tiles,
    pool_tiles,
    top_p_select,
)

from .checks import _check_group, _collective_device, _exchange_metadata
from .cost import CommunicationStats, _metadata_bytes
from .plan import ShardPlan

__all__ = ["context_parallel_prism_attention"]


# ---------------------------------------------------------------------------
# Moving tiles
# ---------------------------------------------------------------------------

def _pool_segments(x: torch.Tensor, segments, block_size: int) -> torch.Tensor:
    """Pooled tiles (contract §3) of each local segment, concatenated.

    Returns (B, H, local tiles, D), fp32.
    """
    pooled, row = [], 0
    for start, length in segments:
        pooled.append(pool_tiles(x[:, :, row:row + length], start, block_size))
        row += length
    if not pooled:
        return x.new_zeros(x.shape[0], x.shape[1], 0, x.shape[3], dtype=torch.float32)
    return torch.cat(pooled, dim=2)


def _tile_grid(x: torch.Tensor, segments, block_size: int) -> torch.Tensor:
    """Local rows cut into whole tiles: (B, H, local tiles, bs, D), zero after the last key."""
    grids, row = [], 0
    for _, length in segments:
        n_tiles = -(-length // block_size)
        padded = x.new_zeros(x.shape[0], x.shape[1], n_tiles * block_size, x.shape[3])
        padded[:, :, :length] = x[:, :, row:row + length]
        grids.append(padded.view(x.shape[0], x.shape[1], n_tiles, block_size, x.shape[3]))
        row += length
    if not grids:
        return x.new_zeros(x.shape[0], x.shape[1], 0, block_size, x.shape[3])
    return torch.cat(grids, dim=2)


def _all_gather_pooled_keys(k_pooled_local, plan: ShardPlan, group) -> torch.Tensor:
    """Every rank's pooled key tiles, placed on the global grid: (B, Hkv, n_key_tiles, D)."""
    world = plan.world_size
    b, hkv, own, d = k_pooled_local.shape
    max_tiles = max(plan.tiles(r, "key").numel() for r in range(world))
    # all_gather needs one size on every rank: pad to the largest rank's count.
    send = k_pooled_local.new_zeros(b, hkv, max_tiles, d)
    send[:, :, :own] = k_pooled_local
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send.contiguous(), group=group)
    k_pooled = k_pooled_local.new_zeros(b, hkv, plan.num_key_tiles, d)
    for source in range(world):
        tiles = plan.tiles(source, "key").to(k_pooled.device)
        k_pooled[:, :, tiles] = received[source][:, :, :tiles.numel()]
    return k_pooled



def _serve(kv_grid: torch.Tensor, requested: torch.Tensor) -> torch.Tensor:
    """The requested K/V tiles, in (batch, KV head, local tile) order: (count, bs, D + Dv)."""
    b, h, t = requested.nonzero(as_tuple=True)
    return kv_grid[b, h, t]


def _received_keys(payload: torch.Tensor, need: torch.Tensor, source_tiles: torch.Tensor,
                   plan: ShardPlan, dtype: torch.dtype):
    """Lay the K/V tiles received from one source out as a key sequence.

    ``need`` (B, Hkv, source's tiles) is what was requested; the source sent
    the tiles in ``need.nonzero()`` order, so no index travels with them. The
    sequence holds, in ascending order, every tile that some (batch, KV head)
    requested; an entry that was not requested stays zero and is never read,
    because a (batch, KV head) requests every tile that one of its query heads
    selects.

    Returns
    -------
    None when nothing was requested, else ``(tiles, kv)``: the absolute key
    tiles (n,) and the K/V, (B, Hkv, L, D + Dv) of ``dtype``, where ``L`` is
    ``n * bs`` less the missing tail of the sequence's last tile, so the
    tiles sit on the grid of :func:`prism.reference.tile_layout`.
    """
    wanted = need.any(dim=1).any(dim=0)  # (source's tiles,)
    tiles = source_tiles[wanted]
    if tiles.numel() == 0:
        return None
    slot = torch.cumsum(wanted, dim=0) - 1
    b_idx, h_idx, t_idx = need.nonzero(as_tuple=True)
    bsz, hkv = need.shape[:2]
    bs = plan.block_size
    kv = payload.new_zeros(bsz, hkv, tiles.numel(), bs, payload.shape[-1], dtype=dtype)
    kv[b_idx, h_idx, slot[t_idx]] = payload.to(dtype)
    length = tiles.numel() * bs
    if int(tiles[-1]) == plan.num_key_tiles - 1:
        length -= plan.num_key_tiles * bs - plan.num_keys  # only the last tile may be partial
    return tiles, kv.view(bsz, hkv, tiles.numel() * bs, -1)[:, :, :length]


# ---------------------------------------------------------------------------
# Calibration and selection: the reference stages on this rank's rows
# ---------------------------------------------------------------------------

def _pooled_query_stand_in(energy: torch.Tensor, band_energy: torch.Tensor, dims: torch.Tensor,
                           head_dim: int, num_tiles: int) -> torch.Tensor:
    """One pseudo-tile (B, Hq, 1, D) with the RMS of ALL the sequence's pooled queries.

    :func:`~prism.reference.band_temperature` reads the pooled queries only
    through two root mean squares: over all dims, and over the band's dims.
    From the sums of squares ``E`` (all dims) and ``E_b`` (the band) over the
    ``T`` query tiles of every rank, the stand-in holds
    ``sqrt(E_b / (T d_b))`` on the band's dims and
    ``sqrt((E - E_b) / (T (D - d_b)))`` on the others. Its mean square is then
    ``E / (T D)`` over all dims and ``E_b / (T d_b)`` over the band, the same
    as the whole sequence's, so the reference formula applies unchanged.
    """
    band_count = num_tiles * dims.numel()
    rest_count = num_tiles * (head_dim - dims.numel())
    zeros = torch.zeros_like(energy)
    band_mean_square = band_energy / band_count if band_count else zeros
    rest_mean_square = (torch.clamp(energy - band_energy, min=0.0) / rest_count
                        if rest_count else zeros)
    stand_in = rest_mean_square.sqrt()[..., None].repeat(1, 1, head_dim)
    stand_in[..., dims] = band_mean_square.sqrt()[..., None]
    return stand_in.unsqueeze(2)


def _temperatures(q_pooled_local, k_pooled, dims_by_band, cfg: PrismConfig, plan: ShardPlan,
                  group):
    """Contract §5 temperatures per band, (B, Hq) each, over ALL query tiles of the sequence.

    The key side reads the gathered pooled keys, as on one device. The query
    side needs sums of squares over every rank's query tiles: each rank sums
    its own per (batch, query head), over all dims and over each band, in
    float64 (so the order of summation does not matter at fp32 precision),
    and the sums are all-reduced.
    """
    b, hq = q_pooled_local.shape[:2]
    device = q_pooled_local.device
    if not cfg.calibrate:
        return [torch.full((b, hq), temperature, dtype=torch.float32, device=device)
                for temperature in (cfg.high_temperature, cfg.low_temperature)]
    head_dim = q_pooled_local.shape[-1]
    squares = q_pooled_local.double() ** 2
    energies = torch.stack([squares.sum(dim=(-2, -1))]
                           + [squares[..., dims].sum(dim=(-2, -1)) for dims in dims_by_band],
                           dim=-1)
    dist.all_reduce(energies, op=dist.ReduceOp.SUM, group=group)
    return [
        band_temperature(
            _pooled_query_stand_in(energies[..., 0], energies[..., band], dims, head_dim,
                                   plan.num_query_tiles),
            k_pooled, dims, cfg.eps)
        for band, dims in enumerate(dims_by_band, start=1)
    ]


def _select_rows(q_pooled_local, k_pooled, query_tiles, dims_by_band, taus, cfg: PrismConfig,
                 plan: ShardPlan) -> torch.Tensor:
    """Contract §6 for this rank's query tiles: (B, Hq, local query tiles, n_key_tiles) bool.

    Every row of the single-device mask depends only on its own pooled query,
    all pooled keys and the temperatures, so computing a subset of rows is
    exact. The admissible set and the forced tiles are the single-device ones
    of the whole sequence, restricted to these rows.
    """
    device = q_pooled_local.device
    grid = plan.tile_layout
    rows = query_tiles - grid.first_query_tile
    admissible = admissible_tiles(grid, plan.causal, device)[rows]
    forced = forced_tiles(grid, plan.causal, cfg.force_sink, cfg.force_diagonal, device)[rows]
    kept = []
    for dims, tau, threshold in zip(dims_by_band, taus,
                                    (cfg.high_threshold, cfg.low_threshold), strict=True):
        probs = band_probabilities(band_logits(q_pooled_local, k_pooled, dims, tau), admissible)
        kept.append(top_p_select(probs, admissible, threshold)[0])
    high, low = kept
    return (high | low | forced) & admissible


# ---------------------------------------------------------------------------
# Attention on each source's tiles, and the merge
# ---------------------------------------------------------------------------

def _attend(q, k, v, block_mask, block_size: int, causal: bool, scale: float):
    """Contract §7 on one source's keys: :func:`prism.block_sparse_attention` with its LSE.

    Returns the partial output in fp32, ready for :func:`_merge`, and the
    fp32 LSE (``-inf`` on rows that read nothing here).
    """
    out, lse = prism.block_sparse_attention(q, k, v, block_mask, block_size=block_size,
                                            causal=causal, scale=scale, return_lse=True)
    return out.float(), lse


def _merge(out, lse, part_out, part_lse):
    """Combine two partial softmaxes over disjoint keys by their log-sum-exps.

    ``lse = log(exp(lse_a) + exp(lse_b))`` and
    ``o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b``; rows that read no key
    on either side stay ``o = 0``, ``lse = -inf``.
    """
    total = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    merged = (torch.exp(lse - safe)[..., None] * out
              + torch.exp(part_lse - safe)[..., None] * part_out)
    return merged, total


# ---------------------------------------------------------------------------
# The public entry point
# ---------------------------------------------------------------------------

def context_parallel_prism_attention(q, k, v, group=None, config: PrismConfig | None = None, *,
                                     causal: bool = True, scale: float | None = None,
                                     layout: str = "contiguous", return_lse: bool = False,
                                     return_mask: bool = False, return_stats: bool = False,
                                     **overrides):
    """Prism attention on a sequence sharded across the ranks of ``group``.

    Every rank of ``group`` calls this with its own chunk; the concatenated
    result equals :func:`prism.reference.prism_attention` on the whole
    sequence: the same mask up to contract §6 boundary ties, outputs within the
    dtype tolerance.

    Parameters
    ----------
    q : Tensor (B, Hq, local Nq, D)
        This rank's queries after RoPE (applied at their global positions).
    k : Tensor (B, Hkv, local Nk, D)
        This rank's keys after RoPE, un-repeated (``Hq % Hkv == 0``).
    v : Tensor (B, Hkv, local Nk, Dv)
    group : torch.distributed.ProcessGroup, optional
        Defaults to the default group. Use ``gloo`` for CPU tensors, ``nccl``
        for CUDA tensors.
    config : PrismConfig, optional
    causal : bool
        Causal queries are the last ``Nq`` of the ``Nk`` global positions.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    layout : {"contiguous", "zigzag"}
        How the sequence is sharded; see :class:`ShardPlan` for the contract.
        :meth:`ShardPlan.split` followed by :meth:`ShardPlan.shard` produces
        conforming chunks.
    return_lse : bool
        Also return the fp32 log-sum-exp, (B, Hq, local Nq).
    return_mask : bool
        Also return this rank's rows of the selected tile mask,
        (B, Hq, local query tiles, n_key_tiles) bool; row ``i`` is absolute
        tile ``plan.tiles(rank, "query")[i]``, i.e. row
        ``plan.tiles(rank, "query")[i] - plan.first_query_tile`` of the
        single-device mask.
    return_stats : bool
        Also return a :class:`CommunicationStats`.
    **overrides
        Any :class:`PrismConfig` field.

    Returns
    -------
    o : Tensor (B, Hq, local Nq, Dv), dtype of ``q``
        Or a tuple ``(o, lse, mask, stats)`` keeping only the items asked for,
        in that order.

    Raises
    ------
    ValueError, TypeError
        On contract §8 bad input on any rank, inputs that differ across ranks
        (batch, heads, head dims, dtype, causal, layout, scale, config), or
        local lengths that break the sharding contract. Every rank raises, so
        none is left waiting in a collective.

    Notes
    -----
    Collectives, in order: one all-gather of a small metadata vector, one
    all-gather of the pooled keys (fp32), one all-reduce of the query
    energies (when calibrating), one ``all_to_all_single`` of request flags
    and one ``all_to_all_single`` of the selected K/V tiles, which overlaps
    with attention on the rank's own tiles.
    """
    group, rank, world_size = _check_group(group)
    device = _collective_device(q, group)
    cfg, query_lengths, key_lengths = _exchange_metadata(
        q, k, v, config, overrides, causal, scale, layout, group, world_size, device)
    # Every rank sees the same lengths, so every rank raises the same error here.
    plan = ShardPlan.from_local_lengths(query_lengths, key_lengths, layout=layout,
                                        block_size=cfg.block_size, causal=causal)
    b, hq, nq_local, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    n_key_tiles = plan.num_key_tiles
    query_tiles = plan.tiles(rank, "query").to(device)
    key_tiles_own = plan.tiles(rank, "key").to(device)

    pooled, requests, calibration = _metadata_bytes(plan, rank, b, hq, hkv, d, cfg.calibrate)
    ring_bytes = b * hkv * (plan.num_keys - k.shape[2]) * (d + dv) * q.element_size()
    if plan.num_queries == 0 or plan.num_keys == 0:
        out = torch.zeros(b, hq, nq_local, dv, dtype=q.dtype, device=device)
        lse = torch.full((b, hq, nq_local), float("-inf"), dtype=torch.float32, device=device)
        mask = torch.zeros(b, hq, query_tiles.numel(), n_key_tiles, dtype=torch.bool,
                           device=device)
        stats = CommunicationStats(rank, world_size, 0, 0, 0, 0, 0, 0, 0, 0, ring_bytes)
        return _package(out, lse, mask, stats, return_lse, return_mask, return_stats)

    # Stage 1 (contract §3): pool the local tiles; gather every rank's pooled keys.
    q_pooled = _pool_segments(q, plan.segments(rank, "query"), cfg.block_size)
    k_pooled_own = _pool_segments(k, plan.segments(rank, "key"), cfg.block_size)
    k_pooled = _all_gather_pooled_keys(k_pooled_own, plan, group)

    # Stages 2-3 (contract §4-§5): bands and temperatures from global energies.
    dims_by_band = band_dims(d, cfg.high_dim, cfg.low_dim, cfg.rope_layout, device)
    taus = _temperatures(q_pooled, k_pooled, dims_by_band, cfg, plan, group)

    # Stage 4 (contract §6): this rank's rows of the mask.
    mask = _select_rows(q_pooled, k_pooled, query_tiles, dims_by_band, taus, cfg, plan)

    # Stage 5: request the selected remote (batch, KV head, key tile) entries.
    # A KV head needs a tile when any of its query heads selects it for any
    # local query tile.
    need = mask.view(b, hkv, hq // hkv, query_tiles.numel(), n_key_tiles).any(dim=3).any(dim=2)
    tiles_of = [plan.tiles(r, "key").to(device) for r in range(world_size)]
    need_from = [need[:, :, tiles_of[r]] for r in range(world_size)]
    asked = [torch.zeros_like(need_from[r]) if r == rank else need_from[r]
             for r in range(world_size)]
    request_send = torch.cat([a.flatten() for a in asked]).to(torch.uint8)
    own_entries = b * hkv * key_tiles_own.numel()
    request_recv = torch.empty(world_size * own_entries, dtype=torch.uint8, device=device)
    dist.all_to_all_single(request_recv, request_send,
                           output_split_sizes=[own_entries] * world_size,
                           input_split_sizes=[a.numel() for a in asked], group=group)
    requested_by = request_recv.view(world_size, b, hkv, key_tiles_own.numel()).bool()

    # Stage 6: serve the requested tiles and receive ours, K and V in one buffer.
    kv_grid = torch.cat([_tile_grid(k, plan.segments(rank, "key"), cfg.block_size),
                         _tile_grid(v, plan.segments(rank, "key"), cfg.block_size)], dim=-1)
    served = [_serve(kv_grid, requested_by[r]) for r in range(world_size)]
    tile_shape = (cfg.block_size, d + dv)
    send = torch.cat(served)
    recv_counts = [int(a.sum()) for a in asked]
    recv = kv_grid.new_empty(sum(recv_counts), *tile_shape)
    pending = dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_counts,
                                     input_split_sizes=[s.shape[0] for s in served],
                                     group=group, async_op=True)

    # Stage 7 (contract §7): attend to our own keys while the remote tiles
    # travel, then to each source's tiles, merging the partial softmaxes by
    # their LSE. The reference computes in fp32; the CUDA kernel takes the
    # input dtype.
    compute = q.dtype if q.is_cuda else torch.float32
    queries = q.to(compute)
    # Our own keys are the local k and v: their tiles are ``key_tiles_own`` in
    # order and, when causal, our queries are their last ``Nq`` positions, so
    # the single-device rule (bottom-right alignment) holds locally.
    out, lse = _attend(queries, k.to(compute), v.to(compute), mask[..., key_tiles_own],
                       cfg.block_size, causal, scale)
    # A remote key tile is never one of our query tiles (tiles are not split
    # between ranks) and, when causal, precedes all of them, so its keys are
    # read without a causal cut. Zero rows in front of our first query align
    # our query tiles with the tile grid when they start inside a tile.
    segments = plan.segments(rank, "query")
    lead = segments[0][0] % cfg.block_size if segments else 0
    aligned = F.pad(queries, (0, 0, lead, 0)) if lead else queries
    pending.wait()
    offsets = [0]
    for count in recv_counts:
        offsets.append(offsets[-1] + count)
    for source in range(world_size):
        if source == rank:
            continue
        received = _received_keys(recv[offsets[source]:offsets[source + 1]],
                                  need_from[source], tiles_of[source], plan, compute)
        if received is None:
            continue
        tiles, kv = received
        part_out, part_lse = _attend(aligned, kv[..., :d], kv[..., d:], mask[..., tiles],
                                     cfg.block_size, False, scale)
        out, lse = _merge(out, lse, part_out[:, :, lead:], part_lse[:, :, lead:])

    tile_bytes = cfg.block_size * (d + dv) * q.element_size()
    received = sum(recv_counts)
    sent = sum(s.shape[0] for r, s in enumerate(served) if r != rank)
    stats = CommunicationStats(
        rank=rank, world_size=world_size, kv_tiles_received=received, kv_tiles_sent=sent,
        admissible_kv_tiles=b * hkv * plan.admissible_remote_tiles(rank),
        kv_bytes_received=received * tile_bytes, kv_bytes_sent=sent * tile_bytes,
        pooled_key_bytes=pooled, request_bytes=requests, calibration_bytes=calibration,
        ring_kv_bytes=ring_bytes,
    )
    return _package(out.to(q.dtype), lse, mask, stats, return_lse, return_mask, return_stats)


def _package(out, lse, mask, stats, return_lse, return_mask, return_stats):
    extras = [item for item, wanted in ((lse, return_lse), (mask, return_mask),
                                        (stats, return_stats)) if wanted]
    return (out, *extras) if extras else out
