"""Packed variable-length batches, paged KV caches and chunked prefill (docs/serving.rst).

The expected values come from a loop of the dense functions over each
sequence as its own contiguous (1, H, N, D) batch; the packed functions must
equal that loop. The optimized path runs in Triton's interpreter on the CPU
(tiny shapes) and on the GPU in the tests marked ``gpu``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import TOLERANCE, make_qkv, relative_error  # noqa: E402
from prism import reference  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "serving.rst"


# --------------------------------------------------------------------------
# Building packed batches, and the per-sequence loop they must equal.
# --------------------------------------------------------------------------

def make_batch(lengths_q, lengths_k, *, hq=4, hkv=2, d=32, layout="half", dtype=torch.float32,
               causal=True, seed=0, device="cpu"):
    """Per-sequence dense tensors (1, H, N_i, D) and their packed (T, H, D) forms."""
    pairs = enumerate(zip(lengths_q, lengths_k, strict=True))
    seqs = [make_qkv(1, hq, hkv, nq, nk, d, layout=layout, dtype=dtype, causal=causal,
                     seed=seed + i) for i, (nq, nk) in pairs]
    seqs = [tuple(t.to(device) for t in s) for s in seqs]

    def pack(j):
        return torch.cat([s[j][0].transpose(0, 1) for s in seqs]).contiguous()

    def offsets(lengths):
        return torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)

    return seqs, (pack(0), pack(1), pack(2)), offsets(lengths_q), offsets(lengths_k)


def loop_reference(seqs, cfg, causal, scale=None):
    """Dense ``prism_attention`` on each sequence: outputs packed, masks listed."""
    outs, lses, masks = [], [], []
    for q, k, v in seqs:
        o, lse, mask = reference.prism_attention(q, k, v, cfg, causal=causal, scale=scale,
                                                 return_lse=True, return_mask=True)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
        masks.append(mask)
    return torch.cat(outs), torch.cat(lses, dim=1), masks


def assert_close(actual, expected, dtype):
    error = relative_error(actual.float(), expected.float())
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def assert_masks_match(masks, seqs, cfg, causal, exact=True):
    assert len(masks) == len(seqs)
    for i, (mask, (q, k, _)) in enumerate(zip(masks, seqs, strict=True)):
        expected = reference.select_blocks(q, k, cfg, causal=causal)
        assert mask.shape == expected.shape, f"sequence {i}"
        if exact:
            assert torch.equal(mask.cpu(), expected.cpu()), f"sequence {i}"
        else:
            ties = reference.boundary_ties(q, k, cfg, causal=causal)
            differ = reference.mask_differences(mask, expected, ties)
            assert differ.numel() == 0, f"sequence {i} differs at {differ[:5].tolist()}"


# --------------------------------------------------------------------------
# Reference: the packed functions equal the per-sequence loop.
# --------------------------------------------------------------------------

sequence = st.tuples(st.sampled_from([0, 1, 2, 15, 16, 17, 31, 33, 64, 70]),
                     st.sampled_from([0, 0, 1, 5, 16, 40]))


@given(mix=st.lists(sequence, min_size=1, max_size=4),
       heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
       layout=st.sampled_from(["half", "interleaved"]),
       block_size=st.sampled_from([16, 32]),
       causal=st.booleans(), seed=st.integers(0, 100))
def test_varlen_equals_per_sequence_loop(mix, heads, layout, block_size, causal, seed):
    """Empty and one-token sequences, KV prefixes (Nk > Nq), GQA, both RoPE layouts."""
    lengths_q = [nq for nq, _ in mix]
    lengths_k = [nq + prefix for nq, prefix in mix]
    seqs, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k, hq=heads[0], hkv=heads[1],
                                             layout=layout, causal=causal, seed=seed)
    originals = [t.clone() for t in (q, k, v, cu_q, cu_k)]
    cfg = reference.PrismConfig(block_size=block_size, rope_layout=layout)
    o, lse, masks = reference.prism_attention_varlen(
        q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), cfg, causal=causal,
        return_lse=True, return_mask=True)
    ref_o, ref_lse, ref_masks = loop_reference(seqs, cfg, causal)
    assert o.shape == (sum(lengths_q), heads[0], 32) and lse.shape == (heads[0], sum(lengths_q))
    assert_close(o, ref_o, torch.float32)
    assert relative_error(lse, ref_lse) <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks, strict=True))
    for before, after in zip(originals, (q, k, v, cu_q, cu_k), strict=True):
        assert torch.equal(before, after)
    # The stages alone give the same masks and outputs.
    selected = reference.select_blocks_varlen(q, k, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                              cfg, causal=causal)
    assert all(torch.equal(a, b) for a, b in zip(selected, ref_masks, strict=True))
    o2 = reference.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q),
                                                 max(lengths_k), selected,
                                                 block_size=block_size, causal=causal)
    assert torch.equal(o2, o)


def test_sequences_are_independent():
    """Changing one sequence's keys leaves the other sequences' outputs unchanged,
    and each sequence keeps its own bottom-right alignment."""
    seqs, (q, k, v), cu_q, cu_k = make_batch([20, 7], [20, 50])
    o = reference.prism_attention_varlen(q, k, v, cu_q, cu_k, 20, 50, block_size=16)
    k2 = k.clone()
    k2[20:] += 3.0
    o2 = reference.prism_attention_varlen(q, k2, v, cu_q, cu_k, 20, 50, block_size=16)
    assert torch.equal(o[:20], o2[:20])
    assert not torch.equal(o[20:], o2[20:])
    # The second sequence's 7 queries sit at positions 43..49 of its own 50 keys.
    masks = reference.select_blocks_varlen(q, k, cu_q, cu_k, 20, 50, block_size=16)
    assert masks[1].shape == (1, 4, 2, 4)


def test_equal_shape_runs_are_one_batched_call():
    """Adjacent sequences with the same (Nq, Nk) run as one dense batch: one call per run,
    the same results as the loop, and masks of the right per-sequence shapes."""
    from prism.reference import attention as dense
    from prism.reference.varlen import run_prism, runs_of_equal_shape, validate_varlen

    lengths_q, lengths_k = [16, 16, 16, 5, 5, 0, 0, 7], [16, 16, 16, 9, 9, 3, 3, 9]
    seqs, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k, seed=9)
    ranges = validate_varlen(q, k, v, cu_q, cu_k, 16, 16, causal=True)
    assert runs_of_equal_shape(ranges) == [(0, 3), (3, 2), (5, 2), (7, 1)]

    calls = []

    class Spy:
        @staticmethod
        def prism_attention(q_run, *args, **kwargs):
            calls.append(q_run.shape[0])
            return dense.prism_attention(q_run, *args, **kwargs)

    cfg = reference.PrismConfig(block_size=16)
    o, lse, masks = run_prism(Spy, q, k, v, ranges, cfg, causal=True, scale=None,
                              return_lse=True, return_mask=True)
    assert calls == [3, 2, 2, 1]
    ref_o, ref_lse, ref_masks = loop_reference(seqs, cfg, True)
    assert_close(o, ref_o, torch.float32)
    assert relative_error(lse, ref_lse) <= 1e-5
    assert [tuple(m.shape) for m in masks] == [tuple(m.shape) for m in ref_masks]
    assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks, strict=True))
    # Attention on a list whose masks broadcast over heads in one run and not the next.
    mixed = [m[:, :1] for m in ref_masks[:3]] + ref_masks[3:]
    o2 = reference.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, 16, 16, mixed,
                                                 block_size=16)
    loop = torch.cat([reference.block_sparse_attention(a, b, c, m, block_size=16)[0]
                      .transpose(0, 1) for (a, b, c), m in zip(seqs, mixed, strict=True)])
    assert_close(o2, loop, torch.float32)


def test_lse_layout_and_empty_rows():
    """lse is (Hq, total_q); a non-causal query with no key gets o = 0, lse = -inf."""
    seqs, (q, k, v), cu_q, cu_k = make_batch([3, 2], [0, 4], causal=False)
    o, lse = reference.prism_attention_varlen(q, k, v, cu_q, cu_k, 3, 4, causal=False,
                                              block_size=16, return_lse=True)
    assert lse.shape == (4, 5)
    assert torch.all(o[:3] == 0) and torch.all(lse[:, :3] == float("-inf"))
    assert torch.isfinite(lse[:, 3:]).all()


# --------------------------------------------------------------------------
# Errors (contract §8 for packed and paged inputs).
# --------------------------------------------------------------------------

def _varlen_args():
    _, (q, k, v), cu_q, cu_k = make_batch([5, 9], [5, 12])
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=9,
                max_seqlen_k=12)


@pytest.mark.parametrize("change, error, words", [
    (dict(cu_seqlens_q=torch.tensor([0, 9, 5], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([1, 5, 14], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[0\] must be 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 16], dtype=torch.int32)), ValueError,
     r"cu_seqlens_k\[-1\] must equal the number of packed tokens of k \(17\)"),
    (dict(cu_seqlens_k=torch.tensor([0, 17], dtype=torch.int32)), ValueError,
     r"same number of sequences"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 5, 14])), TypeError, r"cu_seqlens_q must have dtype"),
    (dict(cu_seqlens_q=[0, 5, 14]), TypeError, r"cu_seqlens_q must be a 1-D int32"),
    (dict(max_seqlen_q=8), ValueError, r"max_seqlen_q \(8\) is smaller than sequence 1's"),
    (dict(max_seqlen_k=2.5), TypeError, r"max_seqlen_k must be an int"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 17], dtype=torch.int32), max_seqlen_k=13), ValueError,
     r"sequence 0 has 5 queries"),
    (dict(q=torch.zeros(14, 4, 32, dtype=torch.int32)), TypeError, r"q must have dtype"),
    (dict(q=torch.zeros(1, 14, 4, 32)), ValueError, r"q must have 3 dimensions"),
    (dict(v=torch.zeros(17, 2, 32, dtype=torch.float16)), TypeError, r"v has dtype"),
    (dict(q=torch.zeros(14, 3, 32)), ValueError, r"multiple of the number of KV heads"),
])
def test_varlen_errors(change, error, words):
    args = {**_varlen_args(), **change}
    with pytest.raises(error, match=words):
        reference.prism_attention_varlen(**args, block_size=16)


def test_varlen_mask_list_errors():
    args = _varlen_args()
    masks = reference.select_blocks_varlen(args["q"], args["k"], args["cu_seqlens_q"],
                                           args["cu_seqlens_k"], 9, 12, block_size=16)
    with pytest.raises(ValueError, match="one mask per sequence"):
        reference.block_sparse_attention_varlen(**args, block_masks=masks[:1], block_size=16)
    with pytest.raises(TypeError, match="block_masks must be a list"):
        reference.block_sparse_attention_varlen(**args, block_masks=masks[0], block_size=16)
    with pytest.raises(ValueError, match=r"sequence 1 \(block_masks\[1\]\)"):
        reference.block_sparse_attention_varlen(
            **args, block_masks=[masks[0], torch.ones(1, 4, 2, 2, dtype=torch.bool)],
            block_size=16)


def test_non_finite_input_names_the_sequence():
    args = _varlen_args()
    args["k"] = args["k"].clone()
    args["k"][10, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"sequence 1 .*NaN"):
        reference.prism_attention_varlen(**args, block_size=16)


# --------------------------------------------------------------------------
# Paged KV caches.
# --------------------------------------------------------------------------

def to_pages(packed_k, packed_v, lengths, page_size, *, spare_pages=3, seed=0, width=None):
    """Scatter packed K/V into shuffled pages; unused table entries are -1."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // page_size) for n in lengths]
    num_pages = sum(needed) + spare_pages
    order = torch.randperm(num_pages, generator=gen)
    hkv, d, dv = packed_k.shape[1], packed_k.shape[2], packed_v.shape[2]
    k_cache = torch.randn(num_pages, page_size, hkv, d, generator=gen).to(packed_k.dtype)
    v_cache = torch.randn(num_pages, page_size, hkv, dv, generator=gen).to(packed_v.dtype)
    width = max(needed + [1]) + 1 if width is None else width
    table = torch.full((len(lengths), width), -1, dtype=torch.int32)
    used, row = 0, 0
    for i, n in enumerate(lengths):
        for j in range(needed[i]):
            page = int(order[used])
            used += 1
            table[i, j] = page
            count = min(page_size, n - j * page_size)
            k_cache[page, :count] = packed_k[row + j * page_size: row + j * page_size + count]
            v_cache[page, :count] = packed_v[row + j * page_size: row + j * page_size + count]
        row += n
    device = packed_k.device
    return (k_cache.to(device), v_cache.to(device), table.to(device),
            torch.tensor(lengths, dtype=torch.int32, device=device))


