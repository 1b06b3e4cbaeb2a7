"""Where the fixed cost of a Prism call goes, on a CUDA GPU (issue #14, item 4).

Prints one JSON object (and writes it with ``--out``):

``host_us``
    Host microseconds per eager call of ``select_blocks``, ``prism_attention``
    and ``block_sparse_attention`` at 4K and 8K (32/8 heads, D 128, bf16), with
    the eager NaN-flag read switched off (the host never waits, as in
    ``bench_matrix.py --parts overhead``): as users run it (``fast``: a repeated
    call replays its plan, :mod:`prism.optimized.call_plan`), the plan with its
    kernel launches as no-ops (``plan_no_launches``: the wrapper alone, memset
    included), the general path with the cached launcher of
    :mod:`prism.optimized.launch` (``general``), with every launch through
    ``kernel[grid]`` (``triton``), and with every launch a no-op (``no_kernels``).
``plan_check``
    The planned calls against the general path at 4K: outputs bit for bit,
    NaN input raising, inputs left unchanged.
``launch_us``
    Host microseconds of one ``pool_tiles_and_energy`` and one ``select_tiles``
    call at 4K: launches cached, through ``kernel[grid]``, and no-ops.
``gpu_us``
    Device time of the selection kernels alone, from CUDA-graph replays, so the
    host cost is out of the picture: what a host-free call could reach.
``eager_ms``
    ``triton.testing.do_bench`` medians of the eager calls as users make them
    (flag read included), and at 128K pooling alone against the whole selection.
``profile``
    cProfile of the no-kernel ``prism_attention`` and ``select_blocks`` wrappers.
``cpu_us`` (``--parts cpu``, no GPU needed)
    The wrapper's Python cost on the CPU machine: host microseconds per call of
    ``select_blocks`` and ``prism_attention`` on small CPU tensors, with the fake
    kernels of ``tests/test_call_plan.py`` (launchers that do nothing, CUDA
    claimed for CPU tensors), through the call plan (``plan``) and the general
    path (``general``), and a cProfile of the planned call. Allocation costs are
    the CPU's, not CUDA's caching allocator's.
``compiled`` (``--parts compiled``, shapes ``--compiled-shapes``)
    ``prism_attention`` compiled with ``fullgraph=True`` beside eager, CUDA-graph replay
    and cuDNN SDPA (do_bench medians, host microseconds per call, plan replays, bitwise
    equality with the general path), the compiled call with call plans off, and eager
    ``block_sparse_attention`` with and without its plan (:func:`compiled_part`).

Usage (GPU machine, repository root)::

    python benchmarks/bench_overhead.py --out benchmarks/results/h200_overhead_<sha>.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_matrix import _NoLaunch, host_us  # noqa: E402  (one definition each)
from bench_prism import bench, graph_ms  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import attention, call_plan, indices, launch, ops, pooling  # noqa: E402
from prism.optimized import selection as sel  # noqa: E402
from prism.reference.bands import band_sizes  # noqa: E402
from prism.reference.config import PrismConfig  # noqa: E402

DTYPE = torch.bfloat16
KERNELS = [(pooling, "_pool_tiles_kernel"), (pooling, "_nonfinite_kernel"),
           (sel, "_select_tiles_kernel"), (attention, "_sparse_attention_kernel"),
           (indices, "_mask_to_indices_kernel")]


def qkv(n, hq=32, hkv=8, d=128, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(1, h, n, d, device="cuda", dtype=DTYPE, generator=gen)
                 for h in (hq, hkv, hkv))


class _Stubbed:
    """Every Prism kernel replaced by a no-op launch while inside."""

    def __enter__(self):
        self.saved = [(m, name, getattr(m, name)) for m, name in KERNELS]
        for m, name in KERNELS:
            setattr(m, name, _NoLaunch())

    def __exit__(self, *exc):
        for m, name, kernel in self.saved:
            setattr(m, name, kernel)


class _TritonLaunches:
    """Every launch through ``kernel[grid]`` while inside."""

    def __enter__(self):
        self.saved = launch._get_device
        launch._get_device = None

    def __exit__(self, *exc):
        launch._get_device = self.saved


def profile(fn, calls=300, lines=22):
    from bench_matrix import profile_text  # one cProfile helper for the benchmarks

    return profile_text(fn, calls, lines)


class _PlanNoLaunches:
    """Every kernel launch of every call plan a no-op while inside (memsets still run)."""

    def __enter__(self):
        self.saved = [(step, step.call) for plan in call_plan._PLANS.values() if plan
                      for step in plan.steps if step.call is not None]
        for step, _ in self.saved:
            step.call = _no_op

    def __exit__(self, *exc):
        for step, call in self.saved:
            step.call = call


def _no_op(*args):
    return None


class _General:
    """Every call through the general path while inside."""

    def __enter__(self):
        call_plan.ENABLED = False

    def __exit__(self, *exc):
        call_plan.ENABLED = True


def _host_calls(n):
    q, k, v = qkv(n)
    mask = optimized.select_blocks(q, k)
    return {
        "select_blocks": lambda: optimized.select_blocks(q, k),
        "prism_attention": lambda: optimized.prism_attention(q, k, v),
        "block_sparse_attention": lambda: optimized.block_sparse_attention(q, k, v, mask),
    }


def _host_one(n, row, prof):
    calls = _host_calls(n)
    tag = "" if n == 4096 else f"_{n}"
    for name, fn in calls.items():
        row[f"{name}{tag}_fast"] = host_us(fn)
        with _PlanNoLaunches():
            row[f"{name}{tag}_plan_no_launches"] = host_us(fn)
        with _General():
            row[f"{name}{tag}_general"] = host_us(fn)
        with _TritonLaunches():
            row[f"{name}{tag}_triton"] = host_us(fn)
        with _Stubbed():
            row[f"{name}{tag}_no_kernels"] = host_us(fn)
        row[f"{name}{tag}_fast_again"] = host_us(fn)
    if n == 4096:
        with _PlanNoLaunches():
            prof.update({f"{name}_plan": profile(calls[name])
                         for name in ("prism_attention", "select_blocks")})
        with _Stubbed():
            prof.update({name: profile(calls[name])
                         for name in ("prism_attention", "select_blocks")})


def host_part(lengths=(4096, 8192)):
    row, prof = {}, {}
    original = ops.tracing
    ops.tracing = lambda: True
    try:
        for n in lengths:
            _host_one(n, row, prof)
    finally:
        ops.tracing = original
    row["plan_stats"] = dict(call_plan.PLAN_STATS)
    return row, prof


def plan_check(n=4096):
    """Planned calls against the general path: bit for bit, NaN raising, inputs unchanged."""
    q, k, v = qkv(n, seed=5)
    copies = [t.clone() for t in (q, k, v)]
    call_plan._PLANS.clear()
    with _General():
        out, lse = optimized.prism_attention(q, k, v, return_lse=True)
        plain = optimized.prism_attention(q, k, v)
        mask = optimized.select_blocks(q, k)
    hits = call_plan.PLAN_STATS["hit"]
    for _ in range(3):
        got_out, got_lse = optimized.prism_attention(q, k, v, return_lse=True)
        got_plain = optimized.prism_attention(q, k, v)
        got_mask = optimized.select_blocks(q, k)
    row = {"hits": call_plan.PLAN_STATS["hit"] - hits,
           "out_equal": torch.equal(got_out, out), "lse_equal": torch.equal(got_lse, lse),
           "out_no_lse_equal": torch.equal(got_plain, plain),
           "mask_equal": torch.equal(got_mask.as_tensor(), mask.as_tensor()),
           "indices_equal": torch.equal(got_mask.kv_indices, mask.kv_indices)
           and torch.equal(got_mask.kv_num_blocks, mask.kv_num_blocks),
           "inputs_unchanged": all(torch.equal(a, b) for a, b in zip((q, k, v), copies,
                                                                      strict=True))}
    bad = q.clone()
    bad[0, 2, 77, 9] = float("nan")
    for name, fn in (("prism_attention", lambda: optimized.prism_attention(bad, k, v)),
                     ("select_blocks", lambda: optimized.select_blocks(bad, k))):
        try:
            fn()
            row[f"{name}_nan_raises"] = False
        except ValueError as error:
            row[f"{name}_nan_raises"] = "NaN or Inf" in str(error)
    row["hits_total"] = call_plan.PLAN_STATS["hit"] - hits
    return row


def launch_part(n=4096):
    """One pooling and one selection launch, Triton's way and launch()'s way."""
    q, k, _ = qkv(n)
    cfg = PrismConfig()
    layout = ops._layout(n, n, cfg.block_size, True)
    high, low = band_sizes(q.shape[3], cfg.high_dim, cfg.low_dim)
    row = {}
    pool = lambda: pooling.pool_tiles_and_energy(q, k, layout, high, low, cfg.rope_layout)  # noqa: E731
    select = lambda: sel.select_tiles(q, k, cfg, True, layout, high, low,  # noqa: E731
                                      write_mask=True, write_indices=True)
    for name, fn in (("pooling_call", pool), ("select_tiles_call", select)):
        row[f"{name}_fast"] = host_us(fn)
        with _TritonLaunches():
            row[f"{name}_triton"] = host_us(fn)
        with _Stubbed():
            row[f"{name}_no_kernels"] = host_us(fn)
    return row


class _Patches:
    """``monkeypatch.setattr`` outside pytest, undone by :meth:`undo`."""

    def __init__(self):
        self.saved = []

    def setattr(self, obj, name, value):
        self.saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self):
        for obj, name, value in reversed(self.saved):
            setattr(obj, name, value)


def _cpu_us(fn, calls):
    import time

    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def cpu_part(calls=2000):
    """The wrappers' Python cost without a GPU (see the module docstring)."""
    sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/tests")
    import test_call_plan as fakes_module

    patches = _Patches()
    fixture = getattr(fakes_module.fakes, "__wrapped__", fakes_module.fakes)(patches)
    fakes = next(fixture)
    for kernel in fakes.kernels.values():
        kernel.compiled.run.effect = _no_op
    patches.setattr(ops, "tracing", lambda: True)  # no flag read, as on the GPU
    try:
        q, k, v = fakes_module._inputs()
        cfg = fakes_module.CFG
        calls_ = {"select_blocks": lambda: optimized.select_blocks(q, k, cfg),
                  "prism_attention": lambda: optimized.prism_attention(q, k, v, cfg)}
        row = {}
        for name, fn in calls_.items():
            row[f"{name}_plan"] = _cpu_us(fn, calls)
            with _General():
                row[f"{name}_general"] = _cpu_us(fn, calls)
        row["plan_stats"] = dict(call_plan.PLAN_STATS)
        return row, profile(calls_["prism_attention"], calls, lines=25)
    finally:
        next(fixture, None)
        patches.undo()


