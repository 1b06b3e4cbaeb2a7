"""prism.optimized against prism.reference (the contract), kernel by kernel and end to end.

On a machine without CUDA the Triton kernels run in Triton's interpreter on the
CPU (``TRITON_INTERPRET=1`` is set below unless triton was imported first); on
a CUDA machine the same tests run the compiled kernels on the GPU. Shapes stay
small: the interpreter costs about a second per 1024-token head.

Every kernel output is first poisoned (NaN for floats, sentinels for integers
and a drawn value for the bool mask) through the internal entry points, so an
element the kernel forgets to write cannot pass.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import prism.optimized as optimized  # noqa: E402
import prism.optimized.selection as selection_module  # noqa: E402
from helpers import TOLERANCE, kernel_test_setup, make_qkv, relative_error  # noqa: E402
from prism import reference  # noqa: E402
from prism.optimized._runtime import check_device  # noqa: E402
from prism.optimized.attention import (  # noqa: E402
    AttentionConfig,
    sparse_attention_forward,
)
from prism.optimized.indices import mask_rows_to_indices  # noqa: E402
from prism.optimized.selection import select_tiles  # noqa: E402
from prism.reference import TIE_MARGIN, band_sizes, resolve_config, tile_layout  # noqa: E402

INTERPRETED, DEVICE, pytestmark = kernel_test_setup()

PUBLIC = ("select_blocks", "block_sparse_attention", "prism_attention", "mask_to_indices")
# Head dims of the models Prism targets; 80 and 96 pad to 128 inside the kernels.
HEAD_DIMS = [64, 80, 96, 128, 256]


# --------------------------------------------------------------------------
# Shared checks (tests/test_gpu.py runs them at larger sizes and in bf16).
# --------------------------------------------------------------------------

def check_selection(q, k, *, causal=True, poison=True, **overrides):
    """Optimized mask and indices equal the reference's, apart from boundary ties.

    Returns the number of boundary ties the reference reported.
    """
    cfg = resolve_config(None, **overrides)
    trace = reference.trace_selection(q, k, cfg, causal=causal)
    ties = reference.ties_from_trace(trace)
    layout = tile_layout(q.shape[2], k.shape[2], cfg.block_size, causal)
    high, low = band_sizes(q.shape[-1], cfg.high_dim, cfg.low_dim)
    shape = (q.shape[0], q.shape[1], layout.num_query_tiles, layout.num_key_tiles)
    mask = torch.full(shape, poison, dtype=torch.bool, device=q.device)
    num = torch.full(shape[:-1], -7, dtype=torch.int32, device=q.device)
    idx = torch.full(shape, 12345, dtype=torch.int32, device=q.device)
    select_tiles(q, k, cfg, causal, layout, high, low, write_mask=True, write_indices=True,
                 mask=mask, kv_num_blocks=num, kv_indices=idx)
    _assert_equal_up_to_ties(mask, trace, ties)
    ref_num, ref_idx = reference.mask_to_indices(mask)
    assert torch.equal(num, ref_num) and torch.equal(idx, ref_idx)
    public = optimized.select_blocks(q, k, cfg, causal=causal)
    assert public.dtype == torch.bool and public.shape == shape
    _assert_equal_up_to_ties(public, trace, ties)
    return int(ties.sum())


def _assert_equal_up_to_ties(mask, trace, ties):
    wrong = reference.mask_differences(mask, trace.mask, ties)
    wrong = wrong[[not _swapped_with_a_tie(trace, *entry) for entry in wrong.tolist()]]
    assert wrong.numel() == 0, _describe_differences(wrong, mask, trace)


def _swapped_with_a_tie(trace, b, h, i, j, relative=1e-6):
    """Whether entry j's probability equals, up to fp32 rounding, that of a boundary
    tie in the same row and band.

    Two such entries may swap ranks between implementations (their probabilities
    are computed in different fp32 orders), which moves the cut past one of them
    while only the other one's mass before it lies near the threshold; the
    reference's ``ties_from_trace`` flags only that other one. Seen on the H200
    with rows of 8192 tiles, where neighbouring probabilities differ by 2e-7.
    """
    cfg = trace.config
    for probs, mass, threshold in ((trace.high_probs, trace.high_mass_before,
                                    cfg.high_threshold),
                                   (trace.low_probs, trace.low_mass_before, cfg.low_threshold)):
        row_probs, row_mass = probs[b, h, i], mass[b, h, i]
        near = (row_mass - threshold).abs() <= TIE_MARGIN
        close = (row_probs - row_probs[j]).abs() <= relative * row_probs[j]
        close[j] = False
        if bool((near & close & trace.admissible[i]).any()):
            return True
    return False


def _describe_differences(wrong, mask, trace):
    """Where two masks differ: each entry's masses before it, by band, in the reference."""
    lines = [f"{wrong.shape[0]} mask entries differ outside boundary ties:"]
    for b, h, i, j in wrong[:5].tolist():
        lines.append(
            f"  (b={b}, h={h}, i={i}, j={j}): optimized {bool(mask[b, h, i, j])}, reference "
            f"{bool(trace.mask[b, h, i, j])}; reference mass before it: high "
            f"{float(trace.high_mass_before[b, h, i, j]):.8f} (p={trace.config.high_threshold}), "
            f"low {float(trace.low_mass_before[b, h, i, j]):.8f} "
            f"(p={trace.config.low_threshold}); probabilities high "
            f"{float(trace.high_probs[b, h, i, j]):.3e}, "
            f"low {float(trace.low_probs[b, h, i, j]):.3e}"
        )
    return "\n".join(lines)


