"""The vertical-slash top-p's launch module against an older copy of it, in one process.

``--before FILE`` is an older ``optimized/vertical_slash_tiles.py`` (for example
``git show <rev>:optimized/vertical_slash_tiles.py > old.py``); it is imported
beside the package and put in place of the current module's
``vertical_slash_bins`` where the estimators call it. Per length and setting
(``constant_variants.py``'s), ``select_blocks`` on the structured inputs is
timed eagerly and as a CUDA-graph replay with the current module and the older
one, each twice, interleaved, and the masks are compared.

    python3 benchmarks/probes/top_p_ab.py --before old.py --lengths 8192,32768 \\
        --settings preset,e5 --out x.json
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_prism import structured_inputs  # noqa: E402
from constant_variants import SETTINGS  # noqa: E402
from probe_cli import load_package_module, save, selection_args, time_variants  # noqa: E402

from prism import optimized  # noqa: E402
from prism.optimized import estimator_path, vertical_slash  # noqa: E402

#: Modules that imported ``vertical_slash_bins`` by name.
USERS = (estimator_path, vertical_slash)


def row(n: int, before, settings) -> dict:
    q, k, _ = structured_inputs(n)
    current = estimator_path.vertical_slash_bins

    def put(function):
        for module in USERS:
            module.vertical_slash_bins = function

    variants = [("current", lambda: put(current)),
                ("before", lambda: put(before.vertical_slash_bins))] * 2
    out = {"tokens": n}
    for setting in settings:
        cfg = SETTINGS[setting]()
        timings = {}
        masks = time_variants(lambda c=cfg: optimized.select_blocks(q, k, c), variants,
                              timings, lambda: put(current))
        out[setting] = timings
        out[f"{setting}:masks_equal"] = bool(torch.equal(masks["current"], masks["before"]))
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    args = selection_args(__doc__, "preset,e5", argv, [("--before", dict(required=True))])
    with open(args.before) as f:
        before = load_package_module(f.read(), "_top_p_before")
    rows = [row(n, before, args.settings) for n in args.lengths]
    save(rows, args.out, args.commit, "top_p_ab.py", argv)
    return rows


if __name__ == "__main__":
    main()