def _graph_us(fn, repeats=10):
    """Device microseconds per call of ``fn`` from the replay of a graph of ``repeats`` calls."""
    return graph_ms(fn, repeats) * 1e3


def _gpu_one(n, row):
    cfg = PrismConfig()
    q, k, _ = qkv(n)
    layout = ops._layout(n, n, cfg.block_size, True)
    high, low = band_sizes(q.shape[3], cfg.high_dim, cfg.low_dim)
    tuning = sel.SelectionTuning(overlap=False)
    row[f"pooling_{n}_us"] = _graph_us(
        lambda: pooling.pool_tiles_and_energy(q, k, layout, high, low, cfg.rope_layout))
    row[f"select_tiles_{n}_us"] = _graph_us(
        lambda: sel.select_tiles(q, k, cfg, True, layout, high, low, write_mask=True,
                                 write_indices=True, tuning=tuning))
    # Without the compaction (mask only): the difference is what writing indices costs.
    row[f"select_tiles_mask_only_{n}_us"] = _graph_us(
        lambda: sel.select_tiles(q, k, cfg, True, layout, high, low, write_mask=True,
                                 write_indices=False, tuning=tuning))
    # p = 1 keeps every positive tile: no bisection, so the difference is its cost.
    dense = PrismConfig(high_threshold=1.0, low_threshold=1.0)
    row[f"select_tiles_p1_{n}_us"] = _graph_us(
        lambda: sel.select_tiles(q, k, dense, True, layout, high, low, write_mask=True,
                                 write_indices=True, tuning=tuning))


