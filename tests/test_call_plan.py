"""Eager call plans (prism.optimized.call_plan): a repeated call replays its recorded launches.

On the CPU the kernels are replaced by fakes whose "launchers" run in Python on
the raw addresses they receive (the CPU memory of the tensors), standing in for
the compiled kernels' C entry points: pooling writes its flag and an energy,
selection reads that energy and writes the mask and indices, attention reads
the indices and writes its output. A replay must hand every launch what the
general path did (grids, scalars, constexprs, the inputs' addresses), keep
the buffers consistent across launches and disjoint, zero the energy sums
first, return fresh outputs, and raise on NaN input. On a GPU the replay must
equal the general path bit for bit, also under CUDA graph capture.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from triton.runtime import _allocation
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

import prism.optimized as optimized
from prism.optimized import attention, call_plan, indices, ops, plan_items, pooling, selection
from prism.optimized import launch as fast
from prism.reference import PrismConfig, tile_layout

CFG = PrismConfig(block_size=32)
B, HQ, HKV, N, D = 1, 4, 2, 96, 16
NQT = 3
SCRATCH = 48  # bytes per program of the fake attention kernel


class _Launcher:
    """The C entry point of a fake compiled kernel: records, then runs ``effect``."""

    global_scratch_align = 128
    profile_scratch_size = 0
    launch_cooperative_grid = False
    launch_pdl = False

    def __init__(self, effect, scratch):
        self.calls, self.effect, self.global_scratch_size = [], effect, scratch

    def launch(self, *args):
        self.calls.append(args)
        self.effect(args[13:])  # after grid (3), stream, function and the prefix (8)


class _Compiled:
    function = 99
    packed_metadata = (4, 1, 0)

    def __init__(self, effect, scratch):
        self.run = _Launcher(effect, scratch)


class _Kernel:
    """A stand-in JITFunction with the real kernel's parameters."""

    pre_run_hooks: list = []

    def __init__(self, real, effect, scratch=0):
        self.params = JITFunction(getattr(real, "fn", real)).params
        self.compiled = _Compiled(effect, scratch)

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            self.compiled.run.launch(*grid, *(1,) * (3 - len(grid)), 7, 99, False, False,
                                     None, None, (4, 1, 0), None, None, None,
                                     *[a.data_ptr() if isinstance(a, torch.Tensor) else a
                                       for a in args])
        return self.compiled


def _doubles(address, n):
    return (ctypes.c_double * n).from_address(address)


def _ints(address, n):
    return (ctypes.c_int32 * n).from_address(address)


class _Fakes:
    """The fake kernels' effects, and what they saw."""

    def __init__(self):
        layout = tile_layout(N, N, CFG.block_size, True)
        self.sums = pooling.work_layout(B, HQ, HKV, D, layout.num_query_tiles,
                                        layout.num_key_tiles)[4]
        self.poison_flag = False
        self.sums_seen = []

    def pool(self, values):
        work = values[3]
        self.sums_seen.append(list(_doubles(work, self.sums)))
        _doubles(work, 2)[0] = 1.0 if self.poison_flag else 0.0
        _doubles(work, 2)[1] = 42.0

    def select(self, values):
        work, mask, num, idx = values[:4]
        assert _doubles(work, 2)[1] == 42.0  # pooling's buffer reached the selection
        rows = B * HQ * NQT
        ctypes.memset(mask, 1, rows * NQT)
        for r in range(rows):
            _ints(num, rows)[r] = r % NQT + 1
            _ints(idx, rows * NQT)[r * NQT:(r + 1) * NQT] = list(range(NQT))

    def attend(self, values):
        out, num = values[3], values[5]
        counts = list(_ints(num, B * HQ * NQT))
        (ctypes.c_float * 1).from_address(out)[0] = float(sum(counts))  # float32 output

    def check(self, values):  # the NaN/Inf check of block_sparse_attention
        if self.poison_flag:
            _doubles(values[3], 1)[0] = 1.0

    def index(self, values):  # a (rows, NQT) bool mask to counts and indices
        mask, num, idx, rows = values[0], values[1], values[2], B * HQ * NQT
        bits = list((ctypes.c_uint8 * (rows * NQT)).from_address(mask))
        for r in range(rows):
            row = [j for j in range(NQT) if bits[r * NQT + j]]
            _ints(num, rows)[r] = len(row)
            _ints(idx, rows * NQT)[r * NQT:(r + 1) * NQT] = row + [-1] * (NQT - len(row))


