"""The accurate preset's candidate-restricted scores under other launch forms (H200).

For each length, on the structured inputs of ``bench_prism.py`` (32/8 heads,
D 128, bf16): the whole ``select_blocks`` call of the accurate preset, eager
and as CUDA-graph replays, and the restricted scores alone (graph replays),
with the candidate launch shape (``CANDIDATE_TUNED`` at the preset's groups
per tile) set to each variant in turn, the whole sequence twice, interleaved.
Masks are compared with the first variant's, and the scores' largest
difference from it at the admissible tiles is reported. Variants are
``rows,kg,warps,stages,one_pass,tma``::

    python3 benchmarks/probes/candidate_shapes.py --lengths 8192,32768 \\
        --variants "64,64,4,3,1,1;64,32,4,3,1,1" --out x.json

(``results/h200_candidate_shapes_bd9e739.json`` was taken at bd9e739, where a
``gather:`` prefix also switched between the gathered candidate tiles, 1, and
the whole key blocks holding a candidate that the kernel scored before, 0.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_prism import graph_ms, structured_inputs  # noqa: E402
from probe_cli import save, time_variants  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import antidiagonal_packed as packed  # noqa: E402
from prism.optimized.cascade import prism_candidate_tiles_kernel  # noqa: E402
from prism.reference import PrismConfig, tile_layout  # noqa: E402
from prism.reference.scoring import admissible_tiles  # noqa: E402


def parse_variant(text: str):
    return packed.PackedTuning(*(int(x) for x in text.split(",")))


def row(n: int, variants: list) -> dict:
    q, k, _ = structured_inputs(n)
    cfg = PrismConfig.preset("accurate")
    per_tile = cfg.block_size // cfg.antidiagonal_stride
    saved = dict(packed.CANDIDATE_TUNED)

    def put(tuning):
        packed.CANDIDATE_TUNED[per_tile] = tuning

    def restore():
        packed.CANDIDATE_TUNED.clear()
        packed.CANDIDATE_TUNED.update(saved)

    names = [",".join(str(x) for x in vars(t).values()) for t in variants]
    settings = [(name, lambda v=v: put(v)) for name, v in zip(names, variants, strict=True)] * 2
    out = {"tokens": n}
    masks = time_variants(lambda: optimized.select_blocks(q, k, cfg), settings, out, restore)
    out["masks_equal"] = {name: bool(torch.equal(m, masks[names[0]])) for name, m in masks.items()}
    # The restricted scores alone.
    layout = tile_layout(n, n, cfg.block_size, True)
    cand = prism_candidate_tiles_kernel(q, k, cfg, True)
    keep = admissible_tiles(layout, True, q.device)
    first = None
    try:
        for name, v in zip(names, variants, strict=True):
            put(v)

            def call():
                return packed.antidiagonal_packed_probabilities(
                    q, k, layout, cfg.antidiagonal_stride, True, normalize=False,
                    candidates=cand)

            scores = torch.where(keep, call(), 0.0)
            first = scores if first is None else first
            out[f"{name}_stage_graph_ms"] = graph_ms(call)
            out[f"{name}_stage_max_diff"] = float((scores - first).abs().max())
    finally:
        restore()
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--variants", default="64,64,4,3,1,1;64,32,4,3,1,1")
    parser.add_argument("--out", default="")
    parser.add_argument("--commit", default="")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants.split(";") if v]
    rows = [row(int(n), variants) for n in args.lengths.split(",")]
    save(rows, args.out, args.commit, "candidate_shapes.py", argv)
    return rows


if __name__ == "__main__":
    main()
