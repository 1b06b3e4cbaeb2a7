"""The estimators' golden set (tests/golden/estimators/) and its boundary ties.

Three kinds of check:

* the committed files are what the reference computes now (masks, ties,
  outputs), rebuilt from the cases' seeds;
* an independent NumPy port (tests/estimator_port.py, written from
  docs/estimators.rst, in float64 and in fp32) agrees with every case outside
  the recorded ties, and each of its misreading knobs fails every case that
  lists the misreading (at least two per misreading);
* the tie analysis (:func:`prism.reference.estimator_ties.estimator_boundary_ties`)
  flags entries at a top-p cut, and the optimized selection agrees with the
  committed masks outside the ties.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from estimator_port import KNOBS, estimator_select

from helpers import golden_case_tensors
from prism.reference import PrismConfig, block_sparse_attention, boundary_ties, select_blocks
from prism.reference.check import check_golden, main, report
from prism.reference.config import resolve_config
from prism.reference.estimator_ties import estimator_boundary_ties
from prism.reference.estimators import antidiagonal_probabilities
from prism.reference.golden import compare_attention, compare_mask, load_golden
from prism.reference.golden_cases import make_inputs
from prism.reference.golden_estimator_cases import ESTIMATOR_CASES, ESTIMATOR_MISREADINGS
from prism.reference.registry import ESTIMATORS
from prism.reference.tiles import tile_layout
from prism.reference.topp import top_p_select

GOLDEN = Path(__file__).parent / "golden"
MANIFEST, ARRAYS = load_golden(GOLDEN / "estimators")
ENTRIES = {entry["name"]: entry for entry in MANIFEST["cases"]}
CASES = {case.name: case for case in ESTIMATOR_CASES}


def _tensors(name):
    return golden_case_tensors(ENTRIES[name], ARRAYS[name])


def _port(**knobs):
    def select(q, k, *, causal=True, **config):
        return estimator_select(q, k, causal=causal, **config, **knobs)
    return select


def test_the_set_is_versioned_and_names_its_cases():
    assert set(ENTRIES) == set(CASES)
    assert MANIFEST["misreadings"] == ESTIMATOR_MISREADINGS
    size = sum(p.stat().st_size for p in (GOLDEN / "estimators").iterdir())
    assert size < 2_100_000
    # Every estimator but Prism's own (the main set's) has golden cases; the
    # cascade's runs at the accurate preset itself in one case.
    covered = {entry["config"]["estimator"] for entry in ENTRIES.values()}
    assert covered == set(ESTIMATORS) - {"prism"}
    preset = PrismConfig.preset("accurate", block_size=32)
    assert PrismConfig(**ENTRIES["accurate_preset"]["config"]) == preset


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_reproduces_the_committed_case(name):
    entry, cfg, t = _tensors(name)
    q, k, v = make_inputs(CASES[name])
    for key, tensor in (("q", q), ("k", k), ("v", v)):
        np.testing.assert_array_equal(tensor.float().numpy(), ARRAYS[name][key])
    mask = select_blocks(t["q"], t["k"], cfg, causal=entry["causal"])
    ties = boundary_ties(t["q"], t["k"], cfg, causal=entry["causal"])
    assert torch.equal(ties, t["ties"]) and torch.equal(mask, t["mask"])
    assert torch.equal(ties, estimator_boundary_ties(t["q"], t["k"], cfg,
                                                     causal=entry["causal"]))
    # Selective, not trivially dense: some admissible tiles are dropped.
    assert 0 < entry["selected_tiles"] < t["mask"].numel()
    out, lse = block_sparse_attention(t["q"], t["k"], t["v"], t["attn_mask"],
                                      block_size=cfg.block_size, causal=entry["causal"],
                                      scale=entry["scale"], return_lse=True)
    assert compare_attention(entry, ARRAYS[name], out.double().numpy(), lse.numpy()) == []


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_an_independent_port_passes_every_case(dtype):
    cases, mismatches = check_golden(_port(dtype=dtype), None, GOLDEN, array_kind="numpy",
                                     golden_set="estimators")
    assert cases == len(ESTIMATOR_CASES)
    assert mismatches == [], report(mismatches, cases, 0)


def test_every_misreading_has_a_knob_and_two_cases():
    assert set(KNOBS) == set(ESTIMATOR_MISREADINGS)
    for tag in ESTIMATOR_MISREADINGS:
        listing = [case.name for case in ESTIMATOR_CASES if tag in case.catches]
        assert len(listing) >= 2, (tag, listing)


@pytest.mark.parametrize("tag", sorted(KNOBS))
def test_each_misreading_fails_the_cases_that_list_it(tag):
    # Torch tensors in the cases' dtypes: the half-precision misreading needs to see bf16.
    _, mismatches = check_golden(_port(**{KNOBS[tag]: True}), None, GOLDEN,
                                 array_kind="torch", golden_set="estimators")
    failed = {m.case for m in mismatches}
    listing = {case.name for case in ESTIMATOR_CASES if tag in case.catches}
    assert listing <= failed, f"{tag}: {sorted(listing - failed)} pass with the misreading"


def test_ties_flag_an_entry_at_the_cut():
    """With the threshold set to a mass ranked before some tile, that tile is a tie."""
    case = CASES["antidiagonal_prefix"]
    q, k, _ = make_inputs(case)
    cfg = resolve_config(None, **case.config)
    layout = tile_layout(q.shape[2], k.shape[2], cfg.block_size, True)
    probs = antidiagonal_probabilities(q, k, layout, cfg.antidiagonal_stride, True)
    admissible = (probs > 0)
    _, before = top_p_select(probs, admissible, 0.5)
    # A row's third-ranked tile: its mass-before is strictly inside (0, 1).
    row = probs[0, 0, -1]
    third = torch.argsort(row, descending=True, stable=True)[2]
    threshold = float(before[0, 0, -1, third])
    at_cut = dataclasses.replace(cfg, high_threshold=threshold)
    ties = estimator_boundary_ties(q, k, at_cut, causal=True)
    assert ties[0, 0, -1, third]
    assert not estimator_boundary_ties(q, k, cfg, causal=True)[0, 0, -1, third]


def test_the_checker_runs_the_estimators_from_the_command_line(capsys):
    assert main(["prism.reference:select_blocks", "--golden", str(GOLDEN), "--examples", "3",
                 "--estimators"]) == 0
    out = capsys.readouterr().out
    assert f"{len(MANIFEST['cases']) + 34} of {len(MANIFEST['cases']) + 34} cases agree" in out
    assert main(["estimator_port:estimator_select", "--golden", str(GOLDEN), "--examples",
                 "0", "--estimators", "--arrays", "numpy"]) == 0


def test_a_wrong_estimator_port_fails_from_the_command_line(tmp_path, capsys):
    port = tmp_path / "slash_port.py"
    port.write_text("from estimator_port import estimator_select\n\n"
                    "def select(q, k, **config):\n"
                    "    return estimator_select(q, k, slash_reversed=True, **config)\n")
    assert main([f"{port}:select", "--golden", str(GOLDEN), "--examples", "0",
                 "--estimators", "--arrays", "numpy", "--save", str(tmp_path / "f")]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH [golden] vertical_slash_causal" in out and "slash_sign" in out


def test_compare_mask_reports_a_flipped_entry_outside_the_ties():
    entry, _, t = _tensors("cascade_prefix")
    flipped = ARRAYS["cascade_prefix"]["mask"].copy()
    free = np.argwhere(~ARRAYS["cascade_prefix"]["ties"])
    b, h, i, j = free[len(free) // 2]
    flipped[b, h, i, j] = not flipped[b, h, i, j]
    assert compare_mask(entry, ARRAYS["cascade_prefix"], flipped)


@pytest.mark.interpret
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_optimized_selection_agrees_outside_the_ties(name):
    """The kernels sum in other fp32 orders: the recorded ties cover what that moves."""
    from helpers import kernel_test_setup
    from prism import optimized

    interpreted, device, _ = kernel_test_setup()
    if not interpreted and not torch.cuda.is_available():
        pytest.skip("no Triton interpreter or CUDA device")
    entry, cfg, t = _tensors(name)
    mask = optimized.select_blocks(t["q"].to(device), t["k"].to(device), cfg,
                                   causal=entry["causal"])
    assert compare_mask(entry, ARRAYS[name], torch.as_tensor(mask).cpu().numpy()) == []


def test_an_independent_port_passes_random_estimator_cases():
    from prism.reference.check import check_random

    mismatches = check_random(_port(), None, max_examples=25, array_kind="numpy",
                              estimators=True)
    assert mismatches == [], report(mismatches, 0, 25)


def test_random_estimator_cases_can_fail():
    from prism.reference.check import check_random

    mismatches = check_random(_port(slash_reversed=True), None, max_examples=25,
                              array_kind="numpy", estimators=True)
    assert len(mismatches) == 1 and mismatches[0].source == "random"


def test_the_committed_cases_have_no_boundary_ties_and_the_docs_list_them():
    """docs/golden.rst says every entry is decided away from a cut, and names each case."""
    assert all(entry["boundary_ties"] == 0 for entry in ENTRIES.values())
    page = (Path(__file__).parent.parent / "docs" / "golden.rst").read_text()
    assert [name for name in ENTRIES if f"``{name}``" not in page] == []
    assert [tag for tag in ESTIMATOR_MISREADINGS if f"``{tag}``" not in page] == []
