"""Chunked prefill on the kernels: selection fed from a PooledKeyCache (prism.optimized.chunked,
docs/serving.rst).

Every chunk's kernel-fed mask is compared with three things: the reference's
cached path (a second cache, torch stages; equal up to the contract's boundary
ties), the uncached kernel selection over the whole prefix (bitwise), and the
one-shot reference. The cache's stored means must equal, bit for bit, the
pooling kernel's means of the whole prefix. The interpreter runs tiny shapes on
the CPU; the tests marked ``gpu`` run real ones.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from test_varlen import assert_close, make_batch, to_pages  # noqa: E402
from test_varlen_kernel import _kernels  # noqa: E402

from prism import reference  # noqa: E402
from prism.reference import PooledKeyCache  # noqa: E402


def _ties(q, k, cfg):
    return reference.boundary_ties(q, k, cfg, causal=True)


def _uncached_pool(q, k, cfg):
    """The pooling kernel's key means of the whole prefix, (Hkv, D, n_key_tiles)."""
    from prism.optimized.pooling import pool_tiles_and_energy
    from prism.reference.bands import band_sizes

    layout = reference.tile_layout(q.shape[2], k.shape[2], cfg.block_size, True)
    high, low = band_sizes(q.shape[3], cfg.high_dim, cfg.low_dim)
    k_pooled_t = pool_tiles_and_energy(q, k, layout, high, low, cfg.rope_layout)[1]
    return k_pooled_t[0, :, :, :layout.num_key_tiles]


def run_chunks(chunks, *, block_size, page_size, heads, layout="half", d=16,
               dtype=torch.float32, seed=0, reads=None, monkeypatch=None, full=True,
               config=None):
    """Prefill one sequence chunk by chunk, kernel-fed and reference caches side by side
    (``full``: also the reference's cached path and attention on the chosen masks).
    ``config``: another estimator or preset (block size and RoPE layout replaced); its
    masks are compared with the uncached kernels up to the boundary ties."""
    optimized, _, device = _kernels()
    from prism.optimized import paged_kv

    if reads is not None:
        monkeypatch.setattr(paged_kv, "PAGED_READS", reads)
    total = sum(chunks)
    (seq,), (q, k, v), _, _ = make_batch([total], [total], hq=heads[0], hkv=heads[1], d=d,
                                         layout=layout, dtype=dtype, seed=seed, device=device)
    k_cache, v_cache, table, _ = to_pages(k.cpu(), v.cpu(), [total], page_size, seed=seed)
    k_cache, v_cache, table = k_cache.to(device), v_cache.to(device), table.to(device)
    cfg = (reference.PrismConfig() if config is None else config).replace(
        block_size=block_size, rope_layout=layout)
    kernel_cache, ref_cache = PooledKeyCache(block_size), PooledKeyCache(block_size)
    start = 0
    for chunk in chunks:
        end = start + chunk
        cu = torch.tensor([0, chunk], dtype=torch.int32)
        seq_lens = torch.tensor([end], dtype=torch.int32)
        args = (q[start:end], k_cache, v_cache, table, seq_lens, cu, chunk, cfg)
        o, masks = optimized.prism_attention_paged(*args, return_mask=True,
                                                   pooled_keys=[kernel_cache])
        q_i, k_i, v_i = seq[0][:, :, start:end], seq[1][:, :, :end], seq[2][:, :, :end]
        mask = masks[0].as_tensor()
        uncached = optimized.select_blocks(q_i, k_i, cfg).as_subclass(torch.Tensor)
        if config is None:
            assert torch.equal(mask, uncached), f"chunk ending at {end}: not the uncached mask"
        else:
            differ = reference.mask_differences(mask, uncached, _ties(q_i, k_i, cfg))
            assert differ.numel() == 0, f"chunk ending at {end}: not the uncached mask"
        complete = end // block_size
        assert kernel_cache.num_tiles == complete
        if full:
            # The reference's cached path (torch stages, on the same device).
            ref_masks = reference.select_blocks_paged(args[0], k_cache, table, seq_lens, cu,
                                                      chunk, cfg, pooled_keys=[ref_cache])
            assert torch.equal(ref_masks[0], reference.select_blocks(q_i, k_i, cfg))
            differ = reference.mask_differences(mask, ref_masks[0], _ties(q_i, k_i, cfg))
            assert differ.numel() == 0, f"chunk ending at {end} differs at {differ[:4].tolist()}"
            assert ref_cache.num_tiles == complete
            on_mask = reference.block_sparse_attention(q_i, k_i, v_i, mask,
                                                       block_size=block_size)
            assert_close(o, on_mask[0].transpose(0, 1), dtype)
        if complete:
            assert torch.equal(kernel_cache.means_t, _uncached_pool(q_i, k_i, cfg)[:, :, :complete])
        start = end
    return kernel_cache


# --------------------------------------------------------------------------
# The interpreter on the CPU (every kernel call costs about a second there).
# --------------------------------------------------------------------------

