"""Write the golden set: run the reference on every case and save what it returns.

``python -m prism.reference.golden_writer OUT_DIR`` (or the older
``python -m prism.reference.golden OUT_DIR``) writes ``manifest.json`` and
``cases.npz``; docs/golden.rst describes both. The oracle's core modules never
import this one: it only drives them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .attention import block_sparse_attention
from .config import ESTIMATOR_FIELDS, TIE_MARGIN, TIE_RELATIVE, resolve_config
from .golden import ARRAYS, CONTRACT, FORMAT_VERSION, MANIFEST, TOLERANCE_RULE
from .golden_cases import CASES, MISREADINGS, GoldenCase, make_inputs
from .golden_estimator_cases import ESTIMATOR_CASES, ESTIMATOR_MISREADINGS
from .select import boundary_ties, select_blocks
from .tolerances import RTOL, attention_tolerances, lse_magnitude


def expected_results(case: GoldenCase, q, k, v) -> dict[str, torch.Tensor]:
    """The reference's ``mask``, ``ties``, ``attn_mask``, ``out`` and ``lse`` for a case."""
    cfg = resolve_config(None, **case.config)
    mask = select_blocks(q, k, cfg, causal=case.causal)
    # For an estimator's case, the ties of every top-p decision of its selection.
    ties = boundary_ties(q, k, cfg, causal=case.causal, margin=TIE_MARGIN,
                         relative=TIE_RELATIVE)
    attn_mask = mask.clone()
    for row in case.empty_rows:
        attn_mask[:, :, row] = False
    out, lse = block_sparse_attention(q, k, v, attn_mask, block_size=cfg.block_size,
                                      causal=case.causal, scale=case.scale, return_lse=True)
    return {"mask": mask, "ties": ties, "attn_mask": attn_mask, "out": out, "lse": lse}


def _as_array(tensor: torch.Tensor) -> np.ndarray:
    # fp16 and bf16 values are exact in fp32, and NumPy has no bf16.
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return tensor.numpy()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recorded_config(cfg) -> dict:
    """The config a port is called with: every field, except that Prism's own cases (the
    contract's set) leave out the estimator fields, which are then at their defaults."""
    fields = dataclasses.asdict(cfg)
    if cfg.estimator == "prism":
        return {name: value for name, value in fields.items() if name not in ESTIMATOR_FIELDS}
    return fields


def case_entry(case: GoldenCase, q, k, v, results) -> dict:
    """The manifest record of one case."""
    cfg = resolve_config(None, **case.config)
    tol = attention_tolerances(q, k, v, case.scale, exact_logits=case.kind == "integers",
                               lse_magnitude=lse_magnitude(results["lse"]))
    tensors = {"q": q, "k": k, "v": v, **results}
    return {
        "name": case.name,
        "description": case.description,
        "catches": list(case.catches),
        "causal": case.causal,
        "scale": case.scale,
        "dtype": case.dtype,
        "config": _recorded_config(cfg),
        "rope_base": case.rope_base,
        "input_kind": case.kind,
        "seed": case.seed,
        "empty_rows": list(case.empty_rows),
        "shapes": {key: list(t.shape) for key, t in tensors.items()},
        "dtypes": {key: str(_as_array(t).dtype) for key, t in tensors.items()},
        "selected_tiles": int(results["mask"].sum()),
        "boundary_ties": int(results["ties"].sum()),
        "logit_bound": tol["logit_bound"],
        "exact_logits": case.kind == "integers",
        "tolerance": {"out": tol["out"], "lse": tol["lse"]},
    }


#: The two sets by name: Prism's (contract §2-§7) and the estimators'
#: (docs/estimators.rst), each as (cases, the misreadings they are built to catch, its
#: folder under a golden root such as tests/golden).
SETS = {"prism": (CASES, MISREADINGS, "."),
        "estimators": (ESTIMATOR_CASES, ESTIMATOR_MISREADINGS, "estimators")}


def write_golden(out_dir, cases=CASES, misreadings=MISREADINGS) -> Path:
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
        for key, tensor in {"q": q, "k": k, "v": v, **results}.items():
            arrays[f"{case.name}/{key}"] = _as_array(tensor)
        entries.append(case_entry(case, q, k, v, results))
    array_path = out_dir / ARRAYS
    np.savez_compressed(array_path, **arrays)
    manifest = {
        "format_version": FORMAT_VERSION,
        "semantics": CONTRACT,
        "generator": "python -m prism.reference.golden_writer",
        "prism_version": __version__,
        "torch_version": torch.__version__,
        "arrays": ARRAYS,
        "arrays_sha256": _sha256(array_path),
        "tie_margin": TIE_MARGIN,
        "tie_relative": TIE_RELATIVE,
        "rtol": RTOL,
        "tolerance_rule": TOLERANCE_RULE,
        "misreadings": misreadings,
        "cases": entries,
    }
    manifest_path = out_dir / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest_path


def main(argv=None) -> int:
    """``python -m prism.reference.golden_writer OUT_DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m prism.reference.golden_writer",
        description="Write Prism's golden vectors (inputs, masks, outputs, LSE) for ports.")
    parser.add_argument("out_dir", help="folder for manifest.json and cases.npz")
    parser.add_argument("--set", choices=sorted(SETS), default="prism",
                        help="Prism's cases (contract §2-§7, the default) or the "
                             "estimators' (docs/estimators.rst)")
    args = parser.parse_args(argv)
    cases, misreadings, _ = SETS[args.set]
    manifest = write_golden(args.out_dir, cases, misreadings)
    size = sum(p.stat().st_size for p in manifest.parent.iterdir() if p.is_file())
    print(f"wrote {len(cases)} cases to {manifest.parent} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
