"""The committed golden vectors (tests/golden/) against the reference, and their writer.

The committed files were written by ``python -m prism.reference.golden_writer``;
if the reference's semantics drift, the masks or outputs computed here stop
matching them. Outputs are recomputed on the committed attention mask, so an
output check never depends on a boundary tie.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import golden_case_tensors
from prism.reference import (
    block_sparse_attention,
    boundary_ties,
    mask_differences,
    prism_attention,
    select_blocks,
)
from prism.reference.golden import (
    FORMAT_VERSION,
    compare_attention,
    compare_mask,
    load_golden,
)
from prism.reference.golden_cases import CASES, make_inputs
from prism.reference.golden_writer import write_golden
from prism.reference.tolerances import RTOL

GOLDEN = Path(__file__).parent / "golden"
MANIFEST, ARRAYS = load_golden(GOLDEN)
CASE_ENTRIES = {entry["name"]: entry for entry in MANIFEST["cases"]}
CASES_BY_NAME = {case.name: case for case in CASES}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra threads only add start-up cost on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _case(name):
    return golden_case_tensors(CASE_ENTRIES[name], ARRAYS[name])


def test_committed_set_is_small_and_versioned():
    size = sum(p.stat().st_size for p in GOLDEN.iterdir())
    assert size < 1_500_000
    assert MANIFEST["format_version"] == FORMAT_VERSION == 2
    assert set(CASE_ENTRIES) == set(CASES_BY_NAME)
    assert MANIFEST["rtol"] == RTOL
    assert "semantics.rst" in MANIFEST["semantics"]


def test_committed_set_covers_the_required_situations():
    entries = list(CASE_ENTRIES.values())
    assert {e["config"]["rope_layout"] for e in entries} == {"half", "interleaved"}
    assert {e["dtype"] for e in entries} == {"float32", "float16", "bfloat16"}
    assert any(e["config"]["high_threshold"] == 1.0 for e in entries)
    assert any(e["rope_base"] != 1e4 for e in entries)
    assert any(e["shapes"]["q"][2] == 0 for e in entries)
    assert any(not e["causal"] and e["shapes"]["q"][2] > e["shapes"]["k"][2] for e in entries)
    assert any(e["shapes"]["k"][1] > 1 and e["shapes"]["q"][1] > e["shapes"]["k"][1]
               for e in entries)
    assert any(np.isneginf(ARRAYS[e["name"]]["lse"]).any() for e in entries)
    assert any(e["boundary_ties"] > 0 for e in entries)
    # Selections are neither empty nor full where there is anything to select.
    for e in entries:
        if np.prod(e["shapes"]["mask"]):
            assert 0 < e["selected_tiles"] < np.prod(e["shapes"]["mask"]), e["name"]


@pytest.mark.parametrize("name", sorted(CASES_BY_NAME))
def test_inputs_are_rebuilt_from_the_seed(name):
    q, k, v = make_inputs(CASES_BY_NAME[name])
    for key, tensor in (("q", q), ("k", k), ("v", v)):
        np.testing.assert_array_equal(tensor.float().numpy(), ARRAYS[name][key])
        assert list(tensor.shape) == CASE_ENTRIES[name]["shapes"][key]


@pytest.mark.parametrize("name", sorted(CASE_ENTRIES))
def test_reference_reproduces_masks(name):
    entry, cfg, t = _case(name)
    mask = select_blocks(t["q"], t["k"], cfg, causal=entry["causal"])
    ties = boundary_ties(t["q"], t["k"], cfg, causal=entry["causal"])
    assert torch.equal(ties, t["ties"])
    assert mask_differences(mask, t["mask"], ties).numel() == 0
    assert compare_mask(entry, ARRAYS[name], mask.numpy()) == []
    assert int(t["mask"].sum()) == entry["selected_tiles"]


@pytest.mark.parametrize("name", sorted(CASE_ENTRIES))
def test_reference_reproduces_outputs_and_lse(name):
    entry, cfg, t = _case(name)
    out, lse = block_sparse_attention(t["q"], t["k"], t["v"], t["attn_mask"],
                                      block_size=cfg.block_size, causal=entry["causal"],
                                      scale=entry["scale"], return_lse=True)
    assert out.dtype == t["q"].dtype
    assert compare_attention(entry, ARRAYS[name], out.double().numpy(), lse.numpy()) == []
    if not entry["empty_rows"]:
        o2 = prism_attention(t["q"], t["k"], t["v"], cfg, causal=entry["causal"],
                             scale=entry["scale"])
        assert compare_attention(entry, ARRAYS[name], o2.double().numpy()) == []


def test_comparisons_can_fail():
    entry, _, t = _case("kv_prefix")
    arrays = ARRAYS["kv_prefix"]
    flipped = arrays["mask"].copy()
    flipped[0, 0, -1, 1] = not flipped[0, 0, -1, 1]
    assert compare_mask(entry, arrays, flipped)
    assert compare_mask(entry, arrays, flipped[:, :, 1:])
    out = arrays["out"].astype(np.float64) + 2 * entry["tolerance"]["out"]
    assert compare_attention(entry, arrays, out, arrays["lse"])
    lse = arrays["lse"].copy()
    lse[0, 0, 0] = -np.inf
    assert compare_attention(entry, arrays, arrays["out"], lse)


def test_expected_outputs_are_not_trivial():
    """Guard the set itself: outputs are non-zero and masks change them."""
    for name in CASE_ENTRIES:
        entry, cfg, t = _case(name)
        if not t["out"].numel() or not t["k"].shape[2] or entry["input_kind"] == "constant":
            continue  # nothing to attend to, or (equal content) every mask gives similar o
        assert t["out"].abs().max() > 0.1
        dense = torch.ones_like(t["attn_mask"])
        out_dense = block_sparse_attention(t["q"], t["k"], t["v"], dense,
                                           block_size=cfg.block_size, causal=entry["causal"],
                                           scale=entry["scale"])
        assert compare_attention(entry, ARRAYS[name], out_dense.double().numpy()), name


def test_manifest_tolerances_follow_the_formula():
    for entry in MANIFEST["cases"]:
        a = ARRAYS[entry["name"]]
        v_max = float(np.abs(a["v"]).max()) if a["v"].size else 0.0
        bound = 0.0 if entry["exact_logits"] else entry["logit_bound"]
        expected = v_max * (RTOL[entry["dtype"]] + RTOL["float32"] * bound)
        assert entry["tolerance"]["out"] == pytest.approx(expected, rel=1e-9, abs=1e-30)


def test_load_golden_rejects_edited_arrays(tmp_path):
    for path in GOLDEN.glob("*.*"):  # the set's files (estimators/ is a set of its own)
        (tmp_path / path.name).write_bytes(path.read_bytes())
    data = bytearray((tmp_path / "cases.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "cases.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_golden(tmp_path)


def test_load_golden_rejects_unknown_format(tmp_path):
    for path in GOLDEN.glob("*.*"):  # the set's files (estimators/ is a set of its own)
        (tmp_path / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version"):
        load_golden(tmp_path)


def test_write_golden_subset_equals_the_committed_cases(tmp_path):
    names = ["kv_prefix", "empty_rows", "no_queries"]
    manifest_path = write_golden(tmp_path, cases=[CASES_BY_NAME[n] for n in names])
    manifest, arrays = load_golden(tmp_path)
    assert manifest_path.name == "manifest.json" and list(arrays) == names
    for entry in manifest["cases"]:
        committed = CASE_ENTRIES[entry["name"]]
        assert entry["config"] == committed["config"] and entry["shapes"] == committed["shapes"]
        for key in ("q", "mask", "ties", "attn_mask"):
            np.testing.assert_array_equal(arrays[entry["name"]][key], ARRAYS[entry["name"]][key])
        assert set(arrays[entry["name"]]) == {"q", "k", "v", "mask", "ties", "attn_mask",
                                              "out", "lse"}


def test_old_module_command_still_writes_a_set():
    result = subprocess.run([sys.executable, "-m", "prism.reference.golden", "--help"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and "out_dir" in result.stdout, result.stderr


def test_the_docs_list_every_case():
    page = (Path(__file__).parent.parent / "docs" / "golden.rst").read_text()
    missing = [name for name in CASE_ENTRIES if f"``{name}``" not in page]
    assert missing == []
