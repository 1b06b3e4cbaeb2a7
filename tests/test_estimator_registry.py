"""The estimator registry, the presets, and how the sweep and the CLI read them."""

from __future__ import annotations

import pytest
import torch
from test_estimators import _qk

from prism.reference import PrismConfig, select_blocks

# ---------------------------------------------------------------- registry and presets


def test_registry_rows_are_consistent():
    from pathlib import Path

    from prism.reference import registry
    from prism.reference.config import ESTIMATOR_FIELDS, ESTIMATORS

    assert ESTIMATORS == tuple(registry.ESTIMATOR_REGISTRY) and ESTIMATORS[0] == "prism"
    fields = set(PrismConfig.__dataclass_fields__)
    docs = (Path(__file__).parents[1] / "docs" / "estimators.rst").read_text()
    for name, spec in registry.ESTIMATOR_REGISTRY.items():
        assert spec.name == name
        assert set(spec.parameters) <= fields and set(spec.parameters) <= set(ESTIMATOR_FIELDS)
        assert set(spec.sweep_parameters) <= set(spec.parameters)
        assert set(spec.stages) <= set(registry.REFERENCE_STAGES) | {"prism_trace"}
        assert spec.block_multiple_of in (None, *spec.parameters)
        assert f".. _{spec.docs}:" in docs, f"docs/estimators.rst has no section {spec.docs}"
        assert spec.prism_bands or spec.tiles is not None
    with pytest.raises(ValueError, match="estimator must be one of"):
        registry.estimator_spec("xattention")


def test_pooled_key_cache_estimators_match_the_serving_docs():
    """The estimators that take a PooledKeyCache (registry ``pooled_tiles``) are those the
    serving docs list, the accurate preset's among them, and each of the others is refused
    with an error that names the usable ones."""
    import re
    from pathlib import Path

    from prism.reference import PooledKeyCache, registry, select_blocks_paged

    text = (Path(__file__).parents[1] / "docs" / "serving_chunked.inc").read_text()
    listed = text[text.index("**Which estimators take a cache.**"):]
    listed = set(re.findall(r'``"(\w+)"``', listed[:listed.index("The others")]))
    usable = {name for name, spec in registry.ESTIMATOR_REGISTRY.items() if spec.pooled_tiles}
    assert usable == listed
    assert PrismConfig.preset("accurate").estimator in usable
    q, k = torch.randn(8, 2, 16), torch.randn(2, 16, 1, 16)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    call = (q, k, table, torch.tensor([24], dtype=torch.int32),
            torch.tensor([0, 8], dtype=torch.int32), 8)
    for name in set(registry.ESTIMATORS) - usable:
        with pytest.raises(ValueError, match="pooled_keys=None") as error:
            select_blocks_paged(*call, estimator=name, block_size=16,
                                pooled_keys=[PooledKeyCache(16)])
        assert all(u in str(error.value) for u in usable)


