"""The cases of the estimators' golden set (docs/golden.rst, "The estimators' set").

Same format and input builders as :mod:`prism.reference.golden_cases`; each
case's ``config`` names an estimator (docs/estimators.rst) and its
parameters, and ``catches`` the misreadings of the estimators' definitions it
is built to expose. The mutation tests check that a port with each of them
fails at least two cases. The expected masks' boundary ties come from
:func:`prism.reference.estimator_ties.estimator_boundary_ties`.
"""

from __future__ import annotations

from .config import PRESETS
from .golden_cases import _case

#: The misreadings of the estimators the set is built to catch, with what a wrong port does.
ESTIMATOR_MISREADINGS = {
    "antidiagonal_direction": "the main diagonal of each stride x stride sub-block scored "
                              "(q[g*S + t] . k[g'*S + t]) instead of its antidiagonal",
    "antidiagonal_grid": "query groups of S rows cut from the first query instead of the "
                         "absolute grid (a KV prefix that is not a multiple of S)",
    "antidiagonal_scale": "antidiagonal scores divided by sqrt(D) only, not sqrt(D) * S",
    "candidate_threshold": "the cascade's candidates taken at the top-p thresholds instead "
                           "of candidate_threshold",
    "candidate_softmax": "the cascade's probabilities taken over every admissible key group "
                         "and then restricted to the candidates and renormalised, instead "
                         "of each query group's softmax over the candidates' key groups",
    "last_queries": "the first last_queries query rows used instead of the last ones",
    "slash_sign": "diagonal offsets taken as k_pos - q_pos instead of q_pos - k_pos",
    "slash_tile_offsets": "a kept offset o mapped to tile offset floor(o / bs) only, "
                          "not also ceil(o / bs)",
    "vertical_slash_threshold": "vertical_slash_threshold ignored (high_threshold used), or "
                                "None not read as high_threshold",
    "last_tile_threshold": "the cascade's last-tile rule at p instead of (1 + p) / 2",
    "sampled_queries": "the first query of each run sampled instead of its last",
    "sampled_candidate_softmax": "the cascade's sampled queries' softmax taken over every "
                                 "admissible key and then restricted to the candidates and "
                                 "renormalised, instead of each sample's softmax over its "
                                 "tile's candidate keys",
    "sampled_weight_side": "the cascade's mix weighted the other way round: sampled_weight "
                           "on the antidiagonal probabilities and 1 - sampled_weight on the "
                           "sampled ones",
    "estimator_forced_tiles": "the sink and diagonal tiles not added to an estimator's tiles",
    "half_precision_scores": "bf16 or fp16 inputs scored in their own dtype (a matrix product "
                             "of 16-bit tensors rounded to 16 bits) instead of fp32",
    "subtile_renormalise": "the sub-tile probabilities summed per tile pair but not "
                           "renormalised per query tile (each row then holds one unit of "
                           "mass per sub-row)",
    "subtile_energies": "the band energies of the sub-tile estimator's calibration measured "
                        "on the means of whole tiles instead of sub-tiles",
    "subtile_logits": "the sub-tile logits averaged per tile pair and one softmax taken per "
                      "query tile, instead of the sub-tile probabilities summed",
}

_AD = {"antidiagonal_stride": 4}
_VS = {"last_queries": 16, "vertical_slash_threshold": 0.5}
_P = {"block_size": 16, "high_threshold": 0.8, "low_threshold": 0.8}


#: What every sub-tile case catches.
_SUBTILE = ["subtile_renormalise", "subtile_energies", "subtile_logits", "estimator_forced_tiles"]
_SUBTILE_CONFIG = {**_P, "estimator": "subtile"}


def _cascade(**fields):
    return {**_P, "estimator": "cascade", "candidate_threshold": 0.99, **_AD, **_VS, **fields}


#: What the cases of the cascade's sampled-query stage with a KV prefix catch, and
#: their config.
_SAMPLED_CASCADE = ["sampled_candidate_softmax", "sampled_weight_side", "sampled_queries",
                    "antidiagonal_direction", "antidiagonal_grid", "antidiagonal_scale",
                    "candidate_threshold", "last_queries", "slash_sign", "slash_tile_offsets",
                    "vertical_slash_threshold", "last_tile_threshold",
                    "estimator_forced_tiles"]
_SAMPLED_CONFIG = _cascade(candidate_threshold=0.9, vertical_slash_threshold=0.1,
                           sampled_queries=4, sampled_weight=0.3)

