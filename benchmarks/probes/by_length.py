"""The command line the A/B probes share: one JSON row per length, printed and saved.

``run(row, doc, script, default_lengths)`` parses ``--lengths`` (comma-separated
token counts), ``--out`` and ``--commit``, calls ``row(n)`` for each length and,
with ``--out``, writes ``{"gpu", "commit", "command", "rows"}`` there.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def run(row, doc: str, script: str, default_lengths: str, argv=None) -> list:
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--lengths", default=default_lengths)
    parser.add_argument("--out", default="")
    parser.add_argument("--commit", default="", help="the tree's commit, for the record")
    args = parser.parse_args(argv)
    rows = [row(int(n)) for n in args.lengths.split(",")]
    if args.out:
        given = argv if argv is not None else sys.argv[1:]
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "commit": args.commit,
                       "command": f"python3 benchmarks/probes/{script} " + " ".join(given),
                       "rows": rows}, f, indent=1)
    return rows
