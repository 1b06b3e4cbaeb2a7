"""Launch compiled Triton kernels without Triton's per-call Python work.

``kernel[grid](*args, **kwargs)`` costs tens of microseconds of host time in
Triton 3.6 before the GPU sees anything: it binds the arguments, computes
every argument's specialisation, hashes a cache key built from strings,
builds launch metadata for profiler hooks, checks the kernel's globals, and
asks the driver to validate every pointer. At 4K-8K tokens that, not the GPU,
sets the time of a Prism call.

:func:`launch` takes the same arguments as ``kernel[grid](...)``. The first
call with a new *launch key* goes through Triton unchanged (compiling if
needed) and keeps the compiled kernel; later calls with the same key hand the
arguments straight to the compiled kernel's launcher. The launch key holds
everything Triton specialises a compiled kernel on, so two calls with one key
always run the same compiled kernel (a test checks this against Triton's own
specialisation):

* each tensor argument's dtype and whether its address is 16-byte aligned;
* each int argument's class: equal to 1, divisible by 16, or neither, and
  whether it fits int32, int64 or only uint64; bools and floats by type;
  ``None`` as itself;
* the keyword arguments (constexprs and launch options such as
  ``num_warps``) by value, the current CUDA device, and Triton's ``debug``
  and instrumentation settings.

Anything else falls back to ``kernel[grid](...)``: Triton's interpreter (the
CPU tests), objects that are not plain ``JITFunction`` s (autotuners,
benchmark stubs), grids that are callables, argument types the key does not
cover (tuples, strings), CPU tensors, kernels with pre-run hooks, and
profiler launch hooks (``triton.knobs.runtime.launch_enter_hook``). The
fast path launches on the current CUDA stream of the current device, as
Triton does, so it is captured by CUDA graphs like any launch; the custom
operators of :mod:`prism.optimized.ops` run it inside ``torch.compile``d
graphs too. Unlike Triton it does not re-check, on every call, that global
variables the kernel reads have kept the value they had when it was compiled
(Prism's kernels read none that change).

Kernels that need a global scratch buffer per launch (descriptors built
inside the kernel, as the warp-specialised attention loop does) get one
from the allocator the caller installed with ``triton.set_allocator``, or
else from torch's caching allocator on the current stream, as Triton's
launcher would under :func:`scratch_allocator`.

:class:`Prepared` is the same for call sites that launch one kernel shape
again and again: the scalar arguments and keywords are fixed once (pooling
and selection keep one per call shape), so a call keys only its tensors.

What a call plan records beside the launches (zeroing, side streams, their
fork and join) lives in :mod:`prism.optimized.plan_items`.
"""

from __future__ import annotations

import contextlib

import torch

try:  # Triton's classes; without them (no CUDA build) every launch falls back.
    from triton import knobs as _knobs
    from triton.knobs import HookChain as _HookChain
    from triton.runtime import _allocation
    from triton.runtime.jit import JITFunction as _JITFunction
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - Triton is a core dependency
    _JITFunction = _TensorDescriptor = _allocation = None
try:  # Triton's expansion of a host descriptor into the launcher's fields (CUDA builds)
    from triton.backends.nvidia.driver import make_tensordesc_arg as _make_tensordesc_arg
except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend
    _make_tensordesc_arg = None

from .plan_items import (  # noqa: F401  (recording: re-exported for launch's callers)
    _RECORDING,
    _get_device,
    _get_stream,
    _recording_list,
    recording,
)

_INT32 = 2 ** 31
_INT64 = 2 ** 63
#: Launch keys kept per kernel before the cache is emptied (shapes churn in serving).
MAX_ENTRIES = 1024

_CACHES: dict = {}  # id(kernel) -> (kernel, {launch key: entry})
STATS = {"fast": 0, "slow": 0}



