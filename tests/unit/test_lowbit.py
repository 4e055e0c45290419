"""Low-bit adapters and Bi-Head: quantizer, storage, old formats, exports."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import dinov2_like, logits, perturb, tiny_bert, tiny_vit, vit_inputs

import slimtune
import slimtune.app.config
from slimtune import Adapter, BitFit, Head, LoRA
from slimtune.io import tensor_descriptions
from slimtune.methods.head import QuantizedHead
from slimtune.quant import EPS, QuantSpec, decode, encode, normal_levels, quantize


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_forward_is_decode_of_encode_and_mu_sigma_carry_gradients(bits):
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(7, 5, generator=g) * 0.3 + 0.2).requires_grad_(True)
    spec = QuantSpec(bits)
    q = quantize(w, spec)
    assert torch.equal(q.detach(), decode(*encode(w.detach(), spec), spec))
    c = torch.randn(7, 5, generator=g)
    (q * c).sum().backward()
    # With mu and sigma detached the gradient would be c * sigma / (sigma + eps); the real one
    # also flows through the matrix's mean and standard deviation.
    sigma = w.detach().std(unbiased=False)
    detached = c * sigma / (sigma + EPS)
    assert w.grad is not None
    assert not torch.allclose(w.grad, detached, atol=1e-3)
    levels, _ = normal_levels(bits)
    w_hat = (w.detach() - w.detach().mean()) / (sigma + EPS)
    idx = torch.bucketize(w_hat, ((levels[1:] + levels[:-1]) / 2).float())
    d_mu = c.sum()
    d_sigma = (c * levels.float()[idx]).sum()
    n = w.numel()
    want = (
        c * sigma / (sigma + EPS)
        + d_mu / n
        + d_sigma * (w.detach() - w.detach().mean()) / (n * sigma)
    )
    # w_hat's own dependence on mu/sigma adds terms proportional to sum(c) and sum(c * w_hat).
    want = want - (c.sum() / n + (c * w_hat).sum() * w_hat / n) * sigma / (sigma + EPS)
    assert torch.allclose(w.grad, want, atol=1e-4), (w.grad - want).abs().max()


@pytest.mark.parametrize("factory", [tiny_bert, tiny_vit], ids=["bert", "vit"])
def test_bihead_round_trip_gives_identical_predictions(factory, tmp_path):
    from tiny_models import MODELS

    inputs = MODELS["bert" if factory is tiny_bert else "vit"][1]
    model = factory()
    slimtune.apply(model, [Adapter.adaptformer(dim=4, bits=1)], head_bits=1)
    perturb(model)
    x = inputs()
    ref = logits(model, x)
    slimtune.save(model, tmp_path / "ad")
    head = {n: i for n, i in tensor_descriptions(tmp_path / "ad").items() if i["method"] == "head"}
    assert list(head) == ["classifier.base_layer.weight"]
    assert head["classifier.base_layer.weight"]["bits"] == 1
    fresh = slimtune.load(factory(), tmp_path / "ad")
    assert torch.equal(ref, logits(fresh, x))
    slimtune.save(fresh, tmp_path / "ad2")
    assert torch.equal(ref, logits(slimtune.load(factory(), tmp_path / "ad2"), x))


def test_bihead_uses_a_one_bit_matrix_without_bias_and_trains_it():
    model = tiny_vit()
    slimtune.apply(model, [Adapter.adaptformer(dim=4, bits=1)], head_bits=1)
    head = model.classifier
    assert isinstance(head, QuantizedHead)
    assert not head.base_layer.bias.requires_grad
    w = head.quantized_weight().detach()
    assert len(torch.unique(w)) == 2
    x = torch.randn(5, 16)
    assert torch.allclose(head(x), x @ w.t())
    model.train()
    logits(model, vit_inputs()).square().sum().backward()
    assert head.base_layer.weight.grad is not None and head.base_layer.weight.grad.abs().sum() > 0
    assert head.base_layer.bias.grad is None
    by = slimtune.summary(model).by_method
    assert by["head"] == head.base_layer.weight.numel()
    slimtune.remove(model)
    assert type(model.classifier) is torch.nn.Linear


def test_head_method_keeps_a_float_bias_when_asked(tmp_path):
    model = tiny_bert()
    slimtune.apply(model, [LoRA(r=2, bits=2), Head(bits=2, bias=True)])
    assert model.classifier.use_bias and model.classifier.base_layer.bias.requires_grad
    perturb(model)
    slimtune.save(model, tmp_path / "ad")
    described = tensor_descriptions(tmp_path / "ad")
    assert described["classifier.base_layer.weight"]["bits"] == 2
    assert "bits" not in described["classifier.base_layer.bias"]


@pytest.mark.parametrize(
    ("make", "word"),
    [
        (lambda: slimtune.apply(tiny_vit(), [LoRA(r=2)], head_bits=3), "bits"),
        (lambda: Head(bits=32), "bits"),
        (lambda: Head(bits=1, criterion="l2"), "criterion"),
        (lambda: slimtune.apply(tiny_vit(), [LoRA(r=2)], head=[], head_bits=1), "head"),
    ],
)
def test_bad_head_settings_raise_plan_errors(make, word):
    with pytest.raises(slimtune.PlanError, match=word):
        make()


def test_run_config_validates_head_bits():
    from slimtune.app.config import ConfigError, RunConfig

    assert RunConfig(head_bits=1).head_bits == 1
    with pytest.raises(ConfigError, match="head_bits"):
        RunConfig(head_bits=3)


@pytest.mark.parametrize("bits", [32, 1])
def test_adaptformer_reads_the_residual_stream_without_biases(bits):
    model = tiny_vit()
    slimtune.apply(model, [Adapter.adaptformer(dim=4, scale=0.5, bits=bits)])
    perturb(model)
    block = model.backbone.encoder.layer[0]
    layer = block.layer_scale2
    assert layer.parallel and layer.activation == "relu"
    assert layer.down.bias is None and layer.up.bias is None
    seen = {}
    block.norm2.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0]))
    layer.base_layer.register_forward_hook(lambda m, a, o: seen.setdefault("ffn", o))
    layer.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    with torch.no_grad():
        logits(model, vit_inputs())
    wd, wu = layer.weights()
    want = seen["ffn"] + 0.5 * torch.relu(seen["x"] @ wd.t()) @ wu.t()
    assert torch.allclose(seen["out"], want, atol=1e-6)


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_up_projections_start_as_a_tiny_truncated_normal_when_quantized(method):
    model = dinov2_like(64, 1)
    cfg = Adapter.adaptformer(dim=32, bits=1) if method == "adapter" else LoRA(r=32, bits=1)
    slimtune.apply(model, [cfg])
    ups = [p for n, p in model.named_parameters() if n.endswith(("up.weight", "lora_B"))]
    assert ups
    for up in ups:
        assert float(up.detach().abs().max()) <= 2e-3
        assert 0.5e-3 < float(up.detach().std()) < 1.2e-3
    fp = dinov2_like(64, 1)
    slimtune.apply(fp, [Adapter.adaptformer(dim=32)])
    ups = [p for n, p in fp.named_parameters() if n.endswith("up.weight")]
    assert ups and all(float(p.detach().abs().max()) == 0.0 for p in ups)


def test_compact_storage_is_within_its_bound_and_25x_below_float32(tmp_path):
    hidden, layers, dim = 768, 4, 32
    sizes = {}
    for name, bits, head_bits in (("fp32", 32, 32), ("1bit", 1, 32), ("bihead", 1, 1)):
        model = dinov2_like(hidden, layers)
        slimtune.apply(model, [Adapter.adaptformer(dim=dim, bits=bits)], head_bits=head_bits)
        perturb(model)
        d = slimtune.save(model, tmp_path / name)
        rep = slimtune.storage_report(d)
        files = sum(f.stat().st_size for f in d.iterdir())
        assert rep["total_disk_bytes"] == files
        assert rep["header_bytes"] == files - sum(rep["parts"].values())
        sizes[name] = (files, rep)
    weights = layers * 2 * hidden * dim
    head = 2 * hidden * 10
    files, rep = sizes["bihead"]
    assert rep["bound_bytes"] == weights / 8 + layers * 2 * 8 + head / 8 + 8
    assert rep["parts"] == {"adapter": weights / 8 + layers * 2 * 8, "head": head / 8 + 8}
    # One safetensors header for all codes: the weights file is within 3% + 2 KiB of the bound
    # even for a small adapter; with the JSON manifest the whole adapter still is 25x below fp32.
    for name in ("fp32", "1bit", "bihead"):
        files, rep = sizes[name]
        weights_file = rep["disk_bytes"]["adapter.safetensors"]
        assert weights_file <= 1.03 * rep["bound_bytes"] + 2048, (name, weights_file, rep)
        if name != "fp32":  # one header entry for all codes, one for all scales
            assert weights_file - sum(rep["parts"].values()) < 600, name
    assert sizes["fp32"][0] / sizes["bihead"][0] >= 25, (sizes["fp32"][0], sizes["bihead"][0])


def _as_format_2(d):
    """Rewrite a saved adapter as format 2 wrote it: one manifest entry per tensor (byte range
    and scale row for quantized matrices), float tensors by name, the plan entry by entry."""
    manifest = json.loads((d / "slimtune.json").read_text())
    manifest.pop("weights_sha256", None)  # older formats had no digests
    tensors = load_file(str(d / "adapter.safetensors"))
    out = {k: v for k, v in tensors.items() if k.startswith(("plan/", "quant/"))}
    described = {}
    for name, info in tensor_descriptions(d).items():
        entry = {"shape": info["shape"], "dtype": info["dtype"]}
        if "bits" in info:
            entry.update(bits=info["bits"], criterion=info["criterion"], method=info["method"])
            entry.update(codes=info["codes"], scale=info["scale"])
        else:
            key, index = info["stored"]
            out[name] = (tensors[key] if index is None else tensors[key][index]).clone()
            entry["method"] = info["method"]
        described[name] = entry
    plan_tensors = {k[5:]: v for k, v in tensors.items() if k.startswith("plan/")}
    manifest["plan"] = slimtune.Plan.from_dict(manifest["plan"], plan_tensors).to_dict()
    assert manifest["plan"]["version"] == 1 and "targets" not in manifest["plan"]["entries"][0]
    manifest["format_version"] = 2
    manifest["tensors"] = described
    save_file(out, str(d / "adapter.safetensors"), metadata={"format": "slimtune-adapter"})
    (d / "slimtune.json").write_text(json.dumps(manifest, separators=(",", ":")))


def _as_format_1(d):
    """Format 2 -> format 1: one codes/mu/sigma triple per quantized matrix."""
    manifest = json.loads((d / "slimtune.json").read_text())
    manifest.pop("weights_sha256", None)  # older formats had no digests
    tensors = load_file(str(d / "adapter.safetensors"))
    codes, scales = tensors.pop("quant/codes"), tensors.pop("quant/scales")
    for name, info in manifest["tensors"].items():
        if "bits" in info:
            offset, nbytes = info.pop("codes")
            row = info.pop("scale")
            tensors[name + ".codes"] = codes[offset : offset + nbytes].clone()
            tensors[name + ".mu"] = scales[row, :1].clone()
            tensors[name + ".sigma"] = scales[row, 1:].clone()
    manifest["format_version"] = 1
    save_file(tensors, str(d / "adapter.safetensors"))
    (d / "slimtune.json").write_text(json.dumps(manifest))


def test_format_version_1_and_2_files_still_load(tmp_path):
    """Adapters written with one manifest entry per tensor (format 2) or, before that, one
    codes/mu/sigma triple per matrix (format 1) keep loading identically."""
    model = tiny_bert()
    slimtune.apply(model, [LoRA(r=2, bits=2), BitFit()], head_bits=1)
    perturb(model)
    x = {"input_ids": torch.randint(0, 50, (2, 7))}
    ref = logits(model, x)
    d = slimtune.save(model, tmp_path / "ad")
    _as_format_2(d)
    assert torch.equal(ref, logits(slimtune.load(tiny_bert(), d), x))
    rep = slimtune.storage_report(d)
    _as_format_1(d)
    assert torch.equal(ref, logits(slimtune.load(tiny_bert(), d), x))
    assert slimtune.storage_report(d)["bound_bytes"] == rep["bound_bytes"]
    # Saving a model loaded from an old file writes the current format.
    again = slimtune.save(slimtune.load(tiny_bert(), d), tmp_path / "again")
    assert json.loads((again / "slimtune.json").read_text())["format_version"] == 3
    assert torch.equal(ref, logits(slimtune.load(tiny_bert(), again), x))


@pytest.mark.parametrize("factory", [tiny_bert, tiny_vit], ids=["bert", "vit"])
def test_one_bit_lora_with_bihead_exports_dequantized_to_peft_and_merged(factory, tmp_path):
    from peft import PeftModel
    from tiny_models import MODELS

    inputs = MODELS["bert" if factory is tiny_bert else "vit"][1]
    model = factory()
    slimtune.apply(model, [LoRA(r=2, alpha=4, bits=1)], head_bits=1)
    perturb(model)
    model.eval()
    x = inputs()
    ref = logits(model, x)
    slimtune.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(factory(), tmp_path / "peft").eval()
    assert torch.allclose(logits(peft_model, x), ref, atol=1e-5)

    merged = factory()
    merged.load_state_dict(slimtune.merged_state_dict(model))
    assert torch.allclose(logits(merged, x), ref, atol=1e-5)

    # merge / unmerge in place, also on a loaded model (whose head holds restored levels).
    slimtune.save(model, tmp_path / "ad")
    loaded = slimtune.load(factory(), tmp_path / "ad")
    for m in (model, loaded):
        slimtune.merge(m)
        assert torch.allclose(logits(m, x), ref, atol=1e-5)
        slimtune.unmerge(m)
        assert torch.equal(logits(m, x), ref)
