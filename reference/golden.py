"""Golden vectors: read a versioned set of inputs with the reference's results, and
compare a port's results with it.

A port of Prism to another framework (JAX, MLX, a CUDA kernel) checks itself
against these files without running PyTorch. Each case holds the inputs
``q``, ``k``, ``v`` (RoPE already applied) and what :mod:`prism.reference`
returns for them: the tile ``mask`` of ``select_blocks``, the ``ties`` on which
a correct port may disagree (``boundary_ties``), the ``attn_mask`` that
attention ran on (the mask, with some rows cleared in a few cases), and
``out`` and ``lse``. docs/golden.rst describes the format; the committed set
lives in ``tests/golden/``. :mod:`prism.reference.golden_writer` writes a set
(``python -m prism.reference.golden OUT_DIR`` still works and calls it), and
:mod:`prism.reference.check` runs a port against one.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

#: Bumped whenever the file layout or the meaning of a field changes.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ARRAYS = "cases.npz"
#: The contract a set encodes: the page and its version.
CONTRACT = "docs/semantics.rst, contract v1.1 (prism.reference)"
#: How the per-case tolerances of the manifest were computed (contract §10).
TOLERANCE_RULE = (
    "max|out - expected| <= tolerance.out = max|v| * (rtol[dtype] + rtol[float32] * L) "
    "(L = 0 when exact_logits); max|lse - expected| over finite entries <= "
    "tolerance.lse = rtol[float32] * (1 + L + max|expected lse|), and -inf entries equal; "
    "L = logit_bound = |scale| * max_p ||q_p|| * max_n ||k_n||"
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
            "python -m prism.reference.golden_writer OUT_DIR"
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


def compare_mask(entry: dict, arrays: dict, mask) -> list[str]:
    """Problems of a port's selection mask for one case; empty when it agrees.

    The mask must have the expected shape and equal the stored one wherever
    ``ties`` is false.
    """
    expected = arrays["mask"]
    mask = np.asarray(mask)
    if mask.shape != expected.shape:
        return [f"mask shape {mask.shape}, expected {expected.shape}"]
    differ = (mask.astype(bool) != expected) & ~arrays["ties"]
    if not differ.any():
        return []
    where = [tuple(int(i) for i in idx) for idx in np.argwhere(differ)[:5]]
    return [f"mask differs outside the boundary ties at {int(differ.sum())} entries "
            f"(b, h, query tile row, key tile), first {where}"]


def compare_attention(entry: dict, arrays: dict, out, lse=None) -> list[str]:
    """Problems of a port's ``out`` (and ``lse``) for one case, against its tolerances."""
    problems = []
    expected_out, expected_lse = arrays["out"].astype(np.float64), arrays["lse"]
    out = np.asarray(out, dtype=np.float64)
    tol = entry["tolerance"]
    if out.shape != expected_out.shape:
        problems.append(f"out shape {out.shape}, expected {expected_out.shape}")
    elif out.size:
        err = np.abs(out - expected_out).max()
        if not err <= tol["out"]:
            problems.append(f"out differs by {err:.3g} > tolerance {tol['out']:.3g}")
    if lse is None:
        return problems
    lse = np.asarray(lse, dtype=np.float64)
    if lse.shape != expected_lse.shape:
        return problems + [f"lse shape {lse.shape}, expected {expected_lse.shape}"]
    finite = np.isfinite(expected_lse)
    if np.isnan(lse).any() or not np.array_equal(np.isfinite(lse), finite) or not np.array_equal(
            lse[~finite], expected_lse[~finite]):
        problems.append(f"lse is NaN or infinite where it should not be ({int((~finite).sum())}"
                        " rows read no key and must be -inf, the others finite)")
    elif finite.any():
        err = np.abs(lse[finite] - expected_lse[finite]).max()
        if not err <= tol["lse"]:
            problems.append(f"lse differs by {err:.3g} > tolerance {tol['lse']:.3g}")
    return problems


def main(argv=None) -> int:
    """``python -m prism.reference.golden OUT_DIR``: the writer's command, kept for old docs."""
    from .golden_writer import main as write_main

    return write_main(argv)


if __name__ == "__main__":
    sys.exit(main())
