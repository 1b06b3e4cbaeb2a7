"""Prism off the tuned shape: a shape matrix, end to end at short and long context, overhead.

Four parts, each written to the JSON as soon as it is measured:

``matrix``
    Block-sparse attention on random causal tile masks (sink and diagonal
    kept) for a chosen set of cells (head dim, query/KV heads, tokens, tile,
    batch) at densities 1.0, 0.3, 0.15 and 0.05: our kernel on the compact
    indices (what ``prism_attention`` runs), compiled FlexAttention on the
    same tile mask, and dense causal SDPA (cuDNN, K/V expanded outside the timing).
``e2e``
    ``prism_attention`` on RoPE'd structured inputs at their natural density
    (the default configuration) against cuDNN dense, with selection alone.
``selection``
    ``select_blocks`` against its memory floor (read Q and K once, write the
    mask and the compact indices), for two launch plans (one launch per
    power-of-two width, or narrow rows merged into one launch).
``graph``
    What users run, on the ``e2e`` inputs: ``prism_attention`` eager (and its
    halves, ``select_blocks`` and ``block_sparse_attention`` on the returned
    tile mask, as public calls), under
    ``torch.compile(fullgraph=True)`` and as a captured CUDA graph replayed,
    beside cuDNN dense and compiled FlexAttention (on the tile mask that
    Prism selected, so attention only) in the same run.
``tune``
    Launch shapes of the attention kernel: a pruned grid of candidates timed
    and checked against a reference launch on the weak shapes, beside
    FlexAttention and cuDNN (``bench_tune.py``; ``bench_tune.py --summarize``
    reads the result).
``ncu``
    One launch of our attention kernel (and cuDNN's, at density 1.0) for
    Nsight Compute to profile: ``--ncu-cell`` names the cell (run the script
    under ``ncu``, as ``run_h200.sh ncu`` does).
``overhead``
    Host time of a public call: as it runs, and with every Triton launch
    replaced by a no-op (the wrapper alone: validation, allocation, launch
    parameters), both with the eager NaN flag read switched off so the host
    never waits.

Usage (GPU machine, repository root)::

    python benchmarks/bench_matrix.py --parts overhead,selection,e2e,matrix \\
        --cells small --out benchmarks/results/h200_matrix_<commit>.json
    python benchmarks/bench_matrix.py --parts graph,matrix --cells full \\
        --skip-measured benchmarks/results/h200_matrix_75ea321.json --budget-s 200

``--cells full`` is the issue's whole matrix (D 64/128/256 x GQA 1/4/8 with 32
query heads x 8K/32K/128K x tile 64/128 x batch 1/4, and 256K), cheapest
cells first, so that a time budget covers as many cells as it can;
``--skip-measured`` leaves out the cells a committed run already holds.
``--cells axes`` takes one pass over every axis of that matrix (18 cells).

Times are medians of ``triton.testing.do_bench`` (see ``bench_prism.bench``);
ratios compare numbers of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_prism import bench, log  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import ops  # noqa: E402
from prism.optimized.attention import sparse_attention_forward  # noqa: E402
from prism.optimized.indices import mask_rows_to_indices  # noqa: E402
from prism.reference import apply_rope  # noqa: E402

DTYPE = torch.bfloat16
COPY_TB_S = 4.24  # measured device copy ceiling (benchmarks/NOTES.md)

# (head_dim, q heads, kv heads, tokens, tile, batch)
CELLS = {
    "small": [
        (128, 32, 8, 8192, 128, 1),
        (128, 32, 8, 32768, 128, 1),
        (128, 32, 8, 131072, 128, 1),
        (64, 32, 8, 32768, 128, 1),
        (256, 16, 2, 32768, 128, 1),
        (128, 32, 32, 32768, 128, 1),
        (128, 32, 4, 32768, 128, 1),
        (128, 32, 8, 32768, 64, 1),
        (128, 32, 8, 8192, 128, 4),
        (64, 32, 32, 8192, 64, 4),
    ],
    "coverage": [
        (80, 32, 8, 16384, 128, 1),
        (96, 32, 8, 16384, 128, 1),
        (256, 32, 4, 8192, 64, 2),
    ],
}
DENSITIES = (1.0, 0.3, 0.15, 0.05)


def full_cells():
    """The issue's matrix plus 256K, ordered by dense cost (cheapest first)."""
    cells = [(d, 32, 32 // group, n, bs, b)
             for d in (64, 128, 256) for group in (1, 4, 8)
             for n in (8192, 32768, 131072) for bs in (64, 128) for b in (1, 4)]
    cells.append((128, 32, 8, 262144, 128, 1))
    return sorted(cells, key=lambda c: (c[3] * c[3] * c[0] * c[5], c))


CELLS["full"] = full_cells()
# One pass over every axis of the matrix (head dim, tile, GQA ratio, batch,
# 8K-256K) in about five minutes: each head dim at both tiles at 8K, GQA 1/4/8 and
# batch 4 at 8K-32K, each head dim at 128K, and 256K.
CELLS["axes"] = [
    (64, 32, 8, 8192, 128, 1), (64, 32, 8, 8192, 64, 1),
    (128, 32, 8, 8192, 128, 1), (128, 32, 8, 8192, 64, 1),
    (256, 32, 8, 8192, 128, 1), (256, 32, 8, 8192, 64, 1),
    (128, 32, 32, 8192, 128, 4), (64, 32, 4, 8192, 128, 4),
    (64, 32, 4, 32768, 128, 1), (128, 32, 32, 32768, 128, 1), (128, 32, 4, 32768, 64, 1),
    (256, 32, 8, 32768, 64, 1), (128, 32, 8, 32768, 128, 4),
    (64, 32, 8, 131072, 128, 1), (128, 32, 4, 131072, 128, 1), (256, 32, 8, 131072, 128, 1),
    (128, 32, 8, 131072, 64, 1), (128, 32, 8, 262144, 128, 1),
]


def measured_cells(paths) -> set:
    """Cells (head_dim, q heads, kv heads, tokens, tile, batch) held by earlier runs."""
    done = set()
    for path in paths:
        with open(path) as f:
            for row in json.load(f).get("matrix", []):
                done.add((row["head_dim"], row["q_heads"], row["kv_heads"], row["tokens"],
                          row["tile"], row["batch"]))
    return done


def random_qkv(b, hq, hkv, n, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(b, hq, n, d, device="cuda", dtype=DTYPE, generator=gen),
            torch.randn(b, hkv, n, d, device="cuda", dtype=DTYPE, generator=gen),
            torch.randn(b, hkv, n, d, device="cuda", dtype=DTYPE, generator=gen))


def structured_qkv(n, hq=32, hkv=8, d=128, seed=1, base=500000.0, sharpness=2.0, b=1):
    """RoPE'd q and k sharing a per-head direction (as bench_prism.structured_inputs)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    topic = torch.randn(b, hkv, 1, d, device="cuda", generator=gen)
    k = torch.randn(b, hkv, n, d, device="cuda", generator=gen) + 1.5 * topic
    q = (torch.randn(b, hq, n, d, device="cuda", generator=gen)
         + 1.5 * topic.repeat_interleave(hq // hkv, dim=1)) * sharpness
    v = torch.randn(b, hkv, n, d, device="cuda", generator=gen).to(DTYPE)
    return apply_rope(q, base).to(DTYPE), apply_rope(k, base).to(DTYPE), v


def random_causal_mask(b, h, nt, density, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(b, h, nt, nt, device="cuda", generator=gen) < density
    mask &= torch.ones(nt, nt, dtype=torch.bool, device="cuda").tril()
    mask[..., 0] = True
    mask |= torch.eye(nt, dtype=torch.bool, device="cuda")
    return mask


def cudnn_ms(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    group = q.shape[1] // k.shape[1]
    kf, vf = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                sdpa(q, kf, vf, is_causal=True)
            with sdpa_kernel([backend]):
                return bench(lambda: sdpa(q, kf, vf, is_causal=True)), backend.name
        except RuntimeError as error:
            log(f"  SDPA {backend.name} unavailable: {str(error)[:120]}")
    return None, None


_FLEX = {}


def flex_call(q, k, v, mask, bs):
    """A no-argument call of compiled FlexAttention on the tile mask (diagonal tiles
    token-causal), compiled once per process with static shapes."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if "fn" not in _FLEX:
        # One static kernel per shape, as a user's compiled model gets: no
        # automatic dynamic shapes, and no fallback to eager after 8 shapes.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 1024)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    n, nt = q.shape[2], mask.shape[-1]
    eye = torch.eye(nt, dtype=torch.bool, device=mask.device)
    full_num, full_idx = mask_rows_to_indices(mask & ~eye)
    part_num, part_idx = mask_rows_to_indices(mask & eye)
    block_mask = BlockMask.from_kv_blocks(
        part_num, part_idx, full_num, full_idx, BLOCK_SIZE=bs,
        mask_mod=lambda b, h, qi, ki: qi >= ki, seq_lengths=(n, n))
    fn = _FLEX["fn"]
    # Flex's default kernel tiles are 128 rows: a tile-64 mask needs 64-row tiles.
    options = {"BLOCK_M": bs, "BLOCK_N": bs} if bs < 128 else None
    return lambda: fn(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=options)


def flex_ms(q, k, v, mask, bs):
    """Time of :func:`flex_call` (after one warm-up call that compiles it), or None."""
    try:
        call = flex_call(q, k, v, mask, bs)
        call()
        return bench(call)
    except Exception as error:  # noqa: BLE001 - a shape FlexAttention cannot run
        log(f"  FlexAttention failed: {type(error).__name__}: {str(error)[:300]}")
        return None


def ours_ms(q, k, v, mask, bs):
    num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)
    return bench(lambda: sparse_attention_forward(
        q, k, v, num, idx, block_size=bs, causal=True, scale=None, return_lse=False,
        first_query_tile=0, query_start=0, interpreted=False))


