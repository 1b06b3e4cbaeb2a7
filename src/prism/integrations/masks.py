"""Decoding the attention masks that transformers passes: where each row's real tokens are.

Prism runs on whole tile grids, so a padded batch is cut into rows of real
tokens. :func:`key_spans` reads a transformers mask (bool, or additive with
0 / min) and returns, for each batch row, the contiguous range of keys its
queries read, or ``None`` for a plain causal batch. Reading a mask's pattern
needs its values on the host, so decoding a mask synchronises the device; a
plain causal batch, for which transformers passes no mask, does not.
"""

from __future__ import annotations

import torch

__all__ = ["key_spans"]


def _allowed_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool view (B, H', L, S) of a transformers mask: True where a key may be read."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if not attention_mask.is_floating_point():
        raise TypeError(
            f"attention_mask must be bool or an additive float mask, got {attention_mask.dtype}"
        )
    blocked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    if not bool(((attention_mask == 0) | blocked).all()):
        raise ValueError(
            "the prism attention implementation got an additive attention mask with biases "
            "other than 0 and -inf; Prism cannot add per-position biases (ALiBi, relative "
            "position bias): use attn_implementation='sdpa' for this model"
        )
    return ~blocked


def key_spans(attention_mask: torch.Tensor | None, query_length: int,
              key_length: int) -> tuple[int, list[tuple[int, int]]] | None:
    """Where the queries sit among the keys, and each batch row's contiguous real keys.

    Parameters
    ----------
    attention_mask : Tensor (B, 1 or H, L, S) or None
        As passed by transformers (bool, or additive float with 0 / min).
    query_length, key_length : int
        ``L`` and ``S``.

    Returns
    -------
    None, or (query_start, spans)
        ``None`` when there is no mask or the mask is plain causal with the
        queries on the last ``L`` key positions and no padding. Otherwise
        query row ``r`` sits at key position ``query_start + r`` and
        ``spans[b] = (start, stop)`` is the range of keys that row ``b``'s
        queries read (``start == stop`` for a row without real tokens). Keys
        past the last query (unused slots of a static cache) are outside
        every span.

    Raises
    ------
    ValueError
        If the mask is not "causal and key padding", if heads disagree, or if
        a row's real tokens are not contiguous.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (query_length, key_length):
        raise ValueError(
            f"attention_mask must be (B, 1 or H, {query_length}, {key_length}) for these "
            f"queries and keys, got shape {tuple(attention_mask.shape)}"
        )
    allowed = _allowed_from_mask(attention_mask)
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        raise ValueError(
            "the prism attention implementation needs one mask shared by all heads, got a "
            "per-head attention_mask; use attn_implementation='sdpa' for this model"
        )
    allowed = allowed[:, 0]
    batch, device = allowed.shape[0], allowed.device
    read_keys = allowed.any(dim=-2)  # (B, S): keys that some query reads
    if not bool(read_keys.any()):
        return key_length - query_length, [(0, 0)] * batch
    # A real query reads itself last, so its position is its last readable key;
    # pad queries read nothing or stop short of their position.
    keys = torch.arange(key_length, device=device)
    rows = torch.arange(query_length, device=device)
    last_read = torch.where(allowed, keys, -1).amax(dim=-1)  # (B, L)
    query_start = int((last_read - rows).max())
    positions = query_start + rows
    expected = (keys[None, :] <= positions[:, None])[None] & read_keys[:, None, :]
    if query_start < 0 or query_start + query_length > key_length \
            or not bool((allowed == expected).all()):
        raise ValueError(
            "the prism attention implementation supports causal masks with key padding "
            "only; this mask has another pattern (packed sequences, a sliding window "
            "shorter than the input, or a custom 4D mask). Run such inputs with "
            "attn_implementation='sdpa', or unpack them into a padded batch"
        )
    if query_start == key_length - query_length and bool(read_keys.all()):
        return None
    spans = []
    for row, keys_of_row in enumerate(read_keys):
        idx = keys_of_row.nonzero().flatten()
        if idx.numel() == 0:
            spans.append((0, 0))
            continue
        start, stop = int(idx[0]), int(idx[-1]) + 1
        if idx.numel() != stop - start:
            raise ValueError(
                f"batch row {row} has padding between real tokens (keys {start}..{stop - 1} "
                f"hold {idx.numel()} real tokens); Prism needs each row's tokens to be "
                "contiguous. This happens when a right-padded batch is continued by "
                "generation: pad on the left (tokenizer.padding_side = 'left')"
            )
        spans.append((start, stop))
    return query_start, spans
