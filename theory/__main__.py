"""``python -m prism.theory``: print the cut-off table and the blind-spot numbers.

Options: ``--plots DIR`` writes the figures of the docs page, ``--json FILE``
writes every number printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .blind_spot import (
    DEFAULT_BLIND_SPOT_BASES,
    METHOD_MEAN_POOLING,
    METHOD_PRISM,
    blind_spot_table,
    format_blind_spot_table,
)
from .checks import band_energy_check
from .frequency import cutoff_table, format_cutoff_table

#: Extra top-p values at which mean pooling runs, to show the density it needs.
MEAN_POOLING_SWEEP = (0.99, 0.999)
#: Slash offsets of the robustness sweep; 384 (three tiles) is the default head.
OFFSET_SWEEP = (192, 384, 400, 448, 640, 1000)
#: Base and tile size of the issue's done criterion.
CRITERION_BASE, CRITERION_BLOCK_SIZE = 5e5, 128


def _band_energy_lines(bases, block_size: int = 128, head_dim: int = 128):
    lines = [
        f"{'base':>8} {'band':>5} {'pairs':>7} {'mean g^2':>9} {'measured':>9} {'+-':>6} "
        f"{'tau pred':>9} {'tau meas':>9} {'1/tau':>7}"
    ]
    records = []
    for base in bases:
        for band in band_energy_check(head_dim, base, block_size):
            lines.append(
                f"{base:>8.0e} {band.band:>5} {band.first_pair:>3}..{band.last_pair:<3} "
                f"{band.mean_gain_sq:>9.4f} {band.measured_ratio:>9.4f} "
                f"{band.ratio_stderr:>6.4f} {band.predicted_tau:>9.4f} "
                f"{band.measured_tau:>9.4f} {band.logit_gain:>7.3f}"
            )
            records.append({"base": base, "block_size": block_size, "head_dim": head_dim,
                            **dataclasses.asdict(band)})
    return lines, records


def _criterion(rows):
    mean = next(r for r in rows if r.base == CRITERION_BASE and r.method == METHOD_MEAN_POOLING
                and r.threshold == 0.95)
    prism = next(r for r in rows if r.base == CRITERION_BASE and r.method == METHOD_PRISM
                 and r.calibrate)
    passed = mean.recall < 0.8 and prism.recall >= 0.95
    line = (f"done criterion (base {CRITERION_BASE:.0e}, B = {CRITERION_BLOCK_SIZE}): mean "
            f"pooling recall {mean.recall:.3f} (< 0.8), Prism recall {prism.recall:.3f} "
            f"(>= 0.95), densities {mean.density:.3f} vs {prism.density:.3f}: "
            f"{'met' if passed else 'NOT met'}")
    return line, passed


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0, or 1 if the criterion fails)."""
    parser = argparse.ArgumentParser(
        prog="python -m prism.theory",
        description="Frequency response of mean pooling under RoPE and the blind-spot demo.",
    )
    parser.add_argument("--plots", metavar="DIR", help="write the docs figures into DIR")
    parser.add_argument("--json", metavar="FILE", help="write all numbers as JSON to FILE")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    cutoff_rows = cutoff_table()
    print("Frequency response of mean pooling: cut-off 2pi/B and suppressed pairs")
    print(format_cutoff_table(cutoff_rows))

    print("\nBand energy after pooling (random per-tile content, D = 128, B = 128) and the "
          "SPEC 5 temperature it implies")
    energy_lines, energy_records = _band_energy_lines(DEFAULT_BLIND_SPOT_BASES)
    print("\n".join(energy_lines))

    print("\nBlind spot: synthetic head (slash on pairs 0..23, content on 24..47, sink and "
          "verticals on 48..63), N = 2048, D = 128")
    rows = blind_spot_table(block_size=CRITERION_BLOCK_SIZE,
                            mean_pooling_thresholds=MEAN_POOLING_SWEEP)
    print(format_blind_spot_table(rows))

    print(f"\nSlash offset sweep at base {CRITERION_BASE:.0e}")
    offset_rows = []
    for offset in OFFSET_SWEEP:
        offset_rows.extend(blind_spot_table((CRITERION_BASE,), block_size=CRITERION_BLOCK_SIZE,
                                            slash_offset=offset))
    print(format_blind_spot_table(offset_rows))

    criterion_line, passed = _criterion(rows)
    print("\n" + criterion_line)

    figures = []
    if args.plots:
        from .plots import write_all_figures

        figures = write_all_figures(args.plots, rows)
        print("figures: " + ", ".join(figures))
    elapsed = time.perf_counter() - started
    print(f"total time {elapsed:.1f} s")

    if args.json:
        payload = {
            "cutoff_table": [dataclasses.asdict(r) for r in cutoff_rows],
            "band_energy": energy_records,
            "blind_spot": [dict(dataclasses.asdict(r), label=r.label) for r in rows],
            "offset_sweep": [dict(dataclasses.asdict(r), label=r.label) for r in offset_rows],
            "criterion": {"text": criterion_line, "met": passed},
            "figures": figures,
            "seconds": elapsed,
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
