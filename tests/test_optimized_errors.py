"""prism.optimized's bad-input handling against prism.reference (contract §8).

Bad arguments raise what the reference raises; NaN/Inf in q, k or v raise a
ValueError naming the tensor (eager calls read the device flag once, at
their end); huge finite values are not mistaken for NaN; inputs are never
modified. Runs in Triton's interpreter on a CPU (see tests/test_optimized.py).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
from test_optimized import DEVICE, _to, pytestmark  # noqa: E402, F401  (same marks)

import prism.optimized as optimized  # noqa: E402
from helpers import make_qkv  # noqa: E402
from prism import reference  # noqa: E402

# --------------------------------------------------------------------------
# Bad input (contract §8)
# --------------------------------------------------------------------------

def _bad_qk_cases():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 64, 32, generator=gen)
    k = torch.randn(1, 2, 64, 32, generator=gen)
    return [
        ("rank", (q[0], k), {}),
        ("batch", (torch.cat([q, q]), k), {}),
        ("GQA", (q[:, :3], k), {}),
        ("Nq > Nk", (q, k[:, :, :10]), {}),
        ("int dtype", (q.long(), k), {}),
        ("mixed dtypes", (q, k.half()), {}),
        ("odd head dim", (q[..., :31], k[..., :31]), {}),
        ("block_size 0", (q, k), {"block_size": 0}),
        ("threshold", (q, k), {"high_threshold": 0.0}),
        ("band > D", (q, k), {"low_dim": 64}),
        ("odd band", (q, k), {"high_dim": 7}),
        ("layout", (q, k), {"rope_layout": "neox"}),
        ("unknown field", (q, k), {"blocksize": 64}),
        ("causal", (q, k), {"causal": "yes"}),
    ]


@pytest.mark.parametrize("name,args,kwargs", _bad_qk_cases(), ids=[c[0] for c in _bad_qk_cases()])
def test_bad_input_raises_like_the_reference(name, args, kwargs):
    args = tuple(a.to(DEVICE) for a in args)
    with pytest.raises((ValueError, TypeError)) as expected:
        reference.select_blocks(*args, **kwargs)
    with pytest.raises(expected.type):
        optimized.select_blocks(*args, **kwargs)
    v = args[1]
    with pytest.raises(expected.type):
        optimized.prism_attention(args[0], args[1], v, **kwargs)


@pytest.mark.parametrize("target", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
# Selection runs its kernels before it reads the finiteness flag back (one host
# wait, at the end); NumPy, under the interpreter, warns while they see NaN.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_non_finite_values_are_rejected(target, bad):
    q, k, v = _to(DEVICE, *make_qkv(1, 2, 1, 64, 96, 32, seed=1))
    tensors = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    tensors[target][0, 0, 5, 3] = bad
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    mask = torch.ones(1, 2, 2, 3, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=f"{target} contains"):
        optimized.block_sparse_attention(q, k, v, mask, block_size=32)
    with pytest.raises(ValueError, match=f"{target} contains"):
        optimized.prism_attention(q, k, v, block_size=32)
    if target != "v":
        with pytest.raises(ValueError, match=f"{target} contains"):
            optimized.select_blocks(q, k, block_size=32)


@pytest.mark.parametrize("case", ["row_with_keys", "row_without_keys", "unselected_key"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_block_sparse_attention_checks_queries_in_its_kernel(case, monkeypatch):
    """The attention kernel flags NaN in the query rows that read keys (through their
    softmax sums), so the check launch reads only k, v and the rows of query tiles with
    an empty list; NaN in such a row, and in a key tile that no row selected, is found
    there."""
    from prism.optimized import call_plan, ops

    # Counted on the general path: on CUDA a repeated call shape replays its plan,
    # which launches the check without this Python function.
    monkeypatch.setattr(call_plan, "ENABLED", False)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("unread") is None)  # True: the launch reads every query
        return real(*args, **kwargs)

    real = ops.nonfinite_flag
    monkeypatch.setattr(ops, "nonfinite_flag", spy)
    q, k, v = _to(DEVICE, *make_qkv(1, 2, 1, 64, 96, 32, seed=1, causal=False))
    mask = torch.ones(1, 2, 2, 3, dtype=torch.bool, device=DEVICE)
    mask[..., 2] = False  # no row reads key tile 2
    mask[0, 1, 1] = False  # head 1's second query tile reads nothing
    clean = optimized.block_sparse_attention(q, k, v, mask, block_size=32, causal=False)
    assert torch.isfinite(clean).all() and seen == [False]
    q, k = q.clone(), k.clone()
    if case == "row_with_keys":
        q[0, 0, 40, 3] = math.nan
    elif case == "row_without_keys":
        q[0, 1, 40, 3] = math.nan
    else:
        k[0, 0, 70, 3] = math.nan
    with pytest.raises(ValueError, match=f"{'k' if case == 'unselected_key' else 'q'} contains"):
        optimized.block_sparse_attention(q, k, v, mask, block_size=32, causal=False)
    assert seen == [False, False]


@pytest.mark.parametrize("row", [0, 20, 49])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_unread_query_rows_are_checked_through_a_broadcast_mask(row):
    """A causal call over a KV prefix (queries 60..109: query tiles 1, 2 and 3 of 32,
    the first partial) with a (1, 1, ...) mask whose middle query tile reads nothing:
    a NaN query in the partial tile, in the empty one or in the last is found."""
    q, k, v = _to(DEVICE, *make_qkv(1, 2, 1, 50, 110, 32, seed=2))
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool, device=DEVICE)
    mask[0, 0, 1] = False  # query tile 2 (rows 4..35) reads no key
    clean = optimized.block_sparse_attention(q, k, v, mask, block_size=32)
    assert torch.isfinite(clean).all() and (clean[0, :, 4:36] == 0).all()
    q = q.clone()
    q[0, 1, row, 5] = math.nan
    with pytest.raises(ValueError, match="q contains"):
        optimized.block_sparse_attention(q, k, v, mask, block_size=32)


@pytest.mark.parametrize("row", [248, 249, 255, 256, 264, 299])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_unread_query_rows_across_wide_check_programs(row):
    """The check launch's query programs each take UNREAD_TILES tiles' rows and read
    those tiles' counts first. Tile 16, queries 7..306 (a KV prefix of 7), so program
    0 takes rows 0..255 over tiles 0..16 and program 1 rows 256..299 over tiles 16..19:
    tile 16 (rows 249..264) straddles them. Head 1's tile 16 reads nothing; a NaN in
    any of its rows, on either side of the programs' boundary, is found (row 248, in
    a tile with keys, is the attention kernel's; row 299 the last query)."""
    from prism.optimized import pooling

    tiles = pooling.UNREAD_TILES
    assert tiles * 16 == 256, "the rows below assume 16-tile programs"
    q, k, v = _to(DEVICE, *make_qkv(1, 2, 1, 300, 307, 32, seed=3))
    mask = torch.ones(1, 2, 20, 20, dtype=torch.bool, device=DEVICE).tril()
    mask[0, 1, 16] = False
    clean = optimized.block_sparse_attention(q, k, v, mask, block_size=16)
    assert torch.isfinite(clean).all() and (clean[0, 1, 249:265] == 0).all()
    q = q.clone()
    q[0, 1, row, 7] = math.nan
    with pytest.raises(ValueError, match="q contains"):
        optimized.block_sparse_attention(q, k, v, mask, block_size=16)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_huge_finite_values_are_not_mistaken_for_nan():
    """Sums that overflow are re-checked entry by entry, not rejected."""
    q, k, v = _to(DEVICE, *make_qkv(1, 2, 1, 64, 64, 32, seed=1))
    v = v.clone()
    v[0, 0, :, 0] = 3e38
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE)
    o = optimized.block_sparse_attention(q, k, v, mask, block_size=32)
    assert o.shape == q.shape


