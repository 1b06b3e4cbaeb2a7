"""Context-parallel Prism attention: the sequence sharded across ranks.

At a million tokens the K/V of one layer no longer fits next to the
activations of one GPU, so prefill shards the sequence. Ring attention then
passes every K/V chunk to every rank. Prism needs less: a query tile reads
only the key tiles its selection keeps, and the selection reads only the
*pooled* keys, one ``D``-vector per tile. Each rank therefore

1. all-gathers the pooled key tiles (``bs`` times smaller than K, V not at all)
   and all-reduces the query energies that SPEC 5's calibration needs;
2. selects its query tiles' key tiles locally, reproducing the single-device
   :func:`prism.reference.select_blocks` mask;
3. asks each owner for the (batch, KV head, key tile) entries it selected and
   receives only those K/V tiles (one ``all_to_all_single`` with split sizes);
4. runs block-sparse attention against each source's tiles, with the
   log-sum-exp, and merges the partial results:
   ``lse = log sum_s exp(lse_s)``, ``o = sum_s exp(lse_s - lse) o_s``.

The K/V traffic scales with how many remote tiles a rank selects instead of
with the sequence length. :func:`communication_volume` models that traffic
against ring attention; :class:`CommunicationStats` reports what a call moved.

This module is the CPU-checked reference of the algorithm (any backend:
``gloo`` on CPU tensors, ``nccl`` on CUDA tensors); it computes in fp32 with
plain PyTorch, like :mod:`prism.reference`.

Sharding contract
-----------------
See :class:`ShardPlan`. In short: positions live on one absolute tile grid
(SPEC 3). The key sequence is cut into tile-aligned *chunks*, and each rank
holds its chunks concatenated in order. ``layout="contiguous"``: one chunk per
rank, rank order equals sequence order, and every chunk's length is a multiple
of ``block_size`` unless the chunk ends the sequence. ``layout="zigzag"``: the
tile grid is cut into ``2 W`` near-equal runs of tiles and rank ``r`` holds
runs ``r`` and ``2 W - 1 - r``, which balances causal work. When causal, a
rank holds exactly the queries whose positions fall inside its key chunks, so
a KV prefix (``Nk > Nq``) is supported: the ranks holding prefix positions hold
fewer (or no) queries. When non-causal, queries and keys are two independent
grids, each sharded by the same layout rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from prism.reference import (
    PrismConfig,
    band_dims,
    band_logits,
    band_probabilities,
    pool_tiles,
    resolve_config,
    top_p_select,
)
from prism.reference.validation import FLOAT_DTYPES, validate_qkv, validate_scale

__all__ = [
    "LAYOUTS",
    "ShardPlan",
    "CommunicationStats",
    "CommunicationModel",
    "context_parallel_prism_attention",
    "communication_volume",
    "kv_tiles_to_fetch",
]

#: Supported ways of cutting the sequence across ranks.
LAYOUTS = ("contiguous", "zigzag")
ROLES = ("query", "key")

# Rows of queries handled at once so the fp32 (rows x fetched keys) score
# matrix stays near this many bytes per source, whatever the sequence length.
_CHUNK_BYTES = 256 * 2**20

# Bytes of the fp32 pooled key vectors that are all-gathered (kept in fp32, as
# the reference keeps them, so the selection sees the same numbers).
_POOLED_BYTES = 4
# Bytes of one request flag (bool) per (batch, KV head, key tile).
_REQUEST_BYTES = 1
# Bytes of one calibration energy (float64) all-reduced per (batch, q head, kind).
_ENERGY_BYTES = 8
_ENERGY_KINDS = 3  # all dims, high band, low band


# ---------------------------------------------------------------------------
# The sharding contract
# ---------------------------------------------------------------------------

Segment = tuple[int, int]  # (first absolute position, number of tokens)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(
            f"layout must be one of {LAYOUTS}, got {layout!r}; use 'zigzag' for causal "
            "load balance or 'contiguous' for one chunk per rank in rank order"
        )


def _check_role(role) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be 'query' or 'key', got {role!r}")


def _run_chunks(num_tokens: int, num_runs: int, block_size: int) -> list[Segment]:
    """Cut ``ceil(num_tokens / bs)`` tiles into ``num_runs`` near-equal runs, as tokens.

    Run ``i`` holds tiles ``floor(i T / R) .. floor((i + 1) T / R) - 1``; only the
    last run can hold a partial tile, and it is never empty when ``T >= 1``.
    """
    num_tiles = -(-num_tokens // block_size)
    runs = []
    for i in range(num_runs):
        first = i * num_tiles // num_runs * block_size
        end = min((i + 1) * num_tiles // num_runs * block_size, num_tokens)
        runs.append((first, max(0, end - first)))
    return runs


def _layout_segments(num_tokens: int, world_size: int, layout: str,
                     block_size: int) -> list[tuple[Segment, ...]]:
    """The canonical chunks of each rank for a grid of ``num_tokens`` positions."""
    if layout == "contiguous":
        return [(run,) for run in _run_chunks(num_tokens, world_size, block_size)]
    runs = _run_chunks(num_tokens, 2 * world_size, block_size)
    return [(runs[r], runs[2 * world_size - 1 - r]) for r in range(world_size)]


def _contiguous_segments(lengths: list[int], block_size: int, role: str,
                         num_tokens: int) -> list[tuple[Segment, ...]]:
    """Chunks of a user-chosen contiguous split, checked to be tile-aligned."""
    segments = []
    start = 0
    for rank, length in enumerate(lengths):
        if length % block_size and start + length != num_tokens:
            raise ValueError(
                f"rank {rank} holds {length} {role} tokens starting at position {start}; "
                f"with layout='contiguous' every rank's chunk must be a whole number of tiles "
                f"(a multiple of block_size={block_size}) unless it ends the sequence; "
                f"got per-rank lengths {lengths}. Move tokens between neighbouring ranks or "
                "shard with ShardPlan.split(...).shard(...)"
            )
        segments.append(((start, length),))
        start += length
    return segments


def _clip_segments(segments: tuple[Segment, ...], lo: int, hi: int) -> tuple[Segment, ...]:
    """Intersect each chunk with positions ``lo .. hi - 1`` (empty chunks dropped)."""
    clipped = []
    for start, length in segments:
        first, end = max(start, lo), min(start + length, hi)
        if end > first:
            clipped.append((first, end - first))
    return tuple(clipped)


def _drop_empty(segments: tuple[Segment, ...]) -> tuple[Segment, ...]:
    return tuple(s for s in segments if s[1] > 0)


@dataclass(frozen=True)
class ShardPlan:
    """Which positions each rank holds, for queries and for keys.

    Positions are absolute on SPEC 3's tile grid: when causal, query row ``r``
    of the whole sequence sits at ``Nk - Nq + r`` on the key grid; when
    non-causal, queries have their own grid ``0 .. Nq - 1``. A *segment* is
    ``(first position, length)``; a rank's local tensor is its segments
    concatenated in order.

    The contract every plan satisfies (and :meth:`from_local_lengths` checks):

    * every segment starts on a tile boundary (the first query segment of a
      causal plan excepted: it may start inside the tile where the queries
      begin), and only a segment that ends the grid may end inside a tile, so
      no tile is split between ranks;
    * ``contiguous``: one segment per rank, in rank order, any tile-multiple
      lengths (trailing empty ranks allowed);
    * ``zigzag``: ``ceil(N / bs)`` tiles cut into ``2 W`` runs, run ``i`` holding
      tiles ``floor(i T / 2W) .. floor((i+1) T / 2W) - 1``; rank ``r`` holds runs
      ``r`` and ``2W - 1 - r`` (with ``T`` divisible by ``2W`` this is the usual
      zigzag of equal chunks);
    * causal: a rank holds exactly the queries whose positions lie in its key
      segments, so a KV prefix is held, without queries, by whichever ranks
      hold its positions; non-causal: queries are sharded by the layout rule on
      their own grid, independently of the keys.

    Attributes
    ----------
    layout : {"contiguous", "zigzag"}
    block_size : int
    causal : bool
    num_queries, num_keys : int
        ``Nq`` and ``Nk`` of the whole (concatenated) sequence.
    query_segments, key_segments : tuple of tuple of (int, int)
        Per rank, its segments in local order.

    Examples
    --------
    >>> plan = ShardPlan.split(64, 64, world_size=2, layout="zigzag", block_size=16,
    ...                        causal=True)
    >>> plan.key_segments
    (((0, 16), (48, 16)), ((16, 16), (32, 16)))
    >>> plan.tiles(0, "key").tolist(), plan.local_lengths("query")
    ([0, 3], [32, 32])
    >>> ShardPlan.split(40, 64, world_size=2, block_size=16).query_segments
    (((24, 8),), ((32, 32),))
    """

    layout: str
    block_size: int
    causal: bool
    num_queries: int
    num_keys: int
    query_segments: tuple[tuple[Segment, ...], ...]
    key_segments: tuple[tuple[Segment, ...], ...]

    # -- construction -------------------------------------------------------

    @classmethod
    def split(cls, num_queries: int, num_keys: int, world_size: int, *,
              layout: str = "contiguous", block_size: int = 128,
              causal: bool = True) -> ShardPlan:
        """The balanced plan for a sequence of ``num_queries`` queries and ``num_keys`` keys.

        ``contiguous`` gives rank ``r`` the tiles ``floor(r T / W) .. floor((r+1) T / W) - 1``;
        ``zigzag`` is described in the class docstring.

        Raises
        ------
        ValueError, TypeError
            Bad sizes, an unknown layout, or ``num_queries > num_keys`` when causal.
        """
        _check_int("num_queries", num_queries, 0)
        _check_int("num_keys", num_keys, 0)
        _check_int("world_size", world_size, 1)
        _check_int("block_size", block_size, 1)
        _check_layout(layout)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be True or False, got {causal!r}")
        if causal and num_queries > num_keys:
            raise ValueError(
                f"causal attention needs num_queries <= num_keys, got {num_queries} > "
                f"{num_keys}; the queries are the last num_queries positions"
            )
        keys = _layout_segments(num_keys, world_size, layout, block_size)
        if causal:
            queries = [_clip_segments(s, num_keys - num_queries, num_keys) for s in keys]
        else:
            queries = _layout_segments(num_queries, world_size, layout, block_size)
        return cls(layout, block_size, causal, num_queries, num_keys,
                   tuple(_drop_empty(tuple(s)) for s in queries),
                   tuple(_drop_empty(tuple(s)) for s in keys))

    @classmethod
    def from_local_lengths(cls, query_lengths, key_lengths, *, layout: str = "contiguous",
                           block_size: int = 128, causal: bool = True) -> ShardPlan:
        """Rebuild the plan from each rank's local token counts, checking the contract.

        Parameters
        ----------
        query_lengths, key_lengths : sequence of int, one per rank
            Local ``Nq`` and ``Nk`` of each rank, in rank order.
        layout, block_size, causal
            As in :meth:`split`.

        Raises
        ------
        ValueError
            If the lengths do not follow the contract; the message gives the
            lengths that would.
        """
        query_lengths = [int(n) for n in query_lengths]
        key_lengths = [int(n) for n in key_lengths]
        _check_int("block_size", block_size, 1)
        _check_layout(layout)
        if len(query_lengths) != len(key_lengths) or not key_lengths:
            raise ValueError(
                f"need one query length and one key length per rank, got "
                f"{len(query_lengths)} and {len(key_lengths)}"
            )
        if min(query_lengths + key_lengths) < 0:
            raise ValueError(f"lengths must be >= 0, got {query_lengths} and {key_lengths}")
        world_size = len(key_lengths)
        num_queries, num_keys = sum(query_lengths), sum(key_lengths)
        if causal and num_queries > num_keys:
            raise ValueError(
                f"causal attention needs the total query count <= the total key count, got "
                f"{num_queries} queries > {num_keys} keys (per rank: {query_lengths} and "
                f"{key_lengths}); pass every rank's whole key chunk, prefix included"
            )

        def canonical(role, lengths, total):
            if layout == "contiguous":
                return _contiguous_segments(lengths, block_size, role, total)
            expected = _layout_segments(total, world_size, layout, block_size)
            want = [sum(n for _, n in s) for s in expected]
            if want != lengths:
                raise ValueError(
                    f"with layout='zigzag' and {total} {role} tokens on {world_size} ranks the "
                    f"per-rank {role} lengths must be {want} (tiles cut into {2 * world_size} "
                    f"near-equal runs, rank r holding runs r and {2 * world_size - 1}-r), got "
                    f"{lengths}; shard with ShardPlan.split(...).shard(...)"
                )
            return expected

        keys = canonical("key", key_lengths, num_keys)
        if causal:
            prefix = num_keys - num_queries
            queries = [_clip_segments(s, prefix, num_keys) for s in keys]
            want = [sum(n for _, n in s) for s in queries]
            if want != query_lengths:
                raise ValueError(
                    f"causal: each rank must hold the queries at the positions of its own keys "
                    f"(the queries are the last {num_queries} of {num_keys} positions), so the "
                    f"per-rank query lengths must be {want}, got {query_lengths}; a KV prefix "
                    "sits on the ranks that hold its positions, with no queries there"
                )
        else:
            queries = canonical("query", query_lengths, num_queries)
        return cls(layout, block_size, causal, num_queries, num_keys,
                   tuple(_drop_empty(tuple(s)) for s in queries),
                   tuple(_drop_empty(tuple(s)) for s in keys))

    # -- geometry -----------------------------------------------------------

    @property
    def world_size(self) -> int:
        return len(self.key_segments)

    @property
    def query_start(self) -> int:
        """Absolute position of query row 0: ``Nk - Nq`` when causal, else 0."""
        return self.num_keys - self.num_queries if self.causal else 0

    @property
    def num_key_tiles(self) -> int:
        return -(-self.num_keys // self.block_size)

    @property
    def num_query_tiles(self) -> int:
        """Query tiles of the whole sequence (the rows of the single-device mask)."""
        if self.num_queries == 0:
            return 0
        bs, start = self.block_size, self.query_start
        return (start + self.num_queries - 1) // bs - start // bs + 1

    @property
    def first_query_tile(self) -> int:
        return self.query_start // self.block_size

    def segments(self, rank: int, role: str) -> tuple[Segment, ...]:
        """The segments of ``rank`` for ``role`` in ``("query", "key")``."""
        _check_role(role)
        self._check_rank(rank)
        return (self.query_segments if role == "query" else self.key_segments)[rank]

    def local_lengths(self, role: str) -> list[int]:
        """Local token count of every rank, in rank order."""
        return [sum(n for _, n in self.segments(r, role)) for r in range(self.world_size)]

    def positions(self, rank: int, role: str) -> torch.Tensor:
        """Absolute position of each local row, int64 of shape (local N,)."""
        parts = [torch.arange(s, s + n) for s, n in self.segments(rank, role)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def tiles(self, rank: int, role: str) -> torch.Tensor:
        """Absolute index of each local tile, in local order, int64 of shape (local tiles,)."""
        bs = self.block_size
        parts = [torch.arange(s // bs, (s + n - 1) // bs + 1) for s, n in self.segments(rank, role)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def key_tile_owners(self) -> torch.Tensor:
        """Rank that holds each key tile, int64 of shape (n_key_tiles,)."""
        owner = torch.empty(self.num_key_tiles, dtype=torch.int64)
        for rank in range(self.world_size):
            owner[self.tiles(rank, "key")] = rank
        return owner

    def _check_rank(self, rank) -> None:
        _check_int("rank", rank, 0)
        if rank >= self.world_size:
            raise ValueError(f"rank must be < world_size={self.world_size}, got {rank}")

    # -- moving tensors -----------------------------------------------------

    def _rows(self, rank: int, role: str) -> list[Segment]:
        """Segments as row ranges of the whole query (or key) tensor."""
        offset = self.query_start if role == "query" else 0
        return [(s - offset, n) for s, n in self.segments(rank, role)]

    def shard(self, x: torch.Tensor, rank: int, role: str, dim: int = 2) -> torch.Tensor:
        """Rank ``rank``'s local part of the whole tensor ``x`` (rows along ``dim``).

        Parameters
        ----------
        x : Tensor
            The whole query tensor (``Nq`` rows along ``dim``) or key/value
            tensor (``Nk`` rows), e.g. (B, H, N, D) with ``dim=2``.
        rank : int
        role : {"query", "key"}
            Values are sharded like keys.
        """
        _check_role(role)
        total = self.num_queries if role == "query" else self.num_keys
        if x.shape[dim] != total:
            raise ValueError(
                f"x has {x.shape[dim]} rows along dim {dim} but the plan has {total} "
                f"{role} tokens; pass the whole {role} tensor"
            )
        pieces = [x.narrow(dim, row, n) for row, n in self._rows(rank, role)]
        if not pieces:
            return x.narrow(dim, 0, 0)
        return torch.cat(pieces, dim=dim)

    def unshard(self, chunks, role: str, dim: int = 2) -> torch.Tensor:
        """Reassemble the whole tensor from every rank's local part (inverse of :meth:`shard`)."""
        _check_role(role)
        chunks = list(chunks)
        if len(chunks) != self.world_size:
            raise ValueError(f"need {self.world_size} chunks, one per rank, got {len(chunks)}")
        expected = self.local_lengths(role)
        got = [c.shape[dim] for c in chunks]
        if got != expected:
            raise ValueError(f"chunk lengths along dim {dim} must be {expected}, got {got}")
        placed = []
        for rank, chunk in enumerate(chunks):
            local = 0
            for row, n in self._rows(rank, role):
                placed.append((row, chunk.narrow(dim, local, n)))
                local += n
        placed.sort(key=lambda item: item[0])
        if not placed:
            return chunks[0]
        return torch.cat([piece for _, piece in placed], dim=dim)

    # -- communication geometry --------------------------------------------

    def admissible_remote_tiles(self, rank: int) -> int:
        """Key tiles held elsewhere that some local query tile may select (SPEC 6).

        Causal: the remote key tiles up to the rank's last query tile.
        Non-causal: every remote key tile.
        """
        own = self.tiles(rank, "key")
        if not self.causal:
            return self.num_key_tiles - own.numel()
        query_tiles = self.tiles(rank, "query")
        if query_tiles.numel() == 0:
            return 0
        last = int(query_tiles.max())
        return (last + 1) - int((own <= last).sum())


