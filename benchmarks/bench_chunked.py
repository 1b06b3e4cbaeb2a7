"""Chunked prefill over a paged cache: a chunk's call with and without the kernel-fed cache
(docs/serving.rst, prism.optimized.chunked).

One sequence of ``--prefix`` cached tokens (default 32K) plus a chunk of
``--chunk`` new queries (default 4K), 32 query heads, 8 KV heads, head_dim 128,
bf16, tile 128, 64-token shuffled pages, the structured inputs of
``bench_varlen.py``. A :class:`~prism.reference.PooledKeyCache` holds the
prefix's tiles; every timed call first truncates it back to them (a host
assignment), so each call pools and selects the same chunk. Medians of
CUDA-event timed calls (``bench_prism.bench``).

Timed, in one process:

* ``prism_attention_paged`` with the cache: the selection kernel fed from the
  cache (this tree), and the previous path: the same call through
  :func:`prism.reference.paged.run_paged_prism` with the optimized hooks
  except ``select_cached`` and ``run_paged_packed`` (K and V gathered, the
  reference's torch stages after key pooling, the packed attention launch);
* selection alone: ``select_blocks_paged`` with the cache both ways, and the
  uncached kernel selection of the same chunk over all keys (contiguous);
* the chunk without a cache: ``select_blocks_paged`` pooling the keys through
  the block table against the previous path (keys gathered, then the same
  kernels), and ``prism_attention_paged`` with ``PAGED_READS`` ``"kernel"``
  (pages read in place by pooling and attention) against ``"auto"``;
* where the cached selection's time goes: wall time per call and the torch
  profiler's operators by host time (``select_cached_kernel_host``);
* the page gather of ``bench_varlen.py``'s 128K batch (K and V, 64-token
  pages) against its implementation before ``370b7d1``;
* dense baselines on the same chunk (queries bottom-right aligned on the
  prefix + chunk keys): flash varlen (``torch.nn.attention.varlen.varlen_attn``,
  causal), SDPA with ``causal_lower_right`` (whichever backend torch picks),
  and cuDNN SDPA without a mask (non-causal: ``(P + C) / (P + C / 2)`` times
  the causal chunk's work, 1.06x at 32K + 4K).

Usage (on the GPU machine, from the repository root)::

    python benchmarks/bench_chunked.py --out results.json --commit abc1234

``--preset accurate`` times only one chunk's ``prism_attention_paged`` and
``select_blocks_paged`` with that preset, with the prefix's tiles in a cache and
without one, beside the paper's default both ways and the dense baselines.

``--crossover 0:32768,32768:4096,...`` times only ``prism_attention_paged``
reading the pages in place against gathering them, per ``prefix:chunk`` (no
pooled cache): where ``PAGED_READS = "auto"`` should switch.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import sys
import time
import types

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_varlen import (  # noqa: E402
    BLOCK,
    HEADS,
    KV_HEADS,
    LENGTHS,
    bench,
    log,
    packed_batch,
    structured,
    to_cache,
)

from prism import optimized  # noqa: E402
from prism.optimized import varlen as packed  # noqa: E402
from prism.reference import PooledKeyCache, PrismConfig, mask_differences  # noqa: E402
from prism.reference import paged as reference_paged  # noqa: E402


def previous_impl():
    """The optimized hooks without the kernel-fed cache: the path before it."""
    hooks = vars(packed._impl()).copy()
    del hooks["select_cached"], hooks["run_paged_packed"], hooks["select_paged"]
    return types.SimpleNamespace(**hooks)


def dense_times(q, k, v, prefix, chunk):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    group = HEADS // KV_HEADS
    q4 = q.transpose(0, 1)[None]
    k4 = k.transpose(0, 1)[None].repeat_interleave(group, dim=1)
    v4 = v.transpose(0, 1)[None].repeat_interleave(group, dim=1)
    times = {}
    try:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        kwargs = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        cu_q = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, prefix + chunk], dtype=torch.int32, device="cuda")
        kx, vx = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        times["flash_varlen_causal_ms"] = bench(
            lambda: varlen_attn(q, kx, vx, cu_q, cu_k, chunk, prefix + chunk, **kwargs))
    except Exception as error:  # not in this torch, or another signature
        times["flash_varlen_causal_ms"] = f"{type(error).__name__}: {str(error)[:200]}"
    bias = causal_lower_right(chunk, prefix + chunk)
    times["sdpa_causal_lower_right_ms"] = bench(lambda: sdpa(q4, k4, v4, attn_mask=bias))
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            times["cudnn_noncausal_ms"] = bench(lambda: sdpa(q4, k4, v4))
    except RuntimeError as error:
        times["cudnn_noncausal_ms"] = f"unavailable: {str(error)[:200]}"
    return times


def paged_reads(q, k_cache, v_cache, table, lens, cu_q, chunk, cfg):
    """The chunk without a cache: selection pooling the keys through the block table
    against the previous path (its keys gathered, then the contiguous kernels), and
    prism_attention_paged reading the pages in place against "auto" (gathered here)."""
    from prism.optimized import paged_kv

    hooks = vars(packed._impl()).copy()
    del hooks["select_paged"]
    gathered = types.SimpleNamespace(**hooks)
    new = optimized.select_blocks_paged(q, k_cache, table, lens, cu_q, chunk, cfg)
    old = reference_paged.run_paged_select(gathered, q, k_cache, table, lens, cu_q, chunk,
                                           cfg, True, None, {})
    out = {"select_masks_equal": bool(torch.equal(new[0].as_subclass(torch.Tensor),
                                                  old[0].as_subclass(torch.Tensor)))}
    out["select_paged_pooling_ms"] = bench(lambda: optimized.select_blocks_paged(
        q, k_cache, table, lens, cu_q, chunk, cfg))
    out["select_gathered_keys_ms"] = bench(lambda: reference_paged.run_paged_select(
        gathered, q, k_cache, table, lens, cu_q, chunk, cfg, True, None, {}))
    log(f"  paged reads, selection: {json.dumps(out)}")
    for reads in ("kernel", "auto"):
        paged_kv.PAGED_READS = reads
        try:
            out[f"prism_paged_{reads}_ms"] = bench(lambda: optimized.prism_attention_paged(
                q, k_cache, v_cache, table, lens, cu_q, chunk, cfg))
        finally:
            paged_kv.PAGED_READS = "auto"
    log(f"  paged reads: {json.dumps(out)}")
    return out


def paged_shapes(call, paged_call, shapes):
    """The in-place launch alone (``block_sparse_attention_paged`` on the masks of
    ``call``) with each launch shape ``bm,bn,warps,stages[,tma]`` of ``shapes`` against
    the default one; each output is compared with the default's."""
    from prism.optimized import paged_kv
    from prism.optimized.attention import AttentionConfig

    paged_kv.PAGED_READS = "kernel"
    try:
        _, masks = call(return_mask=True)
    finally:
        paged_kv.PAGED_READS = "auto"
    base = paged_call(masks).float()
    rows = [{"shape": "default", "ms": bench(lambda: paged_call(masks))}]
    for spec in shapes:
        fields = spec.split(",")
        bm, bn, warps, stages = (int(x) for x in fields[:4])
        # A fifth field "tma": descriptors where the pages hold whole key blocks.
        config = AttentionConfig(bm, bn, warps, stages, use_tma=fields[4:] == ["tma"])
        row = {"shape": spec}
        try:
            out = paged_call(masks, config=config).float()
            row["rel_diff_to_default"] = float((out - base).norm() / base.norm())
            row["ms"] = bench(lambda c=config: paged_call(masks, config=c))
            row["default_over_shape"] = rows[0]["ms"] / row["ms"]
        except Exception as error:  # noqa: BLE001 - record the failure, go on
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)
    return rows


