"""Decoding transformers' attention masks for Prism (``prism.integrations.masks``).

``key_spans`` turns a causal mask with key padding into per-row key spans and
refuses every other pattern with a ValueError; what ``torch.compile`` runs for
a masked call (one opaque operator) gives the eager call's output and errors.
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_qkv
from prism.integrations.transformers import PrismAttention, key_spans
from prism.reference import PrismConfig

pytest.importorskip("transformers")
from test_integrations import _SYNC_METHODS, BS, _Layer  # noqa: E402


def _causal(b, q_len, k_len):
    pos = torch.arange(k_len - q_len, k_len)
    return (torch.arange(k_len)[None, :] <= pos[:, None]).expand(b, 1, q_len, k_len).clone()


def test_key_spans_accepts_causal_and_padding():
    assert key_spans(None, 8, 8) is None
    assert key_spans(_causal(2, 4, 9), 4, 9) is None
    mask = _causal(2, 6, 6)
    mask[0, :, :, :2] = False  # left padding of row 0
    mask[1, :, :, 4:] = False  # right padding of row 1
    assert key_spans(mask, 6, 6) == (0, [(2, 6), (0, 4)])
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert key_spans(additive, 6, 6) == (0, [(2, 6), (0, 4)])
    prefix = _causal(1, 4, 9)
    prefix[0, :, :, :3] = False  # left padding under a KV prefix
    assert key_spans(prefix, 4, 9) == (5, [(3, 9)])
    static = torch.zeros(1, 1, 5, 8, dtype=torch.bool)  # static cache: 3 unused slots
    static[0, 0, :, :5] = _causal(1, 5, 5)[0, 0]
    assert key_spans(static, 5, 8) == (0, [(0, 5)])


def test_key_spans_refuses_other_patterns():
    packed = _causal(1, 6, 6)
    packed[0, 0, 3:, :3] = False  # two packed documents
    with pytest.raises(ValueError, match="causal masks with key padding"):
        key_spans(packed, 6, 6)
    holes = _causal(1, 6, 6)
    holes[0, :, :, 2] = False  # padding between real tokens
    with pytest.raises(ValueError, match="padding between real tokens"):
        key_spans(holes, 6, 6)
    per_head = _causal(1, 6, 6).expand(1, 2, 6, 6).clone()
    per_head[0, 1, :, 0] = False
    with pytest.raises(ValueError, match="one mask shared by all heads"):
        key_spans(per_head, 6, 6)
    biased = torch.zeros(1, 1, 6, 6)
    biased[0, 0, 5, 0] = -1.5
    with pytest.raises(ValueError, match="biases"):
        key_spans(biased, 6, 6)
    with pytest.raises(ValueError, match="shape"):
        key_spans(_causal(1, 6, 6), 5, 6)


def test_key_spans_reads_the_mask_back_once(monkeypatch):
    """Decoding a padded mask copies one summary to the host, whatever the batch size."""
    import sys

    import prism.integrations.masks as masks_module

    seen = []

    def spy(name, method):
        def wrapped(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename == masks_module.__file__:
                seen.append(name)
            return method(*args, **kwargs)
        return wrapped

    for name in _SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    mask = _causal(5, 8, 8)
    for row in range(5):
        mask[row, :, :, :row] = False  # left padding of `row` tokens
    assert key_spans(mask, 8, 8) == (0, [(row, 8) for row in range(5)])
    assert seen == ["tolist"]


def test_masked_call_operator_equals_the_eager_call():
    """What torch.compile runs for a call with a mask (the opaque operator, which gets the
    module's GQA group count instead of the module) gives the eager call's output."""
    import prism.integrations.transformers as integration

    class Layer(_Layer):
        num_key_value_groups = 2

    q, k, v = make_qkv(2, 4, 2, 48, 48, 16, seed=3)
    mask = _causal(2, 48, 48)
    mask[1, :, :, :13] = False  # left padding of row 1
    function = PrismAttention(PrismConfig(block_size=BS, high_threshold=0.5, low_threshold=0.5),
                              None, min_query_length=BS)
    eager, _ = function(Layer(), q, k, v, mask, scaling=0.3)
    op = torch.ops.prism.transformers_masked_attention(q, k, v, mask, 0.3, function.handle,
                                                       Layer.layer_idx, 2)
    assert op.shape == (2, 48, 4, 16) and torch.equal(op, eager)
    assert integration._FUNCTIONS[function.handle] is function
    holes = mask.clone()
    holes[0, :, :, 20] = False
    with pytest.raises(ValueError, match="padding between real tokens"):
        torch.ops.prism.transformers_masked_attention(q, k, v, holes, 0.3, function.handle,
                                                      0, 2)
