"""Selection cost of the opt-in estimators on the GPU, against Prism's default.

Times ``prism.optimized.select_blocks`` per estimator at several lengths with
the paper's shapes (32 query heads, 8 KV heads, D 128, bf16, tile 128,
causal), on the structured inputs of ``bench_prism.py``, next to cuDNN dense
attention measured in the same run, and writes one JSON file::

    python benchmarks/bench_estimators.py --commit <hash> \
        --out benchmarks/results/h200_estimators_<hash>.json

Where the reference implementation fits in memory (up to 32K here) it is
timed too, and the masks of both are compared (entries that differ), and the
compact indices against the reference's ``mask_to_indices`` of that mask.
``--graph`` also times each whole selection as a CUDA-graph replay
(``graph_ms``: device time without the host's per-call cost), next to the
eager median (``ms``, what a caller sees).

``--attention`` also times the whole ``prism_attention`` call with each
setting's config (selection on the setting's mask, attention, checks; eager,
and with ``--graph`` as a replay) against cuDNN dense attention.

``--stages`` adds the cost of each stage alone (``stages`` in the JSON): the
antidiagonal scores per stride with several launch shapes of the packed
kernel (``--tunings``; achieved TFLOP/s from the ``2 * 2 * N^2/2 * D / S``
multiply-add FLOPs of its two causal passes per head), the vertical-slash
distributions and tiles (kernel and the reference's torch code on the GPU; the
second half, top-p of columns and offsets and their tiles, also alone),
the tile top-p (kernel and the reference's sort), and the finishing launch
of a whole selection (``finish``: top-p of the stride-32 probabilities, the
vertical-slash tiles, forced tiles, mask and indices in one kernel,
``prism.optimized.tile_union.union_tiles``).

To time the whole selection of the accurate preset, strides 32 and 128 with
vertical-slash, and Prism, with cuDNN in the same run::

    python benchmarks/bench_estimators.py --commit <hash> --graph \
        --only "prism (paper,accurate preset,vertical_slash stride 32,vertical_slash stride 128" \
        --out benchmarks/results/h200_estimators_<hash>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_prism import (  # noqa: E402
    bench,
    environment,
    graph_ms,
    sdpa_times,
    structured_inputs,
)

from prism import optimized, reference  # noqa: E402
from prism.reference import PrismConfig  # noqa: E402
from prism.reference.registry import estimator_spec  # noqa: E402

#: E5 and the cascade before the current preset, spelled out: the preset's fields
#: change between rounds, a labelled setting must not.
_E5 = dict(estimator="antidiagonal_vertical_slash", antidiagonal_stride=8, last_queries=64,
           high_threshold=0.9, low_threshold=0.9, vertical_slash_threshold=0.5)
_CASCADE = dict(_E5, estimator="cascade", candidate_threshold=0.99)

SETTINGS = {
    "prism (paper preset, p=0.95)": PrismConfig.preset("paper"),
    # The first accurate preset (E5).
    "antidiagonal_vertical_slash stride 8 (p=0.9, vs=0.5)": PrismConfig(**_E5),
    "antidiagonal_vertical_slash stride 32 (p=0.9, vs=0.5)":
        PrismConfig(**dict(_E5, antidiagonal_stride=32)),
    "antidiagonal_vertical_slash stride 64 (p=0.9, vs=0.5)":
        PrismConfig(**dict(_E5, antidiagonal_stride=64)),
    "antidiagonal_vertical_slash stride 128 (p=0.9, vs=0.5)":
        PrismConfig(**dict(_E5, antidiagonal_stride=128)),
    "antidiagonal stride 32 (p=0.9)": PrismConfig(estimator="antidiagonal",
                                                 antidiagonal_stride=32, high_threshold=0.9),
    "prism_vertical_slash (vs=0.5)": PrismConfig(estimator="prism_vertical_slash",
                                                 vertical_slash_threshold=0.5),
    "sampled_vertical_slash (r=4, p=0.9, vs=0.5)": PrismConfig(
        estimator="sampled_vertical_slash", sampled_queries=4, high_threshold=0.9,
        vertical_slash_threshold=0.5),
    "cascade stride 32 (c=0.99, p=0.9, vs=0.5)":
        PrismConfig(**dict(_CASCADE, antidiagonal_stride=32)),
    # The accurate preset until 2026-12-02.
    "cascade stride 8 (c=0.99, p=0.9, vs=0.5)": PrismConfig(**_CASCADE),
    # The vertical-slash stage from the last 16 queries instead of 64: one program
    # then holds a whole GQA group's rows (4 heads x 16), a quarter of the work.
    "cascade stride 32 last 16 (c=0.99, p=0.9, vs=0.5)":
        PrismConfig(**dict(_CASCADE, antidiagonal_stride=32, last_queries=16)),
    "cascade stride 8 last 16 (c=0.99, p=0.9, vs=0.5)":
        PrismConfig(**dict(_CASCADE, last_queries=16)),
    "cascade stride 8 last 32 (c=0.99, p=0.9, vs=0.5)":
        PrismConfig(**dict(_CASCADE, last_queries=32)),
    # The accurate preset from 2026-12-03 to 2026-12-05 (the last-tile rule, no
    # sampled-query stage).
    "cascade stride 16 last 32 (c=0.99, p=0.9, vs=0.5; the accurate preset until "
    "2026-12-05)": PrismConfig.preset("accurate", sampled_weight=0.0),
    # With the cascade's sampled-query stage (NOTES items 56 (c) and 58).
    "cascade stride 16 last 32 + 8 sampled w 0.3 (the accurate preset)":
        PrismConfig.preset("accurate"),
    "cascade stride 16 last 32 + 4 sampled w 0.3 (accurate preset fields)":
        PrismConfig.preset("accurate", sampled_queries=4, sampled_weight=0.3),
}
REFERENCE_MAX_TOKENS = 32768


def run(lengths, only=(), save=None, graph=False, compare=True, profile=False,
        attention=False):
    rows = []
    for n in lengths:
        q, k, v = structured_inputs(n)
        row = {"tokens": n, "sdpa_ms": sdpa_times(q, k, v), "estimators": []}
        for name, cfg in SETTINGS.items():
            if only and not any(part in name for part in only):
                continue
            entry = {"setting": name}
            entry.update(time_setting(q, k, cfg, n, graph, compare))
            if attention and "error" not in entry:
                entry["prism_attention"] = attention_times(q, k, v, cfg, graph,
                                                           row["sdpa_ms"]["cudnn"])
            if profile and "error" not in entry:
                entry["kernels"] = kernel_times(
                    lambda c=cfg, q=q, k=k: optimized.select_blocks(q, k, c))
            entry["ratio_to_cudnn_dense"] = (entry["ms"] / row["sdpa_ms"]["cudnn"]
                                             if "ms" in entry else None)
            row["estimators"].append(entry)
            print(n, entry, flush=True)
            torch.cuda.empty_cache()
        rows.append(row)
        if save is not None:  # keep the finished lengths if a later one runs out of time
            save(rows)
    return rows


def attention_times(q, k, v, cfg, graph, cudnn_ms):
    """The whole ``prism_attention`` call with ``cfg`` (selection, attention, checks):
    eager median and, with ``graph``, CUDA-graph replay ms, and cuDNN dense over each."""
    out = {"ms": bench(lambda: optimized.prism_attention(q, k, v, cfg), rep=20)}
    out["cudnn_over_eager"] = cudnn_ms / out["ms"]
    if graph:
        try:
            out["graph_ms"] = graph_ms(lambda: optimized.prism_attention(q, k, v, cfg))
            out["cudnn_over_graph"] = cudnn_ms / out["graph_ms"]
        except Exception as error:  # keep the eager numbers
            out["graph_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    return out


def kernel_times(fn, calls=5):
    """Device ms per call of each kernel ``fn`` launches (torch.profiler, CUDA events)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0)
        if device_us > 0:
            out[event.key[:60]] = {"ms_per_call": device_us / 1000 / calls,
                                   "launches_per_call": event.count / calls}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms_per_call"]))


