"""The attention kernel's paged branch: K and V read through the block table in place
(prism.optimized.paged_kv, docs/serving.rst).

Expected values: the per-sequence loop of the dense reference, and the same
launch on K and V gathered into packed rows (the gather path), which must agree
bit for bit where both run one launch shape. Every cache slot that no sequence
reads holds NaN, and every block-table entry past a sequence's last page an
out-of-range page, so a read of either shows.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_varlen import assert_close, assert_masks_match, make_batch, to_pages  # noqa: E402
from test_varlen_kernel import _kernels, check_against_loop, random_masks  # noqa: E402

from prism import reference  # noqa: E402


def poisoned_pages(k, v, lengths, page_size, *, seed=0, table_form="int32"):
    """Shuffled pages of packed K/V; unread slots NaN, unread table entries out of range.

    ``table_form``: "int32", "int64", or "strided" (an int32 table whose
    columns are not contiguous).
    """
    device = k.device
    k_cache, v_cache, table, seq_lens = to_pages(k.cpu(), v.cpu(), lengths, page_size,
                                                 seed=seed)
    read = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for i, n in enumerate(lengths):
        tokens = torch.arange(n)
        read[table[i, tokens // page_size].long(), tokens % page_size] = True
    k_cache[~read] = float("nan")
    v_cache[~read] = float("nan")
    needed = torch.tensor([-(-n // page_size) for n in lengths])
    unused = torch.arange(table.shape[1])[None, :] >= needed[:, None]
    table[unused] = 10**6
    if table_form == "int64":
        table = table.long()
    elif table_form == "strided":
        table = table.t().contiguous().t()
    return k_cache.to(device), v_cache.to(device), table.to(device), seq_lens


def gathered_launch(q, k, v, lengths_q, lengths_k, masks, block_size, causal, config):
    """The packed launch on gathered rows with a given launch shape (the gather path)."""
    from prism.optimized import varlen as packed

    ranges, q0, k0 = [], 0, 0
    for nq, nk in zip(lengths_q, lengths_k, strict=True):
        ranges.append((q0, q0 + nq, k0, k0 + nk))
        q0, k0 = q0 + nq, k0 + nk
    pieces = packed.mask_pieces(q, ranges, masks, block_size, causal)
    flat_num, flat_idx, placements = packed._flatten_indices(pieces)
    layout = packed.packed_layout(ranges, placements, block_size, causal, q.device)
    return packed.packed_attention_forward(q, k, v, layout, flat_num, flat_idx,
                                           block_size=block_size, causal=causal, scale=None,
                                           return_lse=True, config=config)


def paged_case(lengths_q, lengths_k, *, heads, dtype, block_size, causal, page_size, seed,
               table_form="int32", d=16, density=0.5, config=None):
    optimized, _, device = _kernels()
    from prism.optimized import paged_kv

    seqs, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k, hq=heads[0], hkv=heads[1],
                                             d=d, dtype=dtype, causal=causal, seed=seed,
                                             device=device)
    k_cache, v_cache, table, seq_lens = poisoned_pages(k, v, lengths_k, page_size, seed=seed,
                                                       table_form=table_form)
    masks = random_masks(lengths_q, lengths_k, heads[0], block_size, causal, seed,
                         density=density, device=device)
    o, lse = paged_kv.block_sparse_attention_paged(
        q, k_cache, v_cache, table, seq_lens, cu_q, max(lengths_q), masks,
        block_size=block_size, causal=causal, return_lse=True, config=config)
    check_against_loop(o, lse, seqs, masks, block_size, causal, dtype)
    return (q, k, v), masks, o, lse


# --------------------------------------------------------------------------
# The interpreter on the CPU.
# --------------------------------------------------------------------------

sequence = st.tuples(st.sampled_from([0, 1, 2, 16, 17, 33, 40]),
                     st.sampled_from([0, 0, 1, 7, 30]))


@pytest.mark.interpret
@settings(max_examples=5)
@given(mix=st.lists(sequence, min_size=1, max_size=3),
       page_size=st.sampled_from([16, 32, 48, 64, 256]),
       heads=st.sampled_from([(2, 2), (2, 1), (4, 2)]),
       dtype=st.sampled_from([torch.float32, torch.float16]),
       block_size=st.sampled_from([16, 32]), causal=st.booleans(),
       table_form=st.sampled_from(["int32", "int64", "strided"]), seed=st.integers(0, 99))
def test_paged_launch_equals_gather_path_and_loop(mix, page_size, heads, dtype, block_size,
                                                   causal, table_form, seed):
    """Empty and one-token sequences, KV prefixes, GQA, shuffled pages of 16-256 tokens
    (smaller than, equal to, not a multiple of and larger than the kernel's key block):
    the paged launch equals the gathered launch bitwise and the per-sequence loop."""
    optimized, _, _ = _kernels()
    lengths_q = [nq for nq, _ in mix]
    lengths_k = [nq + prefix for nq, prefix in mix]
    (q, k, v), masks, o, lse = paged_case(
        lengths_q, lengths_k, heads=heads, dtype=dtype, block_size=block_size, causal=causal,
        page_size=page_size, seed=seed, table_form=table_form)
    cu_q = torch.tensor([0, *lengths_q]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lengths_k]).cumsum(0).to(torch.int32)
    o2, lse2 = optimized.block_sparse_attention_varlen(
        q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), masks, block_size=block_size,
        causal=causal, return_lse=True)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


def test_paged_launch_shape_by_page_size():
    """Pages under 64 tokens at D 65-128 and tiles >= 128 take the small-page shape
    (128 x 128, 8 warps, 2 stages, pointer loads); other pages, head dims, tiles,
    fp32 and the interpreter keep the dense table's shape; a given config wins."""
    from prism.optimized.attention import AttentionConfig, default_config
    from prism.optimized.paged_launch import SMALL_PAGE_CONFIG, paged_config

    def shape(page, d=128, tile=128, dtype=torch.bfloat16, interpreted=False, config=None):
        q = torch.zeros(1, 4, 8, d, dtype=dtype)
        kv = torch.zeros(1, 2, 8, d, dtype=dtype)
        d_pad = max(16, 1 << (d - 1).bit_length())
        return paged_config(config, q, kv, kv, d_pad, d_pad, 0, tile, interpreted,
                            page_size=page)

    small = shape(16)
    assert (small.block_m, small.block_n, small.num_warps, small.num_stages) == (128, 128, 8, 2)
    assert small == SMALL_PAGE_CONFIG and not small.use_tma
    assert shape(32) == small and shape(16, d=96) == small and shape(16, tile=256) == small
    assert shape(16, dtype=torch.float16) == small
    table = default_config(128, 128, torch.bfloat16, False)
    for page in (64, 128, 256):
        assert shape(page) == table, page
    for kwargs in (dict(d=64), dict(d=256), dict(tile=64), dict(dtype=torch.float32),
                   dict(interpreted=True)):
        got = shape(16, **kwargs)
        base = shape(64, **kwargs)
        assert got == base and got != small, kwargs
    mine = AttentionConfig(64, 64, 4, 3)
    assert shape(16, config=mine) == mine
    with pytest.raises(ValueError, match="warp_specialize"):
        shape(64, config=AttentionConfig(128, 128, 4, 2, warp_specialize=True))


def test_bulk_rows_only_for_pages_of_whole_key_blocks(monkeypatch):
    """A paged launch reads by bulk copy only with a TMA shape, pages of whole key
    blocks and caches whose rows merge (descriptor checks stubbed: no GPU here)."""
    from prism.optimized import paged_launch
    from prism.optimized.attention import AttentionConfig

    monkeypatch.setattr(paged_launch, "tma_compatible", lambda *args: True)
    tma = AttentionConfig(128, 64, 4, 2, use_tma=True)
    cache = torch.zeros(3, 128, 2, 16)
    rows = paged_launch.bulk_rows(cache, cache, tma, 16, 16)
    assert rows is not None and rows[0].shape == (1, 2, 384, 16)
    assert paged_launch.bulk_rows(torch.zeros(3, 48, 2, 16), torch.zeros(3, 48, 2, 16), tma,
                                  16, 16) is None  # 48 is not whole 64-key blocks
    assert paged_launch.bulk_rows(cache, cache, AttentionConfig(128, 64, 4, 2), 16, 16) is None
    assert paged_launch.bulk_rows(cache[:, :64], cache[:, :64], tma, 16, 16) is None
    monkeypatch.setattr(paged_launch, "tma_compatible", lambda *args: False)
    assert paged_launch.bulk_rows(cache, cache, tma, 16, 16) is None


def test_cache_rows_views_pages_as_one_row_dimension():
    """The descriptor view of a cache: (1, H, pages * page_size, D) over the same
    storage, row r = slot r % page_size of page r // page_size; None where pages and
    slots do not merge without a copy."""
    from prism.optimized.paged_launch import cache_rows

    cache = torch.arange(5 * 16 * 2 * 8, dtype=torch.float32).view(5, 16, 2, 8)
    rows = cache_rows(cache)
    assert rows.shape == (1, 2, 80, 8) and rows.data_ptr() == cache.data_ptr()
    for r in (0, 15, 16, 47, 79):
        assert torch.equal(rows[0, 1, r], cache[r // 16, r % 16, 1])
    wide = torch.zeros(5, 32, 2, 8)
    assert cache_rows(wide[:, :16]) is None  # slots 16-31 of each page sit between pages
    assert cache_rows(wide[:, :, :1]) is not None  # one head of two: rows still merge


@pytest.mark.interpret
@pytest.mark.parametrize("block_size, page_size", [(64, 16), (128, 256)])
def test_paged_key_blocks_of_64_and_128(block_size, page_size):
    """Key blocks of 64 and 128 rows (the GPU's shapes) over pages smaller and larger
    than a block; bitwise equal to the gather path at the same launch shape."""
    from prism.optimized.attention import AttentionConfig

    config = AttentionConfig(block_size, block_size, 4, 1)
    lengths_q, lengths_k = [130, 1, 0], [200, 20, 5]
    (q, k, v), masks, o, lse = paged_case(
        lengths_q, lengths_k, heads=(2, 1), dtype=torch.float32, block_size=block_size,
        causal=True, page_size=page_size, seed=4, config=config)
    o2, lse2 = gathered_launch(q, k, v, lengths_q, lengths_k, masks, block_size, True, config)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


@pytest.mark.interpret
@pytest.mark.parametrize("reads", ["auto", "gather"])
def test_prism_paged_gathers_keys_only_and_launches_once(reads, monkeypatch):
    """prism_attention_paged: selection pooling keys through the block table, one paged
    attention launch (nothing gathered; "auto" reads in place without TMA, as here); with
    PAGED_READS "gather", K and V gathered and the varlen launch. Masks as the
    reference's, outputs as the reference on those masks."""
    optimized, packed, device = _kernels()
    from prism.optimized import paged_kv
    from prism.reference import paged as reference_paged

    monkeypatch.setattr(paged_kv, "PAGED_READS", reads)
    gathered, launches = [], []
    for module in (paged_kv, reference_paged):
        gather = module.gather_tokens
        monkeypatch.setattr(module, "gather_tokens", lambda cache, *a, gather=gather:
                            gathered.append(cache) or gather(cache, *a))
    forward = packed.packed_attention_forward
    spy = (lambda *a, **kw: launches.append(kw.get("block_table")) or forward(*a, **kw))
    monkeypatch.setattr(paged_kv, "packed_attention_forward", spy)
    monkeypatch.setattr(packed, "packed_attention_forward", spy)
    lengths_q, lengths_k = [0, 24], [5, 40]
    seqs, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k, hq=2, hkv=1,
                                             dtype=torch.float16, device=device)
    k_cache, v_cache, table, seq_lens = poisoned_pages(k, v, lengths_k, 16, seed=1)
    cfg = reference.PrismConfig(block_size=32)
    o, lse, masks = optimized.prism_attention_paged(q, k_cache, v_cache, table, seq_lens, cu_q,
                                                    24, cfg, return_lse=True, return_mask=True)
    if reads == "auto":
        assert gathered == []   # keys pooled and attended through the block table
        assert len(launches) == 1 and launches[0] is table
    else:
        assert len(gathered) == 2 and gathered[0] is k_cache and gathered[1] is v_cache
        assert launches == [None]
    assert_masks_match(masks, seqs, cfg, True, exact=False)
    ref_o = reference.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, 24, 40, masks,
                                                    block_size=32)
    assert_close(o, ref_o, torch.float16)


@pytest.mark.interpret
def test_paged_errors(monkeypatch):
    """Bad page indices and non-finite values the call reads raise ValueErrors naming
    the entry or the sequence; NaN where no sequence reads is fine."""
    optimized, _, device = _kernels()
    from prism.optimized import paged_kv

    lengths_q, lengths_k = [5, 9], [20, 9]
    _, (q, k, v), cu_q, _ = make_batch(lengths_q, lengths_k, d=16, device=device)
    k_cache, v_cache, table, seq_lens = poisoned_pages(k, v, lengths_k, 16)
    masks = random_masks(lengths_q, lengths_k, 4, 16, True, 0, device=device)

    def call(fn, **change):
        args = dict(k_cache=k_cache, v_cache=v_cache, block_table=table, seq_lens=seq_lens)
        args.update(change)
        if fn is optimized.prism_attention_paged:
            return fn(q, args["k_cache"], args["v_cache"], args["block_table"],
                      args["seq_lens"], cu_q, 9, block_size=16)
        return fn(q, args["k_cache"], args["v_cache"], args["block_table"], args["seq_lens"],
                  cu_q, 9, masks, block_size=16)

    bad = table.clone()
    bad[0, 1] = k_cache.shape[0]
    for fn in (paged_kv.block_sparse_attention_paged, optimized.prism_attention_paged):
        with pytest.raises(ValueError, match=r"block_table\[0, 1\] = \d+ is not a page"):
            call(fn, block_table=bad)
        with pytest.raises(ValueError, match=r"seq_lens\[1\] = 60 tokens do not fit"):
            call(fn, seq_lens=torch.tensor([20, 60], dtype=torch.int32))
    poisoned = v_cache.clone()
    poisoned[table[1, 0], 3, 1, 2] = float("inf")       # sequence 1, token 3
    with pytest.raises(ValueError, match=r"sequence 1: v_cache contains"):
        call(paged_kv.block_sparse_attention_paged, v_cache=poisoned)
    monkeypatch.setattr(paged_kv, "PAGED_READS", "fast")
    with pytest.raises(ValueError, match=r"PAGED_READS must be 'auto', 'kernel' or 'gather'"):
        call(optimized.prism_attention_paged)
    with pytest.raises(ValueError, match=r"block_size % 16 == 0"):
        paged_kv.block_sparse_attention_paged(q, k_cache, v_cache, table, seq_lens, cu_q, 9,
                                              masks, block_size=24)


# --------------------------------------------------------------------------
# The GPU.
# --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("block_size, page_size, dtype", [
    (128, 16, torch.bfloat16), (128, 32, torch.float16), (128, 256, torch.bfloat16),
    (64, 48, torch.float16)])
