"""The command line the probes share: one JSON row per case, printed and saved.

``run(row, doc, script, option, default, argv, parse=int)`` parses ``option``
(comma-separated cases; ``parse`` turns each into ``row``'s argument, or into a
tuple of its arguments), ``--out`` and ``--commit``, calls ``row`` for each case and, with
``--out``, writes ``{"gpu", "torch", "commit", "command", "rows"}`` there.
"""

from __future__ import annotations

import argparse
import json
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
    if args.out:
        given = argv if argv is not None else sys.argv[1:]
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "commit": args.commit,
                       "command": f"python3 benchmarks/probes/{script} " + " ".join(given),
                       "rows": rows}, f, indent=1)
    return rows
