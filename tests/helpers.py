"""Test helpers: input factories, an independent loop oracle, error measures.

The oracle below is written from the contract's text (docs/semantics.rst) in
plain Python/NumPy loops, in float64, without calling any stage of
``prism.reference``. Comparing the vectorised reference against it checks the
reference, not a copy of itself.

The tolerance table lives here, once, for every test: ``TOLERANCES`` maps a
dtype to ``(atol, rtol)`` and ``attention_tolerance`` gives the contract's
logit-scaled bounds on ``o`` and ``lse`` (contract §10).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from prism.reference import apply_rope
from prism.reference.tolerances import (
    RTOL,
    attention_errors,
    attention_tolerances,
    lse_magnitude,
)

#: The one tolerance table of the tests: dtype -> (atol, rtol), for values of
#: order one (contract §10). The numbers come from prism.reference.tolerances.
TOLERANCES = {
    torch.float32: (RTOL["float32"], RTOL["float32"]),
    torch.float16: (RTOL["float16"], RTOL["float16"]),
    torch.bfloat16: (RTOL["bfloat16"], RTOL["bfloat16"]),
}
#: The relative column of ``TOLERANCES``, for ``relative_error`` checks.
TOLERANCE = {dtype: rtol for dtype, (_, rtol) in TOLERANCES.items()}


def attention_tolerance(q, k, v, scale=None, **kwargs) -> dict[str, float]:
    """Contract §10's absolute tolerances on ``o`` and ``lse`` for these inputs."""
    return attention_tolerances(q, k, v, scale, **kwargs)


