"""The single-launch packed attention of ``prism.optimized`` (docs/serving.rst).

One block-sparse attention launch covers every query tile of every sequence
of a packed batch (the kernel's ``VARLEN`` branch). The expected values are
the dense reference's ``block_sparse_attention`` on each sequence alone, as
a contiguous (1, H, N, D) batch. The CPU runs the kernel in Triton's
interpreter on tiny shapes (fp32, fp16); the tests marked ``gpu`` run the
launch shapes of the H200 (warp-specialised and TMA loads).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_varlen import make_batch  # noqa: E402

from helpers import TOLERANCE, relative_error  # noqa: E402
from prism import reference  # noqa: E402


def _kernels():
    import prism.optimized as optimized
    from prism.optimized import varlen as packed
    from prism.optimized._runtime import kernels_interpreted
    from prism.optimized.attention import _sparse_attention_kernel

    if not (torch.cuda.is_available() or kernels_interpreted(_sparse_attention_kernel)):
        pytest.skip("triton was imported without its interpreter and there is no GPU")
    return optimized, packed, "cuda" if torch.cuda.is_available() else "cpu"


def random_masks(lengths_q, lengths_k, hq, block_size, causal, seed, *, density=0.5,
                 device="cpu"):
    """One random tile mask per sequence; every other one broadcasts over heads."""
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for i, (nq, nk) in enumerate(zip(lengths_q, lengths_k, strict=True)):
        layout = reference.tile_layout(nq, nk, block_size, causal)
        heads = 1 if i % 2 else hq
        shape = (1, heads, layout.num_query_tiles, layout.num_key_tiles)
        masks.append((torch.rand(shape, generator=gen) < density).to(device))
    return masks


def dense_loop(seqs, masks, block_size, causal, scale=None):
    """Reference block-sparse attention of each sequence alone: packed o, (Hq, total) lse."""
    outs, lses = [], []
    for (q, k, v), mask in zip(seqs, masks, strict=True):
        o, lse = reference.block_sparse_attention(
            q.cpu().float(), k.cpu().float(), v.cpu().float(), mask.cpu(),
            block_size=block_size, causal=causal, scale=scale, return_lse=True)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def check_against_loop(o, lse, seqs, masks, block_size, causal, dtype, scale=None):
    ref_o, ref_lse = dense_loop(seqs, masks, block_size, causal, scale)
    assert o.shape == ref_o.shape and lse.shape == ref_lse.shape
    error = relative_error(o.cpu().float(), ref_o)
    assert error <= TOLERANCE[dtype], f"o: relative error {error:.2e}"
    # -inf exactly where a query reads no key; close elsewhere.
    bound = 1e-5 if dtype == torch.float32 else 1e-3
    assert relative_error(lse.cpu(), ref_lse) <= bound, "lse"


def count_launches(monkeypatch, packed):
    launches = []
    forward = packed.packed_attention_forward

    def spy(*args, **kwargs):
        launches.append(args[3].num_tiles)
        return forward(*args, **kwargs)

    monkeypatch.setattr(packed, "packed_attention_forward", spy)
    return launches


# --------------------------------------------------------------------------
# The tables the kernel reads.
# --------------------------------------------------------------------------

def test_tile_table_lists_every_tile_once_heaviest_first():
    """Each (sequence, row) once. Read from the end (the kernel's order): sequences by
    descending heaviest tile, each one's rows from the last; each sequence's entry
    holds its rows, lengths and bottom-right layout."""
    _, packed, _ = _kernels()
    lengths_q, lengths_k = [40, 0, 1, 70, 17], [40, 3, 30, 100, 17]
    starts_q = [0, 40, 40, 41, 111]
    starts_k = [0, 40, 43, 73, 173]
    ranges = [(a, a + n, b, b + m) for a, n, b, m in
              zip(starts_q, lengths_q, starts_k, lengths_k, strict=True)]
    placements = [(i, 0, 10 * i, 0, 7) for i in range(5)]
    layout = packed.packed_layout(ranges, placements, 16, True, torch.device("cpu"))
    tiles = layout.tiles.tolist()
    # Heaviest tiles (key tiles up to the diagonal): sequence 3 ends in tile 6 (7 tiles),
    # 0 in tile 2 (3), 2 in tile 1 (2), 4 in tile 1 (2); 1 has no query.
    assert tiles[::-1] == [[3, 5], [3, 4], [3, 3], [3, 2], [3, 1], [3, 0],
                           [0, 2], [0, 1], [0, 0], [2, 0], [4, 1], [4, 0]]
    # The kernel's row of each tile: its sequence's fields, its absolute tile and the
    # positions of its count and of its row of indices.
    for (i, r), got in zip(tiles, layout.table.tolist(), strict=True):
        q0, k0, nq, nk, start, first, nb, ns, ib, ihs, irs = layout.seqs[i].tolist()
        assert got == [q0, k0, nq, nk, start, first + r, nb + r, ns, ib + r * irs, ihs]
    # Sequence 3: 70 queries, the last of 100 keys: query_start 30, first tile 1.
    assert layout.seqs[3].tolist() == [41, 73, 70, 100, 30, 1, 3, 0, 30, 0, 7]
    # Query starts 0, 29, 30, 0 (the empty sequence has no tiles and does not count).
    assert layout.query_start_gcd == 1
    # A second call with the same batch reuses the device tables.
    assert packed.packed_layout(ranges, placements, 16, True, torch.device("cpu")) is layout


# --------------------------------------------------------------------------
# The kernel against the per-sequence dense reference (interpreter on the CPU).
# --------------------------------------------------------------------------

sequence = st.tuples(st.sampled_from([0, 1, 2, 15, 16, 17, 33, 40]),
                     st.sampled_from([0, 0, 1, 7, 16, 30]))


@pytest.mark.interpret
@given(mix=st.lists(sequence, min_size=1, max_size=4),
       heads=st.sampled_from([(2, 2), (2, 1), (4, 2)]),
       dtype=st.sampled_from([torch.float32, torch.float16]),
       block_size=st.sampled_from([16, 32]), causal=st.booleans(), seed=st.integers(0, 99))
def test_one_launch_equals_per_sequence_dense(mix, heads, dtype, block_size, causal, seed):
    """Empty and one-token sequences, KV prefixes (Nk > Nq), GQA, random masks with
    empty rows, head-broadcast masks: one launch equals the per-sequence reference."""
    optimized, packed, device = _kernels()
    lengths_q = [nq for nq, _ in mix]
    lengths_k = [nq + prefix for nq, prefix in mix]
    seqs, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k, hq=heads[0], hkv=heads[1],
                                             d=16, dtype=dtype, causal=causal, seed=seed,
                                             device=device)
    masks = random_masks(lengths_q, lengths_k, heads[0], block_size, causal, seed,
                         device=device)
    before = [t.clone() for t in (q, k, v)]
    o, lse = optimized.block_sparse_attention_varlen(
        q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), masks, block_size=block_size,
        causal=causal, return_lse=True)
    check_against_loop(o, lse, seqs, masks, block_size, causal, dtype)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v), strict=True))


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [True, False])
def test_every_output_element_is_written(causal):
    """Outputs poisoned with NaN before the launch: every row of every sequence written,
    rows without keys as o = 0 and lse = -inf (non-causal: a sequence with no keys)."""
    _, packed, device = _kernels()
    lengths_q, lengths_k = [17, 1, 0, 33], ([17, 20, 4, 40] if causal else [17, 0, 4, 9])
    seqs, (q, k, v), _, _ = make_batch(lengths_q, lengths_k, hq=2, hkv=1, d=16,
                                       causal=causal, seed=3, device=device)
    masks = random_masks(lengths_q, lengths_k, 2, 16, causal, 3, density=0.6, device=device)
    ranges, pieces = [], []
    q0 = k0 = 0
    for nq, nk, mask in zip(lengths_q, lengths_k, masks, strict=True):
        ranges.append((q0, q0 + nq, k0, k0 + nk))
        first = reference.tile_layout(nq, nk, 16, causal).first_query_tile
        num, idx = packed._compact(mask, first, causal)
        pieces.append((1, num, idx))
        q0, k0 = q0 + nq, k0 + nk
    flat_num, flat_idx, placements = packed._flatten_indices(pieces, device)
    layout = packed.packed_layout(ranges, placements, 16, causal, q.device)
    out = torch.full((q.shape[0], 2, 16), float("nan"), device=device)
    lse = torch.full((2, q.shape[0]), float("nan"), device=device)
    packed.packed_attention_forward(q, k, v, layout, flat_num, flat_idx, block_size=16,
                                    causal=causal, scale=0.3, return_lse=True, out=out, lse=lse)
    assert not out.isnan().any() and not lse.isnan().any()
    check_against_loop(out, lse, seqs, masks, 16, causal, torch.float32, scale=0.3)


@pytest.mark.interpret
def test_prism_varlen_selects_per_run_and_attends_once(monkeypatch):
    """prism_attention_varlen: one selection per run of equal-shape sequences, one
    attention launch for the batch, the masks it returns carry their indices, and the
    output equals the reference's attention on those masks."""
    optimized, packed, device = _kernels()
    from prism.optimized import ops

    selections = []
    select = ops.select

    def spy(q, *args, **kwargs):
        selections.append(q.shape[0])
        return select(q, *args, **kwargs)

    monkeypatch.setattr(ops, "select", spy)
    launches = count_launches(monkeypatch, packed)
    lengths_q, lengths_k = [16, 16, 1, 20], [16, 16, 30, 20]
    seqs, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k, hq=2, hkv=1, d=16,
                                             layout="interleaved", seed=4, device=device)
    cfg = reference.PrismConfig(block_size=16, rope_layout="interleaved")
    o, lse, masks = optimized.prism_attention_varlen(q, k, v, cu_q, cu_k, 20, 30, cfg,
                                                     return_lse=True, return_mask=True)
    assert selections == [2, 1, 1] and launches == [2 + 1 + 2]
    assert [tuple(m.shape) for m in masks] == [(1, 2, 1, 1), (1, 2, 1, 1), (1, 2, 1, 2),
                                               (1, 2, 2, 2)]
    assert all(m.carried_indices(block_size=16, causal=True, num_queries=nq, num_keys=nk)
               is not None for m, nq, nk in zip(masks, lengths_q, lengths_k, strict=True))
    check_against_loop(o, lse, seqs, [m.as_tensor() for m in masks], 16, True, torch.float32)
    # The selection alone splits its run of two into masks that carry their indices.
    selected = optimized.select_blocks_varlen(q, k, cu_q, cu_k, 20, 30, cfg)
    for m, nq, nk in zip(selected[:2], lengths_q[:2], lengths_k[:2], strict=True):
        num, idx = m.carried_indices(block_size=16, causal=True, num_queries=nq, num_keys=nk)
        assert num.shape == (1, 2, 1) and idx.shape == (1, 2, 1, 1)