# ---------------------------------------------------------------------------
# Communication statistics and the volume model
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CommunicationStats:
    """What one rank moved in one :func:`context_parallel_prism_attention` call.

    Counts are of (batch, KV head, key tile) entries; each carries a whole
    K tile and V tile, ``block_size * (D + Dv)`` elements of the input dtype.
    Bytes count payload only (no transport headers). ``*_received`` is what
    arrives at this rank.

    Attributes
    ----------
    rank, world_size : int
    kv_tiles_received, kv_tiles_sent : int
        Remote K/V tile entries fetched by this rank, and served to others.
    admissible_kv_tiles : int
        ``B * Hkv * admissible remote key tiles``: the most a rank could fetch.
    kv_bytes_received, kv_bytes_sent : int
    pooled_key_bytes : int
        The fp32 pooled keys all-gathered from the other ranks (padded to the
        largest rank's tile count, as the collective needs equal sizes).
    request_bytes : int
        Request flags received from the other ranks (one byte per entry of
        this rank's tiles).
    calibration_bytes : int
        The float64 query energies all-reduced (a ring all-reduce moves about
        ``2 (W - 1) / W`` times the vector).
    ring_kv_bytes : int
        What ring attention would bring to this rank: every remote K and V
        token, ``B * Hkv * (Nk - local Nk) * (D + Dv) * itemsize``.
    """

    rank: int
    world_size: int
    kv_tiles_received: int
    kv_tiles_sent: int
    admissible_kv_tiles: int
    kv_bytes_received: int
    kv_bytes_sent: int
    pooled_key_bytes: int
    request_bytes: int
    calibration_bytes: int
    ring_kv_bytes: int

    @property
    def metadata_bytes(self) -> int:
        """Everything received besides K/V tiles."""
        return self.pooled_key_bytes + self.request_bytes + self.calibration_bytes

    @property
    def total_bytes_received(self) -> int:
        return self.kv_bytes_received + self.metadata_bytes

    @property
    def fetched_fraction(self) -> float:
        """Fetched remote K/V entries over the admissible ones (0 when none are admissible)."""
        if self.admissible_kv_tiles == 0:
            return 0.0
        return self.kv_tiles_received / self.admissible_kv_tiles

    @property
    def ratio_to_ring(self) -> float:
        """``total_bytes_received / ring_kv_bytes`` (inf when ring would move nothing)."""
        if self.ring_kv_bytes == 0:
            return math.inf if self.total_bytes_received else 0.0
        return self.total_bytes_received / self.ring_kv_bytes