def matrix_cell(cell, densities, seed=0):
    d, hq, hkv, n, bs, b = cell
    q, k, v = random_qkv(b, hq, hkv, n, d, seed)
    row = {"head_dim": d, "q_heads": hq, "kv_heads": hkv, "tokens": n, "tile": bs, "batch": b}
    row["cudnn_ms"], row["dense_backend"] = cudnn_ms(q, k, v)
    nt = n // bs
    for density in densities:
        mask = random_causal_mask(b, hq, nt, density, seed + int(density * 100))
        entry = {"density": float(mask.sum()) / (b * hq * nt * (nt + 1) / 2)}
        entry["ours_ms"] = ours_ms(q, k, v, mask, bs)
        entry["flex_ms"] = flex_ms(q, k, v, mask, bs)
        if entry["flex_ms"]:
            entry["flex_over_ours"] = entry["flex_ms"] / entry["ours_ms"]
        if row["cudnn_ms"]:
            entry["ours_over_cudnn"] = entry["ours_ms"] / row["cudnn_ms"]
        row[f"d{density}"] = entry
        del mask
    log(f"  {cell}: cudnn {row['cudnn_ms']}", *(
        f"| d{x}: ours {row[f'd{x}']['ours_ms']:.3f} flex {row[f'd{x}']['flex_ms']}"
        for x in densities))
    return row


