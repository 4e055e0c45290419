"""LoRA on nn.Conv2d: zero-init, merge, dense reference, quantized save/load, peft export."""

from __future__ import annotations

import pytest
import torch
from tiny_models import logits, perturb, tiny_vit, vit_inputs

import slimtune
from slimtune import LoRA
from slimtune.errors import PlanError
from slimtune.methods import LoRAConv2d

PATCH = r"patch_embeddings\.projection"


def test_conv_lora_is_zero_init_and_counts_match_formula():
    model, x = tiny_vit(), vit_inputs()
    ref = logits(model, x)
    slimtune.apply(model, [LoRA(r=2, alpha=4, targets=[PATCH])], head=[])
    layer = model.backbone.embeddings.patch_embeddings.projection
    assert isinstance(layer, LoRAConv2d)
    assert torch.equal(logits(model, x), ref)
    # A: r x in x kh x kw, B: out x r
    assert slimtune.summary(model).by_method["lora"] == 2 * 3 * 7 * 7 + 16 * 2


def test_conv_lora_equals_dense_weight_update_and_merges():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1, dilation=1)
    model = torch.nn.Sequential(conv)
    slimtune.apply(model, [LoRA(r=2, alpha=3, targets=["0"])], head=[])
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 9, 11)
    y = model(x)
    delta = (layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)).reshape(5, 3, 3, 3) * 1.5
    dense = torch.nn.functional.conv2d(x, conv.weight + delta, conv.bias, stride=2, padding=1)
    assert torch.allclose(y, dense, atol=1e-5)
    slimtune.merge(model)
    assert torch.allclose(model(x), y, atol=1e-5)
    slimtune.unmerge(model)
    assert torch.allclose(model(x), y, atol=1e-6)
    # gradients reach A and B only
    model(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert conv.weight.grad is None


@pytest.mark.parametrize("bits", [32, 2])
def test_conv_lora_save_load_is_bit_exact(bits, tmp_path):
    model, x = tiny_vit(), vit_inputs()
    slimtune.apply(model, [LoRA(r=2, alpha=4, bits=bits, targets=[PATCH, "q"])])
    perturb(model)
    ref = logits(model, x)
    slimtune.save(model, tmp_path / "a")
    restored = slimtune.load(tiny_vit(), tmp_path / "a")
    assert torch.equal(logits(restored, x), ref)


def test_conv_lora_exports_to_peft_with_equal_logits(tmp_path):
    from peft import PeftModel

    model, x = tiny_vit(), vit_inputs()
    slimtune.apply(model, [LoRA(r=2, alpha=4, targets=[PATCH, "v"])])
    perturb(model)
    model.eval()
    ref = logits(model, x)
    slimtune.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_vit(), tmp_path / "peft").eval()
    assert torch.allclose(logits(peft_model, x), ref, atol=1e-5)


def test_conv_lora_refuses_grouped_convolutions():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(PlanError, match="groups=2"):
        slimtune.apply(model, [LoRA(r=2, targets=["0"])], head=[])
