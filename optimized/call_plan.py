"""Call plans: a repeated call replays the launches of an earlier one.

A ``select_blocks``, ``prism_attention`` or ``block_sparse_attention`` call
made before with the same signature needs none of the general path's
per-call work: validation passed for that signature, and each launch's
compiled kernel, grid and scalar arguments are known. The signature
(:func:`call_key`, :func:`block_sparse_key`) holds the shapes, strides,
dtypes and devices of the tensor arguments, their 16-byte alignment, which
of them are one tensor, the config object, ``causal``, ``scale``,
``return_lse``, ``return_mask``; for ``block_sparse_attention`` the
mask's (or, for a :class:`~prism.reference.tile_mask.TileMask` whose indices
still apply, the carried indices') shape, strides and dtype, ``block_size``
and whether q, k and v are checked for NaN/Inf. Values are never part of
it: a replay reads this call's q, k, v and mask (the mask's indices are
rebuilt by the replayed launch), so it is right for any values; the
validation it skips only reads what the signature holds (the NaN/Inf check
is a kernel, and is replayed).

The second call of a signature runs the general path while
:func:`prism.optimized.plan_items.recording` keeps every launch and every
zeroing, and a dispatch mode watches every torch operation; from them a
:class:`CallPlan` is made. Later calls cost their allocations, a driver
memset and the launchers' C calls:

* every buffer of the call that the caller does not get back (pooling's
  buffer; ``prism_attention``'s mask and indices unless ``return_mask``;
  ``block_sparse_attention``'s NaN flag and the mask's indices; the
  warp-specialised attention kernel's global scratch) lies in one
  allocation, at fixed offsets; each tensor the caller gets is its own
  ``torch.empty``;
* the launches take raw addresses: the inputs' (or, for a view of an input
  at its address such as the mask read as bytes, that input's), the
  outputs', and the one buffer's base plus an offset.

The same plans serve compiled code: the custom operators' bodies
(:mod:`prism.optimized.ops`) look up and record plans at run time, when
``torch.compiler.is_compiling()`` is False, so a compiled graph's third run
replays (the first marks the signature, the second records).

A plan is made only if the recorded call did nothing else on the device: only
launches through :class:`~prism.optimized.launch.Prepared` or
:func:`~prism.optimized.launch.launch` with a cached compiled kernel (so the
estimators' selections, whose kernels launch through the latter, have plans
too), on the call's stream or on side streams that
:func:`~prism.optimized.plan_items.fork` forked from it and
:func:`~prism.optimized.plan_items.join` joined back (a replay forks and joins
them again, so stages that ran side by side still do), zeroing through
:func:`~prism.optimized.plan_items.zero_`, tensors allocated afresh or views (any
other torch operation, a launch through Triton's path, a tensor argument
that is neither an input, nor an output, nor allocated by the call, refuses
the plan). It is used only while the kernels, the selection tuning and the
launch settings (Triton's debug and instrumentation knobs, no launch hooks,
the current device) are those it was recorded with. The estimators' launch
tables (``antidiagonal_packed.TUNED``, ``vertical_slash.TUNED_VS``, the
long-row top-p and scan sizes) are read when a call is recorded and not
checked after: change them before a signature's first calls, or empty
``_PLANS``. When a repeated call stays slow, :data:`PLAN_STATS` counts the
plans made and refused, and :data:`LAST_REFUSAL` says why the last refused
signature got none. Nothing is recorded
under ``torch.compile`` tracing or CUDA graph capture, or with
:data:`ENABLED` False; there the general path runs. Replays run under graph
capture like any launch (the memset and the launches are captured).
"""

from __future__ import annotations

import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import attention, indices, pooling, selection
from . import launch as _launch
from . import plan_items as _items
from .ops import tracing as _tracing  # ops imports this module at its end (it is defined)

#: False: every call takes the general path (benchmarks compare the two).
ENABLED = True
_PLANS: dict = {}  # signature -> CallPlan, None (seen once) or False (refused)
#: Plan hits (all, and per kind of call), plans made and signatures refused (tests and
#: benchmarks read them). The kinds: ``select`` (``select_blocks``, ``prism::select``),
#: ``attention`` (``prism_attention``, ``prism::prism_attention``) and ``block_sparse``
#: (``block_sparse_attention``, ``prism::block_sparse_attention``).
PLAN_STATS = {"hit": 0, "made": 0, "refused": 0, "select": 0, "attention": 0,
              "block_sparse": 0}
_ALIGN = 512  # what torch's caching allocator gives every allocation


