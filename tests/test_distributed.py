"""prism.distributed: context-parallel Prism checked against single-device Prism.

The sharded runs use the gloo backend in 2 and 4 CPU processes (one spawn per
world size, shared by every case) and compare, in this process, the
reassembled outputs with :func:`prism.reference.prism_attention` on the whole
sequence. Shapes are tiny (tiles of 16 tokens, D = 32) so that the whole file
runs in well under a minute on two cores.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import TOLERANCE, make_qkv, relative_error
from prism.distributed import (
    CommunicationStats,
    ShardPlan,
    communication_volume,
    context_parallel_prism_attention,
    kv_tiles_to_fetch,
)
from prism.reference import boundary_ties, mask_differences, prism_attention

BLOCK = 16
HEAD_DIM = 32
WORLD_SIZES = (2, 4)
SPAWN_TIMEOUT_S = 120
DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "distributed.rst"


# --------------------------------------------------------------------------
# Cases: each builds the whole q, k, v, the plan that shards them, and the
# keyword arguments of the call. Sizes scale with the world size so every
# rank holds a few tiles.
# --------------------------------------------------------------------------

def _case(name: str, world_size: int):
    w = world_size
    spec = dict(batch=1, q_heads=2, kv_heads=1, nq=w * 32, nk=w * 32, causal=True,
                layout="contiguous", dtype=torch.float32, rope_layout="half", sharpness=1.0,
                value_dim=None, lengths=None, options={})
    if name == "causal_contiguous_gqa":
        spec.update(q_heads=4, kv_heads=2)
    elif name == "causal_zigzag_batch2":
        spec.update(batch=2, layout="zigzag")
    elif name == "causal_prefix_contiguous":
        # The prefix ends inside a tile and the last tile is partial.
        spec.update(nk=w * 32 - 8, nq=w * 32 - 8 - 37)
    elif name == "causal_prefix_zigzag":
        spec.update(nk=w * 32 - 5, nq=w * 32 - 5 - 21, layout="zigzag", q_heads=4, kv_heads=2)
    elif name == "noncausal_contiguous":
        spec.update(causal=False, nq=w * 20, nk=w * 18 + 3, kv_heads=2)
    elif name == "noncausal_zigzag":
        spec.update(causal=False, nq=w * 24, nk=w * 16 + 5, layout="zigzag", q_heads=4)
    elif name == "sparse_zigzag":
        # Sharp scores and low thresholds: each rank fetches only some remote tiles.
        spec.update(nq=w * 64, nk=w * 64, layout="zigzag", sharpness=4.0,
                    options=dict(high_threshold=0.5, low_threshold=0.5))
    elif name == "bf16_contiguous":
        spec.update(dtype=torch.bfloat16, q_heads=4, kv_heads=2)
    elif name == "options":
        spec.update(rope_layout="interleaved", value_dim=16, q_heads=4, kv_heads=2,
                    options=dict(calibrate=False, high_temperature=0.5, low_temperature=2.0,
                                 high_threshold=0.8, low_threshold=0.7, force_sink=False,
                                 force_diagonal=False, rope_layout="interleaved", scale=0.3))
    elif name == "uneven_contiguous":
        # A user-chosen split: tile multiples, an empty rank, a partial last chunk.
        spec.update(nq=89, nk=89, lengths=[48, 41] if w == 2 else [16, 48, 0, 25])
    else:
        raise KeyError(name)
    q, k, v = make_qkv(spec["batch"], spec["q_heads"], spec["kv_heads"], spec["nq"], spec["nk"],
                       HEAD_DIM, layout=spec["rope_layout"], dtype=spec["dtype"],
                       seed=len(name) + w, causal=spec["causal"], value_dim=spec["value_dim"],
                       sharpness=spec["sharpness"])
    if spec["lengths"] is None:
        plan = ShardPlan.split(spec["nq"], spec["nk"], w, layout=spec["layout"],
                               block_size=BLOCK, causal=spec["causal"])
    else:
        plan = ShardPlan.from_local_lengths(spec["lengths"], spec["lengths"],
                                            layout=spec["layout"], block_size=BLOCK,
                                            causal=spec["causal"])
    options = dict(spec["options"])
    scale = options.pop("scale", None)
    call = dict(causal=spec["causal"], layout=spec["layout"], block_size=BLOCK, scale=scale,
                **options)
    return q, k, v, plan, call


CASES = ("causal_contiguous_gqa", "causal_zigzag_batch2", "causal_prefix_contiguous",
         "causal_prefix_zigzag", "noncausal_contiguous", "noncausal_zigzag", "sparse_zigzag",
         "bf16_contiguous", "options", "uneven_contiguous")


def _error_scenarios(rank: int, world_size: int):
    """Bad calls, each wrong on one rank or everywhere: name -> thunk."""
    q, k, v, plan, call = _case("causal_contiguous_gqa", world_size)
    local = (plan.shard(q, rank, "query"), plan.shard(k, rank, "key"), plan.shard(v, rank, "key"))
    last = world_size - 1

    def nan_on_last_rank():
        bad_q = local[0].clone()
        if rank == last:
            bad_q[0, 0, 0, 0] = float("nan")
        return context_parallel_prism_attention(bad_q, *local[1:], **call)

    def heads_differ():
        q_heads = local[0][:, :2] if rank == last else local[0]
        return context_parallel_prism_attention(q_heads, *local[1:], **call)

    def scale_differs():
        return context_parallel_prism_attention(*local, **{**call, "scale": 0.2 if rank else None})

    def misaligned_chunks():
        # Rank 0 keeps three of rank 1's tokens, so rank 1's chunk starts inside a tile.
        lengths = plan.local_lengths("key")
        lengths[0] += 3
        lengths[1] -= 3
        start = sum(lengths[:rank])
        rows = slice(start, start + lengths[rank])
        return context_parallel_prism_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows],
                                                **call)

    def group_not_a_group():
        return context_parallel_prism_attention(*local, group="world", **call)

    return dict(nan_on_last_rank=nan_on_last_rank, heads_differ=heads_differ,
                scale_differs=scale_differs, misaligned_chunks=misaligned_chunks,
                group_not_a_group=group_not_a_group)


def _worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    results = {"cases": {}, "errors": {}}
    try:
        # Errors first: the cases that follow prove no rank was left inside a collective.
        for name, thunk in _error_scenarios(rank, world_size).items():
            try:
                thunk()
                results["errors"][name] = ("no error", "")
            except (TypeError, ValueError) as err:
                results["errors"][name] = (type(err).__name__, str(err))
        for name in CASES:
            q, k, v, plan, call = _case(name, world_size)
            o, lse, mask, stats = context_parallel_prism_attention(
                plan.shard(q, rank, "query"), plan.shard(k, rank, "key"),
                plan.shard(v, rank, "key"), None, None, return_lse=True, return_mask=True,
                return_stats=True, **call)
            results["cases"][name] = dict(o=o, lse=lse, mask=mask,
                                          stats=dataclasses.asdict(stats))
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


_RUNS: dict[int, list[dict]] = {}


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Run every case once per world size in gloo processes; results per rank."""

    def run(world_size: int) -> list[dict]:
        if world_size not in _RUNS:
            out_dir = tmp_path_factory.mktemp(f"gloo{world_size}")
            context = mp.spawn(_worker, args=(world_size, str(out_dir / "store"), str(out_dir)),
                               nprocs=world_size, join=False)
            deadline = time.monotonic() + SPAWN_TIMEOUT_S
            while not context.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.terminate()
                    pytest.fail(f"gloo run with {world_size} ranks hung (a rank is stuck "
                                "in a collective)")
            _RUNS[world_size] = [torch.load(out_dir / f"rank{r}.pt")
                                 for r in range(world_size)]
        return _RUNS[world_size]

    return run


