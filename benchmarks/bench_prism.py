"""Prism's GPU benchmark: selection, block-sparse attention, end to end, memory, peers.

Shapes are the paper's efficiency setting: one Llama-3.1-8B layer, batch 1,
32 query heads, 8 KV heads, head_dim 128, bf16, tile 128, causal. Every time
is the median of ``triton.testing.do_bench``; every ratio compares numbers
measured in the same run.

Usage (on the GPU machine, from the repository root)::

    python benchmarks/bench_prism.py --mode quick            # < 2 minutes, prints ratios
    python benchmarks/bench_prism.py --mode full --out benchmarks/results/full.json
    python benchmarks/bench_prism.py --mode tune             # attention launch shapes
    python benchmarks/bench_prism.py --mode diagnose         # stage and variant timings
    python benchmarks/bench_prism.py --mode selection --baseline OLD.py  # bench_selection.py

What is measured, per sequence length N:

(a) selection: pooling + scoring + top-p + mask + compact indices (what
    ``prism_attention`` runs), and ``select_blocks`` (mask only);
(b) block-sparse attention on random causal tile masks of density 1.0, 0.3,
    0.15, 0.05 (sink and diagonal kept), kernel alone (precomputed indices)
    and the public ``block_sparse_attention``; and on the mask Prism selects
    for structured inputs;
(c) end-to-end ``prism_attention`` against dense causal SDPA (cuDNN and flash
    backends, K/V pre-expanded to 32 heads outside the timing), with TFLOP/s
    counted on the (query, key) pairs the mask lets through;
(c') the same masks through compiled FlexAttention (``BlockMask.from_kv_blocks``,
    off-diagonal tiles full, the diagonal tile token-causal);
(d) peak extra memory of selection, against the size of the fp32
    (B, H, 2*nq, nk) probability tensor the paper's code materialises.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch
import triton
from triton.testing import do_bench

from prism import optimized
from prism.optimized.api import _select
from prism.optimized.attention import (
    AttentionConfig,
    default_config,
    fallback_config,
    sparse_attention_forward,
)
from prism.optimized.indices import mask_rows_to_indices
from prism.reference import apply_rope, band_sizes, resolve_config, tile_layout

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 128
DTYPE = torch.bfloat16
DENSITIES = (1.0, 0.3, 0.15, 0.05)


def log(*parts):
    print(*parts, flush=True)


MIN_SAMPLES = 5


def warm_call_ms(fn) -> float:
    """Milliseconds of one call of ``fn`` after a first (warm-up) call, by CUDA events."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def bench(fn, rep=100):
    """Median milliseconds of ``fn`` (do_bench, events, warm-up included).

    ``do_bench`` repeats ``fn`` for about ``rep`` ms, which is a single sample
    for a 280 ms call; the budget is raised so that every median comes from at
    least ``MIN_SAMPLES`` timed calls after at least two warm-up calls.
    """
    once = warm_call_ms(fn)
    return float(do_bench(fn, warmup=max(25, 2 * once), rep=max(rep, MIN_SAMPLES * once),
                          return_mode="median"))