def check_attention(q, k, v, mask, *, block_size, causal=True, scale=None):
    """Poisoned kernel outputs and the public function equal the reference.

    Returns ``(output error, lse error)`` as scale-free relative errors.
    """
    layout = tile_layout(q.shape[2], k.shape[2], block_size, causal)
    num, idx = mask_rows_to_indices(mask, layout.first_query_tile, causal_trim=causal)
    out = torch.full((*q.shape[:3], v.shape[3]), math.nan, dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:3], math.nan, dtype=torch.float32, device=q.device)
    sparse_attention_forward(q, k, v, num, idx, block_size=block_size, causal=causal,
                             scale=scale, return_lse=True,
                             first_query_tile=layout.first_query_tile,
                             query_start=layout.query_start, interpreted=INTERPRETED,
                             out=out, lse=lse)
    ref_out, ref_lse = reference.block_sparse_attention(
        q, k, v, mask, block_size=block_size, causal=causal, scale=scale, return_lse=True)
    out_error = relative_error(out, ref_out)
    lse_error = relative_error(lse, ref_lse)
    tolerance = TOLERANCE[q.dtype]
    assert out_error <= tolerance, f"output error {out_error:.2e} > {tolerance:.0e}"
    assert lse_error <= 1e-5, f"lse error {lse_error:.2e}"
    public_out, public_lse = optimized.block_sparse_attention(
        q, k, v, mask, block_size=block_size, causal=causal, scale=scale, return_lse=True)
    assert torch.equal(public_out, out) and torch.equal(public_lse, lse)
    return out_error, lse_error


def random_tile_mask(shape, density, gen, *, causal, first_tile, keep_diagonal):
    """Bernoulli tile mask; optionally with the causal diagonal forced on."""
    mask = torch.rand(shape, generator=gen) < density
    if causal and keep_diagonal:
        rows = torch.arange(shape[-2])
        cols = (first_tile + rows).clamp(max=shape[-1] - 1)
        mask[..., rows, cols] = True
    return mask


def _to(device, *tensors):
    return tuple(t.to(device) for t in tensors)


# --------------------------------------------------------------------------
# API surface
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", PUBLIC)
def test_signatures_equal_reference(name):
    assert inspect.signature(getattr(optimized, name)) == inspect.signature(
        getattr(reference, name))


def test_cpu_tensors_without_interpreter_get_a_clear_error():
    def compiled_kernel():
        """Stands for a kernel Triton compiled for the GPU."""

    cpu = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        check_device(compiled_kernel, q=cpu)
    message = str(info.value)
    for words in ("CUDA", "prism.reference", "q is on cpu", "TRITON_INTERPRET=1"):
        assert words in message