# --------------------------------------------------------------------------
# Sharded runs against the single-device reference
# --------------------------------------------------------------------------

def _full_mask_from_rows(rows_by_rank, plan: ShardPlan) -> torch.Tensor:
    b, hq, _, nk = rows_by_rank[0].shape
    full = torch.full((b, hq, plan.num_query_tiles, nk), False)
    covered = torch.zeros(plan.num_query_tiles, dtype=torch.int64)
    for rank, rows in enumerate(rows_by_rank):
        index = plan.tiles(rank, "query") - plan.first_query_tile
        full[:, :, index] = rows
        covered[index] += 1
    assert torch.equal(covered, torch.ones_like(covered)), "each query tile on exactly one rank"
    return full


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sharded_run_equals_single_device(sharded_runs, world_size, name):
    runs = sharded_runs(world_size)
    q, k, v, plan, call = _case(name, world_size)
    layout = call.pop("layout")
    o_ref, lse_ref, mask_ref = prism_attention(q, k, v, return_lse=True, return_mask=True, **call)
    call.pop("scale")
    ties = boundary_ties(q, k, **call)
    parts = [runs[r]["cases"][name] for r in range(world_size)]

    # Masks: this rank's rows of the single-device mask, up to boundary ties.
    mask = _full_mask_from_rows([p["mask"] for p in parts], plan)
    assert mask_differences(mask, mask_ref, ties).numel() == 0
    # Outputs and LSE: reassembled in sequence order, within the dtype tolerance.
    o = plan.unshard([p["o"] for p in parts], "query")
    lse = plan.unshard([p["lse"] for p in parts], "query")
    assert o.dtype == q.dtype and o.shape == o_ref.shape
    assert relative_error(o, o_ref) <= TOLERANCE[q.dtype]
    assert relative_error(lse, lse_ref) <= TOLERANCE[torch.float32]

    # Traffic: exactly the remote tiles the mask needs, and sends match receipts.
    stats = [CommunicationStats(**p["stats"]) for p in parts]
    kv_heads = k.shape[1]
    assert [s.kv_tiles_received for s in stats] == kv_tiles_to_fetch(mask, plan, kv_heads)
    assert sum(s.kv_tiles_sent for s in stats) == sum(s.kv_tiles_received for s in stats)
    tile_bytes = BLOCK * (k.shape[3] + v.shape[3]) * q.element_size()
    for rank, s in enumerate(stats):
        assert s.kv_bytes_received == s.kv_tiles_received * tile_bytes
        assert s.kv_tiles_received <= s.admissible_kv_tiles
        remote_keys = plan.num_keys - plan.local_lengths("key")[rank]
        assert s.ring_kv_bytes == (q.shape[0] * kv_heads * remote_keys
                                   * (k.shape[3] + v.shape[3]) * q.element_size())
    assert layout == plan.layout


