"""Where the Triton kernels may run, and small helpers shared by every kernel module.

It also holds the optimized path's remembered-signature validation
(:func:`validate_qk`, :func:`validate_qkv`): the shared checks of
:mod:`prism.reference.validation`, skipped for a signature that already
passed them (the reference itself keeps no such state).

Triton compiles kernels for CUDA devices. On the CPU the same kernels run only
under Triton's interpreter, which Triton itself switches on when
``TRITON_INTERPRET=1`` is set before ``triton`` is imported. This module never
reads environment variables: it asks a decorated kernel whether Triton built it
for the interpreter.
"""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

from prism.reference import validation as _validation


def kernels_interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) runs in Triton's interpreter."""
    while not isinstance(kernel, InterpretedFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, **tensors: torch.Tensor) -> None:
    """Refuse tensors the Triton kernels cannot run on, and say what to do instead.

    CUDA tensors always run. CPU tensors run only when Triton built the kernels
    for its interpreter (``TRITON_INTERPRET=1`` set before ``triton`` was
    imported), which is meant for testing, not speed.
    """
    for name, t in tensors.items():
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and kernels_interpreted(kernel):
            continue
        raise ValueError(
            f"prism.optimized runs Triton kernels on CUDA tensors, but {name} is on {t.device}; "
            f"move the inputs to a GPU (e.g. {name}.cuda()), or use prism.reference for CPU "
            "tensors (prism.select_blocks and friends dispatch by device); for testing only, "
            "TRITON_INTERPRET=1 set before importing triton runs the kernels on the CPU"
        )


#: Signatures of inputs that passed the shape/type checks (cleared when it grows large).
_PASSED: dict = {}


def _signature(causal, q, k, v=None):
    """A hashable summary of what the shape/type checks read, or None (not cacheable).

    None under ``torch.compile`` tracing (the checks are traced, not skipped),
    for a non-bool ``causal`` and for anything that is not a tensor.
    """
    if (type(causal) is not bool or not isinstance(q, torch.Tensor)
            or not isinstance(k, torch.Tensor) or torch.compiler.is_compiling()):
        return None
    key = (causal, type(q), q.shape, q.dtype, q.device, q.layout, type(k), k.shape, k.dtype,
           k.device, k.layout)
    if v is not None:
        if not isinstance(v, torch.Tensor):
            return None
        key += (type(v), v.shape, v.dtype, v.device, v.layout)
    return key


def _known(key) -> bool:
    if key is None:
        return False
    try:
        return key in _PASSED
    except TypeError:  # symbolic sizes are not hashable
        return False


def _remember(key) -> None:
    if key is not None:
        if len(_PASSED) > 4096:
            _PASSED.clear()
        try:
            _PASSED[key] = True
        except TypeError:  # symbolic sizes: such calls are simply checked every time
            return


def _validated(key, check, check_values: bool, **tensors) -> None:
    """``check(check_values)`` (the reference's validation) unless the signature ``key``
    passed it before, then remember ``key``; for a known signature only the NaN/Inf
    checks of ``tensors`` run (when ``check_values``)."""
    if not _known(key):
        check(check_values)
        _remember(key)
    elif check_values:
        for name, t in tensors.items():
            _validation.check_finite(name, t)


def validate_qk(q, k, *, causal: bool, check_values: bool = True) -> None:
    """:func:`prism.reference.validation.validate_qk`, remembering signatures that passed.

    The shape and type checks depend only on each tensor's type, shape, dtype
    and device and on ``causal``; a signature that passed them once skips them
    (the common case: every layer of a model, every decoding step of one
    length), which saves host time per call. Failing inputs are never
    remembered and raise every time; the value checks (``check_values``)
    always run. Under ``torch.compile`` tracing nothing is remembered or
    skipped: the checks are traced.
    """
    _validated(_signature(causal, q, k),
               lambda values: _validation.validate_qk(q, k, causal=causal, check_values=values),
               check_values, q=q, k=k)


def validate_qkv(q, k, v, *, causal: bool, check_values: bool = True) -> None:
    """:func:`prism.reference.validation.validate_qkv` with :func:`validate_qk`'s fast path."""
    _validated(_signature(causal, q, k, v) if v is not None else None,
               lambda values: _validation.validate_qkv(q, k, v, causal=causal,
                                                       check_values=values),
               check_values, q=q, k=k, v=v)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= max(n, 1)`` (plain Python: called on every launch)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_CAPABILITIES: dict = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability``, cached per device (asked on every launch)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _CAPABILITIES.get(index)
    if capability is None:
        capability = _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return capability


def _numpy_converts_one_element_arrays(np) -> bool:
    """Whether ``int()`` still accepts a 1-element array (NumPy < 2.4)."""
    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return False
    return True


def _teach_interpreter_numpy_2() -> None:
    """Let Triton 3.6's interpreter run loops whose bounds are kernel arguments.

    The interpreter turns a scalar tensor into a loop bound with ``int(array)``,
    and its scalars are 1-element arrays; NumPy >= 2.4 refuses that conversion
    ("only 0-dimensional arrays can be converted to Python scalars"), so every
    ``for i in range(0, n, BLOCK)`` with a run-time ``n`` fails on the CPU. This
    wraps the interpreter's tensor patching to read the single element instead.
    It touches nothing outside the interpreter and does nothing on NumPy versions
    that still accept the conversion.
    """
    import numpy as np
    from triton.runtime import interpreter

    if _numpy_converts_one_element_arrays(np):
        return
    original = interpreter._patch_lang_tensor
    if getattr(original, "_reads_one_element", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._reads_one_element = True
    interpreter._patch_lang_tensor = patch_lang_tensor


_teach_interpreter_numpy_2()
