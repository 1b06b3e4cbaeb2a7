"""Where the Triton kernels may run, and small helpers shared by every kernel module.

Triton compiles kernels for CUDA devices. On the CPU the same kernels run only
under Triton's interpreter, which Triton itself switches on when
``TRITON_INTERPRET=1`` is set before ``triton`` is imported. This module never
reads environment variables: it asks a decorated kernel whether Triton built it
for the interpreter.
"""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction


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