def test_gpu_paged_launch(block_size, page_size, dtype):
    """The default paged launch against the per-sequence loop; at a fixed pointer-load
    shape, bitwise against the gather path."""
    from prism.optimized.attention import AttentionConfig

    lengths_q = [1000, 1, 0, 2048, 300]
    lengths_k = [n + p for n, p in zip(lengths_q, [0, 5, 300, 0, 77], strict=True)]
    (q, k, v), masks, o, lse = paged_case(
        lengths_q, lengths_k, heads=(8, 2), dtype=dtype, block_size=block_size, causal=True,
        page_size=page_size, seed=7, d=128, density=0.4)
    config = AttentionConfig(64, 64, 4, 2)
    _, _, o1, lse1 = paged_case(
        lengths_q, lengths_k, heads=(8, 2), dtype=dtype, block_size=block_size, causal=True,
        page_size=page_size, seed=7, d=128, density=0.4, config=config)
    o2, lse2 = gathered_launch(q, k, v, lengths_q, lengths_k, masks, block_size, True, config)
    assert torch.equal(o1, o2) and torch.equal(lse1, lse2)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size, d, tile, table_form", [
    (64, 128, 128, "int32"), (256, 96, 128, "int64"), (128, 64, 64, "strided"),
    (64, 192, 128, "int32")])
