"""Where the estimators' vertical-slash stage is forked onto its side stream.

On CUDA the accurate preset (the cascade) runs its vertical-slash stage on a
second stream. On layouts of ``VS_AFTER_POOLING_MIN_KEY_TILES`` to
``VS_AFTER_POOLING_MAX_KEY_TILES`` key tiles the fork comes right after Prism's
pooling launch (so the stage starts once the pooling is done); on narrower and
wider layouts it comes before the pooling. These
tests record the order of the queued work with the kernels replaced by
recorders, so they run without a GPU; the GPU suite times and checks the real
launches (tests/test_estimator_fused.py, tests/test_call_plan_gpu.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from prism.optimized import estimator_path, selection
from prism.reference import PrismConfig, tile_layout


def _record(monkeypatch, fake_prism: bool) -> list:
    """Replace every launch of ``estimator_select`` by an entry in the returned list.

    With ``fake_prism`` Prism's selection (``prism_mask``) is one recorder; without,
    the real ``cascade.prism_mask`` and ``selection.select_tiles`` run with only
    their pooling and selection launches replaced."""
    events = []
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(estimator_path, "side_stream", lambda device, slot: f"side{slot}")
    monkeypatch.setattr(estimator_path, "fork",
                        lambda side: events.append(("fork", side)) or "main")
    monkeypatch.setattr(estimator_path, "join",
                        lambda main, side: events.append(("join", main, side)))

    @contextlib.contextmanager
    def on_stream(stream):
        events.append(("enter", stream))
        yield
        events.append(("exit", stream))

    monkeypatch.setattr(torch.cuda, "stream", on_stream)

    def distributions(q, k, layout, last_queries, causal, nonfinite):
        events.append("distributions")
        return "vertical", "slash"

    def bins(vertical, slash, layout, threshold, causal, *, with_bins, last_threshold):
        events.append("bins")
        return "columns", "diagonals", None if last_threshold is None else "last", None

    def scores(q, k, layout, stride, causal, *, normalize, nonfinite, candidates,
               sampled=None):
        # With sampled: the preset's sampled-query stage in the same launch.
        events.append("scores" if sampled is None else "scores+samples")
        return "probs"

    def sampled(probs, q, k, layout, samples, weight, candidates, causal):
        events.append("sampled")  # the stage mixed in place, after the scores
        assert (probs, candidates) == ("probs", "candidates")
        return probs

    def sampled_rows(q, k, layout, samples, candidates, causal):
        events.append("sampled rows")  # the stage's own launch, mixed by the union
        assert candidates == "candidates"
        return "second"

    def union(layout, causal, heads, **kwargs):
        events.append(("union", kwargs["columns"], kwargs["diagonals"],
                       kwargs["last_tiles"], kwargs["probs"]))
        if kwargs["second"] is not None:
            events.append(("second", type(kwargs["second"]).__name__))
        return "mask", "num", "idx"

    if fake_prism:
        def prism_mask(q, k, v, cfg, causal, layout, threshold=None, after_pooling=None):
            events.append("pooling")
            if after_pooling is not None:
                after_pooling()
            events.append("prism selection")
            return "candidates", "flag"

        monkeypatch.setattr(estimator_path, "prism_mask", prism_mask)
    else:
        monkeypatch.setattr(selection, "launch_steps", lambda *a, **kw: "steps")
        monkeypatch.setattr(selection, "pool_plan", lambda *a: "plan")
        monkeypatch.setattr(selection, "run_pooling",
                            lambda plan, q, k, v: events.append("pooling") or torch.zeros(4))
        monkeypatch.setattr(selection, "run_selection", lambda *a, **kw: events.append(
            "prism selection") or ("candidates", None, None))
    monkeypatch.setattr(estimator_path, "last_query_distributions_unchecked", distributions)
    monkeypatch.setattr(estimator_path, "vertical_slash_bins", bins)
    monkeypatch.setitem(estimator_path.PROBABILITY_STAGES, "candidate_antidiagonal",
                        (scores, "antidiagonal_stride", True))
    monkeypatch.setattr(estimator_path, "candidate_sampled_mix_", sampled)
    monkeypatch.setattr(estimator_path, "candidate_sampled_scores", sampled_rows)
    monkeypatch.setattr(estimator_path, "union_tiles", union)
    return events


@pytest.fixture
def recorded(monkeypatch):
    return _record(monkeypatch, fake_prism=True)


@pytest.fixture
def recorded_through_prism(monkeypatch):
    return _record(monkeypatch, fake_prism=False)


#: The vertical-slash stage queued on its side stream.
SIDE_STAGE = [("fork", "side1"), ("enter", "side1"), "distributions", "bins",
              ("exit", "side1")]
#: The finishing launch of the preset: the antidiagonal rows and, mixed into them,
#: the sampled stage's (a tensor the path allocated for the fused launch).
UNION = [("union", "columns", "diagonals", "last", "probs"), ("second", "Tensor")]


@pytest.mark.parametrize("beside", [True, False])
def test_the_sampled_stage_forms_when_not_fused(recorded, monkeypatch, beside):
    """Without the fused form the stage's own launch runs on side stream 3 beside the
    antidiagonal scores and the union mixes its rows, or (not beside) it mixes in place
    after them."""
    monkeypatch.setattr(estimator_path, "SAMPLED_FUSED", False)
    monkeypatch.setattr(estimator_path, "SAMPLED_BESIDE", beside)
    _select(estimator_path.VS_AFTER_POOLING_MAX_KEY_TILES * 128)
    chain = recorded[recorded.index("prism selection") + 1:]
    if beside:
        assert chain == [("fork", "side3"), ("enter", "side3"), "sampled rows",
                         ("exit", "side3"), "scores", ("join", "main", "side3"),
                         ("join", "main", "side1"), UNION[0], ("second", "str")]
    else:
        assert chain == ["scores", "sampled", ("join", "main", "side1"), UNION[0]]


def _select(tokens, cfg=None):
    cfg = cfg or PrismConfig.preset("accurate")
    q = torch.zeros(1, 2, tokens, 16)
    k = torch.zeros(1, 1, tokens, 16)
    layout = tile_layout(tokens, tokens, cfg.block_size, True)
    return estimator_path.estimator_select(q, k, None, cfg, True, layout), layout


def test_narrow_layouts_fork_the_stage_after_the_pooling(recorded):
    tiles = estimator_path.VS_AFTER_POOLING_MAX_KEY_TILES
    (mask, num, idx, flag), layout = _select(tiles * 128)
    assert layout.num_key_tiles == tiles
    assert recorded == ["pooling", *SIDE_STAGE, "prism selection", "scores+samples",
                        ("join", "main", "side1"), *UNION]
    assert (mask, num, idx, flag) == ("mask", "num", "idx", "flag")


def test_the_narrowest_layouts_fork_the_stage_before_the_pooling(recorded):
    tiles = estimator_path.VS_AFTER_POOLING_MIN_KEY_TILES - 1
    _, layout = _select(tiles * 128)
    assert layout.num_key_tiles == tiles
    assert recorded == [*SIDE_STAGE, "pooling", "prism selection", "scores+samples",
                        ("join", "main", "side1"), *UNION]
    recorded.clear()
    _select(estimator_path.VS_AFTER_POOLING_MIN_KEY_TILES * 128)
    assert recorded[0] == "pooling"


def test_wider_layouts_fork_the_stage_before_the_pooling(recorded):
    tiles = estimator_path.VS_AFTER_POOLING_MAX_KEY_TILES + 1
    _, layout = _select(tiles * 128)
    assert layout.num_key_tiles == tiles
    assert recorded == [*SIDE_STAGE, "pooling", "prism selection", "scores+samples",
                        ("join", "main", "side1"), *UNION]


def test_no_overlap_runs_the_stage_on_the_calls_stream(recorded, monkeypatch):
    monkeypatch.setattr(estimator_path, "OVERLAP_VERTICAL_SLASH", False)
    _select(64 * 128)
    assert not any(isinstance(e, tuple) and e[0] in ("fork", "join", "enter")
                   for e in recorded)
    assert recorded.index("pooling") < recorded.index("distributions")
    assert recorded[-2:] == UNION


@pytest.mark.parametrize("tiles_over_limit", [0, 1])
def test_the_cascade_hands_the_fork_to_prisms_own_pooling(recorded_through_prism,
                                                          tiles_over_limit):
    """Through the real ``cascade.prism_mask`` and ``selection.select_tiles``."""
    tiles = estimator_path.VS_AFTER_POOLING_MAX_KEY_TILES + tiles_over_limit
    _select(tiles * 128)
    main_chain = ["pooling", "prism selection", "scores+samples", ("join", "main", "side1"),
                  *UNION]
    if tiles_over_limit:
        assert recorded_through_prism == SIDE_STAGE + main_chain
    else:
        assert recorded_through_prism == main_chain[:1] + SIDE_STAGE + main_chain[1:]


def test_prism_plus_vertical_slash_forks_after_the_pooling(recorded_through_prism):
    """``prism_vertical_slash`` (Prism's bands united with the vertical-slash tiles,
    no probability stage) takes the same later fork on a narrow layout."""
    cfg = PrismConfig(estimator="prism_vertical_slash")
    _select(estimator_path.VS_AFTER_POOLING_MAX_KEY_TILES * 128, cfg)
    assert recorded_through_prism == ["pooling", *SIDE_STAGE, "prism selection",
                                      ("join", "main", "side1"),
                                      ("union", "columns", "diagonals", None, None)]


def test_select_tiles_calls_after_pooling_between_pooling_and_selection(monkeypatch):
    events = []
    monkeypatch.setattr(selection, "launch_steps", lambda *a, **kw: "steps")
    monkeypatch.setattr(selection, "pool_plan", lambda *a: "plan")
    monkeypatch.setattr(selection, "run_pooling",
                        lambda plan, q, k, v: events.append("pooling") or torch.zeros(4))
    monkeypatch.setattr(selection, "run_selection",
                        lambda *a, **kw: events.append("selection") or ("m", None, None))
    q = torch.zeros(1, 2, 256, 16)
    k = torch.zeros(1, 1, 256, 16)
    layout = tile_layout(256, 256, 64, True)
    mask, _, _, flag = selection.select_tiles(
        q, k, PrismConfig(block_size=64), True, layout, 8, 8,
        after_pooling=lambda: events.append("after pooling"))
    assert events == ["pooling", "after pooling", "selection"]
    assert mask == "m" and flag.shape == (1,)