def e2e(n):
    q, k, v = structured_qkv(n)
    mask = optimized.select_blocks(q, k)
    nt = mask.shape[-1]
    row = {"tokens": n, "density": float(mask.sum()) / (mask.shape[1] * nt * (nt + 1) / 2)}
    row["prism_ms"] = bench(lambda: optimized.prism_attention(q, k, v))
    row["select_blocks_ms"] = bench(lambda: optimized.select_blocks(q, k))
    row["attention_ms"] = bench(lambda: optimized.block_sparse_attention(q, k, v, mask))
    row["cudnn_ms"], _ = cudnn_ms(q, k, v)
    if row["cudnn_ms"]:
        row["cudnn_over_prism"] = row["cudnn_ms"] / row["prism_ms"]
    log(f"  e2e {n}: {row}")
    return row


def parse_shape(spec: str):
    """``N`` (32/8 heads, D 128, batch 1) or ``N/D/HQ/HKV/B``: tokens, head dim, query
    heads, KV heads, batch."""
    parts = [int(x) for x in spec.split("/")]
    if len(parts) not in (1, 5):
        raise ValueError(f"graph shape {spec!r}: write N or N/D/HQ/HKV/B, e.g. 8192/64/32/8/4")
    return tuple(parts) if len(parts) == 5 else (parts[0], 128, 32, 8, 1)


