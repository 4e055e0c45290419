"""Fast CPU dropout: the same distribution and gradients as dropout, unchanged evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import bert_inputs, logits, tiny_bert, tiny_vit, vit_inputs
from torch import nn

from slimtune.dropout import (
    ATTENTION,
    FastDropout,
    drop_mask,
    fast_dropout_attention,
    use_fast_dropout,
)
from slimtune.train.build import build_model, set_dropout
from slimtune.train.config import ConfigError, RunConfig


@pytest.mark.parametrize("inplace", [False, True])
def test_fast_dropout_drops_at_rate_p_scales_and_backpropagates_through_the_kept(inplace):
    p = 0.3
    layer = FastDropout(p, inplace=inplace).train()
    assert isinstance(layer, nn.Dropout)
    x = torch.rand(200, 500) + 0.5  # no zeros of its own
    leaf = x.clone().requires_grad_(True)
    torch.manual_seed(4)
    y = layer(leaf.clone() if inplace else leaf)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    assert torch.allclose(y[~dropped], x[~dropped] / (1 - p))
    torch.manual_seed(4)
    assert torch.equal(dropped, drop_mask(x.shape, p, x.device))  # the documented mask
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(leaf.grad, g * (~dropped) / (1 - p))
    layer.eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)


def _attention_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    mask[1, :, :, 5:] = False  # padding of the second sequence
    return q, k, v, mask


class _Attention(nn.Module):
    is_causal = False


def test_fast_attention_is_softmax_attention_with_the_documented_mask():
    q, k, v, mask = _attention_inputs()
    module = _Attention().train()
    p, scale = 0.25, 0.4
    torch.manual_seed(1)
    out, weights = fast_dropout_attention(module, q, k, v, mask, dropout=p, scaling=scale)
    assert weights is None and out.shape == (2, 7, 3, 4)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    # the same function written out, with the mask drawn from the same seed
    scores = (q @ k.transpose(-1, -2)) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    torch.manual_seed(1)
    keep = ~drop_mask(probs.shape, p, probs.device)
    expected = ((probs * keep / (1 - p)) @ v).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(expected, (q, k, v), g), strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    # padded keys get no attention, also after dropout
    assert torch.all(probs[1, :, :, 5:] == 0)


def test_fast_attention_hands_everything_else_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, mask = _attention_inputs()
    module, causal = _Attention(), _Attention()
    causal.is_causal = True
    cases = [  # (module, training, mask, keyword arguments)
        (module, False, mask, {}),
        (module, True, mask, {"dropout": 0.0}),
        (causal, True, None, {"dropout": 0.25}),
        (module, True, mask, {"dropout": 0.25, "sliding_window": 3}),
    ]
    for mod, training, m, kwargs in cases:
        mod.train(training)
        torch.manual_seed(2)
        got, _ = fast_dropout_attention(mod, q, k, v, m, scaling=0.4, **kwargs)
        torch.manual_seed(2)
        want, _ = sdpa_attention_forward(mod, q, k, v, m, scaling=0.4, **kwargs)
        assert torch.equal(got, want)


def _bert_with_dropout() -> nn.Module:
    model = tiny_bert()
    set_dropout(model, 0.2)
    return model


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_use_fast_dropout_keeps_evaluation_and_randomises_training(family, tmp_path):
    build, inputs = (
        (_bert_with_dropout, bert_inputs) if family == "bert" else (tiny_vit, vit_inputs)
    )
    model, x = build(), inputs()
    before = logits(model.eval(), x)
    n_dropout = sum(type(m) is nn.Dropout for m in model.modules())
    counts = use_fast_dropout(model)
    assert counts == {"modules": n_dropout, "attention": 1}
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert torch.equal(logits(model.eval(), x), before)
    if family == "bert":
        assert model.config._attn_implementation == ATTENTION
        model.train()
        torch.manual_seed(0)
        a = logits(model, x)
        torch.manual_seed(0)
        assert torch.equal(a, logits(model, x))
        assert not torch.allclose(a, before)
        assert set_dropout(model, 0.0) == n_dropout  # still nn.Dropout to the rest of the code
        assert torch.allclose(logits(model.train(), x), before, atol=1e-6)
        # the saved model names no attention function of ours: it reloads anywhere
        model.save_pretrained(tmp_path)
        assert ATTENTION not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    else:
        assert model.backbone.config._attn_implementation == ATTENTION


def test_run_config_fast_dropout_is_a_checked_switch():
    assert RunConfig().fast_dropout is True
    assert RunConfig(fast_dropout=False).to_dict()["fast_dropout"] is False
    with pytest.raises(ConfigError, match="fast_dropout"):
        RunConfig(fast_dropout="yes")  # type: ignore[arg-type]
    fast, _ = build_model("tiny-vit", 2, 0.1, fast_dropout=True)
    plain, _ = build_model("tiny-vit", 2, 0.1)
    assert (
        sum(isinstance(m, FastDropout) for m in fast.modules())
        == sum(isinstance(m, nn.Dropout) for m in plain.modules())
        > 0
    )
    assert not any(isinstance(m, FastDropout) for m in plain.modules())


def test_dropout_bench_refuses_bad_thread_counts():
    from typer.testing import CliRunner

    from slimtune.cli import app

    for bad in ("0", "two"):
        res = CliRunner().invoke(app, ["bench", "dropout", "--quick", "--threads", bad])
        assert res.exit_code == 2 and "--threads" in res.output, res.output
