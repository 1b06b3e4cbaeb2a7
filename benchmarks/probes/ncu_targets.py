"""Kernels for one Nsight Compute pass: selection at 128K, attention at 32K (density 1.0),
the accurate preset's selection, the packed antidiagonal scores.

Run under ``ncu`` (see the device command in benchmarks/NOTES.md); on its own it
just launches each kernel twice.
"""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench_prism import BLOCK, DTYPE, HEAD_DIM, random_causal_mask, random_inputs  # noqa: E402

from prism.optimized.attention import sparse_attention_forward  # noqa: E402
from prism.optimized.indices import mask_rows_to_indices  # noqa: E402
from prism.optimized.selection import select_tiles  # noqa: E402
from prism.reference import band_sizes, resolve_config, tile_layout  # noqa: E402


def selection_128k():
    n = 131072
    q, k, _ = random_inputs(n)
    cfg = resolve_config(None, block_size=BLOCK)
    layout = tile_layout(n, n, BLOCK, True)
    high_dim, low_dim = band_sizes(HEAD_DIM, cfg.high_dim, cfg.low_dim)
    for _ in range(2):
        select_tiles(q, k, cfg, True, layout, high_dim, low_dim)


def attention(n, density):
    q, k, v = random_inputs(n)
    mask = random_causal_mask(n // BLOCK, density, seed=7)
    num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)
    for _ in range(2):
        sparse_attention_forward(q, k, v, num, idx, block_size=BLOCK, causal=True, scale=None,
                                 return_lse=True, first_query_tile=0, query_start=0,
                                 interpreted=False)


def accurate_preset(n):
    """The accurate preset's whole selection (cascade) on the structured inputs."""
    from bench_prism import structured_inputs

    from prism import optimized
    from prism.reference import PrismConfig

    q, k, _ = structured_inputs(n)
    cfg = PrismConfig.preset("accurate")
    for _ in range(2):
        optimized.select_blocks(q, k, cfg)


def antidiagonal(n, stride):
    """The packed antidiagonal scores alone (E5's dense kernel) on the structured inputs."""
    from bench_prism import structured_inputs

    from prism.optimized.antidiagonal_packed import antidiagonal_packed_probabilities

    q, k, _ = structured_inputs(n)
    layout = tile_layout(n, n, BLOCK, True)
    for _ in range(2):
        antidiagonal_packed_probabilities(q, k, layout, stride, True)


def main():
    """``ncu_targets.py [selection] [accurate:N] [antidiagonal:N:stride]
    [attention:N:density ...]`` (default: the first probe's set)."""
    parts = sys.argv[1:] or ["selection", "attention:32768:1.0"]
    for part in parts:
        if part == "selection":
            selection_128k()
        elif part.startswith("accurate:"):
            accurate_preset(int(part.split(":")[1]))
        elif part.startswith("antidiagonal:"):
            _, n, stride = part.split(":")
            antidiagonal(int(n), int(stride))
        else:
            _, n, density = part.split(":")
            attention(int(n), float(density))
        torch.cuda.synchronize()
    print("done", DTYPE)


if __name__ == "__main__":
    main()
