"""What a call plan records beside kernel launches, and the driver calls its replays use.

:func:`recording` collects, in one list per recording (per thread), every
launch of :func:`prism.optimized.launch.launch` and
:meth:`prism.optimized.launch.Prepared.launch`, and the items below:

* :func:`zero_` - a tensor zeroed (a replay zeroes it with :func:`zero_bytes`);
* :func:`fork` and :func:`join` - launches queued on a side stream
  (:func:`side_stream`) between them run beside the caller's stream;

and :func:`descriptor_on` rebuilds a host tensor descriptor for a replay.
:mod:`prism.optimized.call_plan` turns a recorded list into a plan.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

import torch

try:  # Triton's host descriptor class (a core dependency)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover
    _TensorDescriptor = None

#: The current CUDA device and its current raw stream (None without CUDA support);
#: :mod:`prism.optimized.launch` uses the same two.
_get_device = getattr(torch._C, "_cuda_getDevice", None)
_get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


#: While :func:`recording`: one list per recording, of what each launch replays.
_RECORDING: list = []


@contextlib.contextmanager
def recording():
    """Inside, every :meth:`Prepared.launch` and :func:`launch` is also appended to the
    yielded list as ``(entry, grid, tensors, scalars, stream)`` (what a replay needs;
    for :func:`launch`, ``tensors`` holds every argument, scalars included, and
    ``scalars`` is empty), every launch that could not be replayed so (Triton's path)
    as None, every zeroing by :func:`zero_` as a ``("zero", tensor, stream)`` item, and
    every :func:`fork` and :func:`join` as a ``("fork"|"join", side stream, stream)`` item."""
    launches: list = []
    item = (threading.get_ident(), launches)
    _RECORDING.append(item)
    try:
        yield launches
    finally:
        for i, other in enumerate(_RECORDING):
            if other is item:
                del _RECORDING[i]
                break


def _recording_list():
    """The list this thread's innermost :func:`recording` fills, or None."""
    me = threading.get_ident()
    for thread, launches in reversed(_RECORDING):
        if thread == me:
            return launches
    return None


def zero_(t: torch.Tensor) -> None:
    """``t.zero_()``, also kept by :func:`recording` (a replay zeroes with the driver)."""
    t.zero_()
    if _RECORDING and (launches := _recording_list()) is not None:
        launches.append(("zero", t, _get_stream(_get_device())))


_SIDE_STREAMS: dict = {}
#: CUDA priority of each side-stream slot's stream (lower is more urgent; absent: 0,
#: the priority of torch's default streams). Read when a slot's stream is made, so a
#: change takes effect after ``_SIDE_STREAMS.clear()`` and, for calls already
#: planned, ``call_plan._PLANS.clear()`` (benchmarks/probes/stream_priority.py).
SIDE_PRIORITIES: dict = {}


def side_stream(device: torch.device, slot: int = 0) -> torch.cuda.Stream:
    """An extra stream of ``device`` for launches that run beside the caller's (one per
    ``slot``: 0 the selection's narrow launches, 1 the estimators' vertical-slash
    stage, 2 ``block_sparse_attention``'s NaN/Inf check, 3 the cascade's sampled
    stage); use it between :func:`fork` and :func:`join`."""
    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    key = (index, slot)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=index,
                                               priority=SIDE_PRIORITIES.get(slot, 0))
    return _SIDE_STREAMS[key]


def fork(side: torch.cuda.Stream) -> torch.cuda.Stream:
    """Make ``side`` wait for the current stream's work so far; returns the current
    stream (give it to :func:`join`). Kept by :func:`recording` as a ``("fork",
    side, current stream's handle)`` item, so a call plan replays the launches
    queued on ``side`` there."""
    main = torch.cuda.current_stream(side.device)
    side.wait_stream(main)
    if _RECORDING and (launches := _recording_list()) is not None:
        launches.append(("fork", side, main.cuda_stream))
    return main


def join(main: torch.cuda.Stream, side: torch.cuda.Stream) -> None:
    """Make ``main`` wait for everything queued on ``side`` (kept by :func:`recording`
    as a ``("join", side, main's handle)`` item)."""
    main.wait_stream(side)
    if _RECORDING and (launches := _recording_list()) is not None:
        launches.append(("join", side, main.cuda_stream))


def descriptor_on(base: torch.Tensor, block_shape, padding):
    """A host tensor descriptor over ``base`` without ``TensorDescriptor.from_tensor``'s
    checks (for a replay of a launch whose descriptor passed them on such a tensor)."""
    new = object.__new__(_TensorDescriptor)
    new.base, new.shape, new.strides = base, base.shape, base.stride()
    new.block_shape, new.padding = block_shape, padding
    return new


_MEMSET: list = []  # [cuMemsetD8Async or None], loaded on first use


def _driver_memset():
    if not _MEMSET:
        try:
            function = ctypes.CDLL("libcuda.so.1").cuMemsetD8Async
            function.argtypes = (ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t, ctypes.c_void_p)
            function.restype = ctypes.c_int
        except (OSError, AttributeError):  # no CUDA driver library: callers use torch
            function = None
        _MEMSET.append(function)
    return _MEMSET[0]


def zero_bytes(pointer: int, nbytes: int, stream: int) -> bool:
    """Zero ``nbytes`` bytes of device memory at ``pointer`` on ``stream`` (a raw CUDA
    stream handle), through the driver's ``cuMemsetD8Async``: no tensor view and
    no TensorIterator, so about a microsecond of host time instead of torch's
    ``zero_``. Captured by CUDA graphs like any memset. False when the driver library
    is unavailable (the caller zeroes with torch then)."""
    function = _driver_memset()
    if function is None:
        return False
    status = function(pointer, 0, nbytes, stream)
    if status:
        raise RuntimeError(f"cuMemsetD8Async failed with CUDA error {status}")
    return True


__all__ = ["descriptor_on", "fork", "join", "recording", "side_stream", "zero_",
           "zero_bytes"]
