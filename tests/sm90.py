"""Compile a Triton kernel for sm_90 on the CPU and read ptxas's resource report.

The ptxas that ships with Triton runs without a GPU, so launch shapes can be
checked for register spills and register counts in CI. Triton's interpreter
replaces ``triton.jit`` when ``TRITON_INTERPRET=1`` is set before import, so
:func:`in_fresh_process` runs the compile in a process without it.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys


def sm90_compile(kernel, constexprs: dict, pointers: dict, *, floats=(), divisible=(),
                 num_warps: int, num_stages: int):
    """``kernel`` compiled for sm_90 (Triton's ``CompiledKernel``: ``asm["ptx"]``,
    ``asm["cubin"]``).

    ``constexprs`` maps parameter names to values; ``pointers`` names to Triton
    pointer types (``"*bf16"``) or host tensor-descriptor types
    (``"tensordesc<bf16[1, 1, 64, 128]>"``); ``floats`` names fp32 scalars; every
    other parameter is an int32. Pointers and the ints named in ``divisible``
    carry the divisible-by-16 hint Triton gives such arguments at run time.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else pointers.get(n) or
                 ("fp32" if n in floats else "i32") for n in names}
    hinted = [n for n, t in pointers.items() if t.startswith("*")] + list(divisible)
    source = ASTSource(kernel, signature,
                       {(names.index(n),): v for n, v in constexprs.items()},
                       {(names.index(n),): [["tt.divisibility", 16]] for n in hinted})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def sm90_resources(kernel, constexprs: dict, pointers: dict, *, floats=(), divisible=(),
                   num_warps: int, num_stages: int) -> tuple[int, int]:
    """(registers, spill-store bytes) per thread of ``kernel`` compiled for sm_90a
    (arguments as :func:`sm90_compile`'s)."""
    return ptxas_report(sm90_compile(kernel, constexprs, pointers, floats=floats,
                                     divisible=divisible, num_warps=num_warps,
                                     num_stages=num_stages))


def ptxas_report(compiled) -> tuple[int, int]:
    """(registers, spill-store bytes) per thread from ptxas's report on the PTX of
    a kernel compiled for sm_90."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                       f"prism_{compiled.name}_{os.getpid()}.ptx")
    with open(ptx, "w") as f:
        f.write(compiled.asm["ptx"])
    try:
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", ptx, "-o",
                                 os.devnull], capture_output=True, text=True, check=True).stderr
    finally:
        os.remove(ptx)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    return registers, sum(int(b) for b in re.findall(r"(\d+) bytes spill stores", report))


def in_fresh_process(module: str, function: str, *args) -> list[int]:
    """``module.function(*args)`` (ints in, ints out) in a process without Triton's
    interpreter, with this directory on the path; its printed ints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = (f"import sys; sys.path.insert(0, sys.argv[1]); from {module} import {function}; "
              f"result = {function}(*map(int, sys.argv[2:])); "
              "print(*(result if isinstance(result, tuple) else (result,)))")
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__),
                           *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [int(x) for x in done.stdout.split()]
