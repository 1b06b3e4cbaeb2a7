"""The paged port checker (prism.reference.check_paged, docs/golden.rst): correct ports
pass every case, and each misreading it names fails every case that claims to catch it.

The misread ports are built here from the reference's packed functions, each with
one rule of the cache read wrong (its own page gather, or a pooled-key cache that
keeps a partial tile), so every failure comes from that rule alone.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import kernel_test_setup  # noqa: E402
from prism import reference  # noqa: E402
from prism.reference import PooledKeyCache  # noqa: E402
from prism.reference.check import main  # noqa: E402
from prism.reference.check_paged import (  # noqa: E402
    PAGED_CASES,
    PAGED_MISREADINGS,
    WithPooledKeys,
    check_paged,
    random_paged_cases,
    reference_chunked,
)


def _gather(cache, table, spans, page_of):
    """Tokens ``spans[i] = (first, end)`` of each sequence, packed, token ``t`` read from
    ``page_of(i, t)`` at slot ``t % page`` (``page`` returned with it)."""
    rows = []
    for i, (first, end) in enumerate(spans):
        for t in range(first, end):
            page, size = page_of(i, t)
            rows.append(cache[page, t % size])
    if not rows:
        return cache.new_empty(0, *cache.shape[2:])
    return torch.stack(rows)


def _port(spans, page_rule="page"):
    """A port that gathers ``spans(seq_lens, chunk_sizes, page_size)`` per sequence with the
    given page rule, then calls the reference's packed function."""
    def port(q, k_cache, v_cache, table, seq_lens, cu_q, max_q, *, return_lse=False,
             return_mask=False, **kwargs):
        cfg = reference.resolve_config(None, **{k: v for k, v in kwargs.items()
                                                if k not in ("causal", "scale")})
        size = k_cache.shape[1] if page_rule == "page" else cfg.block_size
        lens = [int(n) for n in seq_lens]
        chunk = [int(b - a) for a, b in zip(cu_q[:-1], cu_q[1:], strict=True)]
        span = spans(lens, chunk, k_cache.shape[1])

        def page_of(i, t):
            return int(table[i, t // size]), size

        k = _gather(k_cache, table, span, page_of)
        v = _gather(v_cache, table, span, page_of)
        cu_k = torch.tensor([0, *(e - f for f, e in span)]).cumsum(0).to(torch.int32)
        return reference.prism_attention_varlen(
            q, k, v, cu_q, cu_k, max_q, max((e - f for f, e in span), default=0),
            return_lse=return_lse, return_mask=return_mask, **kwargs)
    return port


class StaleTileCache(PooledKeyCache):
    """The misreading: the mean of a tile that a chunk leaves partial is kept and used
    from then on, never re-pooled once later chunks complete the tile."""

    def __init__(self, block_size):
        super().__init__(block_size)
        self.stale: dict[int, torch.Tensor] = {}

    def reset(self):
        super().reset()
        self.stale = {}

    def pooled(self, k_tail, num_keys):
        means = super().pooled(k_tail, num_keys).clone()
        for tile, mean in self.stale.items():
            means[0, :, tile] = mean
        last = means.shape[2] - 1
        if num_keys % self.block_size and last not in self.stale:
            self.stale[last] = means[0, :, last].clone()
        return means


MISREAD = {
    "seq_lens_without_chunk": _port(lambda n, c, page: [(0, a + b) for a, b in
                                                         zip(n, c, strict=True)]),
    "top_left_chunk": _port(lambda n, c, page: [(0, b) for b in c]),
    "page_by_tile": _port(lambda n, c, page: [(0, a) for a in n], page_rule="tile"),
    "reads_past_seq_len": _port(lambda n, c, page: [(0, -(-a // page) * page) for a in n]),
    "chunk_keys_only": _port(lambda n, c, page: [(a - b, a) for a, b in zip(n, c, strict=True)]),
    "stale_partial_tile": WithPooledKeys(reference.prism_attention_paged, StaleTileCache),
}


def test_every_misreading_has_a_port_and_a_case():
    assert set(MISREAD) == set(PAGED_MISREADINGS)
    for name in PAGED_MISREADINGS:
        assert any(name in case.catches for case in PAGED_CASES), name
    for case in PAGED_CASES:
        assert set(case.catches) <= set(PAGED_MISREADINGS), case.name


@pytest.mark.parametrize("name", sorted(PAGED_MISREADINGS))
def test_each_misreading_fails_the_cases_that_claim_it(name):
    _, failed = check_paged(MISREAD[name])
    claimed = {case.name for case in PAGED_CASES if name in case.catches}
    assert claimed <= set(failed), f"{name} passed {sorted(claimed - set(failed))}"


def test_correct_ports_pass():
    """The reference without and with pooled-key caches, and a port that gathers the pages
    itself (the correct rule) before the packed function, on the cases and random ones."""
    cases = [*PAGED_CASES, *random_paged_cases(12, seed=4)]
    correct = _port(lambda n, c, page: [(0, a) for a in n])
    for port in (reference.prism_attention_paged, reference_chunked, correct):
        count, failed = check_paged(port, cases)
        assert count == len(cases) and failed == {}, failed


def test_a_failure_names_the_step_and_the_sequence():
    _, failed = check_paged(MISREAD["chunk_keys_only"], PAGED_CASES[:1])
    problems = failed["partial_tiles"]
    assert problems[0].startswith("step 1: ")          # step 0 has no prefix: it agrees
    assert "sequence 0" in problems[0]


INTERPRETED, DEVICE, MARKS = kernel_test_setup()


class OnDevice:
    """A port run on ``device``: inputs moved there, results back to the CPU; ``reset``
    passed through."""

    def __init__(self, fn, device):
        self.fn, self.device = fn, device

    def reset(self):
        getattr(self.fn, "reset", lambda: None)()

    def __call__(self, *args, return_lse=False, return_mask=False, **kwargs):
        moved = [a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args]
        result = self.fn(*moved, return_lse=return_lse, return_mask=return_mask, **kwargs)
        if not isinstance(result, tuple):
            return result.cpu()
        return tuple([m.cpu() for m in r] if isinstance(r, list) else r.cpu() for r in result)


@pytest.mark.interpret
@MARKS[1]
def test_the_kernels_pass_with_and_without_caches():
    """prism.optimized's paged call (Triton's interpreter on the CPU, or the GPU), plain and
    with a PooledKeyCache per sequence, on the fp32 cases."""
    from prism import optimized

    cases = [case for case in PAGED_CASES if case.dtype == "float32"]
    for port in (optimized.prism_attention_paged, WithPooledKeys(optimized.prism_attention_paged)):
        _, failed = check_paged(OnDevice(port, DEVICE), cases)
        assert failed == {}, failed


def test_command_line(capsys, tmp_path):
    assert main(["--paged", "prism.reference.check_paged:reference_chunked",
                 "--examples", "2"]) == 0
    assert "paged: 5 of 5 cases agree" in capsys.readouterr().out
    port = tmp_path / "port.py"
    port.write_text(
        "from prism import reference\n"
        "def attn(q, k_cache, v_cache, table, seq_lens, cu_q, max_q, **kw):\n"
        "    return reference.prism_attention_paged(q, k_cache, v_cache, table, seq_lens + 1,\n"
        "                                           cu_q, max_q, **kw)\n")
    assert main(["--paged", f"{port}:attn", "--examples", "0"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH [paged] partial_tiles" in out and "paged: 0 of 3 cases agree" in out
