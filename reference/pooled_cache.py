"""Chunked prefill: one sequence's pooled key tiles, kept between chunks (docs/serving.rst).

A prefill chunk of ``C`` queries over a cached prefix of ``P`` tokens is the
contract's KV-prefix case (``Nq = C``, ``Nk = P + C``). Its selection needs
the mean of every key tile of the sequence (contract §3), but a complete tile
never changes while the sequence only grows, so :class:`PooledKeyCache` pools
it once. :mod:`prism.reference.paged` runs the stages after key pooling as
torch code (:func:`select_from_pooled`); :mod:`prism.optimized.chunked` feeds
the stored means and their squared sums to the Triton selection kernel.
"""

from __future__ import annotations

import contextlib

import torch

from .config import PrismConfig
from .registry import estimator_spec
from .select import estimator_mask, join_estimator_tiles, trace_from_pooled_keys
from .tiles import pool_tiles, tile_layout


class PooledKeyCache:
    """The pooled key tiles of one sequence's completed tiles, kept across prefill chunks.

    Selection for a chunk needs the mean of every key tile of the sequence so
    far (contract §3). Tiles that are complete (``block_size`` tokens) never
    change while the sequence only grows, so their means are stored here once:
    ``tile_means`` is (Hkv, n_complete, D), float32, tile ``t`` the mean of
    tokens ``t*bs .. t*bs + bs - 1``. For a new chunk only the tokens from
    ``num_tokens`` on are pooled: the partial last tile of the previous call
    (re-pooled from its fewer than ``bs`` cached tokens, so a tile completed by
    the next chunk is averaged over exactly its own tokens) and the chunk's
    tiles. The calibration energies of the key tiles (contract §5) are then
    summed over the stored and new means: the reference sums the squares of
    every mean once per call; :mod:`prism.optimized` adds the new tiles'
    squares to :meth:`square_sums`, the per-dim sums of the stored tiles'
    squared means in float64, kept per dim so that any band split reads them.

    With this, a chunk's selection equals the one-shot selection with
    ``Nq = chunk`` and ``Nk = prefix + chunk``, entry for entry in the
    reference. The query side of calibration sees only the chunk's queries,
    which is what that one-shot call does too.

    The cache is valid while the tokens it pooled stay in place: an engine
    that evicts, truncates or rewrites a sequence's KV must :meth:`reset` it.
    Memory: ``4 * Hkv * D`` bytes per complete tile (4 MiB for 128K tokens at
    Hkv = 8, D = 128, bs = 128, against 512 MiB of bf16 K and V), stored
    transposed, (Hkv, D, capacity), in a buffer that doubles when full (at
    most twice that), plus ``8 * Hkv * D`` bytes of squared sums.

    Parameters
    ----------
    block_size : int
        Must equal the ``block_size`` of the calls that use the cache.
    """

    def __init__(self, block_size: int = 128):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.block_size = block_size
        self.reset()

    # -- storage -----------------------------------------------------------

    def reset(self) -> None:
        """Forget every stored tile (after the sequence's KV changed)."""
        self._means_t: torch.Tensor | None = None   # (Hkv, D, capacity), float32
        self._count = 0
        self._squares: torch.Tensor | None = None   # (Hkv, D), float64
        self._squared = 0                          # tiles summed into _squares

    @property
    def tile_means(self) -> torch.Tensor | None:
        """(Hkv, n_complete, D) float32 view of the stored means; None before the first call."""
        if self._means_t is None:
            return None
        return self._means_t[:, :, :self._count].transpose(1, 2)

    @tile_means.setter
    def tile_means(self, means: torch.Tensor | None) -> None:
        self.reset()
        if means is not None:
            if not isinstance(means, torch.Tensor) or means.dim() != 3:
                raise ValueError("tile_means must be a (Hkv, n_tiles, D) tensor or None")
            self._means_t = means.detach().float().transpose(1, 2).contiguous()
            self._count = means.shape[1]

    @property
    def means_t(self) -> torch.Tensor | None:
        """The stored means transposed, (Hkv, D, n_complete), the selection kernel's layout."""
        if self._means_t is None or self._count == 0:
            return None
        return self._means_t[:, :, :self._count]

    @property
    def num_tiles(self) -> int:
        """Complete tiles stored."""
        return self._count

    @property
    def num_tokens(self) -> int:
        """Tokens covered by the stored tiles (``num_tiles * block_size``)."""
        return self._count * self.block_size

    def _own_buffers(self) -> None:
        """Buffers this call may write. Storage made under ``torch.inference_mode()``
        cannot be updated in place outside it, so a cache filled there and used after
        it gets ordinary copies first (inside inference mode ordinary tensors can be
        updated, so the reverse needs nothing)."""
        if torch.is_inference_mode_enabled():
            return
        if self._means_t is not None and self._means_t.is_inference():
            self._means_t = self._means_t.clone()
        if self._squares is not None and self._squares.is_inference():
            self._squares = self._squares.clone()

    def append(self, means_t: torch.Tensor) -> None:
        """Store newly completed tiles, given transposed: (Hkv, D, n_new) float32."""
        self._own_buffers()
        n_new = means_t.shape[2]
        needed = self._count + n_new
        store = self._means_t
        if store is None or store.shape[2] < needed:
            capacity = max(needed, 2 * (0 if store is None else store.shape[2]), 16)
            grown = means_t.new_empty(means_t.shape[0], means_t.shape[1], capacity)
            if self._count:
                grown[:, :, :self._count].copy_(store[:, :, :self._count])
            self._means_t = store = grown
        if n_new:
            store[:, :, self._count:needed].copy_(means_t)
        self._count = needed

    def truncate(self, num_tiles: int) -> None:
        """Keep only the first ``num_tiles`` tiles (undoes appends of a failed call)."""
        if num_tiles < self._count:
            self._count = num_tiles
            if self._squared > num_tiles:
                self._squares, self._squared = None, 0

    def square_sums(self) -> torch.Tensor | None:
        """(Hkv, D) float64: per dim, the sum over the stored tiles of the squared mean.

        The calibration energies of the stored tiles (contract §5) are its sums
        over all dims and over each band's dims. Tiles appended since the last
        call are added here, once each.
        """
        if self._count == 0:
            return None
        self._own_buffers()
        if self._squares is None:
            self._squares = torch.zeros(self._means_t.shape[:2], dtype=torch.float64,
                                        device=self._means_t.device)
        if self._squared < self._count:
            fresh = self._means_t[:, :, self._squared:self._count].double()
            self._squares += (fresh * fresh).sum(dim=2)
            self._squared = self._count
        return self._squares

    def __repr__(self) -> str:
        return f"PooledKeyCache(block_size={self.block_size}, num_tiles={self.num_tiles})"

    # -- use by a call ------------------------------------------------------

    def check(self, index: int, num_keys: int, k_cache: torch.Tensor, cfg: PrismConfig) -> None:
        """Raise ValueError if this cache cannot serve sequence ``index`` of a call."""
        name = f"pooled_keys[{index}]"
        if self.block_size != cfg.block_size:
            raise ValueError(f"{name} was built for block_size {self.block_size}, but the call "
                             f"uses {cfg.block_size}; use one cache per block size")
        if self.num_tokens > num_keys:
            raise ValueError(
                f"{name} holds {self.num_tokens} pooled tokens but sequence {index} now has "
                f"{num_keys} (seq_lens); the sequence shrank or the cache belongs to another "
                "one: call reset() after evicting or rewriting its KV"
            )
        if self._count:
            hkv, d = k_cache.shape[2], k_cache.shape[3]
            if tuple(self._means_t.shape[:2]) != (hkv, d):
                raise ValueError(f"{name} holds {self._means_t.shape[0]} heads of dim "
                                 f"{self._means_t.shape[1]}, the cache has {hkv} of dim {d}")
            if self._means_t.device != k_cache.device:
                raise ValueError(f"{name} is on {self._means_t.device}, k_cache on "
                                 f"{k_cache.device}")

    def pooled(self, k_tail: torch.Tensor, num_keys: int) -> torch.Tensor:
        """All key tile means (1, Hkv, n_key_tiles, D) given the keys from ``num_tokens`` on.

        Stores the tiles that are complete at ``num_keys`` tokens.
        """
        bs = self.block_size
        n_old = self._count
        new = pool_tiles(k_tail, self.num_tokens, bs)
        self.append(new[0, :, : num_keys // bs - n_old].transpose(1, 2))
        if n_old:
            new = torch.cat([self._means_t[None, :, :, :n_old].transpose(2, 3), new], dim=2)
        return new


@contextlib.contextmanager
def unchanged_on_error(caches):
    """Truncate every cache of ``caches`` (None entries skipped) back to its size at the
    start of the block if the block raises: a failed call leaves the caches as it found
    them (docs/serving.rst, chunked prefill)."""
    sizes = [(c, c.num_tiles) for c in caches if c is not None]
    try:
        yield
    except BaseException:
        for cache, num_tiles in sizes:
            cache.truncate(num_tiles)
        raise


def select_from_pooled(q, k_pooled, num_keys: int, cfg: PrismConfig, causal: bool,
                       k: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`~prism.reference.select_blocks`'s mask with the key tiles already pooled.

    ``k_pooled`` (1, Hkv, n_key_tiles, D) holds the means of all ``num_keys``
    keys. With ``estimator="prism"`` this is the reference's composition of the
    stages after key pooling (:func:`prism.reference.select.trace_from_pooled_keys`).
    The other estimators with Prism's pooled tiles in them (registry
    ``pooled_tiles``: Prism's bands joined with vertical-slash tiles, the
    cascade's candidates) also read the raw keys ``k`` (1, Hkv, num_keys, D);
    their Prism stage is fed from ``k_pooled``, every other stage is the one
    :func:`~prism.reference.select_blocks` runs, so the mask is that call's.
    """
    if estimator_spec(cfg.estimator).tiles is None:
        return trace_from_pooled_keys(q, k_pooled, num_keys, cfg, causal).mask
    if k is None or k.shape[2] != num_keys:
        raise ValueError(f"estimator {cfg.estimator!r} also reads the raw keys: pass all "
                         f"{num_keys} of them as k")
    if q.shape[2] == 0 or num_keys == 0:
        layout = tile_layout(q.shape[2], num_keys, cfg.block_size, causal)
        return torch.zeros(q.shape[0], q.shape[1], layout.num_query_tiles,
                           layout.num_key_tiles, dtype=torch.bool, device=q.device)

    def pooled_trace(q_, k_, cfg_, *, causal):
        # The Prism stage inside the estimator: the same queries and keys, tiles from cache.
        if cfg_.block_size != cfg.block_size or k_.shape[2] != num_keys:
            raise ValueError("the pooled key tiles serve only their own block_size and keys")
        return trace_from_pooled_keys(q_, k_pooled, num_keys, cfg_, causal)

    if estimator_spec(cfg.estimator).prism_bands:
        trace = trace_from_pooled_keys(q, k_pooled, num_keys, cfg, causal)
        return join_estimator_tiles(trace, q, k, cfg, causal, pooled_trace).mask
    return estimator_mask(q, k, cfg, causal, stages={"prism_trace": pooled_trace})
