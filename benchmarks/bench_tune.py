"""Launch-shape tuning of the block-sparse attention kernel (``bench_matrix.py --parts tune``).

One GPU call times :class:`AttentionConfig` candidates (:data:`CANDIDATES`) on
:data:`SHAPES` (by default 32 query / 8 KV heads, bf16, batch 1, causal, 8K and 32K
tokens; ``PRISM_TUNE_*`` variables change each), random causal tile masks at
:data:`DENSITIES`, the masks and inputs of
``bench_matrix.matrix_cell``), beside compiled FlexAttention on the same tile
masks and cuDNN dense, all timed the same way in the same call.

* The grid is pruned on the host (:func:`candidates`): block sizes must divide
  the tile, shared memory (K and V per stage, Q, one extra key block under warp
  specialisation) must fit in 227 KB, and shapes that the earlier tuning run
  (``h200_tune_8c253cc.json``) measured 1.6-3x slower are left out (64-row
  blocks under warp specialisation, 64-row blocks with 8 warps at head dim <= 128).
* Triton compiles every candidate in worker processes first (its disk cache
  then serves the timing process); FlexAttention compiles in another worker.
* Every candidate's output (poisoned with NaN first) is compared with
  :data:`REFERENCE`'s on the same inputs; a candidate that leaves an element
  unwritten or differs by more than ``ATOL + RTOL |ref|`` is marked wrong and can
  never win. At density 1.0 the reference is itself compared with dense SDPA.

Times: median of per-call CUDA events after two warm-up calls, L2 flushed
(256 MB written) before each call, at least 5 calls and about 20 ms of calls.
``python benchmarks/bench_tune.py --summarize FILE`` prints, per shape, the
candidate with the best median (over cells) of default time / candidate time.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])

DTYPE = torch.bfloat16
#: Query / KV heads and batch; PRISM_TUNE_HEADS="32/32" and PRISM_TUNE_BATCH=4 pick others.
HQ, HKV = (int(x) for x in os.environ.get("PRISM_TUNE_HEADS", "32/8").split("/"))
BATCH = int(os.environ.get("PRISM_TUNE_BATCH", "1"))
LENGTHS = tuple(int(n) for n in os.environ.get("PRISM_TUNE_LENGTHS", "8192,32768").split(","))
#: Densities of the random tile masks (the sink and the diagonal always kept, so 0.0
#: gives those two tiles per row only); PRISM_TUNE_DENSITIES="0,0.05" picks others.
DENSITIES = tuple(float(x) for x in os.environ.get(
    "PRISM_TUNE_DENSITIES", "0.05,0.15,0.3,1.0").split(","))
#: (head dim, tile); PRISM_TUNE_SHAPES="64x128,256x64" picks others.
SHAPES = tuple(tuple(int(x) for x in shape.split("x")) for shape in os.environ.get(
    "PRISM_TUNE_SHAPES", "64x128,128x128,256x128,64x64,256x64").split(","))
#: "focus": the current default, the warp-specialised shapes with and without
#: ``min_mask`` and the best plain shapes of h200_tune_1b04e82; "steps": the default
#: with the key blocks per tile computed at run time (+rs) beside it; "registers": the
#: default with register caps (+r128, +r96; :data:`REGISTER_CAPS`); "grid": the
#: pruned grid of :func:`grid_candidates` (the earlier runs' four shapes and
#: densities 0.05 / 0.15 / 1.0 are in their JSON); "occupancy": the default beside
#: shapes of less shared memory per program (fewer stages, narrower key blocks,
#: 64-query blocks), for rows of few tiles, where one program's load latency is
#: not hidden by another's work on the same SM.
CANDIDATES = os.environ.get("PRISM_TUNE_CANDIDATES", "focus")
SMEM_LIMIT = 232448  # bytes of shared memory per block on the H200 (227 KB)
ATOL, RTOL = 2e-2, 2e-2
COMPILE_WORKERS = 13


def _config(**kw):
    from prism.optimized.attention import AttentionConfig
    return AttentionConfig(**kw)


def key(c) -> str:
    """Short name of a config: m128n64w8s2 [+tma] [+ws] [+hm (head-major order)]
    [+cs (compare-and-select mask where min_mask is the default) | +mm (min mask
    forced on a plain loop)] [+rs (static_steps=False)] [+rN (max_registers=N)]."""
    mask = ("+cs" if c.min_mask is False and c.warp_specialize
            else "+mm" if c.min_mask and not c.warp_specialize else "")
    return (f"m{c.block_m}n{c.block_n}w{c.num_warps}s{c.num_stages}"
            + ("+tma" if c.use_tma else "") + ("+ws" if c.warp_specialize else "")
            + ("" if c.kv_major else "+hm") + mask
            + ("" if c.static_steps or c.warp_specialize else "+rs")
            + ("" if c.max_registers is None else f"+r{c.max_registers}"))


def smem_bytes(c, d: int) -> int:
    """Shared memory of one program, bf16: K and V blocks per pipeline stage, the Q
    block, one more key block under warp specialisation (what Triton 3.6 asked for
    in the OutOfResources errors of h200_tune_8c253cc.json), 1 KB for barriers; at
    the padded width the kernel's blocks have (D 96 holds 128 columns)."""
    from prism.optimized._runtime import next_power_of_2

    d = max(16, next_power_of_2(d))
    stage = 2 * c.block_n * d * 2
    return (c.num_stages * stage + c.block_m * d * 2
            + (c.block_n * d * 2 if c.warp_specialize else 0) + 1024)