@pytest.mark.interpret
def test_packed_errors_name_the_sequence():
    optimized, _, device = _kernels()
    lengths = [17, 9]
    seqs, (q, k, v), cu, _ = make_batch(lengths, lengths, hq=2, hkv=1, d=16, device=device)
    masks = random_masks(lengths, lengths, 2, 16, True, 0, device=device)
    bad = [masks[0], torch.ones(1, 2, 2, 2, dtype=torch.bool, device=device)]
    with pytest.raises(ValueError, match=r"sequence 1 \(block_masks\[1\]\).*shape"):
        optimized.block_sparse_attention_varlen(q, k, v, cu, cu, 17, 17, bad, block_size=16)
    v = v.clone()
    v[20, 0, 3] = float("inf")
    with pytest.raises(ValueError, match=r"sequence 1 .*v contains 1 NaN or Inf"):
        optimized.block_sparse_attention_varlen(q, k, v, cu, cu, 17, 17, masks, block_size=16)


# --------------------------------------------------------------------------
# The GPU: the launch shapes of the H200 table (warp-specialised, TMA).
# --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size, prefixes, d", [
    (128, [0, 0, 256, 0, 128], 128),  # every query_start a multiple of 128
    (128, [0, 5, 300, 0, 77], 128),   # unaligned prefixes
    (64, [0, 5, 300, 0, 77], 128),    # tile 64: TMA loads through the packed descriptor
    (128, [0, 5, 300, 0, 77], 96),    # a 128-wide descriptor box over 96-wide rows
    (64, [0, 0, 256, 0, 128], 80),    # the same at tile 64 over 80-wide rows
])
def test_gpu_one_launch_equals_per_sequence_dense(dtype, block_size, prefixes, d, monkeypatch):
    optimized, packed, device = _kernels()
    launches = count_launches(monkeypatch, packed)
    lengths_q = [1000, 1, 0, 2048, 300]
    lengths_k = [n + p for n, p in zip(lengths_q, prefixes, strict=True)]
    seqs, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k, hq=8, hkv=2, d=d,
                                             dtype=dtype, seed=7, device=device)
    masks = random_masks(lengths_q, lengths_k, 8, block_size, True, 7, density=0.4,
                         device=device)
    o, lse = optimized.block_sparse_attention_varlen(
        q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), masks, block_size=block_size,
        return_lse=True)
    assert len(launches) == 1
    check_against_loop(o, lse, seqs, masks, block_size, True, dtype)