@pytest.fixture
def fakes(monkeypatch):
    """Fake kernels, CUDA claimed for CPU tensors, a driver memset on CPU memory."""
    effects = _Fakes()
    effects.real_select = selection._select_tiles_kernel
    kernels = {
        "pool": _Kernel(pooling._pool_tiles_kernel, effects.pool),
        "select": _Kernel(selection._select_tiles_kernel, effects.select),
        "attend": _Kernel(attention._sparse_attention_kernel, effects.attend, SCRATCH),
        "check": _Kernel(pooling._nonfinite_kernel, effects.check),
        "index": _Kernel(indices._mask_to_indices_kernel, effects.index),
    }
    monkeypatch.setattr(pooling, "_nonfinite_kernel", kernels["check"])
    monkeypatch.setattr(indices, "_mask_to_indices_kernel", kernels["index"])
    monkeypatch.setattr(pooling, "_pool_tiles_kernel", kernels["pool"])
    monkeypatch.setattr(selection, "_select_tiles_kernel", kernels["select"])
    monkeypatch.setattr(attention, "_sparse_attention_kernel", kernels["attend"])
    monkeypatch.setattr(fast, "_JITFunction", _Kernel)
    for module in (fast, plan_items):  # launches, and the zeroing plans record
        monkeypatch.setattr(module, "_get_device", lambda: 0)
        monkeypatch.setattr(module, "_get_stream", lambda device: 7)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    # No CUDA streams on this machine: block_sparse_attention's check stays on the
    # call's stream (its side-stream form is replayed on the GPU, test_call_plan_gpu.py).
    monkeypatch.setattr(ops, "CHECK_BESIDE_ATTENTION", False)
    memsets = []

    def memset(address, value, nbytes, stream):
        memsets.append((address, nbytes, stream))
        ctypes.memset(address, value, nbytes)
        return 0

    monkeypatch.setattr(plan_items, "_MEMSET", [memset])
    buffers = []

    def allocator(size, alignment, stream):  # the general path's scratch, on the CPU
        buffers.append(torch.empty(size, dtype=torch.int8))
        return buffers[-1]

    token = _allocation._allocator.set(allocator)
    call_plan._PLANS.clear()
    effects.kernels, effects.memsets = kernels, memsets
    yield effects
    _allocation._allocator.reset(token)
    call_plan._PLANS.clear()
    fast.clear()


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, N, D, generator=gen).double().float() for h in (HQ, HKV, HKV))


def _last(kernel):
    return kernel.compiled.run.calls[-1]


