"""GQA groups too large for one packed program, split over several or not (H200).

Before the split (``PackedTuning.heads``), a group whose rows pass
``antidiagonal_packed.MAX_ROWS`` (32 query heads per KV head at stride 8 or 16,
say) fell back to the per-head antidiagonal kernel (dense scores) or to the
reference stage in torch (the cascade's candidate-restricted scores). For each
``tokens:hq:hkv`` case, on the structured inputs of ``bench_prism.py`` drawn
with ``hq`` query and ``hkv`` KV heads (D 128, bf16), this times as CUDA-graph
replays, with the packed kernel allowed (split) and refused (the fallbacks):

* the dense stride-8 scores (E5's stage);
* the accurate preset's restricted scores (its candidates from Prism's kernel);
* the accurate preset's whole ``select_blocks`` call (graph replay and eager),
  and Prism's default selection for scale;

and reports each pair's largest difference (scores) or mask equality::

    python3 benchmarks/probes/large_groups.py --cases 32768:32:1 --out x.json
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_prism import bench, graph_ms, structured_inputs  # noqa: E402
from probe_cli import run  # noqa: E402

import prism.optimized.cascade as cascade  # noqa: E402
import prism.optimized.estimators as estimators  # noqa: E402
from prism import optimized  # noqa: E402
from prism.optimized import call_plan  # noqa: E402
from prism.reference import PrismConfig, tile_layout  # noqa: E402
from prism.reference.scoring import admissible_tiles  # noqa: E402


def _graph(fn):
    """Graph-replay ms, or the capture's error (the torch fallback may not capture)."""
    try:
        return graph_ms(fn)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return f"{type(error).__name__}: {str(error)[:120]}"


def row(tokens: int, hq: int, hkv: int) -> dict:
    q, k, _ = structured_inputs(tokens, heads=hq, kv_heads=hkv)
    preset = PrismConfig.preset("accurate")
    layout = tile_layout(tokens, tokens, preset.block_size, True)
    keep = admissible_tiles(layout, True, q.device)
    cand = cascade.prism_candidate_tiles_kernel(q, k, preset, True)
    out = {"tokens": tokens, "hq": hq, "hkv": hkv}
    real = (estimators.antidiagonal_packed_applies, cascade.antidiagonal_packed_applies)

    def allow(split: bool):
        for module, fn in zip((estimators, cascade), real, strict=True):
            module.antidiagonal_packed_applies = fn if split else (lambda *a: False)
        call_plan._PLANS.clear()

    results = {}
    try:
        for split in (True, False):
            allow(split)
            name = "split" if split else "fallback"

            def dense():
                return estimators.antidiagonal_tile_scores(q, k, layout, 8, True,
                                                           normalize=True)

            def restricted():
                return cascade.candidate_antidiagonal_tile_probabilities(
                    q, k, layout, preset.antidiagonal_stride, cand, True)

            def whole():
                return optimized.select_blocks(q, k, preset)

            results[name] = (dense().where(keep, 0.0), restricted().where(keep, 0.0),
                             whole().as_tensor().clone())
            out[f"{name}_dense_stride8_graph_ms"] = _graph(dense)
            out[f"{name}_restricted_graph_ms"] = _graph(restricted)
            out[f"{name}_preset_graph_ms"] = _graph(whole)
            out[f"{name}_preset_eager_ms"] = bench(whole)
    finally:
        allow(True)
    out["prism_graph_ms"] = graph_ms(lambda: optimized.select_blocks(q, k, PrismConfig()))
    split, fallback = results["split"], results["fallback"]
    out["dense_max_diff"] = float((split[0] - fallback[0]).abs().max())
    out["restricted_max_diff"] = float((split[1] - fallback[1]).abs().max())
    out["preset_masks_equal"] = bool(torch.equal(split[2], fallback[2]))
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    run(row, __doc__, "large_groups.py", "--cases", "8192:32:1,32768:32:1",
        parse=lambda case: tuple(int(x) for x in case.split(":")))