def gpu_part(lengths=(4096, 8192, 131072)):
    """Device time of pooling and of select_tiles from CUDA-graph replays (no host cost)."""
    row = {}
    for n in lengths:
        _gpu_one(n, row)
    return row


def _eager_one(n, row):
    q, k, v = qkv(n)
    row[f"select_blocks_{n}_ms"] = bench(lambda: optimized.select_blocks(q, k))
    row[f"prism_attention_{n}_ms"] = bench(lambda: optimized.prism_attention(q, k, v))
    with _TritonLaunches():
        row[f"select_blocks_{n}_triton_launch_ms"] = bench(lambda: optimized.select_blocks(q, k))


def eager_part(lengths=(4096, 8192, 131072)):
    row = {}
    for n in lengths:
        _eager_one(n, row)
    return row


class _NoFlagRead:
    """The eager NaN-flag read off while inside (the host never waits, as compiled code)."""

    def __enter__(self):
        self.saved = ops.tracing
        ops.tracing = lambda: True

    def __exit__(self, *exc):
        ops.tracing = self.saved


def _compiled_one(spec, prof):
    """One shape of :func:`compiled_part`."""
    from bench_matrix import cudnn_ms, parse_shape, structured_qkv

    n, d, hq, hkv, b = parse_shape(spec)
    q, k, v = structured_qkv(n, hq=hq, hkv=hkv, d=d, b=b)
    row = {"tokens": n, "head_dim": d, "q_heads": hq, "kv_heads": hkv, "batch": b}
    eager = lambda: optimized.prism_attention(q, k, v)  # noqa: E731
    compiled_fn = torch.compile(lambda q, k, v: optimized.prism_attention(q, k, v),
                                fullgraph=True, dynamic=False)
    compiled = lambda: compiled_fn(q, k, v)  # noqa: E731
    hits = call_plan.PLAN_STATS["attention"]
    outs = [compiled() for _ in range(3)]  # seen, recorded, replayed
    row["compiled_replays_of_3"] = call_plan.PLAN_STATS["attention"] - hits
    with _General():
        general_out = optimized.prism_attention(q, k, v)
    row["compiled_equal_general"] = all(torch.equal(o, general_out) for o in outs)
    row["eager_ms"] = bench(eager)
    row["compiled_ms"] = bench(compiled)
    row["graph_ms"] = _graph_us(eager, repeats=1) / 1e3
    row["cudnn_ms"], row["dense_backend"] = cudnn_ms(q, k, v)
    row["compiled_host_us"] = host_us(compiled)
    with _NoFlagRead():
        row["eager_host_us"] = host_us(eager)
    with _General():  # the operator bodies without call plans
        row["compiled_no_plan_ms"] = bench(compiled)
        row["compiled_no_plan_host_us"] = host_us(compiled)
    # block_sparse_attention, eager: planned (after) and general path (before), on the
    # selection's TileMask (carried indices) and on its plain bool tensor (indices built).
    mask = optimized.select_blocks(q, k)
    plain = mask.as_tensor().clone()
    for name, m in (("tile_mask", mask), ("bool_mask", plain)):
        fn = lambda m=m: optimized.block_sparse_attention(q, k, v, m)  # noqa: E731
        with _General():
            reference = fn()
            row[f"bsa_{name}_general_ms"] = bench(fn)
            with _NoFlagRead():
                row[f"bsa_{name}_general_host_us"] = host_us(fn)
        hits = call_plan.PLAN_STATS["block_sparse"]
        got = [fn() for _ in range(3)]
        row[f"bsa_{name}_replays_of_3"] = call_plan.PLAN_STATS["block_sparse"] - hits
        row[f"bsa_{name}_equal_general"] = all(torch.equal(o, reference) for o in got)
        row[f"bsa_{name}_ms"] = bench(fn)
        with _NoFlagRead():
            row[f"bsa_{name}_host_us"] = host_us(fn)
    # Another mask's values through the same plan: the indices are this call's.
    other = plain.clone()
    other[..., 1:, 0] = ~other[..., 1:, 0]
    with _General():
        reference = optimized.block_sparse_attention(q, k, v, other)
    hits = call_plan.PLAN_STATS["block_sparse"]
    row["bsa_other_mask_equal_general"] = torch.equal(
        optimized.block_sparse_attention(q, k, v, other), reference)
    row["bsa_other_mask_replayed"] = call_plan.PLAN_STATS["block_sparse"] - hits
    if row["cudnn_ms"]:
        for name in ("eager", "compiled", "graph"):
            row[f"cudnn_over_{name}"] = row["cudnn_ms"] / row[f"{name}_ms"]
    if n == 4096 and d == 128:
        prof["compiled_4096"] = profile(compiled, lines=30)
    print("compiled", spec, json.dumps(row), flush=True)
    return row