def assert_attention_close(out, lse, expected_out, expected_lse, q, k, v, scale=None):
    """Assert ``out``/``lse`` lie within contract §10's tolerances of the expectation.

    The bound on ``lse`` reads ``max|lse_ref|`` from ``expected_lse``, as §10 states.
    """
    magnitude = None if expected_lse is None else lse_magnitude(expected_lse)
    tol = attention_tolerance(q, k, v, scale, lse_magnitude=magnitude)
    err = attention_errors(out, lse, expected_out, expected_lse)
    assert err["out"] <= tol["out"], f"out error {err['out']:.3g} > {tol['out']:.3g}"
    if lse is not None:
        assert err["lse"] <= tol["lse"], f"lse error {err['lse']:.3g} > {tol['lse']:.3g}"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Scale-free error: max |a - e| / max |e| (0 when both are zero)."""
    actual = actual.double()
    expected = expected.double()
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)):
        return math.inf
    if not torch.equal(actual[~finite], expected[~finite]):
        return math.inf
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    diff = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    return diff / scale if scale > 0 else diff


def make_qkv(batch, q_heads, kv_heads, nq, nk, head_dim, *, base=10000.0, layout="half",
             dtype=torch.float32, seed=0, causal=True, value_dim=None, sharpness=1.0):
    """RoPE'd random q, k, v with a little shared content so scores are not flat."""
    gen = torch.Generator().manual_seed(seed)
    value_dim = head_dim if value_dim is None else value_dim
    topic = torch.randn(batch, kv_heads, 1, head_dim, generator=gen)
    q = torch.randn(batch, q_heads, nq, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, nk, head_dim, generator=gen) + 0.5 * topic
    q = q + 0.5 * topic.repeat_interleave(q_heads // kv_heads, dim=1)
    v = torch.randn(batch, kv_heads, nk, value_dim, generator=gen)
    start = nk - nq if causal else 0
    q = apply_rope(q * sharpness, base, rope_layout=layout, start=start)
    k = apply_rope(k, base, rope_layout=layout, start=0)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# --------------------------------------------------------------------------
# Loop oracle for contract sections 3-6, float64.
# --------------------------------------------------------------------------

def _band_dims(head_dim, width, layout, high):
    pairs = range(width // 2) if high else range(head_dim // 2 - width // 2, head_dim // 2)
    dims = []
    for m in pairs:
        dims += [m, m + head_dim // 2] if layout == "half" else [2 * m, 2 * m + 1]
    return sorted(dims)


def _tile_means(x, start, bs):
    """x: (N, D) float64 rows at absolute positions start..; returns {tile: mean}."""
    tiles = {}
    for r in range(x.shape[0]):
        tiles.setdefault((start + r) // bs, []).append(x[r])
    return {t: np.mean(rows, axis=0) for t, rows in tiles.items()}


def oracle_select(q, k, *, block_size=128, high_dim=None, low_dim=None, high_threshold=0.95,
                  low_threshold=0.95, calibrate=True, high_temperature=1.0,
                  low_temperature=1.0, force_sink=True, force_diagonal=True,
                  rope_layout="half", eps=1e-6, causal=True):
    """Prism's mask by the contract, one row at a time. Returns a bool numpy array."""
    q = q.double().numpy()
    k = k.double().numpy()
    b_size, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    bs = block_size
    h = high_dim if high_dim is not None else 2 * int(d / 4 + 0.5)
    l = low_dim if low_dim is not None else 2 * int(3 * d / 8 + 0.5)
    bands = [
        (_band_dims(d, h, rope_layout, True), high_threshold, high_temperature),
        (_band_dims(d, l, rope_layout, False), low_threshold, low_temperature),
    ]
    start = nk - nq if causal else 0
    q_tiles = list(range(start // bs, (start + nq - 1) // bs + 1)) if nq else []
    n_key_tiles = -(-nk // bs)
    out = np.zeros((b_size, hq, len(q_tiles), n_key_tiles), dtype=bool)
    for b in range(b_size):
        for head in range(hq):
            kv = head // (hq // hkv)
            qm = _tile_means(q[b, head], start, bs)
            km = _tile_means(k[b, kv], 0, bs)
            qbar = np.stack([qm[t] for t in q_tiles]) if q_tiles else np.zeros((0, d))
            kbar = np.stack([km[t] for t in range(n_key_tiles)]) if nk else np.zeros((0, d))
            for row, qt in enumerate(q_tiles):
                admissible = [j for j in range(n_key_tiles) if (not causal or j <= qt)]
                chosen = set()
                for dims, p, temperature in bands:
                    if calibrate:
                        rms = lambda a: math.sqrt(np.mean(a ** 2)) if a.size else 0.0
                        tau = (math.sqrt(len(dims) / d)
                               * rms(qbar[:, dims]) / max(rms(qbar), eps)
                               * rms(kbar[:, dims]) / max(rms(kbar), eps))
                        tau = max(tau, eps)
                    else:
                        tau = temperature
                    logits = {j: float(qbar[row, dims] @ kbar[j, dims]) / (math.sqrt(len(dims))
                                                                           * tau)
                              for j in admissible}
                    if not logits:
                        continue
                    top = max(logits.values())
                    weights = {j: math.exp(s - top) for j, s in logits.items()}
                    total = sum(weights.values())
                    probs = {j: w / total for j, w in weights.items()}
                    ranked = sorted(admissible, key=lambda j: (-probs[j], j))
                    mass = 0.0
                    for j in ranked:
                        if probs[j] > 0 and (mass < p or p >= 1.0):
                            chosen.add(j)
                        mass += probs[j]
                if force_sink and n_key_tiles:
                    chosen.add(0)
                if causal and force_diagonal:
                    chosen.add(qt)
                for j in chosen:
                    out[b, head, row, j] = True
    return out


def oracle_attention(q, k, v, block_mask, *, block_size, causal=True, scale=None):
    """Token-level masked softmax by contract §7, row by row in float64.

    Returns (o, lse) as float64 tensors.
    """
    b_size, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    start = nk - nq if causal else 0
    first_tile = start // block_size
    mask = block_mask.expand(b_size, hq, -1, -1)
    o = torch.zeros(b_size, hq, nq, dv, dtype=torch.float64)
    lse = torch.full((b_size, hq, nq), -math.inf, dtype=torch.float64)
    for b in range(b_size):
        for head in range(hq):
            kv = head // (hq // hkv)
            for r in range(nq):
                pos = start + r
                keys = [n for n in range(nk)
                        if bool(mask[b, head, pos // block_size - first_tile, n // block_size])
                        and (not causal or n <= pos)]
                if not keys:
                    continue
                idx = torch.tensor(keys)
                scores = (k[b, kv, idx].double() @ q[b, head, r].double()) * scale
                lse[b, head, r] = torch.logsumexp(scores, 0)
                o[b, head, r] = torch.softmax(scores, 0) @ v[b, kv, idx].double()
    return o, lse


def count_shape_checks(monkeypatch) -> list:
    """Record every call of the shared q/k shape check (``prism.reference.validation``):
    the returned list gets one entry (``causal``) per call."""
    from prism.reference import validation

    calls = []
    original = validation._check_qk

    def counting(q, k, causal):
        calls.append(causal)
        return original(q, k, causal)

    monkeypatch.setattr(validation, "_check_qk", counting)
    return calls


def kernel_test_setup():
    """``(INTERPRETED, DEVICE, pytestmark)`` of a test file that runs the Triton kernels:
    in Triton's interpreter on the CPU when it is on (CI), else on CUDA; marked
    ``interpret`` and skipped when neither is there."""
    import pytest

    from prism.optimized._runtime import kernels_interpreted
    from prism.optimized.attention import _sparse_attention_kernel

    interpreted = kernels_interpreted(_sparse_attention_kernel)
    marks = [pytest.mark.interpret,
             pytest.mark.skipif(not interpreted and not torch.cuda.is_available(),
                                reason="triton was imported without its interpreter and there "
                                       "is no GPU")]
    return interpreted, "cpu" if interpreted else "cuda", marks


def golden_case_tensors(entry: dict, arrays: dict):
    """``(entry, PrismConfig, tensors)`` of one case of a loaded golden set: its arrays
    as torch tensors, q, k and v in the case's dtype."""
    from prism.reference import PrismConfig

    dtype = getattr(torch, entry["dtype"])
    tensors = {key: torch.from_numpy(value) for key, value in arrays.items()}
    for key in ("q", "k", "v"):
        tensors[key] = tensors[key].to(dtype)
    return entry, PrismConfig(**entry["config"]), tensors
