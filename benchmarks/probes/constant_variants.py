"""Whole selections under other values of a module constant that is read at launch.

For each ``--vary module:NAME=v1,v2,...`` (repeatable), per length and
setting (the accurate preset and/or Prism's default), ``select_blocks`` is
timed eagerly and as a CUDA-graph replay with the constant at its current
value first and then at each given value, the whole sequence twice
(interleaved), on the structured inputs of ``bench_prism.py``; each variant's
mask is compared with the current value's. The constant is put back after.

    python3 benchmarks/probes/constant_variants.py --lengths 8192,32768 \\
        --vary prism.optimized.vertical_slash:DISTRIBUTION_PROGRAMS=1024,512 --out x.json
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_prism import structured_inputs  # noqa: E402
from probe_cli import save, selection_args, time_variants  # noqa: E402

from prism import optimized  # noqa: E402
from prism.reference import PrismConfig  # noqa: E402

#: "e5": antidiagonal_vertical_slash at stride 8, p 0.9 in both bands, vertical-slash
#: threshold 0.5, 64 last queries (bench_estimators.py's setting of that name).
SETTINGS = {"preset": lambda: PrismConfig.preset("accurate"), "prism": PrismConfig,
            "e5": lambda: PrismConfig(estimator="antidiagonal_vertical_slash",
                                      antidiagonal_stride=8, high_threshold=0.9,
                                      low_threshold=0.9, vertical_slash_threshold=0.5,
                                      last_queries=64)}


def parse_vary(text: str):
    """``module:NAME=v1,v2`` -> (module object, NAME, [values])."""
    target, _, values = text.partition("=")
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise SystemExit(f"{module_name} has no {name}")
    return module, name, [ast.literal_eval(v) for v in values.split(",") if v]


def row(n, varies, settings):
    q, k, _ = structured_inputs(n)
    out = {"tokens": n}
    for module, name, values in varies:
        default = getattr(module, name)

        def put(value, module=module, name=name):
            setattr(module, name, value)

        variants = [(f"{name}={value}", lambda v=value: put(v))
                    for value in [default, *values]] * 2
        for setting in settings:
            cfg = SETTINGS[setting]()
            timings = {}
            masks = time_variants(lambda c=cfg: optimized.select_blocks(q, k, c), variants,
                                  timings, lambda d=default: put(d))
            base = masks[f"{name}={default}"]
            out[f"{setting}:{name}"] = timings
            out[f"{setting}:{name}:masks_equal"] = {
                variant: bool(torch.equal(mask, base)) for variant, mask in masks.items()}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    args = selection_args(__doc__, "preset", argv,
                          [("--vary", dict(action="append", required=True))])
    varies = [parse_vary(text) for text in args.vary]
    rows = [row(n, varies, args.settings) for n in args.lengths]
    save(rows, args.out, args.commit, "constant_variants.py", argv)
    return rows


if __name__ == "__main__":
    main()
