"""A quantized frozen base (slimtune.quantize_base, bitsandbytes): methods on 4-bit and 8-bit
linears, the avx512_bf16 zero-gradient trap, save/load refusals, merge, peft export, SPT and
Light-PEFT shrinking, on tiny Llama, OPT and GPT-2 models."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import decoder_inputs, logits, perturb, tiny_gpt2, tiny_llama, tiny_opt

import slimtune
from slimtune import Adapter, BitFit, LoRA, Prompt, Sparse
from slimtune.errors import LoadError, PlanError
from slimtune.linear import dims, weight_oi
from slimtune.methods.base import unwrap
from slimtune.qbase import BaseQuant, Int8Embedding, is_quantized, weights_bytes
from slimtune.qbase.layers import quantize_linear

bnb = pytest.importorskip("bitsandbytes")  # a dev dependency: installed by `make setup`

BUILD = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2}


def _labels(x: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.arange(x["input_ids"].shape[0]) % 3


def _quantized(kind: str = "llama", bits: int = 4, **kw: object) -> torch.nn.Module:
    model = BUILD[kind]()
    slimtune.quantize_base(model, bits=bits, **kw)  # type: ignore[arg-type]
    return model


@pytest.mark.parametrize("kind", sorted(BUILD))
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_base_replaces_every_block_linear_and_nothing_else(kind, bits):
    model = BUILD[kind]()
    fam = slimtune.detect_family(model)
    blocks = tuple(b + "." for b in fam.block_names(model))
    before = {
        n: dims(m)
        for n, m in model.named_modules()
        if n.startswith(blocks) and hasattr(m, "weight") and m.weight.dim() == 2
    }
    x = decoder_inputs()
    ref = logits(model.eval(), x)
    spec = slimtune.quantize_base(model, bits=bits)
    assert spec.bits == bits and slimtune.base_quant(model) == spec
    quantized = {n for n, m in model.named_modules() if is_quantized(m)}
    assert quantized == set(before)  # every block linear, no head, no embedding
    assert all(dims(model.get_submodule(n)) == d for n, d in before.items())
    out = logits(model, x)
    # close to the float model (quantization error only), never equal
    err = (out - ref).abs().max().item()
    assert 0 < err < (0.1 if bits == 4 else 0.02) * ref.abs().max().item() + 0.02


def test_quantized_weights_take_a_fraction_of_the_float_bytes():
    model = tiny_llama()
    # a wider model so the block linears dominate the bytes
    big = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))
    full = weights_bytes(big)["bytes"]
    slimtune.quantize_base(big, bits=4, targets=r"\d")
    four = weights_bytes(big)["bytes"]
    assert four < 0.16 * full  # 4 bits + absmax + fp32 biases
    slimtune.quantize_base(model, bits=8)
    assert weights_bytes(model)["bytes"] < weights_bytes(tiny_llama())["bytes"]


def test_settings_are_validated_and_applying_twice_or_after_methods_is_refused():
    with pytest.raises(PlanError, match="base_bits must be 4 or 8"):
        slimtune.quantize_base(tiny_llama(), bits=3)
    with pytest.raises(PlanError, match="has 8 bits, not base_bits=4"):
        slimtune.quantize_base(tiny_llama(), bits=4, kind="int8")
    with pytest.raises(PlanError, match="block_size 48"):
        slimtune.quantize_base(tiny_llama(), bits=4, block_size=48)
    model = _quantized()
    with pytest.raises(PlanError, match="already quantized"):
        slimtune.quantize_base(model, bits=4)
    model = slimtune.apply(tiny_llama(), [LoRA(r=2, targets=["q"])])
    with pytest.raises(PlanError, match="before applying slimtune methods"):
        slimtune.quantize_base(model, bits=4)
    with pytest.raises(PlanError, match="match no linear"):
        slimtune.quantize_base(tiny_llama(), bits=4, targets="nothing")
    assert BaseQuant.from_dict(BaseQuant(kind="fp4", block_size=128).to_dict()) == BaseQuant(
        kind="fp4", block_size=128
    )


METHODS = {
    "lora": lambda m: [LoRA(r=2, alpha=4, targets=["q", "k", "v", "o", "fc1", "fc2"])],
    "lora-1bit": lambda m: [LoRA(r=2, alpha=4, bits=1, targets=["q", "v"])],
    "adapter": lambda m: [Adapter(dim=3, targets=["fc2"])],
    "adapter-1bit": lambda m: [Adapter(dim=3, bits=1, targets=["fc2"])],
    "bitfit": lambda m: [BitFit(add_missing=True)],
    "sparse": lambda m: [
        Sparse(
            indices={
                n + ".weight": [0, 5, 17, 100] for n in slimtune.detect_family(m).role_names(m, "q")
            }
        )
    ],
    "prompt": lambda m: [Prompt(length=2)],
}


@pytest.mark.parametrize(
    ("kind", "bits"), [*((k, 4) for k in sorted(BUILD)), ("llama", 8)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_on_a_quantized_base_start_at_the_base_train_and_reload_exactly(
    kind, bits, method, tmp_path
):
    model = _quantized(kind, bits=bits)
    x = decoder_inputs()
    model.eval()
    base = logits(model, x)
    slimtune.apply(model, METHODS[method](model))
    if method not in ("lora-1bit", "adapter-1bit", "prompt"):  # zero-initialised
        assert torch.equal(logits(model, x), base)
    # gradients reach exactly the trainable tensors, and they are not all zero
    model.train()
    out = model(**x, labels=_labels(x))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "score" not in n)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    perturb(model)
    model.eval()
    want = logits(model, x)
    slimtune.save(model, tmp_path / "a")
    again = slimtune.load(_quantized(kind, bits=bits), tmp_path / "a").eval()
    assert torch.equal(logits(again, x), want)


def _step(model, x, opt) -> float:
    model.train()
    out = model(**x, labels=_labels(x))
    out.loss.backward()
    opt.step()
    return float(out.loss)


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_still_gets_gradients_after_an_evaluation_pass(bits):
    """The avx512_bf16 trap class: an eval-mode forward under no_grad must not leave the base in
    a state where the adapter trains on zero gradients (bitsandbytes repacks 4-bit weights for
    its CPU bf16 kernel there; slimtune turns that repacking off on every layer)."""
    model = _quantized(bits=bits)
    assert all(
        not m.support_avx512bf16_for_cpu
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )
    slimtune.apply(model, [LoRA(r=2, alpha=4, targets=["q", "v"])])
    x = decoder_inputs()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    _step(model, x, opt)
    model.eval()
    with torch.no_grad():
        logits(model, x)  # evaluation, as a training loop does between epochs
    opt.zero_grad()
    model.train()
    out = model(**x, labels=_labels(x))
    out.loss.backward()
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora.values())
    before = float(out.loss)
    opt.step()
    opt.zero_grad()
    after = _step(model, x, opt)
    assert after != before


def test_load_refuses_a_base_quantized_differently_or_not_at_all(tmp_path):
    model = _quantized()
    slimtune.apply(model, [LoRA(r=2, targets=["q", "v"])])
    slimtune.save(model, tmp_path / "nf4")
    with pytest.raises(
        LoadError, match="trained on a base quantized as nf4.*this model has a float"
    ):
        slimtune.load(tiny_llama(), tmp_path / "nf4")
    with pytest.raises(LoadError, match="this model has a base quantized as int8"):
        slimtune.load(_quantized(bits=8), tmp_path / "nf4")
    with pytest.raises(LoadError, match="blocks of 64.*blocks of 128"):
        slimtune.load(_quantized(block_size=128), tmp_path / "nf4")
    fp = slimtune.apply(tiny_llama(), [LoRA(r=2, targets=["q", "v"])])
    slimtune.save(fp, tmp_path / "fp32")
    with pytest.raises(LoadError, match="trained on a float .*load it onto the float base"):
        slimtune.load(_quantized(), tmp_path / "fp32")
    target = _quantized()
    snapshot = {n: type(m) for n, m in target.named_modules()}
    with pytest.raises(LoadError):
        slimtune.load(target, tmp_path / "fp32")
    assert {n: type(m) for n, m in target.named_modules()} == snapshot  # nothing half-loaded


def test_saving_never_stores_the_quantized_base(tmp_path):
    from safetensors.torch import load_file

    model = _quantized()
    slimtune.apply(model, [LoRA(r=2, targets=["q", "v"])])
    slimtune.save(model, tmp_path / "a")
    names = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert names and all("lora_" in n or "score" in n or n.startswith("digest/") for n in names)


@pytest.mark.parametrize("method", ["lora", "sparse"])
def test_merge_onto_a_quantized_base_is_refused_and_exact_after_dequantize_base(method):
    # only the second block quantized: the first block's float layers come first in the model
    # and would be merged if the refusal were not made before anything is folded
    model = tiny_llama()
    slimtune.quantize_base(model, bits=4, targets=r".*layers\.1\..*")
    slimtune.apply(model, METHODS[method](model))
    perturb(model)
    model.eval()
    x = decoder_inputs()
    want = logits(model, x)
    with pytest.raises(PlanError, match="dequantize_base"):
        slimtune.merge(model)
    assert not any(getattr(m, "merged", False) for m in model.modules())  # all or nothing
    assert torch.allclose(logits(model, x), want)
    assert slimtune.dequantize_base(model) > 0
    assert slimtune.base_quant(model) is None
    assert torch.allclose(logits(model, x), want, atol=1e-5)
    slimtune.merge(model)
    assert torch.allclose(logits(model, x), want, atol=1e-5)


def test_peft_export_of_lora_on_a_4bit_base_loads_in_peft_on_the_same_base(tmp_path):
    from peft import PeftModel

    model = _quantized()
    slimtune.apply(model, [LoRA(r=2, alpha=4, targets=["q", "v", "fc2"])])
    perturb(model)
    model.eval()
    x = decoder_inputs()
    slimtune.export_peft(model, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(_quantized(), tmp_path / "peft").eval()
    assert isinstance(
        unwrap(theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer),
        bnb.nn.Linear4bit,
    )
    assert torch.allclose(logits(theirs, x), logits(model, x), atol=1e-5)


def test_spt_scores_on_a_4bit_base_equal_those_of_its_dequantized_weights():
    from slimtune.passes.spt.sensitivity import sensitivity

    model = _quantized()
    twin = copy.deepcopy(model)
    slimtune.dequantize_base(twin)
    x = decoder_inputs()
    batch = {**x, "labels": _labels(x)}
    ours = sensitivity(model, [batch], n_batches=1)
    ref = sensitivity(twin, [batch], n_batches=1)
    assert sorted(ours) == sorted(ref)
    q = slimtune.detect_family(model).role_names(model, "q")[0] + ".weight"
    assert ours[q].shape == ref[q].shape and ours[q].abs().sum() > 0
    for n in ref:
        assert torch.allclose(ours[n], ref[n], rtol=1e-4, atol=1e-12), n


@pytest.mark.parametrize("bits", [4, 8])
def test_shrinking_a_quantized_base_requantizes_the_sliced_linears(bits):
    from slimtune.passes.shrink import shrink

    model = _quantized(bits=bits)
    slimtune.apply(model, [LoRA(r=2, alpha=4, targets=["q", "v", "fc1", "fc2"])])
    perturb(model)
    model.eval()
    twin = copy.deepcopy(model)
    slimtune.dequantize_base(twin)
    blocks = slimtune.detect_family(model).block_names(model)
    keep_q = unwrap(model.get_submodule(f"{blocks[1]}.self_attn.q_proj")).weight.detach().clone()
    heads = {blocks[0]: [0, 1], blocks[1]: [0, 1, 2, 3]}  # block 1 keeps all its heads
    neurons = {blocks[1]: list(range(0, 24, 2))}
    shrink(model, heads=heads, neurons=neurons)
    shrink(twin, heads=heads, neurons=neurons)
    assert slimtune.base_quant(model) == BaseQuant.of(bits)
    up = unwrap(model.get_submodule(blocks[1] + ".mlp.up_proj"))
    assert is_quantized(up) and dims(up) == (32, 12)
    # each sliced linear is exactly the float-sliced dequantized weight, quantized again
    spec = BaseQuant.of(bits)
    sliced = [f"{blocks[0]}.self_attn.{p}_proj" for p in "qkvo"]
    sliced += [f"{blocks[1]}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    for name in sliced:
        ours = unwrap(model.get_submodule(name))
        ref = unwrap(twin.get_submodule(name))
        again = quantize_linear(weight_oi(ref), None, spec)
        assert torch.equal(weight_oi(ours), weight_oi(again)), name
    # linears that lose nothing keep their codes
    assert torch.equal(
        unwrap(model.get_submodule(f"{blocks[1]}.self_attn.q_proj")).weight.detach(), keep_q
    )
    x = decoder_inputs()
    assert torch.isfinite(logits(model, x)).all()


def test_int8_embeddings_shrink_the_table_and_refuse_a_tied_lm_head():
    model = tiny_llama()
    x = decoder_inputs()
    ref = logits(model.eval(), x)
    table = model.get_input_embeddings().weight.detach().clone()
    slimtune.quantize_base(model, bits=4, embeddings=True)
    emb = model.get_input_embeddings()
    assert isinstance(emb, Int8Embedding) and slimtune.base_quant(model).embeddings
    assert (emb.weight - table).abs().max() <= table.abs().amax(1).max() / 254 + 1e-7
    assert (logits(model, x) - ref).abs().max() < 0.1 * ref.abs().max() + 0.02
    with pytest.raises(PlanError, match="ties its output layer"):
        slimtune.quantize_base(tiny_llama(causal=True), bits=4, embeddings=True)
    slimtune.dequantize_base(model)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)


def test_weight_oi_of_a_quantized_linear_is_its_dequantized_weight():
    lin = torch.nn.Linear(64, 32)
    q = quantize_linear(lin.weight, lin.bias, BaseQuant())
    w = weight_oi(q)
    x = torch.randn(5, 64)
    assert w.shape == (32, 64)
    assert torch.allclose(q(x), x @ w.t() + lin.bias, atol=1e-5)


def test_the_training_loop_refuses_an_epoch_whose_gradients_are_all_zero():
    from slimtune.app.loop import check_gradients
    from slimtune.errors import SlimtuneError

    model = _quantized()
    slimtune.apply(model, [LoRA(r=2, alpha=4, targets=["q", "v"])])
    trainable = [p for p in model.parameters() if p.requires_grad]
    x = decoder_inputs()
    model.train()
    (model(**x, labels=_labels(x)).loss * 0).backward()  # what a repacked base would give
    with pytest.raises(SlimtuneError, match="epoch 2: every trainable tensor"):
        check_gradients(trainable, 1)
    model.zero_grad()
    model(**x, labels=_labels(x)).loss.backward()
    check_gradients(trainable, 1)


def test_a_run_config_quantizes_the_base_and_rebuilds_it(tmp_path):
    from slimtune.app.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="base_bits must be 4 or 8"):
        RunConfig(base_bits=2)
    with pytest.raises(ConfigError, match="base_kind needs base_bits"):
        RunConfig(base_kind="nf4")
    with pytest.raises(ConfigError, match="has 4 bits, not base_bits=8"):
        RunConfig(base_bits=8, base_kind="nf4")
    assert RunConfig(base_bits=4, base_kind="fp4").base_quant() == BaseQuant(kind="fp4")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_merged_export_of_a_quantized_base_holds_float_weights_in_the_original_layout(kind):
    model = _quantized(kind)
    extra = [BitFit()] if kind == "gpt2" else []  # GPT-2 has biases; Llama has none
    slimtune.apply(model, [LoRA(r=2, alpha=4, targets=["q", "v", "fc1"]), *extra])
    perturb(model)
    model.eval()
    x = decoder_inputs()
    want = logits(model, x)
    merged = slimtune.merged_state_dict(model)
    assert all(t.is_floating_point() for t in merged.values())
    plain = BUILD[kind]()
    plain.load_state_dict(merged, strict=True)  # GPT-2: Conv1D shapes, [in, out]
    assert slimtune.base_quant(model) is not None  # the model itself is untouched
    assert torch.allclose(logits(plain.eval(), x), want, atol=1e-5)


def test_biases_stay_trainable_through_shrink_and_dequantize_base():
    from slimtune.passes.shrink import shrink

    model = _quantized("opt")
    slimtune.apply(model, [BitFit()])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    blocks = slimtune.detect_family(model).block_names(model)
    shrink(model, neurons={blocks[0]: [0, 2, 4]}, heads={blocks[1]: [0]})
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    slimtune.dequantize_base(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_full_tuning_of_quantized_codes_is_refused_clearly():
    from slimtune import Full

    with pytest.raises(PlanError, match="holds torch.uint8 codes of a quantized base"):
        slimtune.apply(_quantized(), [Full(targets=["q"])])


def test_an_8bit_pruned_backbone_reloads_with_its_codes(tmp_path):
    from slimtune.io import load_pruned, save_pruned
    from slimtune.passes.shrink import shrink

    model = _quantized(bits=8)
    blocks = slimtune.detect_family(model).block_names(model)
    shrink(model, heads={blocks[0]: [0, 1]}, neurons={blocks[1]: list(range(12))})
    save_pruned(model, tmp_path / "p")
    again = load_pruned(_quantized(bits=8), tmp_path / "p")
    x = decoder_inputs()
    model.train()  # int8 layers compute with the dequantized weights in train mode
    again.train()
    with torch.no_grad():
        assert torch.equal(logits(again, x), logits(model, x))
    for n, m in model.named_modules():
        if is_quantized(m):
            assert torch.equal(weight_oi(again.get_submodule(n)), weight_oi(m)), n


def test_merged_export_refuses_biases_the_architecture_cannot_hold():
    from slimtune.errors import ExportError

    model = slimtune.apply(tiny_llama(), [BitFit(add_missing=True)])
    with pytest.raises(ExportError, match="would silently drop them"):
        slimtune.merged_state_dict(model)