@pytest.mark.parametrize("page_size", [16, 48, 256])
def test_paged_equals_varlen(page_size):
    """Pages of 16, 48 (not a multiple of the tile) and 256 (larger than a sequence)."""
    lengths_q, lengths_k = [30, 0, 1, 45], [70, 3, 20, 45]
    seqs, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k)
    k_cache, v_cache, table, seq_lens = to_pages(k, v, lengths_k, page_size)
    gk, gv, gcu = reference.gather_paged_kv(k_cache, v_cache, table, seq_lens)
    assert torch.equal(gk, k) and torch.equal(gv, v) and torch.equal(gcu, cu_k)
    originals = [t.clone() for t in (k_cache, v_cache, table, seq_lens)]
    o, lse, masks = reference.prism_attention_paged(q, k_cache, v_cache, table, seq_lens, cu_q,
                                                    45, block_size=32, return_lse=True,
                                                    return_mask=True)
    ref_o, ref_lse, ref_masks = loop_reference(seqs, reference.PrismConfig(block_size=32), True)
    assert_close(o, ref_o, torch.float32)
    assert relative_error(lse, ref_lse) <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks, strict=True))
    selected = reference.select_blocks_paged(q, k_cache, table, seq_lens, cu_q, 45,
                                             block_size=32)
    assert all(torch.equal(a, b) for a, b in zip(selected, ref_masks, strict=True))
    for before, after in zip(originals, (k_cache, v_cache, table, seq_lens), strict=True):
        assert torch.equal(before, after)


