"""Properties of prism.reference.select_blocks, checked against docs/semantics.rst."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import make_qkv, oracle_select
from prism.reference import (
    PrismConfig,
    band_dims,
    boundary_ties,
    mask_differences,
    rope_frequencies,
    select_blocks,
    ties_from_trace,
    tile_layout,
    trace_selection,
)


@st.composite
def selection_cases(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """Shapes, tiles, RoPE bases and layouts that the contract's property tests cover."""
    block_size = draw(st.sampled_from([16, 32, 64, 128]))
    kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([32, 64, 96, 128]))
    causal = draw(st.booleans())
    nk = draw(st.integers(1, 5 * block_size))
    nq = draw(st.integers(1, nk)) if causal else draw(st.integers(1, 4 * block_size))
    return dict(
        batch=draw(st.sampled_from([1, 2])),
        q_heads=kv_heads * group,
        kv_heads=kv_heads,
        nq=nq,
        nk=nk,
        head_dim=head_dim,
        block_size=block_size,
        base=10 ** draw(st.floats(3.0, 7.0)),
        layout=draw(st.sampled_from(["half", "interleaved"])),
        dtype=draw(st.sampled_from(dtypes)),
        causal=causal,
        seed=draw(st.integers(0, 2**16)),
        sharpness=draw(st.sampled_from([0.5, 1.0, 3.0])),
    )


def _inputs(case):
    return make_qkv(case["batch"], case["q_heads"], case["kv_heads"], case["nq"], case["nk"],
                    case["head_dim"], base=case["base"], layout=case["layout"],
                    dtype=case["dtype"], seed=case["seed"], causal=case["causal"],
                    sharpness=case["sharpness"])


EDGE_CASES = [
    # Nq = 1, Nq = Nk = bs, and a prefix that is not a tile multiple.
    dict(batch=1, q_heads=2, kv_heads=1, nq=1, nk=200, head_dim=64, block_size=64, base=1e4,
         layout="half", dtype=torch.float32, causal=True, seed=1, sharpness=1.0),
    dict(batch=1, q_heads=2, kv_heads=2, nq=64, nk=64, head_dim=32, block_size=64, base=1e4,
         layout="interleaved", dtype=torch.float32, causal=True, seed=2, sharpness=1.0),
    dict(batch=2, q_heads=4, kv_heads=2, nq=150, nk=333, head_dim=96, block_size=32, base=5e5,
         layout="half", dtype=torch.float32, causal=True, seed=3, sharpness=3.0),
]


@given(case=selection_cases())
@example(case=EDGE_CASES[0])
@example(case=EDGE_CASES[1])
@example(case=EDGE_CASES[2])
def test_mask_matches_loop_oracle_up_to_ties(case):
    q, k, _ = _inputs(case)
    mask = select_blocks(q, k, causal=case["causal"], block_size=case["block_size"],
                         rope_layout=case["layout"])
    ties = boundary_ties(q, k, causal=case["causal"], block_size=case["block_size"],
                         rope_layout=case["layout"])
    expected = torch.from_numpy(oracle_select(q, k, block_size=case["block_size"],
                                              rope_layout=case["layout"],
                                              causal=case["causal"]))
    diffs = mask_differences(mask, expected, ties)
    assert diffs.numel() == 0, f"masks differ outside boundary ties at {diffs[:10].tolist()}"