def reference_config():
    """Plain loop, pointer loads: the candidate every other is checked against."""
    return _config(block_m=64, block_n=64, num_warps=4, num_stages=2)


def candidates(d: int, tile: int) -> list:
    """The candidates of :data:`CANDIDATES` for one (head dim, tile), the default first."""
    if CANDIDATES == "steps":
        from prism.optimized.attention import default_config

        default = default_config(tile, d, DTYPE, False)
        return [default, _config(**{**default.__dict__, "static_steps": False})][
            :1 if default.warp_specialize else 2]
    if CANDIDATES == "occupancy":
        return occupancy_candidates(d, tile)
    if CANDIDATES == "registers":
        return register_candidates(d, tile)
    return focus_candidates(d, tile) if CANDIDATES == "focus" else grid_candidates(d, tile)


def _legal(configs: list, d: int) -> list:
    """``configs`` without repeats and without those over the shared-memory limit.
    At head dims whose rows no descriptor can read (``attention.descriptor_rows``)
    a descriptor (``+tma``) shape is listed as the pointer-load shape the launch
    really runs (D 96 ran pointer loads under ``+tma`` labels in
    h200_tune_shapes_75d7f97.json), and warp-specialised shapes are left out."""
    from dataclasses import replace

    from prism.optimized.attention import descriptor_rows

    rows_ok = descriptor_rows(d, DTYPE.itemsize)
    seen, legal = set(), []
    for c in configs:
        if not rows_ok:
            if c.warp_specialize:
                continue
            c = replace(c, use_tma=False)
        if key(c) not in seen and smem_bytes(c, d) <= SMEM_LIMIT:
            seen.add(key(c))
            legal.append(c)
    return legal


def focus_candidates(d: int, tile: int) -> list:
    """The default, and beside it: at tile 128, warp-specialised 128 x 128 and 128 x 64
    with min(s, cap) masking and with compare-and-select (+cs), and at D 64 the plain
    64 x 64 and 128 x 128 of h200_tune_1b04e82; the plain defaults with conditional
    rescaling (+lz), and at D 256 tile 64 also 64 x 64 (+lz)."""
    from prism.optimized.attention import default_config

    default = default_config(tile, d, DTYPE, False)
    out = [default]
    if tile % 128 == 0:
        for bn in (128, 64) if d <= 128 else (64,):
            # compare-and-select (+cs) beside the shape each head dim defaults to
            for min_mask in (None, False) if (bn == 128) == (d <= 128) else (None,):
                out.append(_config(block_m=128, block_n=bn, num_warps=4, num_stages=2,
                                   use_tma=d <= 128, warp_specialize=True,
                                   min_mask=min_mask))
        if d == 64:
            out.append(_config(block_m=128, block_n=128, num_warps=4, num_stages=3,
                               use_tma=True))
    return _legal(out, d)