def test_sparse_selection_fetches_only_some_remote_tiles(sharded_runs):
    """The sparse case must leave remote tiles behind, or the traffic test proves little."""
    for world_size in WORLD_SIZES:
        stats = [CommunicationStats(**r["cases"]["sparse_zigzag"]["stats"])
                 for r in sharded_runs(world_size)]
        assert sum(s.kv_tiles_received for s in stats) < sum(s.admissible_kv_tiles
                                                             for s in stats)
        assert all(s.kv_tiles_received > 0 for s in stats)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_model_reproduces_measured_bytes(sharded_runs, world_size):
    """communication_volume, fed each rank's measured density, gives its measured bytes."""
    name = "sparse_zigzag"
    q, k, v, plan, call = _case(name, world_size)
    for rank, run in enumerate(sharded_runs(world_size)):
        s = CommunicationStats(**run["cases"][name]["stats"])
        model = communication_volume(plan.num_keys, world_size, s.fetched_fraction,
                                     batch=q.shape[0], q_heads=q.shape[1], kv_heads=k.shape[1],
                                     head_dim=HEAD_DIM, block_size=BLOCK,
                                     bytes_per_element=q.element_size(), layout=plan.layout)
        assert model.ring_bytes[rank] == s.ring_kv_bytes
        assert math.isclose(model.prism_kv_bytes[rank], s.kv_bytes_received, rel_tol=1e-12)
        assert model.prism_metadata_bytes[rank] == s.metadata_bytes


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_bad_input_raises_on_every_rank(sharded_runs, world_size):
    runs = sharded_runs(world_size)
    last = world_size - 1
    errors = [r["errors"] for r in runs]
    # The rank with the NaN names it; the others say which rank stopped them.
    assert errors[last]["nan_on_last_rank"][0] == "ValueError"
    assert "NaN" in errors[last]["nan_on_last_rank"][1]
    for rank in range(last):
        kind, message = errors[rank]["nan_on_last_rank"]
        assert kind == "ValueError" and f"rank(s) [{last}]" in message
    for rank in range(world_size):
        kind, message = errors[rank]["heads_differ"]
        assert kind == "ValueError" and "q_heads differs across ranks" in message
        kind, message = errors[rank]["scale_differs"]
        assert kind == "ValueError" and "scale differs" in message and "None" in message
        kind, message = errors[rank]["misaligned_chunks"]
        assert kind == "ValueError" and "multiple of block_size=16" in message
        kind, message = errors[rank]["group_not_a_group"]
        assert kind == "TypeError" and "ProcessGroup" in message