def test_gpu_paged_bulk_copies_equal_pointer_loads(page_size, d, tile, table_form):
    """Pages of whole key blocks are read by tensor descriptors: bit for bit the
    pointer loads' result at the same launch shape, with every unread slot NaN
    (a masked last block reads the rest of its page) and table entries past each
    sequence out of range; int32, int64 and column-strided block tables."""
    from prism.optimized import varlen
    from prism.optimized.attention import default_config

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need compute capability 9.0 or newer")
    lengths_q = [1000, 1, 0, 2048, 300]
    lengths_k = [n + p for n, p in zip(lengths_q, [0, 5, 300, 0, 77], strict=True)]
    table = default_config(tile, d, torch.bfloat16, False)
    assert table.use_tma and page_size % table.block_n == 0
    launched = []
    original = varlen.bulk_rows

    def spy(*args):
        launched.append(original(*args) is not None)
        return original(*args)

    varlen.bulk_rows = spy
    try:
        (q, k, v), masks, o, lse = paged_case(
            lengths_q, lengths_k, heads=(8, 2), dtype=torch.bfloat16, block_size=tile,
            causal=True, page_size=page_size, seed=11, d=d, density=0.4, config=table,
            table_form=table_form)
    finally:
        varlen.bulk_rows = original
    assert launched and all(launched)  # the descriptors were used
    pointers = replace(table, use_tma=False)
    _, _, o2, lse2 = paged_case(
        lengths_q, lengths_k, heads=(8, 2), dtype=torch.bfloat16, block_size=tile,
        causal=True, page_size=page_size, seed=11, d=d, density=0.4, config=pointers,
        table_form=table_form)
    assert not o.isnan().any()
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


