"""Contract §10: how close another implementation's outputs must be.

Masks are compared exactly, outside the boundary ties of contract §6. Outputs
and log-sum-exps are compared with absolute tolerances that follow from how
fp32 rounds the attention scores: an error of about ``eps * |s|`` in a score
``s`` moves the softmax weights by that much, so the tolerance grows with the
largest logit the inputs can produce. One table of relative tolerances by
dtype feeds the formulas below; the golden manifest records both the table and
each case's resulting tolerances, and the tests import the same table.
"""

from __future__ import annotations

import math

import torch

#: Relative tolerance by dtype: the fp32 row bounds rounding in the fp32
#: scores and sums; the fp16 and bf16 rows bound the rounding of the output
#: to those dtypes (2**-11 and 2**-8 relative) with room to spare.
RTOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


def dtype_name(dtype) -> str:
    """``"float32"``, ``"float16"`` or ``"bfloat16"`` for a torch dtype or that name."""
    name = str(dtype).replace("torch.", "")
    if name not in RTOL:
        raise ValueError(f"dtype must be one of {sorted(RTOL)}, got {dtype!r}")
    return name


def logit_bound(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> float:
    """``L = |scale| * max_p ||q_p|| * max_n ||k_n||``: no scaled score exceeds it.

    Parameters
    ----------
    q : Tensor (B, Hq, Nq, D)
    k : Tensor (B, Hkv, Nk, D)
    scale : float, optional
        Softmax scale; ``None`` means ``1 / sqrt(D)``.
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    q_norm = torch.linalg.vector_norm(q.double(), dim=-1).max().item()
    k_norm = torch.linalg.vector_norm(k.double(), dim=-1).max().item()
    return abs(scale) * q_norm * k_norm


def lse_magnitude(expected_lse) -> float:
    """``max|lse_ref|`` over the finite entries of the reference ``lse`` (0 if none).

    The magnitude term of contract §10's bound on ``lse``; pass it to
    :func:`attention_tolerances` as ``lse_magnitude``.
    """
    lse = torch.as_tensor(expected_lse).double()
    finite = lse[torch.isfinite(lse)]
    return finite.abs().max().item() if finite.numel() else 0.0


def attention_tolerances(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float | None = None, *, exact_logits: bool = False,
                         lse_magnitude: float | None = None) -> dict[str, float]:
    """Absolute tolerances on ``o`` and ``lse`` for these inputs (contract §10).

    ``tol_o = max|v| * (rtol[dtype of q] + rtol[fp32] * L)`` and
    ``tol_lse = rtol[fp32] * (1 + L + max|lse_ref|)``, with ``L`` from
    :func:`logit_bound`. ``exact_logits=True`` declares inputs whose fp32
    scores are exact in any summation order (small integers and a
    power-of-two scale); ``L`` is then 0 in ``tol_o``.

    ``lse_magnitude`` is ``max|lse_ref|`` over the reference's finite ``lse``
    entries (:func:`lse_magnitude` computes it); callers that compare against
    a reference ``lse`` pass it, as the golden writer and the test helpers do.
    Without it ``L`` stands in for ``max|lse_ref|`` (the reference ``lse`` is
    not known here), which is not the contract's bound.

    Returns
    -------
    dict with keys ``"out"``, ``"lse"`` and ``"logit_bound"``.
    """
    bound = logit_bound(q, k, scale)
    v_max = v.double().abs().max().item() if v.numel() else 0.0
    rtol32 = RTOL["float32"]
    score_term = 0.0 if exact_logits else rtol32 * bound
    out_tol = v_max * (RTOL[dtype_name(q.dtype)] + score_term)
    lse_mag = bound if lse_magnitude is None else lse_magnitude
    lse_tol = rtol32 * (1.0 + bound + lse_mag)
    return {"out": out_tol, "lse": lse_tol, "logit_bound": bound}


def attention_errors(out, lse, expected_out, expected_lse) -> dict[str, float]:
    """Largest absolute differences of ``o`` and of the finite ``lse`` entries.

    ``lse`` entries that are ``-inf`` in one result and not in the other (a row
    that reads no key in only one of them) make ``"lse"`` infinite, as does
    any NaN.
    """
    out = torch.as_tensor(out).double()
    expected_out = torch.as_tensor(expected_out).double()
    lse = torch.as_tensor(lse).double()
    expected_lse = torch.as_tensor(expected_lse).double()
    if out.shape != expected_out.shape or lse.shape != expected_lse.shape:
        return {"out": math.inf, "lse": math.inf}
    out_err = (out - expected_out).abs().max().item() if out.numel() else 0.0
    if math.isnan(out_err):
        out_err = math.inf
    finite = torch.isfinite(expected_lse)
    if (not torch.equal(finite, torch.isfinite(lse)) or bool(torch.isnan(lse).any())
            or not torch.equal(lse[~finite], expected_lse[~finite])):
        lse_err = math.inf
    elif bool(finite.any()):
        lse_err = (lse[finite] - expected_lse[finite]).abs().max().item()
    else:
        lse_err = 0.0
    return {"out": out_err, "lse": lse_err}
