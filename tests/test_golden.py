"""The committed golden vectors (tests/golden/) against the reference, and their generator.

The committed files were written once by ``python -m prism.reference.golden``;
if the reference's semantics drift, the masks or outputs computed here stop
matching them. Outputs are recomputed on the committed mask, so an output
check never depends on a boundary tie.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import relative_error
from prism.reference import (
    PrismConfig,
    block_sparse_attention,
    boundary_ties,
    mask_differences,
    prism_attention,
    select_blocks,
)
from prism.reference.golden import CASES, FORMAT_VERSION, load_golden, write_golden

GOLDEN = Path(__file__).parent / "golden"
MANIFEST, ARRAYS = load_golden(GOLDEN)
CASE_ENTRIES = {entry["name"]: entry for entry in MANIFEST["cases"]}


def _case(name):
    entry = CASE_ENTRIES[name]
    tensors = {key: torch.from_numpy(value) for key, value in ARRAYS[name].items()}
    return entry, PrismConfig(**entry["config"]), tensors


def test_committed_set_is_small_and_versioned():
    size = sum(p.stat().st_size for p in GOLDEN.iterdir())
    assert size < 1_000_000
    assert MANIFEST["format_version"] == FORMAT_VERSION
    assert set(CASE_ENTRIES) == {case.name for case in CASES}


def test_committed_set_covers_the_required_situations():
    entries = list(CASE_ENTRIES.values())
    assert {e["config"]["rope_layout"] for e in entries} == {"half", "interleaved"}
    assert any(not e["causal"] for e in entries)
    # GQA: more query heads than KV heads.
    assert any(e["shapes"]["q"][1] > e["shapes"]["k"][1] for e in entries)
    # A KV prefix that is not a tile multiple, and a partial last tile.
    assert any(e["causal"] and (e["shapes"]["k"][2] - e["shapes"]["q"][2])
               % e["config"]["block_size"] for e in entries)
    assert any(e["shapes"]["k"][2] % e["config"]["block_size"] for e in entries)
    # Selections are neither empty nor full, so a wrong rule shows.
    for e in entries:
        assert 0 < e["selected_tiles"] < np.prod(e["shapes"]["mask"])


@pytest.mark.parametrize("name", sorted(CASE_ENTRIES))
def test_shapes_match_the_manifest(name):
    entry, _, tensors = _case(name)
    for key, tensor in tensors.items():
        assert list(tensor.shape) == entry["shapes"][key], key
        assert str(tensor.numpy().dtype) == entry["dtypes"][key], key


@pytest.mark.parametrize("name", sorted(CASE_ENTRIES))
def test_reference_reproduces_masks(name):
    entry, cfg, t = _case(name)
    mask = select_blocks(t["q"], t["k"], cfg, causal=entry["causal"])
    ties = boundary_ties(t["q"], t["k"], cfg, causal=entry["causal"]) | t["ties"]
    assert mask_differences(mask, t["mask"], ties).numel() == 0
    assert int(t["mask"].sum()) == entry["selected_tiles"]


@pytest.mark.parametrize("name", sorted(CASE_ENTRIES))
def test_reference_reproduces_outputs_and_lse(name):
    entry, cfg, t = _case(name)
    out, lse = block_sparse_attention(t["q"], t["k"], t["v"], t["mask"],
                                      block_size=cfg.block_size, causal=entry["causal"],
                                      scale=entry["scale"], return_lse=True)
    assert relative_error(out, t["out"]) <= 1e-5
    assert relative_error(lse, t["lse"]) <= 1e-5
    # End to end as well (its own mask equals the committed one up to ties).
    o2 = prism_attention(t["q"], t["k"], t["v"], cfg, causal=entry["causal"],
                         scale=entry["scale"])
    assert relative_error(o2, t["out"]) <= 1e-5


def test_expected_outputs_are_not_trivial():
    """Guard the set itself: outputs are non-zero and masks change them."""
    for name in CASE_ENTRIES:
        entry, cfg, t = _case(name)
        assert t["out"].abs().max() > 0.1
        dense = torch.ones_like(t["mask"])
        out_dense = block_sparse_attention(t["q"], t["k"], t["v"], dense,
                                           block_size=cfg.block_size, causal=entry["causal"],
                                           scale=entry["scale"])
        assert relative_error(out_dense, t["out"]) > 1e-3, name


def test_load_golden_rejects_edited_arrays(tmp_path):
    for path in GOLDEN.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    data = bytearray((tmp_path / "cases.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "cases.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_golden(tmp_path)


def test_load_golden_rejects_unknown_format(tmp_path):
    for path in GOLDEN.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version"):
        load_golden(tmp_path)


def test_module_entry_point_writes_the_same_set(tmp_path):
    result = subprocess.run([sys.executable, "-m", "prism.reference.golden", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    manifest, arrays = load_golden(tmp_path)
    assert [e["name"] for e in manifest["cases"]] == [e["name"] for e in MANIFEST["cases"]]
    for entry in manifest["cases"]:
        committed = CASE_ENTRIES[entry["name"]]
        assert entry["shapes"] == committed["shapes"]
        assert entry["config"] == committed["config"]
        fresh = arrays[entry["name"]]
        # Same seeds give the same inputs, hence the same expectations.
        for key in ("q", "k", "v"):
            np.testing.assert_allclose(fresh[key], ARRAYS[entry["name"]][key], atol=1e-6)
        np.testing.assert_array_equal(fresh["mask"], ARRAYS[entry["name"]]["mask"])


def test_write_golden_subset(tmp_path):
    manifest_path = write_golden(tmp_path, cases=CASES[:1])
    manifest, arrays = load_golden(tmp_path)
    assert manifest_path.name == "manifest.json"
    assert list(arrays) == [CASES[0].name]
    assert set(arrays[CASES[0].name]) == {"q", "k", "v", "mask", "ties", "out", "lse"}
