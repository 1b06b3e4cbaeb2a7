"""Tests of ``prism.theory``: the pooling filter, its checks and the blind-spot demo.

Expected values are computed here from first principles (brute-force sums of
complex exponentials in NumPy, explicit loops over tokens), never taken from
the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from prism.theory import (
    attention_recall,
    band_energy_check,
    blind_spot_table,
    causal_density,
    compare_selections,
    cutoff_frequency,
    cutoff_table,
    full_attention_probabilities,
    mean_pooling_select,
    pooling_gain,
    pooling_identity_residuals,
    rope_frequencies,
    score_filter_residual,
    synthetic_positional_head,
)
from prism.theory.__main__ import main as theory_main
from prism.theory.plots import FIGURE_NAMES

HEAD_DIMS = st.sampled_from([2, 4, 32, 64, 96, 128])
LOG_BASES = st.floats(min_value=3.0, max_value=7.0).map(lambda e: 10.0**e)
BLOCK_SIZES = st.integers(min_value=1, max_value=512)
LAYOUTS = st.sampled_from(["half", "interleaved"])


def brute_force_gain(omega: float, block_size: int) -> complex:
    """Mean of exp(i (t - (B-1)/2) w) over t = 0..B-1: the kernel before simplification."""
    t = np.arange(block_size) - (block_size - 1) / 2.0
    return complex(np.exp(1j * t * omega).mean())


def rotate_numpy(x: np.ndarray, position: float, base: float, layout: str) -> np.ndarray:
    """RoPE of one vector written out pair by pair, independent of prism.reference."""
    d = x.shape[0]
    out = np.empty(d)
    for m in range(d // 2):
        w = base ** (-2.0 * m / d)
        i, j = (m, m + d // 2) if layout == "half" else (2 * m, 2 * m + 1)
        c, s = math.cos(position * w), math.sin(position * w)
        out[i] = x[i] * c - x[j] * s
        out[j] = x[i] * s + x[j] * c
    return out


# --- frequencies and the gain -------------------------------------------------------------


@given(head_dim=HEAD_DIMS, base=LOG_BASES)
def test_rope_frequencies_are_the_geometric_ladder(head_dim, base):
    freqs = rope_frequencies(head_dim, base)
    assert freqs.dtype == torch.float64 and freqs.shape == (head_dim // 2,)
    expected = np.array([base ** (-2.0 * m / head_dim) for m in range(head_dim // 2)])
    np.testing.assert_allclose(freqs.numpy(), expected, rtol=1e-14, atol=0)


@given(omega=st.floats(min_value=-7.0, max_value=7.0), block_size=BLOCK_SIZES)
@example(omega=0.0, block_size=512)
@example(omega=2 * math.pi, block_size=2)
@example(omega=1e-310, block_size=7)
def test_gain_is_the_real_dirichlet_mean_and_bounded(omega, block_size):
    gain = pooling_gain(omega, block_size)
    mean = brute_force_gain(omega, block_size)
    # The centred mean of unit phasors is real, and it is the signed gain.
    assert abs(mean.imag) < 1e-12
    assert abs(gain - mean.real) < 1e-12
    assert abs(gain) <= 1.0


@given(block_size=BLOCK_SIZES)
def test_gain_is_one_at_zero_and_vanishes_at_multiples_of_the_cutoff(block_size):
    assert pooling_gain(0.0, block_size) == 1.0
    k = np.arange(1, block_size)
    zeros = pooling_gain(2 * math.pi * k / block_size, block_size)
    assert np.abs(zeros).max(initial=0.0) < 1e-12
    assert cutoff_frequency(block_size) == pytest.approx(2 * math.pi / block_size, rel=1e-15)


@given(block_size=BLOCK_SIZES, turns=st.integers(min_value=0, max_value=3),
       epsilon=st.floats(min_value=1e-300, max_value=1e-9))
def test_gain_is_continuous_at_zero_and_at_full_turns(block_size, turns, epsilon):
    limit = (-1.0) ** (turns * (block_size - 1))
    for omega in (2 * math.pi * turns + epsilon, 2 * math.pi * turns - epsilon):
        # |gain - limit| <= (B^2 - 1) eps^2 / 24 + rounding of omega itself.
        assert abs(pooling_gain(omega, block_size) - limit) < 1e-12


def test_gain_returns_the_kind_it_was_given():
    omega = np.linspace(0.0, 1.0, 7)
    as_array = pooling_gain(omega, 16)
    assert isinstance(as_array, np.ndarray) and as_array.dtype == np.float64
    assert as_array.shape == (7,)
    as_float32 = pooling_gain(torch.tensor(omega, dtype=torch.float32).view(7, 1), 16)
    assert as_float32.dtype == torch.float32 and as_float32.shape == (7, 1)
    as_int_tensor = pooling_gain(torch.tensor([0, 1]), 16)
    assert as_int_tensor.dtype == torch.float64
    assert isinstance(pooling_gain(0.5, 16), float)
    np.testing.assert_allclose(as_float32.view(7).numpy(), as_array, rtol=1e-6)


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda: pooling_gain(0.1, 0), ValueError, "block_size"),
        (lambda: pooling_gain(0.1, 2.5), TypeError, "block_size"),
        (lambda: pooling_gain(float("nan"), 8), ValueError, "omega"),
        (lambda: pooling_gain(np.array([1.0, np.inf]), 8), ValueError, "omega"),
        (lambda: pooling_gain("0.1", 8), TypeError, "omega"),
        (lambda: pooling_gain(torch.tensor([1j]), 8), TypeError, "omega"),
        (lambda: rope_frequencies(127, 1e4), ValueError, "head_dim"),
        (lambda: rope_frequencies(128, 1.0), ValueError, "base"),
        (lambda: pooling_identity_residuals(8, 1e4, 4, rope_layout="gptj"), ValueError,
         "rope_layout"),
        (lambda: score_filter_residual(8, 1e4, 4, 0, 1.5), TypeError, "key_start"),
        (lambda: score_filter_residual(8, 1e4, 4, 0, 0, query_content=torch.ones(6)),
         ValueError, "query_content"),
        (lambda: band_energy_check(num_tiles=1), ValueError, "num_tiles"),
        (lambda: synthetic_positional_head(slash_pairs=40, vertical_pairs=30), ValueError,
         "slash_pairs"),
        (lambda: synthetic_positional_head(vertical_spans=((0, 4096),)), ValueError,
         "vertical_spans"),
        (lambda: mean_pooling_select(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4),
                                     threshold=0.0), ValueError, "threshold"),
        (lambda: causal_density(torch.zeros(1, 1, 2, 3, dtype=torch.bool), num_queries=256,
                                num_keys=256, block_size=128), ValueError, "block_mask"),
    ],
)
def test_bad_arguments_are_named(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- (a) pooling identity, (b) score filter, (c) band energy ------------------------------


@given(head_dim=HEAD_DIMS, base=LOG_BASES, block_size=BLOCK_SIZES,
       start=st.integers(min_value=0, max_value=2048), layout=LAYOUTS,
       seed=st.integers(min_value=0, max_value=2**16))
@example(head_dim=128, base=5e5, block_size=128, start=0, layout="half", seed=0)
@example(head_dim=2, base=1e3, block_size=1, start=0, layout="interleaved", seed=1)
def test_pooling_identity_holds_to_rounding(head_dim, base, block_size, start, layout, seed):
    # Positions stay below ~2.5e3 so that float64 rounding of the RoPE angle
    # p * w (about p * 1.1e-16 for pair 0) stays well below the tolerance.
    residuals = pooling_identity_residuals(head_dim, base, block_size, start,
                                           rope_layout=layout, seed=seed)
    assert residuals.shape == (head_dim // 2,)
    assert float(residuals.max()) <= 1e-12


def test_pooling_identity_needs_the_tile_centre():
    # The identity is sharp: content that is constant at the tile *start*
    # instead of the centre would leave an error of order one.
    head_dim, base, block_size = 16, 1e4, 64
    x = torch.randn(head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tokens = np.stack([rotate_numpy(x.numpy(), p, base, "half") for p in range(block_size)])
    at_start = rotate_numpy(x.numpy(), 0.0, base, "half")
    gains = np.array([brute_force_gain(base ** (-2.0 * m / head_dim), block_size).real
                      for m in range(head_dim // 2)])
    wrong = np.concatenate([gains, gains]) * at_start
    assert np.abs(tokens.mean(axis=0) - wrong).max() > 0.1
    assert float(pooling_identity_residuals(head_dim, base, block_size, content=x).max()) < 1e-12


@given(head_dim=HEAD_DIMS, base=LOG_BASES, block_size=st.integers(min_value=1, max_value=256),
       query_start=st.integers(min_value=0, max_value=20000),
       key_start=st.integers(min_value=0, max_value=20000), layout=LAYOUTS,
       seed=st.integers(min_value=0, max_value=2**16))
def test_score_filter_weights_each_pair_by_the_squared_gain(head_dim, base, block_size,
                                                             query_start, key_start, layout,
                                                             seed):
    check = score_filter_residual(head_dim, base, block_size, query_start, key_start,
                                  rope_layout=layout, seed=seed)
    assert check.residual <= 1e-10
    gains = np.array([brute_force_gain(base ** (-2.0 * m / head_dim), block_size).real
                      for m in range(head_dim // 2)])
    np.testing.assert_allclose(check.gains.numpy(), gains, atol=1e-12)


def test_score_filter_pooled_score_is_the_mean_of_token_scores():
    # qbar . kbar = mean over all (query, key) token pairs of q_p . k_n: an
    # independent, quadratic-cost way to get the pooled score.
    head_dim, base, block_size, qs, ks = 8, 1e4, 12, 300, 17
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(head_dim, dtype=torch.float64, generator=gen)
    b = torch.randn(head_dim, dtype=torch.float64, generator=gen)
    qs_tok = [rotate_numpy(a.numpy(), p, base, "interleaved") for p in range(qs, qs + block_size)]
    ks_tok = [rotate_numpy(b.numpy(), n, base, "interleaved") for n in range(ks, ks + block_size)]
    expected = np.mean([qv @ kv for qv in qs_tok for kv in ks_tok])
    check = score_filter_residual(head_dim, base, block_size, qs, ks, rope_layout="interleaved",
                                  query_content=a, key_content=b)
    assert check.pooled_score == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert check.predicted_score == pytest.approx(expected, rel=1e-10, abs=1e-10)


@given(base=LOG_BASES, block_size=st.sampled_from([16, 64, 128, 256]),
       head_dim=st.sampled_from([64, 128]), layout=LAYOUTS,
       seed=st.integers(min_value=0, max_value=2**16))
@example(base=5e5, block_size=128, head_dim=128, layout="half", seed=0)
def test_band_energy_matches_mean_squared_gain_within_its_error(base, block_size, head_dim,
                                                                 layout, seed):
    high, low = band_energy_check(head_dim, base, block_size, num_tiles=32, rope_layout=layout,
                                  seed=seed)
    n_pairs = head_dim // 2
    assert (high.first_pair, high.last_pair) == (0, n_pairs // 2 - 1)
    assert (low.first_pair, low.last_pair) == (n_pairs - 3 * n_pairs // 4, n_pairs - 1)
    gains_sq = np.array([brute_force_gain(base ** (-2.0 * m / head_dim), block_size).real ** 2
                         for m in range(n_pairs)])
    for band in (high, low):
        expected = gains_sq[band.first_pair:band.last_pair + 1].mean()
        assert band.mean_gain_sq == pytest.approx(expected, abs=1e-12)
        # Stated tolerance: 5 standard errors (delta method, chi-square pair energies).
        assert abs(band.measured_ratio - expected) < 5 * band.ratio_stderr
        share = expected / gains_sq.mean()
        predicted_tau = math.sqrt((band.last_pair - band.first_pair + 1) / n_pairs) * share
        assert band.predicted_tau == pytest.approx(predicted_tau, rel=1e-12)
        assert abs(math.log(band.measured_tau / predicted_tau)) < 5 * band.tau_log_stderr


def test_band_energy_tolerance_is_tight_enough_to_tell_gain_from_squared_gain():
    # If pooling scaled energy by |gain| instead of gain^2, the high band's ratio
    # would be far outside the stated error; the check has power.
    high, _ = band_energy_check(128, 5e5, 128, num_tiles=32, seed=0)
    gains = np.array([brute_force_gain(5e5 ** (-2.0 * m / 128), 128).real for m in range(32)])
    assert abs(high.measured_ratio - np.abs(gains).mean()) > 5 * high.ratio_stderr


def test_calibration_amplifies_the_filtered_band_at_the_default_setting():
    # D = 128, B = 128, base 5e5: pooling keeps under half of the high band's
    # energy and almost all of the low band's, so contract §5 scales the high band's
    # logits up by more than 2x relative to the low band's.
    high, low = band_energy_check(128, 5e5, 128, num_tiles=64, seed=1)
    assert high.mean_gain_sq < 0.5 < 0.9 < low.mean_gain_sq
    assert high.logit_gain / low.logit_gain > 2.0


def test_cutoff_table_counts_match_a_brute_force_count():
    rows = cutoff_table()
    assert len(rows) == 2 * 4 * 4
    for row in rows:
        gains = np.abs([brute_force_gain(row.base ** (-2.0 * m / row.head_dim),
                                         row.block_size).real
                        for m in range(row.head_dim // 2)])
        freqs = row.base ** (-2.0 * np.arange(row.head_dim // 2) / row.head_dim)
        assert row.cutoff == pytest.approx(2 * math.pi / row.block_size)
        assert row.pairs_below_half == int((gains < 0.5).sum())
        assert row.pairs_below_tenth == int((gains < 0.1).sum())
        assert row.pairs_above_cutoff == int((freqs >= 2 * math.pi / row.block_size).sum())
        # Beyond the cut-off only side lobes remain, all below one half.
        assert row.pairs_above_cutoff <= row.pairs_below_half


# --- the blind spot -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_comparison():
    head = synthetic_positional_head(5e5)
    results, masks = compare_selections(head, block_size=128, threshold=0.95)
    return head, {r.label: r for r in results}, masks


def test_demo_head_has_a_slash_that_carries_real_attention_mass(default_comparison):
    head, _, _ = default_comparison
    probs = full_attention_probabilities(head.q, head.k)[0, 0].numpy()
    n, offset = head.num_tokens, head.slash_offset
    rows = np.arange(offset, n)
    near = [probs[p, p - offset - 2:p - offset + 3].sum() for p in rows]
    # Within +-2 tokens of the slash sits most of each query's attention (about 60%).
    assert np.mean(near) > 0.4
    # And pooling all but erases the pairs that carry it.
    gains = np.array([brute_force_gain(5e5 ** (-2.0 * m / 128), 128).real
                      for m in head.slash_pairs])
    assert (gains**2).mean() < 0.2


def test_prism_keeps_the_slash_that_mean_pooling_loses_at_base_5e5(default_comparison):
    _, results, _ = default_comparison
    mean, prism_row = results["mean pooling"], results["prism"]
    assert mean.recall < 0.8
    assert prism_row.recall >= 0.95
    # Similar density: Prism adds about one tile per query tile (the slash's).
    assert prism_row.density - mean.density < 0.15


def test_calibration_is_what_keeps_prism_sparse(default_comparison):
    _, results, _ = default_comparison
    assert results["prism (calibrate=False)"].density > results["prism"].density + 0.1


def test_recall_and_density_match_a_loop_over_tokens(default_comparison):
    head, results, masks = default_comparison
    probs = full_attention_probabilities(head.q, head.k)[0, 0].numpy()
    mask = masks["mean pooling"][0, 0].numpy()
    n, bs = head.num_tokens, 128
    tiles = np.arange(n) // bs
    kept = probs * mask[tiles][:, tiles]
    assert results["mean pooling"].recall == pytest.approx(kept.sum(axis=1).mean(), rel=1e-9)
    admissible = np.tril(np.ones((n // bs, n // bs), dtype=bool))
    density = (mask & admissible).sum() / admissible.sum()
    assert results["mean pooling"].density == pytest.approx(density, rel=1e-12)
    # The public one-call helper agrees with the shared-probabilities path.
    recall = attention_recall(head.q, head.k, masks["mean pooling"], block_size=bs)
    assert float(recall) == pytest.approx(results["mean pooling"].recall, rel=1e-12)


def test_prism_beats_mean_pooling_at_every_base():
    rows = blind_spot_table(bases=(1e4, 1e6))
    for base in (1e4, 1e6):
        by_label = {r.label: r for r in rows if r.base == base}
        assert by_label["prism"].recall > by_label["mean pooling"].recall + 0.1


def test_mean_pooling_select_matches_a_loop_oracle():
    gen = torch.Generator().manual_seed(11)
    nq, nk, d, bs, p = 200, 330, 16, 64, 0.9
    q = torch.randn(1, 2, nq, d, generator=gen)
    k = torch.randn(1, 1, nk, d, generator=gen)
    mask = mean_pooling_select(q, k, block_size=bs, threshold=p)
    start = nk - nq
    qn, kn = q.double().numpy(), k.double().numpy()
    n_key_tiles = -(-nk // bs)
    key_means = [kn[0, 0, j * bs:min(nk, (j + 1) * bs)].mean(axis=0) for j in range(n_key_tiles)]
    first = start // bs
    for h in range(2):
        for row, tile in enumerate(range(first, (nk - 1) // bs + 1)):
            lo, hi = max(start, tile * bs), min(nk, (tile + 1) * bs)
            qbar = qn[0, h, lo - start:hi - start].mean(axis=0)
            logits = np.array([qbar @ key_means[j] / math.sqrt(d) for j in range(tile + 1)])
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            keep = set()
            mass = 0.0
            for j in sorted(range(tile + 1), key=lambda j: (-probs[j], j)):
                if mass < p:
                    keep.add(j)
                mass += probs[j]
            keep |= {0, tile}
            expected = [j in keep for j in range(n_key_tiles)]
            assert mask[0, h, row].tolist() == expected


def test_command_line_prints_tables_and_writes_figures(tmp_path, capsys):
    status = theory_main(["--plots", str(tmp_path / "figs"), "--json", str(tmp_path / "n.json")])
    out = capsys.readouterr().out
    assert status == 0
    assert "2pi/B" in out and "24 of 24 checks of the theory passed" in out
    assert "FAILED" not in out
    written = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert written == sorted(FIGURE_NAMES)
    assert all((tmp_path / "figs" / name).stat().st_size > 10_000 for name in written)
    numbers = json.loads((tmp_path / "n.json").read_text())
    assert len(numbers["checks"]) == 24 and all(c["passed"] for c in numbers["checks"])


def test_command_line_fails_only_when_a_check_of_the_theory_fails(monkeypatch, capsys):
    """A broken check gives exit status 1; the blind-spot numbers never do."""
    import prism.theory.__main__ as cli
    from prism.theory.checks import ScoreFilterCheck

    def broken(*args, **kwargs):
        return ScoreFilterCheck(pooled_score=1.0, predicted_score=0.0, pair_scores=None,
                                gains=None, residual=0.5)

    monkeypatch.setattr(cli, "score_filter_residual", broken)
    monkeypatch.setattr(cli, "blind_spot_table", lambda *args, **kwargs: [])
    assert cli.main([]) == 1
    out = capsys.readouterr().out
    assert "FAILED score filter at base 1e+04" in out