def _paged_args():
    lengths_q, lengths_k = [5, 9], [20, 9]
    _, (q, k, v), cu_q, _ = make_batch(lengths_q, lengths_k)
    k_cache, v_cache, table, seq_lens = to_pages(k, v, lengths_k, 16)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table, seq_lens=seq_lens,
                cu_seqlens_q=cu_q, max_seqlen_q=9)


def _with_table_entry(args, i, j, value):
    table = args["block_table"].clone()
    table[i, j] = value
    return table


@pytest.mark.parametrize("edit, error, words", [
    (lambda a: dict(block_table=_with_table_entry(a, 0, 1, a["k_cache"].shape[0])), ValueError,
     r"block_table\[0, 1\] = \d+ is not a page"),
    (lambda a: dict(block_table=_with_table_entry(a, 1, 0, -1)), ValueError,
     r"block_table\[1, 0\] = -1 is not a page"),
    (lambda a: dict(seq_lens=torch.tensor([20, 60], dtype=torch.int32)), ValueError,
     r"seq_lens\[1\] = 60 tokens do not fit"),
    (lambda a: dict(seq_lens=torch.tensor([20, 4], dtype=torch.int32)), ValueError,
     r"sequence 1 has 9 queries .* and 4 cached tokens"),
    (lambda a: dict(seq_lens=torch.tensor([20], dtype=torch.int32)), ValueError,
     r"same B sequences"),
    (lambda a: dict(block_table=a["block_table"].float()), TypeError,
     r"block_table must be an int32"),
    (lambda a: dict(v_cache=a["v_cache"][:, :8]), ValueError, r"v_cache must match k_cache"),
    (lambda a: dict(k_cache=a["k_cache"][0]), ValueError, r"k_cache must have 4 dimensions"),
    (lambda a: dict(k_cache=a["k_cache"][:, :0], v_cache=a["v_cache"][:, :0]), ValueError,
     r"k_cache must have pages of at least one token"),
])
def test_paged_errors(edit, error, words):
    args = _paged_args()
    args.update(edit(args))
    with pytest.raises(error, match=words):
        reference.prism_attention_paged(**args, block_size=16)