def _metadata_bytes(plan: ShardPlan, rank: int, batch: int, q_heads: int, kv_heads: int,
                    head_dim: int, calibrate: bool) -> tuple[int, int, int]:
    """(pooled key, request, calibration) bytes received by ``rank``: one formula for both
    the measured statistics and the model."""
    world = plan.world_size
    max_tiles = max(plan.tiles(r, "key").numel() for r in range(world))
    own_tiles = plan.tiles(rank, "key").numel()
    pooled = (world - 1) * batch * kv_heads * max_tiles * head_dim * _POOLED_BYTES
    requests = (world - 1) * batch * kv_heads * own_tiles * _REQUEST_BYTES
    energies = batch * q_heads * _ENERGY_KINDS * _ENERGY_BYTES
    calibration = (2 * (world - 1) * energies) // world if calibrate else 0
    return pooled, requests, calibration


@dataclass(frozen=True)
class CommunicationModel:
    """Modelled bytes received per rank by ring attention and by context-parallel Prism.

    Produced by :func:`communication_volume`. A model, not a measurement:
    ``density`` is an assumption about the selection, and transport overheads
    are ignored. Tuples hold one value per rank.

    Attributes
    ----------
    num_tokens, world_size : int
    density : float
    layout : str
    causal : bool
    ring_bytes : tuple of int
        K and V of every remote token.
    prism_kv_bytes : tuple of float
        ``density * admissible remote tiles * B * Hkv * bs * (D + Dv) * itemsize``.
    prism_metadata_bytes : tuple of int
        Pooled keys, requests and calibration energies.
    """

    num_tokens: int
    world_size: int
    density: float
    layout: str
    causal: bool
    ring_bytes: tuple[int, ...]
    prism_kv_bytes: tuple[float, ...]
    prism_metadata_bytes: tuple[int, ...]

    @property
    def prism_bytes(self) -> tuple[float, ...]:
        return tuple(kv + meta for kv, meta in zip(self.prism_kv_bytes,
                                                   self.prism_metadata_bytes, strict=True))

    @property
    def ring_max(self) -> int:
        """The busiest rank's ring traffic (every rank waits for it)."""
        return max(self.ring_bytes)

    @property
    def prism_max(self) -> float:
        return max(self.prism_bytes)

    @property
    def ratio(self) -> float:
        """Total Prism bytes over total ring bytes."""
        return sum(self.prism_bytes) / sum(self.ring_bytes)


