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
``overhead``
    Host time of a public call: as it runs, and with every Triton launch
    replaced by a no-op (the wrapper alone: validation, allocation, launch
    parameters), both with the eager NaN flag read switched off so the host
    never waits.

Usage (GPU machine, repository root)::

    python benchmarks/bench_matrix.py --parts overhead,selection,e2e,matrix \\
        --cells small --out benchmarks/results/h200_matrix_<commit>.json

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


def random_qkv(b, hq, hkv, n, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(b, hq, n, d, device="cuda", dtype=DTYPE, generator=gen),
            torch.randn(b, hkv, n, d, device="cuda", dtype=DTYPE, generator=gen),
            torch.randn(b, hkv, n, d, device="cuda", dtype=DTYPE, generator=gen))


def structured_qkv(n, hq=32, hkv=8, d=128, seed=1, base=500000.0, sharpness=2.0):
    """RoPE'd q and k sharing a per-head direction (as bench_prism.structured_inputs)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    topic = torch.randn(1, hkv, 1, d, device="cuda", generator=gen)
    k = torch.randn(1, hkv, n, d, device="cuda", generator=gen) + 1.5 * topic
    q = (torch.randn(1, hq, n, d, device="cuda", generator=gen)
         + 1.5 * topic.repeat_interleave(hq // hkv, dim=1)) * sharpness
    v = torch.randn(1, hkv, n, d, device="cuda", generator=gen).to(DTYPE)
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


def flex_ms(q, k, v, mask, bs):
    """Compiled FlexAttention on the tile mask (diagonal tiles token-causal), or None."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        if "fn" not in _FLEX:
            _FLEX["fn"] = torch.compile(flex_attention)
        n, nt = q.shape[2], mask.shape[-1]
        eye = torch.eye(nt, dtype=torch.bool, device=mask.device)
        full_num, full_idx = mask_rows_to_indices(mask & ~eye)
        part_num, part_idx = mask_rows_to_indices(mask & eye)
        block_mask = BlockMask.from_kv_blocks(
            part_num, part_idx, full_num, full_idx, BLOCK_SIZE=bs,
            mask_mod=lambda b, h, qi, ki: qi >= ki, seq_lengths=(n, n))
        fn = _FLEX["fn"]
        fn(q, k, v, block_mask=block_mask, enable_gqa=True)
        return bench(lambda: fn(q, k, v, block_mask=block_mask, enable_gqa=True))
    except Exception as error:  # noqa: BLE001 - a shape FlexAttention cannot run
        log(f"  FlexAttention failed: {type(error).__name__}: {str(error)[:160]}")
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


TUNE_CELLS = [
    # (head_dim, q heads, kv heads, tokens, tile, batch)
    (64, 32, 8, 16384, 128, 1),
    (80, 32, 8, 16384, 128, 1),
    (256, 16, 2, 16384, 128, 1),
    (128, 32, 8, 16384, 64, 1),
    (64, 32, 8, 16384, 64, 1),
]


def tune_configs(d, bs):
    from prism.optimized.attention import AttentionConfig as C

    configs = [C(64, 64, 4, 2), C(64, 64, 4, 3), C(64, 64, 8, 3), C(128, 64, 8, 2),
               C(128, 64, 8, 3), C(64, 32, 4, 3)]
    if d <= 128:
        configs += [C(128, 128, 8, 2), C(128, 128, 8, 3), C(64, 128, 4, 3)]
    if d & (d - 1) == 0:
        configs += [C(64, 64, 4, 3, use_tma=True), C(128, 64, 8, 3, use_tma=True)]
        if d <= 128:
            configs += [C(128, 128, 8, 3, use_tma=True)]
        configs += [C(128, 64, 4, 2, warp_specialize=True),
                    C(128, 64, 4, 3, warp_specialize=True),
                    C(64, 64, 4, 3, warp_specialize=True)]
        if d <= 128:
            configs += [C(128, 128, 4, 2, warp_specialize=True)]
    return [c for c in configs if bs % c.block_m == 0 and bs % c.block_n == 0]


def tune_cell(cell, densities=(0.15, 1.0)):
    """Every candidate launch shape of the attention kernel on one cell."""
    from prism.optimized.attention import default_config

    d, hq, hkv, n, bs, b = cell
    q, k, v = random_qkv(b, hq, hkv, n, d, 0)
    nt = n // bs
    row = {"cell": list(cell), "default": repr(default_config(bs, d, DTYPE, False)),
           "results": []}
    masks = {x: mask_rows_to_indices(random_causal_mask(b, hq, nt, x, 1), 0, causal_trim=True)
             for x in densities}
    for config in tune_configs(d, bs):
        entry = {"config": repr(config)}
        for x, (num, idx) in masks.items():
            try:
                entry[f"d{x}_ms"] = bench(lambda c=config, num=num, idx=idx:
                                          sparse_attention_forward(
                                              q, k, v, num, idx, block_size=bs, causal=True,
                                              scale=None, return_lse=False, first_query_tile=0,
                                              query_start=0, interpreted=False, config=c))
            except Exception as error:  # noqa: BLE001 - a shape that does not compile
                entry[f"d{x}_ms"] = None
                entry["error"] = f"{type(error).__name__}: {str(error)[:100]}"
        row["results"].append(entry)
        log(f"  tune {cell} {entry}")
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


def _profile(fn, calls=300, lines=18):
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
            row["profile_no_kernels"] = _profile(calls["prism_attention"])
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
        result["tune"] = []
        for cell in TUNE_CELLS:
            if time.time() - t0 > args.budget_s:
                continue
            result["tune"].append(tune_cell(cell))
            save()
    if "matrix" in parts:
        densities = tuple(float(x) for x in args.densities.split(","))
        result["matrix"] = []
        for group in args.cells.split(","):
            for cell in CELLS[group]:
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