def test_replay_hands_every_launch_what_the_general_path_did(fakes):
    q, k, v = _inputs()
    stats = dict(call_plan.PLAN_STATS)
    general = [optimized.prism_attention(q, k, v, CFG) for _ in range(2)]  # seen, recorded
    selection_kernels = ("pool", "select", "attend")
    recorded = {name: _last(fakes.kernels[name]) for name in selection_kernels}
    assert call_plan.PLAN_STATS["made"] == stats["made"] + 1
    replayed_out = optimized.prism_attention(q, k, v, CFG)
    assert call_plan.PLAN_STATS["hit"] == stats["hit"] + 1
    replayed = {name: _last(fakes.kernels[name]) for name in selection_kernels}
    assert all(len(fakes.kernels[name].compiled.run.calls) == 3 for name in recorded)
    # Same grid, stream, function, constexprs and scalars; inputs at the same addresses.
    names = [p.name for p in fakes.kernels["select"].params]
    tensors = {"pool": 4, "select": names.index("num_q_heads"), "attend": 9}
    for name, call in replayed.items():
        before = recorded[name]
        assert len(call) == len(before)
        differ = {i for i, (a, b) in enumerate(zip(call, before, strict=True)) if a != b}
        allowed = set(range(13, 13 + tensors[name]))
        if name == "attend":
            allowed.add(7)  # the scratch address
        assert differ <= allowed, name
    assert replayed["pool"][13:16] == (q.data_ptr(), k.data_ptr(), v.data_ptr())
    assert replayed["attend"][13:16] == (q.data_ptr(), k.data_ptr(), v.data_ptr())
    # One buffer: pooling's, the mask, the indices and the scratch, disjoint, in order.
    work, mask, num, idx = replayed["select"][13:17]
    assert replayed["pool"][16] == work
    assert replayed["attend"][18:20] == (num, idx)
    assert replayed["attend"][16] == replayed_out.data_ptr()
    rows = B * HQ * NQT
    work_bytes = 8 * pooling.work_layout(B, HQ, HKV, D, NQT, NQT)[0]
    scratch = replayed["attend"][7]
    regions = sorted([(work, work_bytes), (mask, rows * NQT), (num, 4 * rows),
                      (idx, 4 * rows * NQT), (scratch, SCRATCH * replayed["attend"][0])])
    for (a, size), (b, _) in zip(regions, regions[1:], strict=False):
        assert a + size <= b
    assert (scratch - work) % 128 == 0  # the buffer starts with pooling's (CUDA: 512-aligned)
    # The energy sums were zeroed by the driver memset before pooling ran.
    assert fakes.memsets[-1] == (work, 8 * fakes.sums, 7)
    assert fakes.sums_seen[-1] == [0.0] * fakes.sums
    # Outputs: fresh tensors of the general path's shape and dtype, written by "attention".
    assert replayed_out.shape == general[0].shape and replayed_out.dtype == general[0].dtype
    assert replayed_out.data_ptr() not in (general[0].data_ptr(), general[1].data_ptr())
    assert replayed_out.flatten()[0].item() == sum(r % NQT + 1 for r in range(rows))
    assert q.equal(_inputs()[0]) and k.equal(_inputs()[1]) and v.equal(_inputs()[2])


def test_replayed_calls_raise_on_nan_input(fakes):
    q, k, v = _inputs()
    for _ in range(2):
        optimized.prism_attention(q, k, v, CFG)
        optimized.select_blocks(q, k, CFG)
    hits = call_plan.PLAN_STATS["hit"]
    bad = q.clone()
    bad[0, 1, 5, 3] = float("nan")
    fakes.poison_flag = True
    with pytest.raises(ValueError, match="q contains 1 NaN or Inf"):
        optimized.prism_attention(bad, k, v, CFG)
    with pytest.raises(ValueError, match="q contains 1 NaN or Inf"):
        optimized.select_blocks(bad, k, CFG)
    assert call_plan.PLAN_STATS["hit"] == hits + 2


