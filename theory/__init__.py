"""``prism.theory``: why mean pooling is blind under RoPE, checked numerically.

Mean pooling a tile of ``B`` RoPE'd tokens multiplies RoPE pair ``m`` by the
normalised Dirichlet kernel ``D_B(w_m) = sin(B w_m / 2) / (B sin(w_m / 2))``
(contract §1), a low-pass filter with cut-off ``2 pi / B``. The modules:

* :mod:`~prism.theory.frequency` - frequencies, the gain, the cut-off table;
* :mod:`~prism.theory.checks` - the pooling identity, the score filter and
  the band energy that contract §5's calibration divides out, each measured;
* :mod:`~prism.theory.synthetic` - a synthetic positional head (slash, sink
  and vertical tiles, content) on chosen RoPE pairs;
* :mod:`~prism.theory.recall` - what a tile selection keeps of full attention
  (dense weights, per-tile mass, recall, density), in float64;
* :mod:`~prism.theory.blind_spot` - the slash mean pooling loses and Prism
  keeps on that head, with recall and density against full attention;
* :mod:`~prism.theory.plots` - the figures of the docs page.

``python -m prism.theory`` prints the tables; ``--plots DIR`` draws the figures.
"""

from .blind_spot import (
    DEFAULT_BLIND_SPOT_BASES,
    BlindSpotResult,
    blind_spot_table,
    compare_selections,
    format_blind_spot_table,
    mean_pooling_select,
)
from .checks import (
    BandEnergy,
    ScoreFilterCheck,
    band_energy_check,
    pooling_identity_residuals,
    score_filter_residual,
)
from .frequency import (
    CutoffRow,
    cutoff_frequency,
    cutoff_table,
    format_cutoff_table,
    pooling_gain,
    rope_frequencies,
)
from .recall import (
    attention_recall,
    causal_density,
    full_attention_probabilities,
    kept_attention_mass,
    tile_attention_mass,
)
from .synthetic import SyntheticHead, synthetic_positional_head

__all__ = [
    "rope_frequencies",
    "pooling_gain",
    "cutoff_frequency",
    "cutoff_table",
    "format_cutoff_table",
    "CutoffRow",
    "pooling_identity_residuals",
    "score_filter_residual",
    "ScoreFilterCheck",
    "band_energy_check",
    "BandEnergy",
    "synthetic_positional_head",
    "SyntheticHead",
    "mean_pooling_select",
    "full_attention_probabilities",
    "tile_attention_mass",
    "kept_attention_mass",
    "attention_recall",
    "causal_density",
    "compare_selections",
    "blind_spot_table",
    "format_blind_spot_table",
    "BlindSpotResult",
    "DEFAULT_BLIND_SPOT_BASES",
]
