"""The cached launcher of prism.optimized.launch.

On the CPU (Triton's interpreter) every launch must fall back to
``kernel[grid](...)`` and give the same outputs; the launch key must be at
least as fine as Triton's own specialisation, so that two calls with one key
can share a compiled kernel. On a CUDA GPU the fast path must give bitwise
the outputs of Triton's launch, re-enter Triton whenever the key changes
(a misaligned pointer, an int that stops being divisible by 16), and replay
under CUDA graph capture.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.nvidia.compiler import CUDABackend
from triton.backends.nvidia.driver import wrap_handle_tensordesc
from triton.runtime import _allocation
from triton.runtime.jit import JITFunction, native_specialize_impl
from triton.tools.tensor_descriptor import TensorDescriptor

from helpers import count_shape_checks
from prism.optimized import launch as fast
from prism.optimized._runtime import kernels_interpreted


def _scaled_copy(X, Y, n, scale, shift, FLIP: tl.constexpr, BLOCK: tl.constexpr = 128):
    """y[i] = x[i] * scale + shift (+ i when FLIP) for i < n."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0.0)
    y = x * scale + shift
    if FLIP:
        y = y + offs.to(tl.float32)
    tl.store(Y + offs, y, mask=ok)


_scaled_copy_kernel = triton.jit(_scaled_copy)


def _triton_specialisation(args):
    """What Triton 3.6 specialises each argument on (type and attribute), as a tuple."""
    return tuple(native_specialize_impl(CUDABackend, a, False, True, True) for a in args)


_BUFFER = torch.zeros(64, dtype=torch.float32)
_ARG_POOL = [
    0, 1, 2, 15, 16, 17, 32, -16, -17, 2 ** 31 - 16, 2 ** 31, 2 ** 31 + 1, 2 ** 40,
    2 ** 63, 2 ** 63 + 16, True, False, 1.0, 0.5, 16.0, None,
    _BUFFER, _BUFFER[1:], _BUFFER[4:], _BUFFER[3:], _BUFFER.to(torch.bfloat16),
    _BUFFER.to(torch.bfloat16)[8:], _BUFFER.to(torch.bfloat16)[1:], _BUFFER.bool(),
    _BUFFER.to(torch.int32)[2:],
    TensorDescriptor.from_tensor(_BUFFER.view(4, 16), [2, 16]),
    TensorDescriptor.from_tensor(_BUFFER.view(4, 16), [4, 16]),
    TensorDescriptor.from_tensor(_BUFFER.view(4, 16), [2, 16], padding="nan"),
    TensorDescriptor.from_tensor(_BUFFER.to(torch.bfloat16).view(2, 32), [2, 16]),
]
_DESC = _ARG_POOL[-4:]


def test_equal_keys_mean_equal_specialisation():
    """Two argument lists with one launch key are specialised alike by Triton."""
    rng = random.Random(0)
    seen: dict = {}
    lists = [tuple(rng.choice(_ARG_POOL) for _ in range(3)) for _ in range(3000)]
    lists += list(itertools.product(_ARG_POOL, repeat=1))
    for args in lists:
        key = fast.argument_key(args, require_cuda=False)
        assert key is not None
        spec = _triton_specialisation(args)
        if key in seen:
            assert seen[key] == spec, (args, key)
        seen[key] = spec


@pytest.mark.parametrize("a,b", [
    (16, 17), (1, 16), (1, 17), (0, 1), (True, 1), (False, 0), (1.0, 1), (2 ** 31, 16),
    (2 ** 63, 2 ** 31), (None, 0),
    (_BUFFER, _BUFFER[1:]), (_BUFFER, _BUFFER.to(torch.bfloat16)), (_BUFFER, 16),
    (_DESC[0], _DESC[1]), (_DESC[0], _DESC[3]), (_DESC[0], _BUFFER),
])
def test_key_separates_what_triton_separates(a, b):
    assert _triton_specialisation((a,)) != _triton_specialisation((b,))
    assert fast.argument_key((a,), require_cuda=False) != fast.argument_key(
        (b,), require_cuda=False)


def test_uncovered_arguments_have_no_key():
    assert fast.argument_key(((1, 2),)) is None
    assert fast.argument_key(("x",)) is None
    # CPU tensors never take the fast path (the launcher would get a host address).
    assert fast.argument_key((_BUFFER,)) is None
    assert fast.argument_key((_DESC[0],)) is None