def test_replayed_selection_returns_its_own_tile_mask(fakes):
    q, k, _ = _inputs()
    first = optimized.select_blocks(q, k, CFG)
    optimized.select_blocks(q, k, CFG)
    hits = call_plan.PLAN_STATS["hit"]
    mask = optimized.select_blocks(q, k, CFG)
    assert call_plan.PLAN_STATS["hit"] == hits + 1
    work, mask_at, num_at, idx_at = _last(fakes.kernels["select"])[13:17]
    assert (mask.data_ptr(), mask.kv_num_blocks.data_ptr(), mask.kv_indices.data_ptr()) == (
        mask_at, num_at, idx_at)
    assert mask.shape == first.shape and mask.dtype == torch.bool and mask.all()
    assert mask.kv_indices[0, 0, 2].tolist() == [0, 1, 2]
    out, got = optimized.prism_attention(q, k, _inputs()[2], CFG, return_mask=True)
    out, got = optimized.prism_attention(q, k, _inputs()[2], CFG, return_mask=True)
    out, got = optimized.prism_attention(q, k, _inputs()[2], CFG, return_mask=True)
    assert call_plan.PLAN_STATS["hit"] == hits + 2
    assert got.kv_num_blocks.data_ptr() == _last(fakes.kernels["attend"])[18]


def test_plans_are_refused_or_left_when_the_call_changes(fakes, monkeypatch):
    q, k, v = _inputs()
    for _ in range(2):
        optimized.prism_attention(q, k, v, CFG)
    hits = call_plan.PLAN_STATS["hit"]
    # A swapped kernel (a benchmark stub): the general path, with the new kernel.
    other = _Kernel(fakes.real_select, fakes.select)
    monkeypatch.setattr(selection, "_select_tiles_kernel", other)
    optimized.prism_attention(q, k, v, CFG)
    assert call_plan.PLAN_STATS["hit"] == hits and len(other.compiled.run.calls) == 1
    monkeypatch.setattr(selection, "_select_tiles_kernel", fakes.kernels["select"])
    optimized.prism_attention(q, k, v, CFG)
    assert call_plan.PLAN_STATS["hit"] == hits + 1
    # Another scale, a misaligned input, or k passed as v, is another signature.
    optimized.prism_attention(q, k, v, CFG, scale=0.5)
    shifted = torch.empty(q.numel() + 1)[1:].view_as(q).copy_(q)
    optimized.prism_attention(shifted, k, v, CFG)
    for _ in range(3):
        optimized.prism_attention(q, k, k, CFG)
    assert call_plan.PLAN_STATS["hit"] == hits + 2
    optimized.prism_attention(q, k, v, CFG)  # v's own address, not k's
    assert _last(fakes.kernels["attend"])[13:16] == (q.data_ptr(), k.data_ptr(), v.data_ptr())
    assert call_plan.PLAN_STATS["hit"] == hits + 3
    hits += 2
    # A call that does more on the device than launches and zeroing is never replayed.
    real = pooling.run_pooling
    monkeypatch.setattr(pooling, "run_pooling", lambda *a: real(*a).add_(0))
    monkeypatch.setattr(selection, "run_pooling", pooling.run_pooling)
    refused = call_plan.PLAN_STATS["refused"]
    for _ in range(3):
        optimized.select_blocks(q, k, CFG)
    assert call_plan.PLAN_STATS["refused"] == refused + 1
    assert call_plan.PLAN_STATS["hit"] == hits + 1


def test_replay_rebuilds_host_descriptors_over_the_new_inputs(fakes, monkeypatch):
    """Attention launches that read K and V through host tensor descriptors (TMA): the
    replay builds them over this call's k and v, with the recorded block shapes."""
    monkeypatch.setattr(attention, "default_config",
                        lambda *args: attention.AttentionConfig(32, 32, 4, 1, use_tma=True))
    monkeypatch.setattr(attention, "tma_compatible", lambda *args: True)
    attention._PLANS.clear()
    q, k, v = _inputs()
    for _ in range(2):
        optimized.prism_attention(q, k, v, CFG)
    recorded = _last(fakes.kernels["attend"])
    hits = call_plan.PLAN_STATS["hit"]
    k2, v2 = k.clone(), v.clone()
    optimized.prism_attention(q, k2, v2, CFG)
    assert call_plan.PLAN_STATS["hit"] == hits + 1
    replayed = _last(fakes.kernels["attend"])
    for position, base in ((20, k2), (21, v2)):
        desc, before = replayed[position], recorded[position]
        assert isinstance(desc, TensorDescriptor) and desc.base is base
        assert (list(desc.block_shape), desc.padding) == (list(before.block_shape),
                                                          before.padding)
        assert tuple(desc.shape) == tuple(base.shape) and tuple(desc.strides) == base.stride()
    assert replayed[14:16] == (k2.data_ptr(), v2.data_ptr())
    attention._PLANS.clear()


