"""Chunked prefill over a paged cache with a PooledKeyCache (docs/serving.rst): every
chunk equals the one-shot reference (Nq = chunk, Nk = prefix + chunk).

Split from ``test_varlen.py``, whose packed batches and per-sequence loop these
tests use. The optimized path runs in Triton's interpreter on the CPU (tiny
shapes) and on the GPU in the tests marked ``gpu``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_varlen import (  # noqa: E402
    _optimized,
    _paged_args,
    assert_close,
    assert_masks_match,
    loop_reference,
    make_batch,
    to_pages,
)

from helpers import relative_error  # noqa: E402
from prism import reference  # noqa: E402
from prism.reference import PooledKeyCache  # noqa: E402

# --------------------------------------------------------------------------
# Chunked prefill with a pooled-key cache.
# --------------------------------------------------------------------------

def chunked_run(chunks, *, impl=reference, block_size=16, page_size=16, hq=4, hkv=2,
                layout="half", dtype=torch.float32, seed=0, device="cpu", with_cache=True,
                config=None):
    """Prefill one sequence chunk by chunk over its paged cache; compare every chunk with
    the one-shot reference (Nq = chunk, Nk = prefix + chunk). ``config``: another
    estimator or preset (its block size and RoPE layout replaced by these)."""
    total = sum(chunks)
    (seq,), (q, k, v), _, _ = make_batch([total], [total], hq=hq, hkv=hkv, layout=layout,
                                         dtype=dtype, seed=seed, device=device)
    k_cache, v_cache, table, _ = to_pages(k.cpu(), v.cpu(), [total], page_size, seed=seed)
    k_cache, v_cache, table = k_cache.to(device), v_cache.to(device), table.to(device)
    cfg = (reference.PrismConfig() if config is None else config).replace(
        block_size=block_size, rope_layout=layout)
    cache = PooledKeyCache(block_size) if with_cache else None
    start = 0
    for chunk in chunks:
        end = start + chunk
        cu = torch.tensor([0, chunk], dtype=torch.int32)
        seq_lens = torch.tensor([end], dtype=torch.int32)
        o, lse, masks = impl.prism_attention_paged(
            q[start:end], k_cache, v_cache, table, seq_lens, cu, chunk, cfg,
            return_lse=True, return_mask=True, pooled_keys=[cache])
        q_i, k_i, v_i = seq[0][:, :, start:end], seq[1][:, :, :end], seq[2][:, :, :end]
        assert_masks_match(masks, [(q_i, k_i, v_i)], cfg, True, exact=impl is reference)
        ref_o, ref_lse = reference.prism_attention(q_i, k_i, v_i, cfg, return_lse=True)
        # Attention on the chunked mask (ties may move a tile in the kernel's fp32 order).
        on_mask = reference.block_sparse_attention(q_i, k_i, v_i, masks[0],
                                                   block_size=block_size, return_lse=True)
        assert_close(o, on_mask[0][0].transpose(0, 1), dtype)
        if impl is reference:
            assert_close(o, ref_o[0].transpose(0, 1), dtype)
            assert relative_error(lse, ref_lse[0]) <= 1e-5
        if cache is not None:
            assert cache.num_tiles == end // block_size
            full = reference.pool_tiles(k_i, 0, block_size)[0, :, : end // block_size]
            assert torch.allclose(cache.tile_means, full, rtol=1e-5, atol=1e-6)
        start = end
    return cache


@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       page_size=st.sampled_from([16, 24]), layout=st.sampled_from(["half", "interleaved"]),
       heads=st.sampled_from([(4, 2), (2, 2)]), seed=st.integers(0, 50))
def test_chunked_prefill_equals_one_shot(chunks, page_size, layout, heads, seed):
    """Chunk boundaries anywhere: a partial last tile is completed by the next chunk."""
    chunked_run(chunks, page_size=page_size, layout=layout, hq=heads[0], hkv=heads[1],
                seed=seed)


@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       preset=st.sampled_from(["accurate", "prism_vertical_slash"]),
       layout=st.sampled_from(["half", "interleaved"]), seed=st.integers(0, 50))
def test_chunked_prefill_with_raw_key_estimators(chunks, preset, layout, seed):
    """The accurate preset (the cascade: Prism's candidates from the cache, antidiagonal and
    vertical-slash stages on every key) and Prism's bands joined with vertical-slash tiles:
    each chunk's mask equals the one-shot reference's entry for entry, the cache as Prism's."""
    config = (reference.PrismConfig.preset("accurate") if preset == "accurate" else
              reference.PrismConfig(estimator=preset, last_queries=8))
    chunked_run(chunks, layout=layout, seed=seed, config=config)


