"""Check a port of the packed call (docs/serving.rst) against a loop of the dense reference.

    python -m prism.reference.check --varlen mypkg.attn:prism_attention_varlen

An engine's port of :func:`prism.reference.prism_attention_varlen` takes
sequences packed into ``(tokens, H, D)`` tensors with ``cu_seqlens`` offsets.
Its classic misreadings are about the packing, not Prism: causal alignment
across the whole batch or top-left within a sequence instead of bottom-right
per sequence, tiles cut on the packed row index instead of each sequence's own
grid, the query offsets used for the keys, the ``lse`` in ``(tokens, H)``
order, empty sequences. Each case here packs a few sequences built like
golden cases (:func:`prism.reference.golden_cases.make_inputs`, one seeded
input per sequence) and expects, sequence by sequence, what the dense
reference computes for that sequence alone: its mask (up to its boundary
ties), and contract §7's output and log-sum-exp on that mask.

The port is called as
``fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=...,
scale=..., **config)`` with ``return_lse=True`` and ``return_mask=True`` when its
signature takes them, and may return ``o``, ``(o, lse)`` or ``(o, lse, masks)``
(``masks`` one bool ``(1, Hq, nq_i, nk_i)`` mask per sequence). When it returns
masks, its outputs are checked on its own masks (so a boundary tie decided the
other way is not an output error); otherwise on the reference's (every case
below has no boundary tie).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from .attention import block_sparse_attention
from .config import resolve_config
from .golden_cases import GoldenCase, make_inputs
from .select import boundary_ties, mask_differences, select_blocks
from .tolerances import attention_tolerances, lse_magnitude


@dataclass(frozen=True)
class PackedCase:
    """Sequences ``(Nq_i, Nk_i)`` packed into one batch, with what the case exposes."""

    name: str
    description: str
    catches: tuple[str, ...]
    lengths: tuple[tuple[int, int], ...]
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    value_dim: int = 16
    causal: bool = True
    dtype: str = "float32"
    seed: int = 0
    config: dict = field(default_factory=lambda: {"block_size": 8, "high_threshold": 0.8,
                                                   "low_threshold": 0.85})


#: The packing's misreadings the cases are built to catch.
PACKED_MISREADINGS = {
    "top_left_alignment": "a sequence's queries placed at its first keys (top-left) instead "
                          "of its last (bottom-right) when it has a KV prefix",
    "packed_grid": "tiles cut on the packed row index instead of each sequence's own grid",
    "query_offsets_for_keys": "cu_seqlens_q used to slice the keys as well",
    "one_sequence": "the packed batch treated as one causal sequence",
    "lse_layout": "lse returned as (tokens, H) instead of (H, tokens)",
}

PACKED_CASES = (
    PackedCase("prefixes", "three sequences, two with a KV prefix (13 and 30 tokens), "
               "tiles of 8", ("top_left_alignment", "packed_grid", "query_offsets_for_keys",
                              "one_sequence", "lse_layout"),
               ((20, 33), (1, 31), (44, 44)), seed=1),
    PackedCase("empty_and_single", "an empty sequence, a one-token one, then a prefixed one",
               ("top_left_alignment", "query_offsets_for_keys", "one_sequence", "lse_layout"),
               ((0, 9), (1, 1), (27, 50)), seed=2),
    PackedCase("unaligned_starts", "sequences of 11, 37 and 21 tokens: every start after the "
               "first is off the packed tile grid", ("packed_grid", "one_sequence",
                                                     "lse_layout"),
               ((11, 11), (37, 37), (21, 21)), q_heads=2, kv_heads=1, seed=3),
    PackedCase("non_causal", "non-causal, more queries than keys in one sequence",
               ("packed_grid", "query_offsets_for_keys", "lse_layout"),
               ((30, 17), (9, 40)), causal=False, seed=4),
)


def packed_inputs(case: PackedCase):
    """``(q, k, v, cu_q, cu_k, sequences)``: packed tensors and each sequence's dense
    ``(1, H, N, D)`` tensors (one golden-style input per sequence, seed ``seed + i``)."""
    seqs = []
    for i, (nq, nk) in enumerate(case.lengths):
        single = GoldenCase(f"{case.name}[{i}]", "", (), 1, case.q_heads, case.kv_heads, nq, nk,
                            case.head_dim, case.value_dim, causal=case.causal,
                            dtype=case.dtype, seed=case.seed * 100 + i, sharpness=2.0,
                            config=case.config)
        seqs.append(make_inputs(single))

    def pack(j):
        return torch.cat([s[j][0].transpose(0, 1) for s in seqs]).contiguous()

    def offsets(column):
        return torch.tensor([0, *(n[column] for n in case.lengths)]).cumsum(0).to(torch.int32)

    return pack(0), pack(1), pack(2), offsets(0), offsets(1), seqs


def expected_masks(case: PackedCase, seqs) -> list[dict]:
    """Per sequence: the reference's mask and its boundary ties (the expected output
    is attention on the mask the check settles on, computed there)."""
    cfg = resolve_config(None, **case.config)
    return [{"mask": select_blocks(q, k, cfg, causal=case.causal),
             "ties": boundary_ties(q, k, cfg, causal=case.causal)} for q, k, _ in seqs]


def _call(fn, q, k, v, cu_q, cu_k, case: PackedCase):
    max_q = max((n for n, _ in case.lengths), default=0)
    max_k = max((n for _, n in case.lengths), default=0)
    return call_port(fn, (q, k, v, cu_q, cu_k, max_q, max_k), case.config, case.causal)


def call_port(fn, args, config: dict, causal: bool):
    """``fn(*args, causal=..., scale=None, **config fields)``, with ``return_lse`` and
    ``return_mask`` when it takes them; returns ``(out, lse or None, masks or None)``."""
    from .check import takes_argument

    kwargs = dict(causal=causal, scale=None, **dataclasses.asdict(resolve_config(None, **config)))
    kwargs.update({name: True for name in ("return_lse", "return_mask")
                   if takes_argument(fn, name)})
    result = fn(*args, **kwargs)
    if not isinstance(result, (tuple, list)):
        return result, None, None
    out = result[0]
    lse = result[1] if len(result) > 1 and not isinstance(result[1], (list, tuple)) else None
    masks = result[-1] if len(result) > 1 and isinstance(result[-1], (list, tuple)) else None
    return out, lse, masks


def _tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def check_packed_case(fn, case: PackedCase) -> list[str]:
    """Problems of a packed port on one case; empty when it agrees."""
    q, k, v, cu_q, cu_k, seqs = packed_inputs(case)
    expected = expected_masks(case, seqs)
    try:
        result = _call(fn, q, k, v, cu_q, cu_k, case)
    except Exception as exc:  # a port that raises fails the case
        return [f"raised {type(exc).__name__}: {exc}"]
    return compare_packed(result, q.shape, v.shape[2], cu_q, seqs, expected,
                          resolve_config(None, **case.config), case.causal)


def compare_packed(result, q_shape, value_dim: int, cu_q, seqs, expected, cfg,
                   causal: bool) -> list[str]:
    """Problems of a packed result ``(out, lse or None, masks or None)`` against each
    sequence's dense reference: ``seqs[i] = (q, k, v)`` of sequence ``i`` alone,
    ``expected[i]`` its mask and boundary ties (:func:`expected_masks`)."""
    out, lse, masks = result
    tokens, heads = q_shape[0], q_shape[1]
    problems = []
    out = _tensor(out).double()
    if tuple(out.shape) != (tokens, heads, value_dim):
        return [f"out shape {tuple(out.shape)}, expected {(tokens, heads, value_dim)}"]
    if lse is not None:
        lse = _tensor(lse).double()
        if tuple(lse.shape) != (heads, tokens):
            problems.append(f"lse shape {tuple(lse.shape)}, expected (H, tokens) = "
                            f"{(heads, tokens)}")
            lse = None
    if masks is not None and len(masks) != len(seqs):
        return problems + [f"{len(masks)} masks for {len(seqs)} sequences"]
    for i, ((sq, sk, sv), want) in enumerate(zip(seqs, expected, strict=True)):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        mask = want["mask"]
        if masks is not None:
            mask = _tensor(masks[i]).bool()
            if mask.shape != want["mask"].shape:
                problems.append(f"sequence {i}: mask shape {tuple(mask.shape)}, expected "
                                f"{tuple(want['mask'].shape)}")
                continue
            differ = mask_differences(mask, want["mask"], want["ties"])
            if differ.numel():
                problems.append(f"sequence {i}: mask differs outside the boundary ties at "
                                f"{differ.shape[0]} entries, first {differ[:3].tolist()}")
        ref_out, ref_lse = block_sparse_attention(sq, sk, sv, mask, block_size=cfg.block_size,
                                                  causal=causal, return_lse=True)
        tol = attention_tolerances(sq, sk, sv, None, lse_magnitude=lse_magnitude(ref_lse))
        if rows.stop > rows.start:
            err = (out[rows] - ref_out[0].transpose(0, 1).double()).abs().max().item()
            if not err <= tol["out"]:
                problems.append(f"sequence {i}: out differs by {err:.3g} > {tol['out']:.3g}")
            if lse is not None:
                got, ref = lse[:, rows], ref_lse[0].double()
                finite = torch.isfinite(ref)
                if not torch.equal(torch.isfinite(got), finite):
                    problems.append(f"sequence {i}: lse is infinite in other rows than -inf "
                                    "rows that read no key")
                elif finite.any() and not (got[finite] - ref[finite]).abs().max() <= tol["lse"]:
                    problems.append(f"sequence {i}: lse differs by more than {tol['lse']:.3g}")
    return problems


def check_packed(fn, cases=PACKED_CASES) -> tuple[int, dict[str, list[str]]]:
    """Run a packed port on ``cases``; returns (cases run, problems by case name)."""
    return run_cases(check_packed_case, fn, cases)


def run_cases(check_case, fn, cases) -> tuple[int, dict[str, list[str]]]:
    """``check_case(fn, case)`` on every case: (cases run, problems by case name)."""
    failed = {case.name: problems for case in cases if (problems := check_case(fn, case))}
    return len(cases), failed


def random_packed_cases(count: int, seed: int = 0) -> list[PackedCase]:
    """``count`` random packed cases (1-4 sequences, prefixes, empty ones, GQA,
    both RoPE layouts, tiles of 4-16, thresholds 0.5-1)."""
    rng = np.random.default_rng(seed)
    cases = []
    for n in range(count):
        causal = bool(rng.random() < 0.75)
        lengths = []
        for _ in range(int(rng.integers(1, 5))):
            nk = int(rng.integers(0, 60))
            nq = int(rng.integers(0, nk + 1)) if causal else int(rng.integers(0, 60))
            lengths.append((nq, nk))
        kv = int(rng.integers(1, 3))
        p = float(rng.choice([0.5, 0.8, 0.95, 1.0]))
        cases.append(PackedCase(
            f"random_{n}", "generated", (), tuple(lengths), q_heads=kv * int(rng.integers(1, 4)),
            kv_heads=kv, head_dim=int(rng.choice([8, 16])), value_dim=8, causal=causal,
            dtype=str(rng.choice(["float32", "float16"])), seed=1000 + n,
            config={"block_size": int(rng.choice([4, 8, 16])), "high_threshold": p,
                    "low_threshold": p,
                    "rope_layout": str(rng.choice(["half", "interleaved"]))}))
    return cases


__all__ = ["PACKED_CASES", "PACKED_MISREADINGS", "PackedCase", "call_port", "check_packed",
           "check_packed_case", "compare_packed", "expected_masks", "packed_inputs",
           "random_packed_cases", "run_cases"]
