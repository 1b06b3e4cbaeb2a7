"""Prism's configuration: one frozen dataclass holding the contract's defaults.

Every public function takes ``config=None`` plus keyword overrides of any field,
so ``select_blocks(q, k, block_size=64)`` and
``select_blocks(q, k, PrismConfig(block_size=64))`` mean the same thing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .registry import ESTIMATOR_FIELDS as _REGISTRY_FIELDS
from .registry import ESTIMATOR_REGISTRY
from .registry import ESTIMATORS as _REGISTRY_NAMES
from .validation import (
    MAX_BLOCK_SIZE,
    _is_int,
    check_band_width,
    check_int,
    check_threshold,
)

#: Absolute margin on the probability mass ranked before a mask entry within
#: which two implementations may disagree on it (contract §6.5, which also
#: covers near-equal probabilities on either side of the cut).
TIE_MARGIN = 1e-5

#: Relative distance between two probabilities within which two implementations
#: may rank them either way, so the mask entries may differ (contract §6.5,
#: rules a and b).
TIE_RELATIVE = 1e-6

ROPE_LAYOUTS = ("half", "interleaved")

#: Block-score estimators and the fields that tune them come from the estimator
#: registry (docs/estimators.rst); ``"prism"`` is the paper's (contract v1.1).
ESTIMATORS = _REGISTRY_NAMES
ESTIMATOR_FIELDS = _REGISTRY_FIELDS

#: Named settings of :meth:`PrismConfig.preset` (docs/estimators.rst, "Presets").
#: ``"paper"`` is the paper's default; ``"accurate"`` is the ``"cascade"`` estimator
#: at stride 16 with the vertical-slash stage from the last 32 queries and, since
#: 2026-12-05, its sampled-query stage (8 queries per tile at weight 0.3). How it
#: compares with the other estimators in quality and speed is measured in
#: docs/estimators.rst ("Presets") and benchmarks/NOTES.md, not here.
PRESETS = {
    "paper": {},
    "accurate": {"estimator": "cascade", "candidate_threshold": 0.99,
                 "antidiagonal_stride": 16, "last_queries": 32, "high_threshold": 0.9,
                 "low_threshold": 0.9, "vertical_slash_threshold": 0.5,
                 "sampled_queries": 8, "sampled_weight": 0.3},
}


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class PrismConfig:
    """Settings of Prism's block selection (contract §3-§6).

    Parameters
    ----------
    block_size : int
        Tile edge in tokens, for both query and key tiles (default 128).
    high_dim, low_dim : int or None
        Number of head dimensions in the high- and low-frequency bands. ``None``
        takes the contract's default for the head dim ``D``: ``D/2`` and ``3D/4``
        (64 and 96 for ``D = 128``), each rounded to an even number.
    high_threshold, low_threshold : float
        Top-p mass kept per band and query tile, in ``(0, 1]`` (default 0.95).
    calibrate : bool
        Rescale each band's logits by its measured energy (contract §5). When off,
        the band temperatures below are used instead.
    high_temperature, low_temperature : float
        Band temperatures used when ``calibrate=False``; must be ``> 0``.
    force_sink : bool
        Always keep key tile 0.
    force_diagonal : bool
        When causal, always keep the key tile on the query tile's diagonal.
    rope_layout : {"half", "interleaved"}
        How RoPE pairs sit in the head dim: ``"half"`` pairs ``(m, m + D/2)``
        (Hugging Face ``rotate_half``); ``"interleaved"`` pairs ``(2m, 2m + 1)``.
    eps : float
        Floor of the calibration's RMS denominators and temperatures.
    estimator : str
        One of ``ESTIMATORS``: how tile pairs are scored
        (docs/estimators.rst). ``"prism"`` (default)
        is contract v1.1 exactly. ``"antidiagonal"`` scores tiles by strided
        antidiagonal sums (XAttention-style) and keeps them by top-p at
        ``high_threshold``. ``"vertical_slash"`` scores key columns and
        diagonal offsets with the exact attention of the last queries
        (MInference/FlexPrefill-style). ``"prism_vertical_slash"`` is the
        union of Prism's selection and the vertical-slash one. ``"subtile"``
        runs Prism's band scoring on sub-tiles of ``block_size /
        subtile_factor`` tokens and sums their probabilities per tile pair.
        ``"antidiagonal_vertical_slash"`` is the union of the antidiagonal
        selection (top-p at ``high_threshold``) and the vertical-slash one
        (the ``"accurate"`` preset). ``"sampled"`` scores tiles with the exact
        attention of ``sampled_queries`` queries per query tile;
        ``"sampled_vertical_slash"`` unites it with the vertical-slash tiles.
        ``"cascade"`` scores antidiagonals only on the tiles of Prism's mask
        at ``candidate_threshold`` and unites its top-p with the
        vertical-slash tiles. The table of estimators is :mod:`prism.reference.registry`.
    antidiagonal_stride : int
        Stride of the antidiagonal estimator (default 8); ``block_size`` must
        be a multiple of it when ``estimator`` is ``"antidiagonal"`` or
        ``"antidiagonal_vertical_slash"``.
    last_queries : int
        Number of last queries whose exact attention drives the
        vertical-slash estimate (default 64).
    vertical_slash_threshold : float or None
        Top-p mass kept of the vertical (key column) and slash (diagonal
        offset) distributions; ``None`` (default) uses ``high_threshold``.
    subtile_factor : int
        Sub-tiles per tile edge of the ``"subtile"`` estimator (default 4);
        ``block_size`` must be a multiple of it when ``estimator="subtile"``.
    sampled_queries : int
        Sampled queries per query tile of the ``"sampled"`` estimators
        (default 4); ``block_size`` must be a multiple of it for them.
    candidate_threshold : float
        Top-p of both of Prism's bands whose mask names the tiles the
        ``"cascade"`` estimator scores (default 0.99), in ``(0, 1]``.
    sampled_weight : float
        Weight in ``[0, 1]`` of the ``"cascade"``'s sampled-query stage
        (default 0: the antidiagonal scores alone). Above 0 the cascade's tile
        probabilities are ``(1 - w)`` times its antidiagonal ones plus ``w``
        times the exact attention of ``sampled_queries`` queries per query
        tile over the same candidate tiles (docs/estimators.rst, "cascade");
        ``block_size`` must then be a multiple of ``sampled_queries``.
    """

    block_size: int = 128
    high_dim: int | None = None
    low_dim: int | None = None
    high_threshold: float = 0.95
    low_threshold: float = 0.95
    calibrate: bool = True
    high_temperature: float = 1.0
    low_temperature: float = 1.0
    force_sink: bool = True
    force_diagonal: bool = True
    rope_layout: str = "half"
    eps: float = 1e-6
    estimator: str = "prism"
    antidiagonal_stride: int = 8
    last_queries: int = 64
    vertical_slash_threshold: float | None = None
    subtile_factor: int = 4
    sampled_queries: int = 4
    candidate_threshold: float = 0.99
    sampled_weight: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.block_size):
            raise TypeError(
                f"block_size must be an int, got {type(self.block_size).__name__} "
                f"{self.block_size!r}; pass a whole number of tokens such as 128"
            )
        if self.block_size < 1:
            raise ValueError(
                f"block_size must be >= 1, got {self.block_size}; use a tile size such as 64 or 128"
            )
        if self.block_size > MAX_BLOCK_SIZE:
            raise ValueError(
                f"block_size must be at most 2**62 (tile bounds are int64 token positions), "
                f"got {self.block_size}; a tile longer than the sequence already holds all of it"
            )
        for name in ("high_dim", "low_dim"):
            if getattr(self, name) is not None:
                check_band_width(getattr(self, name), name)
        for name in ("high_threshold", "low_threshold"):
            check_threshold(getattr(self, name), name)
        for name in ("high_temperature", "low_temperature", "eps"):
            value = getattr(self, name)
            if not _is_real(value):
                raise TypeError(
                    f"{name} must be a positive float, got {type(value).__name__}; pass a "
                    f"Python number such as {1e-6 if name == 'eps' else 1.0}"
                )
            if not (value > 0.0) or math.isinf(value):
                raise ValueError(
                    f"{name} must be a finite number > 0, got {value}; the default is "
                    f"{1e-6 if name == 'eps' else 1.0}"
                )
        for name in ("calibrate", "force_sink", "force_diagonal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"{name} must be True or False, got {getattr(self, name)!r}; pass a bool, "
                    f"e.g. {name}=True"
                )
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(
                f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}; "
                "Hugging Face Llama-style models use 'half', GPT-J/NeoX-interleaved use "
                "'interleaved'"
            )
        self._validate_estimator()

    def _validate_estimator(self) -> None:
        """Check the estimator mode and its parameters (docs/estimators.rst)."""
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}; "
                "'prism' is the contract v1.1 default"
            )
        for name in ("antidiagonal_stride", "last_queries", "subtile_factor", "sampled_queries"):
            check_int(getattr(self, name), name, 1, "pass a whole number such as 8 or 64",
                      "use e.g. 8 or 64")
        divisor = ESTIMATOR_REGISTRY[self.estimator].block_multiple_of
        if divisor is not None and self.block_size % getattr(self, divisor):
            raise ValueError(
                f"block_size ({self.block_size}) must be a multiple of {divisor} "
                f"({getattr(self, divisor)}) when estimator={self.estimator!r}; use a value "
                "that divides the tile, e.g. 8 (stride) or 4 (factor, samples) for tile 128"
            )
        value = self.sampled_weight
        if not _is_real(value):
            raise TypeError(
                f"sampled_weight must be a float in [0, 1], got {type(value).__name__}; "
                "e.g. 0.3, or 0 for no sampled-query stage")
        if not (0.0 <= value <= 1.0) or math.isnan(value):
            raise ValueError(
                f"sampled_weight must lie in [0, 1], got {value}; e.g. 0.3, or 0 for no "
                "sampled-query stage")
        if (value > 0 and "candidate_sampled" in ESTIMATOR_REGISTRY[self.estimator].stages
                and self.block_size % self.sampled_queries):
            raise ValueError(
                f"block_size ({self.block_size}) must be a multiple of sampled_queries "
                f"({self.sampled_queries}) when sampled_weight > 0; use e.g. "
                "sampled_queries=8 for tile 128")
        value = self.candidate_threshold
        if not _is_real(value):
            raise TypeError(
                f"candidate_threshold must be a float in (0, 1], got {type(value).__name__}")
        if not (0.0 < value <= 1.0) or math.isnan(value):
            raise ValueError(
                f"candidate_threshold must lie in (0, 1], got {value}; e.g. 0.99 (1.0 makes "
                "every tile of non-zero band probability a candidate)")
        value = self.vertical_slash_threshold
        if value is not None:
            if not _is_real(value):
                raise TypeError(
                    "vertical_slash_threshold must be a float in (0, 1] or None, got "
                    f"{type(value).__name__}"
                )
            if not (0.0 < value <= 1.0) or math.isnan(value):
                raise ValueError(
                    f"vertical_slash_threshold must lie in (0, 1], got {value}; "
                    "or None to use high_threshold"
                )

    @classmethod
    def preset(cls, name: str, **overrides) -> PrismConfig:
        """A named setting from :data:`PRESETS`, with optional field overrides.

        ``"paper"`` is the paper's default (``PrismConfig()``); ``"accurate"`` is
        ``estimator="cascade"`` with ``candidate_threshold=0.99``, antidiagonal
        stride 16, the last 32 queries, ``high_threshold=low_threshold=0.9``,
        ``vertical_slash_threshold=0.5`` and the sampled-query stage at
        ``sampled_queries=8``, ``sampled_weight=0.3`` (:data:`PRESETS`;
        docs/estimators.rst, "Presets").

        >>> PrismConfig.preset("accurate").estimator
        'cascade'
        >>> PrismConfig.preset("paper") == PrismConfig()
        True

        Raises
        ------
        ValueError
            If ``name`` is not a preset.
        """
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {tuple(PRESETS)}")
        return resolve_config(cls(**PRESETS[name]), **overrides)

    def replace(self, **overrides) -> PrismConfig:
        """Return a copy with some fields changed (validated like the constructor)."""
        return resolve_config(self, **overrides)


_FIELDS = tuple(f.name for f in dataclasses.fields(PrismConfig))


def resolve_config(config: PrismConfig | None = None, **overrides) -> PrismConfig:
    """Merge ``config`` (or the defaults) with keyword overrides.

    Raises
    ------
    TypeError
        If ``config`` is not a :class:`PrismConfig` or an override names no field.
    """
    if config is None:
        config = PrismConfig()
    elif not isinstance(config, PrismConfig):
        raise TypeError(
            f"config must be a PrismConfig or None, got {type(config).__name__}; "
            "build one with prism.reference.PrismConfig(...)"
        )
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown PrismConfig field(s) {unknown}; valid fields are {list(_FIELDS)}"
        )
    if not overrides:
        return config
    return dataclasses.replace(config, **overrides)