def argument_key(args, require_cuda: bool = True) -> tuple | None:
    """The part of the launch key that comes from positional arguments, or None.

    None means an argument the key does not cover, or (with ``require_cuda``)
    a tensor not on a CUDA device: the caller falls back to Triton. Exposed
    for the tests, which compare it with Triton's own specialisation.
    """
    key = []
    append = key.append
    for a in args:
        t = type(a)
        if t is int:
            if a == 1:
                append(1)
            else:
                size = 0 if -_INT32 <= a < _INT32 else (1 if -_INT64 <= a < _INT64 else 2)
                append((a % 16 == 0) + 2 + 4 * size)
        elif t is float:
            append("f")
        elif t is bool:  # never 1 or True: 1 == True would merge the two kernels
            append("b")
        elif a is None:
            append(None)
        elif isinstance(a, torch.Tensor):
            if require_cuda and not a.is_cuda:
                return None
            append((a.dtype, a.data_ptr() % 16 == 0))
        elif t is _TensorDescriptor:
            if require_cuda and not a.base.is_cuda:
                return None
            append(descriptor_key(a))
        else:
            return None
    return tuple(key)


def descriptor_key(desc) -> tuple:
    """The launch key of a host tensor descriptor: what Triton specialises it on (the
    base's dtype and the block shape), and its padding mode."""
    return ("desc", desc.base.dtype, tuple(desc.block_shape), desc.padding)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def scratch_allocator():
    """Inside, Triton's launcher takes scratch buffers from torch's caching allocator,
    unless the caller installed an allocator of their own (left in place)."""
    slot = getattr(_allocation, "_allocator", None)
    if slot is None:  # another Triton layout: set it the public way, for good
        import triton

        triton.set_allocator(_torch_scratch)
        yield
        return
    if not isinstance(slot.get(), _allocation.NullAllocator):
        yield
        return
    token = slot.set(_torch_scratch)
    try:
        yield
    finally:
        slot.reset(token)


def _triton_launch(kernel, grid, args, kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; a Triton kernel runs under :func:`scratch_allocator`."""
    if type(kernel) is _JITFunction:
        with scratch_allocator():
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _run(kernel, grid, args, kwargs):
    """``kernel.run`` (Triton's launch, compiling if needed): the compiled kernel."""
    with scratch_allocator():
        return kernel.run(*args, grid=grid, warmup=False, **kwargs)


def _hooks_active() -> bool:
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and (type(hook) is not _HookChain or hook.calls):
            return True
    return False


def _pointer(a):
    """What the compiled launcher takes for an argument: raw addresses for tensors
    (descriptors stay objects; :meth:`_Entry.expand` turns them into fields)."""
    return a.data_ptr() if isinstance(a, torch.Tensor) else a


def _unwrap_descriptor_launcher(wrapper, positions: tuple):
    """The C launcher inside Triton's descriptor wrapper (``wrap_handle_tensordesc``)
    and ``((position, metadata), ...)`` of its descriptor arguments, or None.

    None when the wrapper is not laid out as in Triton 3.6 or its descriptor
    positions differ from ``positions``: the entry then calls the wrapper itself.
    """
    code, closure = getattr(wrapper, "__code__", None), getattr(wrapper, "__closure__", None)
    if _make_tensordesc_arg is None or code is None or not closure:
        return None
    try:
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in closure), strict=True))
    except ValueError:  # an empty cell
        return None
    launcher = cells.get("launcher")
    indices, metas = cells.get("tensordesc_indices"), cells.get("tensordesc_meta")
    if (not callable(launcher) or indices is None or metas is None
            or tuple(sorted(indices)) != positions or len(metas) != len(positions)):
        return None
    return launcher, tuple(zip(positions, metas, strict=True))


class _NotCached(Exception):
    """A launch whose arguments the cache cannot replay."""


def _runtime_params(kernel) -> int:
    """How many leading parameters are not constexprs (positional args past them are refused)."""
    count = 0
    for param in kernel.params:
        if param.is_constexpr:
            break
        count += 1
    return count