def test_raw_key_estimator_chunks_read_the_whole_prefix():
    """With the cascade, Prism's candidates come from the stored means while its
    antidiagonal and vertical-slash stages read every key, those before the cache's end
    included: keys 0-7 edited in the pages after they were pooled change the mask, to
    exactly the reference's composition on the stored means and the edited keys."""
    from prism.reference.pooled_cache import select_from_pooled

    total = 70
    (seq,), (q, k, v), _, _ = make_batch([total], [total], hq=4, hkv=2, seed=9)
    k_cache, _, table, _ = to_pages(k, v, [total], 16, seed=9)
    cfg = reference.PrismConfig.preset("accurate", block_size=16)
    cache = PooledKeyCache(16)
    reference.select_blocks_paged(q[:40], k_cache, table, torch.tensor([40], dtype=torch.int32),
                                  torch.tensor([0, 40], dtype=torch.int32), 40, cfg,
                                  pooled_keys=[cache])
    assert cache.num_tiles == 2
    stored = cache.tile_means.clone()
    args = (torch.tensor([total], dtype=torch.int32), torch.tensor([0, 30], dtype=torch.int32),
            30, cfg)
    mask = reference.select_blocks_paged(q[40:], k_cache, table, *args, pooled_keys=[cache])[0]
    assert torch.equal(mask, reference.select_blocks(seq[0][:, :, 40:], seq[1], cfg))
    edited, k_edited = k_cache.clone(), seq[1].clone()
    edited[table[0, 0], :8] *= 50
    k_edited[:, :, :8] *= 50
    cache.truncate(2)
    got = reference.select_blocks_paged(q[40:], edited, table, *args, pooled_keys=[cache])[0]
    assert not torch.equal(got, mask), "the raw-key stages did not read the prefix"
    k_pooled = torch.cat([stored[None], reference.pool_tiles(k_edited[:, :, 32:], 32, 16)], 2)
    assert torch.equal(got, select_from_pooled(seq[0][:, :, 40:], k_pooled, total, cfg, True,
                                               k=k_edited))


def test_partial_tile_completed_by_next_chunk():
    """Chunks 20 + 20 + 30 over tile 16: tile 1 is partial after the first chunk (4 of 16
    tokens) and completed by the second, tile 2 likewise by the third."""
    cache = chunked_run([20, 20, 30], block_size=16)
    assert cache.num_tiles == 4 and cache.num_tokens == 64


def test_chunked_batch_mixes_cached_and_uncached_sequences():
    """Two sequences with caches and one without, in one batch, over two steps."""
    lengths = [50, 37, 64]
    seqs, (q, k, v), _, _ = make_batch(lengths, lengths, seed=5)
    k_cache, v_cache, table, _ = to_pages(k, v, lengths, 16)
    caches = [PooledKeyCache(16), None, PooledKeyCache(16)]
    cfg = reference.PrismConfig(block_size=16)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    for split in (0.4, 1.0):
        ends = [int(n * split) for n in lengths]
        starts = [0, 0, 0] if split < 1 else [int(n * 0.4) for n in lengths]
        rows = [torch.arange(offsets[i] + s, offsets[i] + e) for i, (s, e) in
                enumerate(zip(starts, ends, strict=True))]
        q_step = q[torch.cat(rows)]
        cu = torch.tensor([0, *[e - s for s, e in zip(starts, ends, strict=True)]]).cumsum(0).int()
        o, masks = reference.prism_attention_paged(
            q_step, k_cache, v_cache, table, torch.tensor(ends, dtype=torch.int32), cu,
            max(e - s for s, e in zip(starts, ends, strict=True)), cfg, return_mask=True,
            pooled_keys=caches)
        expected = [(sq[:, :, s:e], sk[:, :, :e], sv[:, :, :e])
                    for (sq, sk, sv), s, e in zip(seqs, starts, ends, strict=True)]
        assert_masks_match(masks, expected, cfg, True)
        ref_o, _, _ = loop_reference(expected, cfg, True)
        assert_close(o, ref_o, torch.float32)
    assert [c.num_tiles if c else None for c in caches] == [3, None, 4]


