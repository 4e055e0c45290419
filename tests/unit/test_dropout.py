"""Fast CPU dropout: the same distribution and gradients as dropout, unchanged evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import bert_inputs, logits, tiny_bert, tiny_vit, vit_inputs
from torch import nn

from slimtune.app.build import build_model, set_dropout
from slimtune.app.config import ConfigError, RunConfig, load_config
from slimtune.dropout import (
    ATTENTION,
    FastDropout,
    drop_mask,
    fast_dropout_attention,
    use_fast_dropout,
)


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
    # changing the values at padded keys changes nothing: they get no attention
    v2 = v.detach().clone()
    v2[1, :, 5:] = 1e3
    torch.manual_seed(1)
    out2, _ = fast_dropout_attention(module, q, k, v2, mask, dropout=p, scaling=scale)
    assert torch.allclose(out2, out, atol=1e-5)
    # a query allowed to attend to nothing gets zeros (as sdpa), not a uniform average
    empty = mask.clone()
    empty[0, :, 2, :] = False
    out3, _ = fast_dropout_attention(module, q, k, v, empty, dropout=p, scaling=scale)
    assert torch.all(out3[0, 2] == 0) and out3[0, 3].abs().sum() > 0


def test_fast_attention_hands_everything_else_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, mask = _attention_inputs()
    module, causal, unknown, grouped = _Attention(), _Attention(), nn.Module(), _Attention()
    causal.is_causal = True
    grouped.num_key_value_groups = 3
    one_head = (k[:, :1], v[:, :1])
    cases = [  # (module, training, key/value, mask, keyword arguments)
        (module, False, (k, v), mask, {"dropout": 0.25}),  # eval mode, whatever the dropout
        (module, True, (k, v), mask, {"dropout": 0.0}),
        (causal, True, (k, v), None, {"dropout": 0.25}),
        (unknown, True, (k, v), None, {"dropout": 0.25}),  # no is_causal: sdpa assumes causal
        (module, True, (k, v), mask, {"dropout": 0.25, "sliding_window": 3}),
        (grouped, True, one_head, None, {"dropout": 0.25}),  # grouped-query attention
    ]
    for mod, training, (key, value), m, kwargs in cases:
        mod.train(training)
        torch.manual_seed(2)
        got, _ = fast_dropout_attention(mod, q, key, value, m, scaling=0.4, **kwargs)
        torch.manual_seed(2)
        want, _ = sdpa_attention_forward(mod, q, key, value, m, scaling=0.4, **kwargs)
        assert torch.equal(got, want)


def test_a_bert_in_training_takes_the_fast_path(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    model = _bert_with_dropout()
    use_fast_dropout(model)

    def refuse(*args, **kwargs):
        raise AssertionError("handed to sdpa")

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", refuse)
    logits(model.train(), bert_inputs()).sum().backward()  # the fast path, not sdpa
    with pytest.raises(AssertionError, match="handed to sdpa"):
        logits(model.eval(), bert_inputs())


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
    hooked = next(m for m in model.modules() if type(m) is nn.Dropout)
    calls: list[int] = []
    hooked.register_forward_hook(lambda *_: calls.append(1))
    counts = use_fast_dropout(model)
    assert counts == {"modules": n_dropout, "attention": 1}
    assert not any(type(m) is nn.Dropout for m in model.modules())
    # the same modules, converted in place: the eval mode and their hooks are kept
    assert isinstance(hooked, FastDropout) and not hooked.training
    assert not any(m.training for m in model.modules())
    assert torch.equal(logits(model.eval(), x), before)
    assert calls  # the hook still fires
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


def test_run_config_fast_dropout_is_a_checked_switch(tmp_path):
    assert RunConfig().fast_dropout is True
    # a run directory's config.yaml written before the key existed trained with torch's dropout:
    # resuming or evaluating it must not switch
    old = tmp_path / "config.yaml"
    old.write_text("model: tiny-vit\ntask: digits\n")
    assert load_config(old).fast_dropout is True  # a user's config: today's default
    assert load_config(old, saved=True).fast_dropout is False
    assert load_config(old, ["fast_dropout=true"], saved=True).fast_dropout is True
    old.write_text("model: tiny-vit\nfast_dropout: true\n")
    assert load_config(old, saved=True).fast_dropout is True
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

    from slimtune.app.cli import app

    for bad in ("0", "two"):
        res = CliRunner().invoke(app, ["bench", "dropout", "--quick", "--threads", bad])
        assert res.exit_code == 2 and "--threads" in res.output, res.output
