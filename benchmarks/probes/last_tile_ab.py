"""What the cascade's last-tile rule costs on the GPU: the accurate preset's selection
with and without it, interleaved, at several lengths in one run (eager and CUDA-graph
ms), and how many tiles it adds.

"Without" runs the fused path with the rule's stage left out of the estimator's fused
form (a probe-only switch: the registry's cascade always has it), so both variants run
the same kernels apart from the rule's extra programs and the row it adds.

    python3 benchmarks/probes/last_tile_ab.py --lengths 8192,32768,131072 --out x.json
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_matrix import structured_qkv  # noqa: E402
from probe_cli import run, time_variants  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import call_plan, estimator_path  # noqa: E402
from prism.reference import PrismConfig  # noqa: E402
from prism.reference.registry import estimator_spec  # noqa: E402


def _set_rule(on: bool) -> None:
    estimator_path._FORMS.clear()
    form = estimator_path.fused_form(estimator_spec("cascade"))
    if not on:
        estimator_path._FORMS["cascade"] = (*form[:3], False, form[4])


def row(n):
    q, k, _ = structured_qkv(n)
    out = {"tokens": n}
    preset = PrismConfig.preset("accurate")
    settings = [("with_rule" if on else "without_rule", lambda on=on: _set_rule(on))
                for on in (False, True, False, True)]
    masks = time_variants(lambda: optimized.select_blocks(q, k, preset), settings, out,
                          lambda: _set_rule(True))
    added = masks["with_rule"] & ~masks["without_rule"]
    out["rule_only_adds"] = bool(not (masks["without_rule"] & ~masks["with_rule"]).any())
    out["tiles_added"] = int(added.sum())
    out["tiles_added_outside_last_row"] = int(added[..., :-1, :].sum())
    out["density_with_rule"] = float(masks["with_rule"].float().mean())
    out["plan_stats"] = dict(call_plan.PLAN_STATS)
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    run(row, __doc__, "last_tile_ab.py", "--lengths", "8192,32768,131072", argv)


if __name__ == "__main__":
    main()
