"""prism.reference.check: a correct NumPy port passes, wrong ports are reported.

The NumPy port below is written from the contract (docs/semantics.rst) and
calls nothing from ``prism``; two knobs turn it into the two most common wrong
ports (ties to the larger index, zero-padded pooling).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prism.reference import block_sparse_attention, select_blocks
from prism.reference.check import check_golden, check_random, load_function, main, report

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _even(x):
    return 2 * int(x / 2 + 0.5)


def numpy_select(q, k, *, causal=True, block_size=128, high_dim=None, low_dim=None,
                 high_threshold=0.95, low_threshold=0.95, calibrate=True,
                 high_temperature=1.0, low_temperature=1.0, force_sink=True,
                 force_diagonal=True, rope_layout="half", eps=1e-6,
                 ties_to_larger=False, zero_pad=False, calibration_block_size=None,
                 return_bands=False):
    """Prism's tile selection in NumPy, fp32 (contract §2-§6).

    ``return_bands`` returns ``([(logits, probs), ...] per band, q_tiles,
    admissible)`` instead of the mask (the sub-tile estimator sums the
    probabilities); ``calibration_block_size`` measures the band energies on
    tiles of another size (a misreading of that estimator).
    """
    q, k = np.asarray(q, np.float32), np.asarray(k, np.float32)
    b, hq, nq, d = q.shape
    hkv, nk, bs = k.shape[1], k.shape[2], block_size
    start = nk - nq if causal else 0
    q_tiles = np.arange(start // bs, (start + nq - 1) // bs + 1) if nq else np.zeros(0, int)
    nkt = -(-nk // bs)

    def pool(x, first):
        return numpy_pooled(x, first, bs, zero_pad)

    qbar = pool(q, start)
    kbar = np.repeat(pool(k, 0), hq // hkv, axis=1)
    q_energy, k_energy = qbar, kbar
    if calibration_block_size is not None:
        q_energy, k_energy = (numpy_pooled(x, first, calibration_block_size, zero_pad)
                              for x, first in ((q, start), (k, 0)))
        k_energy = np.repeat(k_energy, hq // hkv, axis=1)
    admissible = (np.arange(nkt)[None] <= q_tiles[:, None]) if causal else \
        np.ones((len(q_tiles), nkt), bool)
    half = d // 2
    pairs = [(m, m + half) if rope_layout == "half" else (2 * m, 2 * m + 1)
             for m in range(half)]
    h = high_dim if high_dim is not None else max(2, _even(d / 2))
    l = low_dim if low_dim is not None else max(2, _even(3 * d / 4))
    bands = [(sorted(i for p in pairs[: h // 2] for i in p), high_threshold, high_temperature),
             (sorted(i for p in pairs[half - l // 2:] for i in p), low_threshold,
              low_temperature)]
    rms = lambda x: np.sqrt(np.mean(x.astype(np.float32) ** 2, axis=(-2, -1)))
    mask = np.zeros((b, hq, len(q_tiles), nkt), bool)
    if mask.size == 0 and not return_bands:
        return mask
    per_band = []
    for dims, p, temperature in bands:
        if calibrate:
            tau = (np.sqrt(len(dims) / d) * rms(q_energy[..., dims])
                   / np.maximum(rms(q_energy), eps)
                   * rms(k_energy[..., dims]) / np.maximum(rms(k_energy), eps))
            tau = np.maximum(tau, eps)[..., None, None]
        else:
            tau = temperature
        logits = qbar[..., dims] @ np.swapaxes(kbar[..., dims], -1, -2)
        logits = np.where(admissible, logits / (np.sqrt(len(dims)) * tau), -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        probs = (w / w.sum(-1, keepdims=True)).astype(np.float32)
        per_band.append((logits, probs))
        index = np.broadcast_to(np.arange(nkt), probs.shape)
        tie_key = -index if ties_to_larger else index
        order = np.lexsort((tie_key, -probs), axis=-1)
        ranked = np.take_along_axis(probs, order, -1)
        before = np.cumsum(ranked, -1, dtype=np.float32) - ranked
        keep_ranked = (ranked > 0) & ((before < p) | (p >= 1.0))
        keep = np.zeros_like(mask)
        np.put_along_axis(keep, order, keep_ranked, -1)
        mask |= keep & admissible
    if return_bands:
        return per_band, q_tiles, admissible
    if force_sink:
        mask[..., 0] = True
    if causal and force_diagonal:
        mask[..., np.arange(len(q_tiles)), q_tiles] = True
    return mask & admissible


def numpy_pooled(x, first, bs, zero_pad=False):
    """Means of the tiles of ``bs`` tokens that ``x``'s tokens (absolute positions from
    ``first``) fall in, fp32 (contract §3)."""
    x = np.asarray(x, np.float32)
    tiles = (first + np.arange(x.shape[2])) // bs
    out = np.zeros(x.shape[:2] + (len(np.unique(tiles)), x.shape[3]), np.float32)
    if x.shape[2] == 0:
        return out
    np.add.at(out, (slice(None), slice(None), tiles - tiles[0]), x)
    counts = np.bincount(tiles - tiles[0]).astype(np.float32)
    return out / (np.full_like(counts, bs) if zero_pad else counts)[:, None]


def numpy_attention(q, k, v, mask, *, block_size, causal=True, scale=None):
    """Block-sparse attention in NumPy, fp32, returning (o, lse) (contract §7)."""
    dtype = np.asarray(q).dtype
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    mask = np.asarray(mask, bool)
    b, hq, nq, d = q.shape
    nk, group = k.shape[2], hq // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    start = nk - nq if causal else 0
    pos = start + np.arange(nq)
    rows = pos // block_size - start // block_size
    allowed = mask[:, :, rows][..., np.arange(nk) // block_size]
    if causal:
        allowed = allowed & (np.arange(nk)[None] <= pos[:, None])
    k, v = np.repeat(k, group, 1), np.repeat(v, group, 1)
    s = np.where(allowed, (q @ np.swapaxes(k, -1, -2)) * np.float32(scale), -np.inf)
    top = s.max(-1, keepdims=True) if nk else np.full(s.shape[:-1] + (1,), -np.inf)
    top = np.where(np.isfinite(top), top, 0).astype(np.float32)
    w = np.exp(s - top)
    total = w.sum(-1, keepdims=True)
    o = np.where(total > 0, (w @ v) / np.where(total > 0, total, 1), 0)
    with np.errstate(divide="ignore"):
        lse = top[..., 0] + np.log(total[..., 0])
    return o.astype(dtype), lse.astype(np.float32)


def test_a_correct_numpy_port_passes_the_golden_set():
    cases, mismatches = check_golden(numpy_select, numpy_attention, GOLDEN, "numpy")
    assert cases == 34
    assert mismatches == [], report(mismatches, cases, 0)


def test_the_reference_passes_through_the_command_line(capsys):
    status = main(["prism.reference:select_blocks", "--attention",
                   "prism.reference:block_sparse_attention", "--golden", str(GOLDEN),
                   "--examples", "5"])
    assert status == 0
    assert "34 of 34 cases agree" in capsys.readouterr().out


def test_a_correct_numpy_port_passes_random_cases():
    assert check_random(numpy_select, numpy_attention, max_examples=15,
                        array_kind="numpy") == []


@pytest.mark.parametrize("knob,expected_case", [("ties_to_larger", "exact_ties"),
                                                ("zero_pad", "kv_prefix")])
def test_wrong_ports_are_reported_on_golden_cases(knob, expected_case, tmp_path):
    def wrong(q, k, **kwargs):
        return numpy_select(q, k, **kwargs, **{knob: True})

    cases, mismatches = check_golden(wrong, None, GOLDEN, "numpy", save_dir=tmp_path)
    names = {m.case for m in mismatches}
    assert expected_case in names and len(names) >= 2
    found = next(m for m in mismatches if m.case == expected_case)
    assert any("outside the boundary ties" in p for p in found.problems)
    assert Path(found.saved).exists() and "GoldenCase(" in found.reproducer
    text = report(mismatches, cases, 0)
    assert f"MISMATCH [golden] {expected_case}" in text


def test_random_cases_find_and_shrink_a_wrong_port(tmp_path):
    def zero_padded(q, k, **kwargs):
        return numpy_select(q, k, zero_pad=True, **kwargs)

    mismatches = check_random(zero_padded, None, max_examples=40, array_kind="numpy",
                              save_dir=tmp_path, select_spec="myport:select")
    assert len(mismatches) == 1
    m = mismatches[0]
    assert m.source == "random" and Path(m.saved).exists()
    assert "GoldenCase(" in m.reproducer and "from myport import select" in m.reproducer
    # The reproducer's code rebuilds a case on which the port is wrong.
    scope: dict = {}
    exec(m.reproducer.split("from myport")[0], scope)  # noqa: S102 - our own generated code
    q, k = scope["q"], scope["k"]
    mask = zero_padded(q.float().numpy(), k.float().numpy(), causal=m.entry["causal"],
                       **m.entry["config"])
    assert ((torch.from_numpy(mask) != scope["expected"]) & ~scope["ties"]).any()


def test_a_wrong_attention_is_reported():
    def log2_lse(q, k, v, mask, **kwargs):
        o, lse = numpy_attention(q, k, v, mask, **kwargs)
        return o, lse / math.log(2)

    _, mismatches = check_golden(None, log2_lse, GOLDEN, "numpy")
    assert len(mismatches) >= 20
    assert all("lse differs" in " ".join(m.problems) for m in mismatches)


def test_command_line_exit_status_and_file_ports(tmp_path, capsys):
    port = tmp_path / "wrongport.py"
    port.write_text(
        "from prism.reference import select_blocks\n"
        "def select(q, k, **kw):\n"
        "    kw['force_sink'] = False\n"
        "    return select_blocks(q, k, **kw)\n")
    status = main([f"{port}:select", "--golden", str(GOLDEN), "--examples", "0",
                   "--save", str(tmp_path / "out")])
    assert status == 1
    out = capsys.readouterr().out
    assert "MISMATCH [golden]" in out and "reproducer" in out
    assert load_function("prism.reference:select_blocks") is select_blocks
    with pytest.raises(ValueError, match="module:function"):
        load_function("prism.reference.select_blocks")


@pytest.mark.parametrize("target, words", [
    ("{port}:nope", "has no attribute 'nope'"),
    ("{missing}:select", "no such file"),
    ("no_such_module_xyz:select", "cannot import module 'no_such_module_xyz'"),
])
def test_bad_port_targets_are_usage_errors(tmp_path, capsys, target, words):
    port = tmp_path / "port.py"
    port.write_text("def select(q, k, **kw):\n    raise AssertionError('never called')\n")
    spec = target.format(port=port, missing=tmp_path / "missing.py")
    with pytest.raises(SystemExit) as exit_info:
        main([spec, "--examples", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_checker_accepts_attention_without_lse():
    def out_only(q, k, v, mask, *, block_size, causal=True, scale=None):
        return block_sparse_attention(q, k, v, mask, block_size=block_size, causal=causal,
                                      scale=scale)

    _, mismatches = check_golden(None, out_only, GOLDEN)
    assert mismatches == []


def test_a_float64_loop_port_passes_the_golden_set():
    """Computing in float64 instead of fp32 is within the contract's ties and tolerances."""
    from helpers import oracle_attention, oracle_select

    def select(q, k, *, causal=True, **config):
        return oracle_select(q, k, causal=causal, **config)

    def attention(q, k, v, mask, *, block_size, causal=True, scale=None):
        o, lse = oracle_attention(q, k, v, mask, block_size=block_size, causal=causal,
                                  scale=scale)
        return o.to(q.dtype), lse

    cases, mismatches = check_golden(select, attention, GOLDEN)
    assert mismatches == [], report(mismatches, cases, 0)