def _state() -> tuple:
    """What replayed launches depend on besides the call (benchmarks swap kernels)."""
    return (pooling._pool_tiles_kernel, selection._select_tiles_kernel,
            attention._sparse_attention_kernel, pooling._nonfinite_kernel,
            indices._mask_to_indices_kernel,
            selection._DEFAULT_TUNING, _launch._get_device, _launch._knobs.runtime.debug,
            _launch._knobs.compilation.instrumentation_mode)


def call_key(kind, q, k, v, cfg, causal, scale=None, return_lse=False, return_mask=False):
    """The signature of a selection (``v`` None, or only checked) or ``prism_attention``
    call of ``kind`` (``"select"``, ``"attention"``), or None (not a call on plain
    CUDA tensors)."""
    if (type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(causal) is not bool
            or not q.is_cuda):
        return None
    try:
        # Which inputs are one tensor is part of the signature: a replay hands each
        # launch argument the address of the input it was in the recorded call.
        key = (kind, q.shape, k.shape, q.stride(), k.stride(), q.dtype, k.dtype, q.get_device(),
               k.get_device(), q.data_ptr() & 15, k.data_ptr() & 15, id(cfg), causal, q is k)
        if v is None:
            return key
        if type(v) is not torch.Tensor:
            return None
        return (*key, v.shape, v.stride(), v.dtype, v.get_device(), v.data_ptr() & 15, scale,
                type(scale), return_lse, return_mask, k is v, q is v)
    except RuntimeError:  # tensors without strides or storage: the general path
        return None


def _meta(t):
    return t.shape, t.stride(), t.dtype, t.get_device(), t.data_ptr() & 15


def block_sparse_key(q, k, v, mask, num, idx, block_size, causal, scale, return_lse,
                     check_values):
    """The signature of a ``block_sparse_attention`` call on ``mask`` (its values are
    data: never part of it) or on the compact indices ``num``, ``idx`` that a
    TileMask carried, or None (the general path)."""
    if (type(q) is not torch.Tensor or type(k) is not torch.Tensor
            or type(v) is not torch.Tensor or not isinstance(mask, torch.Tensor)
            or type(block_size) is not int or type(causal) is not bool
            or type(return_lse) is not bool or not q.is_cuda):
        return None
    try:
        key = ("block_sparse", *_meta(q), *_meta(k), *_meta(v), *_meta(mask), q is k, k is v,
               q is v, block_size, causal, scale, type(scale), return_lse, check_values)
        if num is None:
            return key
        return (*key, *_meta(num), *_meta(idx))
    except RuntimeError:  # tensors without strides or storage: the general path
        return None


class _Step:
    """One replayed launch (``call`` set) or zeroing (``call`` None, ``nbytes`` set)."""

    __slots__ = ("call", "grid", "function", "prefix", "tail", "scalars", "args", "descriptors",
                 "entry", "scratch", "nbytes", "side", "sync", "events")


#: torch Stream objects by (device index, raw stream handle): a replay that forks or
#: joins a side stream needs the current stream as an object, and building one
#: (``torch.cuda.current_stream``) costs more host time than the launches it orders.
#: A handle names one stream while it exists; pool streams are never freed.
_STREAM_OBJECTS: dict = {}


def _current_stream_object(device: int, handle: int, torch_device) -> torch.cuda.Stream:
    """The current stream of ``device`` (raw ``handle``) as a torch Stream, cached."""
    stream = _STREAM_OBJECTS.get((device, handle))
    if stream is None:
        stream = torch.cuda.current_stream(torch_device)
        if len(_STREAM_OBJECTS) > 256:
            _STREAM_OBJECTS.clear()
        _STREAM_OBJECTS[(device, handle)] = stream
    return stream


def _step_event(step: _Step) -> torch.cuda.Event:
    """The event a fork or join step records and waits on, one per thread (an event
    shared between threads could be re-recorded between one thread's record and its
    wait). Recording an event again is how CUDA means events to be reused: a wait
    already queued keeps the work it saw then."""
    thread = threading.get_ident()
    event = step.events.get(thread)
    if event is None:
        if len(step.events) >= 64:  # threads come and go: keep the table bounded
            step.events.clear()
        event = step.events[thread] = torch.cuda.Event()
    return event