def communication_volume(num_tokens: int, world_size: int, density: float, *, batch: int = 1,
                         q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                         value_dim: int | None = None, block_size: int = 128,
                         bytes_per_element: int = 2, causal: bool = True,
                         layout: str = "zigzag", calibrate: bool = True) -> CommunicationModel:
    """Model the bytes each rank receives, ring attention versus context-parallel Prism.

    Ring attention brings every remote K/V token to every rank::

        ring[r] = B * Hkv * (N - N_r) * (D + Dv) * itemsize

    Prism brings the selected remote K/V tiles plus small metadata::

        prism[r] = density * A_r * B * Hkv * bs * (D + Dv) * itemsize
                 + (W - 1) * B * Hkv * max_r(T_r) * D * 4     # pooled keys, fp32
                 + (W - 1) * B * Hkv * T_r                    # request flags
                 + 2 (W - 1) / W * B * Hq * 3 * 8             # query energies

    where ``T_r`` is rank ``r``'s key tile count and ``A_r`` the remote key
    tiles some local query tile may select (:meth:`ShardPlan.admissible_remote_tiles`).

    Parameters
    ----------
    num_tokens : int
        Sequence length ``N`` (``Nq = Nk = N``).
    world_size : int
        Number of ranks ``W``.
    density : float in [0, 1]
        Assumed fraction of a rank's admissible remote (KV head, key tile)
        entries that at least one of its (query tile, query head) pairs
        selects. This *union* density is at least the per-pair mask density;
        it equals it when all of a rank's query tiles pick the same remote
        tiles, and is larger when they pick different ones.
    batch, q_heads, kv_heads, head_dim, value_dim, block_size
        Shapes; ``value_dim`` defaults to ``head_dim``. Defaults are
        Llama-3.1-8B's attention (32 query heads, 8 KV heads, D = 128).
    bytes_per_element : int
        K/V element size, 2 for bf16.
    causal : bool
    layout : {"contiguous", "zigzag"}
    calibrate : bool
        Whether the query energies are all-reduced (SPEC 5 on).

    Returns
    -------
    CommunicationModel

    Examples
    --------
    >>> m = communication_volume(131072, 8, 0.1)
    >>> round(m.ring_max / 2**30, 3), round(m.prism_max / 2**30, 3)
    (0.438, 0.047)
    """
    _check_int("num_tokens", num_tokens, 1)
    _check_int("world_size", world_size, 1)
    for name, value in (("batch", batch), ("q_heads", q_heads), ("kv_heads", kv_heads),
                        ("head_dim", head_dim), ("block_size", block_size),
                        ("bytes_per_element", bytes_per_element)):
        _check_int(name, value, 1)
    value_dim = head_dim if value_dim is None else value_dim
    _check_int("value_dim", value_dim, 1)
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in [0, 1], got {type(density).__name__}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    plan = ShardPlan.split(num_tokens, num_tokens, world_size, layout=layout,
                           block_size=block_size, causal=causal)
    token_bytes = batch * kv_heads * (head_dim + value_dim) * bytes_per_element
    ring, prism_kv, meta = [], [], []
    for rank in range(world_size):
        ring.append((num_tokens - plan.local_lengths("key")[rank]) * token_bytes)
        prism_kv.append(density * plan.admissible_remote_tiles(rank) * block_size * token_bytes)
        meta.append(sum(_metadata_bytes(plan, rank, batch, q_heads, kv_heads, head_dim,
                                        calibrate)))
    return CommunicationModel(num_tokens, world_size, float(density), layout, causal,
                              tuple(ring), tuple(prism_kv), tuple(meta))


