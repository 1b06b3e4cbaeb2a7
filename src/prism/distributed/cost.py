"""What context-parallel Prism moves between ranks: measured statistics and a model.

:class:`CommunicationStats` reports what one call moved;
:func:`communication_volume` models the bytes each rank receives against ring
attention, and :func:`kv_tiles_to_fetch` counts, from a single-device mask,
the K/V tiles each rank of a sharded run would fetch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .plan import ShardPlan, _check_int

__all__ = ["CommunicationStats", "CommunicationModel", "communication_volume",
           "kv_tiles_to_fetch"]

# Bytes of the fp32 pooled key vectors that are all-gathered (kept in fp32, as
# the reference keeps them, so the selection sees the same numbers).
_POOLED_BYTES = 4
# Bytes of one request flag (bool) per (batch, KV head, key tile).
_REQUEST_BYTES = 1
# Bytes of one calibration energy (float64) all-reduced per (batch, q head, kind).
_ENERGY_BYTES = 8
_ENERGY_KINDS = 3  # all dims, high band, low band


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
        Whether the query energies are all-reduced (contract §5 on).

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

