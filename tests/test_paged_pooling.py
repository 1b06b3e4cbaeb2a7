"""Key pooling through the block table (prism.optimized.paged_pooling, docs/serving.rst).

The paged launch must write the contiguous launch's buffer bit for bit (means,
energies, flag) from keys it reads through the table: page sizes that divide
the tile, do not divide it, or exceed it; runs of several sequences; pooling
from a cache's end; int64 and column-strided tables. Cache slots no sequence
reads hold NaN, table entries past a sequence's pages point nowhere, so a
stray read shows in the flag or the means.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from test_paged_kernel import poisoned_pages  # noqa: E402
from test_varlen import make_batch  # noqa: E402
from test_varlen_kernel import _kernels  # noqa: E402

from prism import reference  # noqa: E402
from prism.reference.varlen import as_batch  # noqa: E402


def _both(count, nq, nk, *, block_size, page_size, first, table_form, heads=(4, 2), d=16,
          layout="half", dtype=torch.float32, seed=0):
    """The contiguous and the paged pooling buffers of ``count`` sequences (nq, nk)."""
    _, _, device = _kernels()
    from prism.optimized import paged_pooling, pooling
    from prism.reference.bands import band_sizes

    _, (q, k, v), _, _ = make_batch([nq] * count, [nk] * count, hq=heads[0], hkv=heads[1], d=d,
                                    layout=layout, dtype=dtype, seed=seed, device=device)
    k_cache, _, table, _ = poisoned_pages(k, v, [nk] * count, page_size, seed=seed,
                                          table_form=table_form)
    q_run = as_batch(q, 0, count, nq)
    layout_ = reference.tile_layout(nq, nk, block_size, True)
    high, low = band_sizes(d, None, None)
    start = first * block_size
    k_tail = torch.stack([k[i * nk + start:(i + 1) * nk] for i in range(count)])
    k_tail = k_tail.permute(0, 2, 1, 3)
    plan = pooling.pool_plan(q_run, k_tail, None, layout_, high, low, layout,
                             first_key_tile=first)
    contiguous = pooling.run_pooling(plan, q_run, k_tail, None)
    paged_plan = paged_pooling.paged_pool_plan(q_run, k_cache, paged_pooling.unit_columns(table),
                                               layout_, high, low, layout, first)
    paged = paged_pooling.run_paged_pooling(paged_plan, q_run, k_cache,
                                            paged_pooling.unit_columns(table))
    _, q_off, k_off, _, sums = pooling.work_layout(count, heads[0], heads[1], d,
                                                      layout_.num_query_tiles,
                                                      layout_.num_key_tiles)
    q_region = slice(q_off, q_off + count * heads[0] * layout_.num_query_tiles * d)
    return contiguous, paged, sums, q_region, k_off, plan[3][3], layout_.num_key_tiles - first


@pytest.mark.interpret
@pytest.mark.parametrize("count, nq, nk, block_size, page_size, first, table_form", [
    (2, 9, 40, 16, 24, 0, "int32"),      # a run of two; pages not dividing the tile
    (1, 20, 70, 32, 16, 1, "strided"),   # from a cache's end (tile 1 on); pages of half a tile
    (1, 5, 33, 16, 256, 2, "int64"),     # one page holds the sequence; a one-token last tile
])
def test_paged_pooling_equals_contiguous(count, nq, nk, block_size, page_size, first,
                                         table_form):
    contiguous, paged, sums, q_region, k_off, k_stride, tiles = _both(
        count, nq, nk, block_size=block_size, page_size=page_size, first=first,
        table_form=table_form)
    assert float(paged[0]) == 0.0, "the flag is set: a stray read of a NaN slot"
    assert float(paged[0]) == float(contiguous[0])                # the NaN/Inf flag
    # The energies: float64 sums of per-tile atomics, which land in any order on a GPU
    # (bit-equal in the interpreter, which runs the programs one by one).
    torch.testing.assert_close(paged[1:sums], contiguous[1:sums], rtol=1e-12, atol=0.0)
    as32 = (contiguous.view(torch.float32), paged.view(torch.float32))
    hkv, d = 2, 16
    columns = [x[k_off:k_off + count * hkv * d * k_stride]
               .view(count * hkv * d, k_stride)[:, first:first + tiles] for x in as32]
    assert torch.equal(columns[0], columns[1])                     # the pooled key means
    assert torch.equal(as32[0][q_region], as32[1][q_region])       # the pooled queries


@pytest.mark.gpu
@pytest.mark.parametrize("page_size, first", [(16, 0), (64, 3), (256, 0)])
def test_gpu_paged_pooling_equals_contiguous(page_size, first):
    """bf16, tile 128, 32/8 heads, D 128: a run of three 1000-query sequences of 5000 keys."""
    contiguous, paged, sums, q_region, k_off, k_stride, tiles = _both(
        3, 1000, 5000, block_size=128, page_size=page_size, first=first, table_form="int32",
        heads=(32, 8), d=128, dtype=torch.bfloat16)
    assert float(paged[0]) == 0.0
    as32 = (contiguous.view(torch.float32), paged.view(torch.float32))
    columns = [x[k_off:k_off + 3 * 8 * 128 * k_stride].view(3 * 8 * 128, k_stride)
               [:, first:first + tiles] for x in as32]
    assert torch.equal(columns[0], columns[1])
    assert torch.equal(as32[0][q_region], as32[1][q_region])
    # Energies: float64 atomics land in any order on the GPU.
    torch.testing.assert_close(paged[1:sums], contiguous[1:sums], rtol=1e-12, atol=0)