class _Entry:
    """One compiled kernel and what its launcher needs besides the arguments.

    ``call(gx, gy, gz, stream, function, *prefix, *values, *tail)`` launches.
    ``descriptors`` lists ``(position, metadata)`` of host tensor descriptors
    among the arguments, which :meth:`expand` turns into the launcher's fields;
    ``scratch`` is the global scratch bytes per program (0: none), which
    :meth:`scratch_prefix` allocates (-1: Triton's launcher object allocates it,
    under :func:`scratch_allocator`).
    """

    __slots__ = ("call", "function", "tail", "prefix", "descriptors", "scratch", "align")

    def __init__(self, kernel, compiled, kwargs: dict, args: tuple):
        params = kernel.params
        tail = []
        for param in params[len(args):]:
            if param.name in kwargs:
                if not param.is_constexpr:
                    # A run-time value by keyword would be frozen into the entry.
                    raise _NotCached
                tail.append(kwargs[param.name])
            elif param.has_default:
                tail.append(param.default)
            else:
                raise TypeError(f"{kernel.__name__}: missing argument {param.name!r}")
        self.tail = tuple(tail)
        runner = compiled.run  # creates the launcher and loads the binary
        self.function = compiled.function
        self.descriptors = ()
        self.scratch = 0
        self.align = 1
        positions = tuple(i for i, a in enumerate(args) if type(a) is _TensorDescriptor)
        global_scratch = getattr(runner, "global_scratch_size", None)
        direct = getattr(runner, "launch", None)
        if (direct is not None and global_scratch is not None
                and getattr(runner, "profile_scratch_size", 1) == 0
                and hasattr(runner, "launch_cooperative_grid") and hasattr(runner, "launch_pdl")):
            if positions:
                unwrapped = _unwrap_descriptor_launcher(direct, positions)
                if unwrapped is not None:
                    direct, self.descriptors = unwrapped
                # else: Triton's own wrapper expands the descriptor objects.
            # The C entry point itself (what CudaLauncher.__call__ ends in).
            self.call = direct
            self.prefix = (runner.launch_cooperative_grid, runner.launch_pdl, None, None,
                           compiled.packed_metadata, None, None, None)
            if global_scratch:
                self.scratch = global_scratch * getattr(runner, "num_ctas", 1)
                self.align = getattr(runner, "global_scratch_align", 1)
        else:  # profiler scratch, or another backend: its launcher object
            self.call = runner
            self.prefix = (compiled.packed_metadata, None, None, None)
            if global_scratch:  # it allocates scratch itself, from Triton's allocator
                self.scratch = -1

    def expand(self, values: list) -> list:
        """``values`` with each host descriptor replaced by the launcher's fields."""
        for position, meta in reversed(self.descriptors):
            fields = _make_tensordesc_arg(values[position], meta)
            if isinstance(fields[0], torch.Tensor):  # the base of an unlowered descriptor
                fields[0] = fields[0].data_ptr()
            values[position:position + 1] = fields
        return values

    def scratch_prefix(self, programs: int, stream, device: int):
        """The prefix with a fresh global scratch buffer of ``programs`` programs, and
        the buffer (kept alive by the caller until the launch returns)."""
        size = programs * self.scratch
        allocator = _allocation._allocator.get()
        if isinstance(allocator, _allocation.NullAllocator):
            buffer = torch.empty(size, dtype=torch.int8, device=device)
        else:
            buffer = allocator(size, self.align, stream)
        prefix = self.prefix
        return (prefix[0], prefix[1], buffer.data_ptr(), *prefix[3:]), buffer


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the cached compiled kernel when possible.

    Parameters
    ----------
    kernel : triton.JITFunction (or anything indexable by a grid)
    grid : tuple of 1 to 3 ints (a callable grid always goes through Triton)
    *args
        The kernel's leading parameters, positionally (tensors, ints, floats,
        bools, None).
    **kwargs
        The remaining parameters (typically the constexprs) and launch options
        (``num_warps``, ``num_stages``, ...), as for ``kernel[grid]``.
    """
    if _RECORDING and (launches := _recording_list()) is not None:
        launches.append(_recorded(_launch_args(kernel, grid, args, kwargs), grid, args))
        return
    _launch_args(kernel, grid, args, kwargs)


def _recorded(entry, grid: tuple, args: tuple):
    """What :func:`recording` keeps of a :func:`launch` of ``entry``: a prepared launch's
    item with every argument, scalars too, in the tensors' place; None without an entry."""
    if not entry:
        return None
    return entry, grid, args, (), _get_stream(_get_device())


