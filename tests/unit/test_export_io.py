"""Export to peft, refusal of bad adapters, target/config errors, prompts, quantized storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_files import without_digests
from safetensors.torch import load_file, save_file
from tiny_models import MODELS, bert_inputs, logits, perturb, tiny_bert, tiny_vit, vit_inputs

import slimtune
from slimtune import Adapter, BitFit, LoRA, Prompt
from slimtune.io import tensor_descriptions
from slimtune.quant import QuantSpec, normal_levels, pack_codes, quantize, unpack_codes

ALL_ROLES = ["q", "k", "v", "o", "fc1", "fc2"]


# --------------------------------------------------------------------------- (a) peft export

EXPORTS = {
    "all-roles": lambda: [LoRA(r=2, alpha=4, targets=ALL_ROLES)],
    "two-ranks": lambda: [
        LoRA(r=2, alpha=4, targets=["q", "v"]),
        LoRA(r=4, alpha=3, targets=["o", "fc1"]),
    ],
}


@pytest.mark.parametrize("config", sorted(EXPORTS))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_export_peft_loads_in_real_peft_with_equal_logits(family, config, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    factory, inputs = MODELS[family]
    x = inputs()
    base_out = logits(factory(), x)
    model = factory()
    slimtune.apply(model, EXPORTS[config]())
    perturb(model)
    model.eval()
    ref = logits(model, x)
    assert not torch.allclose(ref, base_out, atol=1e-3)  # LoRA and head really changed

    slimtune.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    heads = slimtune.get_state(model).plan.head
    expected_head = {"tsvit": "mlp_head", "llama": "score", "opt": "score", "gpt2": "score"}
    assert cfg["modules_to_save"] == heads == [expected_head.get(family, "classifier")]
    if config == "two-ranks":
        # q, v at rank 2 and o, fc1 at rank 4 (Llama's fc1 role is its gate and up linears;
        # GPT-2's q and v are one fused c_attn): the common rank is r, the rest a pattern
        n_four = {"llama": 6, "gpt2": 4}.get(family, 4)
        n_two = {"gpt2": 2}.get(family, 4)
        r, other = (2, 4) if n_two >= n_four else (4, 2)
        assert cfg["r"] == r and set(cfg["rank_pattern"].values()) == {other}
        assert len(cfg["rank_pattern"]) == min(n_two, n_four) if r == 2 else n_two
    assert cfg["fan_in_fan_out"] == (family == "gpt2")  # GPT-2's Conv1D stores W as [in, out]

    peft_model = PeftModel.from_pretrained(factory(), tmp_path / "peft").eval()
    out = logits(peft_model, x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()

    # Every LoRA matrix arrived with the right rank, scaling and values.
    ours = dict(slimtune.core.wrappers(model))
    theirs = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer)
    }
    assert set(theirs) == set(ours)
    for name, w in ours.items():
        t = theirs[name]
        assert torch.equal(t.lora_A["default"].weight, w.lora_A.detach())
        assert torch.equal(t.lora_B["default"].weight, w.full_b().detach())  # fused: zero rows
        assert t.scaling["default"] == pytest.approx(w.scaling)
    # The head (modules_to_save) holds the trained values, not the fresh base's.
    for h in heads:
        saved = peft_model.base_model.model.get_submodule(h).modules_to_save["default"]
        trained = model.get_submodule(h).state_dict()
        assert all(torch.equal(v, trained[k]) for k, v in saved.state_dict().items())


@pytest.mark.parametrize(
    ("methods", "word"),
    [
        ([LoRA(r=2, targets=["q"]), Adapter(dim=2, targets=["fc2"])], "adapter"),
        ([LoRA(r=2, targets=["q"]), BitFit()], "bitfit"),
        ([BitFit()], "bitfit"),
    ],
)
def test_export_peft_refuses_methods_without_peft_equivalent(methods, word, tmp_path):
    model = slimtune.apply(tiny_bert(), methods)
    with pytest.raises(slimtune.ExportError, match=word):
        slimtune.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------ (b) bad adapters


def _bert_hidden(hidden: int, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        vocab_size=50,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def _saved(path: Path, model: torch.nn.Module | None = None, **lora: object) -> Path:
    model = tiny_bert() if model is None else model
    slimtune.apply(model, [LoRA(**{"r": 2, "targets": ["q", "v"], **lora})])  # type: ignore[arg-type]
    perturb(model)
    return slimtune.save(model, path)


def _snapshot(model: torch.nn.Module) -> tuple[list[str], dict[str, torch.Tensor], torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return names, state, logits(model, bert_inputs())


def _assert_untouched(model: torch.nn.Module, snap) -> None:
    names, state, out = snap
    assert [n for n, _ in model.named_parameters()] == names
    assert not hasattr(model, "_slimtune")
    assert all(p.requires_grad for p in model.parameters())
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert torch.equal(logits(model, bert_inputs()), out)


def _corrupt_json(d: Path) -> str:
    (d / "slimtune.json").write_text('{"format": "slimtune-adapter", "plan": [', encoding="utf-8")
    return "slimtune.json"


def _truncate_weights(d: Path) -> str:
    f = d / "adapter.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return "adapter.safetensors"


def _foreign_weights(d: Path) -> str:
    save_file({"embeddings.weight": torch.zeros(4, 4)}, str(d / "adapter.safetensors"))
    return "lora_"  # the first missing LoRA tensor is named


def _missing_tensor(d: Path) -> str:
    f = d / "adapter.safetensors"
    tensors = load_file(str(f))
    key = sorted(k for k in tensors if k.endswith("lora_B"))[-1]
    del tensors[key]
    save_file(tensors, str(f))
    return key


def _weights_from(d: Path, other: Path) -> None:
    (d / "adapter.safetensors").write_bytes((other / "adapter.safetensors").read_bytes())


def _other_rank(d: Path) -> str:
    _weights_from(d, without_digests(_saved(d.parent / "r4", r=4)))
    return "has shape"


def _other_hidden(d: Path) -> str:
    _weights_from(d, without_digests(_saved(d.parent / "h32", model=_bert_hidden(32))))
    return "has shape"


BAD = {
    "corrupted-json": _corrupt_json,
    "truncated-weights": _truncate_weights,
    "foreign-weights": _foreign_weights,
    "missing-tensor": _missing_tensor,
    "other-rank": _other_rank,
    "other-hidden-size": _other_hidden,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_files_are_refused_and_leave_the_base_untouched(case, tmp_path):
    d = without_digests(_saved(tmp_path / "ad"))  # the structural checks, behind the digests
    expect = BAD[case](d)
    base = tiny_bert()
    snap = _snapshot(base)
    with pytest.raises(slimtune.LoadError) as err:
        slimtune.load(base, d)
    msg = str(err.value)
    assert expect in msg, msg
    if case in ("other-rank", "other-hidden-size", "missing-tensor", "foreign-weights"):
        assert "adapter.safetensors" in msg and ".lora_" in msg, msg
    _assert_untouched(base, snap)


def test_failed_restore_gives_back_trainable_flags(tmp_path):
    d = _saved(tmp_path / "ad")
    _missing_tensor(d)
    base = tiny_bert()
    with pytest.raises(slimtune.LoadError):
        slimtune.load(base, d)
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize(
    ("other", "word"),
    [
        (lambda: tiny_bert(seed=1), "weights differ"),
        (lambda: _bert_hidden(32), "different architecture"),
        (lambda: tiny_bert(num_labels=3, seed=0).bert, "different architecture"),
    ],
    ids=["other-seed", "other-hidden-size", "other-architecture"],
)
def test_adapter_for_another_base_is_refused(other, word, tmp_path):
    d = _saved(tmp_path / "ad")
    base = other()
    names = [n for n, _ in base.named_parameters()]
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(slimtune.LoadError, match=word) as err:
        slimtune.load(base, d)
    assert str(d) in str(err.value)
    assert [n for n, _ in base.named_parameters()] == names
    assert not hasattr(base, "_slimtune")
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())


def test_bert_adapter_on_a_vit_is_refused(tmp_path):
    d = _saved(tmp_path / "ad")
    base = tiny_vit()
    x = vit_inputs()
    ref = logits(base, x)
    names = [n for n, _ in base.named_parameters()]
    with pytest.raises(slimtune.LoadError, match="architecture") as err:
        slimtune.load(base, d)
    assert str(d) in str(err.value)
    assert [n for n, _ in base.named_parameters()] == names
    assert not hasattr(base, "_slimtune")
    assert torch.equal(logits(base, x), ref)


# ------------------------------------------------------------------ (c) targets and configs


@pytest.mark.parametrize("target", ["nonexistent", r"encoder\.layer\.\d+\.nothing"])
def test_unmatched_target_lists_available_modules(tiny, target):
    factory, _ = tiny
    model = factory()
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(slimtune.TargetError) as err:
        slimtune.apply(model, [LoRA(targets=["q", target])])
    msg = str(err.value)
    assert repr(target) in msg
    assert "Available modules" in msg
    q = slimtune.detect_family(model).role_names(model, "q")[0]
    assert q.replace(".0.", ".N.") in msg  # a real module name, blocks collapsed
    assert [n for n, _ in model.named_parameters()] == names
    assert not hasattr(model, "_slimtune")


@pytest.mark.parametrize(
    ("make", "word"),
    [
        (lambda: LoRA(r=0), "rank"),
        (lambda: LoRA(r=-2), "rank"),
        (lambda: LoRA(dropout=1.5), "dropout"),
        (lambda: Adapter(placement="x"), "placement"),
        (lambda: LoRA(bits=3), "bits"),
        (lambda: Adapter(bits=3), "bits"),
        (lambda: LoRA(criterion="median"), "criterion"),
    ],
)
def test_invalid_configs_raise_plan_error(make, word):
    with pytest.raises(slimtune.PlanError, match=word) as err:
        make()
    assert isinstance(err.value, slimtune.SlimtuneError)


# --------------------------------------------------------------------------- (d) prompts


@pytest.mark.parametrize("deep", [False, True])
def test_prompt_counts_shapes_and_gradients(deep):
    model = tiny_vit()
    x = vit_inputs()
    ref = logits(model, x)
    hidden, layers, length = 16, 2, 3
    slimtune.apply(model, [Prompt(length=length, deep=deep)])
    out = logits(model, x)
    assert out.shape == ref.shape
    s = slimtune.summary(model)
    assert s.by_method["prompt"] == (layers if deep else 1) * length * hidden
    model.train()
    logits(model, x).square().sum().backward()
    prompts = [p for n, p in model.named_parameters() if n.endswith("prompts")]
    assert len(prompts) == (layers if deep else 1)
    for p in prompts:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_prompt_on_bert_is_a_target_error():
    model = tiny_bert()
    with pytest.raises(slimtune.TargetError, match="bert"):
        slimtune.apply(model, [Prompt(length=3)])
    assert not hasattr(model, "_slimtune")


# ----------------------------------------------------------------- (e) quantized storage


@pytest.mark.parametrize(
    ("bits", "criterion", "positive"),
    [(1, "l1", [0.6745]), (1, "mse", [0.7979]), (2, "l1", [0.3778, 1.2657])],
)
def test_normal_levels(bits, criterion, positive):
    levels, bounds = normal_levels(bits, criterion)
    want = torch.tensor([-v for v in reversed(positive)] + positive, dtype=torch.float64)
    assert torch.allclose(levels, want, atol=1e-3), levels
    assert torch.allclose(bounds, (levels[1:] + levels[:-1]) / 2)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [1, 7, 13, 1001])
def test_pack_unpack_round_trip(bits, size):
    g = torch.Generator().manual_seed(size * 10 + bits)
    codes = torch.randint(0, 2**bits, (size,), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-size * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, size), codes)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_straight_through_estimator_passes_gradients(bits):
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    q = quantize(w, QuantSpec(bits))
    levels, _ = normal_levels(bits)
    assert len(torch.unique(q.detach())) <= len(levels)
    q.sum().backward()
    assert w.grad is not None and w.grad.abs().min() > 0


def _quantized_tensors(d: Path) -> list[str]:
    """Quantized matrices in the order of their codes in ``quant/codes``."""
    described = tensor_descriptions(d)
    quantized = [(info["codes"][0], n) for n, info in described.items() if "bits" in info]
    return [n for _, n in sorted(quantized)]


def _truncate_codes(d: Path) -> str:
    f = d / "adapter.safetensors"
    tensors = load_file(str(f))
    tensors["quant/codes"] = tensors["quant/codes"][:-1].clone()
    save_file(tensors, str(f))
    return _quantized_tensors(d)[-1]  # the last matrix's codes are cut short


def _bits_disagree(d: Path) -> str:
    """Plan and tensor list both say 2 bits; the stored codes are 1-bit codes."""
    first = _quantized_tensors(d)[0]
    f = d / "slimtune.json"
    manifest = json.loads(f.read_text())
    for entry in manifest["tensors"]:
        if "bits" in entry:
            entry["bits"] = 2
    for e in manifest["plan"]["entries"]:
        e["settings"]["bits"] = 2
    f.write_text(json.dumps(manifest))
    return first


def _one_bits_disagrees(d: Path) -> str:
    """One tensor entry (a group of matrices) says 4 bits, the plan still 1."""
    f = d / "slimtune.json"
    manifest = json.loads(f.read_text())
    entry = [e for e in manifest["tensors"] if "bits" in e][1]
    entry["bits"] = 4
    f.write_text(json.dumps(manifest))
    return entry["name"].replace("{}", str(entry["each"][0])) if "each" in entry else entry["name"]


@pytest.mark.parametrize(
    "corrupt",
    [_truncate_codes, _bits_disagree, _one_bits_disagrees],
    ids=["truncated", "bits", "one-matrix-bits"],
)
def test_bad_quantized_codes_are_refused(corrupt, tmp_path):
    d = without_digests(_saved(tmp_path / "ad", bits=1))
    name = corrupt(d)
    base = tiny_bert()
    snap = _snapshot(base)
    with pytest.raises(slimtune.LoadError) as err:
        slimtune.load(base, d)
    msg = str(err.value)
    assert f"{name}.codes" in msg and "adapter.safetensors" in msg, msg
    assert ("truncated" in msg) if corrupt is _truncate_codes else ("bit width" in msg), msg
    _assert_untouched(base, snap)


def test_one_bit_storage_is_close_to_its_bound(tmp_path):
    from tiny_models import TinyViTClassifier
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = TinyViTClassifier(num_labels=3)
    # The bound leaves out safetensors' JSON header (~110 bytes per float tensor; all codes and
    # all scales share one entry each), which the 3% + 2 KiB allowance covers.
    hidden = 768
    model.backbone = Dinov2Model(
        Dinov2Config(
            hidden_size=hidden,
            num_hidden_layers=4,
            num_attention_heads=4,
            mlp_ratio=1,
            image_size=14,
            patch_size=7,
        )
    )
    model.classifier = torch.nn.Linear(hidden, 3)
    dim = 128
    slimtune.apply(model, [Adapter(dim=dim, placement="parallel", bits=1)])
    perturb(model)
    slimtune.save(model, tmp_path / "ad")
    rep = slimtune.storage_report(tmp_path / "ad")

    layers = 4
    adapter_weights = layers * 2 * hidden * dim
    adapter_bias = layers * (dim + hidden)
    head = hidden * 3 + 3
    want = adapter_weights / 8 + layers * 2 * 8 + (adapter_bias + head) * 4
    assert rep["bound_bytes"] == pytest.approx(want, abs=1)
    assert rep["parts"]["head"] == head * 4
    assert rep["parts"]["adapter"] == pytest.approx(
        adapter_weights / 8 + layers * 2 * 8 + adapter_bias * 4, abs=layers * 2
    )
    on_disk = rep["disk_bytes"]["adapter.safetensors"]
    assert on_disk == (tmp_path / "ad" / "adapter.safetensors").stat().st_size
    assert on_disk <= 1.03 * rep["bound_bytes"] + 2048, (on_disk, rep["bound_bytes"])
    # 1 bit per weight really is 32x below float32 for the matrices.
    assert on_disk < (adapter_weights + adapter_bias + head) * 4 / 8
