"""Check a port of the paged call, chunked prefill included, against the dense reference.

    python -m prism.reference.check --paged mypkg.attn:prism_attention_paged

An engine's port of :func:`prism.reference.prism_attention_paged` reads K and
V from pages through a block table, and long prompts arrive in chunks over
the part already cached (docs/serving.rst). Its classic misreadings are about
the cache, not Prism: ``seq_lens`` read without the chunk being prefilled,
a chunk's queries aligned with the first keys instead of the last, a token's
page found with the tile size, whole pages read past ``seq_lens``, selection
over the chunk's own keys only, and a pooled-key cache that keeps the mean of
a tile the previous chunk left partial (:data:`PAGED_MISREADINGS`).

A case prefills a few sequences in steps (:class:`PagedCase`): at step
``j`` each sequence sends its ``j``-th chunk of queries (none once it is done)
and ``seq_lens`` counts its tokens so far, the chunk's included. The caches
hold every token of the case in shuffled pages, but at each step the slots a
real engine would not have written yet, the spare pages and the page that a
padding entry (-1) of the block table names hold NaN, so a port that reads
them fails. Sequence ``i`` is the same request at every step of a case; a
port that keeps per-request state (a pooled-key cache) may define
``reset()``, called before each case (:class:`WithPooledKeys` does this for
the reference's own ``pooled_keys`` argument).

Each step's result is checked sequence by sequence against the dense
reference on that sequence alone, with ``Nq`` = the chunk and ``Nk`` = all
its tokens so far (contract §2's KV prefix), as
:mod:`prism.reference.check_varlen` checks a packed call. The port is called
as ``fn(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
causal=True, scale=None, **config)``, with ``return_lse`` and ``return_mask``
when it takes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .check_varlen import call_port, compare_packed, expected_masks, run_cases
from .config import resolve_config
from .golden_cases import GoldenCase, make_inputs
from .paged import prism_attention_paged
from .pooled_cache import PooledKeyCache


@dataclass(frozen=True)
class PagedCase:
    """Sequences prefilled chunk by chunk over a paged cache, and what the case exposes.

    ``chunks[i]`` lists sequence ``i``'s chunk sizes in step order.
    """

    name: str
    description: str
    catches: tuple[str, ...]
    chunks: tuple[tuple[int, ...], ...]
    page_size: int
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    value_dim: int = 16
    dtype: str = "float32"
    seed: int = 0
    config: dict = field(default_factory=lambda: {"block_size": 8, "high_threshold": 0.8,
                                                   "low_threshold": 0.85})
    causal = True  # paged prefill is causal: the chunk's queries are the last tokens

    @property
    def steps(self) -> int:
        return max((len(c) for c in self.chunks), default=0)


#: The paged and chunked misreadings the cases are built to catch.
PAGED_MISREADINGS = {
    "seq_lens_without_chunk": "seq_lens taken as the tokens before the chunk, the chunk's "
                              "keys counted after them",
    "top_left_chunk": "a chunk's queries aligned with the sequence's first keys instead of "
                      "its last (the cached prefix ignored by the causal alignment)",
    "page_by_tile": "a token's page found with the tile size (token // block_size) instead "
                    "of page_size",
    "reads_past_seq_len": "whole pages read, slots past seq_lens[i] included",
    "chunk_keys_only": "the chunk attends to (or selects over) its own keys only, without "
                       "the cached prefix",
    "stale_partial_tile": "a pooled-key cache that keeps the mean of a tile left partial by "
                          "the previous chunk instead of re-pooling it once complete",
}

PAGED_CASES = (
    PagedCase("partial_tiles", "one sequence in chunks of 13, 24 and 9 tokens: two chunks end "
              "inside a tile of 8; pages of 16", tuple(PAGED_MISREADINGS), ((13, 24, 9),),
              page_size=16, seed=1),
    PagedCase("mixed_batch", "three sequences (one chunk; 5 + 30; 9 + 1 + 17 tokens), pages of "
              "12 (not a multiple of the tile), GQA 4/1, interleaved RoPE pairs",
              tuple(PAGED_MISREADINGS), ((20,), (5, 30), (9, 1, 17)), page_size=12,
              kv_heads=1, seed=2,
              config={"block_size": 8, "high_threshold": 0.8, "low_threshold": 0.85,
                      "rope_layout": "interleaved"}),
    PagedCase("token_steps", "a 35-token prompt, then three one-token chunks; page and tile "
              "both 16", ("seq_lens_without_chunk", "top_left_chunk", "chunk_keys_only",
                          "reads_past_seq_len", "stale_partial_tile"),
              ((35, 1, 1, 1),), page_size=16, q_heads=2, kv_heads=2, seed=3,
              config={"block_size": 16, "high_threshold": 0.7, "low_threshold": 0.7}),
)


def paged_inputs(case: PagedCase):
    """``(seqs, k_cache, v_cache, block_table)``: each sequence's whole dense ``(1, H, N, D)``
    tensors (a golden-style input, RoPE at absolute positions) and the caches holding every
    token of the case, pages shuffled, spare pages and the last page NaN."""
    seqs = []
    for i, chunks in enumerate(case.chunks):
        total = sum(chunks)
        single = GoldenCase(f"{case.name}[{i}]", "", (), 1, case.q_heads, case.kv_heads, total,
                            total, case.head_dim, case.value_dim, causal=True,
                            dtype=case.dtype, seed=case.seed * 100 + i, sharpness=2.0,
                            config=case.config)
        seqs.append(make_inputs(single))
    page = case.page_size
    counts = [-(-sum(c) // page) for c in case.chunks]
    num_pages = sum(counts) + 2                        # two spare pages, the last one too
    order = np.random.default_rng(case.seed).permutation(num_pages - 1)
    dtype = seqs[0][1].dtype if seqs else torch.float32
    k_cache = torch.full((num_pages, page, case.kv_heads, case.head_dim), float("nan"),
                         dtype=dtype)
    v_cache = torch.full((num_pages, page, case.kv_heads, case.value_dim), float("nan"),
                         dtype=dtype)
    table = torch.full((len(seqs), max(counts, default=0) + 1), -1, dtype=torch.int32)
    used = 0
    for i, (_, k, v) in enumerate(seqs):
        for t in range(counts[i]):
            p = int(order[used])
            used += 1
            table[i, t] = p
            rows = slice(t * page, min((t + 1) * page, k.shape[2]))
            k_cache[p, :rows.stop - rows.start] = k[0, :, rows].transpose(0, 1)
            v_cache[p, :rows.stop - rows.start] = v[0, :, rows].transpose(0, 1)
    return seqs, k_cache, v_cache, table


def paged_step(case: PagedCase, step: int, seqs, k_cache, v_cache, table):
    """Step ``step``'s call arguments and the dense ``(q, k, v)`` each sequence expects:
    ``(args, views)``, the slots not yet written set to NaN in copies of the caches."""
    starts = [sum(c[:step]) for c in case.chunks]
    ends = [sum(c[:step + 1]) for c in case.chunks]
    k_step, v_step = k_cache.clone(), v_cache.clone()
    page = case.page_size
    for i, end in enumerate(ends):
        for t in range(end, sum(case.chunks[i])):
            k_step[table[i, t // page], t % page] = float("nan")
            v_step[table[i, t // page], t % page] = float("nan")
    q = torch.cat([s[0][0, :, a:b].transpose(0, 1) for s, a, b in zip(seqs, starts, ends,
                                                                      strict=True)])
    cu_q = torch.tensor([0, *(b - a for a, b in zip(starts, ends, strict=True))]).cumsum(0)
    args = (q.contiguous(), k_step, v_step, table, torch.tensor(ends, dtype=torch.int32),
            cu_q.to(torch.int32), max((b - a for a, b in zip(starts, ends, strict=True)),
                                      default=0))
    views = [(s[0][:, :, a:b], s[1][:, :, :b], s[2][:, :, :b])
             for s, a, b in zip(seqs, starts, ends, strict=True)]
    return args, views


def check_paged_case(fn, case: PagedCase) -> list[str]:
    """Problems of a paged port on one case, step by step; empty when it agrees."""
    reset = getattr(fn, "reset", None)
    if callable(reset):
        reset()
    seqs, k_cache, v_cache, table = paged_inputs(case)
    cfg = resolve_config(None, **case.config)
    problems = []
    for step in range(case.steps):
        args, views = paged_step(case, step, seqs, k_cache, v_cache, table)
        try:
            result = call_port(fn, args, case.config, True)
        except Exception as exc:  # a port that raises fails the case
            return problems + [f"step {step}: raised {type(exc).__name__}: {exc}"]
        found = compare_packed(result, args[0].shape, case.value_dim, args[5], views,
                               expected_masks(case, views), cfg, True)
        problems += [f"step {step}: {p}" for p in found]
    return problems


def check_paged(fn, cases=PAGED_CASES) -> tuple[int, dict[str, list[str]]]:
    """Run a paged port on ``cases``; returns (cases run, problems by case name)."""
    return run_cases(check_paged_case, fn, cases)


def random_paged_cases(count: int, seed: int = 0) -> list[PagedCase]:
    """``count`` random cases: 1-3 sequences of 1-3 chunks (1-40 tokens each), pages of
    4-32 tokens, tiles of 4-16, GQA, both RoPE layouts, fp32 and fp16, thresholds 0.5-1."""
    rng = np.random.default_rng(seed)
    cases = []
    for n in range(count):
        chunks = tuple(tuple(int(rng.integers(1, 41)) for _ in range(int(rng.integers(1, 4))))
                       for _ in range(int(rng.integers(1, 4))))
        kv = int(rng.integers(1, 3))
        p = float(rng.choice([0.5, 0.8, 0.95, 1.0]))
        cases.append(PagedCase(
            f"random_{n}", "generated", (), chunks, page_size=int(rng.choice([4, 12, 16, 32])),
            q_heads=kv * int(rng.integers(1, 4)), kv_heads=kv,
            head_dim=int(rng.choice([8, 16])), value_dim=8,
            dtype=str(rng.choice(["float32", "float16"])), seed=2000 + n,
            config={"block_size": int(rng.choice([4, 8, 16])), "high_threshold": p,
                    "low_threshold": p,
                    "rope_layout": str(rng.choice(["half", "interleaved"]))}))
    return cases


class WithPooledKeys:
    """A paged function with ``pooled_keys`` (:func:`prism.reference.prism_attention_paged`
    or :func:`prism.optimized.prism_attention_paged`) as a stateful port: one
    :class:`~prism.reference.PooledKeyCache` per sequence index, kept between the steps
    of a case and dropped by :meth:`reset` (``make_cache(block_size)`` builds them).
    ``reference_chunked`` is the reference's."""

    def __init__(self, fn, make_cache=PooledKeyCache):
        self.fn = fn
        self.make_cache = make_cache
        self.caches: dict[int, PooledKeyCache] = {}

    def reset(self) -> None:
        self.caches = {}

    def __call__(self, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                 max_seqlen_q, *, return_lse=False, return_mask=False, **kwargs):
        block_size = resolve_config(None, **{k: v for k, v in kwargs.items()
                                             if k not in ("causal", "scale")}).block_size
        caches = [self.caches.setdefault(i, self.make_cache(block_size))
                  for i in range(len(seq_lens))]
        return self.fn(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q,
                       return_lse=return_lse, return_mask=return_mask, pooled_keys=caches,
                       **kwargs)


#: The reference with a PooledKeyCache per sequence: ``--paged
#: prism.reference.check_paged:reference_chunked`` passes every case.
reference_chunked = WithPooledKeys(prism_attention_paged)

__all__ = ["PAGED_CASES", "PAGED_MISREADINGS", "PagedCase", "WithPooledKeys",
           "check_paged", "check_paged_case", "paged_inputs", "paged_step",
           "random_paged_cases", "reference_chunked"]
