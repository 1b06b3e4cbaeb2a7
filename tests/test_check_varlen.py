"""The packed port checker (prism.reference.check_varlen): correct ports pass, wrong ones fail.

Each wrong port below is one classic misreading of the packed call, built from
the dense reference; every case that lists the misreading must fail with it.
"""

from __future__ import annotations

import pytest
import torch

from prism import reference
from prism.reference.check import main
from prism.reference.check_varlen import (
    PACKED_CASES,
    PACKED_MISREADINGS,
    check_packed,
    check_packed_case,
    random_packed_cases,
)


def _per_sequence(run):
    """A packed port that calls ``run(q_i, k_i, v_i, start_i, **config)`` per sequence
    ((1, H, N, D) views, ``start_i`` its first packed query row) and returns (o, lse)."""
    def port(q, k, v, cu_q, cu_k, max_q, max_k, *, causal=True, scale=None, **config):
        outs, lses = [], []
        for i in range(len(cu_q) - 1):
            q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
            heads = [x.transpose(0, 1).unsqueeze(0) for x in (q[q0:q1], k[k0:k1], v[k0:k1])]
            o, lse = run(*heads, q0, causal=causal, **config)
            outs.append(o[0].transpose(0, 1))
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)
    return port


def _dense(q, k, v, start, *, causal, **config):
    return reference.prism_attention(q, k, v, causal=causal, return_lse=True, **config)


def _top_left(q, k, v, start, *, causal, **config):
    # Queries at the first keys: pad the queries to Nk (a square, where both
    # alignments agree) and keep the first Nq rows.
    nq, nk = q.shape[2], k.shape[2]
    if not causal or nq == nk or nq == 0:
        return _dense(q, k, v, start, causal=causal, **config)
    pad = q.new_zeros(1, q.shape[1], nk - nq, q.shape[3])
    o, lse = _dense(torch.cat([q, pad], dim=2), k, v, start, causal=True, **config)
    return o[:, :, :nq], lse[:, :, :nq]


def _packed_grid(q, k, v, start, *, causal, **config):
    # Tiles cut on the packed row index: the sequence sits `start % bs` rows into a tile.
    lead = start % config["block_size"]
    if lead == 0 or q.shape[2] == 0:
        return _dense(q, k, v, start, causal=causal, **config)
    pad = [x.new_zeros(1, x.shape[1], lead, x.shape[3]) for x in (q, k, v)]
    o, lse = _dense(*(torch.cat([p, x], dim=2) for p, x in zip(pad, (q, k, v), strict=True)),
                    start, causal=causal, **config)
    return o[:, :, lead:], lse[:, :, lead:]


def _query_offsets_for_keys(q, k, v, cu_q, cu_k, max_q, max_k, *, causal=True, scale=None,
                            **config):
    # Each sequence's keys sliced with the query offsets (and as many keys as queries).
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        q0, q1 = int(cu_q[i]), int(cu_q[i + 1])
        heads = [x.transpose(0, 1).unsqueeze(0) for x in (q[q0:q1], k[q0:q1], v[q0:q1])]
        o, lse = _dense(*heads, q0, causal=causal, **config)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def _one_sequence(q, k, v, cu_q, cu_k, max_q, max_k, *, causal=True, scale=None, **config):
    heads = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
    if heads[0].shape[2] > heads[1].shape[2] and causal:
        raise ValueError("more queries than keys")
    o, lse = reference.prism_attention(*heads, causal=causal, return_lse=True, **config)
    return o[0].transpose(0, 1), lse[0]


def _lse_layout(*args, **kw):
    o, lse = reference.prism_attention_varlen(*args, return_lse=True, **kw)
    return o, lse.transpose(0, 1).contiguous()


WRONG = {
    "top_left_alignment": _per_sequence(_top_left),
    "packed_grid": _per_sequence(_packed_grid),
    "query_offsets_for_keys": _query_offsets_for_keys,
    "one_sequence": _one_sequence,
    "lse_layout": _lse_layout,
}


def test_the_reference_and_a_dense_loop_pass():
    assert check_packed(reference.prism_attention_varlen) == (len(PACKED_CASES), {})
    assert check_packed(_per_sequence(_dense)) == (len(PACKED_CASES), {})
    count, failed = check_packed(reference.prism_attention_varlen, random_packed_cases(20))
    assert count == 20 and failed == {}


def test_every_misreading_has_a_port_and_two_cases():
    assert set(WRONG) == set(PACKED_MISREADINGS)
    for tag in PACKED_MISREADINGS:
        assert sum(tag in case.catches for case in PACKED_CASES) >= 2, tag


@pytest.mark.parametrize("tag", sorted(WRONG))
def test_each_misreading_fails_the_cases_that_list_it(tag):
    _, failed = check_packed(WRONG[tag])
    listing = {case.name for case in PACKED_CASES if tag in case.catches}
    assert listing <= set(failed), f"{tag}: {sorted(listing - set(failed))} pass"


def test_masks_returned_by_a_port_are_checked():
    def wrong_masks(*args, return_lse=True, return_mask=True, **kw):
        o, lse, masks = reference.prism_attention_varlen(*args, return_lse=True,
                                                         return_mask=True, **kw)
        masks = [m.clone() for m in masks]
        masks[-1][..., -1, 0] = ~masks[-1][..., -1, 0]
        return o, lse, masks

    problems = check_packed_case(wrong_masks, PACKED_CASES[0])
    assert any("mask differs" in p for p in problems)


def test_the_command_line_runs_the_packed_cases(capsys):
    assert main(["--varlen", "prism.reference:prism_attention_varlen", "--examples", "5"]) == 0
    assert "packed: 9 of 9 cases agree" in capsys.readouterr().out


@pytest.mark.interpret
def test_the_optimized_packed_call_passes():
    from helpers import kernel_test_setup
    from prism import optimized

    interpreted, device, _ = kernel_test_setup()
    if not interpreted and not torch.cuda.is_available():
        pytest.skip("no Triton interpreter or CUDA device")

    def on_device(*args, return_lse=True, return_mask=True, **kw):
        moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        o, lse, masks = optimized.prism_attention_varlen(*moved, return_lse=True,
                                                         return_mask=True, **kw)
        return o.cpu(), lse.cpu(), [torch.as_tensor(m).cpu() for m in masks]

    assert check_packed(on_device) == (len(PACKED_CASES), {})
