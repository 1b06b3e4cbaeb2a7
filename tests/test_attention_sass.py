"""The attention launch table compiled for sm_90a on the CPU (no GPU needed).

A register spill inside the mask-free key loop costs every key block of every
program, so no table entry may have one. ptxas's total spill count is not the
check: the D 128 entry spills 144 bytes, all in the prologue and in the masked
last-tile loop, which run once per query tile (benchmarks/NOTES.md item 42 (j)).
The SASS comes from ``benchmarks/probes/attention_sass.py``, with the
specialisations a bf16 launch gets.
"""

from __future__ import annotations

import os
import sys

from sm90 import in_fresh_process

#: (head dim, tile) of every table entry family, then one shape that spills in its
#: loop (128 x 128 on one warp group at D 128), to show the check can fail.
TABLE = [(64, 128), (80, 128), (96, 128), (128, 128), (256, 128),
         (64, 64), (96, 64), (128, 64), (256, 64)]
#: (head dim, tile, page size) of paged launches held to the same rule: the
#: small-page shape (pointer loads). The table's shape with descriptors over
#: 64-token pages still has 14 local-memory instructions per key block
#: (benchmarks/NOTES.md item 43 (f)), so it is not listed.
PAGED = [(128, 128, 16), (96, 128, 32)]
SPILLING = (128, 128, 128, 128, 4, 2, 0)
#: (head dim, tile) of table entries also compiled with the query NaN/Inf flag that
#: ``block_sparse_attention``'s eager calls set (``CHECK_FINITE``): keeping the
#: queries live for it once put 2 local-memory instructions in the D 128 loop.
CHECKED = [(128, 128), (256, 128), (64, 128)]


def _main_loop_counts(*flat) -> tuple:
    """For each seven ints (head dim, tile, block_m, block_n, warps, stages, page
    size; block_m 0 for the table's shape, page 0 for a dense launch; page -1: the
    table's dense launch with ``block_sparse_attention``'s query NaN/Inf flag): loops
    found, local-memory instructions and HGMMA in the first (mask-free) key loop."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "probes"))
    from attention_sass import compile_case
    from sm90 import sass, sass_loops

    out = []
    for i in range(0, len(flat), 7):
        d, tile, bm, bn, warps, stages, page = flat[i:i + 7]
        shape = f"{bm}/{bn}/{warps}/{stages}" if bm else ""
        compiled = compile_case(d, tile, shape, max(page, 0), check=page < 0)[1]
        loops = sass_loops(sass(compiled))
        out += [len(loops), loops[0]["STL"] + loops[0]["LDL"] if loops else -1,
                loops[0]["HGMMA"] if loops else 0]
    return tuple(out)


def test_no_table_entry_spills_in_its_key_loop():
    cases = ([(d, tile, 0, 0, 0, 0, 0) for d, tile in TABLE]
             + [(d, tile, 0, 0, 0, 0, page) for d, tile, page in PAGED]
             + [(d, tile, 0, 0, 0, 0, -1) for d, tile in CHECKED] + [SPILLING])
    counts = in_fresh_process("test_attention_sass", "_main_loop_counts",
                              *(x for case in cases for x in case))
    for i, case in enumerate(cases):
        loops, local, hgmma = counts[3 * i:3 * i + 3]
        assert loops >= 2 and hgmma > 0, f"{case}: no key loops found in the SASS"
        if case == SPILLING:
            assert local > 0, "the known spilling shape shows no local memory: check broken"
        else:
            assert local == 0, (f"D {case[0]}, tile {case[1]}, page {case[6]}: the key loop has "
                                f"{local} local-memory instructions (register spills)")
