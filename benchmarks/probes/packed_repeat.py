"""Packed antidiagonal launch shapes called repeatedly: do they agree with themselves and
with the three-stage 128 x 128 shape?

A pipelining race (a buffer refilled while another warp group still reads it) shows
as calls that differ from each other, or as tiles far from the reference shape's
value. For each ``--tunings`` entry (``rows,key_groups,warps,stages,one_pass,tma``)
and length, on the structured inputs of ``bench_prism.py`` (stride ``--stride``,
tile 128, causal), the shape is called ``--calls`` times; the row records the
largest difference between calls, the largest difference to the reference shape's
first call and how many (head, query tile, key tile) entries differ from it by more
than 1e-4.

    python3 benchmarks/probes/packed_repeat.py --lengths 32768 \\
        --tunings "128,128,8,2,1,1;128,256,8,2,1,1" --out x.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_prism import structured_inputs  # noqa: E402
from probe_cli import run  # noqa: E402

from prism.optimized.antidiagonal_packed import (  # noqa: E402
    PackedTuning,
    antidiagonal_packed_probabilities,
)
from prism.reference import tile_layout  # noqa: E402

REFERENCE_SHAPE = PackedTuning(target_rows=128, block_kg=128, num_warps=8, num_stages=3,
                               one_pass=1, tma=1)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tunings", default="128,128,8,2,1,1;128,256,8,2,1,1")
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--calls", type=int, default=5)
    known, rest = parser.parse_known_args(argv)
    tunings = [PackedTuning(*map(int, t.split(","))) for t in known.tunings.split(";")]

    def row(n):
        q, k, _ = structured_inputs(n)
        layout = tile_layout(n, n, 128, True)
        base = antidiagonal_packed_probabilities(q, k, layout, known.stride, True,
                                                 REFERENCE_SHAPE)
        out = {"tokens": n, "stride": known.stride, "shapes": []}
        for tuning in tunings:
            calls = [antidiagonal_packed_probabilities(q, k, layout, known.stride, True, tuning)
                     for _ in range(known.calls)]
            diff = (calls[0] - base).abs()
            entry = {"tuning": str(tuning),
                     "max_diff_between_calls": max(float((c - calls[0]).abs().max())
                                                   for c in calls),
                     "max_diff_to_reference_shape": float(diff.max()),
                     "entries_off_by_1e-4": int((diff > 1e-4).sum())}
            print(n, entry, flush=True)
            out["shapes"].append(entry)
        return out

    return run(row, __doc__, "packed_repeat.py", "--lengths", "32768", rest)


if __name__ == "__main__":
    main()