def test_interpreter_falls_back_to_triton():
    """Under the interpreter launch() is kernel[grid](...) and counts nothing."""
    if not kernels_interpreted(_scaled_copy_kernel):
        pytest.skip("kernels are compiled here; the CUDA tests cover the fast path")
    x = torch.randn(100)
    expected, got = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    before = dict(fast.STATS)
    _scaled_copy_kernel[(4,)](x, expected, 100, 2.0, 0.5, FLIP=True, BLOCK=32)
    fast.launch(_scaled_copy_kernel, (4,), x, got, 100, 2.0, 0.5, FLIP=True, BLOCK=32)
    assert torch.equal(expected, got)
    assert torch.equal(got, x * 2.0 + 0.5 + torch.arange(100, dtype=torch.float32))
    assert fast.STATS == before


class _Stub:
    """Something indexable by a grid that is not a JITFunction (as benchmark stubs are)."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_non_jit_objects_are_indexed_by_the_grid():
    stub = _Stub()
    fast.launch(stub, (3, 2), 1, 2.0, X=4)
    assert stub.calls == [((3, 2), (1, 2.0), {"X": 4})]


class _FakeLauncher:
    """Stands in for Triton's CudaLauncher: records what its C entry point receives."""

    global_scratch_size = 0
    profile_scratch_size = 0
    launch_cooperative_grid = False
    launch_pdl = False

    def __init__(self):
        self.calls = []

    def launch(self, *args):
        self.calls.append(args)


class _FakeCompiled:
    function = 1234
    packed_metadata = (4, 1, 0)

    def __init__(self):
        self.run = _FakeLauncher()


class _FakeTensor(torch.Tensor):
    """A tensor that reports itself on CUDA, so the key accepts it on the CPU."""

    is_cuda = True


class FakeKernel:
    """A stand-in JITFunction whose every run returns one fake compiled kernel."""

    params = JITFunction(_scaled_copy).params
    pre_run_hooks: list = []

    def __init__(self):
        self.compiled = _FakeCompiled()
        self.runs = 0

    def run(self, *args, grid, warmup, **kwargs):
        self.runs += 1
        return self.compiled

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)


def test_cached_launch_passes_what_the_launcher_expects(monkeypatch):
    """The replayed call: grid, stream, function, the launcher's own prefix, raw
    addresses, the run-time arguments and the constexprs (defaults included)."""

    monkeypatch.setattr(fast, "_JITFunction", FakeKernel)
    monkeypatch.setattr(fast, "_get_device", lambda: 0)
    monkeypatch.setattr(fast, "_get_stream", lambda device: 77)
    fast.clear()
    kernel = FakeKernel()
    x = torch.zeros(64).as_subclass(_FakeTensor)
    y = torch.zeros(64).as_subclass(_FakeTensor)
    fast.launch(kernel, (2, 3), x, y, 64, 2.0, 0.5, FLIP=True, BLOCK=32, num_warps=4)
    assert kernel.runs == 1 and kernel.compiled.run.calls == []
    fast.launch(kernel, (5,), y, x, 48, 3.0, 1.5, FLIP=True, BLOCK=32, num_warps=4)
    assert kernel.runs == 1
    (call,) = kernel.compiled.run.calls
    assert call == (5, 1, 1, 77, 1234, False, False, None, None, (4, 1, 0), None, None, None,
                    y.data_ptr(), x.data_ptr(), 48, 3.0, 1.5, True, 32)
    # A left-out constexpr with a default is passed its default.
    fast.launch(kernel, (1,), x, y, 48, 3.0, 1.5, FLIP=True)
    fast.launch(kernel, (1,), x, y, 48, 3.0, 1.5, FLIP=True)
    assert kernel.runs == 2
    assert kernel.compiled.run.calls[-1][-2:] == (True, 128)
    # A new constexpr value, or the same value as another type, is a new entry.
    fast.launch(kernel, (5,), y, x, 48, 3.0, 1.5, FLIP=False, BLOCK=32, num_warps=4)
    fast.launch(kernel, (5,), y, x, 48, 3.0, 1.5, FLIP=1, BLOCK=32, num_warps=4)
    assert kernel.runs == 4
    # A constexpr passed positionally is never served from the cache.
    fast.launch(kernel, (5,), y, x, 48, 3.0, 1.5, True, 32)
    fast.launch(kernel, (5,), y, x, 48, 3.0, 1.5, True, 32)
    assert kernel.runs == 6
    fast.clear()