# --------------------------------------------------------------------------
# One process: a world of one, and errors outside a process group
# --------------------------------------------------------------------------

@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_world_of_one_equals_single_device(world_of_one):
    q, k, v = make_qkv(2, 4, 2, 40, 72, HEAD_DIM, seed=5)
    o, lse, mask, stats = context_parallel_prism_attention(
        q, k, v, block_size=BLOCK, return_lse=True, return_mask=True, return_stats=True)
    o_ref, lse_ref, mask_ref = prism_attention(q, k, v, block_size=BLOCK, return_lse=True,
                                               return_mask=True)
    assert torch.equal(mask, mask_ref)
    assert relative_error(o, o_ref) <= 1e-5 and relative_error(lse, lse_ref) <= 1e-5
    assert stats.total_bytes_received == 0 and stats.ring_kv_bytes == 0


def test_empty_queries_return_empty_outputs(world_of_one):
    q, k, v = make_qkv(1, 2, 1, 0, 40, HEAD_DIM)
    o, lse, mask = context_parallel_prism_attention(q, k, v, causal=True, block_size=BLOCK,
                                                    return_lse=True, return_mask=True)
    assert o.shape == (1, 2, 0, HEAD_DIM) and lse.shape == (1, 2, 0)
    assert mask.shape == (1, 2, 0, 3)


@pytest.mark.parametrize("estimator", ["antidiagonal", "antidiagonal_vertical_slash"])
def test_other_estimators_are_refused_not_run_as_prism(world_of_one, estimator):
    q, k, v = make_qkv(1, 2, 1, 32, 32, HEAD_DIM)
    with pytest.raises(ValueError, match="estimator='prism'"):
        context_parallel_prism_attention(q, k, v, block_size=BLOCK, estimator=estimator)


def test_needs_an_initialised_process_group():
    q, k, v = make_qkv(1, 2, 1, 32, 32, HEAD_DIM)
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        context_parallel_prism_attention(q, k, v, block_size=BLOCK)


# --------------------------------------------------------------------------
# The sharding contract
# --------------------------------------------------------------------------

@st.composite
def plans(draw):
    block_size = draw(st.sampled_from([1, 4, 16]))
    world_size = draw(st.integers(1, 5))
    causal = draw(st.booleans())
    nk = draw(st.integers(0, 12 * block_size))
    nq = draw(st.integers(0, nk)) if causal else draw(st.integers(0, 12 * block_size))
    layout = draw(st.sampled_from(["contiguous", "zigzag"]))
    return ShardPlan.split(nq, nk, world_size, layout=layout, block_size=block_size,
                           causal=causal)