ESTIMATOR_CASES = (
    _case("accurate_preset", "PrismConfig.preset('accurate', block_size=32) itself (stride "
          "16, 32 last queries), 8 tiles of 32, GQA 2:1",
          ["antidiagonal_direction", "antidiagonal_scale", "last_queries", "slash_sign",
           "slash_tile_offsets", "vertical_slash_threshold", "last_tile_threshold",
           "estimator_forced_tiles"],
          (1, 2, 1, 256, 256, 32, 4), seed=41, sharpness=2.0,
          config={**PRESETS["accurate"], "block_size": 32}),
    _case("cascade_prefix", "the cascade with a 10-token KV prefix (not a multiple of the "
          "stride 4), GQA 4:2, tiles of 16",
          ["antidiagonal_direction", "antidiagonal_grid", "antidiagonal_scale",
           "candidate_threshold", "last_queries", "slash_sign", "slash_tile_offsets",
           "vertical_slash_threshold", "last_tile_threshold", "estimator_forced_tiles"],
          (1, 4, 2, 150, 160, 32, 4), seed=310, sharpness=2.0, config=_cascade()),
    _case("cascade_interleaved_prefix", "the cascade, interleaved pairs, RoPE base 5e5, an "
          "87-token prefix, GQA 6:2",
          ["antidiagonal_direction", "antidiagonal_grid", "antidiagonal_scale",
           "candidate_threshold", "last_queries", "slash_sign", "slash_tile_offsets",
           "vertical_slash_threshold", "last_tile_threshold", "estimator_forced_tiles"],
          (1, 6, 2, 70, 157, 32, 4), seed=227, sharpness=2.0, rope_base=5e5,
          config=_cascade(rope_layout="interleaved")),
    _case("cascade_candidates", "the cascade with candidate_threshold 0.8 and few "
          "vertical-slash tiles (threshold 0.1), 16 tiles per row: a query group's softmax "
          "over the candidates differs from the full one restricted to them",
          ["antidiagonal_direction", "antidiagonal_scale", "candidate_softmax",
           "last_queries", "slash_sign", "slash_tile_offsets", "vertical_slash_threshold",
           "last_tile_threshold", "estimator_forced_tiles"],
          (1, 4, 2, 256, 256, 32, 4), seed=63, sharpness=2.0,
          config=_cascade(candidate_threshold=0.8, vertical_slash_threshold=0.1)),
    _case("cascade_candidates_non_causal", "as above, non-causal, candidate_threshold 0.9, "
          "128 queries, 256 keys",
          ["antidiagonal_direction", "antidiagonal_scale", "candidate_threshold",
           "candidate_softmax", "last_queries", "slash_sign", "slash_tile_offsets",
           "vertical_slash_threshold", "last_tile_threshold", "estimator_forced_tiles"],
          (1, 2, 1, 128, 256, 32, 4), causal=False, seed=62, sharpness=2.0,
          config=_cascade(candidate_threshold=0.9, vertical_slash_threshold=0.1)),
    _case("cascade_sampled_prefix", "the cascade with its sampled-query stage (4 samples "
          "per tile, weight 0.3), candidate_threshold 0.9, vertical-slash threshold 0.1, a "
          "10-token KV prefix, GQA 4:2",
          _SAMPLED_CASCADE,
          (1, 4, 2, 150, 160, 32, 4), seed=310, sharpness=2.0,
          config=_SAMPLED_CONFIG),
    _case("cascade_sampled_gqa", "as above on other inputs",
          _SAMPLED_CASCADE,
          (1, 4, 2, 150, 160, 32, 4), seed=62, sharpness=2.0,
          config=_SAMPLED_CONFIG),
    _case("cascade_sampled_non_causal", "the cascade's sampled-query stage (4 samples, "
          "weight 0.3), non-causal, 128 queries, 256 keys",
          ["sampled_candidate_softmax", "sampled_weight_side", "sampled_queries"],
          (1, 2, 1, 128, 256, 32, 4), causal=False, seed=148, sharpness=2.0,
          config=_SAMPLED_CONFIG),
    _case("cascade_non_causal", "the cascade, non-causal, batch 2, 48 queries, 100 keys",
          ["antidiagonal_direction", "antidiagonal_scale", "candidate_threshold",
           "last_queries", "slash_sign", "slash_tile_offsets", "vertical_slash_threshold",
           "estimator_forced_tiles"],
          (2, 2, 1, 48, 100, 16, 4), causal=False, seed=148, sharpness=2.0,
          config=_cascade()),
    _case("antidiagonal_vertical_slash_prefix", "E5 (stride 4) with vertical_slash_threshold "
          "None, which means high_threshold; a 10-token prefix",
          ["antidiagonal_direction", "antidiagonal_grid", "antidiagonal_scale",
           "last_queries", "slash_sign", "slash_tile_offsets", "estimator_forced_tiles"],
          (1, 4, 2, 150, 160, 32, 4), seed=310, sharpness=2.0,
          config={**_P, "estimator": "antidiagonal_vertical_slash", **_AD,
                  "last_queries": 16}),
    _case("antidiagonal_vertical_slash_threshold", "E5 with vertical_slash_threshold 0.3, "
          "GQA 6:2, a prefix",
          ["antidiagonal_direction", "antidiagonal_grid", "antidiagonal_scale",
           "last_queries", "slash_sign", "slash_tile_offsets", "vertical_slash_threshold",
           "estimator_forced_tiles"],
          (1, 6, 2, 70, 157, 32, 4), seed=227, sharpness=2.0,
          config={**_P, "estimator": "antidiagonal_vertical_slash", **_AD,
                  "last_queries": 16, "vertical_slash_threshold": 0.3}),
    _case("antidiagonal_prefix", "antidiagonal alone, stride 8, tiles of 32, a 12-token "
          "prefix",
          ["antidiagonal_direction", "antidiagonal_grid", "antidiagonal_scale",
           "estimator_forced_tiles"],
          (1, 2, 1, 180, 192, 32, 4), seed=372, sharpness=2.0,
          config={"block_size": 32, "high_threshold": 0.8, "estimator": "antidiagonal",
                  "antidiagonal_stride": 8}),
    _case("vertical_slash_causal", "vertical-slash alone, 16 last queries, a prefix",
          ["last_queries", "slash_sign", "slash_tile_offsets", "vertical_slash_threshold",
           "estimator_forced_tiles"],
          (1, 4, 2, 150, 160, 16, 4), seed=310, sharpness=2.0,
          config={**_P, "estimator": "vertical_slash", **_VS}),
    _case("vertical_slash_non_causal", "vertical-slash alone, non-causal, Nq = 100 > Nk = 60",
          ["last_queries", "slash_sign", "vertical_slash_threshold",
           "estimator_forced_tiles"],
          (1, 2, 2, 100, 60, 16, 4), causal=False, seed=160, sharpness=2.0,
          config={**_P, "estimator": "vertical_slash", **_VS}),
    _case("sampled_prefix", "4 sampled queries per tile, a 10-token prefix",
          ["sampled_queries", "estimator_forced_tiles"],
          (1, 4, 2, 150, 160, 16, 4), seed=310, sharpness=2.0,
          config={**_P, "estimator": "sampled", "sampled_queries": 4}),
    _case("sampled_vertical_slash", "sampled queries united with vertical-slash, GQA 6:2",
          ["last_queries", "slash_sign", "slash_tile_offsets", "vertical_slash_threshold",
           "sampled_queries", "estimator_forced_tiles"],
          (1, 6, 2, 70, 157, 16, 4), seed=227, sharpness=2.0,
          config={**_P, "estimator": "sampled_vertical_slash", "sampled_queries": 4,
                  "last_queries": 8, "vertical_slash_threshold": 0.4}),
    _case("cascade_bf16", "the cascade on bf16 inputs (scored in fp32), 16 tiles per row",
          ["antidiagonal_direction", "antidiagonal_scale", "candidate_threshold",
           "candidate_softmax", "last_queries", "slash_sign", "slash_tile_offsets",
           "vertical_slash_threshold", "last_tile_threshold", "estimator_forced_tiles",
           "half_precision_scores"],
          (1, 4, 2, 256, 256, 32, 4), seed=302, sharpness=2.0, dtype="bfloat16",
          config=_cascade()),
    _case("antidiagonal_vertical_slash_bf16", "E5 on bf16 inputs, a 56-token prefix",
          ["antidiagonal_direction", "antidiagonal_scale", "last_queries", "slash_sign",
           "slash_tile_offsets", "vertical_slash_threshold", "estimator_forced_tiles",
           "half_precision_scores"],
          (1, 4, 2, 200, 256, 32, 4), seed=304, sharpness=4.0, dtype="bfloat16",
          config={**_P, "estimator": "antidiagonal_vertical_slash", **_AD,
                  "last_queries": 16, "vertical_slash_threshold": 0.3}),
    _case("subtile_prefix", "sub-tiles of 8 (factor 4, tiles of 32) with a 10-token KV "
          "prefix, GQA 2:1",
          _SUBTILE,
          (1, 2, 1, 150, 160, 32, 4), seed=310, sharpness=2.0,
          config={**_SUBTILE_CONFIG, "block_size": 32, "subtile_factor": 4}),
    _case("subtile_interleaved_non_causal", "sub-tiles of 8 (factor 2), non-causal, "
          "interleaved pairs, RoPE base 5e5, batch 2, 48 queries, 100 keys",
          _SUBTILE,
          (2, 2, 1, 48, 100, 32, 4), causal=False, seed=61, sharpness=2.0, rope_base=5e5,
          config={**_SUBTILE_CONFIG, "subtile_factor": 2, "rope_layout": "interleaved"}),
    _case("subtile_bf16", "sub-tiles of 8 (factor 4) on bf16 inputs, 6 tiles of 32",
          _SUBTILE,
          (1, 2, 1, 192, 192, 32, 4), seed=47, sharpness=2.0, dtype="bfloat16",
          config={**_SUBTILE_CONFIG, "block_size": 32, "subtile_factor": 4}),
    _case("prism_vertical_slash", "Prism's bands united with vertical-slash",
          ["last_queries", "slash_sign", "slash_tile_offsets", "vertical_slash_threshold"],
          (1, 4, 2, 150, 160, 16, 4), seed=310, sharpness=2.0,
          config={**_P, "estimator": "prism_vertical_slash", **_VS}),
)
