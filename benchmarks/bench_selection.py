"""Selection's device time per tuning, as CUDA-graph replays (issue #14, selection targets).

For each length (32/8 heads, D 128, bf16, tile 128, causal, random inputs):
pooling alone, then ``select_tiles`` (mask + indices) under each tuning of
``--variants`` and, with ``--baseline``, an older copy of
``optimized/selection.py`` (benchmarks/NOTES.md: git show + absolute imports;
since the launch plan moved to ``optimized/selection_plan.py`` the old copy
needs its own plan module too, beside it in ``benchmarks/``, imported by
name), each checked bit for bit against the first; the floor reads Q and K
once and writes the mask and int32 indices once, at the measured copy bandwidth.

Usage (GPU machine, repository root)::

    python benchmarks/bench_selection.py --baseline /tmp/old_selection.py \
        --out benchmarks/results/h200_selection_<sha>.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_prism import (  # noqa: E402  (one definition each)
    BLOCK,
    HEAD_DIM,
    HEADS,
    bench,
    ceilings,
    environment,
    graph_ms,
    log,
    random_inputs,
)

from prism import optimized  # noqa: E402
from prism.reference import band_sizes, resolve_config, tile_layout  # noqa: E402


def selection_graph(lengths, copy_tb_s, baseline_path=None, budget_s=100.0, names=None,
                    pooling_shapes=()):
    """Device time of selection (mask + indices) per length and tuning, as graph replays;
    ``baseline_path``: an older copy of optimized/selection.py, timed and compared bit
    for bit. The floor reads Q and K once and writes the mask and int32 indices once."""
    from prism.optimized.selection import SelectionTuning as Tuning
    baseline = None
    if baseline_path:
        spec = importlib.util.spec_from_file_location("selection_baseline", baseline_path)
        baseline = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    variants = {"default": None, "check_every_1": Tuning(check_every=1),
                "num_stages_2": Tuning(num_stages=2), "unstacked": Tuning(stack_bands_max_width=0),
                "elements_per_thread_16": Tuning(elements_per_thread=16),
                # Rows of 2048 key tiles (256K tokens at tile 128) on the tensor cores.
                "dot_2048": Tuning(dot_max_width=2048),
                "dot_2048_stages_1": Tuning(dot_max_width=2048, num_stages=1),
                "dot_2048_stages_2": Tuning(dot_max_width=2048, num_stages=2),
                # Shapes around the default (a second "default" gauges the run's spread).
                "default_again": None, "rows_32": Tuning(rows_per_program=32),
                "merge_32": Tuning(merge_width=32), "merge_64": Tuning(merge_width=64),
                "merge_128": Tuning(merge_width=128), "merge_256": Tuning(merge_width=256),
                "merge_512": Tuning(merge_width=512),
                "check_every_4": Tuning(check_every=4), "stages_4": Tuning(num_stages=4),
                "no_overlap": Tuning(overlap=False),
                "elements_per_thread_64": Tuning(elements_per_thread=64)}
    variants = {name: variants[name] for name in (names or variants)}
    started = time.time()
    return [_selection_length(n, copy_tb_s, variants, baseline, started, budget_s,
                              pooling_shapes)
            for n in lengths]


def _selection_length(n, copy_tb_s, variants, baseline, started, budget_s, pooling_shapes=()):
    from prism.optimized import selection
    from prism.optimized.pooling import pool_tiles_and_energy

    q, k, _ = random_inputs(n)
    cfg = resolve_config(None, block_size=BLOCK)
    layout = tile_layout(n, n, BLOCK, True)
    high, low = band_sizes(HEAD_DIM, cfg.high_dim, cfg.low_dim)
    nt = layout.num_key_tiles
    floor = (q.numel() + k.numel()) * 2 + HEADS * nt * (nt * 5 + 4)
    row = {"tokens": n, "floor_ms": floor / copy_tb_s / 1e9, "graph_ms": {}, "equal": {}}
    row["graph_ms"]["pooling"] = graph_ms(
        lambda: pool_tiles_and_energy(q, k, layout, high, low, cfg.rope_layout))
    for rows_per_load, warps in pooling_shapes:
        pooled = pool_tiles_and_energy(q, k, layout, high, low, cfg.rope_layout,
                                       rows_per_load=rows_per_load, num_warps=warps)
        plain = pool_tiles_and_energy(q, k, layout, high, low, cfg.rope_layout)
        name = f"pooling_{rows_per_load}x{warps}"
        row["graph_ms"][name] = graph_ms(
            lambda r=rows_per_load, w=warps: pool_tiles_and_energy(
                q, k, layout, high, low, cfg.rope_layout, rows_per_load=r, num_warps=w))
        # fp32 sums in another order: compare within a relative 1e-5.
        row["equal"][name] = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                                 for a, b in zip(pooled[:2], plain[:2], strict=True))
    modules = [("baseline", baseline, None)] if baseline is not None else []
    modules += [(name, selection, tuning) for name, tuning in variants.items()]
    first = None
    for name, module, tuning in modules:
        if time.time() - started > budget_s:
            row["skipped_from"] = name
            break

        def run(module=module, tuning=tuning):
            return module.select_tiles(q, k, cfg, True, layout, high, low, write_mask=True,
                                       write_indices=True, tuning=tuning)[:3]
        got = run()
        first = got if first is None else first
        row["equal"][name] = all(torch.equal(a, b) for a, b in zip(got, first, strict=True))
        row["graph_ms"][name] = graph_ms(run)
        log(f"  {n}: {name} {row['graph_ms'][name]:.4f} ms, equal {row['equal'][name]}")
    row["eager_select_blocks_ms"] = bench(lambda: optimized.select_blocks(q, k))
    log(f"  {n}: {row}")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--lengths", default="8192,131072,4096,32768")
    parser.add_argument("--baseline", default=None,
                        help="path of an older selection module to compare")
    parser.add_argument("--variants", default=None, help="comma-separated tunings to time")
    parser.add_argument("--budget-s", type=float, default=100.0,
                        help="seconds after which the remaining tunings are skipped")
    parser.add_argument("--pooling-shapes", default="",
                        help="pooling launch shapes to time beside the default, as "
                             "ROWSxWARPS (token rows per load x warps), comma-separated")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_selection.py needs a CUDA GPU")
    result = {"environment": environment(args.commit), "mode": "selection",
              "ceilings": ceilings()}
    result["selection"] = selection_graph(
        [int(x) for x in args.lengths.split(",")], result["ceilings"]["copy_tb_s"],
        args.baseline, budget_s=args.budget_s,
        names=args.variants.split(",") if args.variants else None,
        pooling_shapes=[tuple(map(int, shape.split("x")))
                        for shape in args.pooling_shapes.split(",") if shape])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
