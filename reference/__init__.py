"""``prism.reference``: the readable PyTorch oracle of Prism's semantics.

The semantics are the contract written out in docs/semantics.rst.

Each module is one stage of the algorithm:

* :mod:`~prism.reference.tiles` - the absolute tile grid and mean pooling (contract §3)
* :mod:`~prism.reference.bands` - high/low RoPE bands for both layouts (contract §4)
* :mod:`~prism.reference.calibration` - per-band energy temperatures (contract §5)
* :mod:`~prism.reference.scoring` - band logits and probabilities (contract §6)
* :mod:`~prism.reference.topp` - top-p with the index tie-break (contract §6)
* :mod:`~prism.reference.select` - the union, forced tiles and tie analysis
* :mod:`~prism.reference.estimators` - opt-in peer estimators (docs/estimators.rst)
* :mod:`~prism.reference.registry` - the estimator registry every dispatch reads
* :mod:`~prism.reference.attention` - block-sparse attention (contract §7)
* :mod:`~prism.reference.mean_pooling` - the plain mean-pooling baseline
* :mod:`~prism.reference.varlen` - packed variable-length batches (docs/serving.rst)
* :mod:`~prism.reference.paged` - paged KV caches and chunked prefill (docs/serving.rst)
"""

from .attention import block_sparse_attention, prism_attention, token_mask
from .bands import band_dims, band_sizes
from .calibration import band_temperature
from .config import ESTIMATORS, TIE_MARGIN, TIE_RELATIVE, PrismConfig, resolve_config
from .estimators import (
    antidiagonal_probabilities,
    last_query_distributions,
    subtile_band_probabilities,
    vertical_slash_tiles,
)
from .indices import indices_to_mask, mask_to_indices
from .mean_pooling import mean_pooling_select
from .paged import (
    PooledKeyCache,
    gather_paged_kv,
    prism_attention_paged,
    select_blocks_paged,
    select_from_pooled,
)
from .rope import apply_rope, pair_dims, rope_frequencies
from .scoring import admissible_tiles, band_logits, band_probabilities
from .select import (
    SelectionTrace,
    boundary_ties,
    estimator_mask,
    forced_tiles,
    mask_differences,
    select_blocks,
    ties_from_trace,
    trace_selection,
)
from .tile_mask import TileMask
from .tiles import TileLayout, pool_tiles, tile_layout, tile_token_counts
from .topp import top_p_select
from .varlen import (
    block_sparse_attention_varlen,
    prism_attention_varlen,
    select_blocks_varlen,
)

__all__ = [
    "PrismConfig",
    "TIE_MARGIN",
    "TIE_RELATIVE",
    "resolve_config",
    "select_blocks",
    "block_sparse_attention",
    "prism_attention",
    "mask_to_indices",
    "indices_to_mask",
    "TileMask",
    "boundary_ties",
    "mask_differences",
    "trace_selection",
    "ties_from_trace",
    "SelectionTrace",
    "apply_rope",
    "rope_frequencies",
    "pair_dims",
    "tile_layout",
    "TileLayout",
    "tile_token_counts",
    "pool_tiles",
    "band_sizes",
    "band_dims",
    "band_temperature",
    "band_logits",
    "admissible_tiles",
    "band_probabilities",
    "top_p_select",
    "forced_tiles",
    "token_mask",
    "ESTIMATORS",
    "mean_pooling_select",
    "antidiagonal_probabilities",
    "estimator_mask",
    "last_query_distributions",
    "subtile_band_probabilities",
    "vertical_slash_tiles",
    "select_blocks_varlen",
    "block_sparse_attention_varlen",
    "prism_attention_varlen",
    "select_blocks_paged",
    "prism_attention_paged",
    "gather_paged_kv",
    "PooledKeyCache",
    "select_from_pooled",
]