def occupancy_candidates(d: int, tile: int) -> list:
    """The default, and plain TMA shapes that hold less shared memory per program
    (so that two or more programs share an SM): 2 stages, 64-key blocks, 64-query
    blocks on 4 warps, :func:`fallback_config` (the D 128 default until 7da8a40), and the
    default in head-major order."""
    from prism.optimized.attention import default_config, fallback_config

    default = default_config(tile, d, DTYPE, False)
    out = [default, fallback_config(tile, d)]
    for bm, bn, warps, stages in ((128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2),
                                  (128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2),
                                  (64, 128, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2),
                                  (64, 32, 4, 2)):
        if tile % bm == 0 and tile % bn == 0:
            out.append(_config(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                               use_tma=True))
    out.append(_config(**{**default.__dict__, "kv_major": False}))
    return _legal(out, d)


#: Register caps tried by the "registers" candidate set: on 4 warps, 128 registers
#: fit 4 programs in an SM's 65536 and 96 fit 5 (ptxas for sm_90a, Triton 3.6: the D 64
#: entry 128 -> 96 spills 16-20 bytes outside its key loops; the D 128 tile-64 entry
#: 130 -> 128 spills nothing).
REGISTER_CAPS = (128, 96)


def register_candidates(d: int, tile: int) -> list:
    """The default, and the default with each cap of :data:`REGISTER_CAPS` below the
    registers it uses (more programs per SM)."""
    from prism.optimized.attention import default_config

    default = default_config(tile, d, DTYPE, False)
    out = [default]
    for cap in REGISTER_CAPS:
        out.append(_config(**{**default.__dict__, "max_registers": cap}))
    return _legal(out, d)


def grid_candidates(d: int, tile: int) -> list:
    """The pruned grid for one (head dim, tile), the current default first."""
    from prism.optimized.attention import default_config

    out = [default_config(tile, d, DTYPE, False)]
    for bm in (64, 128):
        for bn in (32, 64, 128):
            if tile % bm or tile % bn:
                continue
            for warps in (4, 8):
                if bm == 64 and warps == 8 and d <= 128:
                    continue  # 1.7-2x slower in h200_tune_8c253cc
                for stages in (2, 3, 4):
                    for tma in (False, True):
                        out.append(_config(block_m=bm, block_n=bn, num_warps=warps,
                                           num_stages=stages, use_tma=tma))
            if bm == 128 and bn >= 64:
                # Warp-specialised launches with 3-4 stages gave non-finite outputs
                # (h200_tune_1b04e82); AttentionConfig refuses them now.
                for stages in (2,):
                    out.append(_config(block_m=bm, block_n=bn, num_warps=4, num_stages=stages,
                                       use_tma=True, warp_specialize=True))
    if d == 128:  # already tuned at 16K: keep to the plausible neighbours of the default
        out = [c for c in out if c.block_m == 128 and c.block_n >= 64 and c.num_stages <= 3
               and (c.warp_specialize or c.num_warps == 8)]
    # Programs in head-major order: the default, and every candidate at D 64, tile 64
    # (the cell where FlexAttention led by 2x at density 0.05).
    twins = out if (d, tile) == (64, 64) else out[:1]
    out += [_config(**{**c.__dict__, "kv_major": False}) for c in twins]
    return _legal(out, d)