def test_reference_modules_do_not_import_in_a_loop():
    """The registry sits between the scoring stages and the selection, in one direction."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "reference"

    def imports(name):
        tree = ast.parse((root / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level == 1}

    assert "select" not in imports("estimators") and "config" not in imports("estimators")
    assert not {"select", "config"} & imports("registry")
    assert "registry" in imports("select") and "estimators" not in imports("select")


def test_presets():
    paper = PrismConfig.preset("paper")
    assert paper == PrismConfig()
    accurate = PrismConfig.preset("accurate")
    assert (accurate.estimator, accurate.candidate_threshold) == ("cascade", 0.99)
    assert (accurate.antidiagonal_stride, accurate.last_queries) == (16, 32)
    assert (accurate.high_threshold, accurate.vertical_slash_threshold) == (0.9, 0.5)
    assert (accurate.sampled_queries, accurate.sampled_weight) == (8, 0.3)
    assert PrismConfig.preset("accurate", block_size=64).block_size == 64
    with pytest.raises(ValueError, match="unknown preset"):
        PrismConfig.preset("fast")
    with pytest.raises(TypeError, match="unknown PrismConfig field"):
        PrismConfig.preset("accurate", strde=4)
    q, k = _qk(nq=256, nk=256)
    assert torch.equal(select_blocks(q, k, accurate.replace(block_size=64)),
                       select_blocks(q, k, block_size=64, estimator="cascade",
                                     antidiagonal_stride=16, last_queries=32,
                                     candidate_threshold=0.99, high_threshold=0.9,
                                     low_threshold=0.9, vertical_slash_threshold=0.5))


def test_sweep_methods_come_from_the_registry():
    from prism.evaluation.sweep import SWEEP_METHODS, SweepSettings, method_selection
    from prism.reference.registry import ESTIMATORS

    assert set(SWEEP_METHODS) == {"mean_pooling", *ESTIMATORS}
    settings = SweepSettings(sampled_queries=2, last_queries=32, vertical_slash_threshold=0.4)
    config, _ = method_selection("sampled_vertical_slash", 0.85, settings)
    assert (config.sampled_queries, config.last_queries) == (2, 32)
    assert (config.high_threshold, config.vertical_slash_threshold) == (0.85, 0.4)
    # vertical_slash alone: the point's threshold is its top-p.
    config, _ = method_selection("vertical_slash", 0.85, settings)
    assert config.vertical_slash_threshold is None and config.high_threshold == 0.85


def test_cli_preset_chooses_the_sweep_point_and_settings():
    from prism.cli import _sweep_settings, build_parser

    args = build_parser().parse_args(["eval", "--task", "sweep", "--preset", "accurate"])
    settings = _sweep_settings(args)
    assert settings.points == (("cascade", 0.9),)
    assert (settings.vertical_slash_threshold, settings.antidiagonal_stride) == (0.5, 16)
    assert (settings.candidate_threshold, settings.last_queries) == (0.99, 32)
    args = build_parser().parse_args(["eval", "--task", "sweep", "--preset", "accurate",
                                      "--points", "prism=0.95", "--vs-threshold", "0.3"])
    settings = _sweep_settings(args)
    assert settings.points == (("prism", 0.95), ("cascade", 0.9))
    assert settings.vertical_slash_threshold == 0.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--preset", "fastest"])


def test_perplexity_table_shows_the_preset_row():
    from prism.evaluation.report import perplexity_table

    row = {"perplexity": 6.0, "density": 0.4, "recall": 0.9, "pass_seconds": 1.0,
           "attention_seconds": 0.5}
    methods = {"full": {**row, "label": "full attention (SDPA)", "density": 1.0, "recall": 1.0},
               "prism": {**row, "label": "Prism p=0.95", "perplexity": 6.3},
               "mean_pooling": {**row, "label": "mean pooling p=0.9", "perplexity": 6.2},
               "preset": {**row, "label": "preset accurate (p=0.9)", "perplexity": 6.06,
                          "recall": None}}
    lines = perplexity_table({"methods": methods}).splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["full", "Prism", "mean", "preset"]
    assert "1.010" in lines[4] and " - " in lines[4]


# ---------------------------------------------------------------- sweep helpers


def test_parse_points_and_methods():
    from prism.evaluation.sweep import SweepSettings, method_selection, parse_points

    points = parse_points("prism=0.9,0.95; antidiagonal=0.8;")
    assert points == [("prism", 0.9), ("prism", 0.95), ("antidiagonal", 0.8)]
    with pytest.raises(ValueError, match="unknown sweep method"):
        parse_points("xattn=0.9")
    with pytest.raises(ValueError, match="outside"):
        parse_points("prism=1.5")
    settings = SweepSettings(vertical_slash_threshold=0.7)
    config, selector = method_selection("prism_vertical_slash", 0.9, settings)
    assert config.estimator == "prism_vertical_slash" and selector is None
    assert config.vertical_slash_threshold == 0.7 and config.high_threshold == 0.9
    settings = SweepSettings(vertical_slash_threshold=0.3, antidiagonal_stride=4,
                             last_queries=32)
    config, selector = method_selection("antidiagonal_vertical_slash", 0.95, settings)
    assert config.estimator == "antidiagonal_vertical_slash" and selector is None
    assert (config.vertical_slash_threshold, config.high_threshold) == (0.3, 0.95)
    assert (config.antidiagonal_stride, config.last_queries) == (4, 32)
    config, selector = method_selection("mean_pooling", 0.9, settings)
    assert config == PrismConfig() and selector.threshold == 0.9


def test_cli_parses_the_sweep_task():
    from prism.cli import build_parser

    args = build_parser().parse_args(
        ["eval", "--task", "sweep", "--points", "subtile=0.9;prism_vertical_slash=0.95",
         "--vs-threshold", "0.3", "--stride", "16", "--subtile-factor", "2"])
    assert args.points == [("subtile", 0.9), ("prism_vertical_slash", 0.95)]
    assert (args.vs_threshold, args.stride, args.subtile_factor) == (0.3, 16, 2)
    args = build_parser().parse_args(
        ["eval", "--task", "sweep", "--points", "antidiagonal_vertical_slash=0.9,0.95"])
    assert args.points == [("antidiagonal_vertical_slash", 0.9),
                           ("antidiagonal_vertical_slash", 0.95)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--task", "sweep", "--points", "bogus=0.9"])