def _launch_args(kernel, grid, args: tuple, kwargs: dict):
    """:func:`launch`'s work: the :class:`_Entry` it replayed or cached, else None."""
    if type(kernel) is not _JITFunction or type(grid) is not tuple or _get_device is None:
        _triton_launch(kernel, grid, args, kwargs)
        return None
    key = argument_key(args)
    if key is None or kernel.pre_run_hooks or _hooks_active():
        STATS["slow"] += 1
        _triton_launch(kernel, grid, args, kwargs)
        return None
    device = _get_device()
    runtime = _knobs.runtime
    # Keyword values with their types: a constexpr 1 and 1.0 (or True) compile differently.
    key = (key, tuple(kwargs.items()), tuple(map(type, kwargs.values())), device,
           runtime.debug, _knobs.compilation.instrumentation_mode)
    cached = _CACHES.get(id(kernel))
    if cached is None or cached[0] is not kernel:
        cached = _CACHES[id(kernel)] = (kernel, {}, _runtime_params(kernel))
    entries = cached[1]
    if len(args) > cached[2]:  # a constexpr passed positionally: its value is not keyed
        STATS["slow"] += 1
        _triton_launch(kernel, grid, args, kwargs)
        return None
    try:
        entry = entries.get(key)
    except TypeError:  # an unhashable keyword value
        entry = False
    if not entry:
        STATS["slow"] += 1
        compiled = _run(kernel, grid, args, kwargs)
        if entry is None and compiled is not None and not hasattr(compiled, "result"):
            if len(entries) >= MAX_ENTRIES:
                entries.clear()
            try:
                entry = entries[key] = _Entry(kernel, compiled, kwargs, args)
            except _NotCached:
                entries[key] = False
        return entry or None
    STATS["fast"] += 1
    # Raw addresses: the launcher then skips its per-pointer driver query.
    _replay(entry, grid, device,
            [a.data_ptr() if type(a) is torch.Tensor else _pointer(a) for a in args])
    return entry


def _replay(entry: _Entry, grid: tuple, device: int, values: list) -> None:
    """Launch a cached entry on the current stream of ``device``."""
    n = len(grid)
    gx, gy, gz = grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1
    stream = _get_stream(device)
    if entry.descriptors:
        values = entry.expand(values)
    if not entry.scratch:
        entry.call(gx, gy, gz, stream, entry.function, *entry.prefix, *values, *entry.tail)
        return
    if entry.scratch < 0:
        with scratch_allocator():
            entry.call(gx, gy, gz, stream, entry.function, *entry.prefix, *values, *entry.tail)
        return
    prefix, buffer = entry.scratch_prefix(gx * gy * gz, stream, device)
    entry.call(gx, gy, gz, stream, entry.function, *prefix, *values, *entry.tail)
    del buffer  # freed after the launch is queued: stream-ordered reuse only