def _desc_copy(X_DESC, Y, n, BLOCK: tl.constexpr = 16):
    """Parameters only: a kernel taking a host tensor descriptor (never compiled here)."""


class _DescriptorRunner(_FakeLauncher):
    """A launcher whose entry point is Triton's own descriptor wrapper around a recorder."""

    def __init__(self, global_scratch_size=0):
        super().__init__()
        self.global_scratch_size = global_scratch_size
        self.global_scratch_align = 128
        signature = {0: "tensordesc<fp32[2, 16]>", 1: "*fp32", 2: "i32", 3: "constexpr"}
        self.launch = wrap_handle_tensordesc(lambda *args: self.calls.append(args), signature,
                                             None)


def _replay_args(monkeypatch, runner, *args, grid=(5, 2)):
    """What the cached launch of ``_desc_copy`` hands to ``runner``'s entry point."""
    monkeypatch.setattr(fast, "_JITFunction", FakeKernel)
    monkeypatch.setattr(fast, "_get_device", lambda: 0)
    monkeypatch.setattr(fast, "_get_stream", lambda device: 9)
    monkeypatch.setattr(FakeKernel, "params", JITFunction(_desc_copy).params)
    fast.clear()
    kernel = FakeKernel()
    kernel.compiled.run = runner
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    fast.launch(kernel, grid, *args, BLOCK=16)
    fast.launch(kernel, grid, *args, BLOCK=16)
    assert kernel.runs == 1 and len(runner.calls) == 1
    fast.clear()
    return runner.calls[0]


def test_cached_launch_expands_descriptors_as_triton_does(monkeypatch):
    """The replay passes a host descriptor as Triton's wrapper would (its base as a raw
    address), straight to the C entry point."""
    x, y = torch.arange(64.0).view(4, 16), torch.zeros(64)
    desc = TensorDescriptor.from_tensor(x, [2, 16])
    got = _replay_args(monkeypatch, _DescriptorRunner(), desc, y, 64)
    runner = _DescriptorRunner()
    runner.launch(5, 2, 1, 9, 1234, False, False, None, None, (4, 1, 0), None, None, None,
                  desc, y.data_ptr(), 64, 16)
    (expected,) = runner.calls
    expected = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in expected)
    assert got == expected
    assert got[13:] == (x.data_ptr(), 4, 16, 16, 1, False, 4, 16, 16, 1, y.data_ptr(), 64, 16)


def test_cached_launch_allocates_global_scratch(monkeypatch):
    """A kernel with global scratch gets programs x bytes per program from the caller's
    allocator (torch's caching allocator when none is set), in the launcher's slot."""
    sizes = []

    def allocator(size, alignment, stream):
        sizes.append((size, alignment, stream))
        buffers.append(torch.empty(size, dtype=torch.int8))
        return buffers[-1]

    buffers: list = []
    token = _allocation._allocator.set(allocator)
    try:
        x, y = torch.arange(64.0).view(4, 16), torch.zeros(64)
        desc = TensorDescriptor.from_tensor(x, [2, 16])
        got = _replay_args(monkeypatch, _DescriptorRunner(global_scratch_size=48), desc, y, 64)
    finally:
        _allocation._allocator.reset(token)
    # The first (Triton) call never reached the fake launcher's allocation: one replay.
    assert sizes == [(5 * 2 * 48, 128, 9)]
    assert got[7] == buffers[0].data_ptr() and got[8] is None
    assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)


