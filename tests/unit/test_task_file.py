"""Task files: a pruned, adapted model saved as everything that turns the original base into it
(kept heads/neurons as bits, compensation shifts, adapter, head), and loaded onto that base."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from adapter_files import without_digests
from safetensors.torch import load_file, save_file
from tiny_models import MODELS, logits, perturb

import slimtune
from slimtune.errors import LoadError, PlanError
from slimtune.methods.lora import LoRALinear
from slimtune.passes.base_pruning import pruning_of
from slimtune.passes.blocks import block_infos
from slimtune.passes.lightpeft import LightPEFT, LightPEFTConfig, PruningDecision, prune

CFG = LightPEFTConfig(r=4, alpha=8, dropout=0.0)


def _lora_model(kind: str, seed: int = 0) -> torch.nn.Module:
    model = slimtune.apply(MODELS[kind][0](seed=seed), CFG.lora())
    perturb(model, seed=seed + 5, scale=0.3)
    return model.eval()


def _decision(model: torch.nn.Module) -> PruningDecision:
    """Block 0 keeps every other KV group's heads (all heads of a plain block but the first),
    block 1 all but its last group; neurons: every other one plus the last; every rank kept."""
    heads = {}
    for i, b in enumerate(block_infos(model)):
        g = b.group_size
        groups = list(range(1, b.kv_heads, 2)) if i == 0 and b.kv_heads > 1 else None
        groups = groups or list(range(b.kv_heads - 1 if b.kv_heads > 1 else 1))
        heads[b.name] = [grp * g + j for grp in groups for j in range(g)]
        if b.kv_heads == b.num_heads:  # no grouping: drop single heads
            heads[b.name] = (
                list(range(1, b.num_heads, 2)) if i == 0 else list(range(b.num_heads - 1))
            )
    neurons = {b.name: list(range(0, b.ffn, 2)) + [b.ffn - 1] for b in block_infos(model)}
    ranks = {n: list(range(w.r)) for n, w in slimtune.core.wrappers(model)}
    return PruningDecision(heads, neurons, ranks)


@pytest.mark.parametrize("kind", ["bert", "vit", "llama", "opt", "gpt2"])
def test_task_file_rebuilds_the_pruned_model_from_the_original_base(kind, tmp_path: Path):
    build, inputs_of = MODELS[kind]
    model = _lora_model(kind)
    inputs = inputs_of()
    prune(model, _decision(model))
    want = logits(model, inputs)
    slimtune.save(model, tmp_path / "task")
    manifest = json.loads((tmp_path / "task" / "slimtune.json").read_text())
    sizes = manifest["pruned"]["sizes"]
    assert sizes == [[b.num_heads, b.ffn] for b in block_infos(build(seed=0))]
    keep = load_file(str(tmp_path / "task" / "adapter.safetensors"))["pruned/keep"]
    assert keep.dtype == torch.uint8 and keep.numel() == -(-sum(h + f for h, f in sizes) // 8)
    fresh = slimtune.load(build(seed=0).eval(), tmp_path / "task")
    assert torch.equal(logits(fresh, inputs), want)
    assert [(b.num_heads, b.ffn) for b in block_infos(fresh)] == [
        (b.num_heads, b.ffn) for b in block_infos(model)
    ]
    # saving the rebuilt model again writes the same task file
    slimtune.save(fresh, tmp_path / "again")
    for f in ("slimtune.json", "adapter.safetensors"):
        assert (tmp_path / "again" / f).read_bytes() == (tmp_path / "task" / f).read_bytes()


def test_compensation_shifts_travel_in_the_task_file(tmp_path: Path):
    build, inputs_of = MODELS["bert"]
    model = _lora_model("bert")
    inputs = inputs_of()
    lp = LightPEFT(model, dataclasses.replace(CFG, compensate=True))
    lp.recording = True
    logits(model, inputs)
    dec = _decision(model)
    dec.bias_shift = lp.bias_shift(dec)
    lp.remove()
    prune(model, dec)
    want = logits(model, inputs)
    slimtune.save(model, tmp_path / "task")
    shift = load_file(str(tmp_path / "task" / "adapter.safetensors"))["pruned/shift"]
    assert shift.dtype == torch.float32 and shift.shape[0] == len(dec.bias_shift)
    fresh = slimtune.load(build(seed=0).eval(), tmp_path / "task")
    assert torch.equal(logits(fresh, inputs), want)
    assert set(pruning_of(fresh).bias_shift) == set(dec.bias_shift)


def test_pruning_twice_maps_the_kept_indices_back_to_the_original(tmp_path: Path):
    build, inputs_of = MODELS["bert"]
    model = _lora_model("bert")
    inputs = inputs_of()
    prune(model, _decision(model))
    second = {b.name: list(range(1, b.num_heads)) for b in block_infos(model)}
    neurons = {b.name: list(range(1, b.ffn)) for b in block_infos(model)}
    ranks = {n: list(range(w.r)) for n, w in slimtune.core.wrappers(model)}
    prune(model, PruningDecision(second, neurons, ranks))
    rec = pruning_of(model)
    first = _decision(_lora_model("bert"))
    for b in rec.heads:
        assert rec.heads[b] == first.heads[b][1:]
        assert rec.neurons[b] == first.neurons[b][1:]
    want = logits(model, inputs)
    slimtune.save(model, tmp_path / "task")
    assert torch.equal(logits(slimtune.load(build(seed=0).eval(), tmp_path / "task"), inputs), want)


def test_composition_prune_then_another_plan_at_one_bit(tmp_path: Path):
    """The pruning record survives remove(): a pruned base takes a new plan (a 1-bit adapter and
    a 1-bit head), trains, and its task file rebuilds it from the original base."""
    build, inputs_of = MODELS["vit"]
    model = _lora_model("vit")
    inputs = inputs_of()
    prune(model, _decision(model))
    slimtune.remove(model)
    assert pruning_of(model) is not None
    slimtune.apply(model, [slimtune.Adapter.adaptformer(dim=4, scale=1.0, bits=1)], head_bits=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    logits(model, inputs).logsumexp(-1).sum().backward()
    opt.step()
    model.eval()
    want = logits(model, inputs)
    slimtune.save(model, tmp_path / "task")
    report = slimtune.storage_report(tmp_path / "task")
    assert report["parts"]["pruning"] > 0 and "adapter" in report["parts"]
    fresh = slimtune.load(build(seed=0).eval(), tmp_path / "task")
    assert torch.equal(logits(fresh, inputs), want)


def test_task_file_refuses_another_base_and_a_pruned_one(tmp_path: Path):
    build, _ = MODELS["bert"]
    model = _lora_model("bert")
    prune(model, _decision(model))
    slimtune.save(model, tmp_path / "task")
    other = build(seed=1)
    with pytest.raises(LoadError, match="weights differ"):
        slimtune.load(other, tmp_path / "task")
    assert [b.num_heads for b in block_infos(other)] == [b.num_heads for b in block_infos(build())]
    assert pruning_of(other) is None and getattr(other, "_slimtune", None) is None
    # the task's own pruned base (methods removed) takes the adapter again as it is
    pruned = slimtune.remove(slimtune.load(build(seed=0), tmp_path / "task"))
    slimtune.load(pruned, tmp_path / "task")
    # a base pruned another way is refused
    other_pruned = _lora_model("bert")
    prune(
        other_pruned,
        PruningDecision(
            *[{b.name: [0] for b in block_infos(other_pruned)}] * 2,
            {n: [0] for n, _ in slimtune.core.wrappers(other_pruned)},
        ),
    )
    slimtune.remove(other_pruned)
    with pytest.raises(LoadError, match="original, unpruned base"):
        slimtune.load(other_pruned, tmp_path / "task")
    # check_base=False skips the fingerprints, never the structure
    tiny = MODELS["vit"][0](seed=0)
    with pytest.raises(LoadError, match="this model is neither"):
        slimtune.load(tiny, tmp_path / "task", check_base=False)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ("pad", "bits set past"),
        ("empty", "keeps no head"),
        ("short", "must be"),
        ("sizes", "sizes"),
    ],
)
def test_malformed_pruning_sections_are_refused(edit: str, match: str, tmp_path: Path):
    build, _ = MODELS["tsvit"]  # 68 heads and neurons: the last byte has padding bits
    model = _lora_model("tsvit")
    prune(model, _decision(model))
    d = without_digests(slimtune.save(model, tmp_path / "task"))
    tensors = load_file(str(d / "adapter.safetensors"))
    manifest = json.loads((d / "slimtune.json").read_text())
    total = sum(h + f for h, f in manifest["pruned"]["sizes"])
    keep = tensors["pruned/keep"]
    if edit == "pad":
        assert total % 8, "the tiny model must leave padding bits"
        keep[-1] |= 0x80
    elif edit == "empty":
        h, f = manifest["pruned"]["sizes"][0]
        bits = ((keep.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
        bits[:h] = 0
        keep = (bits.reshape(-1, 8) * (1 << torch.arange(8))).sum(1).to(torch.uint8)
    elif edit == "short":
        keep = keep[:-1]
    else:
        manifest["pruned"]["sizes"] = manifest["pruned"]["sizes"][:-1]
    tensors["pruned/keep"] = keep
    save_file(tensors, str(d / "adapter.safetensors"), {"format": "slimtune-adapter"})
    (d / "slimtune.json").write_text(json.dumps(manifest))
    fresh = build(seed=0)
    with pytest.raises(LoadError, match=match):
        slimtune.load(fresh, d)
    assert pruning_of(fresh) is None


def test_a_second_compensation_of_the_same_linear_is_refused():
    model = _lora_model("bert")
    dec = _decision(model)
    o = block_infos(model)[0].o
    dec.bias_shift = {o: [0.01] * 16}
    prune(model, dec)
    again = PruningDecision(
        {b.name: list(range(b.num_heads)) for b in block_infos(model)},
        {b.name: list(range(b.ffn)) for b in block_infos(model)},
        {
            n: list(range(w.r))
            for n, w in slimtune.core.wrappers(model)
            if isinstance(w, LoRALinear)
        },
        bias_shift={o: [0.01] * 16},
    )
    sizes = [(b.num_heads, b.ffn) for b in block_infos(model)]
    with pytest.raises(PlanError, match="compensated by an earlier pruning"):
        prune(model, again)
    assert [(b.num_heads, b.ffn) for b in block_infos(model)] == sizes


def test_an_unsorted_decision_is_recorded_as_shrink_applies_it(tmp_path: Path):
    """``shrink`` keeps given indices sorted and once each: the record composes the same way."""
    build, inputs_of = MODELS["bert"]
    model = _lora_model("bert")
    blocks = block_infos(model)
    heads = {b.name: [3, 1, 3] for b in blocks}  # unsorted, repeated
    neurons = {b.name: list(range(b.ffn - 1, 0, -2)) for b in blocks}
    ranks = {n: list(range(w.r)) for n, w in slimtune.core.wrappers(model)}
    prune(model, PruningDecision(heads, neurons, ranks))
    again = {b.name: [0] for b in block_infos(model)}  # the first kept head: original head 1
    keep_all = {b.name: list(range(b.ffn)) for b in block_infos(model)}
    prune(model, PruningDecision(again, keep_all, ranks))
    rec = pruning_of(model)
    assert all(rec.heads[b.name] == [1] for b in blocks)
    assert all(rec.neurons[b.name] == sorted(neurons[b.name]) for b in blocks)
    want = logits(model, inputs_of())
    slimtune.save(model, tmp_path / "task")
    assert torch.equal(
        logits(slimtune.load(build(seed=0).eval(), tmp_path / "task"), inputs_of()), want
    )


def test_non_finite_compensation_shifts_are_refused_before_the_base_changes(tmp_path: Path):
    build, inputs_of = MODELS["bert"]
    model = _lora_model("bert")
    dec = _decision(model)
    o = block_infos(model)[0].o
    dec.bias_shift = {o: [0.01] * 16}
    prune(model, dec)
    d = without_digests(slimtune.save(model, tmp_path / "task"))
    tensors = load_file(str(d / "adapter.safetensors"))
    tensors["pruned/shift"][0, 3] = float("nan")
    save_file(tensors, str(d / "adapter.safetensors"), {"format": "slimtune-adapter"})
    fresh = build(seed=0)
    sizes = [(b.num_heads, b.ffn) for b in block_infos(fresh)]
    with pytest.raises(LoadError, match="finite floating-point"):
        slimtune.load(fresh, d)
    assert [(b.num_heads, b.ffn) for b in block_infos(fresh)] == sizes
