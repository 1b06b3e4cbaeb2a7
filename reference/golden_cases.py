"""The cases of the golden set: shapes, settings and deterministic inputs.

Every case names the misreadings of the contract it is built to expose
(``catches``); the mutation tests check that a port with each misreading fails
at least two cases. :mod:`prism.reference.golden_writer` runs the reference on
these inputs and writes the files; :mod:`prism.reference.golden` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .rope import apply_rope

#: The misreadings the set is built to catch, with what a wrong port does.
MISREADINGS = {
    "tie_larger_index": "equal probabilities ranked by the larger tile index first",
    "query_tiles_from_row_0": "query tiles cut from query row 0, not on the absolute grid",
    "zero_padded_pooling": "partial tiles averaged as if zero-padded to full tiles",
    "threshold_one": "p = 1 handled by the plain mass rule, which drops the tail once the "
                     "fp32 sum reaches 1",
    "empty_rows": "rows that read no key given lse 0 or NaN instead of -inf (and o = 0)",
    "temperatures": "band temperatures ignored when calibrate is off, or used when it is on",
    "rope_base": "inputs with a RoPE base other than 1e4 (long-context models)",
    "half_precision": "fp16/bf16 inputs pooled, scored or normalised in their own dtype",
    "no_queries": "Nq = 0 (or Nk = 0) not returning empty or -inf results",
    "causal_offset": "causal queries placed at the start instead of after the KV prefix",
    "rms_weighting": "calibration RMS weighting partial tiles by their token count",
    "gqa_mapping": "query head h reading KV head h % Hkv instead of h // (Hq / Hkv)",
    "non_causal_grid": "non-causal queries placed after the keys, or Nq > Nk refused",
    "rope_layout": "the rope_layout setting ignored (half and interleaved pairs mixed up)",
    "forced_tiles": "sink/diagonal forcing forgotten, forced when off, or the diagonal "
                    "forced without causality",
    "scale": "default scale 1/sqrt(Dv) instead of 1/sqrt(D), or an explicit scale ignored",
    "natural_log": "lse in base 2 instead of the natural log",
    "band_rounding": "band widths rounded to even with halves down (D 12 -> low band 8)",
    "large_logits": "weights normalised with an fp32 log-sum-exp, wrong at large logits",
    "mass_rule": "a tile kept while the mass including it is < p, softmax over "
                 "inadmissible tiles, or band logits divided by sqrt(D) instead of sqrt(d_b)",
    "near_ties": "near-equal probabilities far from the mass boundary (boundary ties)",
}


@dataclass(frozen=True)
class GoldenCase:
    """One golden case: shapes, settings, how its inputs are made, and what it catches.

    ``kind`` picks the input builder: ``"topic"`` (random vectors around a
    per-head direction, amplitude changing every 8 keys), ``"copies"`` (small-integer
    key tiles copied from a few distinct ones, so probabilities tie exactly),
    ``"integers"`` (small integers, exact fp32 scores at large logits),
    ``"constant"`` (the same content on every token, then RoPE), ``"slash"`` (one
    content vector per KV head with a little noise, then RoPE: attention follows the
    distance between positions). ``empty_rows``
    lists query-tile rows that the attention mask clears, so that those rows
    read no key.
    """

    name: str
    description: str
    catches: tuple[str, ...]
    batch: int
    q_heads: int
    kv_heads: int
    num_queries: int
    num_keys: int
    head_dim: int
    value_dim: int
    causal: bool = True
    scale: float | None = None
    dtype: str = "float32"
    rope_base: float = 10000.0
    kind: str = "topic"
    sharpness: float = 1.0
    seed: int = 0
    empty_rows: tuple[int, ...] = ()
    config: dict = field(default_factory=dict)


def _case(name, description, catches, shape, *, config=None, **kwargs) -> GoldenCase:
    b, hq, hkv, nq, nk, d, dv = shape
    return GoldenCase(name, description, tuple(catches), b, hq, hkv, nq, nk, d, dv,
                      config={"block_size": 8, **(config or {})}, **kwargs)


_P = {"high_threshold": 0.8, "low_threshold": 0.85}
_OFF = {"calibrate": False}

CASES = (
    _case("causal_half", "causal, Nq = Nk = 12 tiles of 8, rotate-half pairs, D = 32",
          ["rope_layout", "natural_log", "forced_tiles", "mass_rule"],
          (1, 2, 2, 96, 96, 32, 32), seed=1, config=_P),
    _case("causal_interleaved", "as causal_half with interleaved (GPT-J) pairs",
          ["rope_layout", "natural_log", "mass_rule"], (1, 2, 2, 96, 96, 32, 32), seed=2,
          config={**_P, "rope_layout": "interleaved"}),
    _case("interleaved_gqa_prefix", "interleaved pairs, GQA 6:2, a 21-token KV prefix",
          ["rope_layout", "gqa_mapping", "causal_offset", "query_tiles_from_row_0"],
          (1, 6, 2, 59, 80, 16, 16), seed=9, config={**_P, "rope_layout": "interleaved"}),
    _case("gqa_contiguous", "GQA 4:2 with batch 2: head h reads KV head h // 2",
          ["gqa_mapping", "forced_tiles", "mass_rule"], (2, 4, 2, 72, 72, 16, 16), seed=3,
          config=_P),
    _case("kv_prefix", "causal with a 55-token KV prefix: the first query tile holds 1 query",
          ["causal_offset", "query_tiles_from_row_0", "zero_padded_pooling", "rms_weighting"],
          (1, 2, 1, 45, 100, 16, 16), seed=4, config=_P),
    _case("kv_prefix_short", "a 7-token prefix and 10 queries: tiles of 1, 8 and 1 queries",
          ["causal_offset", "query_tiles_from_row_0", "zero_padded_pooling", "rms_weighting"],
          (1, 2, 2, 10, 17, 16, 16), seed=11, config={"high_threshold": 0.6,
                                                        "low_threshold": 0.6}),
    _case("partial_tile", "Nq = Nk = 71: the last tile holds 7 of 8 tokens",
          ["zero_padded_pooling", "rms_weighting"], (1, 2, 2, 71, 71, 16, 16), seed=5,
          config=_P),
    _case("single_query", "one query at position 49 (a decode step)",
          ["causal_offset", "query_tiles_from_row_0"], (1, 2, 1, 1, 50, 16, 16), seed=8,
          config={"high_threshold": 0.8, "low_threshold": 0.8}),
    _case("non_causal", "non-causal, 40 queries on their own grid, 75 keys",
          ["non_causal_grid", "forced_tiles"], (1, 2, 2, 40, 75, 16, 16), causal=False,
          seed=6, config={"high_threshold": 0.8, "low_threshold": 0.8}),
    _case("non_causal_more_queries", "non-causal with Nq = 45 > Nk = 30",
          ["non_causal_grid", "forced_tiles"], (1, 2, 1, 45, 30, 16, 16), causal=False,
          seed=12, config={"high_threshold": 0.7, "low_threshold": 0.7}),
    _case("non_causal_gqa_more_queries", "non-causal, GQA 4:2, Nq = 37 > Nk = 21",
          ["non_causal_grid", "gqa_mapping"], (1, 4, 2, 37, 21, 16, 8), causal=False,
          seed=13, config={"high_threshold": 0.6, "low_threshold": 0.6}),
    _case("uncalibrated", "calibrate off, temperatures 0.5 and 2, bands 6 and 10, no forced "
          "tiles, scale 0.3, Dv = 8", ["temperatures", "forced_tiles", "scale"],
          (1, 2, 1, 64, 64, 16, 8), scale=0.3, seed=7,
          config={"high_dim": 6, "low_dim": 10, **_OFF, "high_temperature": 0.5,
                  "low_temperature": 2.0, "high_threshold": 0.7, "low_threshold": 0.7,
                  "force_sink": False, "force_diagonal": False}),
    _case("uncalibrated_sharp", "calibrate off, temperatures 0.25 and 0.4, scale 0.125",
          ["temperatures", "scale"], (1, 2, 2, 48, 64, 16, 16), scale=0.125, seed=14,
          config={**_OFF, "high_temperature": 0.25, "low_temperature": 0.4,
                  "high_threshold": 0.75, "low_threshold": 0.75}),
    _case("calibrated_ignores_temperatures", "calibrate on with temperatures 0.2 and 5, "
          "which it must ignore", ["temperatures"], (1, 2, 2, 64, 64, 16, 16), seed=15,
          config={"high_temperature": 0.2, "low_temperature": 5.0, **_P}),
    _case("calibrated_ignores_temperatures_prefix", "as above with a KV prefix and GQA",
          ["temperatures", "causal_offset"], (1, 4, 2, 50, 77, 16, 16), seed=16,
          config={"high_temperature": 3.0, "low_temperature": 0.3, **_P}),
    _case("base_1e6", "RoPE base 1e6 (long-context models), D = 32",
          ["rope_base", "mass_rule"], (1, 2, 1, 80, 80, 32, 32), rope_base=1e6, seed=17,
          config=_P),
    _case("base_5e5_interleaved", "RoPE base 5e5, interleaved pairs, a KV prefix",
          ["rope_base", "rope_layout", "causal_offset"], (1, 2, 2, 60, 90, 32, 16),
          rope_base=5e5, seed=18, config={**_P, "rope_layout": "interleaved"}),
    _case("head_dim_12", "D = 12: the default low band is 3D/4 = 9 rounded to 10",
          ["band_rounding"], (1, 2, 2, 80, 80, 12, 12), seed=19,
          config={"high_threshold": 0.7, "low_threshold": 0.7}),
    _case("head_dim_20", "D = 20: the default low band is 15 rounded to 16",
          ["band_rounding", "scale"], (1, 2, 1, 72, 88, 20, 8), seed=20,
          config={"high_threshold": 0.7, "low_threshold": 0.7}),
    _case("bf16_inputs", "bf16 q, k, v: pooled and scored in fp32, output in bf16",
          ["half_precision"], (1, 2, 2, 96, 96, 16, 16), dtype="bfloat16", sharpness=3.0,
          seed=102, config={"high_threshold": 0.9, "low_threshold": 0.9}),
    _case("fp16_inputs", "fp16 q, k, v with a KV prefix",
          ["half_precision", "causal_offset"], (1, 2, 1, 90, 100, 16, 16), dtype="float16",
          sharpness=3.0, seed=104, config={"high_threshold": 0.9, "low_threshold": 0.9}),
    _case("bf16_non_causal", "bf16, non-causal", ["half_precision", "non_causal_grid"],
          (1, 2, 2, 64, 80, 16, 16), dtype="bfloat16", causal=False, sharpness=3.0, seed=23,
          config={"high_threshold": 0.9, "low_threshold": 0.9}),
    _case("threshold_one", "p = 1 on sharp scores: some probabilities underflow to 0, and "
          "the fp32 mass reaches 1 before the tail", ["threshold_one"],
          (1, 2, 1, 64, 64, 16, 16), kind="topic", sharpness=4.0, seed=102,
          config={**_OFF, "high_temperature": 0.02, "low_temperature": 0.03,
                  "high_threshold": 1.0, "low_threshold": 1.0, "force_sink": False,
                  "force_diagonal": False}),
    _case("threshold_one_non_causal", "p = 1, non-causal, sharp scores",
          ["threshold_one"], (1, 2, 2, 40, 72, 16, 16), causal=False, sharpness=4.0,
          seed=25, config={**_OFF, "high_temperature": 0.02, "low_temperature": 0.02,
                           "high_threshold": 1.0, "low_threshold": 1.0,
                           "force_sink": False}),
    _case("exact_ties", "key tiles copied from three distinct ones: equal probabilities, "
          "which the smaller tile index wins", ["tie_larger_index"],
          (1, 2, 2, 64, 64, 16, 16), kind="copies", seed=100,
          config={"high_threshold": 0.5, "low_threshold": 0.5, "force_sink": False}),
    _case("exact_ties_non_causal", "copied key tiles, non-causal, GQA 4:2",
          ["tie_larger_index", "gqa_mapping"], (1, 4, 2, 24, 72, 16, 16), causal=False,
          kind="copies", seed=101,
          config={"high_threshold": 0.45, "low_threshold": 0.55, "force_sink": False}),
    _case("empty_rows", "the attention mask clears query tiles 1 and 4: those rows read "
          "no key (o = 0, lse = -inf)", ["empty_rows"], (1, 2, 1, 48, 48, 16, 16), seed=28,
          empty_rows=(1, 4), config=_P),
    _case("empty_rows_prefix", "cleared rows after a KV prefix, GQA 4:2",
          ["empty_rows", "causal_offset"], (1, 4, 2, 30, 53, 16, 8), seed=29,
          empty_rows=(0, 2), config=_P),
    _case("no_queries", "Nq = 0 after 13 keys: empty mask (0 rows) and outputs",
          ["no_queries"], (1, 2, 1, 0, 13, 16, 16), seed=30, config=_P),
    _case("no_queries_gqa", "Nq = 0 after 21 keys, GQA 4:2",
          ["no_queries"], (1, 4, 2, 0, 21, 16, 8), seed=31, config=_P),
    _case("no_keys_non_causal", "non-causal with Nk = 0: no key tile, o = 0, lse = -inf",
          ["no_queries", "empty_rows"], (1, 2, 1, 11, 0, 16, 16), causal=False, seed=32,
          config=_P),
    _case("large_integer_logits", "small-integer q and k with scale 1: exact fp32 scores "
          "in the thousands", ["large_logits", "scale"], (1, 2, 1, 40, 40, 16, 16),
          scale=1.0, kind="integers", seed=33, config=_P),
    _case("large_integer_logits_gqa", "as above, GQA 4:2 with a KV prefix",
          ["large_logits", "causal_offset"], (1, 4, 2, 30, 45, 16, 16), scale=1.0,
          kind="integers", seed=101, config=_P),
    _case("near_ties", "the same content on every token, base 1e6, low band of one pair, "
          "calibrate off: ten tiles of probability 0.1 to within 1e-7 (boundary ties)",
          ["near_ties"], (1, 1, 1, 76, 76, 16, 16), rope_base=1e6, kind="constant",
          seed=57, config={"low_dim": 2, **_OFF, "low_threshold": 0.519}),
)


def _topic_inputs(case: GoldenCase, gen: torch.Generator):
    b, hq, hkv, d = case.batch, case.q_heads, case.kv_heads, case.head_dim
    nq, nk = case.num_queries, case.num_keys
    q_dir = torch.randn(b, hq, 1, d, generator=gen)
    k_dir = torch.randn(b, hkv, 1, d, generator=gen)
    amplitude = 3.0 * torch.rand(b, hkv, -(-nk // 8), 1, generator=gen)
    amplitude = amplitude.repeat_interleave(8, dim=2)[:, :, :nk]
    q = case.sharpness * (q_dir + torch.randn(b, hq, nq, d, generator=gen))
    k = amplitude * k_dir + torch.randn(b, hkv, nk, d, generator=gen)
    return q, k


def _copied_tiles(case: GoldenCase, gen: torch.Generator):
    """Key tiles copied from three distinct tiles, in a fixed irregular pattern.

    The tokens are small integers, so every tile sum and (for power-of-two
    tiles) every pooled mean is exact in fp32 whatever the summation order:
    copies pool to bitwise-equal vectors in any implementation.
    """
    b, hq, hkv, d = case.batch, case.q_heads, case.kv_heads, case.head_dim
    bs = case.config["block_size"]
    n_tiles = -(-case.num_keys // bs)
    distinct = (torch.randint(-3, 4, (b, hkv, 3, bs, d), generator=gen)
                + torch.randint(-2, 3, (b, hkv, 1, 1, d), generator=gen)).float()
    pattern = torch.tensor([0, 1, 1, 2, 1, 0, 1, 2, 1, 1, 0, 1])[:n_tiles]
    k = distinct[:, :, pattern].reshape(b, hkv, n_tiles * bs, d)[:, :, :case.num_keys]
    q = torch.randint(-3, 4, (b, hq, case.num_queries, d), generator=gen).float()
    return q, k


def make_inputs(case: GoldenCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic ``q, k, v`` of a case, in the case's dtype.

    Random vectors pool to nearly nothing, which would make every selection
    trivially dense, so the ``"topic"`` inputs give each head a fixed query and
    key direction that the keys carry with an amplitude changing every 8
    tokens: some key tiles matter more than others, in both bands.
    """
    gen = torch.Generator().manual_seed(case.seed)
    b, hkv, nk, d = case.batch, case.kv_heads, case.num_keys, case.head_dim
    layout = case.config.get("rope_layout", "half")
    query_start = nk - case.num_queries if case.causal else 0
    if case.kind == "topic":
        q, k = _topic_inputs(case, gen)
        q = apply_rope(q, case.rope_base, rope_layout=layout, start=query_start)
        k = apply_rope(k, case.rope_base, rope_layout=layout)
    elif case.kind == "copies":
        q, k = _copied_tiles(case, gen)
    elif case.kind == "integers":
        q = torch.randint(-20, 21, (b, case.q_heads, case.num_queries, d), generator=gen)
        k = torch.randint(-20, 21, (b, hkv, nk, d), generator=gen)
        q, k = q.float(), k.float()
    elif case.kind == "slash":
        # One content vector per KV head (its query heads share it) plus a little noise:
        # after RoPE the scores follow the distance q_pos - k_pos, a slash pattern.
        group = case.q_heads // hkv
        content = torch.randn(b, hkv, 1, d, generator=gen)
        q = case.sharpness * (content.repeat_interleave(group, dim=1)
                              + 0.3 * torch.randn(b, case.q_heads, case.num_queries, d,
                                                  generator=gen))
        k = content + 0.3 * torch.randn(b, hkv, nk, d, generator=gen)
        q = apply_rope(q, case.rope_base, rope_layout=layout, start=query_start)
        k = apply_rope(k, case.rope_base, rope_layout=layout)
    elif case.kind == "constant":
        content = torch.randn(b, hkv, 1, d, generator=gen)
        q = apply_rope(content.expand(b, case.q_heads, case.num_queries, d).contiguous(),
                       case.rope_base, rope_layout=layout, start=query_start)
        k = apply_rope(content.expand(b, hkv, nk, d).contiguous(), case.rope_base,
                       rope_layout=layout)
    else:
        raise ValueError(f"unknown golden input kind {case.kind!r}")
    v = torch.randn(b, hkv, nk, case.value_dim, generator=gen)
    dtype = getattr(torch, case.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)