def _masks(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, HQ, NQT, NQT, generator=gen) < 0.5


def test_block_sparse_replay_reads_each_calls_mask(fakes):
    """block_sparse_attention's plan: the mask's values are data (indices rebuilt from
    this call's mask), a TileMask's carried indices are read where they lie, NaN raises."""
    q, k, v = _inputs()
    stats = dict(call_plan.PLAN_STATS)
    for seed in (0, 1):  # seen, recorded
        optimized.block_sparse_attention(q, k, v, _masks(seed), block_size=32)
    assert call_plan.PLAN_STATS["made"] == stats["made"] + 1
    for seed in (2, 3, 4):
        mask = _masks(seed)
        out = optimized.block_sparse_attention(q, k, v, mask, block_size=32)
        assert out.flatten()[0].item() == mask.sum().item()  # counts of this mask
        assert _last(fakes.kernels["index"])[13] == mask.data_ptr()
        assert _last(fakes.kernels["attend"])[16] == out.data_ptr()
    assert call_plan.PLAN_STATS["block_sparse"] == stats["block_sparse"] + 3
    # Same signature with lse: another plan; its lse is a fresh output.
    for _ in range(3):
        out, lse = optimized.block_sparse_attention(q, k, v, _masks(5), block_size=32,
                                                    return_lse=True)
    assert _last(fakes.kernels["attend"])[17] == lse.data_ptr() != out.data_ptr()
    assert call_plan.PLAN_STATS["block_sparse"] == stats["block_sparse"] + 4
    # A TileMask with its indices: not rebuilt, the attention reads the carried ones.
    selected = optimized.select_blocks(q, k, CFG)
    index_calls = len(fakes.kernels["index"].compiled.run.calls)
    for _ in range(3):
        out = optimized.block_sparse_attention(q, k, v, selected, block_size=32)
    assert len(fakes.kernels["index"].compiled.run.calls) == index_calls
    assert _last(fakes.kernels["attend"])[18:20] == (selected.kv_num_blocks.data_ptr(),
                                                     selected.kv_indices.data_ptr())
    assert call_plan.PLAN_STATS["block_sparse"] == stats["block_sparse"] + 5
    # NaN: the replayed check flags it and the call raises the reference's error.
    bad = v.clone()
    bad[0, 1, 7, 2] = float("nan")
    fakes.poison_flag = True
    with pytest.raises(ValueError, match="v contains 1 NaN or Inf"):
        optimized.block_sparse_attention(q, k, bad, _masks(6), block_size=32)
    assert call_plan.PLAN_STATS["block_sparse"] == stats["block_sparse"] + 6


def test_operator_bodies_replay_plans(fakes):
    """What compiled code runs: the operators' bodies record on a second call and replay
    after, with fresh outputs; the fused operator's plan is prism_attention's."""
    q, k, v = _inputs()
    config = ops.config_string(CFG)
    stats = dict(call_plan.PLAN_STATS)
    outs = [torch.ops.prism.prism_attention(q, k, v, config, True, None, True, True)
            for _ in range(3)]
    assert call_plan.PLAN_STATS["attention"] == stats["attention"] + 1
    out, lse, mask = outs[2]
    assert _last(fakes.kernels["attend"])[16:18] == (out.data_ptr(), lse.data_ptr())
    assert out.flatten()[0].item() == outs[0][0].flatten()[0].item()
    assert mask.shape == (B, HQ, NQT, NQT) and mask.all()
    assert len({t.data_ptr() for t in (q, k, v, out, lse, mask)}) == 6
    selected = [torch.ops.prism.select(q, k, None, True, config) for _ in range(3)]
    assert call_plan.PLAN_STATS["select"] == stats["select"] + 1
    assert selected[2][3].dtype == torch.float64 and selected[2][3].shape == (1,)
    for check in (True, False):
        for _ in range(3):
            got = torch.ops.prism.block_sparse_attention(q, k, v, _masks(7), None, None, 32,
                                                         True, None, False, check)
        assert got[0].flatten()[0].item() == _masks(7).sum().item()
        assert got[2].shape == ((1,) if check else (0,))
    assert call_plan.PLAN_STATS["block_sparse"] == stats["block_sparse"] + 2