def test_select_only_reads_keys_after_the_cache():
    """select_blocks_paged with a filled cache never reads the pooled prefix: poisoning
    the pages of complete tiles changes nothing, poisoning the partial tile does."""
    _, (q, k, v), _, _ = make_batch([40], [40], seed=2)
    k_cache, v_cache, table, _ = to_pages(k, v, [40], 16)
    cache = PooledKeyCache(16)
    one = torch.tensor([0, 24], dtype=torch.int32)
    reference.select_blocks_paged(q[:24], k_cache, table, torch.tensor([24]), one, 24,
                                  block_size=16, pooled_keys=[cache])
    assert cache.num_tokens == 16
    poisoned = k_cache.clone()
    poisoned[table[0, 0]] = 1e3          # tokens 0..15: the complete tile, already pooled
    two = torch.tensor([0, 16], dtype=torch.int32)
    snapshot = cache.tile_means.clone()
    b = reference.select_blocks_paged(q[24:], k_cache, table, torch.tensor([40]), two, 16,
                                      block_size=16, pooled_keys=[cache])
    means_b = cache.tile_means.clone()
    cache.tile_means = snapshot.clone()
    a = reference.select_blocks_paged(q[24:], poisoned, table, torch.tensor([40]), two, 16,
                                      block_size=16, pooled_keys=[cache])
    assert torch.equal(a[0], b[0]) and torch.equal(cache.tile_means, means_b)
    cache.tile_means = snapshot.clone()
    poisoned[table[0, 1], :2] = 1e3       # tokens 16, 17: tile 1, partial when cached
    reference.select_blocks_paged(q[24:], poisoned, table, torch.tensor([40]), two, 16,
                                  block_size=16, pooled_keys=[cache])
    assert torch.equal(cache.tile_means[:, 0], means_b[:, 0])
    assert not torch.equal(cache.tile_means[:, 1], means_b[:, 1])


def test_pooled_cache_errors():
    args = _paged_args()
    with pytest.raises(ValueError, match=r"pooled_keys\[0\] was built for block_size 32"):
        reference.prism_attention_paged(**args, block_size=16,
                                        pooled_keys=[PooledKeyCache(32), None])
    big = PooledKeyCache(16)
    big.tile_means = torch.zeros(2, 3, 32)           # 48 tokens > seq_lens[0] = 20
    with pytest.raises(ValueError, match=r"sequence 0 now has 20 .* reset\(\)"):
        reference.prism_attention_paged(**args, block_size=16, pooled_keys=[big, None])
    with pytest.raises(TypeError, match="one per sequence"):
        reference.prism_attention_paged(**args, block_size=16, pooled_keys=[None])
    with pytest.raises(ValueError, match="'vertical_slash' estimator reads raw keys only"):
        reference.prism_attention_paged(**args, block_size=16, estimator="vertical_slash",
                                        pooled_keys=[PooledKeyCache(16), None])
    shared = PooledKeyCache(16)
    for impl in _impls_for_errors():
        with pytest.raises(ValueError, match=r"pooled_keys\[0\] and pooled_keys\[1\] are the same"):
            impl.prism_attention_paged(**args, block_size=16, pooled_keys=[shared, shared])
        with pytest.raises(ValueError, match="its own PooledKeyCache"):
            impl.select_blocks_paged(args["q"], args["k_cache"], args["block_table"],
                                     args["seq_lens"], args["cu_seqlens_q"],
                                     args["max_seqlen_q"], block_size=16,
                                     pooled_keys=[shared, shared])
    assert shared.num_tiles == 0  # refused before anything was pooled


def _impls_for_errors():
    """The reference, and prism.optimized where it takes these CPU tensors (Triton's
    interpreter; the check is shared validation, before any kernel)."""
    impls = [reference]
    if os.environ.get("TRITON_INTERPRET") == "1":
        import prism.optimized as optimized

        impls.append(optimized)
    return impls


# --------------------------------------------------------------------------
# prism.optimized: the interpreter on tiny shapes, the GPU when present.
# --------------------------------------------------------------------------

@pytest.mark.interpret
def test_optimized_paged_chunked_interpreted():
    optimized, device = _optimized()
    chunked_run([20, 30], impl=optimized, block_size=16, page_size=16, device=device)


@pytest.mark.gpu
def test_gpu_paged_chunked():
    optimized, device = _optimized()
    chunked_run([700, 1, 900, 450], impl=optimized, block_size=128, page_size=64, hq=8, hkv=2,
                dtype=torch.bfloat16, device=device)