# --------------------------------------------------------------------------
# The serving page's example runs.
# --------------------------------------------------------------------------

def test_serving_docs_example_runs():
    text = DOCS.read_text()
    blocks = re.findall(r"\.\. code-block:: python\n   :name: serving-example\n\n((?:   .*\n|\n)+)",
                        text)
    assert blocks, "docs/serving.rst lost its runnable example"
    code = "\n".join(line[3:] for line in blocks[0].splitlines())
    exec(compile(code, str(DOCS), "exec"), {})


# --------------------------------------------------------------------------
# prism.optimized: the interpreter on tiny shapes, the GPU when present.
# --------------------------------------------------------------------------

def _optimized():
    import prism.optimized as optimized
    from prism.optimized._runtime import kernels_interpreted
    from prism.optimized.attention import _sparse_attention_kernel

    if not (torch.cuda.is_available() or kernels_interpreted(_sparse_attention_kernel)):
        pytest.skip("triton was imported without its interpreter and there is no GPU")
    return optimized, "cuda" if torch.cuda.is_available() else "cpu"


def check_optimized_varlen(lengths_q, lengths_k, *, dtype, block_size, causal=True, hq=4,
                           hkv=2, d=32, layout="half"):
    optimized, device = _optimized()
    seqs, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k, hq=hq, hkv=hkv, d=d,
                                             dtype=dtype, causal=causal, layout=layout,
                                             device=device)
    cfg = reference.PrismConfig(block_size=block_size, rope_layout=layout)
    o, lse, masks = optimized.prism_attention_varlen(
        q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), cfg, causal=causal,
        return_lse=True, return_mask=True)
    assert_masks_match(masks, seqs, cfg, causal, exact=False)
    # Attention on the masks the kernels chose, against the reference on the same masks.
    ref_o = reference.block_sparse_attention_varlen(
        q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), masks, block_size=block_size,
        causal=causal)
    assert_close(o, ref_o, dtype)
    return o, lse, masks