def kv_tiles_to_fetch(mask: torch.Tensor, plan: ShardPlan, kv_heads: int) -> list[int]:
    """Remote K/V tile entries each rank would fetch, from a single-device mask.

    Runs on one device: compute ``select_blocks`` on the whole sequence (e.g.
    from a real model's activations) to estimate the traffic of a sharded run
    without launching one.

    Parameters
    ----------
    mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
        The mask of the whole sequence, as :func:`prism.reference.select_blocks`
        returns it for ``plan``'s sizes, block size and causality.
    plan : ShardPlan
    kv_heads : int
        ``Hkv``; query head ``h`` reads KV head ``h // (Hq // Hkv)``.

    Returns
    -------
    list of int
        Per rank, the (batch, KV head, key tile) entries held by other ranks
        that some local query tile of some query head in the group selects.
    """
    b, hq, nqt, nkt = mask.shape
    if (nqt, nkt) != (plan.num_query_tiles, plan.num_key_tiles):
        raise ValueError(
            f"mask has {nqt} x {nkt} tiles but the plan has {plan.num_query_tiles} x "
            f"{plan.num_key_tiles}; build both with the same sizes, block_size and causal"
        )
    _check_int("kv_heads", kv_heads, 1)
    if hq % kv_heads:
        raise ValueError(f"mask has {hq} query heads, not a multiple of kv_heads={kv_heads}")
    owners = plan.key_tile_owners().to(mask.device)
    counts = []
    for rank in range(plan.world_size):
        rows = (plan.tiles(rank, "query") - plan.first_query_tile).to(mask.device)
        need = mask[:, :, rows].reshape(b, kv_heads, hq // kv_heads, rows.numel(), nkt)
        need = need.any(dim=3).any(dim=2)  # (B, Hkv, nk)
        counts.append(int((need & (owners != rank)).sum()))
    return counts


# ---------------------------------------------------------------------------
# Cross-rank checks
# ---------------------------------------------------------------------------

_DTYPE_CODES = {dtype: code for code, dtype in enumerate(FLOAT_DTYPES)}
_INPUT_FIELDS = ("batch", "q_heads", "kv_heads", "head_dim", "value_dim", "dtype", "causal",
                 "layout", "scale")
_CONFIG_FIELDS = ("block_size", "high_dim", "low_dim", "high_threshold", "low_threshold",
                  "calibrate", "high_temperature", "low_temperature", "force_sink",
                  "force_diagonal", "rope_layout", "eps")
# ok flag, the fields above, then the local query and key counts.
_META_SIZE = 1 + len(_INPUT_FIELDS) + len(_CONFIG_FIELDS) + 2


def _encode(value) -> float:
    if value is None:  # no valid setting is infinite, so None cannot collide
        return math.inf
    if isinstance(value, str):
        return float(("half", "interleaved", *LAYOUTS).index(value))
    return float(value)


def _describe_field(name: str, code: float) -> str:
    if name == "dtype":
        return str(FLOAT_DTYPES[int(code)])
    if name == "layout":
        return repr(("half", "interleaved", *LAYOUTS)[int(code)])
    if code == math.inf:
        return "None"
    return f"{code:g}"


def _check_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment "
            "for backend='nccl' on GPUs or 'gloo' on CPUs)"
        )
    if group is None:
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed.ProcessGroup or None (the default group), "
            f"got {type(group).__name__}"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            "this process is not a member of group; call only on the group's ranks"
        )
    return group, rank, dist.get_world_size(group)