@pytest.mark.interpret
def test_kernel_fed_chunks_interpreted():
    """select_blocks_paged chunk by chunk: a first chunk on an empty cache, one-token
    chunks, a chunk ending inside a tile and one on a tile boundary; GQA, pages of 24
    over tile 16. Against the reference's cached path and the one-shot reference every
    chunk; against the uncached kernel selection (bitwise, masks and stored means) at
    the chunk that re-pools a partial tile and completes it."""
    optimized, _, device = _kernels()
    chunks, bs = [1, 20, 11, 1], 16
    total = sum(chunks)
    (seq,), (q, k, v), _, _ = make_batch([total], [total], hq=2, hkv=1, d=16, seed=4,
                                         device=device)
    k_cache, _, table, _ = to_pages(k, v, [total], 24, seed=4)
    cfg = reference.PrismConfig(block_size=bs)
    kernel_cache, ref_cache = PooledKeyCache(bs), PooledKeyCache(bs)
    start = 0
    for chunk in chunks:
        end = start + chunk
        args = (q[start:end], k_cache, table, torch.tensor([end], dtype=torch.int32),
                torch.tensor([0, chunk], dtype=torch.int32), chunk, cfg)
        mask = optimized.select_blocks_paged(*args, pooled_keys=[kernel_cache])[0]
        ref_mask = reference.select_blocks_paged(*args, pooled_keys=[ref_cache])[0]
        q_i, k_i = seq[0][:, :, start:end], seq[1][:, :, :end]
        assert torch.equal(ref_mask, reference.select_blocks(q_i, k_i, cfg))
        differ = reference.mask_differences(mask, ref_mask, _ties(q_i, k_i, cfg))
        assert differ.numel() == 0, f"chunk ending at {end} differs at {differ[:4].tolist()}"
        assert kernel_cache.num_tiles == ref_cache.num_tiles == end // bs
        if end == 32:
            assert torch.equal(mask.as_subclass(torch.Tensor),
                               optimized.select_blocks(q_i, k_i, cfg).as_subclass(torch.Tensor))
            assert torch.equal(kernel_cache.means_t, _uncached_pool(q_i, k_i, cfg))
        start = end
    torch.testing.assert_close(kernel_cache.tile_means, ref_cache.tile_means)


@pytest.mark.interpret
@pytest.mark.parametrize("reads", ["kernel", "gather"])
def test_kernel_fed_batch_and_nan_rollback(reads, monkeypatch):
    """prism_attention_paged over a batch of a cached sequence, an uncached one and a
    cached one without queries (interleaved RoPE), pages read in place and gathered:
    masks as the reference's, outputs as the reference on those masks, the caches as
    the reference's. Then Inf in a key after a cache: a ValueError naming the sequence,
    and every cache as the call found it."""
    optimized, _, device = _kernels()
    from prism.optimized import paged_kv

    monkeypatch.setattr(paged_kv, "PAGED_READS", reads)
    lengths, starts = [40, 23, 37], [17, 0, 20]
    seqs, (q, k, v), _, _ = make_batch(lengths, lengths, hq=2, hkv=1, d=16, seed=3,
                                       layout="interleaved", device=device)
    k_cache, v_cache, table, seq_lens = to_pages(k, v, lengths, 16, seed=3)
    cfg = reference.PrismConfig(block_size=16, rope_layout="interleaved")
    caches, ref_caches = [], []
    for i in (0, 2):  # fill both ways: the first 17 and 20 tokens
        caches.append(PooledKeyCache(16))
        ref_caches.append(PooledKeyCache(16))
        ref_caches[-1].pooled(seqs[i][1][:, :, :starts[i]], starts[i])
        caches[-1].tile_means = ref_caches[-1].tile_means.clone()
    caches.insert(1, None)
    ref_caches.insert(1, None)
    ends = [40, 23, 20]
    rows = torch.cat([torch.arange(o + s, o + e) for o, s, e in
                      zip([0, 40, 63], starts, ends, strict=True)])
    nq = [e - s for s, e in zip(starts, ends, strict=True)]
    cu = torch.tensor([0, *nq]).cumsum(0).to(torch.int32)
    args = (q[rows], k_cache, v_cache, table, torch.tensor(ends, dtype=torch.int32), cu, 23, cfg)
    o, masks = optimized.prism_attention_paged(*args, return_mask=True, pooled_keys=caches)
    ref_masks = reference.select_blocks_paged(*args[:2], *args[3:], pooled_keys=ref_caches)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        q_i, k_i = seqs[i][0][:, :, s:e], seqs[i][1][:, :, :e]
        differ = reference.mask_differences(masks[i], ref_masks[i], _ties(q_i, k_i, cfg))
        assert differ.numel() == 0, f"sequence {i} differs at {differ[:4].tolist()}"
    gk, gv, gcu = reference.gather_paged_kv(k_cache, v_cache, table, args[4])
    expected = reference.block_sparse_attention_varlen(args[0], gk, gv, cu, gcu, 23, 40, masks,
                                                       block_size=16)
    assert_close(o, expected, torch.float32)
    assert [c.num_tiles if c else None for c in caches] == [2, None, 1]
    torch.testing.assert_close(caches[0].tile_means, ref_caches[0].tile_means)
    # Sequence 2 grows from 20 to 37 tokens; token 30 (after its cache) is Inf.
    poisoned = k_cache.clone()
    poisoned[table[2, 1], 30 - 16, 0, 3] = float("inf")
    snapshot = [c.means_t.clone() for c in (caches[0], caches[2])]
    with pytest.raises(ValueError, match=r"sequence 2: k_cache contains 1 .* token 30 "):
        optimized.prism_attention_paged(
            q[63 + 20:63 + 37], poisoned, v_cache, table, seq_lens,
            torch.tensor([0, 0, 0, 17], dtype=torch.int32), 17, cfg, pooled_keys=caches)
    assert [c.num_tiles for c in (caches[0], caches[2])] == [2, 1]
    assert all(torch.equal(c.means_t, s) for c, s in
               zip((caches[0], caches[2]), snapshot, strict=True))


