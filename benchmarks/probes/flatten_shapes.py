"""The packed antidiagonal kernel with its first pass's loop nest flattened or not (H200).

Triton pipelines the innermost loop holding the loads: in the packed kernel
that is the loop over the rows ``u`` of a group, so each key block starts
by waiting for its first loads, issued only after the previous block's
softmax step. ``tl.range(..., flatten=True)`` on the key-block loop makes
one loop of (key block, ``u``) whose next loads are in flight during that
step (``antidiagonal_packed.FLATTEN_DENSE`` / ``FLATTEN_CANDIDATES``).

For each length, on the structured inputs of ``bench_prism.py`` (32/8 heads,
D 128, bf16), the kernel alone at stride 8 as CUDA-graph replays, for each
variant ``flatten,rows,kg,warps,stages,one_pass,tma``, the whole sequence twice
(interleaved); ``--path candidates`` times the accurate preset's
candidate-restricted call instead (its candidates from Prism's kernel). The
largest difference from the first variant's result at the admissible tiles is
reported::

    python3 benchmarks/probes/flatten_shapes.py --lengths 32768 \\
        --variants "0,128,256,8,2,1,1;1,128,256,8,2,1,1" --out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_prism import graph_ms, structured_inputs  # noqa: E402
from probe_cli import save  # noqa: E402

from prism.optimized import antidiagonal_packed as packed  # noqa: E402
from prism.optimized.cascade import prism_candidate_tiles_kernel  # noqa: E402
from prism.reference import PrismConfig, tile_layout  # noqa: E402
from prism.reference.scoring import admissible_tiles  # noqa: E402


def parse_variant(text: str):
    flatten, *shape = (int(x) for x in text.split(","))
    return bool(flatten), packed.PackedTuning(*shape)


def row(n: int, variants: list, path: str, stride: int) -> dict:
    q, k, _ = structured_inputs(n)
    layout = tile_layout(n, n, 128, True)
    keep = admissible_tiles(layout, True, q.device)  # the rest is not written
    cand = None
    if path == "candidates":
        cand = prism_candidate_tiles_kernel(q, k, PrismConfig.preset("accurate"), True)
    name_of = {"dense": "FLATTEN_DENSE", "candidates": "FLATTEN_CANDIDATES"}[path]
    saved = getattr(packed, name_of)
    out = {"tokens": n, "path": path, "stride": stride}
    first = None
    try:
        for _ in range(2):
            for flatten, tuning in variants:
                setattr(packed, name_of, flatten)
                name = f"{int(flatten)}," + ",".join(str(x) for x in vars(tuning).values())

                def call(t=tuning):
                    return packed.antidiagonal_packed_probabilities(
                        q, k, layout, stride, True, t, normalize=False, candidates=cand)

                result = call().where(keep, 0.0)
                first = result if first is None else first
                out.setdefault(f"{name}_graph_ms", []).append(graph_ms(call))
                out[f"{name}_max_diff"] = float((result - first).abs().max())
    finally:
        setattr(packed, name_of, saved)
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--variants", default="0,128,256,8,2,1,1;1,128,256,8,2,1,1")
    parser.add_argument("--path", choices=("dense", "candidates"), default="dense")
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--out", default="")
    parser.add_argument("--commit", default="")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants.split(";") if v]
    rows = [row(int(n), variants, args.path, args.stride) for n in args.lengths.split(",")]
    save(rows, args.out, args.commit, "flatten_shapes.py", argv)
    return rows


if __name__ == "__main__":
    main()
