"""``python -m prism.theory``: the numerical checks of the theory, then the blind-spot numbers.

Prints the cut-off table, checks the three results of :mod:`prism.theory.checks`
(the pooling identity, the score filter, the band energy) against their stated
tolerances, and shows the blind spot on the synthetic head. The exit status is
1 when a check fails and 0 otherwise; the blind-spot numbers are measurements,
not checks. Options: ``--plots DIR`` writes the figures of the docs page,
``--json FILE`` writes every number printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .blind_spot import (
    DEFAULT_BLIND_SPOT_BASES,
    blind_spot_table,
    format_blind_spot_table,
)
from .checks import (
    band_energy_check,
    pooling_identity_residuals,
    score_filter_residual,
)
from .frequency import cutoff_table, format_cutoff_table

#: Extra top-p values at which mean pooling runs, to show the density it needs.
MEAN_POOLING_SWEEP = (0.99, 0.999)
#: Slash offsets of the robustness sweep; 384 (three tiles) is the default head.
OFFSET_SWEEP = (192, 384, 400, 448, 640, 1000)
#: Base and tile size of the blind-spot head and its offset sweep.
SWEEP_BASE, BLOCK_SIZE = 5e5, 128
#: Tolerances stated by prism.theory.checks: (a) and (b) hold to float64 rounding,
#: (c) is a z-score (standard normal up to the delta method).
IDENTITY_TOLERANCE = 1e-12
FILTER_TOLERANCE = 1e-10
Z_TOLERANCE = 4.0


def _band_energy_lines(bases, block_size: int = BLOCK_SIZE, head_dim: int = 128):
    lines = [
        f"{'base':>8} {'band':>5} {'pairs':>7} {'mean g^2':>9} {'measured':>9} {'+-':>6} "
        f"{'tau pred':>9} {'tau meas':>9} {'1/tau':>7}"
    ]
    records, bands = [], []
    for base in bases:
        for band in band_energy_check(head_dim, base, block_size):
            bands.append((base, band))
            lines.append(
                f"{base:>8.0e} {band.band:>5} {band.first_pair:>3}..{band.last_pair:<3} "
                f"{band.mean_gain_sq:>9.4f} {band.measured_ratio:>9.4f} "
                f"{band.ratio_stderr:>6.4f} {band.predicted_tau:>9.4f} "
                f"{band.measured_tau:>9.4f} {band.logit_gain:>7.3f}"
            )
            records.append({"base": base, "block_size": block_size, "head_dim": head_dim,
                            **dataclasses.asdict(band)})
    return lines, records, bands


def theory_checks(bases, bands, block_size: int = BLOCK_SIZE,
                  head_dim: int = 128) -> list[dict]:
    """Each numerical check of the theory at each base: what it measured and whether it held.

    (a) the pooling identity (largest relative residual over the pairs), (b)
    the score filter (residual relative to the largest possible score), both
    against float64 rounding; (c) the band energy of each band (``bands`` holds
    (base, BandEnergy) pairs), whose ``ratio_z`` and ``tau_z`` must stay within
    ``Z_TOLERANCE``.
    """
    checks = []
    for base in bases:
        identity = float(pooling_identity_residuals(head_dim, base, block_size, start=0).max())
        checks.append({"check": "pooling identity", "base": base, "value": identity,
                       "tolerance": IDENTITY_TOLERANCE, "passed": identity <= IDENTITY_TOLERANCE})
        score = score_filter_residual(head_dim, base, block_size, query_start=4 * block_size,
                                      key_start=0).residual
        checks.append({"check": "score filter", "base": base, "value": score,
                       "tolerance": FILTER_TOLERANCE, "passed": score <= FILTER_TOLERANCE})
    for base, band in bands:
        for name in ("ratio_z", "tau_z"):
            value = getattr(band, name)
            checks.append({"check": f"band energy {band.band} {name}", "base": base,
                           "value": value, "tolerance": Z_TOLERANCE,
                           "passed": abs(value) <= Z_TOLERANCE})
    return checks


def format_checks(checks: list[dict]) -> str:
    lines = [f"{'check':<26} {'base':>8} {'value':>10} {'tolerance':>10}  result"]
    for c in checks:
        lines.append(f"{c['check']:<26} {c['base']:>8.0e} {c['value']:>10.3g} "
                     f"{c['tolerance']:>10.3g}  {'ok' if c['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the command line; returns the exit status (1 if a check of the theory fails)."""
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
          "contract §5 temperature it implies")
    energy_lines, energy_records, bands = _band_energy_lines(DEFAULT_BLIND_SPOT_BASES)
    print("\n".join(energy_lines))

    print("\nChecks of the theory (prism.theory.checks), D = 128, B = 128")
    checks = theory_checks(DEFAULT_BLIND_SPOT_BASES, bands)
    print(format_checks(checks))
    failed = [c for c in checks if not c["passed"]]

    print("\nBlind spot: synthetic head (slash on pairs 0..23, content on 24..47, sink and "
          "verticals on 48..63), N = 2048, D = 128")
    rows = blind_spot_table(block_size=BLOCK_SIZE, mean_pooling_thresholds=MEAN_POOLING_SWEEP)
    print(format_blind_spot_table(rows))

    print(f"\nSlash offset sweep at base {SWEEP_BASE:.0e}")
    offset_rows = []
    for offset in OFFSET_SWEEP:
        offset_rows.extend(blind_spot_table((SWEEP_BASE,), block_size=BLOCK_SIZE,
                                            slash_offset=offset))
    print(format_blind_spot_table(offset_rows))

    figures = []
    if args.plots:
        from .plots import write_all_figures

        figures = write_all_figures(args.plots, rows)
        print("figures: " + ", ".join(figures))
    elapsed = time.perf_counter() - started
    print(f"total time {elapsed:.1f} s")
    summary = (f"{len(checks) - len(failed)} of {len(checks)} checks of the theory passed"
               + (": FAILED " + ", ".join(f"{c['check']} at base {c['base']:.0e}"
                                          for c in failed) if failed else ""))
    print(summary)

    if args.json:
        payload = {
            "cutoff_table": [dataclasses.asdict(r) for r in cutoff_rows],
            "band_energy": energy_records,
            "blind_spot": [dict(dataclasses.asdict(r), label=r.label) for r in rows],
            "offset_sweep": [dict(dataclasses.asdict(r), label=r.label) for r in offset_rows],
            "checks": checks,
            "figures": figures,
            "seconds": elapsed,
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