def time_setting(q, k, cfg, n, graph=False, compare=True):
    entry = {"config": {"estimator": cfg.estimator, "high_threshold": cfg.high_threshold,
                        "antidiagonal_stride": cfg.antidiagonal_stride,
                        "vertical_slash_threshold": cfg.vertical_slash_threshold,
                        "sampled_queries": cfg.sampled_queries,
                        "last_queries": cfg.last_queries}}
    try:
        mask = optimized.select_blocks(q, k, cfg)
        if "prism_candidates" in estimator_spec(cfg.estimator).stages:
            from prism.optimized.cascade import prism_candidate_tiles_kernel

            entry["config"]["candidate_threshold"] = cfg.candidate_threshold
            entry["config"]["sampled_weight"] = cfg.sampled_weight
            cand = prism_candidate_tiles_kernel(q, k, cfg, True)
            nt = cand.shape[-1]
            entry["candidate_density"] = float(cand.sum()) / (
                cand.shape[0] * cand.shape[1] * nt * (nt + 1) / 2)
            entry["candidates_ms"] = bench(lambda: prism_candidate_tiles_kernel(q, k, cfg, True),
                                           rep=20)
            entry["candidate_stage"] = candidate_stage_times(q, k, cfg, cand, n)
        entry["ms"] = bench(lambda: optimized.select_blocks(q, k, cfg), rep=50)
        if graph:
            try:
                entry["graph_ms"] = graph_ms(lambda: optimized.select_blocks(q, k, cfg))
            except Exception as error:  # keep the eager numbers
                entry["graph_error"] = f"{type(error).__name__}: {str(error)[:200]}"
        nt = mask.shape[-1]
        entry["density"] = float(mask.sum()) / (mask.shape[0] * mask.shape[1]
                                                * nt * (nt + 1) / 2)
        if compare and n <= REFERENCE_MAX_TOKENS:
            expected = reference.select_blocks(q, k, cfg)
            entry["reference_ms"] = bench(lambda: reference.select_blocks(q, k, cfg), rep=10)
            entry["entries_differing_from_reference"] = int((mask != expected).sum())
            entry["entries_compared"] = int(mask.numel())
            num, idx = reference.mask_to_indices(mask.as_subclass(torch.Tensor))
            entry["indices_equal_reference_mask_to_indices"] = bool(
                torch.equal(mask.kv_num_blocks.long(), num.long())
                and torch.equal(mask.kv_indices.long(), idx.long()))
    except Exception as error:  # keep the other settings' numbers
        entry["error"] = f"{type(error).__name__}: {str(error)[:200]}"
    return entry


