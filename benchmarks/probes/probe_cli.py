"""The command line the probes share: one JSON row per case, printed and saved.

``run(row, doc, script, option, default, argv, parse=int)`` parses ``option``
(comma-separated cases; ``parse`` turns each into ``row``'s argument, or into a
tuple of its arguments), ``--out`` and ``--commit``, calls ``row`` for each case and, with
``--out``, writes ``{"gpu", "torch", "commit", "command", "rows"}`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def run(row, doc: str, script: str, option: str, default: str, argv=None, parse=int) -> list:
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument(option, default=default)
    parser.add_argument("--out", default="")
    parser.add_argument("--commit", default="", help="the tree's commit, for the record")
    args = parser.parse_args(argv)
    cases = getattr(args, option.lstrip("-").replace("-", "_")).split(",")
    rows = [row(*parsed) if isinstance(parsed := parse(case), tuple) else row(parsed)
            for case in cases]
    save(rows, args.out, args.commit, script, argv)
    return rows


def selection_args(doc: str, settings: str, argv=None, extra=()) -> argparse.Namespace:
    """The options of the probes that time whole selections per length and setting:
    ``--lengths``, ``--settings`` (names of ``constant_variants.SETTINGS``), ``--out``,
    ``--commit``, plus ``extra``: ``(flag, keyword arguments of add_argument)`` pairs.
    Returns the parsed arguments with ``lengths`` and ``settings`` as lists."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--settings", default=settings)
    parser.add_argument("--out", default="")
    parser.add_argument("--commit", default="")
    for flag, options in extra:
        parser.add_argument(flag, **options)
    args = parser.parse_args(argv)
    args.lengths = [int(n) for n in args.lengths.split(",") if n]
    args.settings = [s for s in args.settings.split(",") if s]
    return args


def save(rows: list, out: str, commit: str, script: str, argv=None) -> None:
    """Write ``{"gpu", "torch", "commit", "command", "rows"}`` to ``out`` (nothing if empty)."""
    if not out:
        return
    given = argv if argv is not None else sys.argv[1:]
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": commit,
                   "command": f"python3 benchmarks/probes/{script} " + " ".join(given),
                   "rows": rows}, f, indent=1)


def time_variants(fn, settings, out: dict, restore) -> dict:
    """Time ``fn`` (a ``select_blocks`` call) under each setting, in the order given.

    ``settings`` is a list of ``(name, apply)``; ``apply()`` switches to that
    variant and ``restore()`` (run at the end, also on error) back to the
    defaults. Call plans are cleared before each variant (a plan records one
    setting's launches). Appends eager and CUDA-graph ms to ``out["<name>_eager_ms"]``
    and ``out["<name>_graph_ms"]`` (a name given twice is timed twice) and returns
    each variant's bool mask.
    """
    from bench_prism import bench, graph_ms

    from prism.optimized import call_plan

    masks = {}
    try:
        for name, apply in settings:
            apply()
            call_plan._PLANS.clear()
            masks[name] = fn().as_tensor().clone()
            out.setdefault(f"{name}_eager_ms", []).append(bench(fn))
            out.setdefault(f"{name}_graph_ms", []).append(graph_ms(fn))
    finally:
        restore()
        call_plan._PLANS.clear()
    return masks


def load_package_module(source: str, name: str):
    """Import ``source`` (a module of ``prism.optimized``, changed or older) as
    ``prism.optimized.<name>`` from a temporary file (Triton reads kernels' source
    from their file), beside the package's own modules."""
    import importlib.util
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"prism.optimized.{name}", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "prism.optimized"
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