@given(plan=plans())
@example(plan=ShardPlan.split(1, 1, 3, layout="zigzag", block_size=16, causal=True))
@example(plan=ShardPlan.split(16, 48, 2, layout="contiguous", block_size=16, causal=True))
def test_plan_covers_each_position_once_and_round_trips(plan):
    for role, total in (("query", plan.num_queries), ("key", plan.num_keys)):
        offset = plan.query_start if role == "query" else 0
        positions = torch.cat([plan.positions(r, role) for r in range(plan.world_size)])
        assert torch.equal(positions.sort().values, torch.arange(offset, offset + total))
        tiles = torch.cat([plan.tiles(r, role) for r in range(plan.world_size)])
        assert tiles.numel() == tiles.unique().numel(), "a tile is split between ranks"
        x = torch.randn(1, 1, total, 2)
        chunks = [plan.shard(x, r, role) for r in range(plan.world_size)]
        assert torch.equal(plan.unshard(chunks, role), x)
    rebuilt = ShardPlan.from_local_lengths(plan.local_lengths("query"), plan.local_lengths("key"),
                                           layout=plan.layout, block_size=plan.block_size,
                                           causal=plan.causal)
    assert rebuilt == plan
    # Rows of the single-device mask: the query tiles, each exactly once.
    assert sum(plan.tiles(r, "query").numel() for r in range(plan.world_size)) == \
        plan.num_query_tiles


def test_zigzag_with_equal_chunks_is_the_usual_zigzag():
    plan = ShardPlan.split(128, 128, 4, layout="zigzag", block_size=16)
    chunk = 16
    for rank in range(4):
        expected = ((rank * chunk, chunk), ((7 - rank) * chunk, chunk))
        assert plan.key_segments[rank] == expected
        assert plan.query_segments[rank] == expected


def test_causal_prefix_lives_on_the_ranks_that_hold_its_positions():
    plan = ShardPlan.split(70, 128, 4, layout="contiguous", block_size=16)
    assert plan.local_lengths("key") == [32, 32, 32, 32]
    assert plan.local_lengths("query") == [0, 6, 32, 32]
    assert plan.query_segments[1] == ((58, 6),)


@pytest.mark.parametrize("query_lengths, key_lengths, layout, causal, message", [
    ([20, 12], [20, 12], "contiguous", True, "multiple of block_size=16"),
    ([32, 16], [16, 32], "contiguous", True, "query lengths must be"),
    ([64, 32], [64, 32], "zigzag", True, "must be \\[48, 48\\]"),
    ([40, 40], [16, 16], "contiguous", True, "total query count <= the total key count"),
    ([20, 5], [16, 16], "contiguous", False, "rank 0 holds 20 query tokens"),
    ([16], [16, 16], "contiguous", False, "one query length and one key length per rank"),
    ([16, 16], [16, 16], "ring", True, "layout must be one of"),
])
def test_plan_rejects_lengths_that_break_the_contract(query_lengths, key_lengths, layout,
                                                      causal, message):
    with pytest.raises(ValueError, match=message):
        ShardPlan.from_local_lengths(query_lengths, key_lengths, layout=layout, block_size=16,
                                     causal=causal)


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_queries <= num_keys"):
        ShardPlan.split(40, 32, 2, block_size=16)
    with pytest.raises(TypeError, match="world_size must be an int"):
        ShardPlan.split(32, 32, 2.0, block_size=16)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        ShardPlan.split(32, 32, 0, block_size=16)
    plan = ShardPlan.split(32, 32, 2, block_size=16)
    with pytest.raises(ValueError, match="rank must be < world_size=2"):
        plan.positions(2, "key")
    with pytest.raises(ValueError, match="role must be"):
        plan.tiles(0, "value")
    with pytest.raises(ValueError, match="pass the whole key tensor"):
        plan.shard(torch.zeros(1, 1, 31, 4), 0, "key")
    with pytest.raises(ValueError, match="chunk lengths"):
        plan.unshard([torch.zeros(1, 1, 16, 4), torch.zeros(1, 1, 15, 4)], "key")


