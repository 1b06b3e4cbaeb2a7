"""Decoding the attention masks that transformers passes: where each row's real tokens are.

Prism runs on whole tile grids, so a padded batch is cut into rows of real
tokens. :func:`key_spans` reads a transformers mask (bool, or additive with
0 / min) and returns, for each batch row, the contiguous range of keys its
queries read, or ``None`` for a plain causal batch. Reading a mask's pattern
needs its values on the host: :func:`key_spans` reduces the mask on its
device and copies one small summary back, one synchronisation per call.

:func:`prism_mask` is the mask function that
:func:`~prism.integrations.transformers.register` registers beside the
attention function. It is transformers' ``sdpa_mask``, except that a call
without a padding mask whose pattern is plain causal gets no mask (``None``)
also while ``torch.compile`` traces the model; ``sdpa_mask`` builds a full
causal mask there (transformers 5.x on torch < 2.14 never skips it while
tracing). So a batch without padding is never decoded, compiled or not.
"""

from __future__ import annotations

import torch

__all__ = ["key_spans", "prism_mask"]


def _allowed_from_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool view (B, H', L, S) of a transformers mask (True where a key may be read), and a
    0-d bool tensor: whether every value is 0 or "blocked" (True for bool masks)."""
    if attention_mask.dtype == torch.bool:
        return attention_mask, torch.ones((), dtype=torch.bool, device=attention_mask.device)
    if not attention_mask.is_floating_point():
        raise TypeError(
            f"attention_mask must be bool or an additive float mask, got {attention_mask.dtype}"
        )
    blocked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    return ~blocked, ((attention_mask == 0) | blocked).all()


def _summary(allowed: torch.Tensor, plain_biases: torch.Tensor,
             query_length: int) -> tuple[list[int], list[list[int]]]:
    """Everything :func:`key_spans` checks, reduced on the mask's device and read in one copy.

    Returns the scalars ``[plain_biases, heads_agree, any_read, query_start,
    pattern_ok, all_read]`` and, per batch row, ``[first_key, last_key + 1,
    count]`` of the keys its queries read.
    """
    device = allowed.device
    heads_agree = (allowed == allowed[:, :1]).all()
    allowed = allowed[:, 0]
    key_length = allowed.shape[-1]
    read_keys = allowed.any(dim=-2)  # (B, S): keys that some query reads
    keys = torch.arange(key_length, device=device)
    rows = torch.arange(query_length, device=device)
    # A real query reads itself last, so its position is its last readable key;
    # pad queries read nothing or stop short of their position.
    last_read = torch.where(allowed, keys, -1).amax(dim=-1)  # (B, L)
    query_start = (last_read - rows).amax()
    positions = query_start + rows
    expected = (keys[None, :] <= positions[:, None])[None] & read_keys[:, None, :]
    pattern_ok = (allowed == expected).all()
    first = torch.where(read_keys, keys, key_length).amin(dim=-1)
    stop = torch.where(read_keys, keys, -1).amax(dim=-1) + 1
    count = read_keys.sum(dim=-1)
    scalars = torch.stack([plain_biases, heads_agree, read_keys.any(), query_start, pattern_ok,
                           read_keys.all()]).to(torch.int64)
    rows_summary = torch.stack([first, stop, count], dim=-1).to(torch.int64)
    packed = torch.cat([scalars, rows_summary.flatten()]).tolist()  # the one host read
    return packed[:6], [packed[6 + 3 * b: 9 + 3 * b] for b in range(allowed.shape[0])]


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

    Notes
    -----
    ``None`` costs nothing; a mask costs one device-to-host copy of
    ``6 + 3 B`` integers. This is eager code: under ``torch.compile`` the
    transformers integration runs it inside an opaque operator.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (query_length, key_length):
        raise ValueError(
            f"attention_mask must be (B, 1 or H, {query_length}, {key_length}) for these "
            f"queries and keys, got shape {tuple(attention_mask.shape)}"
        )
    allowed, plain_biases = _allowed_from_mask(attention_mask)
    (biases_ok, heads_agree, any_read, query_start, pattern_ok, all_read), rows = _summary(
        allowed, plain_biases, query_length)
    if not biases_ok:
        raise ValueError(
            "the prism attention implementation got an additive attention mask with biases "
            "other than 0 and -inf; Prism cannot add per-position biases (ALiBi, relative "
            "position bias): use attn_implementation='sdpa' for this model"
        )
    if not heads_agree:
        raise ValueError(
            "the prism attention implementation needs one mask shared by all heads, got a "
            "per-head attention_mask; use attn_implementation='sdpa' for this model"
        )
    if not any_read:
        return key_length - query_length, [(0, 0)] * len(rows)
    if query_start < 0 or query_start + query_length > key_length or not pattern_ok:
        raise ValueError(
            "the prism attention implementation supports causal masks with key padding "
            "only; this mask has another pattern (packed sequences, a sliding window "
            "shorter than the input, or a custom 4D mask). Run such inputs with "
            "attn_implementation='sdpa', or unpack them into a padded batch"
        )
    if query_start == key_length - query_length and all_read:
        return None
    spans = []
    for row, (start, stop, count) in enumerate(rows):
        if count == 0:
            spans.append((0, 0))
            continue
        if count != stop - start:
            raise ValueError(
                f"batch row {row} has padding between real tokens (keys {start}..{stop - 1} "
                f"hold {count} real tokens); Prism needs each row's tokens to be "
                "contiguous. This happens when a right-padded batch is continued by "
                "generation: pad on the left (tokenizer.padding_side = 'left')"
            )
        spans.append((start, stop))
    return query_start, spans


def prism_mask(batch_size: int, q_length: int, kv_length: int, *, attention_mask=None,
               mask_function=None, local_size: int | None = None,
               allow_is_causal_skip: bool = True, **kwargs):
    """transformers' ``sdpa_mask``, returning ``None`` for an unpadded plain causal call.

    Takes ``sdpa_mask``'s arguments (transformers passes all but the first
    three by keyword). Returns ``None`` without building or reading any
    tensor when the call has no padding mask (``attention_mask=None``), the
    plain causal pattern (no sliding window, packed sequences or other
    pattern function), may skip its mask (``allow_is_causal_skip``), and has
    as many keys as queries: a case where transformers' own ``sdpa_mask``
    returns ``None`` in eager mode. Every other call is ``sdpa_mask``'s,
    unchanged.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    if (attention_mask is None and local_size is None and allow_is_causal_skip
            and mask_function is causal_mask_function and isinstance(q_length, int)
            and q_length == kv_length):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, attention_mask=attention_mask,
                     mask_function=mask_function, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)
