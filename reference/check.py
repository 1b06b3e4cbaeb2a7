"""Check a port of Prism against the reference: the golden set, then random cases.

    python -m prism.reference.check mypkg.prism:select_blocks \\
        --attention mypkg.prism:block_sparse_attention

imports the port's functions, runs them on every golden case and on cases
that hypothesis generates, and reports each mismatch outside the boundary
ties (contract §6) and outside the tolerances (contract §10), with a minimal
reproducer: Python code that rebuilds the case, and an ``.npz`` file with its
inputs and expected results. The exit status is 1 when anything mismatches.

With ``--varlen module:function`` it runs a port of the packed call
(``prism_attention_varlen``) sequence by sequence against the dense reference
(:mod:`prism.reference.check_varlen`); with ``--paged module:function`` a
port of the paged call (``prism_attention_paged``), prefilling chunk by chunk
(:mod:`prism.reference.check_paged`). With ``--estimators`` it also runs the
estimators' set (``estimators/`` under
the golden folder; docs/estimators.rst) and random estimator cases: the port's
``select`` then also receives ``estimator=...`` and that estimator's fields
(``antidiagonal_stride``, ``last_queries``, ``vertical_slash_threshold``,
``candidate_threshold``, ``sampled_queries``, ``sampled_weight``, ``subtile_factor``).

The port's functions are called as

* ``select(q, k, causal=..., block_size=..., high_dim=..., low_dim=...,
  high_threshold=..., low_threshold=..., calibrate=..., high_temperature=...,
  low_temperature=..., force_sink=..., force_diagonal=..., rope_layout=...,
  eps=...)`` returning the bool tile mask ``(B, Hq, n_query_tiles,
  n_key_tiles)``;
* ``attention(q, k, v, mask, block_size=..., causal=..., scale=...)``
  returning ``(o, lse)`` (``return_lse=True`` is passed when the function
  takes it), or ``o`` alone, in which case ``lse`` is not checked.

``q``, ``k``, ``v`` and ``mask`` are torch tensors (``--arrays torch``, in the
case's dtype) or NumPy arrays (``--arrays numpy``: fp16 stays fp16, bf16
arrives as the exact fp32 values). Results may be either kind. The
reference itself passes: ``python -m prism.reference.check
prism.reference:select_blocks --attention prism.reference:block_sparse_attention``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .golden import compare_attention, compare_mask, load_golden
from .golden_cases import CASES, GoldenCase, make_inputs


@dataclass
class Mismatch:
    """One failed case: where it came from, what differed, and how to rebuild it."""

    source: str  # "golden" or "random"
    case: str
    problems: list[str]
    reproducer: str = ""
    saved: str | None = None
    entry: dict = field(default_factory=dict, repr=False)


def load_function(spec: str):
    """Import ``module:function`` or ``path/to/file.py:function``."""
    if ":" not in spec:
        raise ValueError(f"expected module:function or file.py:function, got {spec!r}")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.is_file():
            raise ValueError(f"no such file: {path}; pass the port's file as path/to/port.py:"
                             f"{name}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise ValueError(f"cannot import module {target!r} ({error}); pass an importable "
                             f"module or a path/to/port.py file") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"{target} has no attribute {name!r}") from None


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.numpy() if x.dtype == torch.bool else x.double().numpy()
    return np.asarray(x)


def _inputs(arrays: dict, dtype: str, kind: str) -> dict:
    names = [n for n in ("q", "k", "v", "attn_mask") if n in arrays]
    if kind == "numpy":
        cast = np.float16 if dtype == "float16" else np.float32
        return {n: arrays[n] if n == "attn_mask" else arrays[n].astype(cast) for n in names}
    tdtype = getattr(torch, dtype)
    return {n: torch.from_numpy(arrays[n]) if n == "attn_mask"
            else torch.from_numpy(arrays[n]).to(tdtype) for n in names}


def takes_argument(fn, name: str) -> bool:
    """Whether ``fn``'s signature names ``name`` (False when it has none to read: a
    builtin or C function is then called without that optional flag)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _call_attention(fn, inputs, entry):
    kwargs = dict(block_size=entry["config"]["block_size"], causal=entry["causal"],
                  scale=entry["scale"])
    if takes_argument(fn, "return_lse"):
        kwargs["return_lse"] = True
    result = fn(inputs["q"], inputs["k"], inputs["v"], inputs["attn_mask"], **kwargs)
    if isinstance(result, (tuple, list)):
        return _to_numpy(result[0]), _to_numpy(result[1])
    return _to_numpy(result), None