def ceilings():
    """bf16 matmul TFLOP/s (8192^3, random data) and device copy TB/s (read + write)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    mm_ms = bench(lambda: a @ b)
    src = torch.randn(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    return {"matmul_bf16_tflops": 2 * 8192**3 / mm_ms / 1e9,
            "copy_tb_s": 2 * src.numel() * 4 / copy_ms / 1e9}


def random_inputs(n, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    v = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    return q, k, v


def structured_inputs(n, seed=1, base=500000.0, sharpness=2.0, heads=HEADS,
                      kv_heads=KV_HEADS, head_dim=HEAD_DIM):
    """RoPE'd queries and keys that share a per-head direction, so that scores
    carry relative-position structure (local and long-range bands) like a real
    layer; v is random. ``heads`` / ``kv_heads``: query and KV heads (each query
    head shares its KV head's direction); ``head_dim``: D (even)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    topic = torch.randn(1, kv_heads, 1, head_dim, device="cuda", generator=gen)
    k = torch.randn(1, kv_heads, n, head_dim, device="cuda", generator=gen) + 1.5 * topic
    q = (torch.randn(1, heads, n, head_dim, device="cuda", generator=gen)
         + 1.5 * topic.repeat_interleave(heads // kv_heads, dim=1)) * sharpness
    q = apply_rope(q, base).to(DTYPE)
    k = apply_rope(k, base).to(DTYPE)
    v = torch.randn(1, kv_heads, n, head_dim, device="cuda", generator=gen).to(DTYPE)
    return q, k, v


def random_causal_mask(n_tiles, density, seed):
    """(1, H, nt, nt) causal tile mask keeping each admissible tile with
    probability ``density``, plus the sink and the diagonal."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(1, HEADS, n_tiles, n_tiles, device="cuda", generator=gen) < density
    mask &= torch.ones(n_tiles, n_tiles, dtype=torch.bool, device="cuda").tril()
    mask[..., 0] = True
    mask |= torch.eye(n_tiles, dtype=torch.bool, device="cuda")
    return mask


def causal_density(mask):
    nt = mask.shape[-1]
    return float(mask.sum()) / (mask.shape[0] * mask.shape[1] * nt * (nt + 1) / 2)


def computed_pairs(mask, block):
    """(query, key) token pairs a causal tile mask lets through (N a multiple of block)."""
    diagonal = mask.diagonal(dim1=-2, dim2=-1).sum()
    return float((mask.sum() - diagonal) * block * block + diagonal * block * (block + 1) / 2)


def attention_flops(pairs):
    """Two matmuls of 2*D FLOPs per (query, key) pair."""
    return 4.0 * HEAD_DIM * pairs


def sdpa_times(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    group = HEADS // KV_HEADS
    k_full = k.repeat_interleave(group, dim=1)
    v_full = v.repeat_interleave(group, dim=1)
    times = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                sdpa(q, k_full, v_full, is_causal=True)
                times[name] = bench(lambda backend=backend: _sdpa_with(backend, q, k_full,
                                                                        v_full))
        except RuntimeError as error:
            times[name] = None
            log(f"  SDPA {name} unavailable: {error}")
    return times


def _sdpa_with(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    with sdpa_kernel([backend]):
        return sdpa(q, k, v, is_causal=True)


class Flex:
    """Compiled FlexAttention on a Prism tile mask, built once per mask."""

    def __init__(self):
        from torch.nn.attention.flex_attention import flex_attention

        self.attend = torch.compile(flex_attention)

    @staticmethod
    def block_mask(mask, n):
        from torch.nn.attention.flex_attention import BlockMask

        nt = mask.shape[-1]
        eye = torch.eye(nt, dtype=torch.bool, device=mask.device)
        full = mask & ~eye
        partial = mask & eye
        full_num, full_idx = mask_rows_to_indices(full)
        part_num, part_idx = mask_rows_to_indices(partial)

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx,
                                        BLOCK_SIZE=BLOCK, mask_mod=causal, seq_lengths=(n, n))

    def time(self, q, k, v, mask, n):
        """Median ms, or None (with the reason logged) if FlexAttention fails here."""
        try:
            bm = self.block_mask(mask, n)
            self.attend(q, k, v, block_mask=bm, enable_gqa=True)
            return bench(lambda: self.attend(q, k, v, block_mask=bm, enable_gqa=True))
        except Exception as error:  # a torch build without a working flex_attention
            log(f"  FlexAttention failed: {type(error).__name__}: {str(error)[:200]}")
            return None


def selection_memory(q, k, cfg):
    """Peak bytes allocated by selection above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mask, num, idx, _ = _select(q, k, cfg, True, write_indices=True)
    torch.cuda.synchronize()
    peak_with_indices = torch.cuda.max_memory_allocated() - base
    outputs = mask.numel() + num.numel() * 4 + idx.numel() * 4
    del mask, num, idx
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mask = optimized.select_blocks(q, k, cfg)
    torch.cuda.synchronize()
    peak_mask_only = torch.cuda.max_memory_allocated() - base
    nt = mask.shape[-1]
    return {
        "peak_extra_mb_mask_and_indices": peak_with_indices / 2**20,
        "peak_extra_mb_excluding_outputs": (peak_with_indices - outputs) / 2**20,
        "peak_extra_mb_select_blocks": peak_mask_only / 2**20,
        "mask_mb": mask.numel() / 2**20,
        "indices_mb": 4 * mask.numel() / 2**20,
        "probability_tensor_mb": HEADS * 2 * nt * nt * 4 / 2**20,
    }


def run_length(n, densities, flex, seed=0):
    """Every measurement at one sequence length (random inputs, then structured ones)."""
    row = {"tokens": n}
    cfg = resolve_config(None, block_size=BLOCK)
    _random_input_part(row, n, densities, flex, cfg, seed)
    torch.cuda.empty_cache()
    _structured_part(row, n, flex, cfg)
    torch.cuda.empty_cache()
    return row


def _random_input_part(row, n, densities, flex, cfg, seed):
    nt = n // BLOCK
    q, k, v = random_inputs(n, seed)

    # (a) selection.
    row["select_ms"] = bench(lambda: _select(q, k, cfg, True, write_indices=True))
    row["select_blocks_ms"] = bench(lambda: optimized.select_blocks(q, k, cfg))
    row["memory"] = selection_memory(q, k, cfg)

    # (c) dense baselines.
    sdpa = sdpa_times(q, k, v)
    row["sdpa_ms"] = sdpa
    row["sdpa_best_ms"] = min(t for t in sdpa.values() if t is not None)
    dense_flops = attention_flops(HEADS * n * (n + 1) / 2)
    row["sdpa_cudnn_tflops"] = (dense_flops / sdpa["cudnn"] / 1e9) if sdpa.get("cudnn") else None

    # (b) fixed densities; (c') FlexAttention on the same masks.
    row["sparse"] = []
    for density in densities:
        mask = random_causal_mask(nt, density, seed=int(density * 1000) + n)
        num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)
        entry = {"density_target": density, "density": causal_density(mask)}
        entry["kernel_ms"] = bench(lambda num=num, idx=idx: sparse_attention_forward(
            q, k, v, num, idx, block_size=BLOCK, causal=True, scale=None, return_lse=False,
            first_query_tile=0, query_start=0, interpreted=False))
        entry["public_ms"] = bench(lambda mask=mask: optimized.block_sparse_attention(
            q, k, v, mask, block_size=BLOCK))
        entry["tflops"] = attention_flops(computed_pairs(mask, BLOCK)) / entry["kernel_ms"] / 1e9
        if sdpa.get("cudnn"):
            entry["kernel_vs_cudnn"] = entry["kernel_ms"] / sdpa["cudnn"]
        if flex is not None and (flex_ms := flex.time(q, k, v, mask, n)) is not None:
            entry["flex_ms"] = flex_ms
            entry["flex_over_kernel"] = flex_ms / entry["kernel_ms"]
        row["sparse"].append(entry)
        log(f"  N={n} density {density}: kernel {entry['kernel_ms']:.3f} ms "
            f"({entry['tflops']:.0f} TFLOP/s), public {entry['public_ms']:.3f} ms"
            + (f", flex {entry['flex_ms']:.3f} ms" if "flex_ms" in entry else ""))


def structured_near_density(n, cfg, target=0.15):
    """Structured inputs and a top-p threshold whose Prism mask has causal density
    closest to ``target``: the sharpness of the queries is picked from a few
    values, then the threshold (both bands) from 0.9-0.99."""
    best = None
    for sharpness in (0.3, 0.5, 0.75, 1.0):
        q, k, v = structured_inputs(n, sharpness=sharpness)
        for p in (0.9, 0.95, 0.97, 0.99):
            trial = resolve_config(cfg, high_threshold=p, low_threshold=p)
            density = causal_density(optimized.select_blocks(q, k, trial))
            if best is None or abs(density - target) < abs(best[0] - target):
                best = (density, sharpness, trial)
        del q, k, v
    return best[1], best[2], structured_inputs(n, sharpness=best[1])


def _structured_part(row, n, flex, cfg):
    """(b, c) Prism on structured inputs: its own mask, and end to end."""
    sharpness, cfg, (q, k, v) = structured_near_density(n, cfg)
    mask, num, idx, layout = _select(q, k, cfg, True, write_indices=True)
    prism = {"density": causal_density(mask), "sharpness": sharpness,
             "threshold": cfg.high_threshold}
    prism["select_ms"] = bench(lambda: _select(q, k, cfg, True, write_indices=True))
    prism["kernel_ms"] = bench(lambda: sparse_attention_forward(
        q, k, v, num, idx, block_size=BLOCK, causal=True, scale=None, return_lse=False,
        first_query_tile=layout.first_query_tile, query_start=0, interpreted=False))
    prism["end_to_end_ms"] = bench(lambda: optimized.prism_attention(q, k, v, cfg))
    prism["tflops_attention"] = (attention_flops(computed_pairs(mask, BLOCK))
                                 / prism["kernel_ms"] / 1e9)
    cudnn = row["sdpa_ms"].get("cudnn")
    if cudnn:
        prism["cudnn_over_end_to_end"] = cudnn / prism["end_to_end_ms"]
    if flex is not None:
        prism["flex_ms"] = flex.time(q, k, v, mask, n)
    row["prism_structured"] = prism
    log(f"  N={n} prism (structured): density {prism['density']:.3f}, select "
        f"{prism['select_ms']:.3f} ms, attention {prism['kernel_ms']:.3f} ms, end to end "
        f"{prism['end_to_end_ms']:.3f} ms, cuDNN dense {cudnn} ms")


def tune(n=32768):
    """Time attention launch shapes at one length, densities 1.0 and 0.15."""
    q, k, v = random_inputs(n)
    nt = n // BLOCK
    results = []
    shapes = [AttentionConfig(m, bn, w, s)
              for m, bn, w in ((128, 64, 8), (128, 128, 8), (64, 64, 4), (128, 32, 4),
                               (64, 128, 4))
              for s in (2, 3, 4)]
    for density in (1.0, 0.15):
        mask = random_causal_mask(nt, density, seed=7)
        num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)
        for shape in shapes:
            try:
                ms = bench(lambda shape=shape, num=num, idx=idx: sparse_attention_forward(
                    q, k, v, num, idx, block_size=BLOCK, causal=True, scale=None,
                    return_lse=False, first_query_tile=0, query_start=0, interpreted=False,
                    config=shape), rep=50)
            except Exception as error:  # a shape that does not compile or fit
                log(f"  {shape}: failed ({type(error).__name__}: {str(error)[:80]})")
                continue
            results.append({"density": density, **shape.__dict__, "ms": ms})
            log(f"  density {density} {shape}: {ms:.3f} ms")
    return results


def diagnose(parts=("pooling", "selection", "attention")):
    """Where selection and attention spend their time: stage and variant timings at 128K."""
    from prism.optimized.pooling import pool_tiles_and_energy
    from prism.optimized.selection import SelectionTuning, select_tiles

    out = {"pooling": [], "selection": [], "attention": []}
    n = 131072
    q, k, v = random_inputs(n)
    cfg = resolve_config(None, block_size=BLOCK)
    layout = tile_layout(n, n, BLOCK, True)
    high_dim, low_dim = band_sizes(HEAD_DIM, cfg.high_dim, cfg.low_dim)  # the default 64, 96
    read_bytes = (q.numel() + k.numel()) * q.element_size()
    pooling_shapes = ((32, 2), (64, 4), (16, 2), (64, 2), (32, 1), (16, 1))
    for rows_per_load, warps in pooling_shapes if "pooling" in parts else ():
        ms = bench(lambda r=rows_per_load, w=warps: pool_tiles_and_energy(
            q, k, layout, high_dim, low_dim, "half", rows_per_load=r, num_warps=w))
        out["pooling"].append({"rows_per_load": rows_per_load, "num_warps": warps, "ms": ms,
                               "read_tb_s": read_bytes / ms / 1e9})
        log(f"  pooling 128K rows/load {rows_per_load}, {warps} warps: {ms:.3f} ms "
            f"({read_bytes / ms / 1e9:.2f} TB/s read)")
    variants = [("default", SelectionTuning(), True, True),
                ("mask only", SelectionTuning(), True, False),
                ("indices only", SelectionTuning(), False, True),
                ("no early exit", SelectionTuning(early_exit=False), True, True),
                ("one stream", SelectionTuning(overlap=False), True, True),
                ("16 per thread", SelectionTuning(elements_per_thread=16), True, True),
                ("64 per thread", SelectionTuning(elements_per_thread=64), True, True),
                ("32 rows", SelectionTuning(rows_per_program=32), True, True),
                ("CUDA cores", SelectionTuning(dot_max_width=8), True, True)]
    for name, tuning, write_mask, write_indices in variants if "selection" in parts else ():
        try:
            ms = bench(lambda t=tuning, m=write_mask, i=write_indices: select_tiles(
                q, k, cfg, True, layout, high_dim, low_dim, write_mask=m, write_indices=i,
                tuning=t))
        except Exception as error:
            log(f"  {name}: failed ({type(error).__name__}: {str(error)[:120]})")
            continue
        out["selection"].append({"variant": name, **tuning.__dict__, "write_mask": write_mask,
                                 "write_indices": write_indices, "ms": ms})
        log(f"  selection 128K {name}: {ms:.3f} ms")

    base = default_config(BLOCK, HEAD_DIM, DTYPE, False)
    shapes = [base, fallback_config(BLOCK), AttentionConfig(**{**base.__dict__, "kv_major": False})]
    for density in (1.0, 0.15) if "attention" in parts else ():
        mask = random_causal_mask(n // BLOCK, density, seed=7)
        num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)
        pairs = computed_pairs(mask, BLOCK)

        def attend(shape, num=num, idx=idx):
            return sparse_attention_forward(
                q, k, v, num, idx, block_size=BLOCK, causal=True, scale=None,
                return_lse=True, first_query_tile=0, query_start=0, interpreted=False,
                config=shape)

        expected, expected_lse = attend(shapes[0])
        for shape in shapes:
            try:
                got, got_lse = attend(shape)
                ms = bench(lambda shape=shape: attend(shape), rep=50)
            except Exception as error:
                log(f"  {shape}: failed ({type(error).__name__}: {str(error)[:160]})")
                continue
            error = float((got.float() - expected.float()).abs().max()
                          / expected.float().abs().max())
            lse_error = float((got_lse - expected_lse).abs().max())
            tflops = attention_flops(pairs) / ms / 1e9
            out["attention"].append({"density": density, **shape.__dict__, "ms": ms,
                                     "tflops": tflops, "error_vs_default": error,
                                     "lse_error": lse_error})
            log(f"  attention 128K density {density} {shape}: {ms:.3f} ms ({tflops:.0f} "
                f"TFLOP/s; error vs default {error:.1e}, lse {lse_error:.1e})")
        del expected, expected_lse
    if "attention" in parts:
        out["sdpa_ms"] = sdpa_times(q, k, v)
        log(f"  SDPA 128K: {out['sdpa_ms']}")
    return out


def environment(commit):
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0), "sm_count": props.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "default_attention_config": default_config(BLOCK, HEAD_DIM, DTYPE, False).__dict__,
    }