def test_inputs_are_never_modified():
    q, k, v = _to(DEVICE, *make_qkv(1, 2, 1, 100, 130, 32, seed=3))
    copies = [t.clone() for t in (q, k, v)]
    optimized.prism_attention(q, k, v, block_size=32)
    for t, c in zip((q, k, v), copies, strict=True):
        assert torch.equal(t, c)


@pytest.mark.parametrize("target", ["q", "k", "v"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_pass_reaches_every_row_block_head_and_batch(target):
    """``block_sparse_attention``'s one-pass NaN/Inf check (``pooling.nonfinite_flag``)
    maps its programs onto every (batch, head, row block): a NaN in the last row of
    the last head of the last batch, past the first block of rows, is flagged, and
    clean tensors are not (head dims 80 and 48, so padded columns are masked)."""
    from prism.optimized.pooling import NONFINITE_SHAPE, nonfinite_flag

    gen = torch.Generator().manual_seed(4)
    shapes = {"q": (2, 4, 300, 80), "k": (2, 2, 333, 80), "v": (2, 2, 333, 48)}
    tensors = {name: torch.randn(shape, generator=gen).to(DEVICE)
               for name, shape in shapes.items()}
    assert float(nonfinite_flag(tensors["q"], tensors["k"], tensors["v"])) == 0.0
    rows = NONFINITE_SHAPE[0]
    for row in (shapes[target][2] - 1, rows + 1):
        bad = dict(tensors)
        bad[target] = tensors[target].clone()
        bad[target][-1, -1, row, -1] = math.nan
        assert float(nonfinite_flag(bad["q"], bad["k"], bad["v"])) != 0.0, row