class CallPlan:
    """The recorded launches of one call signature, and where their buffers lie."""

    __slots__ = ("cfg", "state", "device", "torch_device", "words", "outputs", "steps", "flag",
                 "kind")

    def run(self, inputs):
        """Replay on ``inputs`` (as recorded: q, k, v, ...): ``(outputs, buffer, flag)``;
        the NaN/Inf flag is ``buffer[flag]`` (buffer None: the call had no buffer;
        flag None: no flag)."""
        device = self.torch_device
        buffer = torch.empty(self.words, dtype=torch.float64, device=device) if self.words else None
        outputs = [None if spec is None else torch.empty(spec[0], dtype=spec[1], device=device)
                   for spec in self.outputs]
        table = [0 if x is None else x.data_ptr() for x in inputs]
        base = 0 if buffer is None else buffer.data_ptr()
        table.append(base)
        table += [0 if t is None else t.data_ptr() for t in outputs]
        stream = _launch._get_stream(self.device)
        current = None
        for step in self.steps:
            if step.sync is not None:  # the recorded fork or join of a side stream
                if current is None:
                    current = _current_stream_object(self.device, stream, device)
                event = _step_event(step)
                if step.sync == "fork":  # as step.side.wait_stream(current)
                    event.record(current)
                    step.side.wait_event(event)
                else:  # as current.wait_stream(step.side)
                    event.record(step.side)
                    current.wait_event(event)
                continue
            target = stream if step.side is None else step.side.cuda_stream
            if step.call is None:
                slot, delta = step.args
                _items.zero_bytes(table[slot] + delta, step.nbytes, target)
                continue
            # (slot, delta) of a tensor; (-1, value) of a scalar among launch()'s arguments.
            values = [None if a is None else table[a[0]] + a[1] if a[0] >= 0 else a[1]
                      for a in step.args]
            values += step.scalars
            if step.descriptors:
                for position, slot, (block_shape, padding) in step.descriptors:
                    values[position] = _items.descriptor_on(inputs[slot], block_shape, padding)
                values = step.entry.expand(values)
            prefix = step.prefix
            if step.scratch is not None:
                prefix = (prefix[0], prefix[1], base + step.scratch, *prefix[3:])
            step.call(*step.grid, target, step.function, *prefix, *values, *step.tail)
        return outputs, buffer, self.flag


def planned(key, inputs, cfg=None):
    """Replay the plan of the signature ``key`` (:func:`call_key`, :func:`block_sparse_key`)
    on ``inputs`` (:meth:`CallPlan.run`), or None (no plan: the caller takes the general
    path)."""
    if key is None or not ENABLED:
        return None
    plan = _PLANS.get(key)
    if (not plan or plan.cfg is not cfg or plan.state != _state()
            or _launch._get_device() != plan.device or _launch._hooks_active()):
        return None
    PLAN_STATS["hit"] += 1
    PLAN_STATS[plan.kind] += 1
    return plan.run(inputs)


class _Watch(TorchDispatchMode):
    """Every torch operation of a recorded call, and the storages it allocated."""

    def __init__(self):
        super().__init__()
        self.refused: list = []
        self.fresh: set = set()
        self.zeros = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                    torch.ops.aten.empty_like.default):
            self.fresh.add(result.untyped_storage().data_ptr())
        elif func is torch.ops.aten.zero_.default:
            self.zeros += 1
        elif not func.is_view:
            self.refused.append(str(func))
        return result


def record(general, key, inputs, cfg=None):
    """``general()`` (the general path: ``(outputs, nonfinite flag)``); on the second call
    of the signature ``key``, recorded and made into its plan over ``inputs``. Never
    recorded under ``torch.compile`` tracing or CUDA graph capture."""
    if key is None or not ENABLED or _tracing() or _PLANS.get(key, 0) is not None:
        if key is not None and ENABLED and key not in _PLANS and not _tracing():
            if len(_PLANS) >= 1024:
                _PLANS.clear()
            _PLANS[key] = None  # seen: the next call records (this one may compile)
        return general()
    with _items.recording() as launches, _Watch() as watch:
        result = general()
    plan = _make_plan(launches, watch, result, inputs, cfg)
    PLAN_STATS["made" if plan else "refused"] += 1
    if plan:
        plan.kind = key[0]
    _PLANS[key] = plan or False
    return result


#: Why the last refused signature got no plan (tests and users debugging a slow call).
LAST_REFUSAL = ""


def _refuse(reason: str) -> None:
    global LAST_REFUSAL
    LAST_REFUSAL = reason
    return None


