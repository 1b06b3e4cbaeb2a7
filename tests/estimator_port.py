"""An independent NumPy port of the estimators' selections, for the golden tests.

Written from docs/estimators.rst (not from ``prism.reference``): the
antidiagonal, vertical-slash, sampled-query, sub-tile and cascade estimators and their
unions. Prism's own mask (the cascade's candidates, ``prism_vertical_slash``)
comes from the NumPy port of contract §2-§6 in test_port_checker.py. Each
keyword in :data:`KNOBS` turns the port into one classic misreading of the
estimators' docs; the golden estimator set must catch each of them.
"""

from __future__ import annotations

import math

import numpy as np
from test_port_checker import numpy_select

#: Misreading name (the golden set's ``catches`` tag) -> the knob that makes it.
KNOBS = {
    "antidiagonal_direction": "main_diagonal",
    "antidiagonal_grid": "groups_from_row_0",
    "antidiagonal_scale": "unscaled_by_stride",
    "candidate_threshold": "candidates_at_p",
    "candidate_softmax": "candidates_after_softmax",
    "last_queries": "first_queries",
    "slash_sign": "slash_reversed",
    "slash_tile_offsets": "slash_floor_only",
    "vertical_slash_threshold": "vs_threshold_ignored",
    "last_tile_threshold": "last_tile_at_p",
    "sampled_queries": "first_of_run",
    "sampled_candidate_softmax": "sampled_after_softmax",
    "sampled_weight_side": "mix_weights_swapped",
    "estimator_forced_tiles": "no_forced",
    "half_precision_scores": "scores_in_input_dtype",
    "subtile_renormalise": "subtile_sums_unnormalised",
    "subtile_energies": "subtile_energies_of_tiles",
    "subtile_logits": "subtile_logits_averaged",
}


def _as_input_dtype(scores, knobs):
    """The scores rounded to the inputs' 16-bit dtype (what a matrix product of bf16 or
    fp16 tensors returns) when that misreading is on; else unchanged."""
    rounding = knobs.get("scores_in_input_dtype")
    if rounding is None or rounding is True:
        return scores
    import torch

    return torch.from_numpy(np.ascontiguousarray(scores)).to(rounding).double().numpy()


def _top_p(probs, admissible, p):
    """Contract §6's rule along the last axis: index tie-break, never a zero entry."""
    index = np.broadcast_to(np.arange(probs.shape[-1]), probs.shape)
    order = np.lexsort((index, -probs), axis=-1)
    ranked = np.take_along_axis(probs, order, -1)
    before = np.cumsum(ranked, -1) - ranked
    keep_ranked = (ranked > 0) & ((before < p) | (p >= 1.0))
    keep = np.zeros(probs.shape, bool)
    np.put_along_axis(keep, order, keep_ranked, -1)
    return keep & admissible


