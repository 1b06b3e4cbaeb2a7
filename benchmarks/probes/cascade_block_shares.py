"""How much of the dense antidiagonal work the cascade's restricted kernel can skip (CPU).

For ``bench_prism.py``'s structured inputs (RoPE'd q and k sharing a per-head
direction; here drawn by the CPU generator, so not the GPU run's values) at
32/8 heads, D 128, tile 128, causal: Prism's candidate mask at each
``candidate_threshold`` (the reference's ``trace_selection``, both bands at
``c``), its density over the admissible tiles, and for several launch shapes
of the packed kernel the key blocks the restricted kernel scores (per
program, its listed candidate tiles gathered ``block_kg // per_tile`` to a
block; results before commit bd9e739 counted the whole key blocks holding a
candidate, which the kernel scored then), out of those the dense kernel
scores; and per program of 1, 2 or 4 query tiles, the key tiles it lists.
No timing::

    python benchmarks/probes/cascade_block_shares.py --commit <hash> \
        --out benchmarks/results/cpu_cascade_block_shares_<hash>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench_estimators import _active_blocks  # noqa: E402

from prism.optimized.antidiagonal_packed import PackedTuning, default_tuning  # noqa: E402
from prism.reference import PrismConfig, apply_rope, tile_layout, trace_selection  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, STRIDE = 32, 8, 128, 32
SHAPES = ("64,64", "32,32", "16,16")


def structured_inputs_cpu(n, seed=1, base=500000.0, sharpness=2.0):
    """``bench_prism.structured_inputs`` on the CPU (bf16)."""
    gen = torch.Generator().manual_seed(seed)
    topic = torch.randn(1, KV_HEADS, 1, HEAD_DIM, generator=gen)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen) + 1.5 * topic
    q = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen)
         + 1.5 * topic.repeat_interleave(HEADS // KV_HEADS, dim=1)) * sharpness
    return (apply_rope(q, base).to(torch.bfloat16), apply_rope(k, base).to(torch.bfloat16))


def listed_tiles(cand, tiles: int) -> dict:
    """Mean and largest number of key tiles the restricted kernel lists per program when
    a program holds ``tiles`` query tiles of every head of a GQA group (the key tiles
    in which some of its rows has a candidate), and the mean whole key blocks of 8 tiles
    holding one (what the kernel scored before bd9e739)."""
    b, hq, nq, nk = cand.shape
    any_head = cand.view(b, KV_HEADS, hq // KV_HEADS, nq, nk).any(2)
    pad_q, pad_k = -nq % tiles, -nk % 8
    any_head = torch.nn.functional.pad(any_head, (0, pad_k, 0, pad_q))
    union = any_head.view(b, KV_HEADS, (nq + pad_q) // tiles, tiles, nk + pad_k).any(3)
    listed = union.sum(-1).float()
    blocks = union.view(*union.shape[:3], -1, 8).any(-1).sum(-1).float()
    return {"mean": float(listed.mean()), "max": int(listed.max()),
            "blocks_of_8_mean": float(blocks.mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--thresholds", default="0.99,0.95")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    per_tile = 128 // STRIDE
    shapes = {"default": default_tuning(per_tile, HEADS // KV_HEADS, HEAD_DIM)}
    shapes.update({text: PackedTuning(*(int(x) for x in text.split(","))) for text in SHAPES})
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        q, k = structured_inputs_cpu(n)
        layout = tile_layout(n, n, 128, True)
        for c in (float(x) for x in args.thresholds.split(",")):
            started = time.time()
            cfg = PrismConfig.preset("accurate", estimator="prism", high_threshold=c,
                                     low_threshold=c)
            cand = trace_selection(q, k, cfg).mask
            nt = cand.shape[-1]
            row = {"tokens": n, "candidate_threshold": c,
                   "candidate_density": float(cand.sum()) / (HEADS * nt * (nt + 1) / 2),
                   "key_blocks_scored": {
                       name: _active_blocks(cand, layout, STRIDE, tuning, KV_HEADS)
                       for name, tuning in shapes.items()},
                   "launch_shapes": {name: [t.target_rows, t.block_kg]
                                     for name, t in shapes.items()},
                   "listed_tiles": {tiles: listed_tiles(cand, tiles) for tiles in (1, 2, 4)}}
            row["wall_s"] = time.time() - started
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"commit": args.commit, "stride": STRIDE, "heads": [HEADS, KV_HEADS],
              "head_dim": HEAD_DIM, "inputs": "structured (CPU generator)", "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
