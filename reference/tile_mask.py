"""The tile mask that selection returns: a bool tensor that also carries its compact indices.

:func:`prism.select_blocks` returns a :class:`TileMask`. It *is* the bool
tensor ``(B, Hq, n_query_tiles, n_key_tiles)`` of the contract (``True`` =
compute this (query tile, key tile) pair), so every tensor operation works on
it as before and returns a plain tensor (``mask.float().mean()``, ``mask ==
other``, ``mask[0]``, ``mask.cuda()``). Beside the bits it carries what a
consumer would otherwise have to re-derive:

* ``block_size``, ``causal``, ``num_queries``, ``num_keys`` - the call it was
  selected for, so :func:`prism.block_sparse_attention` can tell whether its
  indices apply to a call;
* ``kv_num_blocks``, ``kv_indices`` - the compact form, in the format of
  :func:`prism.mask_to_indices` (and of FlexAttention's ``BlockMask``). On
  CUDA the selection kernel writes them together with the mask, so the
  attention kernel starts without rebuilding them; elsewhere they are computed
  from the mask on first use.

Compact format
--------------
``kv_num_blocks`` is int32 ``(B, Hq, n_query_tiles)``; ``kv_indices`` is int32
``(B, Hq, n_query_tiles, n_key_tiles)``. Row ``(b, h, i)`` lists its
``kv_num_blocks[b, h, i]`` selected key tiles first, in ascending order; the
remaining slots hold -1. This loop rebuilds the dense mask::

    dense = torch.zeros(B, Hq, nq_tiles, nk_tiles, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            for i in range(nq_tiles):
                for slot in range(kv_num_blocks[b, h, i]):
                    dense[b, h, i, kv_indices[b, h, i, slot]] = True
    assert torch.equal(dense, tile_mask)

Query tile ``i`` is tile ``first_query_tile + i`` of the absolute grid
(contract section 2); a causal selection never lists a key tile above the
diagonal, so the indices are ready for causal attention.

Editing a TileMask in place (``mask[..., 3] = False``) is allowed: the next use
of the indices sees that the tensor changed (its version counter moved) and
rebuilds them from the bits. A mask made under ``torch.inference_mode()`` is an
inference tensor, which has no version counter: its edits cannot be seen, so
its indices are rebuilt from the bits on every use (attention then builds its
own) rather than trusted. Writes that torch does not count, those through
``mask.data``, a NumPy view (``mask.numpy()``), DLPack or a raw pointer, do
not move the counter either: after such a write call
:meth:`TileMask.forget_indices` (or pass ``mask.as_tensor()``), or the carried
indices of the old bits are used.
"""

from __future__ import annotations

import torch

from .indices import mask_to_indices
from .tiles import TileLayout, tile_layout


def _version(t: torch.Tensor):
    """``t``'s version counter, or None for an inference tensor (which has none)."""
    return None if t.is_inference() else t._version