class Prepared:
    """A launch whose trailing arguments are fixed: per call only the grid and tensors change.

    For call sites that launch one kernel shape many times (a model's layers):
    the scalar arguments and keyword arguments are given once, and their part
    of the launch key is computed once. ``prepared.launch(kernel, grid,
    *tensors)`` is ``kernel[grid](*tensors, *scalars, **kwargs)``, through the
    cached compiled kernel when :func:`launch` would use it (the same rules and
    fallbacks); ``kernel`` is passed on every call, so a replaced kernel (a
    benchmark stub) is honoured.
    """

    __slots__ = ("scalars", "kwargs", "cacheable", "entries", "kernel")

    def __init__(self, scalars: tuple, kwargs: dict):
        self.scalars = tuple(scalars)
        self.kwargs = dict(kwargs)
        # Scalars the launch key covers (never tensors: they would be frozen in).
        self.cacheable = argument_key(self.scalars) is not None and not any(
            isinstance(a, torch.Tensor) for a in self.scalars)
        self.entries: dict = {}
        self.kernel = None

    def launch(self, kernel, grid, *tensors) -> None:
        """``kernel[grid](*tensors, *scalars, **kwargs)``. ``tensors`` are CUDA
        tensors, host tensor descriptors of CUDA tensors, or None."""
        if _RECORDING:
            self._launch_recorded(kernel, grid, tensors)
            return
        self._launch(kernel, grid, tensors)

    def _launch(self, kernel, grid, tensors) -> None:
        if (not self.cacheable or type(kernel) is not _JITFunction or _get_device is None
                or type(grid) is not tuple or kernel.pre_run_hooks or _hooks_active()):
            _triton_launch(kernel, grid, (*tensors, *self.scalars), self.kwargs)
            return
        key = [_get_device(), _knobs.runtime.debug, _knobs.compilation.instrumentation_mode]
        append = key.append
        values = []  # what the launcher takes: each address read once, for key and call
        for t in tensors:
            kind = type(t)
            if kind is torch.Tensor:
                if not t.is_cuda:
                    key = None
                    break
                pointer = t.data_ptr()
                values.append(pointer)
                append(t.dtype)
                append(not pointer & 15)
            elif t is None:
                values.append(None)
                append(None)
            elif kind is _TensorDescriptor and t.base.is_cuda:
                values.append(t)
                append(descriptor_key(t))
            else:
                key = None
                break
        if key is None:
            STATS["slow"] += 1
            _triton_launch(kernel, grid, (*tensors, *self.scalars), self.kwargs)
            return
        if kernel is not self.kernel:
            self.entries.clear()
            self.kernel = kernel
            self._check_arity(kernel, len(tensors))
        key = tuple(key)
        entry = self.entries.get(key)
        if not entry:
            STATS["slow"] += 1
            args = (*tensors, *self.scalars)
            compiled = _run(kernel, grid, args, self.kwargs)
            if entry is None and self.kernel is not None and compiled is not None and not hasattr(
                    compiled, "result"):
                try:
                    self.entries[key] = _Entry(kernel, compiled, self.kwargs, args)
                except _NotCached:
                    self.entries[key] = False
            return
        STATS["fast"] += 1
        values += self.scalars
        _replay(entry, grid, key[0], values)

    def _launch_recorded(self, kernel, grid, tensors) -> None:
        """:meth:`launch`, and what :func:`recording` keeps of it."""
        launches = _recording_list()
        if launches is None:  # another thread is recording
            self._launch(kernel, grid, tensors)
            return
        self._launch(kernel, grid, tensors)
        entry = self.entry(kernel, grid, *tensors)
        launches.append(None if entry is None else (
            entry, grid, tensors, self.scalars, _get_stream(_get_device())))

    def entry(self, kernel, grid, *tensors):
        """The cached :class:`_Entry` that :meth:`launch` would replay for these tensors
        (compiled, without launching, if not yet cached), or None where :meth:`launch`
        would go through Triton. For callers that replay a whole call's launches
        themselves (:mod:`prism.optimized.ops`' call plans)."""
        if (not self.cacheable or type(kernel) is not _JITFunction or _get_device is None
                or type(grid) is not tuple or kernel.pre_run_hooks):
            return None
        key = [_get_device(), _knobs.runtime.debug, _knobs.compilation.instrumentation_mode]
        for t in tensors:
            if type(t) is torch.Tensor and t.is_cuda:
                key += (t.dtype, not t.data_ptr() & 15)
            elif t is None:
                key.append(None)
            elif type(t) is _TensorDescriptor and t.base.is_cuda:
                key.append(descriptor_key(t))
            else:
                return None
        if kernel is not self.kernel:
            self.entries.clear()
            self.kernel = kernel
            self._check_arity(kernel, len(tensors))
        if self.kernel is None:
            return None
        key = tuple(key)
        entry = self.entries.get(key)
        if entry is None:
            args = (*tensors, *self.scalars)
            with scratch_allocator():
                compiled = kernel.run(*args, grid=grid, warmup=True, **self.kwargs)
            if compiled is None or hasattr(compiled, "result"):
                return None
            try:
                entry = _Entry(kernel, compiled, self.kwargs, args)
            except _NotCached:
                entry = False
            self.entries[key] = entry
        return entry or None

    def _check_arity(self, kernel, num_tensors: int) -> None:
        """Constexprs passed positionally are not keyed by value: never cache those."""
        if num_tensors + len(self.scalars) > _runtime_params(kernel):
            self.kernel = None


def clear() -> None:
    """Forget the compiled kernels :func:`launch` keeps (each :class:`Prepared` keeps its own)."""
    _CACHES.clear()