def time_ms(fn, target_ms=20.0, min_reps=5, max_reps=200) -> float:
    """Median of per-call event times, L2 flushed before each call (as do_bench)."""
    from bench_prism import warm_call_ms

    flush = _flush_buffer()
    reps = int(min(max_reps, max(min_reps, target_ms / max(warm_call_ms(fn), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for s, e in events:
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


_FLUSH = []


def _flush_buffer():
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"))
    return _FLUSH[0]


def _qkv(d, n):
    """bench_matrix.matrix_cell's q, k, v (same seed)."""
    from bench_matrix import random_qkv
    return random_qkv(BATCH, HQ, HKV, n, d, 0)


def _mask(tile, n, density):
    """bench_matrix.matrix_cell's tile mask at ``density`` (same seed)."""
    from bench_matrix import random_causal_mask
    return random_causal_mask(BATCH, HQ, n // tile, density, int(density * 100))


def _forward(q, k, v, num, idx, tile, config, out=None):
    from prism.optimized.attention import sparse_attention_forward
    return sparse_attention_forward(q, k, v, num, idx, block_size=tile, causal=True, scale=None,
                                    return_lse=False, first_query_tile=0, query_start=0,
                                    interpreted=False, out=out, config=config)[0]


def _compile_worker(jobs, results):
    """Compile (launch once, small inputs of the same specialisation) until no job is left."""
    from prism.optimized.indices import mask_rows_to_indices
    cache = {}
    while True:
        try:
            d, tile, config = jobs.get(timeout=3.0)
        except queue.Empty:
            return
        t0 = time.time()
        try:
            if (d, tile) not in cache:  # 16 tiles: every int argument stays a multiple of 16
                mask = _mask(tile, 16 * tile, 0.5)
                cache[(d, tile)] = (*_qkv(d, 16 * tile),
                                    *mask_rows_to_indices(mask, 0, causal_trim=True))
            q, k, v, num, idx = cache[(d, tile)]
            _forward(q, k, v, num, idx, tile, config)
            torch.cuda.synchronize()
            results.put((d, tile, key(config), None, time.time() - t0))
        except Exception as error:  # noqa: BLE001 - recorded; the candidate is skipped
            results.put((d, tile, key(config), f"{type(error).__name__}: {str(error)[:160]}",
                         time.time() - t0))
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - a faulted context: leave the jobs to others
                return


def _flex_call(q, k, v, mask, tile):
    from bench_matrix import flex_call  # the matrix's FlexAttention call, one definition

    return flex_call(q, k, v, mask, tile)


def _dense_call(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    kf, vf = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                sdpa(q, kf, vf, is_causal=True)

            def call(backend=backend):
                with sdpa_kernel([backend]):
                    return sdpa(q, kf, vf, is_causal=True)
            return call, backend.name
        except RuntimeError:
            continue
    return None, None


def _baseline_worker(shapes, compiled, go, results):
    """FlexAttention (compiled per shape) and cuDNN on ``shapes``: compile at once, time
    on ``go``. One worker per shape compiles in parallel; the timings run one worker
    after another."""
    calls = {}
    for d, tile in shapes:
        for n in LENGTHS:
            try:
                q, k, v = _qkv(d, n)
                dense, backend = _dense_call(q, k, v)
                flex = {}
                for x in DENSITIES:
                    flex[x] = _flex_call(q, k, v, _mask(tile, n, x), tile)
                    flex[x]()  # compiles once per shape; later masks reuse the kernel
                torch.cuda.synchronize()
                calls[(d, tile, n)] = (dense, backend, flex)
            except Exception as error:  # noqa: BLE001 - recorded, the cell goes on without it
                results.put({"head_dim": d, "tile": tile, "tokens": n,
                             "error": f"{type(error).__name__}: {str(error)[:200]}"})
    compiled.set()
    go.wait(timeout=600)
    for (d, tile, n), (dense, backend, flex) in calls.items():
        row = {"head_dim": d, "tile": tile, "tokens": n, "dense_backend": backend,
               "cudnn_ms": time_ms(dense) if dense else None}
        for x, call in flex.items():
            row[f"flex_d{x}_ms"] = time_ms(call)
        results.put(row)
    results.put(None)


def _time_cell(d, tile, n, density, configs, row):
    """Verify and time every config in ``configs`` on one cell; fill ``row``."""
    from prism.optimized.indices import mask_rows_to_indices
    q, k, v = _qkv(d, n)
    mask = _mask(tile, n, density)
    nt = n // tile
    row["measured_density"] = float(mask.sum()) / (BATCH * HQ * nt * (nt + 1) / 2)
    num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)
    ref = _forward(q, k, v, num, idx, tile, reference_config())
    if density == 1.0:
        dense, _ = _dense_call(q, k, v)
        if dense:
            row["reference_vs_sdpa_max_abs"] = float((ref.float() - dense().float()).abs().max())
    out = torch.empty_like(ref)
    tol = ATOL + RTOL * ref.float().abs()
    results = row.setdefault("results", {})
    for config in configs:
        name = key(config)
        try:
            out.fill_(float("nan"))
            _forward(q, k, v, num, idx, tile, config, out=out)
            err = (out.float() - ref.float()).abs()
            ok = bool(torch.isfinite(out).all()) and bool((err <= tol).all())
            entry = {"max_abs_err": float(err.max()), "ok": ok}
            if ok:
                entry["ms"] = time_ms(lambda c=config: _forward(q, k, v, num, idx, tile, c,
                                                                out=out))
        except Exception as error:  # noqa: BLE001 - recorded; the candidate cannot win
            entry = {"ok": False, "error": f"{type(error).__name__}: {str(error)[:160]}"}
        results[name] = entry


def tune(budget_s: float = 170.0, save=lambda result: None) -> dict:
    """The whole tuning call; ``save(result)`` is called after every stage."""
    import multiprocessing as mp

    t0 = time.time()
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    grid = {(d, tile): candidates(d, tile) for d, tile in SHAPES}
    result = {"heads": [HQ, HKV], "batch": BATCH, "lengths": list(LENGTHS),
              "densities": list(DENSITIES), "atol": ATOL, "rtol": RTOL,
              "reference": key(reference_config()), "shapes": [], "compile": {}}
    ctx = mp.get_context("spawn")
    jobs, done = ctx.Queue(), ctx.Queue()
    order = [(d, tile, reference_config()) for d, tile in SHAPES]
    order += sorted(((d, tile, c) for (d, tile), cs in grid.items() for c in cs
                     if key(c) != key(reference_config())),
                    key=lambda j: (not j[2].warp_specialize, j[0] == 128))
    for job in order:
        jobs.put(job)
    jobs.cancel_join_thread()  # jobs left when the workers stop must not hold up the exit
    baseline = ctx.Queue()
    bases = []
    for shape in SHAPES:
        compiled, go = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_baseline_worker, args=([shape], compiled, go, baseline))
        proc.start()
        bases.append((proc, compiled, go))
    workers = [ctx.Process(target=_compile_worker, args=(jobs, done))
               for _ in range(COMPILE_WORKERS)]
    for w in workers:
        w.start()
    compile_deadline = t0 + 0.45 * budget_s
    status = {}
    while len(status) < len(order) and time.time() < compile_deadline:
        try:
            d, tile, name, error, secs = done.get(timeout=1.0)
            status[(d, tile, name)] = error
            result["compile"][f"D{d}_t{tile}_{name}"] = error or round(secs, 2)
        except queue.Empty:
            if not any(w.is_alive() for w in workers) and done.empty():
                break
    for w in workers:
        if w.is_alive():
            w.terminate()
    result["compile_s"] = time.time() - t0
    save(result)
    print(f"compiled {sum(e is None for e in status.values())}/{len(order)} in "
          f"{result['compile_s']:.1f} s", flush=True)

    for d, tile in SHAPES:
        configs = [c for c in grid[(d, tile)] if status.get((d, tile, key(c)), "") is None]
        shape = {"head_dim": d, "tile": tile, "default": key(grid[(d, tile)][0]),
                 "candidates": [key(c) for c in grid[(d, tile)]], "cells": []}
        result["shapes"].append(shape)
        for n in LENGTHS:
            for x in DENSITIES:
                if time.time() - t0 > 0.85 * budget_s:
                    shape["skipped_cells"] = shape.get("skipped_cells", 0) + 1
                    continue
                row = {"tokens": n, "density": x}
                _time_cell(d, tile, n, x, configs, row)
                shape["cells"].append(row)
                torch.cuda.empty_cache()
                best = min(((e["ms"], c) for c, e in row["results"].items() if "ms" in e),
                           default=None)
                print(f"D{d} t{tile} {n} d{x}: default {row['results'].get(shape['default'])}"
                      f" best {best}", flush=True)
            save(result)
    result["ours_s"] = time.time() - t0

    base_deadline = t0 + budget_s
    baselines = []
    result["baseline_compiled"] = [compiled.is_set() for _, compiled, _ in bases]
    for proc, _, go in bases:  # one worker times at a time, after this process
        go.set()
        while time.time() < base_deadline:
            try:
                row = baseline.get(timeout=max(0.1, base_deadline - time.time()))
            except queue.Empty:
                break
            if row is None:
                break
            baselines.append(row)
        if proc.is_alive():
            proc.terminate()
    result["baselines"] = baselines
    result["seconds"] = time.time() - t0
    save(result)
    return result


def summarize(path: str) -> dict:
    """Per shape: each candidate's median over cells of default/candidate time (only
    candidates correct and timed on every cell), the winner, and the baselines."""
    with open(path) as f:
        tune_result = json.load(f)
    tune_result = tune_result.get("tune", tune_result)
    base = {(b["head_dim"], b["tile"], b["tokens"]): b for b in tune_result.get("baselines", [])}
    summary = {}
    for shape in tune_result["shapes"]:
        d, tile, default = shape["head_dim"], shape["tile"], shape["default"]
        cells = [c for c in shape["cells"] if "ms" in c["results"].get(default, {})]
        speedups = {}
        for name in shape["candidates"]:
            entries = [c["results"].get(name, {}) for c in cells]
            if cells and all("ms" in e for e in entries):
                speedups[name] = statistics.median(
                    c["results"][default]["ms"] / e["ms"]
                    for c, e in zip(cells, entries, strict=True))
        ranked = sorted(speedups.items(), key=lambda kv: -kv[1])
        winner = ranked[0][0] if ranked else default
        plain = [kv for kv in ranked if "+ws" not in kv[0]]
        rows = []
        for c in cells:
            b = base.get((d, tile, c["tokens"]), {})
            flex, cudnn = b.get(f"flex_d{c['density']}_ms"), b.get("cudnn_ms")
            row = {"tokens": c["tokens"], "density": c["density"], "flex_ms": flex,
                   "cudnn_ms": cudnn}
            for label, name in (("default", default), ("winner", winner)):
                ms = c["results"][name]["ms"]
                row[f"{label}_ms"] = ms
                row[f"flex_over_{label}"] = flex / ms if flex else None
                row[f"{label}_over_cudnn"] = ms / cudnn if cudnn else None
            rows.append(row)
        summary[f"D{d}_t{tile}"] = {
            "default": default, "winner": winner, "winner_speedup": dict(ranked).get(winner),
            "best_plain": plain[0] if plain else None, "top5": ranked[:5],
            "wrong": sorted({n for c in shape["cells"] for n, e in c["results"].items()
                             if not e.get("ok")}),
            "cells": rows}
    return summary


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--summarize":
        found = summarize(sys.argv[2])
        if "--brief" in sys.argv:
            for name, shape in found.items():
                print(name, {k: v for k, v in shape.items() if k != "cells"})
                for row in shape["cells"]:
                    print("   ", {k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in row.items()})
        else:
            print(json.dumps(found, indent=1))
    else:
        print("usage: python benchmarks/bench_tune.py --summarize FILE "
              "(tuning runs as bench_matrix.py --parts tune)")