@pytest.mark.interpret
@pytest.mark.parametrize("reads, preset", [("kernel", "accurate"),
                                           ("gather", "prism_vertical_slash")])
def test_kernel_fed_chunks_raw_key_estimators(reads, preset, monkeypatch):
    """The accurate preset (cascade) and Prism's bands with vertical-slash tiles, chunk by
    chunk with a cache, pages in place and gathered: Prism's stage from the cache, the
    other stages on every key; masks as the reference's cached path and the uncached
    kernels up to the boundary ties, the stored means bitwise the pooling kernel's."""
    config = (reference.PrismConfig.preset("accurate") if preset == "accurate" else
              reference.PrismConfig(estimator=preset, last_queries=8))
    run_chunks([20, 1, 27], block_size=16, page_size=24, heads=(2, 1), reads=reads,
               monkeypatch=monkeypatch, config=config, seed=2)


@pytest.mark.interpret
def test_raw_key_estimator_nan_in_prefix_rolls_back():
    """With the cascade and a cache, an Inf in a key before the cache's end (which its
    raw-key stages read) raises the reference's error naming the sequence, and the cache
    is left as the call found it."""
    optimized, _, device = _kernels()
    total = 48
    (seq,), (q, k, v), _, _ = make_batch([total], [total], hq=2, hkv=1, d=16, seed=6,
                                         device=device)
    k_cache, v_cache, table, _ = to_pages(k, v, [total], 16, seed=6)
    cfg = reference.PrismConfig.preset("accurate", block_size=16)
    cache = PooledKeyCache(16)
    first = (torch.tensor([20], dtype=torch.int32), torch.tensor([0, 20], dtype=torch.int32), 20)
    optimized.prism_attention_paged(q[:20], k_cache, v_cache, table, *first, cfg,
                                    pooled_keys=[cache])
    assert cache.num_tiles == 1
    stored = cache.means_t.clone()
    poisoned = k_cache.clone()
    poisoned[table[0, 0], 3, 0, 5] = float("inf")
    second = (torch.tensor([total], dtype=torch.int32), torch.tensor([0, 28], dtype=torch.int32),
              28, cfg)
    for impl in (optimized, reference):
        with pytest.raises(ValueError, match=r"sequence 0: k_cache .* tokens 0:48, the first "
                                             r"at token 3 "):
            impl.select_blocks_paged(q[20:], poisoned, table, *second, pooled_keys=[cache])
        assert cache.num_tiles == 1 and torch.equal(cache.means_t, stored)
    with pytest.raises(ValueError, match="sequence 0"):
        optimized.prism_attention_paged(q[20:], poisoned, v_cache, table, *second,
                                        pooled_keys=[cache])
    assert cache.num_tiles == 1 and torch.equal(cache.means_t, stored)


# --------------------------------------------------------------------------
# The GPU.
# --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("layout, page_size, reads", [
    ("half", 64, "auto"), ("interleaved", 48, "kernel")])
def test_gpu_kernel_fed_chunks(layout, page_size, reads, monkeypatch):
    """bf16, tile 128, 32/8 heads, D 128: chunks of 1, 700, 1, 900 and 450 tokens."""
    run_chunks([1, 700, 1, 900, 450], block_size=128, page_size=page_size, heads=(32, 8),
               layout=layout, d=128, dtype=torch.bfloat16, reads=reads,
               monkeypatch=monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("reads", ["kernel", "gather"])
def test_gpu_kernel_fed_chunks_accurate(reads, monkeypatch):
    """The accurate preset, bf16, tile 128, 32/8 heads, D 128: chunks of 1, 700, 1, 900
    and 450 tokens, against the reference's cached path and the uncached kernels."""
    run_chunks([1, 700, 1, 900, 450], block_size=128, page_size=64, heads=(32, 8), d=128,
               dtype=torch.bfloat16, reads=reads, monkeypatch=monkeypatch, seed=3,
               config=reference.PrismConfig.preset("accurate"))


@pytest.mark.gpu
def test_gpu_kernel_fed_long_prefix():
    """A 16K prefix in one chunk, then a 2K chunk and a one-token chunk (tile 64, GQA 4)."""
    run_chunks([16384 + 37, 2048, 1], block_size=64, page_size=256, heads=(16, 4), d=64,
               dtype=torch.float16, seed=5, full=False)
