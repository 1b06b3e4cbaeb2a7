"""Launch rules of the block-sparse attention kernel, checked on the host.

Which launch shapes :class:`prism.optimized.attention.AttentionConfig` accepts,
what the launch table chooses (never the warp-specialised loop; shapes that fit
the tile and a Hopper SM's shared memory), when K and V may be read through
tensor descriptors, the register cap and the scratch allocator. Split from
``test_optimized.py``, which compares the kernels' outputs with the reference.
As there, the kernels run in Triton's interpreter on a machine without CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from test_optimized import INTERPRETED, pytestmark  # noqa: E402, F401  (same marks)

from helpers import make_qkv  # noqa: E402
from prism.optimized.attention import AttentionConfig, sparse_attention_forward  # noqa: E402
from prism.optimized.indices import mask_rows_to_indices  # noqa: E402


def test_warp_specialized_config_refuses_inputs_it_cannot_read():
    """An explicit warp-specialised launch on inputs it cannot take (here CPU
    tensors or fp32) is a ValueError that names the way out, not a kernel crash."""
    q, k, v = make_qkv(1, 2, 1, 64, 64, 32, dtype=torch.float32, seed=2)
    num = torch.ones(1, 2, 2, dtype=torch.int32)
    idx = torch.tensor([[[0, 0], [1, 0]]], dtype=torch.int32).expand(1, 2, 2, 2).contiguous()
    config = AttentionConfig(32, 32, 4, 2, use_tma=True, warp_specialize=True)
    with pytest.raises(ValueError, match="warp_specialize=False"):
        sparse_attention_forward(q, k, v, num, idx, block_size=32, causal=True, scale=None,
                                 return_lse=False, first_query_tile=0, query_start=0,
                                 interpreted=INTERPRETED, config=config)


def test_no_default_launch_is_warp_specialized():
    """Triton 3.6's warp-specialised loop left NaN or unwritten rows when processes
    shared the H200 (benchmarks/results/h200_attention_repeat_aec516a.json), so no
    entry of the launch table, nor a paged or varlen call's, may choose it."""
    from prism.optimized.attention import default_config, fallback_config

    for tile in (16, 32, 64, 128, 192, 256):
        for d in (32, 64, 80, 96, 128, 160, 256):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                assert not default_config(tile, d, dtype, False).warp_specialize, (tile, d)
            assert not fallback_config(tile, d).warp_specialize


def test_default_launch_shapes_fit_the_tile_and_shared_memory():
    """Every entry of the launch table divides the tile's power-of-two part (the
    kernel walks tiles in whole blocks) and its pipelined K/V stages plus the Q
    block fit a Hopper SM's 227 KB of shared memory at 16 bits (the budget that
    benchmarks/bench_tune.py prunes with; a larger shape fails to launch on the
    H200)."""
    from prism.optimized._runtime import next_power_of_2
    from prism.optimized.attention import default_config

    for tile in (16, 32, 64, 128, 192, 256, 384):
        divisor = tile & -tile
        for d in (32, 64, 80, 96, 128, 160, 256):
            for dtype in (torch.float16, torch.bfloat16):
                c = default_config(tile, d, dtype, False)
                assert divisor % c.block_m == 0 and divisor % c.block_n == 0, (tile, d, c)
                d_pad = max(16, next_power_of_2(d))
                smem = (c.num_stages * 2 * c.block_n * d_pad + c.block_m * d_pad) * 2
                assert smem <= 232448, (tile, d, c, smem)