def graph(spec, flex=True):
    """``prism_attention`` eager, compiled (fullgraph) and CUDA-graph replayed, beside cuDNN
    and (``flex``) compiled FlexAttention on Prism's own tile mask, on the e2e inputs of
    shape ``spec`` (:func:`parse_shape`)."""
    n, d, hq, hkv, b = parse_shape(str(spec))
    q, k, v = structured_qkv(n, hq=hq, hkv=hkv, d=d, b=b)
    mask = optimized.select_blocks(q, k)
    nt = mask.shape[-1]
    row = {"tokens": n, "head_dim": d, "q_heads": hq, "kv_heads": hkv, "batch": b,
           "density": float(mask.sum()) / (b * mask.shape[1] * nt * (nt + 1) / 2)}
    row["eager_ms"] = bench(lambda: optimized.prism_attention(q, k, v))
    # The two halves as users call them: public calls, checks and allocations included.
    row["select_blocks_ms"] = bench(lambda: optimized.select_blocks(q, k))
    row["block_sparse_attention_ms"] = bench(
        lambda: optimized.block_sparse_attention(q, k, v, mask))
    compiled = torch.compile(lambda q, k, v: optimized.prism_attention(q, k, v), fullgraph=True)
    out = compiled(q, k, v)
    row["compiled_error"] = float((out.float() - optimized.prism_attention(q, k, v).float())
                                  .norm() / out.float().norm())
    row["compiled_ms"] = bench(lambda: compiled(q, k, v))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            optimized.prism_attention(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    captured = torch.cuda.CUDAGraph()
    with torch.cuda.graph(captured):
        graph_out = optimized.prism_attention(q, k, v)
    captured.replay()
    row["graph_error"] = float((graph_out.float() - out.float()).norm() / out.float().norm())
    row["graph_ms"] = bench(captured.replay)
    del captured, graph_out
    row["cudnn_ms"], _ = cudnn_ms(q, k, v)
    if flex:
        row["flex_same_mask_ms"] = flex_ms(q, k, v, mask.as_tensor(), 128)
    if row["cudnn_ms"]:
        for name in ("eager", "compiled", "graph"):
            row[f"cudnn_over_{name}"] = row["cudnn_ms"] / row[f"{name}_ms"]
    log(f"  graph {n}: {row}")
    return row


def ncu_target(cell, density, seed=0):
    """One warm-up launch, then the launches Nsight Compute profiles (``--launch-skip``
    the warm-up): our kernel on a random tile mask of ``density``; at density 1.0 also
    cuDNN dense, warm-up and one launch."""
    d, hq, hkv, n, bs, b = cell
    q, k, v = random_qkv(b, hq, hkv, n, d, seed)
    mask = random_causal_mask(b, hq, n // bs, density, seed + 1)
    num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)
    tiles = int(num.sum())
    for _ in range(2):
        sparse_attention_forward(q, k, v, num, idx, block_size=bs, causal=True, scale=None,
                                 return_lse=False, first_query_tile=0, query_start=0,
                                 interpreted=False)
    torch.cuda.synchronize()
    if density == 1.0:
        cudnn_ms(q, k, v)  # its warm-up and timed calls: profile with --launch-count 1
    # 2 matrix products of bs x bs x d per computed tile (QK^T and PV).
    log(f"  ncu cell {cell} density {density}: {tiles} tiles, "
        f"{4 * tiles * bs * bs * d / 1e12:.4f} TFLOP per call (diagonal tiles counted whole)")


def selection(n, hq=32, hkv=8, d=128, bs=128):
    from prism.optimized import selection as sel

    q, k, _ = random_qkv(1, hq, hkv, n, d, 0)
    nt = -(-n // bs)
    floor_bytes = (q.numel() + k.numel()) * 2 + hq * nt * nt * 5 + hq * nt * 4
    row = {"tokens": n, "floor_ms": floor_bytes / COPY_TB_S / 1e9}
    default = sel._DEFAULT_TUNING
    try:
        for name, merge in (("merged", default.merge_width), ("per_width", 16)):
            sel._DEFAULT_TUNING = sel.SelectionTuning(merge_width=merge)
            row[f"select_blocks_{name}_ms"] = bench(lambda: optimized.select_blocks(q, k))
    finally:
        sel._DEFAULT_TUNING = default
    row["over_floor"] = row["select_blocks_merged_ms"] / row["floor_ms"]
    log(f"  selection {n}: {row}")
    return row


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_us(fn, calls=200):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def profile_text(fn, calls=300, lines=18):
    """Top functions by own time over ``calls`` calls (cProfile), as text."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(lines)
    return text.getvalue()[-4000:]


def overhead(n=4096):
    """Host microseconds per public call, with and without the Triton launches."""
    from prism.optimized import attention, indices, pooling
    from prism.optimized import selection as sel

    q, k, v = random_qkv(1, 32, 8, n, 128, 0)
    mask = optimized.select_blocks(q, k)
    calls = {
        "prism_attention": lambda: optimized.prism_attention(q, k, v),
        "select_blocks": lambda: optimized.select_blocks(q, k),
        "block_sparse_attention": lambda: optimized.block_sparse_attention(q, k, v, mask),
    }
    original_tracing = ops.tracing
    ops.tracing = lambda: True  # no eager flag read: the host never waits
    row = {"tokens": n}
    try:
        for name, fn in calls.items():
            row[f"{name}_us"] = host_us(fn)
        kernels = [(pooling, "_pool_tiles_kernel"), (pooling, "_nonfinite_kernel"),
                   (sel, "_select_tiles_kernel"), (attention, "_sparse_attention_kernel"),
                   (indices, "_mask_to_indices_kernel")]
        saved = [(m, name, getattr(m, name)) for m, name in kernels]
        for m, name in kernels:
            setattr(m, name, _NoLaunch())
        try:
            for name, fn in calls.items():
                row[f"{name}_no_kernels_us"] = host_us(fn)
            row["profile_no_kernels"] = profile_text(calls["prism_attention"])
        finally:
            for m, name, kernel in saved:
                setattr(m, name, kernel)
    finally:
        ops.tracing = original_tracing
    log(f"  overhead: { {k: v for k, v in row.items() if k != 'profile_no_kernels'} }")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="overhead,selection,e2e,matrix")
    parser.add_argument("--cells", default="small")
    parser.add_argument("--e2e-lengths", default="4096,8192,131072")
    parser.add_argument("--selection-lengths", default="4096,8192,32768,131072")
    parser.add_argument("--densities", default=",".join(str(x) for x in DENSITIES))
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--graph-lengths", default="4096,8192,32768,131072",
                        help="comma list of N or N/D/HQ/HKV/B (graph part)")
    parser.add_argument("--graph-flex", type=int, default=1,
                        help="0: leave compiled FlexAttention out of the graph part")
    parser.add_argument("--skip-measured", default="",
                        help="comma list of earlier h200_matrix JSON files whose cells to skip")
    parser.add_argument("--ncu-cell", default="128,32,8,8192,128,1:0.05",
                        help="D,hq,hkv,tokens,tile,batch:density for the ncu part")
    parser.add_argument("--budget-s", type=float, default=1e9,
                        help="stop starting new matrix cells after this many seconds")
    args = parser.parse_args(argv)
    t0 = time.time()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "commit": args.commit,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        pass  # no Triton here: the record simply has no "triton" version field

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    parts = args.parts.split(",")
    if "ncu" in parts:
        cell, density = args.ncu_cell.split(":")
        ncu_target(tuple(int(x) for x in cell.split(",")), float(density))
        return result
    if "graph" in parts:
        result["graph"] = []
        for n in args.graph_lengths.split(","):
            try:
                result["graph"].append(graph(n, flex=bool(args.graph_flex)))
            except Exception as error:  # noqa: BLE001 - record the failure, go on
                result["graph"].append({"shape": n, "error": f"{type(error).__name__}: "
                                                            f"{str(error)[:300]}"})
                log(f"  graph {n} failed: {result['graph'][-1]['error']}")
            torch.cuda.empty_cache()
            save()
    if "overhead" in parts:
        result["overhead"] = overhead()
        save()
    if "selection" in parts:
        result["selection"] = [selection(int(n)) for n in args.selection_lengths.split(",")]
        save()
    if "e2e" in parts:
        result["e2e"] = [e2e(int(n)) for n in args.e2e_lengths.split(",")]
        save()
    if "tune" in parts:
        from bench_tune import tune

        def save_tune(part):
            result["tune"] = part
            save()

        tune(budget_s=args.budget_s - (time.time() - t0), save=save_tune)
    if "matrix" in parts:
        densities = tuple(float(x) for x in args.densities.split(","))
        result["matrix"] = []
        skip = measured_cells([p for p in args.skip_measured.split(",") if p])
        for group in args.cells.split(","):
            for cell in CELLS[group]:
                if cell in skip:
                    continue
                if time.time() - t0 > args.budget_s:
                    log(f"  budget reached, skipping {cell}")
                    continue
                try:
                    result["matrix"].append(matrix_cell(cell, densities))
                except torch.cuda.OutOfMemoryError as error:
                    log(f"  {cell}: out of memory ({str(error)[:80]})")
                torch.cuda.empty_cache()
                save()
    result["seconds"] = time.time() - t0
    save()
    return result


if __name__ == "__main__":
    main()
