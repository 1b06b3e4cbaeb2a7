"""What the cascade's sampled-query stage costs on the GPU, in its two forms.

For each length (the structured inputs of ``bench_matrix.py``: 32/8 heads, D 128,
bf16, tile 128, causal), the accurate preset's whole selection without the stage
(``sampled_weight`` 0, the preset until 2026-12-05), and with 8 sampled queries at
weight 0.3 in the stage's one-pass form (``candidate_sampled.ONE_PASS``, a scratch
buffer) beside the antidiagonal kernel (``estimator_path.SAMPLED_BESIDE``) or in
place after it (``in_place``), its two-pass form (scores computed twice), and
scored inside the antidiagonal launch (``fused``, ``estimator_path.SAMPLED_FUSED``;
the 32- and 128-row forms of ``candidate_sampled.TARGET_ROWS`` that d191a48's run
timed are in ``h200_sampled_beside_d191a48.json``), interleaved, as
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
from prism.optimized import call_plan, candidate_sampled, estimator_path  # noqa: E402
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

    def pick(name, one_pass, rows=64, beside=True, fused=False):
        def apply():
            chosen["cfg"] = configs[name]
            candidate_sampled.ONE_PASS = one_pass
            candidate_sampled.TARGET_ROWS = rows
            estimator_path.SAMPLED_BESIDE = beside
            estimator_path.SAMPLED_FUSED = fused
        return apply

    settings = [("preset", pick("preset", True)), ("fused", pick("sampled", True, fused=True)),
                ("one_pass", pick("sampled", True)),
                ("in_place", pick("sampled", True, beside=False)),
                ("two_pass", pick("sampled", False))] * 2
    masks = time_variants(lambda: optimized.select_blocks(q, k, chosen["cfg"]), settings, out,
                          pick("preset", True, fused=True))
    out["fused_equal"] = bool(masks["one_pass"].equal(masks["fused"]))
    out["forms_equal"] = bool(masks["one_pass"].equal(masks["two_pass"]))
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
