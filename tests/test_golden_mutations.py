"""The golden set catches the classic misreadings of the contract.

Each mutation below is a port with one deliberate mistake: the reference with
one stage swapped for a wrong variant (patched in for the call only), or a
small attention written with one wrong choice. Each must fail at least two
golden cases, and every misreading the manifest lists has at least two cases
built for it.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest
import torch

import prism.reference.select as ref_select
from prism.reference import block_sparse_attention, select_blocks, tile_layout, token_mask
from prism.reference.check import check_case
from prism.reference.golden import load_golden
from prism.reference.tiles import TileLayout, tile_token_counts

GOLDEN = Path(__file__).parent / "golden"
MANIFEST, ARRAYS = load_golden(GOLDEN)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra threads only add start-up cost on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _patched(patches, fn):
    """``fn`` run with ``patches`` ((module, name, replacement), ...) in place."""
    def run(*args, **kwargs):
        with ExitStack() as stack:
            for module, name, value in patches:
                stack.enter_context(mock.patch.object(module, name, value))
            return fn(*args, **kwargs)
    return run


def _select_with(**patches):
    return _patched([(ref_select, n, v) for n, v in patches.items()], select_blocks)


def _attention(q, k, v, mask, *, block_size, causal=True, scale=None, alignment="bottom",
               scale_from="d", ignore_scale=False, gqa="contiguous", empty_lse=-math.inf,
               normalise="max", log_base=math.e, scores_in_input_dtype=False):
    """Token-level masked attention with knobs for the classic mistakes."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    heads = torch.arange(hq)
    kv_head = heads // group if gqa == "contiguous" else heads % hkv
    kf, vf = k.float()[:, kv_head], v.float()[:, kv_head]
    if ignore_scale or scale is None:
        scale = 1 / math.sqrt(d if scale_from == "d" else dv)
    layout = tile_layout(nq, nk, block_size, causal)
    if alignment == "top" and causal:
        layout = TileLayout(block_size, nq, nk, 0, 0, -(-nq // block_size),
                            layout.num_key_tiles)
    rows = torch.arange(nq)
    if nk == 0 or nq == 0 or layout.num_query_tiles != mask.shape[2]:
        if layout.num_query_tiles != mask.shape[2]:
            raise ValueError("mask rows do not match this port's query tiles")
        return (torch.zeros(b, hq, nq, dv, dtype=q.dtype),
                torch.full((b, hq, nq), empty_lse))
    allowed = token_mask(mask, layout, rows, causal)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    if scores_in_input_dtype:
        s = s.to(q.dtype).float()
    s = s.masked_fill(~allowed, -math.inf)
    if normalise == "fp32_lse":
        lse = torch.logsumexp(s, -1)
        w = torch.exp(s - torch.nan_to_num(lse, neginf=0.0)[..., None])
        total = torch.ones_like(lse)
    else:
        top = torch.nan_to_num(s.amax(-1), neginf=0.0)
        w = torch.exp(s - top[..., None])
        total = w.sum(-1)
        lse = top + torch.log(total)
    o = (w @ vf) / torch.where(total > 0, total, 1.0)[..., None]
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, empty_lse), lse / math.log(log_base))
    return o.to(q.dtype), lse


def _attention_with(**knobs):
    def run(q, k, v, mask, *, block_size, causal=True, scale=None):
        return _attention(q, k, v, mask, block_size=block_size, causal=causal, scale=scale,
                          **knobs)
    return run


# -- wrong selection stages ------------------------------------------------------------

def _ties_to_larger_index(probs, admissible, threshold):
    keep, mass = TOP_P(probs.flip(-1), admissible.flip(-1), threshold)
    return keep.flip(-1), mass.flip(-1)


def _top_p_variant(rule):
    def top_p(probs, admissible, threshold):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        running = torch.cumsum(sorted_probs, -1)
        before = running - sorted_probs
        if rule == "inclusive":
            keep_sorted = (running < threshold) | (before == 0)
        else:  # "plain": no special case for p = 1
            keep_sorted = before < threshold
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        mass = torch.zeros_like(before).scatter(-1, order, before)
        return keep & admissible, mass
    return top_p


def _pool_from_row_zero(x, start, block_size):
    return POOL(x, 0, block_size)


