"""Edge cases of the serving calls that engines hit (docs/serving.rst).

* an engine step with no prefill request: a batch of zero sequences;
* a NaN in one sequence of a run of equal-shape sequences (one batched call
  inside the loop): the error names that sequence, not the run;
* a failed chunked call leaves every PooledKeyCache as it found it, whether
  selection or attention raised, in both implementations;
* a cache filled under ``torch.inference_mode()`` serves later chunks outside it;
* NaN/Inf in a paged call is named by sequence, cache tensor, token, page and slot.

Each runs on the reference and on the kernels (Triton's interpreter on the CPU).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from test_varlen import make_batch, to_pages  # noqa: E402
from test_varlen_kernel import _kernels  # noqa: E402

from prism import reference  # noqa: E402
from prism.reference import PooledKeyCache  # noqa: E402

IMPLS = pytest.mark.parametrize("which", ["reference", "optimized"])


def _impl(which):
    """The module under test and the device both run on (the GPU where there is one)."""
    optimized, _, device = _kernels()
    return (reference if which == "reference" else optimized), device


@pytest.mark.interpret
@IMPLS
def test_a_batch_of_no_sequences(which):
    """cu_seqlens = [0]: empty outputs, empty lse, no masks; never torch.cat's error."""
    impl, device = _impl(which)
    q = torch.empty(0, 2, 32, device=device)
    k = v = torch.empty(0, 1, 32, device=device)
    cu = torch.zeros(1, dtype=torch.int32, device=device)
    out, lse, masks = impl.prism_attention_varlen(q, k, v, cu, cu, 0, 0, block_size=16,
                                                  return_lse=True, return_mask=True)
    assert out.shape == (0, 2, 32) and lse.shape == (2, 0) and masks == []
    assert impl.select_blocks_varlen(q, k, cu, cu, 0, 0, block_size=16) == []
    out = impl.block_sparse_attention_varlen(q, k, v, cu, cu, 0, 0, [], block_size=16)
    assert out.shape == (0, 2, 32)
    k_cache = v_cache = torch.zeros(4, 16, 1, 32, device=device)
    table = torch.zeros(0, 2, dtype=torch.int32, device=device)
    seq_lens = torch.zeros(0, dtype=torch.int32, device=device)
    out = impl.prism_attention_paged(q, k_cache, v_cache, table, seq_lens, cu, 0,
                                     block_size=16)
    assert out.shape == (0, 2, 32)
    assert impl.select_blocks_paged(q, k_cache, table, seq_lens, cu, 0, block_size=16) == []


@pytest.mark.interpret
@IMPLS
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_an_error_in_a_run_names_its_sequence(which, tensor):
    """Four sequences of 32 tokens run as one batched call in the reference's loop; a
    NaN in sequence 2 is reported as sequence 2 by every packed call."""
    impl, device = _impl(which)
    lengths = [32] * 4
    _, (q, k, v), cu, _ = make_batch(lengths, lengths, hq=2, hkv=1, d=16, seed=5,
                                     device=device)
    bad = {"q": q, "k": k, "v": v}[tensor].clone()
    bad[2 * 32 + 7, 0, 3] = float("nan")
    q_, k_, v_ = (bad if name == tensor else t for name, t in zip("qkv", (q, k, v), strict=True))
    named = r"^sequence 2 \("
    with pytest.raises(ValueError, match=named):
        impl.prism_attention_varlen(q_, k_, v_, cu, cu, 32, 32, block_size=16)
    if tensor != "v":
        with pytest.raises(ValueError, match=named):
            impl.select_blocks_varlen(q_, k_, cu, cu, 32, 32, block_size=16)
    masks = reference.select_blocks_varlen(q, k, cu, cu, 32, 32, block_size=16)
    with pytest.raises(ValueError, match=named):
        impl.block_sparse_attention_varlen(q_, k_, v_, cu, cu, 32, 32, masks, block_size=16)


@pytest.mark.interpret
@IMPLS
@pytest.mark.parametrize("tensor", ["q", "k_cache", "v_cache"])
def test_paged_errors_name_the_cache_token_page_and_slot(which, tensor):
    """A NaN in a paged call is reported in the caller's terms: the sequence, q's packed
    row or the cache tensor passed (k_cache, v_cache) with the token, its page and slot,
    and the KV head; never rows of the tensors gathered inside the call. With a
    PooledKeyCache, select_blocks_paged reads (and names) only the keys after it."""
    impl, device = _impl(which)
    q, k_cache, v_cache, table, seq_lens, cu = _two_cached_sequences(device)
    page = int(table[1, 1])                       # sequence 1, tokens 16-31
    bad = {"q": q, "k_cache": k_cache, "v_cache": v_cache}[tensor].clone()
    if tensor == "q":
        bad[40 + 25, 1, 4] = float("inf")
        words = r"^sequence 1: q contains 1 NaN or Inf value\(s\) in its rows 40:80, the first " \
                r"at row 65 \(query head 1\)"
    else:
        bad[page, 5, 0, 4] = float("nan")
        words = rf"^sequence 1: {tensor} contains 1 NaN or Inf value\(s\) in its tokens 0:40, " \
                rf"the first at token 21 \(page {page}, slot 5, KV head 0\)"
    args = {"q": q, "k_cache": k_cache, "v_cache": v_cache, **{tensor: bad}}
    with pytest.raises(ValueError, match=words):
        impl.prism_attention_paged(args["q"], args["k_cache"], args["v_cache"], table,
                                   seq_lens, cu, 40, block_size=16)
    if tensor != "v_cache":
        with pytest.raises(ValueError, match=words):
            impl.select_blocks_paged(args["q"], args["k_cache"], table, seq_lens, cu, 40,
                                     block_size=16)
    if which == "optimized":
        from prism.optimized.paged_kv import block_sparse_attention_paged

        masks = reference.select_blocks_paged(q, k_cache, table, seq_lens, cu, 40,
                                              block_size=16)
        with pytest.raises(ValueError, match=words):
            block_sparse_attention_paged(args["q"], args["k_cache"], args["v_cache"],
                                              table, seq_lens, cu, 40, masks, block_size=16)
    if tensor == "k_cache":
        # Sequence 1's first 16 tokens sit in its cache; its chunk is tokens 16-39.
        cache = PooledKeyCache(16)
        cache.tile_means = reference.pool_tiles(
            reference.gather_paged_kv(k_cache, v_cache, table[1:], seq_lens[1:])[0][:16]
            .transpose(0, 1)[None], 0, 16)[0]
        with pytest.raises(ValueError, match=r"^sequence 1: k_cache contains 1 NaN or Inf "
                           r"value\(s\) in its tokens 16:40 \(those after its PooledKeyCache's "
                           r"16\), the first at token 21"):
            impl.select_blocks_paged(q[:64], bad, table, seq_lens,
                                     torch.tensor([0, 40, 64], dtype=torch.int32, device=device),
                                     40, block_size=16, pooled_keys=[None, cache])
        assert cache.num_tiles == 1


