"""The accurate modes' selections at other head dims (H200).

For each ``tokens:head_dim`` case, on the structured inputs of ``bench_prism.py``
drawn at that D (32/8 heads, bf16), the whole ``select_blocks`` call as CUDA-graph
replays for Prism's default, the accurate preset and E5 (``antidiagonal_vertical_slash``
at stride 8), with the packed antidiagonal launch shapes each call takes; up to
8K tokens also the number of tiles where the preset's mask differs from the
reference's (up to its top-p boundary ties)::

    python3 benchmarks/probes/estimator_head_dims.py --cases 32768:64,32768:256 --out x.json
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_prism import graph_ms, structured_inputs  # noqa: E402
from constant_variants import SETTINGS  # noqa: E402
from probe_cli import run  # noqa: E402

from prism import optimized, reference  # noqa: E402
from prism.optimized import antidiagonal_packed as packed  # noqa: E402

COMPARE_MAX_TOKENS = 8192


def row(tokens: int, head_dim: int) -> dict:
    q, k, _ = structured_inputs(tokens, head_dim=head_dim)
    out = {"tokens": tokens, "head_dim": head_dim}
    settings = {name: SETTINGS[name]() for name in ("prism", "preset", "e5")}
    for name, cfg in settings.items():
        out[f"{name}_graph_ms"] = graph_ms(lambda c=cfg: optimized.select_blocks(q, k, c))
    group = q.shape[1] // k.shape[1]
    for name, candidates in (("preset", True), ("e5", False)):
        cfg = settings[name]
        out[f"{name}_tuning"] = str(packed.default_tuning(
            cfg.block_size // cfg.antidiagonal_stride, group, head_dim, candidates))
    if tokens <= COMPARE_MAX_TOKENS:
        cfg = settings["preset"]
        got = optimized.select_blocks(q, k, cfg).as_tensor()
        want = reference.select_blocks(q, k, cfg)
        want = want.as_tensor() if hasattr(want, "as_tensor") else want
        out["preset_tiles_differing"] = int((got != want).sum())
        out["preset_tiles"] = int(want.sum())
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    run(row, __doc__, "estimator_head_dims.py", "--cases", "8192:64,32768:64,32768:96,32768:256",
        parse=lambda case: tuple(int(x) for x in case.split(":")))
