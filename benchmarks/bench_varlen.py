"""Prism on a packed variable-length batch against dense varlen attention (docs/serving.rst).

A batch of 8 causal sequences of mixed lengths (64K, 24K, 16K, 8K, 8K, 4K, 3K,
1K: 128K tokens), 32 query heads, 8 KV heads, head_dim 128, bf16, tile 128,
as one layer of Llama-3.1-8B. Inputs are the structured RoPE'd queries and
keys of ``bench_prism.py`` (a shared per-head direction), so that Prism's
selection has the density of a real layer. Every time is a median of CUDA-event
timed calls after warm-up; every ratio compares numbers of the same run.

Measured:

* dense baselines: SDPA per sequence (cuDNN and flash backends, K/V expanded
  to 32 heads outside the timing), ``torch.nn.attention.varlen.varlen_attn``
  when this torch has it, and compiled FlexAttention over the packed batch
  with a document-causal block mask;
* ``prism.optimized.prism_attention_varlen``, selection included, at a top-p
  threshold whose tile density is <= 0.15 and at threshold 1.0 (density 1.0);
* the packing overhead: the varlen call against the same per-sequence calls
  on contiguous (1, H, N_i, D) tensors, and a packed batch of 8 x 16K against
  ``prism_attention`` on the (8, H, 16K, D) batch holding the same tokens,
  with the stages apart (selection on the contiguous batch and on the packed
  rows; the one packed attention launch against the batched kernel on the
  contiguous batch and on a strided (8, H, 16K, D) view of the packed rows,
  all on the same compact indices);
* the packing overhead again as **interleaved medians** (``--rounds``
  rounds; each round times the batched and the packed call back to back, in
  alternating order, so clock and thermal drift hit both alike): the median
  and the spread of the per-round ratio packed / batched - 1, end to end and
  for the attention launch alone (``overhead_interleaved``);
* the paged path: the same batch in a cache of shuffled pages, K/V read by
  the kernel through the block table (``prism_attention_paged`` with
  ``paged_kv.PAGED_READS = "kernel"``), against the gather path
  (``gather_paged_kv`` then ``prism_attention_varlen``), the default
  (``"auto"``) and the varlen call; attention alone on the same masks at pages of 16, 64
  and 256 tokens, sparse and at density 1.0.

Usage (on the GPU machine, from the repository root)::

    python benchmarks/bench_varlen.py --out results.json --commit abc1234
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_prism import bench as _bench  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import paged_kv
from prism.optimized import varlen as packed_launch
from prism.optimized.attention import sparse_attention_forward
from prism.reference import (
    PrismConfig,
    admissible_tiles,
    apply_rope,
    gather_paged_kv,
    tile_layout,
)
from prism.reference.varlen import as_batch

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 128
DTYPE = torch.bfloat16
LENGTHS = (65536, 24576, 16384, 8192, 8192, 4096, 3072, 1024)
ORDERS = False   # --orders: also time the launch's tile orders (bench_varlen's earlier study)
ROUNDS = 9       # --rounds: rounds of the interleaved overhead measurement


def log(*parts):
    print(*parts, flush=True)


def bench(fn):
    """Median ms of ``fn`` (the benchmarks' one timing helper, bench_prism.bench)."""
    return _bench(fn, rep=50)


def structured(n, seed, sharpness=0.75, base=500000.0):
    """(n, H, D) packed q and (n, Hkv, D) k, v of one sequence, RoPE from position 0."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    topic = torch.randn(1, KV_HEADS, 1, HEAD_DIM, device="cuda", generator=gen)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", generator=gen) + 1.5 * topic
    q = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", generator=gen)
         + 1.5 * topic.repeat_interleave(HEADS // KV_HEADS, dim=1)) * sharpness
    v = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", generator=gen)
    q, k = apply_rope(q, base), apply_rope(k, base)
    return tuple(t[0].transpose(0, 1).to(DTYPE).contiguous() for t in (q, k, v))


def packed_batch(lengths, seed=0):
    parts = [structured(n, seed + i) for i, n in enumerate(lengths)]
    q, k, v = (torch.cat([p[j] for p in parts]) for j in range(3))
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return q, k, v, cu


def views(x, cu):
    """Per-sequence contiguous (1, H, N_i, D) copies (the dense baselines' inputs)."""
    return [x[a:b].transpose(0, 1).unsqueeze(0).contiguous()
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]


def tile_density(masks, lengths):
    """Selected / admissible (query tile, key tile) pairs over all sequences and heads."""
    selected = sum(int(m.sum()) for m in masks)
    admissible = sum(int(admissible_tiles(tile_layout(n, n, BLOCK, True), True).sum()) * HEADS
                     for n in lengths if n)
    return selected / admissible


def pair_density(masks, lengths):
    """Fraction of the causal (query, key) token pairs inside selected tiles (N % 128 == 0)."""
    kept = total = 0.0
    for m, n in zip(masks, lengths, strict=True):
        diagonal = m.diagonal(dim1=-2, dim2=-1).sum()
        kept += float((m.sum() - diagonal) * BLOCK * BLOCK + diagonal * BLOCK * (BLOCK + 1) / 2)
        total += HEADS * n * (n + 1) / 2
    return kept / total


# --------------------------------------------------------------------------
# Dense baselines.
# --------------------------------------------------------------------------

def sdpa_loop_times(qs, ks, vs):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    group = HEADS // KV_HEADS
    kx = [k.repeat_interleave(group, dim=1) for k in ks]
    vx = [v.repeat_interleave(group, dim=1) for v in vs]
    times = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                for q, k, v in zip(qs, kx, vx, strict=True):
                    sdpa(q, k, v, is_causal=True)
        try:
            times[name] = bench(run)
        except RuntimeError as error:
            times[name] = None
            log(f"  SDPA {name} unavailable: {str(error)[:200]}")
    return times


def varlen_attn_time(q, k, v, cu, max_len):
    """torch.nn.attention.varlen.varlen_attn (flash varlen), if this torch has it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as error:
        return None, f"not in torch {torch.__version__}: {error}"
    params = inspect.signature(varlen_attn).parameters
    cu_dev = cu.cuda()
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
        kx, vx = k, v
    else:
        kx = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        vx = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    try:
        return bench(lambda: varlen_attn(q, kx, vx, cu_dev, cu_dev, max_len, max_len,
                                         **kwargs)), str(list(params))
    except Exception as error:  # an unsupported build or signature
        return None, f"{type(error).__name__}: {str(error)[:300]}"


def document_block_mask(lengths):
    """Flex BlockMask: causal inside each document, tiles of 128 (lengths % 128 == 0)."""
    from torch.nn.attention.flex_attention import BlockMask

    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0) // BLOCK
    tiles = torch.tensor(lengths) // BLOCK
    doc_start = torch.repeat_interleave(starts, tiles).cuda()
    nt = int(tiles.sum())
    rows = torch.arange(nt, device="cuda")
    cols = torch.arange(nt, device="cuda")
    full_num = (rows - doc_start).to(torch.int32)
    full_idx = (doc_start[:, None] + cols[None, :]).clamp(max=nt - 1).to(torch.int32)
    part_num = torch.ones(nt, dtype=torch.int32, device="cuda")
    part_idx = torch.zeros(nt, nt, dtype=torch.int32, device="cuda")
    part_idx[:, 0] = rows.to(torch.int32)
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).cuda()

    def mask_mod(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    n = int(sum(lengths))
    return BlockMask.from_kv_blocks(part_num[None, None], part_idx[None, None],
                                    full_num[None, None], full_idx[None, None],
                                    BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(n, n))


def flex_time(q, k, v, lengths):
    try:
        from torch.nn.attention.flex_attention import flex_attention

        attend = torch.compile(flex_attention)
        qf, kf, vf = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        bm = document_block_mask(lengths)
        started = time.time()
        attend(qf, kf, vf, block_mask=bm, enable_gqa=True)
        torch.cuda.synchronize()
        compile_s = time.time() - started
        return bench(lambda: attend(qf, kf, vf, block_mask=bm, enable_gqa=True)), compile_s
    except Exception as error:  # a torch build without a working flex_attention
        log(f"  FlexAttention failed: {type(error).__name__}: {str(error)[:300]}")
        return None, None


# --------------------------------------------------------------------------
# Prism.
# --------------------------------------------------------------------------

def sparse_config(q, k, cu, max_len, lengths, target=0.15):
    """The first top-p threshold (both bands) whose tile density is <= target."""
    for p in (0.95, 0.9, 0.85, 0.8):
        cfg = PrismConfig(block_size=BLOCK, high_threshold=p, low_threshold=p)
        masks = optimized.select_blocks_varlen(q, k, cu, cu, max_len, max_len, cfg)
        density = tile_density(masks, lengths)
        log(f"  threshold {p}: tile density {density:.4f}, "
            f"pair density {pair_density(masks, lengths):.4f}")
        if density <= target:
            return cfg, masks
    return cfg, masks


def prism_entry(q, k, v, cu, max_len, lengths, cfg, masks, qs, ks, vs):
    entry = {"threshold": cfg.high_threshold, "tile_density": tile_density(masks, lengths),
             "pair_density": pair_density(masks, lengths)}
    entry["varlen_ms"] = bench(lambda: optimized.prism_attention_varlen(
        q, k, v, cu, cu, max_len, max_len, cfg))
    entry["select_varlen_ms"] = bench(lambda: optimized.select_blocks_varlen(
        q, k, cu, cu, max_len, max_len, cfg))

    def per_sequence():
        for qi, ki, vi in zip(qs, ks, vs, strict=True):
            optimized.prism_attention(qi, ki, vi, cfg)

    entry["per_sequence_contiguous_ms"] = bench(per_sequence)
    # Attention alone on the selected masks (TileMasks hand over their indices).
    entry["attention_varlen_ms"] = bench(lambda: optimized.block_sparse_attention_varlen(
        q, k, v, cu, cu, max_len, max_len, masks, block_size=BLOCK))
    bounds = cu.tolist()
    ranges = [(a, b, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    pieces = [(1, *optimized.mask_to_indices(m.as_subclass(torch.Tensor))) for m in masks]
    if ORDERS:
        entry["kernel_packed_order_ms"] = launch_orders(q, k, v, ranges, pieces)
    entry["packing_overhead"] = entry["varlen_ms"] / entry["per_sequence_contiguous_ms"] - 1
    return entry


def work_order(layout):
    """The same launch tables with every tile of every sequence ordered by work alone
    (causal key tiles up to the diagonal), heaviest first: the order to compare with."""
    seqs, tiles = layout.seqs, layout.tiles
    work = seqs[tiles[:, 0], 5] + tiles[:, 1] + 1
    order = torch.sort(work, stable=True).indices
    return packed_launch.PackedLayout(
        table=layout.table[order.to(layout.table.device)], seqs=seqs, tiles=tiles[order],
        num_tiles=layout.num_tiles, query_start_gcd=layout.query_start_gcd)


def launch_orders(q, k, v, ranges, pieces):
    """The one packed launch on the same indices in its tile order and in work order."""
    flat_num, flat_idx, placements = packed_launch._flatten_indices(pieces)
    by_sequence = packed_launch.packed_layout(ranges, placements, BLOCK, True, q.device)
    times = {}
    for name, layout in (("by_sequence", by_sequence), ("by_work", work_order(by_sequence))):
        times[name] = bench(lambda layout=layout: packed_launch.packed_attention_forward(
            q, k, v, layout, flat_num, flat_idx, block_size=BLOCK, causal=True, scale=None,
            return_lse=False))
    return times


def interleaved(batched, packed, rounds=None):
    """Packed against batched time, interleaved: ``rounds`` rounds, each timing both
    back to back (which goes first alternates); medians, spreads and the per-round
    ratio packed / batched - 1 (its median is the overhead reported)."""
    rounds = ROUNDS if rounds is None else rounds
    times = {"batched": [], "packed": []}
    for r in range(rounds):
        for name in (("batched", "packed") if r % 2 == 0 else ("packed", "batched")):
            times[name].append(bench(batched if name == "batched" else packed))
    ratios = [p / b - 1 for p, b in zip(times["packed"], times["batched"], strict=True)]
    result = {"rounds": rounds, "overhead_median": statistics.median(ratios),
              "overhead_min": min(ratios), "overhead_max": max(ratios),
              "overhead_per_round": ratios}
    for name, values in times.items():
        result[f"{name}_ms_median"] = statistics.median(values)
        result[f"{name}_ms_spread"] = (max(values) - min(values)) / statistics.median(values)
        result[f"{name}_ms"] = values
    return result


def equal_length_overhead(cfg_sparse, n=16384, batch=8, which=("sparse", "dense")):
    """Packed varlen of 8 x 16K against prism_attention on the (8, H, 16K, D) batch,
    end to end and stage by stage on the same compact indices."""
    parts = [structured(n, 100 + i) for i in range(batch)]
    qb, kb, vb = (torch.stack([p[j].transpose(0, 1) for p in parts]) for j in range(3))
    q, k, v = (torch.cat([p[j] for p in parts]) for j in range(3))
    del parts
    cu = torch.arange(0, (batch + 1) * n, n, dtype=torch.int32)
    ranges = [(i * n, (i + 1) * n, i * n, (i + 1) * n) for i in range(batch)]
    strided = [as_batch(t, 0, batch, n) for t in (q, k, v)]
    out = {}
    for name, cfg in (("sparse", cfg_sparse),
                      ("dense", PrismConfig(block_size=BLOCK, high_threshold=1.0,
                                            low_threshold=1.0))):
        if name not in which:
            continue
        entry = {"threshold": cfg.high_threshold}
        entry["batched_ms"] = bench(lambda cfg=cfg: optimized.prism_attention(qb, kb, vb, cfg))
        entry["varlen_ms"] = bench(lambda cfg=cfg: optimized.prism_attention_varlen(
            q, k, v, cu, cu, n, n, cfg))
        entry["overhead"] = entry["varlen_ms"] / entry["batched_ms"] - 1
        entry["select_batched_ms"] = bench(lambda cfg=cfg: optimized.select_blocks(qb, kb, cfg))
        entry["select_packed_rows_ms"] = bench(
            lambda cfg=cfg: optimized.select_blocks(strided[0], strided[1], cfg))
        mask = optimized.select_blocks(qb, kb, cfg)
        num, idx = mask.carried_indices(block_size=BLOCK, causal=True, num_queries=n,
                                        num_keys=n)

        def kernel(q4, k4, v4, num=num, idx=idx):
            return sparse_attention_forward(q4, k4, v4, num, idx, block_size=BLOCK, causal=True,
                                            scale=None, return_lse=False, first_query_tile=0,
                                            query_start=0, interpreted=False)

        flat_num, flat_idx, placements = packed_launch._flatten_indices([(batch, num, idx)])
        layout = packed_launch.packed_layout(ranges, placements, BLOCK, True, q.device)

        def packed(flat_num=flat_num, flat_idx=flat_idx, layout=layout):
            return packed_launch.packed_attention_forward(
                q, k, v, layout, flat_num, flat_idx, block_size=BLOCK, causal=True,
                scale=None, return_lse=False)

        same = (packed()[0] - kernel(qb, kb, vb)[0].permute(0, 2, 1, 3).flatten(0, 1))
        entry["packed_vs_batched_max_abs_diff"] = float(same.abs().max())
        entry["kernel_batched_ms"] = bench(lambda: kernel(qb, kb, vb))
        entry["kernel_strided_view_ms"] = bench(lambda: kernel(*strided))
        entry["kernel_packed_ms"] = bench(packed)
        entry["kernel_overhead"] = entry["kernel_packed_ms"] / entry["kernel_batched_ms"] - 1
        if ORDERS:
            entry["kernel_packed_order_ms"] = launch_orders(q, k, v, ranges,
                                                            [(batch, num, idx)])
        entry["overhead_interleaved"] = {
            "end_to_end": interleaved(
                lambda cfg=cfg: optimized.prism_attention(qb, kb, vb, cfg),
                lambda cfg=cfg: optimized.prism_attention_varlen(q, k, v, cu, cu, n, n, cfg)),
            "attention_launch": interleaved(lambda: kernel(qb, kb, vb), packed)}
        out[name] = entry
        log(f"  8 x 16K {name}: {json.dumps(entry)}")
    return out


#: Where ``to_cache`` puts the pages: "shuffled" (a random permutation of the cache)
#: or "sorted" (each sequence's pages consecutive, in order: what an allocator
#: handing out free pages in order gives a fresh prefill); ``--page-order``.
PAGE_ORDER = "shuffled"


def to_cache(k, v, cu, lengths, page):
    """The packed batch in a cache of ``page``-token pages (lengths % page == 0), placed
    as :data:`PAGE_ORDER` says."""
    pages = [n // page for n in lengths]
    if PAGE_ORDER == "sorted":
        order = torch.arange(sum(pages), device="cuda")
    else:
        order = torch.randperm(sum(pages), device="cuda")
    k_cache = torch.empty(sum(pages), page, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    v_cache = torch.empty_like(k_cache)
    table = torch.zeros(len(lengths), max(pages), dtype=torch.int32, device="cuda")
    used = 0
    for i, (n, a) in enumerate(zip(lengths, cu[:-1].tolist(), strict=True)):
        ids = order[used:used + n // page]
        used += n // page
        table[i, : n // page] = ids.to(torch.int32)
        k_cache[ids] = k[a:a + n].view(n // page, page, KV_HEADS, HEAD_DIM)
        v_cache[ids] = v[a:a + n].view(n // page, page, KV_HEADS, HEAD_DIM)
    return k_cache, v_cache, table, torch.tensor(lengths, dtype=torch.int32)


def relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def paged_time(q, k, v, cu, max_len, lengths, cfg, masks, dense_masks, pages=(16, 64, 256),
               shapes=()):
    """The paged path: in-kernel page reads against the gather path and the varlen call,
    end to end at 64-token pages; attention alone on the same masks at every page size,
    and, for each launch shape ``bm,bn,warps,stages[,tma]`` of ``shapes`` (``--paged-shapes``),
    the sparse in-place launch with that shape (output compared with the default's)."""
    result = {}
    k_cache, v_cache, table, seq_lens = to_cache(k, v, cu, lengths, 64)

    def in_kernel(reads="kernel"):
        paged_kv.PAGED_READS = reads  # "kernel": in place; "auto": the default's choice
        try:
            return optimized.prism_attention_paged(q, k_cache, v_cache, table, seq_lens, cu,
                                                   max_len, cfg)
        finally:
            paged_kv.PAGED_READS = "auto"

    def gathered():
        gk, gv, gcu = gather_paged_kv(k_cache, v_cache, table, seq_lens)
        return optimized.prism_attention_varlen(q, gk, gv, cu, gcu, max_len, max_len, cfg)

    def varlen():
        return optimized.prism_attention_varlen(q, k, v, cu, cu, max_len, max_len, cfg)

    o_ref = varlen()
    e2e = {"page_size": 64,
           "in_kernel_vs_varlen_rel_error": relative(in_kernel(), o_ref),
           "gathered_equals_varlen": bool(torch.equal(gathered(), o_ref))}
    for name, fn in (("in_kernel_ms", in_kernel), ("gathered_ms", gathered),
                     ("auto_ms", lambda: in_kernel("auto")), ("varlen_ms", varlen)):
        e2e[name] = bench(fn)
    e2e["gather_only_ms"] = bench(lambda: gather_paged_kv(k_cache, v_cache, table, seq_lens))
    result["end_to_end_sparse"] = e2e
    log(f"  paged end to end: {json.dumps(e2e)}")
    for page in pages:
        k_cache, v_cache, table, seq_lens = to_cache(k, v, cu, lengths, page)
        for label, mk in (("sparse", masks), ("dense", dense_masks)):
            if label == "dense" and page != 64:
                continue
            entry = {"page_size": page}
            o_paged = paged_kv.block_sparse_attention_paged(
                q, k_cache, v_cache, table, seq_lens, cu, max_len, mk, block_size=BLOCK)
            o_varlen = optimized.block_sparse_attention_varlen(q, k, v, cu, cu, max_len,
                                                               max_len, mk, block_size=BLOCK)
            entry["paged_vs_varlen_rel_error"] = relative(o_paged, o_varlen)
            entry["paged_attention_ms"] = bench(
                lambda mk=mk, kc=k_cache, vc=v_cache, t=table, sl=seq_lens:
                paged_kv.block_sparse_attention_paged(q, kc, vc, t, sl, cu, max_len, mk,
                                                      block_size=BLOCK))
            entry["varlen_attention_ms"] = bench(
                lambda mk=mk: optimized.block_sparse_attention_varlen(
                    q, k, v, cu, cu, max_len, max_len, mk, block_size=BLOCK))
            entry["paged_over_varlen"] = entry["paged_attention_ms"] / entry[
                "varlen_attention_ms"]
            if label == "sparse" and shapes:
                from bench_chunked import paged_shapes  # it imports this module

                entry["shapes"] = paged_shapes(
                    lambda return_mask, mk=mk: (None, mk),
                    lambda m, config=None, kc=k_cache, vc=v_cache, t=table, sl=seq_lens:
                    paged_kv.block_sparse_attention_paged(q, kc, vc, t, sl, cu, max_len, m,
                                                          block_size=BLOCK, config=config),
                    shapes)
            result[f"attention_{label}_page{page}"] = entry
            log(f"  paged attention {label}, page {page}: {json.dumps(entry)}")
    return result


def guarded(result, key, part):
    """Run one optional part; record its error instead of losing the other parts."""
    try:
        result[key] = part()
    except Exception as error:  # a failing part must not cost the rest of the run
        import traceback

        traceback.print_exc()
        result[key] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="skip the remaining optional parts after this many seconds")
    parser.add_argument("--rounds", type=int, default=9,
                        help="rounds of the interleaved overhead measurement")
    parser.add_argument("--paged-shapes", default="",
                        help="in-place paged launch shapes 'bm,bn,warps,stages[,tma];...' to time "
                             "beside the default one on the mixed batch")
    parser.add_argument("--only-paged", action="store_true",
                        help="skip the dense baselines, Prism's varlen entries, Flex and the "
                             "equal-length batch: the paged part only")
    parser.add_argument("--orders", action="store_true",
                        help="also time the packed launch's tile orders")
    parser.add_argument("--page-order", choices=("shuffled", "sorted"), default="shuffled",
                        help="paged part: pages in a random permutation of the cache "
                             "(default) or each sequence's pages consecutive")
    args = parser.parse_args(argv)
    global ROUNDS, ORDERS, PAGE_ORDER
    ROUNDS, ORDERS, PAGE_ORDER = args.rounds, args.orders, args.page_order
    started = time.time()
    lengths = list(LENGTHS)
    max_len = max(lengths)
    result = {"environment": {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "triton": triton.__version__, "commit": args.commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "lengths": lengths, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "block_size": BLOCK, "dtype": str(DTYPE), "page_order": PAGE_ORDER}

    def write():
        result["wall_s"] = time.time() - started
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    q, k, v, cu = packed_batch(lengths)
    shapes = [x for x in args.paged_shapes.split(";") if x]
    if args.only_paged:
        cfg, masks = sparse_config(q, k, cu, max_len, lengths)
        dense_cfg = PrismConfig(block_size=BLOCK, high_threshold=1.0, low_threshold=1.0)
        dense_masks = optimized.select_blocks_varlen(q, k, cu, cu, max_len, max_len, dense_cfg)
        log("paged")
        guarded(result, "paged", lambda: paged_time(
            q, k, v, cu, max_len, lengths, cfg, masks, dense_masks, shapes=shapes))
        write()
        summary(result)
        return result
    qs, ks, vs = views(q, cu), views(k, cu), views(v, cu)
    log("dense baselines")
    result["sdpa_loop_ms"] = sdpa_loop_times(qs, ks, vs)
    log(f"  SDPA per sequence: {result['sdpa_loop_ms']}")
    ms, note = varlen_attn_time(q, k, v, cu, max_len)
    result["varlen_attn_ms"], result["varlen_attn_note"] = ms, note
    log(f"  varlen_attn: {ms} ({note})")
    write()

    log("prism, sparse")
    cfg, masks = sparse_config(q, k, cu, max_len, lengths)
    guarded(result, "prism_sparse",
            lambda: prism_entry(q, k, v, cu, max_len, lengths, cfg, masks, qs, ks, vs))
    log(f"  {result['prism_sparse']}")
    write()
    log("prism, threshold 1.0")
    dense_cfg = PrismConfig(block_size=BLOCK, high_threshold=1.0, low_threshold=1.0)
    dense_masks = optimized.select_blocks_varlen(q, k, cu, cu, max_len, max_len, dense_cfg)
    guarded(result, "prism_dense", lambda: prism_entry(q, k, v, cu, max_len, lengths,
                                                       dense_cfg, dense_masks, qs, ks, vs))
    log(f"  {result['prism_dense']}")
    qs = ks = vs = None  # free the contiguous copies
    write()
    if not args.no_flex:
        log("flex, document mask")
        result["flex_document_ms"], result["flex_compile_s"] = flex_time(q, k, v, lengths)
        log(f"  {result['flex_document_ms']} ms (compile {result['flex_compile_s']} s)")
        write()

    if time.time() - started < args.budget_s:
        log("equal lengths, one dense batch")
        guarded(result, "equal_length_8x16k", lambda: equal_length_overhead(cfg))
        write()
    if time.time() - started < args.budget_s:
        log("paged")
        guarded(result, "paged", lambda: paged_time(
            q, k, v, cu, max_len, lengths, cfg, masks, dense_masks, shapes=shapes))
        write()

    dense = [t for t in (result["sdpa_loop_ms"].get("cudnn"), result["sdpa_loop_ms"].get("flash"),
                         result.get("varlen_attn_ms")) if t]
    best = min(dense) if dense else None
    if best and "varlen_ms" in result["prism_sparse"] and "varlen_ms" in result["prism_dense"]:
        result["ratios"] = {
            "best_dense_ms": best,
            "speedup_sparse_vs_best_dense": best / result["prism_sparse"]["varlen_ms"],
            "dense_prism_over_best_dense": result["prism_dense"]["varlen_ms"] / best,
        }
        if result.get("flex_document_ms"):
            result["ratios"]["speedup_sparse_vs_flex"] = (
                result["flex_document_ms"] / result["prism_sparse"]["varlen_ms"])
        log(json.dumps(result["ratios"]))
    write()
    summary(result)
    return result


def summary(result):
    """The numbers the issue's targets read, last in the output."""
    log("summary")
    for name, entry in result.get("equal_length_8x16k", {}).items():
        if not isinstance(entry, dict):
            continue
        for part, inter in entry.get("overhead_interleaved", {}).items():
            log(f"  8x16K {name} {part}: overhead median {inter['overhead_median']:+.4f} "
                f"[{inter['overhead_min']:+.4f}, {inter['overhead_max']:+.4f}] over "
                f"{inter['rounds']} rounds; batched {inter['batched_ms_median']:.3f} ms "
                f"(spread {inter['batched_ms_spread']:.3f}), packed "
                f"{inter['packed_ms_median']:.3f} ms (spread {inter['packed_ms_spread']:.3f})")
    for name, entry in result.get("paged", {}).items():
        log(f"  paged {name}: {json.dumps(entry)}")


if __name__ == "__main__":
    main()