def _zero_padded_pool(x, start, block_size):
    counts = tile_token_counts(start, x.shape[2], block_size).to(torch.float32)
    return POOL(x, start, block_size) * (counts / block_size)[None, None, :, None]


def _pool_in_input_dtype(x, start, block_size):
    return POOL(x, start, block_size).to(x.dtype).float()


def _layout_variant(mode):
    def layout(nq, nk, bs, causal):
        good = LAYOUT(nq, nk, bs, causal)
        if mode == "top_left" and causal:
            return TileLayout(bs, nq, nk, 0, 0, -(-nq // bs), good.num_key_tiles)
        if mode == "bottom_right" and not causal:
            start = nk - nq
            first = start // bs
            rows = (start + nq - 1) // bs - first + 1 if nq else 0
            return TileLayout(bs, nq, nk, start, first, rows, good.num_key_tiles)
        return good
    return layout


def _select_rows_by_ceil(q, k, *, causal=True, **config):
    """Query tile count as ceil((start + Nq) / bs) - start // bs: one row too many at Nq = 0."""
    mask = select_blocks(q, k, causal=causal, **config)
    bs = config["block_size"]
    start = k.shape[2] - q.shape[2] if causal else 0
    rows = -(-(start + q.shape[2]) // bs) - start // bs
    if rows > mask.shape[2]:
        extra = torch.zeros(*mask.shape[:2], rows - mask.shape[2], mask.shape[3],
                            dtype=torch.bool)
        mask = torch.cat([mask, extra], dim=2)
    return mask


def _select_halves_down(q, k, *, causal=True, **config):
    d = q.shape[-1]
    if config.get("low_dim") is None:
        config["low_dim"] = 2 * math.floor(3 * d / 8)
    if config.get("high_dim") is None:
        config["high_dim"] = 2 * math.floor(d / 4)
    return select_blocks(q, k, causal=causal, **config)


def _select_overrides(fn):
    def run(q, k, *, causal=True, **config):
        return select_blocks(q, k, causal=causal, **fn(dict(config), causal))
    return run


def _temperatures_when_calibrated(q, k, *, causal=True, **config):
    factors = iter([config["high_temperature"], config["low_temperature"]])
    return _patched([(ref_select, "band_temperature",
                      lambda *a: BAND_TEMPERATURE(*a) * next(factors))],
                    select_blocks)(q, k, causal=causal, **config)


def _count_weighted_rms(q, k, *, causal=True, **config):
    bs = config["block_size"]
    start = k.shape[2] - q.shape[2] if causal else 0
    q_counts = tile_token_counts(start, q.shape[2], bs).float()
    k_counts = tile_token_counts(0, k.shape[2], bs).float()

    def rms(x, counts):
        w = counts[None, None, :, None]
        return torch.sqrt((w * x.float() ** 2).sum((-2, -1)) / (w.sum() * x.shape[-1]))

    def temperature(q_pooled, k_pooled, dims, eps=1e-6):
        group = q_pooled.shape[1] // k_pooled.shape[1]
        ratio_q = rms(q_pooled[..., dims], q_counts) / rms(q_pooled, q_counts).clamp(min=eps)
        ratio_k = rms(k_pooled[..., dims], k_counts) / rms(k_pooled, k_counts).clamp(min=eps)
        tau = math.sqrt(dims.numel() / q_pooled.shape[-1]) * ratio_q
        return (tau * ratio_k.repeat_interleave(group, 1)).clamp(min=eps)

    return _patched([(ref_select, "band_temperature", temperature)], select_blocks)(
        q, k, causal=causal, **config)


def _interleaved_gqa_select(q, k, *, causal=True, **config):
    hq, hkv = q.shape[1], k.shape[1]
    order = sorted(range(hq), key=lambda h: (h % hkv, h))
    mask = select_blocks(q[:, order], k, causal=causal, **config)
    return mask[:, torch.argsort(torch.tensor(order))]


def _diagonal_without_causality(q, k, *, causal=True, **config):
    mask = select_blocks(q, k, causal=causal, **config)
    if not causal and config.get("force_diagonal", True):
        layout = tile_layout(q.shape[2], k.shape[2], config["block_size"], causal)
        for i, tile in enumerate(layout.query_tile_indices().tolist()):
            if tile < layout.num_key_tiles:
                mask[:, :, i, tile] = True
    return mask


def _logits_over_sqrt_head_dim(q_pooled, k_pooled, dims, tau):
    logits = BAND_LOGITS(q_pooled, k_pooled, dims, tau)
    return logits * math.sqrt(dims.numel() / q_pooled.shape[-1])


def _softmax_over_all_tiles(logits, admissible):
    return torch.softmax(logits.float(), -1)


POOL = ref_select.pool_tiles
LAYOUT = ref_select.tile_layout
BAND_TEMPERATURE = ref_select.band_temperature
TOP_P = ref_select.top_p_select
BAND_LOGITS = ref_select.band_logits

MUTATIONS = {
    "tie_larger_index": (_select_with(top_p_select=_ties_to_larger_index), None),
    "query_tiles_from_row_0": (_select_with(pool_tiles=_pool_from_row_zero), None),
    "zero_padded_pooling": (_select_with(pool_tiles=_zero_padded_pool), None),
    "threshold_one_plain_mass": (_select_with(top_p_select=_top_p_variant("plain")), None),
    "logits_over_sqrt_head_dim": (_select_with(band_logits=_logits_over_sqrt_head_dim), None),
    "mass_including_itself": (_select_with(top_p_select=_top_p_variant("inclusive")), None),
    "softmax_over_inadmissible": (_select_with(band_probabilities=_softmax_over_all_tiles),
                                  None),
    "empty_rows_lse_zero": (None, _attention_with(empty_lse=0.0)),
    "temperatures_ignored": (_select_overrides(
        lambda c, causal: {**c, "high_temperature": 1.0, "low_temperature": 1.0}), None),
    "temperatures_when_calibrated": (_temperatures_when_calibrated, None),
    "pool_in_input_dtype": (_select_with(pool_tiles=_pool_in_input_dtype), None),
    "scores_in_input_dtype": (None, _attention_with(scores_in_input_dtype=True)),
    "query_rows_by_ceil": (_select_rows_by_ceil, None),
    "causal_top_left_select": (_select_with(tile_layout=_layout_variant("top_left")), None),
    "causal_top_left_attention": (None, _attention_with(alignment="top")),
    "rms_weighted_by_tokens": (_count_weighted_rms, None),
    "gqa_interleaved_select": (_interleaved_gqa_select, None),
    "gqa_interleaved_attention": (None, _attention_with(gqa="interleaved")),
    "non_causal_bottom_right": (_select_with(tile_layout=_layout_variant("bottom_right")),
                                None),
    "rope_layout_ignored": (_select_overrides(lambda c, causal: {**c, "rope_layout": "half"}),
                            None),
    "sink_not_forced": (_select_overrides(lambda c, causal: {**c, "force_sink": False}), None),
    "forcing_always_on": (_select_overrides(
        lambda c, causal: {**c, "force_sink": True, "force_diagonal": True}), None),
    "diagonal_without_causality": (_diagonal_without_causality, None),
    "scale_from_value_dim": (None, _attention_with(scale_from="dv")),
    "explicit_scale_ignored": (None, _attention_with(ignore_scale=True)),
    "lse_base_2": (None, _attention_with(log_base=2.0)),
    "band_halves_down": (_select_halves_down, None),
    "normalised_by_fp32_lse": (None, _attention_with(normalise="fp32_lse")),
}


def _failures(select, attention):
    failed = []
    for entry in MANIFEST["cases"]:
        if check_case(entry, ARRAYS[entry["name"]], select, attention):
            failed.append(entry["name"])
    return failed


def test_the_correct_ports_pass_every_case():
    assert _failures(select_blocks, block_sparse_attention) == []
    assert _failures(None, _attention_with()) == []


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_misreading_fails_at_least_two_cases(name):
    select, attention = MUTATIONS[name]
    failed = _failures(select, attention)
    assert len(failed) >= 2, f"{name} fails only {failed}"


def test_every_misreading_of_the_manifest_is_caught_by_two_cases():
    catches = {}
    for entry in MANIFEST["cases"]:
        for tag in entry["catches"]:
            catches.setdefault(tag, []).append(entry["name"])
    assert set(catches) == set(MANIFEST["misreadings"])
    for tag, names in catches.items():
        if tag != "near_ties":
            assert len(names) >= 2, (tag, names)