def _collective_device(q, group) -> torch.device:
    if isinstance(q, torch.Tensor):
        return q.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_metadata(q, k, v, cfg: PrismConfig, causal, scale, layout) -> list[float]:
    """Check this rank's inputs (SPEC 8) and describe them for the cross-rank check."""
    validate_qkv(q, k, v, causal=False)  # local Nq may exceed local Nk; checked globally
    validate_scale(scale)
    _check_layout(layout)
    inputs = (q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3],
              _DTYPE_CODES[q.dtype], causal, layout, scale)
    config = tuple(getattr(cfg, name) for name in _CONFIG_FIELDS)
    return [1.0, *map(_encode, inputs + config), float(q.shape[2]), float(k.shape[2])]


def _exchange_metadata(q, k, v, config, overrides, causal, scale, layout, group, world_size,
                       device):
    """Validate locally, then agree across ranks; every rank raises if any rank is wrong.

    A rank that raised alone would leave the others blocked in the next
    collective, so local errors are shared through one all-gather first.
    """
    local_error = None
    row = [0.0] * _META_SIZE
    try:
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be True or False, got {causal!r}")
        cfg = resolve_config(config, **overrides)
        if cfg.estimator != "prism":
            raise ValueError(
                f"context_parallel_prism_attention implements estimator='prism' (SPEC v1) "
                f"only, got estimator={cfg.estimator!r}; use the single-device "
                "prism.prism_attention for the other estimators (docs/estimators.rst)"
            )
        row = _local_metadata(q, k, v, cfg, causal, scale, layout)
    except (TypeError, ValueError) as err:
        local_error = err
    gathered = [torch.empty(_META_SIZE, dtype=torch.float64, device=device)
                for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor(row, dtype=torch.float64, device=device), group=group)
    table = torch.stack(gathered).cpu()
    if local_error is not None:
        raise local_error
    failed = [r for r in range(world_size) if table[r, 0] != 1.0]
    if failed:
        raise ValueError(
            f"rank(s) {failed} rejected their inputs, so every rank stops here; see the "
            "error raised on those ranks"
        )
    names = _INPUT_FIELDS + _CONFIG_FIELDS
    for column, name in enumerate(names, start=1):
        values = table[:, column]
        differ = (values != values[0]).nonzero().flatten().tolist()
        if differ:
            r = differ[0]
            raise ValueError(
                f"{name} differs across ranks: rank 0 has {_describe_field(name, values[0])}, "
                f"rank {r} has {_describe_field(name, values[r])}; every rank must pass the "
                "same batch, heads, head dims, dtype, causal, layout, scale and config"
            )
    query_lengths = table[:, -2].long().tolist()
    key_lengths = table[:, -1].long().tolist()
    return cfg, query_lengths, key_lengths


# ---------------------------------------------------------------------------
# Stages of the algorithm
# ---------------------------------------------------------------------------

def _pool_segments(x: torch.Tensor, segments, block_size: int) -> torch.Tensor:
    """Pooled tiles (SPEC 3) of each local segment, concatenated: (B, H, local tiles, D) fp32."""
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


def _rms_from_energy(energy: torch.Tensor, count: int) -> torch.Tensor:
    if count == 0:
        return torch.zeros_like(energy, dtype=torch.float32)
    return torch.sqrt(energy / count).to(torch.float32)