def test_compiled_calls_replay_plans(fakes):
    """A compiled layer's operators replay plans from its third run on (the first two:
    seen, recorded), and never record while Dynamo traces."""
    q, k, v = _inputs()
    torch._dynamo.reset()

    def layer(q, k, v):
        mask = optimized.select_blocks(q, k, CFG)
        return (optimized.prism_attention(q, k, v, CFG) * 2,
                optimized.block_sparse_attention(q, k, v, mask, block_size=32))

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    stats = dict(call_plan.PLAN_STATS)
    outs = [compiled(q, k, v) for _ in range(4)]
    for kind in ("select", "attention", "block_sparse"):
        assert call_plan.PLAN_STATS[kind] == stats[kind] + 2, kind
    assert call_plan.PLAN_STATS["made"] == stats["made"] + 3
    rows = B * HQ * NQT
    assert outs[3][0].flatten()[0].item() == 2 * sum(r % NQT + 1 for r in range(rows))
    assert outs[3][1].flatten()[0].item() == NQT * rows  # the fake selection keeps all
    torch._dynamo.reset()


def test_launch_is_recorded_for_plans(fakes):
    """:func:`prism.optimized.launch.launch` (the estimator kernels' path) is kept by
    ``recording`` like a prepared launch: its cached entry, the grid, every argument in
    order (tensors and scalars interleaved as the kernel takes them), the stream."""
    kernel = fakes.kernels["index"]
    rows = B * HQ * NQT
    mask = torch.zeros(rows, NQT, dtype=torch.uint8)
    num = torch.empty(rows, dtype=torch.int32)
    idx = torch.empty(rows, NQT, dtype=torch.int32)
    options = dict(CAUSAL_TRIM=False, BLOCK=4, num_warps=4)
    with fast.recording() as launches:
        for _ in range(2):  # compiled and cached, then replayed from the cache
            fast.launch(kernel, (rows,), mask, num, idx, NQT, NQT, 0, **options)
        kernel.compiled.run.effect = lambda values: None  # a scalar before a tensor
        fast.launch(kernel, (rows,), mask, num, NQT, idx, NQT, 0, **options)
    assert len(kernel.compiled.run.calls) == 3
    first, second, mixed = launches
    assert first[0] is second[0] and mixed[0] is not None  # cached entries
    assert first[1] == (rows,) and first[4] == 7
    # Every argument where a prepared launch keeps its tensors, scalars in place.
    assert len(first[2]) == 6 and first[3] == ()
    assert all(a is b for a, b in zip(first[2][:3], (mask, num, idx), strict=True))
    assert first[2][3:] == (NQT, NQT, 0) and mixed[2][2] == NQT and mixed[2][3] is idx
    # Outside a recording nothing is kept, and the launch still runs.
    fast.launch(kernel, (rows,), mask, num, idx, NQT, NQT, 0, **options)
    assert len(kernel.compiled.run.calls) == 4


class _Side:
    """A stand-in side stream: only its raw handle is read while a plan is made."""

    def __init__(self, handle):
        self.cuda_stream = handle


