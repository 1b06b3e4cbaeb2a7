"""What the cascade's sampled-query stage costs on the GPU, in each of its forms.

For each length (the structured inputs of ``bench_matrix.py``: 32/8 heads, D 128,
bf16, tile 128, causal), the accurate preset's whole selection without the stage
(``sampled_weight`` 0, the preset until 2026-12-05), and with 8 sampled queries at
weight 0.3 in the stage's one-pass form (``candidate_sampled.ONE_PASS``, a scratch
buffer) beside the antidiagonal kernel (``estimator_path.SAMPLED_BESIDE``) or in
place after it (``in_place``), and
scored inside the antidiagonal launch (``fused``, ``estimator_path.SAMPLED_FUSED``,
in its default shape ``antidiagonal_shapes.SAMPLED_TUNED[8]`` and in 64 x 32 on 8
or 4 warps and 32 x 32 on 4; the 32- and 128-row forms of
``candidate_sampled.TARGET_ROWS`` that d191a48's run timed are in
``h200_sampled_beside_d191a48.json``, the two-pass form too), interleaved, as
eager and CUDA-graph ms; whether the forms' masks are equal, and how many tiles the
stage changes.

    python3 benchmarks/probes/sampled_passes.py --lengths 8192,32768,131072 --out x.json
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import structured_qkv  # noqa: E402
from probe_cli import run, time_variants  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import (  # noqa: E402
    antidiagonal_shapes,
    call_plan,
    candidate_sampled,
    estimator_path,
)
from prism.optimized.antidiagonal_shapes import PackedTuning  # noqa: E402
from prism.reference import PrismConfig  # noqa: E402


def row(n):
    q, k, _ = structured_qkv(n)
    out = {"tokens": n}
    # "preset" is the cascade without the stage (the preset until 2026-12-05; the run
    # at 79a53c9 took PrismConfig.preset("accurate") here, which by then had the stage,
    # so its "preset" and "one_pass" columns time the same selection).
    configs = {"preset": PrismConfig.preset("accurate", sampled_weight=0.0),
               "sampled": PrismConfig.preset("accurate", sampled_queries=8, sampled_weight=0.3)}
    chosen = {}

    default_shape = antidiagonal_shapes.SAMPLED_TUNED[8]

    def pick(name, one_pass, rows=64, beside=True, fused=False, shape=default_shape):
        def apply():
            chosen["cfg"] = configs[name]
            candidate_sampled.ONE_PASS = one_pass
            candidate_sampled.TARGET_ROWS = rows
            estimator_path.SAMPLED_BESIDE = beside
            estimator_path.SAMPLED_FUSED = fused
            antidiagonal_shapes.SAMPLED_TUNED[8] = shape
        return apply

    def fused_shape(rows, block_kg, warps):
        return pick("sampled", True, fused=True, shape=PackedTuning(
            target_rows=rows, block_kg=block_kg, num_warps=warps, num_stages=3, one_pass=1,
            tma=1))

    settings = [("preset", pick("preset", True)), ("fused", pick("sampled", True, fused=True)),
                ("fused_64x32_8_warps", fused_shape(64, 32, 8)),
                ("fused_64x32_4_warps", fused_shape(64, 32, 4)),
                ("fused_32x32_4_warps", fused_shape(32, 32, 4)),
                ("one_pass", pick("sampled", True)),
                ("in_place", pick("sampled", True, beside=False))] * 2
    masks = time_variants(lambda: optimized.select_blocks(q, k, chosen["cfg"]), settings, out,
                          pick("preset", True, fused=True))
    out["fused_equal"] = {name: bool(masks["one_pass"].equal(masks[name]))
                          for name, _ in settings if name.startswith("fused")}
    out["in_place_equal"] = bool(masks["one_pass"].equal(masks["in_place"]))
    out["tiles_changed_by_stage"] = int((masks["one_pass"] != masks["preset"]).sum())
    out["mask_mean_preset"] = float(masks["preset"].float().mean())
    out["mask_mean_sampled"] = float(masks["one_pass"].float().mean())
    out["plan_stats"] = dict(call_plan.PLAN_STATS)
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    run(row, __doc__, "sampled_passes.py", "--lengths", "4096,8192,32768,131072", argv)


if __name__ == "__main__":
    main()