def check_case(entry: dict, arrays: dict, select=None, attention=None,
               array_kind: str = "torch") -> list[str]:
    """Problems of a port on one case (entry and arrays as :func:`load_golden` gives)."""
    problems = []
    inputs = _inputs(arrays, entry["dtype"], array_kind)
    if select is not None:
        try:
            mask = select(inputs["q"], inputs["k"], causal=entry["causal"], **entry["config"])
            problems += ["select: " + p for p in compare_mask(entry, arrays, _to_numpy(mask))]
        except Exception as exc:  # a port that raises fails the case
            problems.append(f"select raised {type(exc).__name__}: {exc}")
    if attention is not None:
        try:
            out, lse = _call_attention(attention, inputs, entry)
            problems += ["attention: " + p for p in compare_attention(entry, arrays, out, lse)]
        except Exception as exc:
            problems.append(f"attention raised {type(exc).__name__}: {exc}")
    return problems


def reference_set(cases=CASES) -> tuple[dict, dict]:
    """The golden set built in memory (the same as the committed one), as ``load_golden``."""
    from .golden_writer import _as_array, case_entry, expected_results

    entries, arrays = [], {}
    for case in cases:
        q, k, v = make_inputs(case)
        results = expected_results(case, q, k, v)
        entries.append(case_entry(case, q, k, v, results))
        arrays[case.name] = {key: _as_array(t) for key, t in
                             {"q": q, "k": k, "v": v, **results}.items()}
    return {"cases": entries}, arrays


def reproducer(case: GoldenCase, entry: dict, select_spec: str, attention_spec: str) -> str:
    """Python code that rebuilds a case and calls the port on it."""
    fields = ", ".join(f"{f.name}={getattr(case, f.name)!r}" for f in dataclasses.fields(case))
    lines = [
        "import torch",
        "from prism.reference import block_sparse_attention, boundary_ties, select_blocks",
        "from prism.reference.golden_cases import GoldenCase, make_inputs",
        f"case = GoldenCase({fields})",
        "q, k, v = make_inputs(case)",
        f"config = {entry['config']!r}",
        f"expected = select_blocks(q, k, causal={entry['causal']}, **config)",
        f"ties = boundary_ties(q, k, causal={entry['causal']}, **config)",
    ]
    if select_spec:
        module, name = select_spec.rsplit(":", 1)
        lines += [f"from {module} import {name} as port_select" if not module.endswith(".py")
                  else f"# load {name} from {module}",
                  f"mask = port_select(q, k, causal={entry['causal']}, **config)",
                  "print((torch.as_tensor(mask).bool() != expected) & ~ties)"]
    if attention_spec:
        lines += [f"# attention: {attention_spec}(q, k, v, expected, block_size="
                  f"{entry['config']['block_size']}, causal={entry['causal']}, "
                  f"scale={entry['scale']!r})"]
    return "\n".join(lines)


