"""Golden vectors: a small, versioned set of inputs with the reference's expected results.

A port of Prism to another framework (JAX, MLX, a CUDA kernel) checks itself
against these files without running PyTorch:

    python -m prism.reference.golden OUT_DIR

writes ``OUT_DIR/manifest.json`` and ``OUT_DIR/cases.npz``. Each case holds
the inputs ``q``, ``k``, ``v`` (fp32, RoPE already applied) and what
:mod:`prism.reference` returns for them: the tile ``mask`` of
:func:`select_blocks`, the ``ties`` it may legitimately disagree on
(:func:`boundary_ties`), and the output ``out`` and ``lse`` of
:func:`block_sparse_attention` on that mask. The manifest records the format
version, the configuration, causality, scale and array shapes of every case,
and the SHA-256 of the array file. docs/golden.rst describes the format; the
committed set lives in ``tests/golden/``.

Cases cover both RoPE layouts, GQA, a KV prefix that is not a tile multiple, a
partial last tile, non-causal attention, an uncalibrated configuration with
custom bands and no forced tiles, and a single query.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .attention import block_sparse_attention
from .config import ESTIMATOR_FIELDS, TIE_MARGIN, resolve_config
from .rope import apply_rope
from .select import boundary_ties, select_blocks

#: Bumped whenever the file layout or the meaning of a field changes.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "cases.npz"
#: Tolerances a port should meet on fp32 inputs (CONVENTIONS.md's fp32 row).
TOLERANCES = {"out": 1e-5, "lse": 1e-5}


@dataclass(frozen=True)
class GoldenCase:
    """One golden case: shapes, settings and the seed of its inputs."""

    name: str
    description: str
    batch: int
    q_heads: int
    kv_heads: int
    num_queries: int
    num_keys: int
    head_dim: int
    value_dim: int
    causal: bool = True
    scale: float | None = None
    rope_base: float = 10000.0
    seed: int = 0
    config: dict = field(default_factory=dict)


CASES = (
    GoldenCase("causal_half", "causal, Nq = Nk = 12 tiles of 8, rotate-half RoPE, D = 32",
               1, 2, 2, 96, 96, 32, 32, seed=1,
               config={"block_size": 8, "high_threshold": 0.8, "low_threshold": 0.85}),
    GoldenCase("causal_interleaved", "as causal_half with interleaved (GPT-J) RoPE pairs",
               1, 2, 2, 96, 96, 32, 32, seed=2,
               config={"block_size": 8, "high_threshold": 0.8, "low_threshold": 0.85,
                       "rope_layout": "interleaved"}),
    GoldenCase("gqa", "GQA: 4 query heads read 1 KV head, batch 2",
               2, 4, 1, 80, 80, 16, 16, seed=3,
               config={"block_size": 8, "high_threshold": 0.8, "low_threshold": 0.85}),
    GoldenCase("kv_prefix", "causal with a 55-token KV prefix: the first query tile holds 1 query",
               1, 2, 1, 45, 100, 16, 16, seed=4,
               config={"block_size": 8, "high_threshold": 0.8, "low_threshold": 0.85}),
    GoldenCase("partial_tile", "Nq = Nk = 71: the last tile holds 7 of 8 tokens",
               1, 2, 2, 71, 71, 16, 16, seed=5,
               config={"block_size": 8, "high_threshold": 0.8, "low_threshold": 0.85}),
    GoldenCase("non_causal", "non-causal, 40 queries on their own grid, 72 keys",
               1, 2, 2, 40, 72, 16, 16, causal=False, seed=6,
               config={"block_size": 8, "high_threshold": 0.8, "low_threshold": 0.8}),
    GoldenCase("uncalibrated", "calibrate off with band temperatures, custom bands, "
               "no sink or diagonal forced, scale 0.3, Dv != D",
               1, 2, 1, 64, 64, 16, 8, scale=0.3, seed=7,
               config={"block_size": 8, "high_dim": 6, "low_dim": 10, "calibrate": False,
                       "high_temperature": 0.5, "low_temperature": 2.0,
                       "high_threshold": 0.7, "low_threshold": 0.7,
                       "force_sink": False, "force_diagonal": False}),
    GoldenCase("single_query", "one query at position 49 (a decode step)",
               1, 2, 1, 1, 50, 16, 16, seed=8,
               config={"block_size": 8, "high_threshold": 0.8, "low_threshold": 0.8}),
)


def make_inputs(case: GoldenCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic fp32 ``q, k, v`` of a case, RoPE applied with the case's layout.

    Random vectors pool to nearly nothing, which would make every selection
    trivially dense. So each head gets a fixed query and key direction, and the
    keys carry it with an amplitude that changes every 8 tokens: some key tiles
    then matter more than others, in both bands, as in a real model.
    """
    gen = torch.Generator().manual_seed(case.seed)
    b, hq, hkv, d = case.batch, case.q_heads, case.kv_heads, case.head_dim
    nq, nk = case.num_queries, case.num_keys
    q_dir = torch.randn(b, hq, 1, d, generator=gen)
    k_dir = torch.randn(b, hkv, 1, d, generator=gen)
    amplitude = 3.0 * torch.rand(b, hkv, -(-nk // 8), 1, generator=gen)
    amplitude = amplitude.repeat_interleave(8, dim=2)[:, :, :nk]
    q = q_dir + torch.randn(b, hq, nq, d, generator=gen)
    k = amplitude * k_dir + torch.randn(b, hkv, nk, d, generator=gen)
    v = torch.randn(b, hkv, nk, case.value_dim, generator=gen)
    layout = case.config.get("rope_layout", "half")
    query_start = nk - nq if case.causal else 0
    q = apply_rope(q, case.rope_base, rope_layout=layout, start=query_start)
    k = apply_rope(k, case.rope_base, rope_layout=layout)
    return q.float(), k.float(), v.float()


def expected_results(case: GoldenCase, q, k, v) -> dict[str, torch.Tensor]:
    """The reference's ``mask``, ``ties``, ``out`` and ``lse`` for one case's inputs."""
    cfg = resolve_config(None, **case.config)
    mask = select_blocks(q, k, cfg, causal=case.causal)
    ties = boundary_ties(q, k, cfg, causal=case.causal, margin=TIE_MARGIN)
    out, lse = block_sparse_attention(q, k, v, mask, block_size=cfg.block_size,
                                      causal=case.causal, scale=case.scale, return_lse=True)
    return {"mask": mask, "ties": ties, "out": out, "lse": lse}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_golden(out_dir, cases=CASES) -> Path:
    """Write ``manifest.json`` and ``cases.npz`` for ``cases`` into ``out_dir``.

    Returns
    -------
    Path of the manifest.
    """
    from prism import __version__

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays, entries = {}, []
    for case in cases:
        q, k, v = make_inputs(case)
        results = expected_results(case, q, k, v)
        tensors = {"q": q, "k": k, "v": v, **results}
        for key, tensor in tensors.items():
            arrays[f"{case.name}/{key}"] = tensor.numpy()
        cfg = resolve_config(None, **case.config)
        entries.append({
            "name": case.name,
            "description": case.description,
            "causal": case.causal,
            "scale": case.scale,
            # SPEC v1 cases: the estimator fields are at their defaults and not recorded.
            "config": {name: value for name, value in dataclasses.asdict(cfg).items()
                       if name not in ESTIMATOR_FIELDS},
            "rope_base": case.rope_base,
            "seed": case.seed,
            "shapes": {key: list(t.shape) for key, t in tensors.items()},
            "dtypes": {key: str(t.numpy().dtype) for key, t in tensors.items()},
            "selected_tiles": int(results["mask"].sum()),
            "boundary_ties": int(results["ties"].sum()),
        })
    array_path = out_dir / ARRAYS
    np.savez_compressed(array_path, **arrays)
    manifest = {
        "format_version": FORMAT_VERSION,
        "semantics": "SPEC.md v1 (prism.reference)",
        "generator": "python -m prism.reference.golden",
        "prism_version": __version__,
        "torch_version": torch.__version__,
        "arrays": ARRAYS,
        "arrays_sha256": _sha256(array_path),
        "tie_margin": TIE_MARGIN,
        "tolerances": TOLERANCES,
        "cases": entries,
    }
    manifest_path = out_dir / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest_path


def load_golden(directory) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Read a golden set: the manifest and, per case name, its arrays.

    Raises
    ------
    ValueError
        If the format version is unknown or the array file's hash does not
        match the manifest (a truncated or edited file).
    """
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / MANIFEST} has format_version {manifest.get('format_version')!r}; "
            f"this reader understands {FORMAT_VERSION}: regenerate the set with "
            "python -m prism.reference.golden"
        )
    array_path = directory / manifest["arrays"]
    digest = _sha256(array_path)
    if digest != manifest["arrays_sha256"]:
        raise ValueError(
            f"{array_path} has SHA-256 {digest}, the manifest says "
            f"{manifest['arrays_sha256']}: the arrays were changed or truncated"
        )
    arrays: dict[str, dict[str, np.ndarray]] = {}
    with np.load(array_path) as data:
        for key in data.files:
            case, name = key.split("/", 1)
            arrays.setdefault(case, {})[name] = data[key]
    return manifest, arrays


def main(argv=None) -> int:
    """``python -m prism.reference.golden OUT_DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m prism.reference.golden",
        description="Write Prism's golden vectors (inputs, masks, outputs, LSE) for ports.")
    parser.add_argument("out_dir", help="folder for manifest.json and cases.npz")
    args = parser.parse_args(argv)
    manifest = write_golden(args.out_dir)
    size = sum(p.stat().st_size for p in manifest.parent.iterdir() if p.is_file())
    print(f"wrote {len(CASES)} cases to {manifest.parent} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