def summary(rows):
    """The ratios the targets are stated in, one line per length."""
    lines = []
    for row in rows:
        cudnn = row["sdpa_ms"].get("cudnn")
        by_density = {e["density_target"]: e for e in row["sparse"]}
        parts = [f"N={row['tokens'] // 1024}K", f"select {row['select_ms']:.3f} ms",
                 f"cuDNN {cudnn:.2f} ms" if cudnn else "cuDNN n/a"]
        for d in (1.0, 0.15):
            if d in by_density and cudnn:
                e = by_density[d]
                parts.append(f"d{d}: {e['kernel_ms'] / cudnn:.3f}x cuDNN")
                if "flex_ms" in e:
                    parts.append(f"flex/ours {e['flex_ms'] / e['kernel_ms']:.2f}")
        p = row["prism_structured"]
        if cudnn:
            parts.append(f"e2e (density {p['density']:.2f}) {cudnn / p['end_to_end_ms']:.1f}x "
                         "faster than cuDNN")
        parts.append(f"select mem {row['memory']['peak_extra_mb_select_blocks']:.1f} MB")
        lines.append(" | ".join(parts))
    return "\n".join(lines)


def graph_ms(fn, repeats=1):
    """Median ms per call of ``fn`` from replays of a CUDA graph of ``repeats`` calls:
    device time, no host cost. The one capture helper of the benchmarks: ``fn`` runs
    once on a side stream first (lazy allocations and compilation stay out of the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    return float(do_bench(graph.replay, warmup=25, rep=100, return_mode="median")) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("quick", "full", "tune", "diagnose", "selection"),
                        default="quick")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated token counts (default by mode)")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--parts", default="pooling,selection,attention",
                        help="diagnose mode: comma-separated parts to time")
    parser.add_argument("--baseline", default=None,
                        help="selection mode: path of an older selection module to compare")
    parser.add_argument("--variants", default=None, help="selection mode: tunings to time")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_prism.py needs a CUDA GPU")
    started = time.time()
    result = {"environment": environment(args.commit), "mode": args.mode}
    log(json.dumps(result["environment"]))
    if args.mode == "tune":
        result["tune"] = tune()
    elif args.mode == "diagnose":
        result["diagnose"] = diagnose(tuple(args.parts.split(",")))
    elif args.mode == "selection":  # bench_selection.py, kept here for the documented command
        from bench_selection import selection_graph

        result["ceilings"] = ceilings()
        lengths = [int(x) for x in (args.lengths or "8192,131072,4096,32768").split(",")]
        result["selection"] = selection_graph(
            lengths, result["ceilings"]["copy_tb_s"], args.baseline,
            names=args.variants.split(",") if args.variants else None)
    else:
        result["ceilings"] = ceilings()
        log("ceilings", result["ceilings"])
        if args.lengths:
            lengths = [int(x) for x in args.lengths.split(",")]
        else:
            lengths = [32768] if args.mode == "quick" else [8192, 16384, 32768, 65536, 131072]
        densities = (1.0, 0.15) if args.mode == "quick" else DENSITIES
        flex = None if args.no_flex else Flex()
        rows = []
        result["lengths"] = rows
        for n in lengths:
            log(f"N = {n}")
            use_flex = flex if (args.mode == "full" and n in (8192, 32768, 131072)) or \
                (args.mode == "quick") else None
            rows.append(run_length(n, densities, use_flex))
            _write(args.out, result)
        if args.mode == "quick":
            q, k, _ = random_inputs(131072)
            cfg = resolve_config(None, block_size=BLOCK)
            result["select_128k_ms"] = bench(lambda: _select(q, k, cfg, True,
                                                             write_indices=True))
            result["select_128k_memory"] = selection_memory(q, k, cfg)
            log(f"selection at 128K: {result['select_128k_ms']:.3f} ms, memory "
                f"{result['select_128k_memory']}")
        log(summary(rows))
    result["wall_s"] = time.time() - started
    _write(args.out, result)
    return result


def _write(path, result):
    """Write the results so far (a run cut short still leaves its numbers)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
