"""Probe: repeat one block-sparse attention launch and count outputs with NaN rows.

The GPU suite twice saw NaN rows at 32K tokens and tile density 1.0 (the
warp-specialised launch, several test processes sharing the GPU), never when
run alone. This runs the launch ``--reps`` times into NaN-filled outputs, each
time checking every row against dense SDPA, and prints one JSON line: how many
calls left NaN rows, which (head, query tile) pairs, and the largest error.
Run several copies at once to share the GPU as the test suite does.

    python benchmarks/probes/attention_repeat.py --config ws --reps 40

(``--config default`` was the warp-specialised launch when the figures in
``results/h200_attention_repeat_aec516a.json`` runs A-C were taken.)
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from test_optimized import random_tile_mask  # noqa: E402

from helpers import make_qkv  # noqa: E402
from prism.optimized.attention import (  # noqa: E402
    AttentionConfig,
    default_config,
    fallback_config,
    sparse_attention_forward,
)
from prism.optimized.indices import mask_rows_to_indices  # noqa: E402
from prism.reference import tile_layout  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--config", choices=["default", "plain", "ws"], default="default",
                        help="default: default_config; plain: fallback_config; ws: the "
                             "opt-in warp-specialised launch (the default until 2026-12-03)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, dtype = args.tokens, getattr(torch, args.dtype)
    q, k, v = (t.cuda() for t in make_qkv(1, 8, 2, n, n, 128, dtype=dtype, seed=n + 128))
    layout = tile_layout(n, n, 128, True)
    mask = random_tile_mask((1, 8, layout.num_query_tiles, layout.num_key_tiles), args.density,
                            torch.Generator().manual_seed(n), causal=True, first_tile=0,
                            keep_diagonal=True).cuda()
    num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)
    config = {"default": lambda: default_config(128, 128, dtype, False),
              "plain": lambda: fallback_config(128),
              "ws": lambda: AttentionConfig(128, 128, 4, 2, use_tma=True,
                                            warp_specialize=True)}[args.config]()
    expected = None
    if args.density == 1.0:
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True)
    bad_calls, bad_pairs, worst = 0, set(), 0.0
    started = time.time()
    for _ in range(args.reps):
        out = torch.full_like(q, math.nan)
        lse = torch.full(q.shape[:3], math.nan, dtype=torch.float32, device=q.device)
        sparse_attention_forward(q, k, v, num, idx, block_size=128, causal=True, scale=None,
                                 return_lse=True, first_query_tile=0, query_start=0,
                                 interpreted=False, out=out, lse=lse, config=config)
        rows = out.isnan().any(-1) | lse.isnan()
        if bool(rows.any()):
            bad_calls += 1
            heads, positions = rows[0].nonzero(as_tuple=True)
            bad_pairs.update(zip(heads.tolist(), (positions // 128).tolist(), strict=True))
        if expected is not None:
            worst = max(worst, float((out.float() - expected.float()).nan_to_num(1e9)
                                     .abs().max()))
    print(json.dumps({"config": args.config, "config_fields": repr(config), "reps": args.reps,
                      "bad_calls": bad_calls, "bad_pairs": sorted(bad_pairs)[:40],
                      "bad_pair_count": len(bad_pairs), "max_abs_err": worst,
                      "seconds": round(time.time() - started, 1), "pid": os.getpid()}))


if __name__ == "__main__":
    main()