TUNINGS = ("128,128,8,3,0", "128,64,8,3,1", "128,128,4,3,1", "64,64,4,3,1")
#: Launch shapes of the candidate-restricted kernel timed at the longest length
#: (``target_rows,block_kg,num_warps,num_stages,one_pass,tma``): smaller programs
#: and key blocks skip more blocks but use the tensor cores less well.
CANDIDATE_TUNINGS = ("64,64,4,3,1,0", "32,32,4,3,1,1", "128,128,8,3,1,1")
CANDIDATE_TUNING_MIN_TOKENS = 131072


def _active_blocks(cand, layout, stride, tuning, hkv):
    """Gathered key blocks the candidate kernel scores, as a fraction of the key blocks
    the dense kernel scores, for ``tuning``'s program shape: per program, the key tiles
    where some of its rows has a candidate, ``block_kg // per_tile`` to a block."""
    b, hq, nq, nk = cand.shape
    per_tile = layout.block_size // stride
    tiles = max(1, tuning.target_rows // ((hq // hkv) * per_tile))
    block_tiles = tuning.block_kg // per_tile
    any_head = cand.view(b, hkv, hq // hkv, nq, nk).any(2)
    pad_q = -nq % tiles
    any_head = torch.nn.functional.pad(any_head, (0, 0, 0, pad_q))
    listed = any_head.view(b, hkv, (nq + pad_q) // tiles, tiles, nk).any(3).sum(-1)
    gathered = (listed + block_tiles - 1) // block_tiles
    programs = torch.arange(listed.shape[2], device=cand.device)
    # Causal: a program's key blocks reach its last query tile's diagonal.
    last_tile = torch.clamp((programs + 1) * tiles, max=nq) - 1 + layout.first_query_tile
    dense_blocks = (last_tile + 1 + block_tiles - 1) // block_tiles
    return float(gathered.sum()) / float(dense_blocks.sum() * b * hkv)


def candidate_stage_times(q, k, cfg, cand, n):
    """The antidiagonal scores alone, dense and restricted to ``cand``, with the share
    of key blocks the restricted kernel scores."""
    from prism.optimized.antidiagonal_packed import (
        PackedTuning,
        antidiagonal_packed_probabilities,
        default_tuning,
    )
    from prism.reference import tile_layout

    layout = tile_layout(n, n, cfg.block_size, True)
    stride = cfg.antidiagonal_stride
    per_tile = cfg.block_size // stride
    default = default_tuning(per_tile, q.shape[1] // k.shape[1], q.shape[-1], True)
    out = {"dense_ms": bench(lambda: antidiagonal_packed_probabilities(
        q, k, layout, stride, True, normalize=False), rep=20)}
    shapes = [("default", default)]
    if n >= CANDIDATE_TUNING_MIN_TOKENS:
        shapes += [(text, PackedTuning(*(int(x) for x in text.split(","))))
                   for text in CANDIDATE_TUNINGS]
    for name, tuning in shapes:
        try:
            out[name] = {
                "ms": bench(lambda t=tuning: antidiagonal_packed_probabilities(
                    q, k, layout, stride, True, t, normalize=False, candidates=cand), rep=20),
                "dense_ms": (out["dense_ms"] if name == "default" else bench(
                    lambda t=tuning: antidiagonal_packed_probabilities(
                        q, k, layout, stride, True, t, normalize=False), rep=20)),
                "key_blocks_scored": _active_blocks(cand, layout, stride, tuning,
                                                    k.shape[1])}
        except Exception as error:  # keep the other shapes
            out[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    return out


def use_fastest(row):
    """Put each stride's fastest measured launch shape into antidiagonal_packed.TUNED."""
    from prism.optimized import antidiagonal_packed

    chosen = {}
    for stride in sorted({entry["stride"] for entry in row["antidiagonal"]}):
        timed = [e for e in row["antidiagonal"] if e["stride"] == stride and "ms" in e
                 and e["max_abs_diff_to_default"] < 1e-4]
        if timed:
            best = min(timed, key=lambda e: e["ms"])
            values = best["tuning"].split("(", 1)[1].rstrip(")").split(", ")
            tuning = antidiagonal_packed.PackedTuning(
                **{key: int(value) for key, value in (v.split("=") for v in values)})
            antidiagonal_packed.TUNED[128 // stride] = tuning
            chosen[stride] = {"tuning": best["tuning"], "ms": best["ms"]}
    print("launch shapes used:", chosen, flush=True)
    return chosen


def use_fastest_vs(rows):
    """Put the vertical-slash launch shape with the least summed time relative to each
    length's fastest (device time, graph replay) into vertical_slash.TUNED_VS."""
    from prism.optimized import vertical_slash

    score = {}
    for row in rows:
        timed = [e for e in row["vertical_slash"].get("launch_shapes", [])
                 if "graph_ms" in e and e["max_abs_diff_to_default"] < 1e-5]
        if not timed:
            continue
        best = min(e["graph_ms"] for e in timed)
        for e in timed:
            score.setdefault(e["spec"], []).append(e["graph_ms"] / best)
    complete = {spec: sum(v) for spec, v in score.items() if len(v) == len(rows)}
    chosen = {}
    if complete:
        spec = min(complete, key=complete.get)
        if spec != "default":
            vertical_slash.TUNED_VS = vertical_slash.VSTuning(*map(int, spec.split(",")))
        chosen["distributions"] = {"spec": spec, "tuning": str(vertical_slash.TUNED_VS),
                                   "summed_ratio_to_fastest": complete[spec]}
    score = {}
    for row in rows:
        timed = [e for e in row["vertical_slash"].get("top_p_shapes", [])
                 if "graph_ms" in e and e["tiles_differing_from_default"] == 0]
        if timed:
            best = min(e["graph_ms"] for e in timed)
            for e in timed:
                score.setdefault(e["spec"], []).append(e["graph_ms"] / best)
    complete = {spec: sum(v) for spec, v in score.items() if len(v) == len(rows)}
    if complete:
        from prism.optimized import vertical_slash_tiles as vst

        spec = min(complete, key=complete.get)
        if spec != "default":
            values = [int(x) for x in spec.split(",")]
            vst.TOP_P_POINTS, vst.LONG_TOP_P_BLOCK = values[:2]
            vst.LONG_TOP_P_WARPS = values[2] if len(values) > 2 else 0
        chosen["top_p"] = {"spec": spec, "points": vst.TOP_P_POINTS,
                           "block": vst.LONG_TOP_P_BLOCK, "warps": vst.LONG_TOP_P_WARPS,
                           "summed_ratio_to_fastest": complete[spec]}
    print("vertical-slash launch shapes used:", chosen, flush=True)
    return chosen


def stage_times(lengths, strides, tunings, vs_tunings=(), tunings_everywhere=False,
                top_p_shapes=()):
    """Each stage alone at every length (packed launch shapes at the longest only,
    unless ``tunings_everywhere``; vertical-slash launch shapes at every length)."""
    out = []
    for n in lengths:
        out.append(_stage_row(n, strides, tunings if tunings_everywhere or n == max(lengths)
                              else (), vs_tunings, top_p_shapes))
        torch.cuda.empty_cache()
    return out


def _vs_shapes(q, k, layout, vs_tunings, last_queries=64):
    """The distributions of ``last_queries`` queries with each VSTuning
    (``--vs-tunings``): ms and difference."""
    from prism.optimized.vertical_slash import (
        TUNED_VS,
        VSTuning,
        last_query_distributions_kernel,
    )

    base_v, base_s = last_query_distributions_kernel(q, k, layout, last_queries, True)
    out = []
    for text in ["default", *vs_tunings]:
        tuning = TUNED_VS if text == "default" else VSTuning(*map(int, text.split(",")))
        entry = {"tuning": str(tuning), "spec": text}
        try:
            def fn(t=tuning):
                return last_query_distributions_kernel(q, k, layout, last_queries, True,
                                                       tuning=t)
            v, sl = fn()
            entry["max_abs_diff_to_default"] = float(max((v - base_v).abs().max(),
                                                         (sl - base_s).abs().max()))
            entry["ms"] = bench(fn, rep=30)
            entry["graph_ms"] = graph_ms(fn)
        except Exception as error:
            entry["error"] = f"{type(error).__name__}: {str(error)[:160]}"
        print(layout.num_key_tiles, entry, flush=True)
        out.append(entry)
    return out


def _top_p_shapes(kv, ks, layout, shapes):
    """The second half (top-p and tiles) with each ``points,block`` of the long-row
    top-p (``--top-p-shapes``): graph-replay ms, tiles differing from the default's."""
    from prism.optimized import vertical_slash_tiles as vst

    saved = (vst.TOP_P_POINTS, vst.LONG_TOP_P_BLOCK, vst.LONG_TOP_P_WARPS)
    base = vst.vertical_slash_tiles_kernel(kv, ks, layout, 0.5, True)
    out = []
    for text in ["default", *shapes]:
        entry = {"spec": text}
        try:
            if text != "default":
                values = [int(x) for x in text.split(",")]
                vst.TOP_P_POINTS, vst.LONG_TOP_P_BLOCK = values[:2]
                vst.LONG_TOP_P_WARPS = values[2] if len(values) > 2 else 0
            entry["shape"] = (f"points={vst.TOP_P_POINTS}, block={vst.LONG_TOP_P_BLOCK}, "
                              f"warps={vst.LONG_TOP_P_WARPS or 'default'}")

            def fn():
                return vst.vertical_slash_tiles_kernel(kv, ks, layout, 0.5, True)
            entry["tiles_differing_from_default"] = int((fn() != base).sum())
            entry["graph_ms"] = graph_ms(fn)
        except Exception as error:
            entry["error"] = f"{type(error).__name__}: {str(error)[:160]}"
        finally:
            vst.TOP_P_POINTS, vst.LONG_TOP_P_BLOCK, vst.LONG_TOP_P_WARPS = saved
        print(layout.num_key_tiles, entry, flush=True)
        out.append(entry)
    return out


def _stage_row(n, strides, tunings, vs_tunings=(), top_p_shapes=()):
    from prism.optimized.antidiagonal_packed import (
        PackedTuning,
        antidiagonal_packed_probabilities,
        default_tuning,
    )
    from prism.optimized.estimators import antidiagonal_tile_probabilities, tile_top_p_kernel
    from prism.optimized.vertical_slash import (
        last_query_distributions_kernel,
        vertical_slash_tile_mask,
    )
    from prism.optimized.vertical_slash_tiles import vertical_slash_tiles_kernel
    from prism.reference import tile_layout
    from prism.reference.estimators import (
        last_query_distributions,
        vertical_slash_tiles,
        vertical_slash_tiles_from_distributions,
    )
    from prism.reference.registry import top_p_tiles

    q, k, _ = structured_inputs(n)
    b, hq, _, d = q.shape
    group = hq // k.shape[1]
    layout = tile_layout(n, n, 128, True)
    row = {"tokens": n, "antidiagonal": [], "vertical_slash": {}, "tile_top_p": {}}
    for stride in strides:
        flops = 2 * 2 * (n * n / 2) * d / stride * b * hq
        base = antidiagonal_tile_probabilities(q, k, layout, stride, True)
        default = default_tuning(128 // stride, group, d)
        for tuning in [None, *(PackedTuning(*map(int, t.split(","))) for t in tunings)]:
            entry = {"stride": stride, "tuning": str(tuning or default)}
            try:
                def fn(t=tuning, s=stride):
                    return antidiagonal_packed_probabilities(q, k, layout, s, True, t)
                entry["max_abs_diff_to_default"] = float((fn() - base).abs().max())
                entry["ms"] = bench(fn, rep=30)
                entry["tflops"] = flops / entry["ms"] / 1e9
            except Exception as error:
                entry["error"] = f"{type(error).__name__}: {str(error)[:160]}"
            row["antidiagonal"].append(entry)
            print(n, entry, flush=True)
        torch.cuda.empty_cache()
    vs = row["vertical_slash"]
    vs["distributions_kernel_ms"] = bench(
        lambda: last_query_distributions_kernel(q, k, layout, 64, True), rep=30)
    vs["launch_shapes"] = _vs_shapes(q, k, layout, vs_tunings)
    vs["tiles_kernel_ms"] = bench(
        lambda: vertical_slash_tile_mask(q, k, layout, 64, 0.5, True), rep=30)
    if n <= 32768:
        kv, ks = last_query_distributions_kernel(q, k, layout, 64, True)
        rv, rs = last_query_distributions(q, k, layout, 64, True)
        vs["max_abs_diff_vertical"] = float((kv - rv).abs().max())
        vs["max_abs_diff_slash"] = float((ks - rs).abs().max())
        vs["tiles_differing"] = int((vertical_slash_tile_mask(q, k, layout, 64, 0.5, True)
                                     != vertical_slash_tiles(q, k, layout, 64, 0.5, True)).sum())
    vs["tiles_reference_torch_ms"] = bench(
        lambda: vertical_slash_tiles(q, k, layout, 64, 0.5, True), rep=30)
    # The second half alone: top-p of columns and offsets and their tiles.
    kv, ks = last_query_distributions_kernel(q, k, layout, 64, True)
    vs["second_half_kernel_ms"] = bench(
        lambda: vertical_slash_tiles_kernel(kv, ks, layout, 0.5, True), rep=30)
    vs["top_p_shapes"] = _top_p_shapes(kv, ks, layout, top_p_shapes)
    vs["second_half_reference_torch_ms"] = bench(
        lambda: vertical_slash_tiles_from_distributions(kv, ks, layout, 0.5, True), rep=30)
    vs["second_half_tiles_differing"] = int(
        (vertical_slash_tiles_kernel(kv, ks, layout, 0.5, True)
         != vertical_slash_tiles_from_distributions(kv, ks, layout, 0.5, True)).sum())
    print(n, vs, flush=True)
    probs = antidiagonal_tile_probabilities(q, k, layout, 32, True)
    tp = row["tile_top_p"]
    tp["kernel_ms"] = bench(lambda: tile_top_p_kernel(probs, layout, True, 0.9), rep=30)
    tp["reference_sort_ms"] = bench(lambda: top_p_tiles(probs, layout, True, 0.9), rep=30)
    tp["tiles_differing"] = int((tile_top_p_kernel(probs, layout, True, 0.9)
                                 != top_p_tiles(probs, layout, True, 0.9)).sum())
    print(n, tp, flush=True)
    row["finish"] = _finish_times(q, k, layout, probs)
    print(n, row["finish"], flush=True)
    return row


def _finish_times(q, k, layout, probs):
    """The finishing launch of a whole selection alone (eager and graph-replay ms)."""
    from prism.optimized.tile_union import union_tiles
    from prism.optimized.vertical_slash import last_query_distributions_kernel
    from prism.optimized.vertical_slash_tiles import vertical_slash_bins

    kv, ks = last_query_distributions_kernel(q, k, layout, 64, True)
    columns, diagonals, _, _ = vertical_slash_bins(kv, ks, layout, 0.5, True)

    def finish():
        return union_tiles(layout, True, probs.shape[:2], probs=probs, normalize=True,
                           threshold=0.9, columns=columns, diagonals=diagonals,
                           force_sink=True, force_diagonal=True, write_indices=True)

    out = {"kernel_ms": bench(finish, rep=30)}
    try:
        out["graph_ms"] = graph_ms(finish)
    except Exception as error:
        out["graph_error"] = f"{type(error).__name__}: {str(error)[:160]}"
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--stages", action="store_true",
                        help="also time each stage alone (see the module docstring)")
    parser.add_argument("--strides", default="32,64,128")
    parser.add_argument("--tunings", default=";".join(TUNINGS),
                        help="packed-kernel launch shapes timed at the longest length: "
                             "rows,key_groups,warps,stages[,one_pass[,tma]] separated by ';'")
    parser.add_argument("--vs-tunings", default="",
                        help="vertical-slash launch shapes timed at every length with "
                             "--stages: max_rows,block_n,stats_block_n,num_warps,num_stages,"
                             "programs separated by ';'")
    parser.add_argument("--top-p-shapes", default="",
                        help="long-row top-p shapes timed at every length with --stages: "
                             "points,block[,warps] separated by ';'")
    parser.add_argument("--tunings-everywhere", action="store_true",
                        help="time the packed-kernel launch shapes at every length")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the reference's selection (mask comparison)")
    parser.add_argument("--before", default=None,
                        help="a JSON of this script from an earlier tree in the same "
                             "session; its rows are kept under 'before'")
    parser.add_argument("--profile", action="store_true",
                        help="device time per kernel of each whole selection "
                             "(torch.profiler, 5 calls)")
    parser.add_argument("--use-fastest", action="store_true",
                        help="with --stages: run the settings with each stride's fastest "
                             "launch shape at the longest length (antidiagonal_packed.TUNED)")
    parser.add_argument("--only", default="",
                        help="run only the settings whose name contains one of these "
                             "comma-separated parts")
    parser.add_argument("--graph", action="store_true",
                        help="also time each whole selection as a CUDA-graph replay")
    parser.add_argument("--attention", action="store_true",
                        help="also time the whole prism_attention call of each setting "
                             "against cuDNN dense attention")
    parser.add_argument("--skip-settings", action="store_true",
                        help="only the stages, not the whole selection per setting")
    parser.add_argument("--union-shapes", default="",
                        help="finishing-launch shapes timed one after another with "
                             "--only's settings: tile_union.ELEMENTS_PER_THREAD values "
                             "separated by ','")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_estimators.py needs a CUDA GPU")
    started = time.time()
    lengths = [int(x) for x in args.lengths.split(",")]
    result = {"environment": environment(args.commit), "rows": []}
    if args.before:
        with open(args.before) as f:
            result["before"] = json.load(f)
    if args.stages:
        result["stages"] = stage_times(lengths, [int(x) for x in args.strides.split(",")],
                                       [t for t in args.tunings.split(";") if t],
                                       [t for t in args.vs_tunings.split(";") if t],
                                       args.tunings_everywhere,
                                       [t for t in args.top_p_shapes.split(";") if t])
        if args.use_fastest:
            result["tuning_used"] = use_fastest(result["stages"][-1])
            result["vs_tuning_used"] = use_fastest_vs(result["stages"])
            # Call plans keep the launch shapes they were recorded with.
            from prism.optimized import call_plan

            call_plan._PLANS.clear()
        if args.out:  # keep the stage numbers even if the settings run out of time
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    def save(rows):
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**result, "rows": rows}, f, indent=1)

    only = [part for part in args.only.split(",") if part]
    if args.union_shapes:
        from prism.optimized import call_plan, tile_union

        result["union_shapes"] = {}
        default = tile_union.ELEMENTS_PER_THREAD
        for elements in args.union_shapes.split(","):
            tile_union.ELEMENTS_PER_THREAD = int(elements)
            call_plan._PLANS.clear()  # plans keep the launch shapes they were recorded with
            result["union_shapes"][elements] = run(lengths, only, None, args.graph, False, True)
            save(result["rows"])
        tile_union.ELEMENTS_PER_THREAD = default
        call_plan._PLANS.clear()
    if not args.skip_settings:
        result["rows"] = run(lengths, only, save,
                             args.graph, not args.no_reference, args.profile, args.attention)
    result["wall_s"] = time.time() - started
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