def _save(path: Path, arrays: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return str(path)


def check_golden(select=None, attention=None, directory=None, array_kind: str = "torch",
                 save_dir=None, golden_set: str = "prism") -> tuple[int, list[Mismatch]]:
    """Run a port on every case of a golden set; returns (cases run, mismatches).

    ``directory`` is a golden root on disk (``tests/golden``; the estimators' set
    is its ``estimators`` folder); ``None`` builds the set in memory.
    ``golden_set`` is ``"prism"`` (contract §2-§7) or ``"estimators"``.
    """
    from .golden_writer import SETS

    cases, _, folder = SETS[golden_set]
    manifest, arrays = (load_golden(Path(directory) / folder) if directory is not None
                        else reference_set(cases))
    by_name = {case.name: case for case in cases}
    mismatches = []
    for entry in manifest["cases"]:
        problems = check_case(entry, arrays[entry["name"]], select, attention, array_kind)
        if problems:
            saved = None
            if save_dir is not None:
                saved = _save(Path(save_dir) / f"golden_{entry['name']}.npz",
                              arrays[entry["name"]])
            code = ""
            if entry["name"] in by_name:
                code = reproducer(by_name[entry["name"]], entry, "", "")
            mismatches.append(Mismatch("golden", entry["name"], problems, code, saved, entry))
    return len(manifest["cases"]), mismatches


def _random_case(draw) -> GoldenCase:
    """A small random case; hypothesis shrinks it towards the simplest one."""
    from hypothesis import strategies as st

    bs = draw(st.sampled_from([4, 8, 16]))
    kv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    d = draw(st.sampled_from([8, 12, 16, 32]))
    causal = draw(st.booleans())
    nk = draw(st.integers(0 if not causal else 1, 5 * bs))
    nq = draw(st.integers(0, nk)) if causal else draw(st.integers(1, 4 * bs))
    calibrate = draw(st.booleans())
    config = {"block_size": bs,
              "high_threshold": draw(st.sampled_from([0.5, 0.8, 0.95, 1.0])),
              "low_threshold": draw(st.sampled_from([0.5, 0.8, 0.95, 1.0])),
              "calibrate": calibrate,
              "rope_layout": draw(st.sampled_from(["half", "interleaved"])),
              "force_sink": draw(st.booleans()), "force_diagonal": draw(st.booleans())}
    if not calibrate:
        config["high_temperature"] = draw(st.sampled_from([0.25, 1.0, 2.0]))
        config["low_temperature"] = draw(st.sampled_from([0.25, 1.0, 2.0]))
    return GoldenCase(
        name="random", description="generated", catches=(), batch=draw(st.integers(1, 2)),
        q_heads=kv * group, kv_heads=kv, num_queries=nq, num_keys=nk, head_dim=d,
        value_dim=draw(st.sampled_from([d, 8])), causal=causal,
        scale=draw(st.sampled_from([None, 0.5])),
        dtype=draw(st.sampled_from(["float32", "float32", "float16", "bfloat16"])),
        rope_base=draw(st.sampled_from([1e4, 1e6])),
        kind=draw(st.sampled_from(["topic", "topic", "copies", "integers"])) if nk else "topic",
        sharpness=draw(st.sampled_from([1.0, 3.0])), seed=draw(st.integers(0, 1000)),
        config=config)


#: The estimators random cases draw from: every one but Prism's own.
RANDOM_ESTIMATORS = ("cascade", "antidiagonal_vertical_slash", "antidiagonal",
                     "vertical_slash", "sampled", "sampled_vertical_slash",
                     "prism_vertical_slash", "subtile")


def _random_estimator_case(draw) -> GoldenCase:
    """A small random case of one of :data:`RANDOM_ESTIMATORS`, on structured inputs."""
    from hypothesis import strategies as st

    case = _random_case(draw)
    bs = draw(st.sampled_from([8, 16]))
    estimator = draw(st.sampled_from(RANDOM_ESTIMATORS))
    config = {**case.config, "block_size": bs, "estimator": estimator,
              "antidiagonal_stride": draw(st.sampled_from([s for s in (2, 4, 8) if s <= bs])),
              "last_queries": draw(st.sampled_from([1, 4, 16])),
              "vertical_slash_threshold": draw(st.sampled_from([None, 0.3, 0.6])),
              "candidate_threshold": draw(st.sampled_from([0.6, 0.9, 0.99])),
              "sampled_queries": draw(st.sampled_from([1, 2, 4])),
              "sampled_weight": draw(st.sampled_from([0.0, 0.3, 1.0])),
              "subtile_factor": draw(st.sampled_from([1, 2, 4]))}
    kind = draw(st.sampled_from(["topic", "slash"])) if case.num_keys else "topic"
    return dataclasses.replace(case, kind=kind, config=config)


def check_random(select=None, attention=None, max_examples: int = 50, array_kind="torch",
                 save_dir=None, select_spec: str = "", attention_spec: str = "",
                 estimators: bool = False) -> list[Mismatch]:
    """Run a port on hypothesis-generated cases; returns the shrunk failure, if any.

    ``estimators``: the cases use the estimators of :data:`RANDOM_ESTIMATORS`
    instead of Prism's bands."""
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st
    except ImportError as exc:  # pragma: no cover - hypothesis is in the test extra
        raise RuntimeError("random cases need hypothesis: pip install hypothesis") from exc
    from .golden_writer import _as_array, case_entry, expected_results

    failures: list[tuple[GoldenCase, dict, dict, list[str]]] = []

    draw_case = _random_estimator_case if estimators else _random_case

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(st.composite(lambda draw: draw_case(draw))())
    def run(case):
        if case.kind == "copies" and case.num_keys % case.config["block_size"]:
            case = dataclasses.replace(case, kind="topic")
        q, k, v = make_inputs(case)
        results = expected_results(case, q, k, v)
        entry = case_entry(case, q, k, v, results)
        arrays = {key: _as_array(t) for key, t in {"q": q, "k": k, "v": v, **results}.items()}
        problems = check_case(entry, arrays, select, attention, array_kind)
        if problems:
            failures.append((case, entry, arrays, problems))
            raise AssertionError("; ".join(problems))

    try:
        run()
    except AssertionError:
        pass  # the failing cases were recorded in ``failures``; the report is built below
    if not failures:
        return []
    case, entry, arrays, problems = failures[-1]  # hypothesis replays the shrunk case last
    saved = _save(Path(save_dir) / "random_case.npz", arrays) if save_dir else None
    code = reproducer(case, entry, select_spec, attention_spec)
    return [Mismatch("random", "random", problems, code, saved, entry)]


def report(mismatches: list[Mismatch], golden_cases: int, random_examples: int) -> str:
    """Human-readable summary of a check."""
    lines = []
    for m in mismatches:
        lines.append(f"MISMATCH [{m.source}] {m.case}")
        if m.entry.get("description"):
            lines.append(f"  case: {m.entry['description']}")
        if m.entry.get("catches"):
            lines.append(f"  this case catches: {', '.join(m.entry['catches'])}")
        lines += [f"  - {p}" for p in m.problems]
        if m.saved:
            lines.append(f"  inputs and expected results saved to {m.saved}")
        if m.reproducer:
            lines.append("  reproducer:")
            lines += ["    " + line for line in m.reproducer.splitlines()]
    failed = {m.case for m in mismatches if m.source == "golden"}
    lines.append(f"golden: {golden_cases - len(failed)} of {golden_cases} cases agree; "
                 f"random: {random_examples} examples, "
                 f"{sum(m.source == 'random' for m in mismatches)} shrunk failure(s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m prism.reference.check SELECT [--attention ATTENTION] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m prism.reference.check",
        description="Check a port's select_blocks and/or block_sparse_attention against "
                    "Prism's reference (golden set + hypothesis-generated cases).")
    parser.add_argument("select", nargs="?", help="module:function (or file.py:function) "
                        "of the port's tile selection")
    parser.add_argument("--attention", help="module:function of the port's block-sparse "
                        "attention")
    parser.add_argument("--golden", help="golden set folder (default: build it in memory)")
    parser.add_argument("--examples", type=int, default=50,
                        help="hypothesis examples (0: golden set only; default 50)")
    parser.add_argument("--arrays", choices=["torch", "numpy"], default="torch",
                        help="what the port receives (default torch tensors)")
    parser.add_argument("--varlen", help="module:function of the port's packed call "
                        "(prism_attention_varlen's arguments; docs/golden.rst)")
    parser.add_argument("--paged", help="module:function of the port's paged call, run "
                        "chunk by chunk (prism_attention_paged's arguments; docs/golden.rst)")
    parser.add_argument("--estimators", action="store_true",
                        help="also check the estimators' selections (their golden set and "
                             "random cases; the port's select takes estimator=...)")
    parser.add_argument("--save", default="prism-check-failures",
                        help="folder for the .npz reproducers (default %(default)s)")
    args = parser.parse_args(argv)
    if not (args.select or args.attention or args.varlen or args.paged):
        parser.error("give a selection function, --attention, --varlen, --paged, or several")
    try:
        select = load_function(args.select) if args.select else None
        attention = load_function(args.attention) if args.attention else None
        varlen = load_function(args.varlen) if args.varlen else None
        paged = load_function(args.paged) if args.paged else None
    except ValueError as error:
        parser.error(str(error))  # one line and exit status 2, as for other bad arguments
    status = 0
    if varlen is not None:
        status = _check_varlen(varlen, args.examples)
    if paged is not None:
        status = max(status, _check_paged(paged, args.examples))
    if select is None and attention is None:
        return status
    cases, mismatches = check_golden(select, attention, args.golden, args.arrays, args.save)
    examples = args.examples
    if args.examples > 0:
        mismatches += check_random(select, attention, args.examples, args.arrays, args.save,
                                   args.select or "", args.attention or "")
    if args.estimators:
        more, found = check_golden(select, attention, args.golden, args.arrays, args.save,
                                   golden_set="estimators")
        cases, mismatches = cases + more, mismatches + found
        if args.examples > 0:
            examples += args.examples
            mismatches += check_random(select, attention, args.examples, args.arrays,
                                       args.save, args.select or "", args.attention or "",
                                       estimators=True)
    print(report(mismatches, cases, examples))
    return 1 if mismatches or status else 0


def _check_varlen(varlen, examples: int) -> int:
    """The packed cases (:mod:`prism.reference.check_varlen`) and ``examples`` random ones."""
    from .check_varlen import PACKED_CASES, check_packed, random_packed_cases

    return _report_port("packed", check_packed, varlen,
                        [*PACKED_CASES, *random_packed_cases(examples)],
                        lambda c: f"sequences (Nq, Nk) {list(c.lengths)}, causal={c.causal}")


def _check_paged(paged, examples: int) -> int:
    """The paged, chunked cases (:mod:`prism.reference.check_paged`) and ``examples``
    random ones."""
    from .check_paged import PAGED_CASES, check_paged, random_paged_cases

    return _report_port("paged", check_paged, paged,
                        [*PAGED_CASES, *random_paged_cases(examples)],
                        lambda c: f"chunks per sequence {list(c.chunks)}, pages of "
                                  f"{c.page_size}")


def _report_port(kind: str, check, fn, cases, shape) -> int:
    """Run ``check(fn, cases)``; print each failing case (``shape(case)`` describes its
    sequences) and a summary line; return 1 on any failure."""
    count, failed = check(fn, cases)
    by_name = {case.name: case for case in cases}
    for name, problems in failed.items():
        case = by_name[name]
        print(f"MISMATCH [{kind}] {name}: {case.description}; {shape(case)}, {case.dtype}, "
              f"config {case.config}")
        if case.catches:
            print(f"  this case catches: {', '.join(case.catches)}")
        print("\n".join(f"  - {p}" for p in problems))
    print(f"{kind}: {count - len(failed)} of {count} cases agree")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