def test_meta_tensors_are_refused_before_any_kernel():
    q, k, v = (torch.empty(1, 2, 64, 32, device="meta") for _ in range(3))
    with pytest.raises(ValueError, match="CUDA"):
        optimized.select_blocks(q, k, block_size=32)
    with pytest.raises(ValueError, match="CUDA"):
        optimized.prism_attention(q, k, v, block_size=32)


# --------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------

@st.composite
def selection_cases(draw):
    block_size = draw(st.sampled_from([32, 64, 128]))
    causal = draw(st.booleans())
    nk = draw(st.integers(1, 3 * block_size + 17))
    nq = draw(st.integers(1, nk)) if causal else draw(st.integers(1, 2 * block_size))
    kv_heads = draw(st.sampled_from([1, 2]))
    return dict(
        batch=draw(st.sampled_from([1, 2])), kv_heads=kv_heads,
        q_heads=kv_heads * draw(st.sampled_from([1, 2])), nq=nq, nk=nk,
        head_dim=draw(st.sampled_from(HEAD_DIMS)), block_size=block_size, causal=causal,
        base=10 ** draw(st.floats(3.0, 7.0)), layout=draw(st.sampled_from(["half",
                                                                           "interleaved"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        seed=draw(st.integers(0, 2**16)), sharpness=draw(st.sampled_from([0.5, 1.0, 3.0])),
        threshold=draw(st.sampled_from([0.5, 0.9, 0.95, 1.0])),
        calibrate=draw(st.booleans()), poison=draw(st.booleans()),
    )


@given(case=selection_cases())
@example(case=dict(batch=1, kv_heads=1, q_heads=2, nq=1, nk=200, head_dim=64, block_size=32,
                   causal=True, base=1e4, layout="half", dtype=torch.float32, seed=0,
                   sharpness=1.0, threshold=0.95, calibrate=True, poison=True))
@example(case=dict(batch=1, kv_heads=2, q_heads=4, nq=64, nk=64, head_dim=64, block_size=64,
                   causal=True, base=1e6, layout="interleaved", dtype=torch.float16, seed=1,
                   sharpness=3.0, threshold=0.9, calibrate=True, poison=False))
@example(case=dict(batch=2, kv_heads=1, q_heads=2, nq=150, nk=333, head_dim=128, block_size=64,
                   causal=True, base=5e5, layout="half", dtype=torch.float32, seed=2,
                   sharpness=3.0, threshold=0.95, calibrate=True, poison=True))
def test_selection_matches_reference(case):
    q, k, _ = make_qkv(case["batch"], case["q_heads"], case["kv_heads"], case["nq"],
                       case["nk"], case["head_dim"], base=case["base"], layout=case["layout"],
                       dtype=case["dtype"], seed=case["seed"], causal=case["causal"],
                       sharpness=case["sharpness"])
    q, k = _to(DEVICE, q, k)
    check_selection(q, k, causal=case["causal"], poison=case["poison"],
                    block_size=case["block_size"], rope_layout=case["layout"],
                    high_threshold=case["threshold"], low_threshold=case["threshold"] ** 2,
                    calibrate=case["calibrate"], high_temperature=0.7, low_temperature=1.3)


@pytest.mark.parametrize("overrides", [
    dict(block_size=16, high_dim=16, low_dim=40),
    dict(block_size=48, force_sink=False, force_diagonal=False, high_threshold=0.3),
    dict(block_size=32, high_threshold=1.0, low_threshold=0.05),
])
def test_selection_cuda_core_path(monkeypatch, overrides):
    """Launches wider than ``dot_max_width`` take the CUDA-core path; force it on small rows."""
    monkeypatch.setattr(selection_module, "_DEFAULT_TUNING",
                        selection_module.SelectionTuning(dot_max_width=8))
    assert not any(use_dot for *_, use_dot in selection_module._launch_plan(
        tile_layout(150, 230, 16, True), True, selection_module._DEFAULT_TUNING))
    q, k, _ = make_qkv(1, 4, 2, 150, 230, 64, seed=5, sharpness=2.0)
    q, k = _to(DEVICE, q, k)
    check_selection(q, k, **overrides)
    check_selection(q[:, :, :70], k[:, :, :90], causal=False, **overrides)


@pytest.mark.parametrize("tuning", [
    dict(rows_per_program=32), dict(elements_per_thread=64), dict(elements_per_thread=16),
    dict(merge_width=16), dict(merge_width=512), dict(check_every=4), dict(num_stages=4),
    dict(early_exit=False), dict(stack_bands_max_width=0),
], ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()))
def test_selection_launch_shapes_keep_the_reference_selection(monkeypatch, tuning):
    """Every launch shape the benchmarks sweep (``bench_selection.py --variants``) selects
    what the reference selects, up to boundary ties: the tuning changes fp32 summation
    order, never the semantics. Rows of up to 64 key tiles, so merged and per-width
    launches both occur."""
    monkeypatch.setattr(selection_module, "_DEFAULT_TUNING",
                        selection_module.SelectionTuning(**tuning))
    q, k, _ = make_qkv(1, 2, 1, 1024, 1024, 64, seed=17, sharpness=2.0)
    q, k = _to(DEVICE, q, k)
    check_selection(q, k, block_size=16)


def test_selection_exact_ties_break_by_index():
    """Identical key tiles give exactly equal probabilities; the smaller index goes first."""
    gen = torch.Generator().manual_seed(3)
    tile = torch.randn(1, 1, 32, 64, generator=gen)
    k = tile.repeat(1, 1, 8, 1)  # 8 equal key tiles
    q = torch.randn(1, 2, 256, 64, generator=gen)
    q, k = _to(DEVICE, q, k)
    for threshold in (0.3, 0.5, 0.77):
        check_selection(q, k, block_size=32, high_threshold=threshold,
                        low_threshold=threshold, force_sink=False, force_diagonal=False)


def test_selection_of_all_zero_inputs_keeps_first_tiles_by_index():
    q = torch.zeros(1, 2, 128, 64, device=DEVICE)
    k = torch.zeros(1, 1, 128, 64, device=DEVICE)
    check_selection(q, k, block_size=32, force_sink=False, force_diagonal=False)


def test_selection_outputs_agree_across_exit_checks_and_output_modes():
    """Checking the bisection's early exit every 3 steps instead of 2, and writing the
    mask, the indices or both (the compaction stages its flags in the mask or in the
    index rows), give the same selection."""
    q, k, _ = make_qkv(1, 1, 1, 200, 200, 32, seed=11, sharpness=2.0)
    q, k = _to(DEVICE, q, k)
    cfg = resolve_config(None, block_size=16)
    layout = tile_layout(200, 200, 16, True)
    high, low = band_sizes(32, cfg.high_dim, cfg.low_dim)
    expected = select_tiles(q, k, cfg, True, layout, high, low)[0]
    tuning = selection_module.SelectionTuning(check_every=3)
    mask = select_tiles(q, k, cfg, True, layout, high, low, tuning=tuning)[0]
    _, num, idx, _ = select_tiles(q, k, cfg, True, layout, high, low, write_mask=False,
                                  write_indices=True, tuning=tuning)
    both = select_tiles(q, k, cfg, True, layout, high, low, write_indices=True, tuning=tuning)
    assert torch.equal(mask, expected) and torch.equal(both[0], expected)
    ref_num, ref_idx = reference.mask_to_indices(expected)
    for got_num, got_idx in ((num, idx), both[1:3]):
        assert torch.equal(got_num, ref_num) and torch.equal(got_idx, ref_idx)


@pytest.mark.slow
def test_selection_long_row_and_prefix():
    """A few hundred key tiles per row, a KV prefix that is not a tile multiple."""
    q, k, _ = make_qkv(1, 2, 1, 40, 5000, 64, seed=9, sharpness=2.0)
    q, k = _to(DEVICE, q, k)
    check_selection(q, k, block_size=16)


# --------------------------------------------------------------------------
# Block-sparse attention
# --------------------------------------------------------------------------

@st.composite
def attention_cases(draw):
    block_size = draw(st.sampled_from([32, 64, 128]))
    causal = draw(st.booleans())
    nk = draw(st.integers(1, 3 * block_size))
    nq = draw(st.integers(1, nk)) if causal else draw(st.integers(1, 2 * block_size))
    kv_heads = draw(st.sampled_from([1, 2]))
    return dict(
        batch=draw(st.sampled_from([1, 2])), kv_heads=kv_heads,
        q_heads=kv_heads * draw(st.sampled_from([1, 2])), nq=nq, nk=nk,
        head_dim=draw(st.sampled_from(HEAD_DIMS)), block_size=block_size, causal=causal,
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        seed=draw(st.integers(0, 2**16)), density=draw(st.floats(0.0, 1.0)),
        keep_diagonal=draw(st.booleans()), broadcast=draw(st.booleans()),
        value_dim=draw(st.sampled_from([None, 32])),
        scale=draw(st.sampled_from([None, 0.05])),
    )


@given(case=attention_cases())
@example(case=dict(batch=1, kv_heads=1, q_heads=2, nq=1, nk=77, head_dim=64, block_size=32,
                   causal=True, dtype=torch.float32, seed=0, density=0.5, keep_diagonal=True,
                   broadcast=False, value_dim=None, scale=None))
@example(case=dict(batch=1, kv_heads=2, q_heads=4, nq=64, nk=64, head_dim=128, block_size=64,
                   causal=True, dtype=torch.float16, seed=1, density=1.0, keep_diagonal=True,
                   broadcast=False, value_dim=None, scale=None))
@example(case=dict(batch=2, kv_heads=1, q_heads=2, nq=100, nk=300, head_dim=64, block_size=64,
                   causal=True, dtype=torch.float32, seed=2, density=0.4, keep_diagonal=False,
                   broadcast=True, value_dim=32, scale=0.05))
def test_attention_matches_reference(case):
    q, k, v = make_qkv(case["batch"], case["q_heads"], case["kv_heads"], case["nq"],
                       case["nk"], case["head_dim"], dtype=case["dtype"], seed=case["seed"],
                       causal=case["causal"], value_dim=case["value_dim"])
    layout = tile_layout(case["nq"], case["nk"], case["block_size"], case["causal"])
    lead = (1, 1) if case["broadcast"] else (case["batch"], case["q_heads"])
    mask = random_tile_mask((*lead, layout.num_query_tiles, layout.num_key_tiles),
                            case["density"], torch.Generator().manual_seed(case["seed"]),
                            causal=case["causal"], first_tile=layout.first_query_tile,
                            keep_diagonal=case["keep_diagonal"])
    q, k, v, mask = _to(DEVICE, q, k, v, mask)
    check_attention(q, k, v, mask, block_size=case["block_size"], causal=case["causal"],
                    scale=case["scale"])


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_head_dim_runs_selection_and_attention(head_dim):
    """Each supported head dim, a length that is no tile multiple, GQA 2, fp16."""
    q, k, v = _to(DEVICE, *make_qkv(1, 4, 2, 70, 150, head_dim, dtype=torch.float16,
                                    seed=head_dim, sharpness=2.0))
    check_selection(q, k, block_size=32)
    layout = tile_layout(70, 150, 32, True)
    mask = random_tile_mask((1, 4, layout.num_query_tiles, layout.num_key_tiles), 0.5,
                            torch.Generator().manual_seed(head_dim), causal=True,
                            first_tile=layout.first_query_tile, keep_diagonal=True)
    check_attention(q, k, v, mask.to(DEVICE), block_size=32)


@pytest.mark.parametrize("kv_major", [True, False])
def test_both_program_orders_cover_every_head_and_tile(kv_major):
    """Batch 2, GQA group 3, several query tiles: each program order must map
    its programs one to one onto (batch, head, query tile, sub-block)."""
    q, k, v = make_qkv(2, 6, 2, 96, 96, 64, dtype=torch.float32, seed=11)
    layout = tile_layout(96, 96, 32, True)
    mask = random_tile_mask((2, 6, layout.num_query_tiles, layout.num_key_tiles), 0.6,
                            torch.Generator().manual_seed(3), causal=True,
                            first_tile=layout.first_query_tile, keep_diagonal=True)
    q, k, v, mask = _to(DEVICE, q, k, v, mask)
    num, idx = mask_rows_to_indices(mask, layout.first_query_tile, causal_trim=True)
    config = AttentionConfig(16, 16, 4, 1, kv_major=kv_major)
    out = torch.full((2, 6, 96, 64), float("nan"), dtype=q.dtype, device=DEVICE)
    lse = torch.full((2, 6, 96), float("nan"), dtype=torch.float32, device=DEVICE)
    sparse_attention_forward(q, k, v, num, idx, block_size=32, causal=True, scale=None,
                             return_lse=True, first_query_tile=layout.first_query_tile,
                             query_start=layout.query_start, interpreted=INTERPRETED,
                             out=out, lse=lse, config=config)
    expected, expected_lse = reference.block_sparse_attention(
        q, k, v, mask, block_size=32, causal=True, return_lse=True)
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
    assert torch.allclose(lse, expected_lse, atol=1e-5, rtol=1e-5)


def test_attention_tiles_above_the_diagonal_are_ignored():
    """A causal mask may name inadmissible tiles; they hold no readable key."""
    q, k, v = _to(DEVICE, *make_qkv(1, 2, 1, 96, 160, 64, seed=4))
    mask = torch.ones(1, 2, 3, 5, dtype=torch.bool, device=DEVICE)
    check_attention(q, k, v, mask, block_size=32)


def test_attention_rows_with_no_key():
    q, k, v = _to(DEVICE, *make_qkv(1, 2, 1, 64, 64, 64, causal=False, seed=2))
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool, device=DEVICE)
    mask[:, :, 1, 0] = True
    check_attention(q, k, v, mask, block_size=32, causal=False)
    o, lse = optimized.block_sparse_attention(q, k, v, mask, block_size=32, causal=False,
                                              return_lse=True)
    assert torch.all(o[:, :, :32] == 0) and torch.all(lse[:, :, :32] == -math.inf)


@pytest.mark.parametrize("block_size", [24, 7])
def test_attention_block_sizes_outside_the_kernel_use_the_exact_path(block_size):
    q, k, v = _to(DEVICE, *make_qkv(1, 2, 1, 50, 70, 64, seed=6))
    layout = tile_layout(50, 70, block_size, True)
    mask = torch.rand(1, 2, layout.num_query_tiles, layout.num_key_tiles,
                      generator=torch.Generator().manual_seed(0)) < 0.6
    mask = mask.to(DEVICE)
    o = optimized.block_sparse_attention(q, k, v, mask, block_size=block_size)
    expected = reference.block_sparse_attention(q, k, v, mask, block_size=block_size)
    assert relative_error(o, expected) <= 1e-5
    o2, mask2 = optimized.prism_attention(q, k, v, block_size=block_size, return_mask=True)
    assert relative_error(o2, reference.block_sparse_attention(
        q, k, v, mask2, block_size=block_size)) <= 1e-5


# --------------------------------------------------------------------------
# End to end, empty inputs, mask_to_indices
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nq,nk,bs,layout", [(300, 420, 64, "half"), (256, 256, 128, "interleaved"),
                                             (33, 97, 32, "half")])