# --------------------------------------------------------------------------
# The communication model and its documented numbers
# --------------------------------------------------------------------------

def test_model_matches_the_hand_formula():
    n, w, density = 1 << 20, 8, 0.1
    model = communication_volume(n, w, density, layout="contiguous")
    token_bytes = 8 * (128 + 128) * 2  # Hkv * (D + Dv) * bf16
    tiles_per_rank = n // 128 // w
    for rank in range(w):
        assert model.ring_bytes[rank] == (n - n // w) * token_bytes
        # Contiguous and causal: rank r may select the r * T / W tiles before its chunk.
        expected_kv = density * rank * tiles_per_rank * 128 * token_bytes
        assert math.isclose(model.prism_kv_bytes[rank], expected_kv, rel_tol=1e-12)
        pooled = (w - 1) * 8 * tiles_per_rank * 128 * 4
        requests = (w - 1) * 8 * tiles_per_rank
        calibration = 2 * (w - 1) * 32 * 3 * 8 // w
        assert model.prism_metadata_bytes[rank] == pooled + requests + calibration


def test_model_zero_density_leaves_only_metadata_and_full_density_beats_no_ring():
    empty = communication_volume(1 << 17, 8, 0.0)
    assert sum(empty.prism_kv_bytes) == 0 and empty.ratio < 0.02
    full = communication_volume(1 << 17, 8, 1.0, causal=False)
    # Fetching everything costs ring's traffic plus the (small) metadata.
    assert 1.0 < full.ratio < 1.02


def test_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="density must lie in"):
        communication_volume(1024, 2, 1.5)
    with pytest.raises(TypeError, match="density must be a float"):
        communication_volume(1024, 2, "0.1")
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        communication_volume(1024, 2, 0.1, q_heads=6, kv_heads=4)


def _documented_rows():
    """Rows ``| tokens | density | ring GiB | prism GiB | ratio |`` of the docs table."""
    rows = []
    for line in DOCS_PAGE.read_text().splitlines():
        match = re.fullmatch(r"\s*(\d+)K\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
                             r"([\d.]+)\s+([\d.]+)\s*", line)
        if match:
            rows.append(match.groups())
    return rows


def test_documented_numbers_are_what_the_model_computes():
    rows = _documented_rows()
    assert len(rows) == 16, "the docs table lost rows"
    for tokens, density, ring_mean, prism_mean, ring_max, prism_max, ratio in rows:
        model = communication_volume(int(tokens) * 1024, 8, float(density))
        gib = 2**30
        assert ring_mean == f"{sum(model.ring_bytes) / 8 / gib:.2f}"
        assert prism_mean == f"{sum(model.prism_bytes) / 8 / gib:.3f}"
        assert ring_max == f"{model.ring_max / gib:.2f}"
        assert prism_max == f"{model.prism_max / gib:.3f}"
        assert ratio == f"{model.ratio:.3f}"


def test_query_stand_in_has_the_rms_of_all_pooled_queries():
    """band_temperature on the one-tile stand-in equals band_temperature on every tile."""
    from prism.distributed.attention import _pooled_query_stand_in
    from prism.reference import band_dims, band_temperature

    gen = torch.Generator().manual_seed(3)
    q_pooled = torch.randn(2, 4, 7, 32, generator=gen) * torch.linspace(0.1, 3.0, 32)
    k_pooled = torch.randn(2, 2, 9, 32, generator=gen)
    squares = q_pooled.double() ** 2
    for dims in band_dims(32, 8, 12, "half", torch.device("cpu")):
        stand_in = _pooled_query_stand_in(squares.sum(dim=(-2, -1)),
                                          squares[..., dims].sum(dim=(-2, -1)), dims, 32, 7)
        assert stand_in.shape == (2, 4, 1, 32)
        expected = band_temperature(q_pooled, k_pooled, dims)
        assert torch.allclose(band_temperature(stand_in, k_pooled, dims), expected, rtol=1e-6)