def test_side_streams_forked_and_joined_are_replayable():
    """Launches on a side stream forked from the call's stream and joined back get that
    stream as their role; any other stream, a fork never joined, or a join without its
    fork refuses the plan."""
    side, other = _Side(9), _Side(11)
    main_launch, side_launch = ("e", (1,), (), (), 7), ("e", (1,), (), (), 9)
    items = [main_launch, ("fork", side, 7), side_launch, ("zero", None, 9), main_launch,
             ("join", side, 7), main_launch]
    roles = call_plan._stream_roles(items)
    assert roles == [None, side, side, side, None, side, None]
    assert call_plan._stream_roles([main_launch, side_launch]) is None  # never forked
    assert call_plan._stream_roles(items[:-2]) is None  # never joined
    assert call_plan._stream_roles([("join", side, 7), main_launch]) is None
    assert call_plan._stream_roles([("fork", side, 7), ("fork", side, 7)]) is None
    # A fork from a stream other than the call's, or a launch on an unforked side.
    assert call_plan._stream_roles([main_launch, ("fork", other, 9), ("join", other, 9)]) is None
    assert call_plan._stream_roles(items[:2] + [("e", (1,), (), (), 11)] + items[5:]) is None


class _FakeStream:
    """A stream object as a replay uses it: it waits on events, and logs that."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait", self.name, event))


def test_replayed_fork_and_join_order_the_streams_with_reused_events(monkeypatch):
    """A replayed fork makes the side stream wait for the call's stream (an event
    recorded there), a join the reverse; the current stream's object is built once per
    raw handle, and each fork or join step reuses one event per thread (never one
    shared between threads, which could be re-recorded between record and wait)."""
    import threading

    log, built = [], []

    class _Event:
        def record(self, stream):
            log.append(("record", stream.name, self))

    main = _FakeStream("main", log)
    side = _FakeStream("side", log)
    side.cuda_stream = 9

    def current_stream(device=None):
        built.append(device)
        return main

    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(fast, "_get_stream", lambda device: 7)
    monkeypatch.setattr(call_plan, "_STREAM_OBJECTS", {})
    steps = []
    for kind in ("fork", "join"):
        step = call_plan._Step()
        step.side, step.sync, step.events = side, kind, {}
        steps.append(step)
    plan = object.__new__(call_plan.CallPlan)
    plan.torch_device, plan.device, plan.words, plan.outputs = "cuda:0", 0, 0, []
    plan.steps, plan.flag = steps, None
    for _ in range(2):
        assert plan.run([]) == ([], None, None)
    fork_event, join_event = log[0][2], log[2][2]
    assert fork_event is not join_event
    expected = [("record", "main", fork_event), ("wait", "side", fork_event),
                ("record", "side", join_event), ("wait", "main", join_event)]
    assert log == expected * 2  # the second replay reuses both events
    assert built == ["cuda:0"]  # one stream object for the raw handle 7
    log.clear()
    thread = threading.Thread(target=plan.run, args=([],))
    thread.start()
    thread.join()
    assert [entry[:2] for entry in log] == [entry[:2] for entry in expected]
    assert log[0][2] is not fork_event and log[2][2] is not join_event  # its own events
    assert log[0][2] is not log[2][2]


def test_fork_and_join_events_stay_bounded_as_threads_come_and_go(monkeypatch):
    """Each short-lived thread that replays a plan gets its own event; the table of a
    step never holds more than 64 of them."""
    import threading

    monkeypatch.setattr(torch.cuda, "Event", object)
    step = call_plan._Step()
    step.events = {}
    seen, together = [], threading.Barrier(100)

    def replay():  # alive until all have their event, so the 100 thread ids differ
        seen.append(call_plan._step_event(step))
        together.wait()

    threads = [threading.Thread(target=replay) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 100 and len({id(event) for event in seen}) == 100
    assert len(step.events) <= 64
    assert call_plan._step_event(step) is call_plan._step_event(step)