class TileMask(torch.Tensor):
    """A bool tile mask that carries its compact indices (see the module docstring).

    Parameters
    ----------
    mask : Tensor (B, Hq, n_query_tiles, n_key_tiles), bool
        The selected pairs; the TileMask shares its memory.
    block_size : int
        Tokens per tile.
    causal : bool
        Whether the mask was selected for causal attention.
    num_queries, num_keys : int
        ``Nq`` and ``Nk`` of the call.
    kv_num_blocks, kv_indices : Tensor, optional
        The compact form of ``mask`` (format above), if already computed; it is
        trusted, not checked. Left out, it is computed on first use.

    Examples
    --------
    >>> import torch
    >>> bits = torch.tensor([[[[True, False], [True, True]]]])
    >>> m = TileMask(bits, block_size=64, causal=True, num_queries=128, num_keys=128)
    >>> isinstance(m, torch.Tensor), float(m.float().mean())
    (True, 0.75)
    >>> m.kv_num_blocks.tolist(), m.kv_indices.tolist()
    ([[[1, 2]]], [[[[0, -1], [0, 1]]]])
    """

    # Operations on a TileMask return plain tensors (as nn.Parameter's do):
    # a slice or a sum of a mask carries no indices.
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __new__(cls, mask: torch.Tensor, *, block_size: int, causal: bool, num_queries: int,
                num_keys: int, kv_num_blocks: torch.Tensor | None = None,
                kv_indices: torch.Tensor | None = None):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
            raise TypeError(
                "TileMask needs a bool tensor (B, Hq, n_query_tiles, n_key_tiles), got "
                + (f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            )
        if (kv_num_blocks is None) != (kv_indices is None):
            raise ValueError("pass both kv_num_blocks and kv_indices, or neither")
        self = torch.Tensor._make_subclass(cls, mask, False)
        self.block_size = int(block_size)
        self.causal = bool(causal)
        self.num_queries = int(num_queries)
        self.num_keys = int(num_keys)
        self._compact = None if kv_num_blocks is None else (kv_num_blocks, kv_indices)
        self._compact_version = _version(self)
        self._given = self._compact
        return self

    @classmethod
    def from_selection(cls, mask: torch.Tensor, block_size: int, causal: bool,
                       num_queries: int, num_keys: int, kv_num_blocks: torch.Tensor,
                       kv_indices: torch.Tensor) -> TileMask:
        """``TileMask(...)`` for outputs a selection just produced (no argument checks).

        For callers that made ``mask`` (bool, 4-D) and its compact form
        themselves: the same object as the constructor, without the checks
        and conversions that cost microseconds on every call.
        """
        self = torch.Tensor._make_subclass(cls, mask, False)
        compact = (kv_num_blocks, kv_indices)
        self.__dict__.update(block_size=block_size, causal=causal, num_queries=num_queries,
                             num_keys=num_keys, _compact=compact,
                             _compact_version=_version(self), _given=compact)
        return self

    @property
    def layout(self) -> TileLayout:
        """The tile grid of the call (:func:`prism.reference.tile_layout`)."""
        return tile_layout(self.num_queries, self.num_keys, self.block_size, self.causal)

    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv_num_blocks, kv_indices)`` of the current bits (rebuilt after an edit)."""
        version = _version(self)
        if self._compact is None or version is None or self._compact_version != version:
            plain = self.as_tensor()
            self._compact = mask_to_indices(plain)
            self._compact_version = version
        return self._compact

    def forget_indices(self) -> TileMask:
        """Drop the carried indices: the next use rebuilds them from the bits.

        Needed only after writes that bypass torch's version counter (through
        ``.data``, a NumPy view, DLPack); ordinary in-place edits are seen.
        Returns the mask itself.
        """
        self._compact = self._given = None
        return self

    def carried_indices(self, *, block_size: int, causal: bool, num_queries: int,
                        num_keys: int):
        """The indices given at construction, if still valid for an attention call.

        ``None`` when none were given, the bits were edited since, or the call
        differs (:meth:`matches`). A causal selection's indices list no tile
        above the diagonal, which is what causal attention kernels need.
        """
        version = _version(self)
        if (self._given is None or self._given is not self._compact or version is None
                or self._compact_version != version
                or not self.matches(block_size=block_size, causal=causal,
                                    num_queries=num_queries, num_keys=num_keys)):
            return None
        return self._given

    @property
    def kv_num_blocks(self) -> torch.Tensor:
        """int32 (B, Hq, n_query_tiles): selected key tiles per query tile."""
        return self.compact()[0]

    @property
    def kv_indices(self) -> torch.Tensor:
        """int32 (B, Hq, n_query_tiles, n_key_tiles): ascending selected tiles, then -1."""
        return self.compact()[1]

    def matches(self, *, block_size: int, causal: bool, num_queries: int, num_keys: int) -> bool:
        """Whether the carried indices are valid for attention with these arguments.

        A causal selection's indices also serve a non-causal call (they list
        exactly the mask's tiles); a non-causal one's may hold tiles a causal
        call must skip, so they do not serve a causal call.
        """
        return (self.block_size == block_size and self.num_queries == num_queries
                and self.num_keys == num_keys and (self.causal or not causal))

    def as_tensor(self) -> torch.Tensor:
        """The bits as a plain bool tensor (shares memory)."""
        return self.as_subclass(torch.Tensor)

    def __repr__(self, *, tensor_contents=None):
        return (f"TileMask(block_size={self.block_size}, causal={self.causal}, "
                f"num_queries={self.num_queries}, num_keys={self.num_keys},\n"
                f"         {self.as_tensor()!r})")

    def __reduce_ex__(self, protocol):
        return (_rebuild_tile_mask, (self.as_tensor().clone(), self.block_size, self.causal,
                                     self.num_queries, self.num_keys))

    def __deepcopy__(self, memo):
        return _rebuild_tile_mask(self.as_tensor().clone(), self.block_size, self.causal,
                                  self.num_queries, self.num_keys)


def _rebuild_tile_mask(bits, block_size, causal, num_queries, num_keys):
    return TileMask(bits, block_size=block_size, causal=causal, num_queries=num_queries,
                    num_keys=num_keys)
