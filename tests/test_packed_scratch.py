"""The packed antidiagonal kernel's one-pass scratch, laid out by each program's extent.

Causally, the program of query-tile block ``j`` scores key blocks only up to its
last query tile, so its scratch rows hold that many key blocks, not every key
block of the call (``antidiagonal_shapes.scratch_extents`` sizes the buffer, the
kernel's ``_scratch_rows`` places each program in it). Checked here: the closed
form against a term-by-term sum, the kernel's placement against the buffer's size
(no overlap, no gap, nothing past the end), each program's room against what its
passes index, and the outputs against the reference where the layout differs
most (a causal call, a KV prefix, GQA groups whose tiles per program do not
divide the tiles per key block).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl
from test_optimized_estimators import DEVICE, _qk

from prism.optimized.antidiagonal_blocks import _scratch_rows
from prism.optimized.antidiagonal_packed import antidiagonal_packed_probabilities
from prism.optimized.antidiagonal_shapes import _shape, extent_sum, scratch_extents
from prism.reference import tile_layout
from prism.reference.estimators import (
    antidiagonal_probabilities,
    candidate_antidiagonal_probabilities,
)
from prism.reference.scoring import admissible_tiles

pytestmark = pytest.mark.interpret


def _term_by_term(n, a, t, per_chunk, key_blocks):
    return sum(min(key_blocks, -(-(a + (j + 1) * t) // per_chunk)) for j in range(n))


@pytest.mark.parametrize("t, per_chunk", [(1, 1), (1, 4), (2, 4), (2, 8), (4, 4), (8, 2),
                                          (16, 1), (1, 16), (4, 16)])
def test_closed_form_is_the_sum_of_its_terms(t, per_chunk):
    for n, a, key_blocks in itertools.product(range(0, 40, 3), (0, 1, 5, 17, 64, 300),
                                              (1, 2, 7, 16, 33, 200)):
        assert extent_sum(n, a, t, per_chunk, key_blocks) == _term_by_term(
            n, a, t, per_chunk, key_blocks), (n, a, t, per_chunk, key_blocks)


def test_causal_scratch_is_about_half_of_the_full_one():
    """At 128K tokens, 32/8 heads, tile 128, stride 16 (the preset's launch: 2 query
    tiles a program, 4 tiles a key block) a full prefill needs half the scratch."""
    per_head, tiles, per_chunk = 512, 2, 4
    key_blocks = 1024 // per_chunk
    full = scratch_extents(per_head, 0, tiles, per_chunk, key_blocks, False)
    causal = scratch_extents(per_head, 0, tiles, per_chunk, key_blocks, True)
    assert full == per_head * key_blocks
    assert 0.49 < causal / full < 0.51
    # A chunk late in a long prompt sees nearly every key: little to save.
    late = scratch_extents(16, 992, tiles, per_chunk, key_blocks, True)
    assert late > 0.95 * scratch_extents(16, 992, tiles, per_chunk, key_blocks, False)
    # Tiles per program that do not divide the tiles per key block: the full layout.
    assert scratch_extents(10, 0, 3, 4, 20, True) == 10 * 20


@triton.jit
def _layout_kernel(OUT, programs_per_head, first_query_tile, tiles_per_program,
                   scratch_blocks, CAUSAL: tl.constexpr, TILES_PER_CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    block = programs_per_head - 1 - pid % programs_per_head
    start, blocks = _scratch_rows(pid, programs_per_head, block, first_query_tile,
                                  tiles_per_program, scratch_blocks, CAUSAL, TILES_PER_CHUNK)
    tl.store(OUT + 2 * pid, start)
    tl.store(OUT + 2 * pid + 1, blocks)


@pytest.mark.parametrize("per_head, parts, first, tiles, per_chunk, key_blocks, causal", [
    (7, 3, 0, 2, 4, 4, True),      # 14 query tiles over 16 key tiles
    (16, 2, 0, 2, 4, 8, True),
    (5, 2, 11, 2, 4, 5, True),     # a KV prefix of 11 tiles
    (9, 1, 3, 1, 2, 7, True),
    (4, 2, 0, 8, 2, 16, True),     # more tiles a program than a key block holds
    (6, 2, 0, 3, 4, 5, True),      # 3 does not divide 4: the full layout
    (6, 2, 0, 2, 4, 3, False),
])
def test_kernel_places_programs_as_the_host_sizes_them(per_head, parts, first, tiles,
                                                       per_chunk, key_blocks, causal):
    programs = per_head * parts
    out = torch.full((programs, 2), -1, dtype=torch.int64, device=DEVICE)
    _layout_kernel[(programs,)](out, per_head, first, tiles, key_blocks, CAUSAL=causal,
                                TILES_PER_CHUNK=per_chunk)
    out = out.cpu()
    total = parts * scratch_extents(per_head, first, tiles, per_chunk, key_blocks, causal)
    # In pid order the programs tile [0, total) exactly: no overlap, no gap.
    assert out[0, 0] == 0
    assert torch.equal(out[1:, 0], out[:-1, 0] + out[:-1, 1])
    assert int(out[-1, 0] + out[-1, 1]) == total
    for pid in range(programs):
        block = per_head - 1 - pid % per_head
        needed = min(key_blocks, -(-(first + (block + 1) * tiles) // per_chunk))
        assert int(out[pid, 1]) >= needed   # room for every key block its passes index


@pytest.mark.parametrize("hq, hkv, nq, nk, bs, stride, causal", [
    (4, 1, 512, 512, 64, 8, True),     # 4 heads x 8 groups: 2 tiles a program
    (8, 2, 300, 700, 64, 8, True),     # a KV prefix of 400 tokens (not a whole tile)
    (3, 1, 320, 320, 32, 4, True),     # 3 heads: tiles per program 2, per key block 8
    (6, 2, 200, 200, 32, 8, True),     # group 3
    (4, 2, 256, 256, 64, 8, False),
])
def test_outputs_match_the_reference(hq, hkv, nq, nk, bs, stride, causal):
    q, k = _qk(1, hq, hkv, nq, nk, 16, seed=nq + hq, scale=2.0)
    layout = tile_layout(nq, nk, bs, causal)
    per_tile, _, tuning, *_, one_pass = _shape(q, k, layout, stride, None, False, False, causal)
    assert one_pass
    got = antidiagonal_packed_probabilities(q, k, layout, stride, causal)
    torch.testing.assert_close(got, antidiagonal_probabilities(q, k, layout, stride, causal),
                               rtol=2e-5, atol=1e-6)
    admissible = admissible_tiles(layout, causal, DEVICE)
    gen = torch.Generator().manual_seed(nq)
    cand = (torch.rand(1, hq, *admissible.shape, generator=gen) < 0.5).to(DEVICE)
    cand = (cand | torch.eye(*admissible.shape, dtype=torch.bool, device=DEVICE)) & admissible
    got = antidiagonal_packed_probabilities(q, k, layout, stride, causal,
                                            candidates=cand.contiguous())
    expected = candidate_antidiagonal_probabilities(q, k, layout, stride, cand, causal)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)


def test_the_fused_preset_launch_fits_at_256k_causal_only():
    """With causal extents the accurate preset's fused launch (two scratches) fits the
    one-pass limit at 256K tokens (5.0 GiB); the same call without causality (10 GiB)
    does not, and runs the stage's own launch."""
    from prism.optimized.antidiagonal_shapes import fused_sampled_applies

    n = 262144
    q = torch.empty(1, 32, n, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 8, n, 128, dtype=torch.bfloat16, device="meta")
    assert fused_sampled_applies(q, k, tile_layout(n, n, 128, True), 16, 8, True)
    assert not fused_sampled_applies(q, k, tile_layout(n, n, 128, False), 16, 8, False)


