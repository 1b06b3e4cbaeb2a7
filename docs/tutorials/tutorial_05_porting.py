"""
Porting Prism: the reference as a correctness oracle
=====================================================

Suppose you are porting Prism to another framework. How do you know the port
is right? This tutorial writes a complete port in plain NumPy, from the
contract (:doc:`../semantics`) alone, and checks it the way every port should
be checked: with the port checker, ``python -m prism.reference.check``, which
runs the port on the golden set (:doc:`../golden`) and on cases that
hypothesis generates, and prints a minimal reproducer for every mismatch.

The rules it applies:

1. masks must be equal except on *boundary ties* (contract §6.5), entries on
   which two correct implementations may round differently;
2. outputs and log-sum-exps must lie within the tolerances of contract §10,
   which grow with the largest logit the inputs can produce.
"""

# %%
# A NumPy port, written from the contract
# ---------------------------------------
# Everything runs in float32. The code follows the contract section by
# section and calls nothing from ``prism``.

import math

import numpy as np


def even(x):
    """Nearest even integer, halves rounded up (contract §4): even(9) = 10."""
    return 2 * int(x / 2 + 0.5)


def numpy_select_blocks(q, k, *, causal=True, block_size=128, high_dim=None, low_dim=None,
                        high_threshold=0.95, low_threshold=0.95, calibrate=True,
                        high_temperature=1.0, low_temperature=1.0, force_sink=True,
                        force_diagonal=True, rope_layout="half", eps=1e-6,
                        zero_padded=False):
    """q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D) arrays -> bool tile mask.

    ``zero_padded=True`` plants the paper code's pooling bug, for the demo below.
    """
    q, k = np.asarray(q, np.float32), np.asarray(k, np.float32)
    b, hq, nq, d = q.shape
    hkv, nk, bs = k.shape[1], k.shape[2], block_size
    start = nk - nq if causal else 0  # §2: causal queries are the last Nq positions
    q_tiles = np.arange(start // bs, (start + nq - 1) // bs + 1) if nq else np.zeros(0, int)
    nkt = -(-nk // bs)
    mask = np.zeros((b, hq, len(q_tiles), nkt), bool)
    if mask.size == 0:
        return mask

    def pool(x, first):  # §3: mean over the tokens a tile really holds
        tiles = (first + np.arange(x.shape[2])) // bs
        tiles -= tiles[0]
        sums = np.zeros(x.shape[:2] + (tiles[-1] + 1, d), np.float32)
        np.add.at(sums, (slice(None), slice(None), tiles), x)
        counts = np.bincount(tiles).astype(np.float32)
        return sums / (np.full_like(counts, bs) if zero_padded else counts)[:, None]

    qbar = pool(q, start)
    kbar = np.repeat(pool(k, 0), hq // hkv, axis=1)  # §2: head h reads KV head h // G
    if causal:  # §6.2: key tile j <= the query tile's absolute index
        admissible = np.arange(nkt)[None] <= q_tiles[:, None]
    else:
        admissible = np.ones((len(q_tiles), nkt), bool)
    half = d // 2
    pairs = [(m, m + half) if rope_layout == "half" else (2 * m, 2 * m + 1)
             for m in range(half)]
    h = high_dim if high_dim is not None else max(2, even(d / 2))
    l = low_dim if low_dim is not None else max(2, even(3 * d / 4))
    bands = [(sorted(i for p in pairs[: h // 2] for i in p), high_threshold, high_temperature),
             (sorted(i for p in pairs[half - l // 2:] for i in p), low_threshold,
              low_temperature)]

    def rms(x):  # §5: every tile counts once
        return np.sqrt(np.mean(x ** 2, axis=(-2, -1)))

    for dims, p, temperature in bands:
        if calibrate:  # §5: the temperatures are ignored
            tau = (np.sqrt(len(dims) / d) * rms(qbar[..., dims]) / np.maximum(rms(qbar), eps)
                   * rms(kbar[..., dims]) / np.maximum(rms(kbar), eps))
            tau = np.maximum(tau, eps)[..., None, None]
        else:
            tau = temperature
        logits = qbar[..., dims] @ np.swapaxes(kbar[..., dims], -1, -2)
        logits = np.where(admissible, logits / (np.sqrt(len(dims)) * tau), -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        probs = (w / w.sum(-1, keepdims=True)).astype(np.float32)
        order = np.argsort(-probs, axis=-1, kind="stable")  # §6.3: ties to the smaller index
        ranked = np.take_along_axis(probs, order, -1)
        before = np.cumsum(ranked, -1, dtype=np.float32) - ranked
        keep_ranked = (ranked > 0) & ((before < p) | (p >= 1.0))
        keep = np.zeros_like(mask)
        np.put_along_axis(keep, order, keep_ranked, -1)
        mask |= keep
    if force_sink:  # §6.4
        mask[..., 0] = True
    if causal and force_diagonal:
        mask[..., np.arange(len(q_tiles)), q_tiles] = True
    return mask & admissible


def numpy_block_sparse_attention(q, k, v, mask, *, block_size=128, causal=True, scale=None):
    """§7: token-level masked softmax; returns (o in q's dtype, lse in float32)."""
    dtype = np.asarray(q).dtype
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    b, hq, nq, d = q.shape
    nk, group = k.shape[2], hq // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    start = nk - nq if causal else 0
    pos = start + np.arange(nq)
    rows = pos // block_size - start // block_size
    allowed = np.asarray(mask, bool)[:, :, rows][..., np.arange(nk) // block_size]
    if causal:
        allowed = allowed & (np.arange(nk)[None] <= pos[:, None])
    k, v = np.repeat(k, group, 1), np.repeat(v, group, 1)
    s = np.where(allowed, (q @ np.swapaxes(k, -1, -2)) * np.float32(scale), -np.inf)
    top = s.max(-1, keepdims=True) if nk else np.full((b, hq, nq, 1), -np.inf, np.float32)
    top = np.where(np.isfinite(top), top, 0).astype(np.float32)  # rows that read nothing
    w = np.exp(s - top)  # the row maximum, not an fp32 lse: exact at large logits
    total = w.sum(-1, keepdims=True)
    o = np.where(total > 0, (w @ v) / np.where(total > 0, total, 1), 0)
    with np.errstate(divide="ignore"):
        lse = top[..., 0] + np.log(total[..., 0])  # log 0 = -inf
    return o.astype(dtype), lse.astype(np.float32)


# %%
# Run the checker
# ---------------
# From a shell, the check is one command (the port's functions are named as
# ``module:function`` or ``file.py:function``)::
#
#     python -m prism.reference.check myport.py:numpy_select_blocks \
#         --attention myport.py:numpy_block_sparse_attention --arrays numpy
#
# Here we call the same functions from Python. ``check_golden`` runs every
# golden case; ``check_random`` runs cases that hypothesis generates and
# shrinks a failure to a minimal one.

import torch  # noqa: E402

from prism.reference.check import check_golden, check_random, report  # noqa: E402

torch.set_num_threads(1)
cases, mismatches = check_golden(numpy_select_blocks, numpy_block_sparse_attention,
                                 array_kind="numpy")
mismatches += check_random(numpy_select_blocks, numpy_block_sparse_attention,
                           max_examples=20, array_kind="numpy")
print(report(mismatches, cases, 20))
assert not mismatches

# %%
# A bug the checker catches
# -------------------------
# The most common porting bug is the paper code's own: zero-pad partial tiles
# and divide every tile sum by the full tile size. A port that does so agrees
# on most inputs, since partial tiles are rare, so testing by hand on round
# shapes never sees it. The checker does, on the golden cases built for it,
# and names the misreadings each failing case is built to catch. (The first
# three reports are shown, without their reproducers.)


def zero_padded_select(q, k, **config):
    return numpy_select_blocks(q, k, zero_padded=True, **config)


cases, mismatches = check_golden(zero_padded_select, None, array_kind="numpy")
for m in mismatches:
    m.reproducer = ""
print("\n".join(report(mismatches[:3], cases, 0).splitlines()[:-1]))
print(f"... {len(mismatches)} of {cases} golden cases fail in all")
assert len(mismatches) >= 2

# %%
# What a mismatch report gives you
# --------------------------------
# Each report names the case, the misreadings it is built to catch, what
# differed (mask entries outside the boundary ties, or an output beyond its
# tolerance), and, with ``--save DIR`` on the command line, an ``.npz`` with
# the case's inputs and expected results. A failing hypothesis case also comes
# as Python code that rebuilds it from a :class:`GoldenCase
# <prism.reference.golden_cases.GoldenCase>`, ready to paste into a test.
#
# Golden vectors without Python
# -----------------------------
# A port in another language reads the same golden set from
# ``tests/golden/`` (or writes a fresh one with
# ``python -m prism.reference.golden_writer OUT_DIR``): NumPy ``.npz`` arrays
# and a JSON manifest with each case's configuration and tolerances
# (:doc:`../golden`).