@given(case=selection_cases())
def test_mask_admissible_shape_and_forced_tiles(case):
    q, k, _ = _inputs(case)
    bs = case["block_size"]
    mask = select_blocks(q, k, causal=case["causal"], block_size=bs)
    layout = tile_layout(case["nq"], case["nk"], bs, case["causal"])
    assert mask.dtype == torch.bool
    assert mask.shape == (case["batch"], case["q_heads"], layout.num_query_tiles,
                          math.ceil(case["nk"] / bs))
    # Row i is the i-th tile that holds a query, on the absolute grid.
    start = case["nk"] - case["nq"] if case["causal"] else 0
    assert layout.num_query_tiles == len({(start + r) // bs for r in range(case["nq"])})
    assert bool(mask[..., 0].all()), "sink tile must be selected"
    if case["causal"]:
        for i in range(layout.num_query_tiles):
            absolute = start // bs + i
            assert bool(mask[:, :, i, absolute].all()), "diagonal tile must be selected"
            assert not bool(mask[:, :, i, absolute + 1:].any()), "selected a future tile"


@given(case=selection_cases(dtypes=(torch.float32,)),
       low=st.floats(0.05, 0.9), extra=st.floats(0.0, 0.5))
def test_higher_threshold_never_drops_a_tile(case, low, extra):
    q, k, _ = _inputs(case)
    high = min(1.0, low + extra)
    common = dict(causal=case["causal"], block_size=case["block_size"], force_sink=False,
                  force_diagonal=False)
    small = select_blocks(q, k, high_threshold=low, low_threshold=low, **common)
    large = select_blocks(q, k, high_threshold=high, low_threshold=high, **common)
    assert not bool((small & ~large).any())


@given(case=selection_cases())
def test_threshold_one_keeps_every_tile_with_probability(case):
    q, k, _ = _inputs(case)
    common = dict(causal=case["causal"], block_size=case["block_size"], force_sink=False,
                  force_diagonal=False, high_threshold=1.0, low_threshold=1.0)
    trace = trace_selection(q, k, **common)
    positive = (trace.high_probs > 0) | (trace.low_probs > 0)
    assert torch.equal(trace.mask, positive & trace.admissible)


def test_threshold_one_with_calibration_selects_every_admissible_tile():
    q, k, _ = make_qkv(1, 2, 1, 300, 700, 64, seed=5)
    trace = trace_selection(q, k, block_size=64, high_threshold=1.0, low_threshold=1.0)
    assert torch.equal(trace.mask, trace.admissible.expand_as(trace.mask))


@given(case=selection_cases())
def test_gqa_equals_repeated_kv(case):
    q, k, _ = _inputs(case)
    group = case["q_heads"] // case["kv_heads"]
    kw = dict(causal=case["causal"], block_size=case["block_size"])
    assert torch.equal(select_blocks(q, k, **kw),
                       select_blocks(q, k.repeat_interleave(group, dim=1), **kw))


@given(case=selection_cases())
def test_batch_elements_are_independent(case):
    q, k, _ = _inputs(case)
    kw = dict(causal=case["causal"], block_size=case["block_size"])
    full = select_blocks(q, k, **kw)
    for b in range(case["batch"]):
        assert torch.equal(full[b:b + 1], select_blocks(q[b:b + 1], k[b:b + 1], **kw))


def test_band_dims_are_the_fastest_and_slowest_rope_pairs():
    """The high band rotates fastest and the low band slowest, for both layouts."""
    d = 128
    freqs = rope_frequencies(d, 1e4)
    for layout in ("half", "interleaved"):
        high, low = band_dims(d, 64, 96, layout)
        # Measure each dim's rotation speed by rotating a unit vector one step.
        x = torch.eye(d, dtype=torch.float64)
        from prism.reference import apply_rope
        rotated = apply_rope(x.unsqueeze(0).expand(2, d, d).transpose(0, 1), 1e4,
                             rope_layout=layout)  # (d, 2, d): positions 0 and 1
        angle = torch.acos(torch.clamp((rotated[:, 0] * rotated[:, 1]).sum(-1), -1, 1))
        fastest = set(torch.argsort(angle, descending=True, stable=True)[:64].tolist())
        slowest = set(torch.argsort(angle, stable=True)[:96].tolist())
        assert set(high.tolist()) == fastest
        assert set(low.tolist()) == slowest
        assert torch.allclose(angle.max(), freqs[0])


def test_config_object_and_overrides_agree():
    q, k, _ = make_qkv(1, 2, 2, 256, 256, 64, seed=7)
    cfg = PrismConfig(block_size=32, high_threshold=0.8, calibrate=False,
                      high_temperature=0.5, rope_layout="interleaved")
    by_object = select_blocks(q, k, cfg)
    by_keywords = select_blocks(q, k, block_size=32, high_threshold=0.8, calibrate=False,
                                high_temperature=0.5, rope_layout="interleaved")
    assert torch.equal(by_object, by_keywords)
    assert torch.equal(select_blocks(q, k, cfg, block_size=64),
                       select_blocks(q, k, cfg.replace(block_size=64)))


def test_prefix_query_tiles_pool_only_their_queries():
    """A partial first query tile averages just the queries it holds (contract §3)."""
    q, k, _ = make_qkv(1, 1, 1, 70, 200, 32, seed=11)
    trace = trace_selection(q, k, block_size=64)
    # Queries sit at positions 130..199: tiles 2 (130..191) and 3 (192..199).
    assert trace.layout.first_query_tile == 2 and trace.layout.num_query_tiles == 2
    assert torch.allclose(trace.q_pooled[0, 0, 0], q[0, 0, :62].mean(0), atol=1e-6)
    assert torch.allclose(trace.q_pooled[0, 0, 1], q[0, 0, 62:].mean(0), atol=1e-6)
    assert torch.allclose(trace.k_pooled[0, 0, 3], k[0, 0, 192:].mean(0), atol=1e-6)


def test_pooled_statistics_are_fp32_for_half_inputs():
    q, k, _ = make_qkv(1, 2, 1, 128, 128, 64, dtype=torch.bfloat16, seed=3)
    trace = trace_selection(q, k, block_size=32)
    assert trace.q_pooled.dtype == torch.float32 and trace.high_probs.dtype == torch.float32
    assert torch.allclose(trace.q_pooled[0, 0, 0], q[0, 0, :32].float().mean(0), atol=1e-6)


def test_calibration_matches_its_formula():
    q, k, _ = make_qkv(1, 4, 2, 256, 384, 64, seed=9)
    trace = trace_selection(q, k, block_size=64)
    qbar = trace.q_pooled[0, 3].double()
    kbar = trace.k_pooled[0, 1].double()  # query head 3 reads KV head 1
    rms = lambda a: a.pow(2).mean().sqrt()
    dims = trace.low_dims
    expected = (math.sqrt(dims.numel() / 64) * rms(qbar[:, dims]) / rms(qbar)
                * rms(kbar[:, dims]) / rms(kbar))
    assert abs(trace.low_tau[0, 3].item() - expected.item()) < 1e-5 * expected.item()


@pytest.mark.parametrize("fill", ["zeros", "constant", "fp16_huge"])
def test_degenerate_inputs_give_no_nan(fill):
    shape_q, shape_k = (1, 2, 200, 64), (1, 1, 300, 64)
    if fill == "zeros":
        q, k = torch.zeros(shape_q), torch.zeros(shape_k)
    elif fill == "constant":
        q, k = torch.full(shape_q, 0.5), torch.full(shape_k, 0.5)
    else:
        q = torch.full(shape_q, 6.0e4, dtype=torch.float16)
        k = torch.full(shape_k, -6.0e4, dtype=torch.float16)
    trace = trace_selection(q, k, block_size=64)
    for name in ("high_tau", "low_tau", "high_probs", "low_probs"):
        assert torch.isfinite(getattr(trace, name)).all(), name
    assert trace.mask[..., 0].all()
    # Equal scores everywhere: ties go to the smaller tile index, and rows keep
    # enough tiles to cover 95% of a uniform distribution.
    if fill != "fp16_huge":
        counts = trace.high_keep.sum(-1)[0, 0]
        admissible = trace.admissible.sum(-1)
        expected = torch.ceil(0.95 * admissible.double() - 1e-9).long()
        assert torch.equal(counts.long(), torch.maximum(expected, torch.ones_like(expected)))


def test_ties_go_to_the_smaller_tile_index():
    """Two equal-probability tiles straddling the threshold: the smaller index wins."""
    d = 4
    # One query tile, three key tiles; scores give probabilities (0.5, 0.25, 0.25).
    q = torch.zeros(1, 1, 3, d)
    k = torch.zeros(1, 1, 3, d)
    q[..., 2, 0] = 1.0
    k[..., 0, 0] = math.log(2.0)  # logit ln2 / (sqrt(d_b) * tau): use tau to undo the scale
    mask = select_blocks(q, k, block_size=1, calibrate=False, high_dim=4, low_dim=4,
                         high_temperature=1 / 2, low_temperature=1 / 2, force_sink=False,
                         force_diagonal=False, high_threshold=0.7, low_threshold=0.7)
    # Query tile 2 sees key tiles 0, 1, 2 with logits ln2, 0, 0 -> probs 0.5, 0.25, 0.25.
    # Masses before: 0 (tile 0), 0.5 (tile 1), 0.75 (tile 2): keep tiles 0 and 1.
    assert mask[0, 0, 2].tolist() == [True, True, False]


def test_non_causal_selects_over_all_key_tiles():
    q, k, _ = make_qkv(1, 2, 1, 100, 260, 64, causal=False, seed=4)
    mask = select_blocks(q, k, causal=False, block_size=64, high_threshold=1.0,
                         low_threshold=1.0)
    assert mask.shape == (1, 2, 2, 5) and bool(mask.all())


def test_empty_queries_give_empty_mask():
    q = torch.zeros(2, 4, 0, 64)
    k = torch.randn(2, 2, 100, 64)
    mask = select_blocks(q, k, block_size=32)
    assert mask.shape == (2, 4, 0, 4) and mask.dtype == torch.bool


def test_oracle_can_fail():
    """The loop oracle is sensitive: a wrong threshold changes its mask."""
    q, k, _ = make_qkv(1, 1, 1, 512, 512, 64, seed=12, sharpness=3.0)
    a = oracle_select(q, k, block_size=32, high_threshold=0.5, low_threshold=0.5)
    b = oracle_select(q, k, block_size=32)
    assert not np.array_equal(a, b)


def test_near_equal_neighbours_of_a_boundary_entry_are_ties():
    """Two probabilities equal to 4e-7 relative straddle the cut: both are ties."""
    import dataclasses

    q, k, _ = make_qkv(1, 1, 1, 4, 4, 8, seed=0)
    trace = trace_selection(q, k, block_size=1, force_sink=False, force_diagonal=False)
    # Row 3 sees 4 tiles. Probabilities 0.5, 0.45, 0.025 + 1e-8, 0.025: the
    # third entry starts at mass 0.95 (a boundary entry), the fourth at
    # 0.975 + 1e-8, far from p, but its probability equals the third's.
    probs = torch.zeros_like(trace.high_probs)
    probs[0, 0, 3] = torch.tensor([0.5, 0.45, 0.025 + 1e-8, 0.025])
    mass = torch.zeros_like(probs)
    mass[0, 0, 3] = torch.tensor([0.0, 0.5, 0.95, 0.975 + 1e-8])
    far = torch.full_like(probs, 2.0)  # the low band keeps nothing near its cut
    trace = dataclasses.replace(trace, high_probs=probs, high_mass_before=mass,
                                low_probs=probs, low_mass_before=far)
    ties = ties_from_trace(trace)
    assert ties[0, 0, 3].tolist() == [False, False, True, True]
    # Without the near-equal rule only the boundary entry would be a tie.
    assert ties_from_trace(trace, relative=0.0)[0, 0, 3].tolist() == [False, False, True, False]


def test_tie_constants_are_public_and_the_defaults():
    """TIE_MARGIN and TIE_RELATIVE (contract §6.5) are the defaults of every tie function."""
    import inspect

    import prism
    from prism import reference

    assert reference.TIE_MARGIN == 1e-5 and reference.TIE_RELATIVE == 1e-6
    assert "TIE_RELATIVE" in reference.__all__ and prism.TIE_RELATIVE is reference.TIE_RELATIVE
    for fn in (boundary_ties, ties_from_trace):
        params = inspect.signature(fn).parameters
        assert params["margin"].default is reference.TIE_MARGIN
        assert params["relative"].default is reference.TIE_RELATIVE
    assert inspect.signature(boundary_ties).parameters["relative"].kind is \
        inspect.Parameter.KEYWORD_ONLY