def _stream_roles(launches):
    """Per recorded item, the side stream it ran on (None: the call's stream), or None
    for the whole list when an item ran on a stream that was neither the call's nor a
    side stream forked from it and not yet joined, or a side stream is never joined."""
    main = None
    active: dict = {}  # raw handle -> torch stream of the forked, not yet joined sides
    roles = []
    for item in launches:
        stream = item[2] if item[0] in ("zero", "fork", "join") else item[4]
        if item[0] in ("fork", "join"):
            if main is None:
                main = stream
            side = item[1]
            if stream != main or (item[0] == "fork") == (side.cuda_stream in active):
                return None
            if item[0] == "fork":
                active[side.cuda_stream] = side
            else:
                del active[side.cuda_stream]
            roles.append(side)
            continue
        if main is None:
            main = stream
        if stream != main and stream not in active:
            return None
        roles.append(active.get(stream))
    return None if active else roles


def _make_plan(launches, watch, result, inputs, cfg):
    """The :class:`CallPlan` of a recorded call, or None where it cannot be replayed."""
    outputs, flag = result
    if watch.refused:
        return _refuse(f"torch operations other than allocations and views: "
                       f"{sorted(set(watch.refused))}")
    if not launches or any(item is None for item in launches):
        return _refuse("no launch, or a launch through Triton's own path")
    if _items._driver_memset() is None or (flag is not None and flag.dtype != torch.float64):
        return _refuse("no driver memset, or a NaN flag that is not float64")
    if watch.zeros != sum(item[0] == "zero" for item in launches):
        return _refuse("zeroing other than by plan_items.zero_")
    sides = _stream_roles(launches)
    if sides is None:
        return _refuse("launches on several streams other than forked and joined side streams")
    n = len(inputs)  # table slots: the inputs, the buffer, the outputs
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
            return _refuse(f"output {i} is not a fresh contiguous tensor of its own storage")
        slots[storage.data_ptr()] = (n + 1 + i, 0)
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
        # A view of one input at its address (the mask read as bytes): that input's slot.
        same = [slot for slot, x in enumerate(inputs) if x is not None and address
                and x.data_ptr() == t.data_ptr() and x.untyped_storage().data_ptr() == address]
        if same:
            return (same[0], 0) if len(same) == 1 else None
        if address not in slots:
            if address not in watch.fresh or not address:
                return None  # neither an input, nor an output, nor allocated by the call
            slots[address] = (n, size)
            size += -(-storage.nbytes() // _ALIGN) * _ALIGN
        slot, offset = slots[address]
        return slot, offset + t.data_ptr() - address

    steps = []
    for item, side in zip(launches, sides, strict=True):
        step = _Step()
        step.side, step.sync = side, None
        if item[0] in ("fork", "join"):
            step.sync, step.events = item[0], {}
            steps.append(step)
            continue
        if item[0] == "zero":
            t = item[1]
            step.call, step.args = None, ref(t)
            step.nbytes = t.numel() * t.element_size()
            if step.args is None or not t.is_contiguous():
                return _refuse("a zeroed tensor is not the call's own, or not contiguous")
            steps.append(step)
            continue
        entry, grid, tensors, scalars, _ = item
        if entry.scratch < 0:
            return _refuse("a kernel whose launcher allocates its own scratch")
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
                    return _refuse("a launch argument is neither an input, an output nor "
                                   "allocated by the call")
                step.args.append(where)
            elif type(t) is not _launch._TensorDescriptor:
                step.args.append((-1, t))  # a scalar between launch()'s tensors
            else:  # a host descriptor: over an input only
                slot = next((s for s, x in enumerate(inputs) if x is not None and t.base is x),
                            None)
                if slot is None:
                    return _refuse("a host tensor descriptor over a tensor other than an input")
                step.args.append(None)
                step.descriptors.append((position, slot, (t.block_shape, t.padding)))
        if entry.scratch:
            size = -(-size // max(_ALIGN, entry.align)) * max(_ALIGN, entry.align)
            step.scratch = size
            size += entry.scratch * step.grid[0] * step.grid[1] * step.grid[2]
        steps.append(step)
    plan = CallPlan()
    plan.flag = None
    if flag is not None:  # in the buffer, at a word of its own
        flag_at = ref(flag)
        if flag_at is None or flag_at[0] != n or flag_at[1] % 8:
            return _refuse("the NaN flag is not a word of the call's buffer")
        plan.flag = flag_at[1] // 8
    plan.cfg, plan.state, plan.steps, plan.outputs = cfg, _state(), steps, specs
    plan.device, plan.torch_device = inputs[0].get_device(), inputs[0].device
    plan.words = -(-size // 8)
    if plan.device != _launch._get_device():
        return _refuse("the inputs are not on the current device")
    return plan