def _two_cached_sequences(device):
    lengths = [40, 40]
    _, (q, k, v), _, _ = make_batch(lengths, lengths, hq=2, hkv=1, d=32, seed=7,
                                    device=device)
    k_cache, v_cache, table, seq_lens = to_pages(k, v, lengths, 16, seed=7)
    cu = torch.tensor([0, 40, 80], dtype=torch.int32)
    return q, k_cache.to(device), v_cache.to(device), table.to(device), seq_lens.to(device), \
        cu.to(device)


@pytest.mark.interpret
@IMPLS
@pytest.mark.parametrize("where", ["q", "v"])
def test_a_failed_chunked_call_leaves_the_caches_unchanged(which, where):
    """NaN in sequence 1's queries (selection raises after sequence 0's cache grew) or in
    its values (attention raises after selection grew both): every cache as before."""
    impl, device = _impl(which)
    q, k_cache, v_cache, table, seq_lens, cu = _two_cached_sequences(device)
    if where == "q":
        q = q.clone()
        q[50, 0, 0] = float("nan")
        caches = [PooledKeyCache(16), None]
    else:
        v_cache = v_cache.clone()
        v_cache[table[1, 0], 3, 0, 0] = float("nan")
        caches = [PooledKeyCache(16), PooledKeyCache(16)]
    with pytest.raises(ValueError, match=r"sequence 1"):
        impl.prism_attention_paged(q, k_cache, v_cache, table, seq_lens, cu, 40,
                                   block_size=16, pooled_keys=caches)
    assert [c.num_tiles for c in caches if c is not None] == [0] * sum(
        c is not None for c in caches)
    # The same caches then serve a clean call as fresh ones do.
    q, k_cache, v_cache, table, seq_lens, cu = _two_cached_sequences(device)
    fresh = [PooledKeyCache(16), PooledKeyCache(16)]
    caches = [c or PooledKeyCache(16) for c in caches]
    first = impl.prism_attention_paged(q, k_cache, v_cache, table, seq_lens, cu, 40,
                                       block_size=16, pooled_keys=caches)
    second = impl.prism_attention_paged(q, k_cache, v_cache, table, seq_lens, cu, 40,
                                        block_size=16, pooled_keys=fresh)
    assert torch.equal(first, second)
    assert [c.num_tiles for c in caches] == [c.num_tiles for c in fresh] == [2, 2]


@pytest.mark.interpret
@IMPLS
def test_a_cache_filled_in_inference_mode_serves_later_chunks(which):
    """Chunk 1 under torch.inference_mode(), chunk 2 under no_grad: the cache's
    inference-mode storage is copied, not updated in place (torch refuses that), and
    chunk 2's output equals the one of a cache filled outside inference mode."""
    impl, device = _impl(which)
    torch.manual_seed(0)
    k_cache = torch.randn(8, 16, 1, 32, device=device)
    v_cache = torch.randn(8, 16, 1, 32, device=device)
    table = torch.arange(8, dtype=torch.int32, device=device)[None]
    q = torch.randn(90, 2, 32, device=device)

    def chunk(cache, lo, hi):
        return impl.prism_attention_paged(
            q[lo:hi], k_cache, v_cache, table, torch.tensor([hi], dtype=torch.int32,
                                                            device=device),
            torch.tensor([0, hi - lo], dtype=torch.int32, device=device), hi - lo,
            block_size=16, pooled_keys=[cache])

    inferred, plain = PooledKeyCache(16), PooledKeyCache(16)
    with torch.inference_mode():
        chunk(inferred, 0, 50)
    with torch.no_grad():
        chunk(plain, 0, 50)
        got, expected = chunk(inferred, 50, 90), chunk(plain, 50, 90)
    assert torch.equal(got, expected)
    assert inferred.num_tiles == plain.num_tiles == 5
    assert not inferred.tile_means.is_inference()


@pytest.mark.parametrize("missing", ["k_cache", "v_cache"])
def test_gather_paged_kv_names_a_missing_cache(missing):
    cache = torch.zeros(4, 16, 1, 32)
    table = torch.zeros(1, 2, dtype=torch.int32)
    caches = {"k_cache": cache, "v_cache": cache, missing: None}
    with pytest.raises(TypeError, match=f"needs {missing} as a"):
        reference.gather_paged_kv(caches["k_cache"], caches["v_cache"], table,
                                  torch.tensor([20], dtype=torch.int32))