@pytest.mark.interpret
def test_optimized_varlen_interpreted():
    """One real selection plus an empty sequence (the interpreter runs the selection
    kernel slowly): fp16, tile 32, a KV prefix."""
    check_optimized_varlen([0, 24], [5, 40], dtype=torch.float16, block_size=32, hq=2, hkv=1)


@pytest.mark.interpret
def test_optimized_varlen_attention_interpreted():
    """The attention kernel on each sequence's strided views and the reference's masks:
    fp32, tile 16, empty, one-token and prefixed sequences, and a run of two equal-shape
    sequences batched as (2, H, N, D) strided views."""
    optimized, device = _optimized()
    lengths_q, lengths_k = [17, 17, 0, 1, 40], [17, 17, 3, 30, 40]
    _, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k, device=device)
    masks = reference.select_blocks_varlen(q, k, cu_q, cu_k, 40, 40, block_size=16)
    o, lse = optimized.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, 40, 40, masks,
                                                     block_size=16, return_lse=True)
    ref_o, ref_lse = reference.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, 40, 40, masks,
                                                             block_size=16, return_lse=True)
    assert_close(o, ref_o, torch.float32)
    assert relative_error(lse, ref_lse) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_varlen(dtype):
    lengths_q = [1000, 1, 0, 2048, 300]
    lengths_k = [1000, 700, 5, 2048, 4100]
    check_optimized_varlen(lengths_q, lengths_k, dtype=dtype, block_size=128, hq=8, hkv=2,
                           d=128)
    check_optimized_varlen([513, 77], [513, 1000], dtype=dtype, block_size=64, causal=False,
                           hq=4, hkv=4, d=64, layout="interleaved")