def crossover(pairs, threshold, shapes=(), page=64):
    """``prism_attention_paged`` reading the pages in place ("kernel") against gathering
    them ("gather"), with no pooled cache, for each ``(prefix, chunk)``: one sequence,
    the chunk's queries over prefix + chunk keys, ``page``-token shuffled pages. With
    ``shapes``, also the in-place launch alone per launch shape (:func:`paged_shapes`)."""
    from prism.optimized import paged_kv

    cfg = PrismConfig(block_size=BLOCK, high_threshold=threshold, low_threshold=threshold)
    rows = []
    for prefix, chunk in pairs:
        total = prefix + chunk
        q_all, k, v = structured(total, seed=0)
        q = q_all[prefix:].contiguous()
        k_cache, v_cache, table, _ = to_cache(k, v, torch.tensor([0, total]), [total], page)
        cu_q = torch.tensor([0, chunk], dtype=torch.int32)
        lens = torch.tensor([total], dtype=torch.int32)
        call = functools.partial(optimized.prism_attention_paged, q, k_cache, v_cache, table,
                                 lens, cu_q, chunk, cfg)
        row = {"prefix": prefix, "chunk": chunk}
        outputs = {}
        for reads in ("kernel", "gather"):
            paged_kv.PAGED_READS = reads
            try:
                outputs[reads] = call().float()
                row[f"{reads}_ms"] = bench(call)
            finally:
                paged_kv.PAGED_READS = "auto"
        row["gather_over_kernel"] = row["gather_ms"] / row["kernel_ms"]
        row["output_rel_diff"] = float((outputs["kernel"] - outputs["gather"]).norm()
                                       / outputs["gather"].norm())
        if shapes:
            attend = functools.partial(paged_kv.block_sparse_attention_paged, q, k_cache,
                                       v_cache, table, lens, cu_q, chunk, block_size=BLOCK)
            row["paged_shapes"] = paged_shapes(call, attend, shapes)
        log(f"  crossover: {json.dumps(row)}")
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def previous_gather(cache, block_table, starts, ends):
    """gather_tokens as it was before 370b7d1: the index built on the device (its
    repeat_interleave waits for the device), then advanced indexing."""
    page_size, device = cache.shape[1], cache.device
    counts = [e - s for s, e in zip(starts, ends, strict=True)]
    seq = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                  torch.tensor(counts, device=device))
    offsets = torch.tensor([0] + counts[:-1], device=device).cumsum(0)
    position = (torch.arange(sum(counts), device=device) - offsets[seq]
                + torch.tensor(starts, device=device)[seq])
    pages = block_table[seq, position // page_size].long()
    return cache[pages, position % page_size]


def gather_times():
    """K and V of bench_varlen's 128K batch gathered from 64-token pages, both ways."""
    q, k, v, cu = packed_batch(LENGTHS)
    k_cache, v_cache, table, _ = to_cache(k, v, cu, LENGTHS, 64)
    zeros, lengths = [0] * len(LENGTHS), list(LENGTHS)
    new = reference_paged.gather_tokens(k_cache, table, zeros, lengths)
    out = {"equal": bool(torch.equal(new, previous_gather(k_cache, table, zeros, lengths)))
           and bool(torch.equal(new, k))}
    for name, fn in (("gather_kv_ms", reference_paged.gather_tokens),
                     ("previous_gather_kv_ms", previous_gather)):
        out[name] = bench(lambda fn=fn: (fn(k_cache, table, zeros, lengths),
                                         fn(v_cache, table, zeros, lengths)))
    log(f"  gather: {json.dumps(out)}")
    return out


def host_breakdown(fn, calls=20):
    """Wall ms per call (host and device, synchronised once) and the torch profiler's
    top operators by host time, per call."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / calls * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return {"wall_ms_per_call": wall_ms, "top_ops_per_call": {
        e.key: {"count": e.count / calls, "self_cpu_us": e.self_cpu_time_total / calls,
                "device_us": getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
                / calls} for e in events}}


def filled_cache(q_all, k_cache, table, prefix: int, cfg) -> PooledKeyCache:
    """A cache holding the prefix's tiles (filled by a prefix-only select call)."""
    cache = PooledKeyCache(BLOCK)
    optimized.select_blocks_paged(q_all[prefix - 1:prefix], k_cache, table,
                                  torch.tensor([prefix], dtype=torch.int32),
                                  torch.tensor([0, 1], dtype=torch.int32), 1, cfg,
                                  pooled_keys=[cache])
    return cache


def preset_times(preset: str, prefix: int, chunk: int) -> dict:
    """``--preset``: one chunk's calls with that preset, with the prefix's tiles in a cache
    and without one, beside Prism's default with a cache and dense attention."""
    total = prefix + chunk
    q_all, k, v = structured(total, seed=0)
    q = q_all[prefix:].contiguous()
    k_cache, v_cache, table, _ = to_cache(k, v, torch.tensor([0, total]), [total], 64)
    cu_q = torch.tensor([0, chunk], dtype=torch.int32)
    lens = torch.tensor([total], dtype=torch.int32)
    out = {"preset": preset, "times": {}}
    for name, cfg in ((preset, PrismConfig.preset(preset, block_size=BLOCK)),
                      ("paper", PrismConfig(block_size=BLOCK))):
        cache = filled_cache(q_all, k_cache, table, prefix, cfg)
        stored = cache.num_tiles

        def call(fn, cached, cfg=cfg, cache=cache, stored=stored):
            cache.truncate(stored)
            extra = (v_cache,) if fn is optimized.prism_attention_paged else ()
            return fn(q, k_cache, *extra, table, lens, cu_q, chunk, cfg,
                      pooled_keys=[cache] if cached else None)

        cached_mask = call(optimized.select_blocks_paged, True)[0].as_subclass(torch.Tensor)
        plain_mask = call(optimized.select_blocks_paged, False)[0].as_subclass(torch.Tensor)
        out[f"{name}_tile_density"] = float(cached_mask.float().mean())
        out[f"{name}_cached_mask_entries_differing_from_uncached"] = int(
            mask_differences(cached_mask, plain_mask).shape[0])
        for fn, label in ((optimized.prism_attention_paged, "prism_attention_paged"),
                          (optimized.select_blocks_paged, "select_blocks_paged")):
            for cached in (True, False):
                key = f"{name}_{label}_{'cached' if cached else 'no_cache'}_ms"
                out["times"][key] = bench(functools.partial(call, fn, cached))
                log(f"  {key}: {out['times'][key]:.3f}")
    out["times"].update(dense_times(q, k, v, prefix, chunk))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--prefix", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--crossover", default="",
                        help="only time in-place against gathered page reads for these "
                             "prefix:chunk pairs (comma-separated), e.g. 0:32768,32768:4096")
    parser.add_argument("--paged-shapes", default="",
                        help="with --crossover: also time the in-place launch alone with "
                             "these launch shapes bm,bn,warps,stages[,tma] separated by ';'")
    parser.add_argument("--page", type=int, default=64,
                        help="with --crossover: tokens per cache page (16-256)")
    parser.add_argument("--preset", default="",
                        help="only time one chunk with this preset (e.g. accurate), with and "
                             "without the pooled-key cache, beside the paper's default")
    args = parser.parse_args(argv)
    if args.preset:
        result = {"commit": args.commit, "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "shape": {"prefix": args.prefix, "chunk": args.chunk, "heads": HEADS,
                            "kv_heads": KV_HEADS, "block_size": BLOCK, "page_size": 64},
                  **preset_times(args.preset, args.prefix, args.chunk)}
        log(json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    if args.crossover:
        pairs = [tuple(int(x) for x in pair.split(":")) for pair in args.crossover.split(",")]
        result = {"commit": args.commit, "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "threshold": args.threshold,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "block_size": BLOCK,
                            "page_size": args.page},
                  "crossover": crossover(pairs, args.threshold,
                                         [x for x in args.paged_shapes.split(";") if x],
                                         args.page)}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    prefix, chunk = args.prefix, args.chunk
    total = prefix + chunk
    q_all, k, v = structured(total, seed=0)
    q = q_all[prefix:].contiguous()
    k_cache, v_cache, table, seq_lens = to_cache(k, v, torch.tensor([0, total]), [total], 64)
    cfg = PrismConfig(block_size=BLOCK, high_threshold=args.threshold,
                      low_threshold=args.threshold)
    cu_q = torch.tensor([0, chunk], dtype=torch.int32)
    lens = torch.tensor([total], dtype=torch.int32)
    cache = filled_cache(q_all, k_cache, table, prefix, cfg)
    stored = cache.num_tiles
    old = previous_impl()

    def attend(impl=None):
        cache.truncate(stored)
        if impl is None:
            return optimized.prism_attention_paged(q, k_cache, v_cache, table, lens, cu_q, chunk,
                                                   cfg, return_mask=True, pooled_keys=[cache])
        return reference_paged.run_paged_prism(
            impl, q, k_cache, v_cache, table, lens, cu_q, chunk, cfg, causal=True, scale=None,
            return_lse=False, return_mask=True, pooled_keys=[cache], overrides={})

    def select(impl=None):
        cache.truncate(stored)
        if impl is None:
            return optimized.select_blocks_paged(q, k_cache, table, lens, cu_q, chunk, cfg,
                                                 pooled_keys=[cache])
        return reference_paged.run_paged_select(impl, q, k_cache, table, lens, cu_q, chunk,
                                                cfg, True, [cache], {})

    q4, k4 = q.transpose(0, 1)[None], k.transpose(0, 1)[None]
    new_o, new_masks = attend()
    old_o, old_masks = attend(old)
    uncached = optimized.select_blocks(q4, k4, cfg)
    new_mask = new_masks[0].as_subclass(torch.Tensor)
    result = {
        "commit": args.commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "shape": {"prefix": prefix, "chunk": chunk, "heads": HEADS, "kv_heads": KV_HEADS,
                  "head_dim": q.shape[2], "dtype": str(q.dtype), "block_size": BLOCK,
                  "page_size": 64, "threshold": args.threshold, "stored_tiles": stored},
        "mask_equals_uncached_kernel": bool(torch.equal(new_mask, uncached.as_subclass(
            torch.Tensor))),
        "mask_entries_differing_from_previous_path": int(mask_differences(
            new_mask, old_masks[0].as_subclass(torch.Tensor)).shape[0]),
        "tile_density": float(new_mask.float().mean()),
        "output_rel_diff_vs_previous_path": float(
            (new_o.float() - old_o.float()).norm() / old_o.float().norm()),
    }
    log(json.dumps(result))
    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    times = result["times"] = {}
    for name, fn in (("prism_paged_cached_kernel_ms", attend),
                     ("prism_paged_cached_previous_ms", lambda: attend(old)),
                     ("select_cached_kernel_ms", select),
                     ("select_cached_previous_ms", lambda: select(old)),
                     ("select_uncached_kernel_contiguous_ms",
                      lambda: optimized.select_blocks(q4, k4, cfg))):
        times[name] = bench(fn)
        log(f"  {name}: {times[name]:.3f}")
    save()
    result["paged_reads"] = paged_reads(q, k_cache, v_cache, table, lens, cu_q, chunk, cfg)
    save()
    result["select_cached_kernel_host"] = host_breakdown(select)
    save()
    result["gather_128k_batch"] = gather_times()
    save()
    times.update(dense_times(q, k, v, prefix, chunk))
    log(json.dumps(times))
    save()


if __name__ == "__main__":
    main()