def test_tuning_grid_prunes_at_the_padded_width_and_labels_descriptors_truly():
    """benchmarks/bench_tune.py: shared memory counted at the padded head dim (D 96
    holds 128-wide blocks), and no descriptor (+tma) candidate at a head dim whose
    rows no descriptor can read, where the launch would quietly use pointers."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_tune
    finally:
        sys.path.pop(0)
    c = AttentionConfig(128, 128, 8, 4, use_tma=True)  # fits at 96 columns, not at 128
    assert bench_tune.smem_bytes(c, 96) == bench_tune.smem_bytes(c, 128)
    assert bench_tune.smem_bytes(c, 96) > bench_tune.SMEM_LIMIT
    for d, tile in ((96, 128), (80, 64), (100, 128), (192, 128)):
        grid = bench_tune.occupancy_candidates(d, tile)
        assert grid and all(bench_tune.smem_bytes(g, d) <= bench_tune.SMEM_LIMIT for g in grid)
        takes_descriptors = d != 100  # 200-byte rows: no descriptor
        assert any(g.use_tma for g in grid) == takes_descriptors, d


class _CudaLooking:
    """A CPU tensor that reports itself as on a CUDA device (for host-side rules)."""

    def __init__(self, t, ptr_offset=0):
        self._t, self._offset = t, ptr_offset
        self.is_cuda, self.device, self.shape = True, torch.device("cuda", 0), t.shape
        self.dtype = t.dtype

    def stride(self, *i):
        return self._t.stride(*i)

    def data_ptr(self):
        return 1024 + self._offset

    def element_size(self):
        return self._t.element_size()


def test_descriptor_rules_take_padded_head_dims(monkeypatch):
    """Tensor descriptors (TMA) take head dims that are not powers of two through a
    box of the padded width, and still refuse what a copy cannot address: rows not
    a multiple of 16 bytes, unaligned bases or strides, strided head dims, boxes
    wider than 256, older GPUs."""
    from prism.optimized import attention

    monkeypatch.setattr(attention, "device_capability", lambda device: (9, 0))

    def kv(d, dtype=torch.bfloat16, **kwargs):
        t = torch.zeros(1, 2, 64, d, dtype=dtype)
        return _CudaLooking(t, **kwargs), _CudaLooking(t, **kwargs)

    for d in (64, 80, 96, 128, 256):
        d_pad = 1 << (d - 1).bit_length()
        assert attention.tma_compatible(*kv(d), d_pad, d_pad), d
    for d in (160, 192, 136):  # 256-wide boxes over narrower rows, zero-filled past them
        assert attention.tma_compatible(*kv(d), 256, 256), d
    assert not attention.descriptor_rows(160, 2, padded=128)  # box narrower than the rows
    assert attention.descriptor_rows(160, 2) and attention.descriptor_rows(200, 2)
    assert not attention.descriptor_rows(260, 2)  # padded to 512: wider than a box may be
    assert not attention.tma_compatible(*kv(72), 64, 64)  # box narrower than the rows
    assert not attention.tma_compatible(*kv(100), 128, 128)  # 200-byte rows
    narrow = torch.zeros(1, 2, 64, 104, dtype=torch.bfloat16)[..., :100]  # aligned strides
    assert not attention.tma_compatible(_CudaLooking(narrow), _CudaLooking(narrow), 128, 128)
    assert attention.tma_compatible(*kv(100, torch.float32), 128, 128)  # 400-byte rows
    assert attention.descriptor_rows(96, 2) and attention.descriptor_rows(96, 2, padded=128)
    assert not attention.descriptor_rows(96, 2, padded=64)
    assert not attention.tma_compatible(*kv(320), 512, 512)  # box wider than 256
    assert not attention.tma_compatible(*kv(96, ptr_offset=8), 128, 128)
    strided = torch.zeros(1, 2, 64, 192, dtype=torch.bfloat16)[..., ::2]
    assert not attention.tma_compatible(_CudaLooking(strided), _CudaLooking(strided), 128, 128)
    # The opt-in warp-specialised loop keeps to power-of-two head dims.
    assert attention.warp_specialize_compatible(*kv(128), kv(128)[1], 128, 128, 0, 128)
    assert not attention.warp_specialize_compatible(*kv(96), kv(96)[1], 128, 128, 0, 128)
    monkeypatch.setattr(attention, "device_capability", lambda device: (8, 0))
    assert not attention.tma_compatible(*kv(128), 128, 128)


@pytest.mark.parametrize("fields, message", [
    (dict(block_m=48), "power of two"),
    (dict(block_n=8), "power of two"),
    (dict(num_warps=3), "num_warps"),
    (dict(num_stages=0), "num_stages"),
    (dict(num_stages=3, warp_specialize=True), "num_stages <= 2"),
    (dict(max_registers=16), "max_registers"),
    (dict(max_registers=300), "max_registers"),
    (dict(max_registers=96.0), "max_registers"),
])
def test_attention_config_refuses_launch_shapes_the_kernel_cannot_run(fields, message):
    """A launch shape the kernel would mis-tile, or (warp-specialised, 3+ stages)
    one that gave non-finite outputs on the H200, is refused when it is built."""
    base = dict(block_m=64, block_n=64, num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match=message):
        AttentionConfig(**{**base, **fields})
    assert AttentionConfig(**base).num_stages == 2


def test_register_cap_reaches_the_launch_and_the_interpreter_runs_it():
    """``max_registers`` becomes Triton's ``maxnreg`` launch option (absent without
    it), and a capped launch gives the uncapped launch's output."""
    from prism.optimized import attention
    from prism.reference import tile_layout

    plain = AttentionConfig(32, 32, 4, 1)
    capped = AttentionConfig(32, 32, 4, 1, max_registers=96)
    args = (True, False, 32, 32, torch.float32, False)
    assert "maxnreg" not in attention.launch_constants(plain, *args, varlen=False)
    assert attention.launch_constants(capped, *args, varlen=False)["maxnreg"] == 96
    device = "cpu" if INTERPRETED else "cuda"  # the interpreter, or the real launch
    q, k, v = (t.to(device) for t in make_qkv(1, 2, 1, 64, 64, 32, seed=3))
    layout = tile_layout(64, 64, 32, True)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool, device=device).tril()
    num, idx = mask_rows_to_indices(mask, layout.first_query_tile, causal_trim=True)
    outs = [attention.sparse_attention_forward(
        q, k, v, num, idx, block_size=32, causal=True, scale=None, return_lse=False,
        first_query_tile=0, query_start=0, interpreted=INTERPRETED, config=c)[0]
        for c in (plain, capped)]
    assert torch.equal(outs[0], outs[1])


def test_scratch_allocator_is_scoped_and_respects_the_callers():
    """The warp-specialised launch supplies Triton's scratch allocator only for
    its own launch, and leaves one the caller installed in place."""
    from triton.runtime import _allocation

    from prism.optimized.attention import _scratch_allocator

    before = _allocation._allocator.get()
    with _scratch_allocator():
        inside = _allocation._allocator.get()
    assert _allocation._allocator.get() is before
    if isinstance(before, _allocation.NullAllocator):
        assert not isinstance(inside, _allocation.NullAllocator)

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    token = _allocation._allocator.set(mine)
    try:
        with _scratch_allocator():
            assert _allocation._allocator.get() is mine
        assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.reset(token)
