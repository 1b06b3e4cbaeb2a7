"""Eager call plans: a repeated eager call replays the launches of an earlier one.

An eager ``select_blocks`` or ``prism_attention`` call made before with the
same signature (shapes, strides, dtypes and devices of the inputs, their
16-byte alignment, the config object, ``causal``, ``scale``, ``return_lse``,
``return_mask``) needs none of the general path's per-call work: validation
passed for that signature, and each launch's compiled kernel, grid and scalar
arguments are known. The second call of a signature runs the general path
while :func:`prism.optimized.launch.recording` keeps every launch and every
zeroing, and a dispatch mode watches every torch operation; from them a
:class:`CallPlan` is made. Later calls cost their allocations, a driver memset
and the launchers' C calls:

* every buffer of the call that the caller does not get back (pooling's
  buffer; ``prism_attention``'s mask and indices unless ``return_mask``; the
  warp-specialised attention kernel's global scratch) lies in one
  allocation, at fixed offsets; each tensor the caller gets is its own
  ``torch.empty``;
* the launches take raw addresses: the inputs', the outputs', and the one
  buffer's base plus an offset.

A plan is made only if the recorded call did nothing else on the device: only
launches through :class:`~prism.optimized.launch.Prepared` with a cached
compiled kernel, on one stream, zeroing through
:func:`~prism.optimized.launch.zero_`, tensors allocated afresh or views (any
other torch operation, a launch through Triton's path, a tensor argument
that is neither an input, nor an output, nor allocated by the call, refuses
the plan). It is used only while the kernels, the selection tuning and the
launch settings (Triton's debug and instrumentation knobs, no launch hooks,
the current device) are those it was recorded with. Otherwise, and under
``torch.compile`` or CUDA graph capture (recording only), the general path
runs. Replays run under graph capture like any launch (the memset and the
launches are captured).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import attention, pooling, selection
from . import launch as _launch
from .ops import tracing as _tracing  # ops imports this module at its end (it is defined)

#: False: every call takes the general path (benchmarks compare the two).
ENABLED = True
_PLANS: dict = {}  # signature -> CallPlan, None (seen once) or False (refused)
#: Plan hits, plans made and signatures refused (tests and benchmarks read them).
PLAN_STATS = {"hit": 0, "made": 0, "refused": 0}
_ALIGN = 512  # what torch's caching allocator gives every allocation
_INPUTS = 3  # table slots: q, k, v, then the buffer, then the outputs


def _state() -> tuple:
    """What replayed launches depend on besides the call (benchmarks swap kernels)."""
    return (pooling._pool_tiles_kernel, selection._select_tiles_kernel,
            attention._sparse_attention_kernel,
            selection._DEFAULT_TUNING, _launch._get_device, _launch._knobs.runtime.debug,
            _launch._knobs.compilation.instrumentation_mode)


def _key(q, k, v, cfg, causal, scale, return_lse, return_mask):
    """The signature of an eager call, or None (not a call on plain CUDA tensors)."""
    if (type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(causal) is not bool
            or not q.is_cuda):
        return None
    try:
        # Which inputs are one tensor is part of the signature: a replay hands each
        # launch argument the address of the input it was in the recorded call.
        key = (q.shape, k.shape, q.stride(), k.stride(), q.dtype, k.dtype, q.get_device(),
               k.get_device(), q.data_ptr() & 15, k.data_ptr() & 15, id(cfg), causal, q is k)
        if v is None:
            return key
        if type(v) is not torch.Tensor:
            return None
        return (*key, v.shape, v.stride(), v.dtype, v.get_device(), v.data_ptr() & 15, scale,
                type(scale), return_lse, return_mask, k is v, q is v)
    except RuntimeError:  # tensors without strides or storage: the general path
        return None


class _Step:
    """One replayed launch (``call`` set) or zeroing (``call`` None, ``nbytes`` set)."""

    __slots__ = ("call", "grid", "function", "prefix", "tail", "scalars", "args", "descriptors",
                 "entry", "scratch", "nbytes")


class CallPlan:
    """The recorded launches of one call signature, and where their buffers lie."""

    __slots__ = ("cfg", "state", "device", "torch_device", "words", "outputs", "steps", "flag")

    def run(self, q, k, v):
        """Replay: ``(outputs, buffer, flag)``; the NaN/Inf flag is ``buffer[flag]``."""
        device = self.torch_device
        buffer = torch.empty(self.words, dtype=torch.float64, device=device)
        outputs = [None if spec is None else torch.empty(spec[0], dtype=spec[1], device=device)
                   for spec in self.outputs]
        table = [q.data_ptr(), k.data_ptr(), 0 if v is None else v.data_ptr(),
                 buffer.data_ptr()]
        table += [0 if t is None else t.data_ptr() for t in outputs]
        stream = _launch._get_stream(self.device)
        for step in self.steps:
            if step.call is None:
                slot, delta = step.args
                _launch.zero_bytes(table[slot] + delta, step.nbytes, stream)
                continue
            values = [None if a is None else table[a[0]] + a[1] for a in step.args]
            values += step.scalars
            if step.descriptors:
                inputs = (q, k, v)
                for position, slot, (block_shape, padding) in step.descriptors:
                    values[position] = _launch.descriptor_on(inputs[slot], block_shape, padding)
                values = step.entry.expand(values)
            prefix = step.prefix
            if step.scratch is not None:
                prefix = (prefix[0], prefix[1], table[_INPUTS] + step.scratch, *prefix[3:])
            step.call(*step.grid, stream, step.function, *prefix, *values, *step.tail)
        return outputs, buffer, self.flag


def planned_call(q, k, v, cfg, causal, scale=None, return_lse=False, return_mask=False):
    """Replay the plan of this call's signature (:meth:`CallPlan.run`), or None (no plan:
    the caller takes the general path). ``v`` None is ``select_blocks``."""
    key = _key(q, k, v, cfg, causal, scale, return_lse, return_mask)
    if key is None or not ENABLED:
        return None
    plan = _PLANS.get(key)
    if (not plan or plan.cfg is not cfg or plan.state != _state()
            or _launch._get_device() != plan.device or _launch._hooks_active()):
        return None
    PLAN_STATS["hit"] += 1
    return plan.run(q, k, v)


class _Watch(TorchDispatchMode):
    """Every torch operation of a recorded call, and the storages it allocated."""

    def __init__(self):
        super().__init__()
        self.refused: list = []
        self.fresh: set = set()
        self.zeros = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default):
            self.fresh.add(result.untyped_storage().data_ptr())
        elif func is torch.ops.aten.zero_.default:
            self.zeros += 1
        elif not func.is_view:
            self.refused.append(str(func))
        return result


def record_call(general, q, k, v, cfg, causal, scale=None, return_lse=False,
                return_mask=False):
    """``general()`` (the general path: ``(outputs, nonfinite flag)``); on the second call
    of a signature, recorded and made into its plan."""
    if _tracing():
        return general()
    key = _key(q, k, v, cfg, causal, scale, return_lse, return_mask)
    if key is None or _PLANS.get(key, 0) is not None:
        if key is not None and key not in _PLANS:
            if len(_PLANS) >= 1024:
                _PLANS.clear()
            _PLANS[key] = None  # seen: the next call records (this one may compile)
        return general()
    with _launch.recording() as launches, _Watch() as watch:
        result = general()
    plan = _make_plan(launches, watch, result, (q, k, v), cfg)
    PLAN_STATS["made" if plan else "refused"] += 1
    _PLANS[key] = plan or False
    return result


def _make_plan(launches, watch, result, inputs, cfg):
    """The :class:`CallPlan` of a recorded call, or None where it cannot be replayed."""
    outputs, flag = result
    if (watch.refused or not launches or any(item is None for item in launches)
            or _launch._driver_memset() is None or flag is None or flag.dtype != torch.float64):
        return None
    launched = [item for item in launches if item[0] != "zero"]
    if watch.zeros != len(launches) - len(launched) or len({item[4] for item in launched}) != 1:
        return None  # zeroed other than by launch.zero_, or launches on several streams
    slots: dict = {}  # storage address -> (table slot, offset of the storage there)
    specs = []
    for i, t in enumerate(outputs):
        if t is None:
            specs.append(None)
            continue
        storage = t.untyped_storage()
        if (storage.data_ptr() not in watch.fresh or storage.data_ptr() in slots
                or not t.is_contiguous() or t.storage_offset()
                or storage.nbytes() != t.numel() * t.element_size()):
            return None
        slots[storage.data_ptr()] = (_INPUTS + 1 + i, 0)
        specs.append((t.shape, t.dtype))
    size = 0

    def ref(t):
        """``(table slot, delta)`` of a tensor argument, or None (not replayable)."""
        nonlocal size
        for slot, x in enumerate(inputs):
            if t is x:
                return slot, 0
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address not in slots:
            if address not in watch.fresh or not address:
                return None  # neither an input, nor an output, nor allocated by the call
            slots[address] = (_INPUTS, size)
            size += -(-storage.nbytes() // _ALIGN) * _ALIGN
        slot, offset = slots[address]
        return slot, offset + t.data_ptr() - address

    steps = []
    for item in launches:
        step = _Step()
        if item[0] == "zero":
            t = item[1]
            step.call, step.args = None, ref(t)
            step.nbytes = t.numel() * t.element_size()
            if step.args is None or not t.is_contiguous():
                return None
            steps.append(step)
            continue
        entry, grid, tensors, scalars, _ = item
        if entry.scratch < 0:
            return None
        step.entry, step.call, step.function = entry, entry.call, entry.function
        step.prefix, step.tail, step.scalars = entry.prefix, entry.tail, scalars
        step.grid = (*grid, 1, 1)[:3]
        step.args, step.descriptors, step.scratch = [], [], None
        for position, t in enumerate(tensors):
            if t is None:
                step.args.append(None)
            elif type(t) is torch.Tensor:
                where = ref(t)
                if where is None:
                    return None
                step.args.append(where)
            else:  # a host descriptor: over an input only
                slot = next((s for s, x in enumerate(inputs) if x is not None and t.base is x),
                            None)
                if slot is None:
                    return None
                step.args.append(None)
                step.descriptors.append((position, slot, (t.block_shape, t.padding)))
        if entry.scratch:
            size = -(-size // max(_ALIGN, entry.align)) * max(_ALIGN, entry.align)
            step.scratch = size
            size += entry.scratch * step.grid[0] * step.grid[1] * step.grid[2]
        steps.append(step)
    flag_at = ref(flag)
    if flag_at is None or flag_at[0] != _INPUTS or flag_at[1] % 8:
        return None
    plan = CallPlan()
    plan.cfg, plan.state, plan.steps, plan.outputs = cfg, _state(), steps, specs
    plan.device, plan.torch_device = inputs[0].get_device(), inputs[0].device
    plan.words, plan.flag = max(1, -(-size // 8)), flag_at[1] // 8
    if plan.device != _launch._get_device():
        return None
    return plan
