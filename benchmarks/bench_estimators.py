"""Selection cost of the opt-in estimators on the GPU, against Prism's default.

Times ``prism.optimized.select_blocks`` per estimator at several lengths with
the paper's shapes (32 query heads, 8 KV heads, D 128, bf16, tile 128,
causal), on the structured inputs of ``bench_prism.py``, next to cuDNN dense
attention measured in the same run, and writes one JSON file::

    python benchmarks/bench_estimators.py --commit <hash> \
        --out benchmarks/results/h200_estimators_<hash>.json

Where the reference implementation fits in memory (up to 32K here) it is
timed too, and the masks of both are compared (entries that differ).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_prism import bench, environment, sdpa_times, structured_inputs  # noqa: E402

from prism import optimized, reference  # noqa: E402
from prism.reference import PrismConfig  # noqa: E402

SETTINGS = {
    "prism (paper preset, p=0.95)": PrismConfig.preset("paper"),
    "accurate preset (antidiagonal_vertical_slash stride 8, p=0.9, vs=0.5)":
        PrismConfig.preset("accurate"),
    "antidiagonal_vertical_slash stride 32 (p=0.9, vs=0.5)":
        PrismConfig.preset("accurate", antidiagonal_stride=32),
    "antidiagonal_vertical_slash stride 128 (p=0.9, vs=0.5)":
        PrismConfig.preset("accurate", antidiagonal_stride=128),
    "antidiagonal stride 32 (p=0.9)": PrismConfig(estimator="antidiagonal",
                                                 antidiagonal_stride=32, high_threshold=0.9),
    "prism_vertical_slash (vs=0.5)": PrismConfig(estimator="prism_vertical_slash",
                                                 vertical_slash_threshold=0.5),
    "sampled_vertical_slash (r=4, p=0.9, vs=0.5)": PrismConfig(
        estimator="sampled_vertical_slash", sampled_queries=4, high_threshold=0.9,
        vertical_slash_threshold=0.5),
}
REFERENCE_MAX_TOKENS = 32768


def run(lengths):
    rows = []
    for n in lengths:
        q, k, v = structured_inputs(n)
        row = {"tokens": n, "sdpa_ms": sdpa_times(q, k, v), "estimators": []}
        for name, cfg in SETTINGS.items():
            entry = {"setting": name}
            entry.update(time_setting(q, k, cfg, n))
            entry["ratio_to_cudnn_dense"] = (entry["ms"] / row["sdpa_ms"]["cudnn"]
                                             if "ms" in entry else None)
            row["estimators"].append(entry)
            print(n, entry, flush=True)
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def time_setting(q, k, cfg, n):
    entry = {"config": {"estimator": cfg.estimator, "high_threshold": cfg.high_threshold,
                        "antidiagonal_stride": cfg.antidiagonal_stride,
                        "vertical_slash_threshold": cfg.vertical_slash_threshold,
                        "sampled_queries": cfg.sampled_queries}}
    try:
        mask = optimized.select_blocks(q, k, cfg)
        entry["ms"] = bench(lambda: optimized.select_blocks(q, k, cfg), rep=50)
        nt = mask.shape[-1]
        entry["density"] = float(mask.sum()) / (mask.shape[0] * mask.shape[1]
                                                * nt * (nt + 1) / 2)
        if n <= REFERENCE_MAX_TOKENS:
            expected = reference.select_blocks(q, k, cfg)
            entry["reference_ms"] = bench(lambda: reference.select_blocks(q, k, cfg), rep=10)
            entry["entries_differing_from_reference"] = int((mask != expected).sum())
            entry["entries_compared"] = int(mask.numel())
    except Exception as error:  # keep the other settings' numbers
        entry["error"] = f"{type(error).__name__}: {str(error)[:200]}"
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--lengths", default="8192,32768,131072")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_estimators.py needs a CUDA GPU")
    started = time.time()
    result = {"environment": environment(args.commit),
              "rows": run([int(x) for x in args.lengths.split(",")])}
    result["wall_s"] = time.time() - started
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