def compiled_part(specs=("4096", "8192", "8192/64/32/8/1", "8192/256/32/8/1"), rows=None,
                  save=None):
    """``prism_attention`` compiled with ``fullgraph=True`` (static shapes) beside eager,
    CUDA-graph replay and cuDNN SDPA on the e2e inputs of ``bench_matrix.py``'s graph part
    (``N`` or ``N/D/HQ/HKV/B``): do_bench medians, host microseconds per call (flag read
    off for eager), plan replays and bitwise equality with the general path; the compiled
    call with plans off (its operator bodies on the general path); eager
    ``block_sparse_attention`` with and without its plan, on a TileMask and on a plain
    mask; a cProfile of the compiled call at 4K, D 128. Rows are appended to ``rows``
    and ``save()`` is called after each (a run cut short keeps the shapes it finished)."""
    prof = {}
    rows = [] if rows is None else rows
    for spec in specs:
        rows.append(_compiled_one(spec, prof))
        if save is not None:
            save()
    return rows, prof


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--parts", default="host,check,launch,gpu,eager")
    parser.add_argument("--host-lengths", default="4096,8192",
                        help="token counts of the host part")
    parser.add_argument("--compiled-shapes", default="4096,8192,8192/64/32/8/1,8192/256/32/8/1",
                        help="shapes of the compiled part (N or N/D/HQ/HKV/B)")
    parser.add_argument("--commit", default="", help="the commit measured (recorded)")
    parser.add_argument("--lengths", default="4096,8192,131072",
                        help="token counts of the gpu and eager parts")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    result = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
              "torch": torch.__version__, "commit": args.commit, "command": " ".join(sys.argv)}
    lengths = [int(n) for n in args.lengths.split(",")]

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    if "cpu" in parts:
        result["cpu_us"], result["profile_cpu"] = cpu_part()
        print("cpu_us", json.dumps(result["cpu_us"], indent=0), flush=True)
        print(result["profile_cpu"][-3000:])
        save()
    if "host" in parts:
        result["host_us"], result["profile"] = host_part(
            [int(n) for n in args.host_lengths.split(",")])
        print("host_us", json.dumps(result["host_us"], indent=0), flush=True)
        save()
    if "check" in parts:
        result["plan_check"] = plan_check()
        print("plan_check", json.dumps(result["plan_check"]), flush=True)
        save()
    if "launch" in parts:
        result["launch_us"] = launch_part()
        print("launch_us", json.dumps(result["launch_us"], indent=0), flush=True)
        save()
    if "gpu" in parts:
        result["gpu_us"] = gpu_part(lengths)
        print("gpu_us", json.dumps(result["gpu_us"], indent=0), flush=True)
        save()
    if "compiled" in parts:
        result["compiled"] = []
        _, result["profile_compiled"] = compiled_part(args.compiled_shapes.split(","),
                                                      result["compiled"], save)
        print(result["profile_compiled"].get("compiled_4096", "")[-3500:])
        save()
    if "eager" in parts:
        result["eager_ms"] = eager_part(lengths)
        print("eager_ms", json.dumps(result["eager_ms"], indent=0), flush=True)
        save()
    result["launch_stats"] = dict(launch.STATS)
    save()
    print(result.get("profile", {}).get("prism_attention_plan", "")[-2500:])


if __name__ == "__main__":
    main()