def test_prism_attention_matches_reference(dtype, nq, nk, bs, layout):
    q, k, v = _to(DEVICE, *make_qkv(1, 4, 2, nq, nk, 64, dtype=dtype, seed=nq, layout=layout,
                                    sharpness=2.0))
    o, lse, mask = optimized.prism_attention(q, k, v, block_size=bs, rope_layout=layout,
                                             return_lse=True, return_mask=True)
    ties = reference.boundary_ties(q, k, block_size=bs, rope_layout=layout)
    ref_mask = reference.select_blocks(q, k, block_size=bs, rope_layout=layout)
    assert reference.mask_differences(mask, ref_mask, ties).numel() == 0
    ref_o, ref_lse = reference.block_sparse_attention(q, k, v, mask, block_size=bs,
                                                      return_lse=True)
    assert relative_error(o, ref_o) <= TOLERANCE[dtype]
    assert relative_error(lse, ref_lse) <= 1e-5
    only_o = optimized.prism_attention(q, k, v, block_size=bs, rope_layout=layout)
    assert torch.equal(only_o, o)
    o_mask = optimized.prism_attention(q, k, v, block_size=bs, rope_layout=layout,
                                       return_mask=True)
    assert torch.equal(o_mask[0], o) and torch.equal(o_mask[1], mask)