def test_attention_plan_is_kept_per_call_signature(monkeypatch):
    """The launch configuration (with its TMA and warp-specialisation checks) is worked
    out once per signature; a misaligned input is a new signature; outputs stay right."""
    from prism import reference
    from prism.optimized import attention
    from prism.optimized.indices import mask_rows_to_indices

    device = "cpu" if kernels_interpreted(_scaled_copy_kernel) else "cuda"
    configs = []
    real = attention._launch_config
    monkeypatch.setattr(attention, "_launch_config",
                        lambda *args: configs.append(args) or real(*args))
    attention._PLANS.clear()
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 64, 16, generator=gen).to(device)
    k, v = (torch.randn(1, 1, 64, 16, generator=gen).to(device) for _ in range(2))
    mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool, device=device).expand(1, 2, 2, 2)
    num, idx = mask_rows_to_indices(mask, 0, causal_trim=True)

    def run(k):
        return attention.sparse_attention_forward(
            q, k, v, num, idx, block_size=32, causal=True, scale=None, return_lse=True,
            first_query_tile=0, query_start=0, interpreted=device == "cpu")

    first, again = run(k), run(k)
    assert len(configs) == 1 and len(attention._PLANS) == 1
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    expected, expected_lse = reference.block_sparse_attention(
        q, k, v, mask, block_size=32, causal=True, return_lse=True)
    torch.testing.assert_close(first[0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first[1], expected_lse, rtol=1e-4, atol=1e-4)
    shifted = torch.empty(k.numel() + 1, device=device)[1:].view_as(k).copy_(k)
    assert shifted.data_ptr() % 16
    torch.testing.assert_close(run(shifted)[0], first[0], rtol=0, atol=0)
    assert len(configs) == 2 and len(attention._PLANS) == 2


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _both(x, n, scale, shift, flip, grid, block=128):
    """The kernel's output by Triton's launch and by launch(), on NaN-filled outputs."""
    expected = torch.full_like(x, float("nan"))
    got = torch.full_like(x, float("nan"))
    _scaled_copy_kernel[grid](x, expected, n, scale, shift, FLIP=flip, BLOCK=block)
    fast.launch(_scaled_copy_kernel, grid, x, got, n, scale, shift, FLIP=flip, BLOCK=block)
    return expected, got


@pytest.mark.gpu
@cuda
def test_fast_path_is_bitwise_triton():
    fast.clear()
    x = torch.randn(4096, device="cuda")
    before = dict(fast.STATS)
    for _ in range(3):
        expected, got = _both(x, 4096, 1.5, -0.25, False, (32,))
        assert torch.equal(expected, got)
    assert fast.STATS["slow"] - before["slow"] == 1  # the first call compiles and caches
    assert fast.STATS["fast"] - before["fast"] == 2
    # Fresh data through the cached entry: still Triton's bits.
    y = torch.randn(4096, device="cuda")
    expected, got = _both(y, 4096, 1.5, -0.25, False, (32,))
    assert torch.equal(expected, got)


@pytest.mark.gpu
@cuda
def test_key_changes_go_back_through_triton():
    fast.clear()
    x = torch.randn(4096 + 16, device="cuda")
    _both(x, 4096, 2.0, 1.0, True, (32,))
    before = dict(fast.STATS)
    cases = [
        (x[1:4097], 4096),  # a 4-byte offset: not 16-byte aligned
        (x[:4096], 4095),   # n no longer divisible by 16
        (x[:4096], 1),      # n == 1 is a constant to Triton
        (x[:4096].double().float(), 4096),
    ]
    for data, n in cases:
        expected, got = _both(data, n, 2.0, 1.0, True, (32,))
        # Elements from n on are never written: both keep their NaN poison.
        assert torch.equal(expected[:n], got[:n]), n
        assert expected[n:].isnan().all() and got[n:].isnan().all(), n
    assert fast.STATS["fast"] - before["fast"] == 1  # only the last case reuses an entry
    # A different constexpr is a different compiled kernel, with different results.
    expected, got = _both(x[:4096], 4096, 2.0, 1.0, False, (32,))
    assert torch.equal(expected, got)
    # (The kernel fuses x * 2 + 1 into one rounding; torch rounds twice.)
    torch.testing.assert_close(got, x[:4096] * 2.0 + 1.0, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@cuda
def test_fast_path_under_cuda_graph_capture():
    fast.clear()
    x = torch.randn(2048, device="cuda")
    out = torch.empty_like(x)
    fast.launch(_scaled_copy_kernel, (16,), x, out, 2048, 3.0, 0.0, FLIP=False, BLOCK=128)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fast.launch(_scaled_copy_kernel, (16,), x, out, 2048, 3.0, 0.0, FLIP=False, BLOCK=128)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x * 3.0)


@pytest.mark.gpu
@cuda
def test_selection_outputs_match_triton_launch(monkeypatch):
    """select_blocks through cached launches equals the same call with the cache off."""
    from prism import optimized
    from prism.optimized import call_plan

    # A call plan would replay every call here once another test of the process has
    # recorded this signature (-n 8 ordering), and no launch would be counted.
    monkeypatch.setattr(call_plan, "ENABLED", False)

    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, 8, 4096, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 4096, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    optimized.select_blocks(q, k)
    before = fast.STATS["fast"]
    cached = optimized.select_blocks(q, k)
    assert fast.STATS["fast"] > before
    saved = fast._get_device
    fast._get_device = None  # every launch through kernel[grid]
    try:
        plain = optimized.select_blocks(q, k)
    finally:
        fast._get_device = saved
    assert torch.equal(cached.as_tensor(), plain.as_tensor())
    assert torch.equal(cached.kv_num_blocks, plain.kv_num_blocks)
    assert torch.equal(cached.kv_indices, plain.kv_indices)


# ---------------------------------------------------------------------------
# Host-side caches of the public calls: remembered validation, TileMask.
# ---------------------------------------------------------------------------

def test_remembered_validation_still_rejects_bad_calls():
    """A signature that passed once skips the shape checks, never the others."""
    from prism.optimized._runtime import validate_qk, validate_qkv

    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    v = torch.randn(1, 2, 64, 8)
    for _ in range(2):
        validate_qk(q, k, causal=True, check_values=False)
        validate_qkv(q, k, v, causal=True, check_values=False)
    with pytest.raises(TypeError, match="causal must be True or False"):
        validate_qk(q, k, causal=1, check_values=False)  # 1 == True, but not a bool
    with pytest.raises(TypeError, match="causal must be True or False"):
        validate_qkv(q, k, v, causal=1, check_values=False)
    bad = q.clone()
    bad[0, 1, 5, 3] = float("nan")
    with pytest.raises(ValueError, match="q contains 1 NaN"):
        validate_qk(bad, k, causal=True)
    bad_v = v.clone()
    bad_v[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="v contains 1 NaN or Inf"):
        validate_qkv(q, k, bad_v, causal=True)
    for _ in range(2):  # failures are never remembered
        with pytest.raises(ValueError, match="v must match k"):
            validate_qkv(q, k, torch.randn(1, 2, 63, 8), causal=True, check_values=False)
        with pytest.raises(TypeError, match="mixed dtypes"):
            validate_qk(q, k.double().float().half(), causal=True, check_values=False)
        with pytest.raises(ValueError, match="Nq <= Nk"):
            validate_qk(torch.randn(1, 4, 65, 16), k, causal=True, check_values=False)
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            validate_qkv(q, k, v.numpy(), causal=True, check_values=False)


def test_optimized_validation_remembers_passed_signatures(monkeypatch):
    """The optimized path skips the shape checks of a signature that passed (host time)."""
    from prism.optimized import _runtime

    monkeypatch.setattr(_runtime, "_PASSED", {})
    calls = count_shape_checks(monkeypatch)
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    v = torch.randn(1, 2, 32, 8)
    for _ in range(3):
        _runtime.validate_qk(q, k, causal=True, check_values=False)
    assert len(calls) == 1
    for _ in range(3):
        _runtime.validate_qkv(q, k, v, causal=True, check_values=False)
    assert len(calls) == 2  # its own signature (with v): checked once
    _runtime.validate_qk(q, k, causal=False, check_values=False)  # a new signature
    assert len(calls) == 3


def test_optimized_validation_is_traced_under_compile(monkeypatch):
    """Under torch.compile tracing nothing is remembered or skipped."""
    from prism.optimized import _runtime

    monkeypatch.setattr(_runtime, "_PASSED", {})
    calls = count_shape_checks(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    v = torch.randn(1, 2, 32, 8)
    for _ in range(3):
        _runtime.validate_qk(q, k, causal=True, check_values=False)
        _runtime.validate_qkv(q, k, v, causal=True, check_values=False)
    assert len(calls) == 6
    assert _runtime._PASSED == {}


def test_tile_mask_from_selection_equals_constructor():
    from prism.reference.tile_mask import TileMask

    bits = torch.rand(2, 3, 4, 5) < 0.5
    num = torch.randint(0, 5, (2, 3, 4), dtype=torch.int32)
    idx = torch.randint(-1, 5, (2, 3, 4, 5), dtype=torch.int32)
    made = TileMask(bits, block_size=64, causal=True, num_queries=200, num_keys=300,
                    kv_num_blocks=num, kv_indices=idx)
    fast_made = TileMask.from_selection(bits, 64, True, 200, 300, num, idx)
    assert type(fast_made) is TileMask
    assert vars(made).keys() == vars(fast_made).keys()
    for name in ("block_size", "causal", "num_queries", "num_keys", "_compact_version"):
        assert getattr(made, name) == getattr(fast_made, name)
    assert fast_made.carried_indices(block_size=64, causal=True, num_queries=200,
                                     num_keys=300) == (num, idx)
    assert fast_made.data_ptr() == bits.data_ptr()
    fast_made[0, 0, 0, 0] = not bool(fast_made[0, 0, 0, 0])  # an edit drops the indices
    assert fast_made.carried_indices(block_size=64, causal=True, num_queries=200,
                                     num_keys=300) is None


def test_prepared_launch_passes_what_the_launcher_expects(monkeypatch):
    """Prepared: tensors per call, scalars and keywords fixed; a new kernel object or a
    misaligned tensor goes back through Triton; tensors in the scalars never cache."""

    monkeypatch.setattr(fast, "_JITFunction", FakeKernel)
    monkeypatch.setattr(fast, "_get_device", lambda: 0)
    monkeypatch.setattr(fast, "_get_stream", lambda device: 55)
    # Plain tensors must claim to be on CUDA for the fast path: patch the check.
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    kernel = FakeKernel()
    prepared = fast.Prepared((64, 2.0, 0.5), {"FLIP": True, "BLOCK": 32, "num_warps": 4})
    x, y = torch.zeros(64), torch.zeros(64)
    prepared.launch(kernel, (2,), x, y)
    prepared.launch(kernel, (3, 4), y, x)
    assert kernel.runs == 1
    assert kernel.compiled.run.calls == [(3, 4, 1, 55, 1234, False, False, None, None,
                                          (4, 1, 0), None, None, None, y.data_ptr(),
                                          x.data_ptr(), 64, 2.0, 0.5, True, 32)]
    prepared.launch(kernel, (2,), x[1:], y)  # misaligned: a new entry
    prepared.launch(kernel, (2,), x[1:], y)
    assert kernel.runs == 2 and len(kernel.compiled.run.calls) == 2
    other = FakeKernel()  # another kernel object: its own entries
    prepared.launch(other, (2,), x, y)
    assert other.runs == 1
    frozen = fast.Prepared((x, 2.0, 0.5), {"FLIP": True, "BLOCK": 32})
    assert not frozen.cacheable
    frozen.launch(kernel, (2,), x, y)
    frozen.launch(kernel, (2,), x, y)
    assert kernel.runs == 4


def test_resolved_configs_are_remembered_by_value_and_type():
    from prism.optimized import api

    first = api._resolve(None, {"block_size": 64, "high_threshold": 0.8})
    assert first is api._resolve(None, {"block_size": 64, "high_threshold": 0.8})
    assert (first.block_size, first.high_threshold) == (64, 0.8)
    with pytest.raises(TypeError, match="block_size must be an int"):
        api._resolve(None, {"block_size": 64.0})  # equal to 64, but not an int
    with pytest.raises(TypeError, match="unknown PrismConfig field"):
        api._resolve(None, {"block_sise": 64})
    base = api.PrismConfig(low_threshold=0.7)
    derived = api._resolve(base, {"block_size": 32})
    assert (derived.low_threshold, derived.block_size) == (0.7, 32)
    assert api._resolve(None, {"block_size": 32}).low_threshold != 0.7


def test_selection_launches_are_kept_per_call_shape():
    """Equal configs made afresh per call share one prepared launch (found by value,
    without filling the identity cache); other values get their own."""
    from prism.optimized import selection
    from prism.reference import band_sizes, resolve_config, tile_layout

    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16)
    layout = tile_layout(64, 64, 16, True)
    high, low = band_sizes(16, None, None)
    selection._LAUNCHES.clear()
    selection._LAUNCHES_BY_VALUE.clear()
    masks = []
    for threshold in (0.9, 0.9, 0.9, 0.5):
        cfg = resolve_config(None, block_size=16, high_threshold=threshold)
        masks.append(selection.select_tiles(q, k, cfg, True, layout, high, low)[0])
    assert len(selection._LAUNCHES_BY_VALUE) == 2
    assert len(selection._LAUNCHES) == 2
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    (first, *_), (second, *_) = selection._LAUNCHES_BY_VALUE.values()
    assert first[1].scalars != second[1].scalars  # the thresholds differ
    expected = reference_select(q, k, 16, 0.5)
    assert torch.equal(masks[3], expected)


def reference_select(q, k, block_size, threshold):
    from prism import reference

    return reference.select_blocks(q, k, block_size=block_size, high_threshold=threshold)