@pytest.mark.gpu
@pytest.mark.parametrize("reads", ["kernel", "auto"])
def test_gpu_prism_paged_equals_varlen(reads, monkeypatch):
    optimized, _, device = _kernels()
    from prism.optimized import paged_kv

    monkeypatch.setattr(paged_kv, "PAGED_READS", reads)
    lengths_q, lengths_k = [1000, 1, 0, 2048, 300], [1000, 700, 5, 2048, 4100]
    _, (q, k, v), cu_q, cu_k = make_batch(lengths_q, lengths_k, hq=8, hkv=2, d=128,
                                          dtype=torch.bfloat16, device=device)
    k_cache, v_cache, table, seq_lens = poisoned_pages(k, v, lengths_k, 64, seed=2)
    cfg = reference.PrismConfig(block_size=128)
    o, lse, masks = optimized.prism_attention_paged(q, k_cache, v_cache, table, seq_lens,
                                                    cu_q, 2048, cfg, return_lse=True,
                                                    return_mask=True)
    o2, lse2, masks2 = optimized.prism_attention_varlen(q, k, v, cu_q, cu_k, 2048, 4100, cfg,
                                                        return_lse=True, return_mask=True)
    assert all(torch.equal(a.as_tensor(), b.as_tensor()) for a, b in zip(masks, masks2,
                                                                           strict=True))
    error = (o.float() - o2.float()).norm() / o2.float().norm()
    assert error < 1e-2 and not o.isnan().any()
    finite = lse2.isfinite()
    assert torch.equal(finite, lse.isfinite())
    assert (lse[finite] - lse2[finite]).abs().max() < 1e-2