def test_the_full_layout_stays_available_and_gives_the_same_rows(monkeypatch):
    """``CAUSAL_EXTENTS = False`` restores the layout in which every program holds every
    key block (kept to time the two against each other); both give the same rows."""
    from prism.optimized import antidiagonal_shapes
    from prism.optimized.antidiagonal_shapes import PackedTuning

    q, k = _qk(1, 4, 1, 384, 448, 16, seed=11, scale=2.0)
    layout = tile_layout(384, 448, 64, True)
    # Key blocks of 2 tiles, so that the 3 programs of a head need 2, 3 and 4 of 4.
    tuning = PackedTuning(target_rows=64, block_kg=16, num_warps=4, num_stages=1, one_pass=1,
                          tma=0)
    per_tile, _, tuning, heads, tiles, rows, programs, key_blocks, extents, _ = _shape(
        q, k, layout, 8, tuning, False, False, True)
    per_head = -(-layout.num_query_tiles // tiles)
    args = (per_head, layout.first_query_tile, tiles, tuning.block_kg // per_tile, key_blocks)
    assert (scratch_extents(*args, True), scratch_extents(*args, False)) == (9, 12)
    assert extents == (programs // per_head) * rows * 9
    causal = antidiagonal_packed_probabilities(q, k, layout, 8, True, tuning)
    monkeypatch.setattr(antidiagonal_shapes, "CAUSAL_EXTENTS", False)
    assert not antidiagonal_shapes.causal_extents(True)
    full = antidiagonal_packed_probabilities(q, k, layout, 8, True, tuning)
    torch.testing.assert_close(full, causal, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(full, antidiagonal_probabilities(q, k, layout, 8, True),
                               rtol=2e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("n, prefix", [(16384, 0), (8192, 24576)])
def test_both_layouts_give_the_same_selection_on_the_gpu(n, prefix, monkeypatch):
    """bf16, 32/8 heads, D 128: the accurate preset's selection (the fused launch) and the
    stride-8 antidiagonal rows with the causal extents and with the full layout, over a
    whole prompt and over a chunk after a 24K prefix."""
    from prism import optimized
    from prism.optimized import antidiagonal_shapes
    from prism.reference import PrismConfig

    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, 32, n, 128, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 8, n + prefix, 128, device="cuda", generator=gen).to(torch.bfloat16)
    q[:, :, :, :32] *= 4
    cfg = PrismConfig.preset("accurate")
    layout = tile_layout(n, n + prefix, 128, True)
    results = {}
    for extents in (True, False):
        monkeypatch.setattr(antidiagonal_shapes, "CAUSAL_EXTENTS", extents)
        results[extents] = (optimized.select_blocks(q, k, cfg).as_tensor().clone(),
                            antidiagonal_packed_probabilities(q, k, layout, 8, True))
    assert torch.equal(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-6, atol=1e-7)
