"""The finishing launch (prism.optimized.tile_union): exact top-p ties and its launch shape.

Rows are sparse as the cascade's are (non-zero only at a few tiles), with
dyadic values whose rows sum to a power of two, so the normalised
probabilities, every cumulative mass and every bisection mass are exact in
fp32: the kept set must equal the reference's sort-based top-p exactly, ties
at the boundary included (most values tie). The launch shape is checked for
register spills by compiling the kernel for sm_90 with the ptxas that ships
with Triton (no GPU needed): a spilling shape took twice as long on the H200
(benchmarks/NOTES.md item 37).
"""

from __future__ import annotations

import pytest
import torch
from sm90 import in_fresh_process, sm90_resources
from test_optimized_estimators import DEVICE

from prism.optimized import tile_union
from prism.optimized.tile_union import launch_shape, union_tiles
from prism.reference import tile_layout
from prism.reference.registry import top_p_tiles
from prism.reference.scoring import admissible_tiles


def _sparse_dyadic_rows(layout, heads, causal, survivors_of_row, seed):
    """Unnormalised rows: ``survivors_of_row(row)`` admissible tiles carry integer
    weights summing to a power of two, the other admissible tiles 0, and garbage
    (never read) outside the admissible set."""
    gen = torch.Generator().manual_seed(seed)
    nq, nk = layout.num_query_tiles, layout.num_key_tiles
    admissible = admissible_tiles(layout, causal, "cpu").expand(*heads, nq, nk)
    probs = torch.zeros(*heads, nq, nk)
    flat = probs.view(-1, nk)
    for row in range(flat.shape[0]):
        allowed = admissible.reshape(-1, nk)[row].nonzero().flatten()
        count = min(survivors_of_row(row), allowed.numel())
        cols = allowed[torch.randperm(allowed.numel(), generator=gen)[:count]]
        weights = torch.tensor([1.0, 2.0, 3.0, 5.0])[torch.randint(4, (count,), generator=gen)]
        target = 1 << int(weights.sum().item()).bit_length()  # > the sum: a power of two
        deficit = int(target - weights.sum().item())
        while deficit > 0:  # +1 on distinct random entries until the sum is the target
            add = torch.randperm(count, generator=gen)[:deficit]
            weights[add] += 1.0
            deficit -= add.numel()
        flat[row, cols] = weights
    return torch.where(admissible, probs, torch.full_like(probs, 1e9)), admissible


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("threshold", [0.8, 0.95])
def test_union_top_p_is_the_reference_top_p_with_exact_ties(causal, threshold):
    nk_tiles, bs = 256, 16
    nq_tiles = 48 if not causal else nk_tiles
    layout = tile_layout(nq_tiles * bs, nk_tiles * bs, bs, causal)
    heads = (1, 2)
    width = 256
    rows_per_program, _ = launch_shape(width)
    quarter, sixteenth = width // 4, width // 16

    def survivors(row):
        # Programs in turn: few, some and many non-zero tiles per row.
        return (sixteenth - 4, quarter - 8, quarter + 40)[(row // rows_per_program) % 3]

    probs, admissible = _sparse_dyadic_rows(layout, heads, causal, survivors,
                                            seed=7 + causal + int(10 * threshold))
    expected = top_p_tiles(probs.masked_fill(~admissible, 0) / probs.masked_fill(
        ~admissible, 0).sum(-1, keepdim=True).clamp_min(1e-30), layout, causal, threshold)
    expected = expected & admissible

    mask, _, _ = union_tiles(layout, causal, heads, probs=probs.to(DEVICE).contiguous(),
                             normalize=True, threshold=threshold)
    assert torch.equal(mask.cpu(), expected)
    # Programs of few survivors and of many both ran (each a whole program's rows).
    counts = (probs.masked_fill(~admissible, 0) > 0).sum(-1).flatten()
    assert counts.min() < sixteenth and counts.max() > quarter



@pytest.mark.interpret
def test_union_top_p_of_dense_rows_at_narrowed_widths():
    """Dense rows of 40 tiles (launch width 64, its causal programs at 32 and 16)."""
    layout = tile_layout(16 * 40, 16 * 40, 16, True)
    probs = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(3)) + 0.5
    expected = top_p_tiles(probs.tril() / probs.tril().sum(-1, keepdim=True), layout, True,
                           0.9) & admissible_tiles(layout, True, "cpu")
    mask, _, _ = union_tiles(layout, True, (1, 1), probs=probs.to(DEVICE), normalize=True,
                             threshold=0.9)
    assert torch.equal(mask.cpu(), expected)


def _union_resources(width: int) -> tuple[int, int]:
    """(registers, spill-store bytes) per thread of the cascade's finishing launch at
    ``width`` (probabilities mixed with the sampled stage's rows, vertical-slash bins,
    the last-tile rule, forced tiles, mask and indices, causal), compiled for sm_90 at
    :func:`launch_shape`'s rows and warps."""
    rows, warps = launch_shape(width)
    constexprs = dict(
        CAUSAL=True, HAS_PROBS=True, NORMALIZE=True, HAS_SECOND=True, HAS_VS=True, HAS_OTHER=False,
        HAS_LAST=True, FORCE_SINK=True, FORCE_DIAGONAL=True, WRITE_MASK=True,
        WRITE_INDICES=True, ROWS=rows, WIDTH=width, LOG2_WIDTH=width.bit_length() - 1,
        CHECK_Q=False, CHECK_K=False,
        CHECK_V=False, D_PAD=128, DV_PAD=128, BLOCK_T=32, BLOCK_ROWS=tile_union.CHECK_ROWS,
        NARROW=True)
    pointers = {"PROBS": "*fp32", "SECOND": "*fp32", "COLUMNS": "*i8", "DIAGONALS": "*i8",
                "OTHER": "*i1", "LAST": "*i8", "MASK": "*i1", "NUM": "*i32", "IDX": "*i32",
                "Q": "*bf16", "K": "*bf16", "V": "*bf16", "NONFINITE": "*fp64"}
    return sm90_resources(tile_union._union_kernel, constexprs, pointers,
                          floats=("threshold", "weight"), num_warps=warps, num_stages=1)


@pytest.mark.parametrize("width", [256, 1024])
def test_finishing_launch_does_not_spill_registers(width):
    _, spills = in_fresh_process("test_union_launch", "_union_resources", width)
    assert spills == 0