class _Layout:
    def __init__(self, nq, nk, bs, causal):
        self.bs, self.nq, self.nk, self.causal = bs, nq, nk, causal
        self.start = nk - nq if causal else 0
        self.q_tiles = (np.arange(self.start // bs, (self.start + nq - 1) // bs + 1)
                        if nq else np.zeros(0, int))
        self.nkt = -(-nk // bs)
        self.admissible = ((np.arange(self.nkt)[None] <= self.q_tiles[:, None]) if causal
                           else np.ones((len(self.q_tiles), self.nkt), bool))


def _softmax(scores, allowed):
    s = np.where(allowed, scores, -np.inf)
    top = s.max(-1, keepdims=True)
    w = np.where(allowed, np.exp(s - np.where(np.isfinite(top), top, 0)), 0.0)
    total = w.sum(-1, keepdims=True)
    return np.where(total > 0, w / np.where(total > 0, total, 1), 0.0)


def _renormalise(tiles, admissible):
    tiles = tiles * admissible
    total = tiles.sum(-1, keepdims=True)
    return np.where(total > 0, tiles / np.where(total > 0, total, 1), 0.0)


def antidiagonal(q, k, lay, stride, candidates=None, *, dtype, knobs):
    """Tile probabilities (B, Hq, nq, nkt) of the strided antidiagonal scores."""
    b, hq, nq, d = q.shape
    group = hq // k.shape[1]
    bs, per = lay.bs, lay.bs // stride
    # Query rows on the absolute grid from the first query tile's start, zero elsewhere;
    # misread, the groups start at the first query (the offset rounded to whole groups).
    base = lay.q_tiles[0] * bs if len(lay.q_tiles) else 0
    offset = lay.start - base
    if knobs.get("groups_from_row_0"):
        offset -= offset % stride
    q_grid = np.zeros((b, hq, len(lay.q_tiles) * bs, d), dtype)
    q_grid[:, :, offset:offset + nq] = q
    k_grid = np.zeros((b, k.shape[1], lay.nkt * bs, d), dtype)
    k_grid[:, :, :lay.nk] = k
    qg = q_grid.reshape(b, hq, -1, stride, d)
    if not knobs.get("main_diagonal"):
        qg = qg[:, :, :, ::-1]
    qg = qg.reshape(b, hq, -1, stride * d)
    kg = np.repeat(k_grid.reshape(b, k.shape[1], -1, stride * d), group, axis=1)
    divisor = math.sqrt(d) * (1 if knobs.get("unscaled_by_stride") else stride)
    scores = _as_input_dtype(qg @ np.swapaxes(kg, -1, -2) / divisor, knobs)
    n_groups_q = scores.shape[2]
    q_group = base // stride + np.arange(n_groups_q)
    k_group = np.arange(scores.shape[3])
    lo, hi = (base + offset) // stride, (base + offset + nq - 1) // stride
    q_valid = (q_group >= lo) & (q_group <= hi)
    allowed = np.broadcast_to(k_group[None] < -(-lay.nk // stride), (n_groups_q, len(k_group)))
    if lay.causal:
        allowed = allowed & (k_group[None] <= q_group[:, None])
    tiles_of_q = (q_group * stride) // bs - base // bs
    tiles_of_k = (k_group * stride) // bs
    if candidates is not None and not knobs.get("candidates_after_softmax"):
        allowed = allowed & candidates[:, :, tiles_of_q][..., tiles_of_k]
    probs = _softmax(scores, allowed) * q_valid[:, None]
    tiles = probs.reshape(b, hq, len(lay.q_tiles), per, lay.nkt, per).sum(axis=(3, 5))
    tiles = _renormalise(tiles, lay.admissible)
    if candidates is not None and knobs.get("candidates_after_softmax"):
        tiles = _renormalise(tiles, lay.admissible & candidates)
    return tiles


def last_query_attention(q, k, lay, last, *, dtype, knobs):
    """(vertical (B, Hq, Nk), slash (B, Hq, P + Nk)) of the last queries' exact attention."""
    b, hq, nq, d = q.shape
    group = hq // k.shape[1]
    rows = min(last, nq)
    picked = np.arange(rows) if knobs.get("first_queries") else np.arange(nq - rows, nq)
    pos = lay.start + picked
    kk = np.repeat(k, group, axis=1)
    scores = _as_input_dtype(q[:, :, picked] @ np.swapaxes(kk, -1, -2) / math.sqrt(d), knobs)
    allowed = np.ones((rows, lay.nk), bool)
    if lay.causal:
        allowed = np.arange(lay.nk)[None] <= pos[:, None]
    probs = _softmax(scores, allowed) / max(rows, 1)
    vertical = probs.sum(axis=2)
    offsets = pos[:, None] - np.arange(lay.nk)[None]
    if knobs.get("slash_reversed"):
        offsets = -offsets
    slash = np.zeros((b, hq, lay.start + nq + lay.nk - 1), dtype)
    for r in range(rows):
        for n in range(lay.nk):
            o = offsets[r, n]
            if -(lay.nk - 1) <= o <= lay.start + nq - 1:
                slash[:, :, o + lay.nk - 1] += probs[:, :, r, n]
    return vertical, slash


def vertical_slash(q, k, lay, last, p, *, dtype, knobs):
    b, hq = q.shape[:2]
    vertical, slash = last_query_attention(q, k, lay, last, dtype=dtype, knobs=knobs)
    cols = _top_p(vertical, True, p)
    offs = _top_p(slash, True, p)
    out = np.zeros((b, hq, len(lay.q_tiles), lay.nkt), bool)
    for n in np.flatnonzero(cols.any(axis=(0, 1))):
        out[:, :, :, n // lay.bs] |= cols[:, :, n, None]
    for i in np.flatnonzero(offs.any(axis=(0, 1))):
        o = i - (lay.nk - 1)
        tile_offsets = {o // lay.bs} if knobs.get("slash_floor_only") else \
            {o // lay.bs, -(-o // lay.bs)}
        for row, big_i in enumerate(lay.q_tiles):
            for t in tile_offsets:
                j = big_i - t
                if 0 <= j < lay.nkt:
                    out[:, :, row, j] |= offs[:, :, i]
    return out & lay.admissible


def last_tile(q, k, lay, last, p, *, dtype, knobs):
    b, hq = q.shape[:2]
    out = np.zeros((b, hq, len(lay.q_tiles), lay.nkt), bool)
    if not len(lay.q_tiles) or not lay.nkt:
        return out
    vertical, _ = last_query_attention(q, k, lay, last, dtype=dtype, knobs=knobs)
    padded = np.zeros((b, hq, lay.nkt * lay.bs), dtype)
    padded[..., :lay.nk] = vertical
    mass = padded.reshape(b, hq, lay.nkt, lay.bs).sum(-1)
    out[:, :, -1] = _top_p(mass, lay.admissible[-1], p)
    return out


def sampled(q, k, lay, samples, candidates=None, *, dtype, knobs):
    """Tile probabilities of the sampled queries; with ``candidates`` (the cascade's step
    2b) each sample's softmax runs over its (head, query tile)'s candidate keys only."""
    b, hq, nq, d = q.shape
    restrict = candidates is not None and not knobs.get("sampled_after_softmax")
    run, bs = lay.bs // samples, lay.bs
    kk = np.repeat(k, hq // k.shape[1], axis=1)
    tiles = np.zeros((b, hq, len(lay.q_tiles), lay.nkt), dtype)
    last_pos = lay.start + nq - 1
    for row, big_i in enumerate(lay.q_tiles):
        for t in range(samples):
            lo, hi = big_i * bs + t * run, big_i * bs + (t + 1) * run - 1
            lo_real = max(lo, lay.start)
            pos = lo_real if knobs.get("first_of_run") else min(hi, last_pos)
            if pos < lo_real or pos > min(hi, last_pos):
                continue
            s = _as_input_dtype(np.einsum("bhd,bhnd->bhn", q[:, :, pos - lay.start], kk)
                                / math.sqrt(d), knobs)
            allowed = np.arange(lay.nk) <= pos if lay.causal else np.ones(lay.nk, bool)
            if restrict:
                allowed = allowed & candidates[:, :, row][..., np.arange(lay.nk) // bs]
            probs = _softmax(s, allowed)
            padded = np.zeros((b, hq, lay.nkt * bs), dtype)
            padded[..., :lay.nk] = probs
            tiles[:, :, row] += padded.reshape(b, hq, lay.nkt, bs).sum(-1)
    if candidates is not None and not restrict:  # misread: restricted after the softmax
        return _renormalise(tiles, lay.admissible & candidates)
    return _renormalise(tiles, lay.admissible)


def subtile(q, k, lay, factor, thresholds, prism_fields, *, dtype, knobs):
    """Kept tiles of Prism's bands scored on sub-tiles of ``bs / factor`` tokens and summed
    per tile pair (docs/estimators.rst, E4)."""
    fields = dict(prism_fields, block_size=lay.bs // factor)
    if knobs.get("subtile_energies_of_tiles"):
        fields["calibration_block_size"] = lay.bs
    bands, fine_rows, _ = numpy_select(q, k, return_bands=True, **fields)
    rows = fine_rows // factor - lay.q_tiles[0]
    keep = np.zeros(q.shape[:2] + (len(lay.q_tiles), lay.nkt), bool)
    for (logits, probs), p in zip(bands, thresholds, strict=True):
        cols = np.arange(probs.shape[-1]) // factor
        if knobs.get("subtile_logits_averaged"):
            # Misread: the admissible sub-tile logits averaged per tile pair, then one
            # softmax per query tile.
            finite = np.isfinite(logits)
            sums = np.zeros(keep.shape, dtype)
            counts = np.zeros(keep.shape, dtype)
            by_col = np.zeros(logits.shape[:3] + (lay.nkt,), dtype)
            count_col = np.zeros_like(by_col)
            np.add.at(by_col, (Ellipsis, cols), np.where(finite, logits, 0.0).astype(dtype))
            np.add.at(count_col, (Ellipsis, cols), finite.astype(dtype))
            np.add.at(sums, (slice(None), slice(None), rows), by_col)
            np.add.at(counts, (slice(None), slice(None), rows), count_col)
            mean = sums / np.where(counts > 0, counts, 1)
            tiles = _softmax(mean, lay.admissible & (counts > 0))
        else:
            by_col = np.zeros(probs.shape[:3] + (lay.nkt,), dtype)
            np.add.at(by_col, (Ellipsis, cols), probs.astype(dtype))
            tiles = np.zeros(keep.shape, dtype)
            np.add.at(tiles, (slice(None), slice(None), rows), by_col)
            if knobs.get("subtile_sums_unnormalised"):
                tiles = tiles * lay.admissible
            else:
                tiles = _renormalise(tiles, lay.admissible)
        keep |= _top_p(tiles, lay.admissible, p)
    return keep


def estimator_select(q, k, *, causal=True, block_size=128, estimator="prism",
                     high_threshold=0.95, low_threshold=0.95, antidiagonal_stride=8,
                     last_queries=64, vertical_slash_threshold=None, candidate_threshold=0.99,
                     sampled_queries=4, sampled_weight=0.0, force_sink=True,
                     force_diagonal=True,
                     dtype=np.float64, **other):
    """The estimator's bool tile mask; ``other`` holds Prism's fields and the knobs."""
    knobs = {name: other.pop(name) for name in list(other) if name in KNOBS.values()}
    factor = other.pop("subtile_factor", 4)
    if knobs.get("scores_in_input_dtype") and getattr(q, "dtype", None) is not None and \
            str(q.dtype) in ("torch.bfloat16", "torch.float16"):
        knobs["scores_in_input_dtype"] = q.dtype  # the dtype to round the scores to
    q, k = (np.asarray(x.float() if hasattr(x, "float") else x, dtype) for x in (q, k))
    lay = _Layout(q.shape[2], k.shape[2], block_size, causal)
    if not (q.shape[0] * q.shape[1] * len(lay.q_tiles) * lay.nkt):
        return np.zeros((q.shape[0], q.shape[1], len(lay.q_tiles), lay.nkt), bool)
    vs_p = high_threshold if (vertical_slash_threshold is None
                              or knobs.get("vs_threshold_ignored")) else vertical_slash_threshold
    prism_fields = dict(causal=causal, block_size=block_size, force_sink=force_sink,
                        force_diagonal=force_diagonal, **other)

    def vs():
        return vertical_slash(q, k, lay, last_queries, vs_p, dtype=dtype, knobs=knobs)

    def top(probs):
        return _top_p(probs, lay.admissible, high_threshold)

    if estimator == "prism":
        return numpy_select(q, k, high_threshold=high_threshold, low_threshold=low_threshold,
                            **prism_fields)
    if estimator == "prism_vertical_slash":
        tiles = numpy_select(q, k, high_threshold=high_threshold, low_threshold=low_threshold,
                             **prism_fields) | vs()
    elif estimator == "antidiagonal":
        tiles = top(antidiagonal(q, k, lay, antidiagonal_stride, dtype=dtype, knobs=knobs))
    elif estimator == "vertical_slash":
        tiles = vs()
    elif estimator == "antidiagonal_vertical_slash":
        tiles = top(antidiagonal(q, k, lay, antidiagonal_stride, dtype=dtype, knobs=knobs)) | vs()
    elif estimator == "sampled":
        tiles = top(sampled(q, k, lay, sampled_queries, dtype=dtype, knobs=knobs))
    elif estimator == "sampled_vertical_slash":
        tiles = top(sampled(q, k, lay, sampled_queries, dtype=dtype, knobs=knobs)) | vs()
    elif estimator == "subtile":
        tiles = subtile(q, k, lay, factor, (high_threshold, low_threshold), prism_fields,
                        dtype=dtype, knobs=knobs)
    elif estimator == "cascade":
        c = high_threshold if knobs.get("candidates_at_p") else candidate_threshold
        c_low = low_threshold if knobs.get("candidates_at_p") else candidate_threshold
        candidates = numpy_select(q, k, high_threshold=c, low_threshold=c_low, **prism_fields)
        probs = antidiagonal(q, k, lay, antidiagonal_stride, candidates, dtype=dtype,
                             knobs=knobs)
        if sampled_weight > 0:
            exact = sampled(q, k, lay, sampled_queries, candidates, dtype=dtype, knobs=knobs)
            w = 1 - sampled_weight if knobs.get("mix_weights_swapped") else sampled_weight
            probs = _renormalise((1 - w) * probs + w * exact, lay.admissible)
        t_p = high_threshold if knobs.get("last_tile_at_p") else (1 + high_threshold) / 2
        tiles = top(probs) | vs() | last_tile(q, k, lay, last_queries, t_p, dtype=dtype,
                                              knobs=knobs)
    else:
        raise ValueError(f"the NumPy port has no estimator {estimator!r}")
    if not knobs.get("no_forced"):
        if force_sink and lay.nkt:
            tiles[..., 0] = True
        if causal and force_diagonal and len(lay.q_tiles):
            tiles[..., np.arange(len(lay.q_tiles)), lay.q_tiles] = True
    return tiles & lay.admissible