@pytest.mark.gpu
def test_gpu_auto_gathers_only_large_calls(monkeypatch):
    """``"auto"`` reads in place below GATHER_MIN_QUERIES query tokens; at or above it,
    it gathers where the gathered launch gets Hopper's bulk copies and the in-place
    launch does not (pages that are not whole 64-key blocks here)."""
    from prism.optimized import paged_kv

    monkeypatch.setattr(paged_kv, "PAGED_READS", "auto")
    cache = torch.zeros(4, 64, 2, 128, dtype=torch.bfloat16, device="cuda")
    small = torch.zeros(paged_kv.GATHER_MIN_QUERIES - 1, 1, 128, dtype=torch.bfloat16,
                        device="cuda")
    large = torch.zeros(paged_kv.GATHER_MIN_QUERIES, 1, 128, dtype=torch.bfloat16,
                        device="cuda")
    assert paged_kv.reads_pages_in_kernel(small, cache, cache, 128)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    # 64-token pages hold whole key blocks of the table's 128 x 64 shape: bulk copies
    # in place, no gather.
    assert paged_kv.reads_pages_in_kernel(large, cache, cache, 128)
    for page in (16, 48):
        pages = torch.zeros(8, page, 2, 128, dtype=torch.bfloat16, device="cuda")
        assert paged_kv.reads_pages_in_kernel(large, pages, pages, 128) != hopper, page
    sliced = torch.zeros(4, 128, 2, 128, dtype=torch.bfloat16, device="cuda")[:, :64]
    assert paged_kv.reads_pages_in_kernel(large, sliced, sliced, 128) != hopper
    assert not paged_kv.reads_pages_in_kernel(small, cache, cache, 24)  # tile not % 16