def _band_rms(x: torch.Tensor) -> torch.Tensor:
    """RMS over tiles and dims, as the reference's calibration computes it: (B, H)."""
    count = x.shape[-2] * x.shape[-1]
    if count == 0:
        return torch.zeros(x.shape[:-2], dtype=torch.float32, device=x.device)
    return torch.sqrt((x.float() ** 2).sum(dim=(-2, -1)) / count)


def _temperatures(q_pooled_local, k_pooled, dims_by_band, cfg: PrismConfig, plan: ShardPlan,
                  group):
    """SPEC 5 temperatures per band, (B, Hq) each, with the query RMS over ALL query tiles.

    The key RMS reads the gathered pooled keys directly, exactly as the
    reference does; the query RMS needs sums of squares over every rank's
    query tiles, so those are all-reduced (in float64, to keep the order of
    summation from mattering at fp32 precision).
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
    group_size = hq // k_pooled.shape[1]
    n_tiles = plan.num_query_tiles
    rq = _rms_from_energy(energies[..., 0], n_tiles * head_dim)
    rk = _band_rms(k_pooled).repeat_interleave(group_size, dim=1)
    taus = []
    for index, dims in enumerate(dims_by_band, start=1):
        rq_band = _rms_from_energy(energies[..., index], n_tiles * dims.numel())
        rk_band = _band_rms(k_pooled[..., dims]).repeat_interleave(group_size, dim=1)
        tau = (math.sqrt(dims.numel() / head_dim)
               * (rq_band / torch.clamp(rq, min=cfg.eps))
               * (rk_band / torch.clamp(rk, min=cfg.eps)))
        taus.append(torch.clamp(tau, min=cfg.eps))
    return taus


def _select_local(q_pooled_local, k_pooled, query_tiles, dims_by_band, taus, cfg: PrismConfig,
                  causal: bool) -> torch.Tensor:
    """SPEC 6 for this rank's query tiles: (B, Hq, local query tiles, n_key_tiles) bool.

    Every row of the single-device mask depends only on its own pooled query,
    all pooled keys and the temperatures, so computing a subset of rows is
    exact.
    """
    device = q_pooled_local.device
    n_keys = k_pooled.shape[2]
    key_tiles = torch.arange(n_keys, device=device)
    if causal:
        admissible = key_tiles[None, :] <= query_tiles[:, None]
    else:
        admissible = torch.ones(query_tiles.numel(), n_keys, dtype=torch.bool, device=device)
    mask = torch.zeros(*q_pooled_local.shape[:3], n_keys, dtype=torch.bool, device=device)
    thresholds = (cfg.high_threshold, cfg.low_threshold)
    for dims, tau, threshold in zip(dims_by_band, taus, thresholds, strict=True):
        probs = band_probabilities(band_logits(q_pooled_local, k_pooled, dims, tau), admissible)
        keep, _ = top_p_select(probs, admissible, threshold)
        mask |= keep
    if n_keys and query_tiles.numel():
        if cfg.force_sink:
            mask[..., 0] = True
        if causal and cfg.force_diagonal:
            rows = torch.arange(query_tiles.numel(), device=device)
            mask[:, :, rows, query_tiles] = True
    return mask & admissible


def _serve(kv_grid: torch.Tensor, requested: torch.Tensor) -> torch.Tensor:
    """The requested K/V tiles, in (batch, KV head, local tile) order: (count, bs, D + Dv)."""
    b, h, t = requested.nonzero(as_tuple=True)
    return kv_grid[b, h, t]


@dataclass(frozen=True)
class _SourceTiles:
    """K/V tiles from one source rank, padded per (batch, KV head) to one count C.

    keys (B, Hkv, C * bs, D) and values (B, Hkv, C * bs, Dv) in fp32; tiles
    (B, Hkv, C * bs) holds each key's absolute tile (``n_key_tiles`` for a
    padding slot) and positions its absolute position (-1 for padding).
    """

    keys: torch.Tensor
    values: torch.Tensor
    tiles: torch.Tensor
    positions: torch.Tensor


def _unpack(payload: torch.Tensor, need: torch.Tensor, source_tiles: torch.Tensor,
            plan: ShardPlan, head_dim: int) -> _SourceTiles | None:
    """Lay the tiles received from one source out per (batch, KV head).

    ``need`` (B, Hkv, source's tiles) is what was requested; the source sent
    the tiles in ``need.nonzero()`` order, so no index travels with them.
    """
    counts = need.sum(dim=-1)  # (B, Hkv)
    width = int(counts.max()) if counts.numel() else 0
    if width == 0:
        return None
    b_idx, h_idx, t_idx = need.nonzero(as_tuple=True)
    first = (torch.cumsum(counts.flatten(), 0) - counts.flatten()).view_as(counts)
    slot = torch.arange(b_idx.numel(), device=need.device) - first[b_idx, h_idx]
    bsz, hkv = need.shape[:2]
    bs = plan.block_size
    kv = payload.new_zeros(bsz, hkv, width, bs, payload.shape[-1], dtype=torch.float32)
    kv[b_idx, h_idx, slot] = payload.float()
    n_tiles = plan.num_key_tiles
    tiles = torch.full((bsz, hkv, width), n_tiles, dtype=torch.int64, device=need.device)
    tiles[b_idx, h_idx, slot] = source_tiles[t_idx]
    positions = tiles[..., None] * bs + torch.arange(bs, device=need.device)
    positions = torch.where((tiles[..., None] < n_tiles) & (positions < plan.num_keys),
                            positions, torch.full_like(positions, -1))
    tiles = tiles[..., None].expand(-1, -1, -1, bs)
    kv = kv.view(bsz, hkv, width * bs, -1)
    return _SourceTiles(keys=kv[..., :head_dim], values=kv[..., head_dim:],
                        tiles=tiles.reshape(bsz, hkv, -1), positions=positions.view(bsz, hkv, -1))


def _partial_attention(q, q_positions, q_rows, mask, source: _SourceTiles, causal, scale):
    """SPEC 7 restricted to one source's keys: (o (B, Hq, Nq, Dv) fp32, lse (B, Hq, Nq) fp32).

    Query row ``r`` reads key ``n`` iff the key's tile is selected for the
    row's tile (``mask[..., q_rows[r], tile]``), the key is real, and, when
    causal, its position is ``<=`` the query's.
    """
    b, hq, nq, d = q.shape
    hkv, length = source.keys.shape[1], source.keys.shape[2]
    group = hq // hkv
    # A spare all-False column catches the padding slots' tile index.
    mask = torch.cat([mask, mask.new_zeros(*mask.shape[:3], 1)], dim=-1)
    key_tiles = source.tiles.repeat_interleave(group, dim=1)  # (B, Hq, L): indices, not K
    key_positions = source.positions.repeat_interleave(group, dim=1)
    keys = source.keys.unsqueeze(2)  # (B, Hkv, 1, L, D): the group shares one K
    values = source.values.unsqueeze(2)
    out = torch.zeros(b, hq, nq, source.values.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, nq), float("-inf"), dtype=torch.float32, device=q.device)
    chunk = max(1, _CHUNK_BYTES // max(1, 4 * b * hq * length))
    for r0 in range(0, nq, chunk):
        rows = slice(r0, min(nq, r0 + chunk))
        n = rows.stop - rows.start
        qf = q[:, :, rows].float().reshape(b, hkv, group, n, d)
        scores = (torch.matmul(qf, keys.transpose(-1, -2)) * scale).reshape(b, hq, n, length)
        selected = mask[:, :, q_rows[rows]]  # (B, Hq, n, nk + 1)
        allowed = selected.gather(-1, key_tiles[:, :, None, :].expand(-1, -1, n, -1))
        allowed &= key_positions[:, :, None, :] >= 0
        if causal:
            allowed &= key_positions[:, :, None, :] <= q_positions[rows][None, None, :, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        safe = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        probs = torch.exp(scores - safe[..., None]).reshape(b, hkv, group, n, length)
        out[:, :, rows] = torch.matmul(probs, values).reshape(b, hq, n, -1)
        lse[:, :, rows] = row_lse
    return out, lse


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
    sequence: the same mask up to SPEC 6 boundary ties, outputs within the
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
        On SPEC 8 bad input on any rank, inputs that differ across ranks
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

    out = torch.zeros(b, hq, nq_local, dv, dtype=torch.float32, device=device)
    lse = torch.full((b, hq, nq_local), float("-inf"), dtype=torch.float32, device=device)
    mask = torch.zeros(b, hq, query_tiles.numel(), n_key_tiles, dtype=torch.bool, device=device)
    pooled, requests, calibration = _metadata_bytes(plan, rank, b, hq, hkv, d, cfg.calibrate)
    ring_bytes = b * hkv * (plan.num_keys - k.shape[2]) * (d + dv) * q.element_size()
    if plan.num_queries == 0 or plan.num_keys == 0:
        stats = CommunicationStats(rank, world_size, 0, 0, 0, 0, 0, 0, 0, 0, ring_bytes)
        return _package(out.to(q.dtype), lse, mask, stats, return_lse, return_mask,
                        return_stats)

    # Stage 1 (SPEC 3): pool the local tiles; gather every rank's pooled keys.
    q_pooled = _pool_segments(q, plan.segments(rank, "query"), cfg.block_size)
    k_pooled_own = _pool_segments(k, plan.segments(rank, "key"), cfg.block_size)
    k_pooled = _all_gather_pooled_keys(k_pooled_own, plan, group)

    # Stages 2-3 (SPEC 4-5): bands and temperatures from global energies.
    dims_by_band = band_dims(d, cfg.high_dim, cfg.low_dim, cfg.rope_layout, device)
    taus = _temperatures(q_pooled, k_pooled, dims_by_band, cfg, plan, group)

    # Stage 4 (SPEC 6): this rank's rows of the mask.
    mask = _select_local(q_pooled, k_pooled, query_tiles, dims_by_band, taus, cfg, causal)

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

    # Stage 7 (SPEC 7): attend to our own tiles while the remote ones travel,
    # then to each source's tiles, merging the partial softmaxes by their LSE.
    q_positions = plan.positions(rank, "query").to(device)
    # Query tiles live on the key grid when causal, on their own grid otherwise.
    grid_tiles = plan.first_query_tile + plan.num_query_tiles
    row_index = torch.full((grid_tiles,), -1, dtype=torch.int64, device=device)
    row_index[query_tiles] = torch.arange(query_tiles.numel(), device=device)
    q_rows = row_index[torch.div(q_positions, cfg.block_size, rounding_mode="floor")]
    own = _unpack(_serve(kv_grid, need_from[rank]), need_from[rank], tiles_of[rank], plan, d)
    if own is not None:
        out, lse = _merge(out, lse, *_partial_attention(q, q_positions, q_rows, mask, own,
                                                        causal, scale))
    pending.wait()
    offsets = [0]
    for count in recv_counts:
        offsets.append(offsets[-1] + count)
    for source in range(world_size):
        if source == rank:
            continue
        tiles = _unpack(recv[offsets[source]:offsets[source + 1]], need_from[source],
                        tiles_of[source], plan, d)
        if tiles is not None:
            out, lse = _merge(out, lse, *_partial_attention(q, q_positions, q_rows, mask,
                                                            tiles, causal, scale))

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