def test_empty_inputs_give_empty_outputs():
    q = torch.zeros(1, 2, 0, 32, device=DEVICE)
    k, v = torch.randn(1, 1, 10, 32, device=DEVICE), torch.randn(1, 1, 10, 32, device=DEVICE)
    o, lse, mask = optimized.prism_attention(q, k, v, block_size=4, return_lse=True,
                                             return_mask=True)
    assert o.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0) and mask.shape == (1, 2, 0, 3)
    q = torch.randn(1, 2, 5, 32, device=DEVICE)
    empty_k = torch.zeros(1, 1, 0, 32, device=DEVICE)
    o, lse = optimized.block_sparse_attention(q, empty_k, empty_k,
                                              torch.zeros(1, 2, 1, 0, dtype=torch.bool,
                                                          device=DEVICE),
                                              block_size=16, causal=False, return_lse=True)
    assert torch.all(o == 0) and torch.all(lse == -math.inf)


@given(rows=st.integers(1, 5), cols=st.integers(1, 40), lead=st.sampled_from([(), (2,), (2, 3)]),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_mask_to_indices_matches_reference(rows, cols, lead, density, seed):
    mask = torch.rand(*lead, rows, cols, generator=torch.Generator().manual_seed(seed)) < density
    num, idx = optimized.mask_to_indices(mask.to(DEVICE))
    ref_num, ref_idx = reference.mask_to_indices(mask)
    assert torch.equal(num.cpu(), ref_num) and torch.equal(idx.cpu(), ref_idx)


def test_mask_to_indices_rejects_what_the_reference_rejects():
    with pytest.raises(TypeError, match="bool"):
        optimized.mask_to_indices(torch.zeros(2, 2, device=DEVICE))
    with pytest.raises(ValueError, match="2 dims"):
        optimized.mask_to_indices(torch.zeros(3, dtype=torch.bool, device=DEVICE))


def test_launch_plan_keeps_tensor_cores_below_the_dot_width():
    """A causal call twice as wide as ``dot_max_width``: the rows that see at most
    ``dot_max_width`` tiles keep the tensor-core path (16 rows a program); only the
    widest launch runs on CUDA cores."""
    tuning = selection_module.SelectionTuning()
    tiles = 2 * tuning.dot_max_width
    plan = selection_module._launch_plan(tile_layout(tiles * 16, tiles * 16, 16, True), True,
                                         tuning)
    assert plan[0][0] == 0 and plan[-1][1] == tiles
    # rows covered once, in order
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:], strict=False))
    for _, row_end, width, rows, use_dot in plan:
        assert row_end <= width  # a causal row i sees i + 1 tiles
        assert use_dot == (width <= tuning.dot_max_width)
        assert rows == (tuning.rows_per_program if use_dot else max(1, 8192 // width))
    assert [p[4] for p in plan].count(False) == 1


@pytest.mark.parametrize("dot_max_width", [1024, 2048])
def test_wide_launches_fit_tl_dot_and_shared_memory(dot_max_width):
    """Tensor-core launches slice the band dims at least 16 wide (``tl.dot``'s K) and
    those wider than 1024 key tiles take ``wide_num_stages`` (three stages of a
    2048-wide launch overflow an H200's shared memory); CUDA-core launches keep
    ``num_stages``."""
    from prism.optimized.selection_plan import _prepare_launches

    tuning = selection_module.SelectionTuning(dot_max_width=dot_max_width)
    steps = _prepare_launches(tile_layout(262144, 262144, 128, True), True, tuning,
                              resolve_config(None), 1, 32, 8, 128, 64, 64, True, True)
    widths = [prepared.kwargs["WIDTH"] for _, prepared in steps]
    # Widest first, one launch per power of two down to the merged narrow rows.
    expected = [2048]
    while expected[-1] > tuning.merge_width:
        expected.append(expected[-1] // 2)
    assert widths == expected and len(widths) >= 4
    for _, prepared in steps:
        kw = prepared.kwargs
        assert kw["USE_DOT"] == (kw["WIDTH"] <= dot_max_width)
        if kw["USE_DOT"]:
            assert kw["DK"] >= 16
        wide = kw["USE_DOT"] and kw["WIDTH"] > 1024
        assert kw["num_stages"] == (tuning.wide_num_stages if wide else tuning.num_stages)
