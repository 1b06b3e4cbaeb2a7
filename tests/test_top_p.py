"""The finishing launch's top-p over compacted survivors (prism.optimized.top_p).

Rows are sparse as the cascade's are (non-zero only at a few tiles), with
dyadic values whose rows sum to a power of two, so the normalised
probabilities, every cumulative mass and every bisection mass are exact in
fp32: the kept set must equal the reference's sort-based top-p exactly, ties
at the boundary included (most values tie). Programs are built to take each
path: survivors within a sixteenth of the launch width, within a quarter, and
more (the plain bisection); the scratch buffer shows which path ran.
Runs in Triton's interpreter on the CPU (tests/conftest.py) or on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from test_optimized_estimators import DEVICE

from prism.optimized.tile_union import launch_shape, union_tiles
from prism.optimized.top_p import compact_scratch_elements
from prism.reference import tile_layout
from prism.reference.registry import top_p_tiles
from prism.reference.scoring import admissible_tiles

pytestmark = pytest.mark.interpret


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


@pytest.mark.parametrize("causal", [False, True])
# p >= 0.8 keeps every non-zero entry above the bracket's start (1 - p) / n here.
@pytest.mark.parametrize("threshold", [0.8, 0.95])
def test_compacted_top_p_is_the_reference_top_p_on_every_path(causal, threshold, monkeypatch):
    nk_tiles, bs = 256, 16
    nq_tiles = 48 if not causal else nk_tiles
    layout = tile_layout(nq_tiles * bs, nk_tiles * bs, bs, causal)
    heads = (1, 2)
    width = 256
    rows_per_program, _ = launch_shape(width)
    quarter, sixteenth = width // 4, width // 16

    def survivors(row):
        # Programs in turn: within a sixteenth of the width, within a quarter, more.
        return (sixteenth - 4, quarter - 8, quarter + 40)[(row // rows_per_program) % 3]

    probs, admissible = _sparse_dyadic_rows(layout, heads, causal, survivors,
                                            seed=7 + causal + int(10 * threshold))
    expected = top_p_tiles(probs.masked_fill(~admissible, 0) / probs.masked_fill(
        ~admissible, 0).sum(-1, keepdim=True).clamp_min(1e-30), layout, causal, threshold)
    expected = expected & admissible

    scratches = []
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype == torch.float32 and t.dim() == 1:
            scratches.append(t.fill_(float("nan")))
        return t

    monkeypatch.setattr(torch, "empty", recording_empty)
    mask, _, _ = union_tiles(layout, causal, heads, probs=probs.to(DEVICE).contiguous(),
                             normalize=True, threshold=threshold)
    monkeypatch.undo()
    assert torch.equal(mask.cpu(), expected)

    # Which path each program took: compacted programs leave each row's kept flags
    # (int8, by column) in the last part of their slot; plain ones leave the poison.
    assert len(scratches) == 1
    slot_bytes = compact_scratch_elements(width) * 4 * rows_per_program
    flag_bytes = scratches[0].cpu().view(torch.int8).view(-1, slot_bytes)[
        :, slot_bytes - rows_per_program * width:].reshape(-1, rows_per_program, width)
    poison = torch.full((1,), float("nan")).view(torch.int8).repeat(width // 4)
    flat_probs = probs.masked_fill(~admissible, 0).view(-1, nk_tiles)
    flat_expected = expected.view(-1, nk_tiles)
    paths = {"sixteenth": 0, "quarter": 0, "plain": 0}
    for program in range(flag_bytes.shape[0]):
        rows = range(program * rows_per_program,
                     min((program + 1) * rows_per_program, flat_probs.shape[0]))
        fullest = max(int((flat_probs[r] > 0).sum()) for r in rows)
        compacted = fullest <= quarter
        # Causal programs of early rows hold narrower launch instances (the
        # finishing launch's halving), whose quarter is smaller: only the full
        # width's programs are classified here.
        full_width = not causal or min(rows) % nq_tiles >= width // 2
        for r in rows:
            flags = flag_bytes[program, r - min(rows)]
            if compacted and full_width:
                assert torch.equal(flags[:nk_tiles] != 0, flat_expected[r]), (program, r)
                assert not flags[nk_tiles:].any()
            elif not compacted:
                assert torch.equal(flags, poison), (program, r)
        if full_width:
            paths["plain" if not compacted else
                  "sixteenth" if fullest <= sixteenth else "quarter"] += 1
    assert all(count > 0 for count in paths.values()), paths


def test_dense_rows_keep_the_plain_bisection_and_small_launches_allocate_nothing(monkeypatch):
    """Rows with more survivors than a quarter of the width never touch the scratch;
    launches narrower than 64 tiles get none."""
    assert compact_scratch_elements(32) == 0 and compact_scratch_elements(64) > 0
    layout = tile_layout(16 * 40, 16 * 40, 16, True)  # width 64
    probs = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(3)) + 0.5
    expected = top_p_tiles(probs.tril() / probs.tril().sum(-1, keepdim=True), layout, True,
                           0.9) & admissible_tiles(layout, True, "cpu")
    mask, _, _ = union_tiles(layout, True, (1, 1), probs=probs.to(DEVICE), normalize=True,
                             threshold=0.9)
    assert torch.equal(mask.cpu(), expected)
