"""The sharding contract of context-parallel Prism: which positions each rank holds.

Positions live on one absolute tile grid (contract §3). The key sequence is
cut into tile-aligned *chunks*, and each rank holds its chunks concatenated in
order. ``layout="contiguous"``: one chunk per rank, rank order equals sequence
order, and every chunk's length is a multiple of ``block_size`` unless the
chunk ends the sequence. ``layout="zigzag"``: the tile grid is cut into
``2 W`` near-equal runs of tiles and rank ``r`` holds runs ``r`` and
``2 W - 1 - r``, which balances causal work. When causal, a rank holds exactly
the queries whose positions fall inside its key chunks, so a KV prefix
(``Nk > Nq``) is supported: the ranks holding prefix positions hold fewer (or
no) queries. When non-causal, queries and keys are two independent grids,
each sharded by the same layout rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism.reference.tiles import TileLayout, tile_layout

__all__ = ["LAYOUTS", "Segment", "ShardPlan"]

#: Supported ways of cutting the sequence across ranks.
LAYOUTS = ("contiguous", "zigzag")
ROLES = ("query", "key")

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

    Positions are absolute on contract §3's tile grid: when causal, query row ``r``
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
    def tile_layout(self) -> TileLayout:
        """The single-device tile grid of the whole sequence (:func:`prism.reference.tile_layout`).

        Its rows are the rows of the single-device mask; every rank's query
        and key tiles are tiles of this grid.
        """
        return tile_layout(self.num_queries, self.num_keys, self.block_size, self.causal)

    @property
    def query_start(self) -> int:
        """Absolute position of query row 0: ``Nk - Nq`` when causal, else 0."""
        return self.tile_layout.query_start

    @property
    def num_key_tiles(self) -> int:
        return self.tile_layout.num_key_tiles

    @property
    def num_query_tiles(self) -> int:
        """Query tiles of the whole sequence (the rows of the single-device mask)."""
        return self.tile_layout.num_query_tiles

    @property
    def first_query_tile(self) -> int:
        return self.tile_layout.first_query_tile

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
        """Key tiles held elsewhere that some local query tile may select (contract §6).

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

