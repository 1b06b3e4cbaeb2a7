"""
Porting Prism: the reference as a correctness oracle
=====================================================

Suppose you are porting Prism to another framework. How do you know your
port is right? This tutorial writes a complete port in plain NumPy, about 60
lines, and checks it against :mod:`prism.reference` the way a port should
be checked:

1. masks must be equal, except on *boundary ties*: entries whose probability
   mass ranked before them lies within ``1e-5`` of the threshold, where two
   correct implementations may round differently (SPEC section 6);
2. outputs must match within the dtype tolerance (``1e-5`` relative in fp32),
   and the log-sum-exp too;
3. the cases must include what ports usually get wrong: a KV prefix that is
   not a tile multiple, partial tiles, GQA, the interleaved RoPE layout and
   non-causal attention.
"""

# %%
# A NumPy port, written from the contract
# ---------------------------------------
# Everything is float32 except the tile means' accumulation, which the
# contract also asks for in fp32. The code follows the semantics page; it
# calls nothing from ``prism``.

import numpy as np


def numpy_select_blocks(q, k, block_size=128, threshold=0.95, rope_layout="half",
                        causal=True):
    """q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D) float32 arrays -> bool mask."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    start = nk - nq if causal else 0

    def pool(x, first_pos):
        tiles = (first_pos + np.arange(x.shape[2])) // block_size
        tiles -= tiles[0]
        sums = np.zeros(x.shape[:2] + (tiles[-1] + 1, d), np.float32)
        np.add.at(sums, (slice(None), slice(None), tiles), x.astype(np.float32))
        return sums / np.bincount(tiles)[:, None].astype(np.float32)

    qbar, kbar = pool(q, start), pool(k, 0)
    kbar = np.repeat(kbar, hq // hkv, axis=1)  # fine for a port of the oracle
    nqt, nkt = qbar.shape[2], kbar.shape[2]
    q_tile = start // block_size + np.arange(nqt)
    admissible = (np.arange(nkt)[None] <= q_tile[:, None]) if causal else np.ones((nqt, nkt),
                                                                                   bool)
    half = d // 2
    pairs = [(m, m + half) if rope_layout == "half" else (2 * m, 2 * m + 1)
             for m in range(half)]
    high = sorted(i for p in pairs[: d // 4] for i in p)
    low = sorted(i for p in pairs[half - 3 * d // 8:] for i in p)

    rms = lambda x: np.sqrt(np.mean(x.astype(np.float32) ** 2, axis=(-2, -1)))
    mask = np.zeros((b, hq, nqt, nkt), bool)
    for dims in (high, low):
        tau = (np.sqrt(len(dims) / d) * rms(qbar[..., dims]) / np.maximum(rms(qbar), 1e-6)
               * rms(kbar[..., dims]) / np.maximum(rms(kbar), 1e-6))
        tau = np.maximum(tau, 1e-6)[..., None, None]
        logits = qbar[..., dims] @ np.swapaxes(kbar[..., dims], -1, -2)
        logits = np.where(admissible, logits / (np.sqrt(len(dims)) * tau), -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
        order = np.argsort(-probs, axis=-1, kind="stable")  # ties: smaller index first
        ranked = np.take_along_axis(probs, order, -1)
        before = np.cumsum(ranked, -1, dtype=np.float32) - ranked
        keep = np.zeros_like(mask)
        np.put_along_axis(keep, order, before < threshold, -1)
        mask |= keep & admissible
    mask[..., 0] = True  # sink
    if causal:
        mask[..., np.arange(nqt), q_tile] = True  # diagonal
    return mask


def numpy_block_sparse_attention(q, k, v, mask, block_size=128, causal=True):
    """Token-level masked softmax; returns (o, lse)."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    group = hq // k.shape[1]
    start = nk - nq if causal else 0
    pos = start + np.arange(nq)
    rows = pos // block_size - start // block_size
    allowed = mask[:, :, rows][..., np.arange(nk) // block_size]
    if causal:
        allowed &= np.arange(nk)[None] <= pos[:, None]
    k, v = np.repeat(k, group, 1).astype(np.float32), np.repeat(v, group, 1).astype(np.float32)
    s = np.where(allowed, q.astype(np.float32) @ np.swapaxes(k, -1, -2) / np.sqrt(d), -np.inf)
    top = np.max(s, -1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(s - top)
    total = w.sum(-1, keepdims=True)
    o = np.where(total > 0, (w @ v) / np.where(total > 0, total, 1), 0.0)
    lse = np.where(total[..., 0] > 0, np.log(np.where(total[..., 0] > 0, total[..., 0], 1))
                   + top[..., 0], -np.inf)
    return o.astype(np.float32), lse.astype(np.float32)


# %%
# Cases that catch the usual porting bugs
# ---------------------------------------

import torch  # noqa: E402

from prism.reference import (  # noqa: E402
    apply_rope,
    boundary_ties,
    mask_differences,
    prism_attention,
)

cases = {
    "plain": dict(hq=4, hkv=4, nq=512, nk=512, d=64, bs=128, layout="half", causal=True),
    "KV prefix 100, partial tiles": dict(hq=4, hkv=2, nq=300, nk=400, d=64, bs=64,
                                         layout="half", causal=True),
    "GQA 6:2, interleaved": dict(hq=6, hkv=2, nq=256, nk=333, d=128, bs=32,
                                 layout="interleaved", causal=True),
    "non-causal": dict(hq=2, hkv=1, nq=200, nk=260, d=64, bs=64, layout="half",
                       causal=False),
}

gen = torch.Generator().manual_seed(0)
for name, c in cases.items():
    start = c["nk"] - c["nq"] if c["causal"] else 0
    topic = torch.randn(1, c["hkv"], 1, c["d"], generator=gen)
    q = apply_rope(2 * torch.randn(1, c["hq"], c["nq"], c["d"], generator=gen)
                   + topic.repeat_interleave(c["hq"] // c["hkv"], 1), 1e4,
                   rope_layout=c["layout"], start=start)
    k = apply_rope(torch.randn(1, c["hkv"], c["nk"], c["d"], generator=gen) + topic, 1e4,
                   rope_layout=c["layout"])
    v = torch.randn(1, c["hkv"], c["nk"], c["d"], generator=gen)
    kw = dict(block_size=c["bs"], rope_layout=c["layout"], causal=c["causal"])

    o_ref, lse_ref, mask_ref = prism_attention(q, k, v, return_lse=True, return_mask=True, **kw)
    ties = boundary_ties(q, k, **kw)
    mask = numpy_select_blocks(q.numpy(), k.numpy(), c["bs"], rope_layout=c["layout"],
                               causal=c["causal"])
    o, lse = numpy_block_sparse_attention(q.numpy(), k.numpy(), v.numpy(), mask_ref.numpy(),
                                          c["bs"], causal=c["causal"])
    diffs = mask_differences(torch.from_numpy(mask), mask_ref, ties)
    err = np.abs(o - o_ref.numpy()).max() / np.abs(o_ref.numpy()).max()
    lse_err = np.abs(lse - lse_ref.numpy()).max()
    print(f"{name:32s} mask differences: {len(diffs)} (ties: {int(ties.sum())}), "
          f"density {mask_ref.float().mean():.2f}, out rel err {err:.1e}, lse err {lse_err:.1e}")
    assert len(diffs) == 0 and err < 1e-5 and lse_err < 1e-4

# %%
# A bug the oracle catches
# ------------------------
# The most common porting bug is the paper code's own: zero-pad the queries
# and keys at the end to whole tiles and align the last query tile with the
# last key tile. With a 100-token prefix and 64-token tiles that shifts every
# query by 28 positions, and the 300 queries, which really occupy absolute
# tiles 1 to 6, come out as five rows instead of six.

gen = torch.Generator().manual_seed(1)
q = apply_rope(2 * torch.randn(1, 4, 300, 64, generator=gen), 1e4, start=100)
k = apply_rope(torch.randn(1, 2, 400, 64, generator=gen), 1e4)
ref_mask = prism_attention(q, k, torch.zeros(1, 2, 400, 64), block_size=64,
                           return_mask=True)[1]
pad = lambda x, n: np.concatenate([x, np.zeros(x.shape[:2] + (n, 64), np.float32)], axis=2)
buggy = numpy_select_blocks(pad(q.numpy(), 20), pad(k.numpy(), 48), 64)
good = numpy_select_blocks(q.numpy(), k.numpy(), 64)
print("reference rows:", ref_mask.shape[2], "| correct port rows:", good.shape[2],
      "| zero-padded port rows:", buggy.shape[2])
assert good.shape == tuple(ref_mask.shape) and buggy.shape[2] != ref_mask.shape[2]

# %%
# Golden vectors
# --------------
# To test a port in another language without Python, use the golden vectors
# (:doc:`../golden`): files of inputs, masks, outputs and LSE written by the
# reference, with a manifest giving each case's configuration.
