"""Context-parallel Prism on CUDA tensors against single-device Prism, on one GPU.

One process per rank, every rank on the same GPU. A world of one runs with
NCCL; NCCL refuses two ranks on one device, so the two-rank run uses the gloo
backend on the CUDA tensors when this torch build allows it (it exercises the
remote-tile path and the Triton attention kernel on fetched tiles). Each case
compares the reassembled output and LSE with :func:`prism.prism_attention` on
the whole sequence (the Triton kernels) and the masks up to boundary ties.

Usage::

    python benchmarks/check_distributed_cuda.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BLOCK = 64
CASES = {
    # name: (batch, q_heads, kv_heads, n_queries, n_keys, causal, layout, dtype)
    "causal_zigzag_bf16": (1, 8, 2, 4096, 4096, True, "zigzag", torch.bfloat16),
    "causal_prefix_contiguous_bf16": (1, 8, 2, 3000, 4096 - 37, True, "contiguous",
                                      torch.bfloat16),
    "noncausal_zigzag_fp16": (2, 4, 4, 2048, 2500, False, "zigzag", torch.float16),
}


def _inputs(case, seed=0):
    from prism.reference import apply_rope

    b, hq, hkv, nq, nk, causal, _, dtype = case
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, nq, 64, device="cuda", generator=gen)
    k = torch.randn(b, hkv, nk, 64, device="cuda", generator=gen)
    v = torch.randn(b, hkv, nk, 64, device="cuda", generator=gen)
    start = nk - nq if causal else 0
    q = apply_rope(q * 3.0, 1e4, positions=torch.arange(start, start + nq, device="cuda"))
    k = apply_rope(k * 3.0, 1e4, positions=torch.arange(nk, device="cuda"))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _worker(rank, world_size, backend, store_path, out_dir):
    from prism.distributed import ShardPlan, context_parallel_prism_attention

    torch.cuda.set_device(0)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    results = {}
    try:
        for name, case in CASES.items():
            q, k, v = _inputs(case)
            b, hq, hkv, nq, nk, causal, layout, _ = case
            plan = ShardPlan.split(nq, nk, world_size, layout=layout, block_size=BLOCK,
                                   causal=causal)
            try:
                o, lse, mask, stats = context_parallel_prism_attention(
                    plan.shard(q, rank, "query"), plan.shard(k, rank, "key"),
                    plan.shard(v, rank, "key"), causal=causal, layout=layout,
                    block_size=BLOCK, high_threshold=0.9, low_threshold=0.9,
                    return_lse=True, return_mask=True, return_stats=True)
                results[name] = dict(o=o.cpu(), lse=lse.cpu(), mask=mask.cpu(),
                                     received=stats.kv_tiles_received,
                                     admissible=stats.admissible_kv_tiles)
            except Exception:  # recorded for the report, then the next case
                results[name] = dict(error=traceback.format_exc(limit=4))
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _compare(world_size, backend, folder):
    import prism
    from prism.distributed import ShardPlan
    from prism.reference import boundary_ties, mask_differences

    ranks = [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(world_size)]
    report = {}
    for name, case in CASES.items():
        if any("error" in r[name] for r in ranks):
            report[name] = {"error": next(r[name]["error"] for r in ranks if "error" in r[name])}
            continue
        q, k, v = _inputs(case)
        b, hq, hkv, nq, nk, causal, layout, _ = case
        plan = ShardPlan.split(nq, nk, world_size, layout=layout, block_size=BLOCK,
                               causal=causal)
        o_ref, lse_ref, mask_ref = prism.prism_attention(
            q, k, v, causal=causal, block_size=BLOCK, high_threshold=0.9, low_threshold=0.9,
            return_lse=True, return_mask=True)
        o = plan.unshard([r[name]["o"] for r in ranks], "query").cuda()
        lse = plan.unshard([r[name]["lse"] for r in ranks], "query").cuda()
        rows = torch.zeros(b, hq, plan.num_query_tiles, plan.num_key_tiles, dtype=torch.bool)
        for rank, r in enumerate(ranks):
            rows[:, :, plan.tiles(rank, "query") - plan.first_query_tile] = r[name]["mask"]
        ties = boundary_ties(q.float().cpu(), k.float().cpu(), causal=causal,
                             block_size=BLOCK, high_threshold=0.9, low_threshold=0.9)
        diff = mask_differences(rows, mask_ref.bool().cpu(), ties)
        error = ((o.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
        finite = torch.isfinite(lse_ref)
        lse_error = (lse[finite] - lse_ref[finite]).abs().max().item()
        report[name] = {"relative_error_o": error, "max_abs_error_lse": lse_error,
                        "mask_entries_differing_outside_ties": int(diff.shape[0]),
                        "kv_tiles_received": [r[name]["received"] for r in ranks],
                        "admissible_kv_tiles": [r[name]["admissible"] for r in ranks]}
    return report


def main(out_path):
    import prism

    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "prism": prism.__version__, "block_size": BLOCK, "runs": {}}
    for world_size, backend in ((1, "nccl"), (2, "gloo")):
        with tempfile.TemporaryDirectory() as folder:
            label = f"{world_size}x{backend}"
            try:
                mp.spawn(_worker, args=(world_size, backend, os.path.join(folder, "store"),
                                        folder), nprocs=world_size, join=True)
                results["runs"][label] = _compare(world_size, backend, folder)
            except Exception:
                results["runs"][label] = {"error": traceback.format_exc(limit=6)}
        print(label, json.dumps(results["runs"][label], indent=1)[:2000], flush=True)
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
