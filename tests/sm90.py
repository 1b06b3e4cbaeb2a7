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


def sass(compiled) -> str:
    """The SASS of a kernel compiled for sm_90 (``nvdisasm`` that ships with Triton)."""
    import triton

    cubin = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                         f"prism_{compiled.name}_{os.getpid()}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "nvdisasm")
    try:
        return subprocess.run([tool, "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.remove(cubin)


def sass_loops(text: str) -> list[dict]:
    """Per loop of SASS ``text``, in address order: where it starts, its instruction
    count, and how many of them are HGMMA, MUFU.EX2, BAR.SYNC, STL and LDL. A loop
    closes with a predicated backward branch; unconditional backward branches
    return from out-of-line barrier-wait stubs, and loops of at most 8 lines are
    those stubs' own polling."""
    all_lines = text.splitlines()
    address = re.compile(r"/\*([0-9a-f]{4,})\*/")
    code = [(i, line) for i, line in enumerate(all_lines) if address.search(line)]
    first_after = {}
    for i, line in enumerate(all_lines):
        label = re.match(r"^(\.L_x_\d+):", line.strip())
        if label:
            first_after[label.group(1)] = next((j for j, (k, _) in enumerate(code) if k > i),
                                               None)
    found = []
    for j, (_, line) in enumerate(code):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        start = first_after.get(target.group(1)) if target else None
        if start is None or "@" not in line or j - start <= 8:
            continue
        body = [text_line for _, text_line in code[start:j + 1]]
        found.append({"start": address.search(code[start][1]).group(1),
                      "instructions": len(body),
                      **{key: sum(key in b for b in body)
                         for key in ("HGMMA", "MUFU.EX2", "BAR.SYNC", "STL", "LDL")}})
    return sorted(found, key=lambda loop: int(loop["start"], 16))


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
