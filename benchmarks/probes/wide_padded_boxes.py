"""Probe: K and V of head dims 129-255 through a 256-wide descriptor box.

``descriptor_rows`` lets a descriptor box be wider than the rows (zero-filled
past them) only up to 128 columns, because only boxes of 128 over 80- and
96-wide rows were checked on the H200. This probe lifts that limit for one
process and, per head dim (Q/K, V), compares the TMA launch and the pointer-load
launch with the reference and with each other on a random causal tile mask,
then times both with the table's launch shape for that head dim. One JSON line
per case, and ``--out`` gets them all.

    python benchmarks/probes/wide_padded_boxes.py --out wide_boxes.json
"""
import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from test_optimized import random_tile_mask  # noqa: E402

from helpers import make_qkv, relative_error  # noqa: E402
from prism.optimized import attention  # noqa: E402
from prism.optimized.indices import mask_rows_to_indices  # noqa: E402
from prism.reference import block_sparse_attention, tile_layout  # noqa: E402

CASES = ((160, 160), (192, 128), (192, 192), (256, 256))


def wide_rows(width, element_size, padded=None):
    """``descriptor_rows`` without the 128-column limit on padded boxes."""
    if padded is None:
        padded = max(16, 1 << (width - 1).bit_length())
    return width <= padded <= 256 and (width * element_size) % 16 == 0


def case(d, dv, tokens, tile, density, heads, kv_heads):
    q, k, v = (t.cuda() for t in make_qkv(1, heads, kv_heads, tokens, tokens, d,
                                          dtype=torch.bfloat16, seed=d + dv, value_dim=dv))
    layout = tile_layout(tokens, tokens, tile, True)
    mask = random_tile_mask((1, heads, layout.num_query_tiles, layout.num_key_tiles), density,
                            torch.Generator().manual_seed(tokens), causal=True,
                            first_tile=layout.first_query_tile, keep_diagonal=True).cuda()
    num, idx = mask_rows_to_indices(mask, layout.first_query_tile, causal_trim=True)
    table = attention.default_config(tile, max(d, dv), q.dtype, False)

    def run(tma):
        config = attention.AttentionConfig(table.block_m, table.block_n, table.num_warps,
                                           table.num_stages, use_tma=tma)
        return attention.sparse_attention_forward(
            q, k, v, num, idx, block_size=tile, causal=True, scale=None, return_lse=False,
            first_query_tile=layout.first_query_tile, query_start=layout.query_start,
            interpreted=False, config=config)[0]

    row = {"d": d, "dv": dv, "tokens": tokens, "tile": tile, "density": density,
           "heads": heads, "kv_heads": kv_heads, "shape": [table.block_m, table.block_n,
                                                           table.num_warps, table.num_stages],
           "tma_by_default_rule": attention.tma_compatible(
               k, v, 1 << (d - 1).bit_length(), 1 << (dv - 1).bit_length())}
    pointer = run(False)
    original = attention.descriptor_rows
    attention.descriptor_rows = wide_rows
    try:
        row["tma_with_wide_boxes"] = attention.tma_compatible(
            k, v, 1 << (d - 1).bit_length(), 1 << (dv - 1).bit_length())
        wide = run(True)
        row["tma_ms"] = do_bench(lambda: run(True), rep=100)
    finally:
        attention.descriptor_rows = original
    row["pointer_ms"] = do_bench(lambda: run(False), rep=100)
    row["pointer_over_tma"] = row["pointer_ms"] / row["tma_ms"]
    if tokens <= 8192:
        ref = block_sparse_attention(q, k, v, mask, block_size=tile, causal=True)
        row["tma_error"] = relative_error(wide, ref)
        row["pointer_error"] = relative_error(pointer, ref)
    row["tma_vs_pointer_max_abs"] = float((wide.float() - pointer.float()).abs().max())
    row["tma_finite"] = bool(torch.isfinite(wide).all())
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--lengths", default="4096,32768")
    args = parser.parse_args()
    rows = []
    for tokens in (int(x) for x in args.lengths.split(",")):
        for d, dv in CASES:
            for tile in (128, 64):
                for density in (0.15, 1.0):
                    try:
                        row = case(d, dv, tokens, tile, density, 32, 8)
                    except Exception as error:  # noqa: BLE001 - record it, go on
                        row = {"d": d, "dv": dv, "tokens": tokens, "tile": tile,
                               "density": density,
                               "error": f"{type(error).__name__}: {str(error)[:300]}"}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
