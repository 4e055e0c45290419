"""The Light-PEFT pass: masks, importance, decisions, physical pruning, compensation, pruned files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_models import MODELS as TINY
from tiny_models import bert_inputs, logits, tiny_bert

import slimtune
from slimtune.app.plots import plot_pruning
from slimtune.errors import LoadError, PlanError
from slimtune.io import load_pruned, save_pruned
from slimtune.methods.lora import LoRALinear
from slimtune.passes.blocks import block_infos, layer_params
from slimtune.passes.lightpeft import (
    LightPEFT,
    LightPEFTConfig,
    PruningDecision,
    decide,
    prune,
)
from slimtune.passes.shrink import shrink

CFG = LightPEFTConfig(r=4, alpha=8, dropout=0.0)


def _tiny_tsvit(seed: int = 0) -> torch.nn.Module:
    from slimtune.models.tsvit import TSViT, TSViTConfig

    torch.manual_seed(seed)
    return TSViT(TSViTConfig.tiny(num_heads=3, temporal_depth=1, spatial_depth=1)).eval()


def _tsvit_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 5, 10, 8, 8, generator=g),
        "doy": torch.randint(0, 366, (2, 5), generator=g),
    }


MODELS = {**TINY, "tsvit": (_tiny_tsvit, _tsvit_inputs)}


def _lora_model(kind: str, seed: int = 0) -> torch.nn.Module:
    build, _ = MODELS[kind]
    model = slimtune.apply(build(seed=seed), CFG.lora())
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for _, w in slimtune.core.wrappers(model):
            assert isinstance(w, LoRALinear)
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g) * 0.3)
    return model.eval()


def _decision(model: torch.nn.Module) -> PruningDecision:
    """Non-uniform: block 0 keeps heads 1, 3, ..., block 1 all but the last; ranks dropped."""
    blocks = block_infos(model)
    heads = {
        blocks[0].name: list(range(1, blocks[0].num_heads, 2)),
        blocks[1].name: list(range(blocks[1].num_heads - 1)),
    }
    neurons = {b.name: list(range(0, b.ffn, 2)) + [b.ffn - 1] for b in blocks}
    lora = [n for n, _ in slimtune.core.wrappers(model)]
    ranks = {n: [0, 2] for n in lora[::2]}
    before = {b.name: {"heads": b.num_heads, "ffn": b.ffn} for b in blocks}
    return PruningDecision(heads, neurons, ranks, before, {n: CFG.r for n in lora})


@pytest.mark.parametrize("kind", ["bert", "vit", "tsvit"])
def test_masks_at_one_leave_outputs_unchanged(kind):
    model = _lora_model(kind)
    inputs = MODELS[kind][1]()
    ref = logits(model, inputs)
    lp = LightPEFT(model, CFG)
    assert torch.equal(logits(model, inputs), ref)
    lp.remove()
    assert torch.equal(logits(model, inputs), ref)


@pytest.mark.parametrize("kind", ["bert", "vit", "tsvit"])
def test_physical_pruning_equals_zero_masks(kind):
    model = _lora_model(kind)
    inputs = MODELS[kind][1]()
    dec = _decision(model)
    lp = LightPEFT(model, CFG)
    with torch.no_grad():
        for b, mh, mn in zip(lp.blocks, lp.masks.heads, lp.masks.neurons, strict=True):
            mh.zero_()[dec.heads[b.name]] = 1.0
            mn.zero_()[dec.neurons[b.name]] = 1.0
        for name, w in lp.lora.items():  # dropped modules and ranks contribute nothing
            keep = dec.ranks.get(name, [])
            drop = [i for i in range(w.r) if i not in keep]
            w.lora_B[:, drop] = 0.0
    masked = logits(model, inputs)
    lp.remove()
    before = layer_params(model)
    plan = prune(model, dec)
    pruned = logits(model, inputs)
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    assert layer_params(model) < before
    assert sorted(e.target for e in plan.entries) == sorted(dec.ranks)
    assert all(e.settings["r"] == 2 and e.settings["alpha"] == 4.0 for e in plan.entries)
    assert [b.num_heads for b in block_infos(model)] == [len(v) for v in dec.heads.values()]
    # only LoRA + head train; a step runs
    owner = slimtune.core.method_parameters(model)
    trainable = {owner[n] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora", "head"}
    model.train()
    logits(model, inputs).sum().backward()


@pytest.mark.parametrize("kind", ["bert", "vit", "tsvit"])
def test_compensation_holds_the_removed_units_at_their_recorded_means(kind):
    import dataclasses

    model = _lora_model(kind)
    inputs = MODELS[kind][1]()
    lp = LightPEFT(model, dataclasses.replace(CFG, compensate=True))
    lp.recording = True
    logits(model, inputs)
    if kind == "bert":  # padding is left out of the means
        real = int(inputs["attention_mask"].sum())
        assert real < inputs["attention_mask"].numel()
        assert set(lp.input_count.values()) == {real}
    dec = _decision(model)
    dec.ranks = {n: list(range(w.r)) for n, w in lp.lora.items()}  # LoRA unchanged
    shift = lp.bias_shift(dec)
    assert set(shift) == {n for b in lp.blocks for n in (b.o, b.fc2)}
    means = {n: (lp.input_sum[n] / lp.input_count[n]).float() for n in lp.input_sum}
    lp.remove()
    plain_o = _mean_output(model, block_infos(model)[0].o, inputs)

    # the unpruned model with the removed heads' and neurons' inputs held at their means
    def hold(name: str, cols: list[int]):
        def hook(_m: torch.nn.Module, args: tuple) -> tuple:
            x = args[0].clone()
            x[..., cols] = means[name][cols]
            return (x, *args[1:])

        return model.get_submodule(name).register_forward_pre_hook(hook)

    handles = []
    for b in block_infos(model):
        kept = set(dec.heads[b.name])
        heads = [h for h in range(b.num_heads) if h not in kept]
        handles.append(hold(b.o, [h * b.head_dim + d for h in heads for d in range(b.head_dim)]))
        handles.append(hold(b.fc2, [j for j in range(b.ffn) if j not in set(dec.neurons[b.name])]))
    held = logits(model, inputs)
    for h in handles:
        h.remove()
    uncompensated = copy.deepcopy(model)
    prune(uncompensated, dataclasses.replace(dec, bias_shift={}))
    dec.bias_shift = shift
    prune(model, dec)
    torch.testing.assert_close(logits(model, inputs), held, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits(uncompensated, inputs), held, rtol=1e-4, atol=1e-5)
    # the first block's o sees the same inputs in all three models: on the recorded batch its
    # mean output over the tokens is the unpruned model's with compensation only
    o = block_infos(model)[0].o
    first = {
        name: _mean_output(m, o, inputs)
        for name, m in (("pruned", model), ("uncompensated", uncompensated))
    }
    first["plain"] = plain_o
    torch.testing.assert_close(first["pruned"], first["plain"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(first["uncompensated"], first["plain"], rtol=1e-4, atol=1e-5)


def _mean_output(model: torch.nn.Module, name: str, inputs: dict) -> torch.Tensor:
    """The mean over real tokens of module ``name``'s output on ``inputs``."""
    out: list[torch.Tensor] = []
    h = model.get_submodule(name).register_forward_hook(lambda _m, _a, y: out.append(y))
    logits(model, inputs)
    h.remove()
    y = out[0]
    if "attention_mask" in inputs:
        y = y[inputs["attention_mask"].bool()]
    return y.reshape(-1, y.shape[-1]).mean(0)


def test_compensation_refuses_bad_settings_and_layers_without_bias():
    import dataclasses

    with pytest.raises(PlanError, match="compensate"):
        LightPEFTConfig(compensate="yes")  # type: ignore[arg-type]
    model = _lora_model("bert")
    o = block_infos(model)[0].o
    slimtune.methods.base.unwrap(model.get_submodule(o)).bias = None
    with pytest.raises(PlanError, match="bias"):
        LightPEFT(model, dataclasses.replace(CFG, compensate=True))
    lp = LightPEFT(_lora_model("vit"), dataclasses.replace(CFG, compensate=True))
    with pytest.raises(PlanError, match="recorded"):
        lp.bias_shift(_decision(lp.model))
    lp.remove()
    # a bad shift is refused before anything changes
    blocks = block_infos(lp.model)
    dec = _decision(lp.model)
    width = slimtune.methods.base.unwrap(lp.model.get_submodule(blocks[0].o)).out_features
    dec.bias_shift = {blocks[0].o: [1.0] * width, blocks[1].o: [1.0]}
    before = {k: v.clone() for k, v in lp.model.state_dict().items()}
    with pytest.raises(PlanError, match="1 values"):
        prune(lp.model, dec)
    after = lp.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pruned_backbone_saves_and_reloads_standalone(tmp_path: Path):
    model = _lora_model("bert")
    inputs = bert_inputs()
    prune(model, _decision(model))
    slimtune.save(model, tmp_path / "adapter")
    save_pruned(model, tmp_path / "backbone")
    ref = logits(model, inputs)
    slimtune.remove(model)
    base_ref = logits(model, inputs)
    meta = json.loads((tmp_path / "backbone" / "pruned.json").read_text())
    assert [b["heads"] for b in meta["blocks"]] == [2, 3]
    fresh = tiny_bert(seed=7)  # other weights: all of them come from the file
    load_pruned(fresh, tmp_path / "backbone")
    assert torch.equal(logits(fresh, inputs), base_ref)
    slimtune.load(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh, inputs), ref)
    with pytest.raises(LoadError, match="no such|missing"):
        load_pruned(tiny_bert(), tmp_path / "nothing")


def test_load_pruned_releases_the_unpruned_weights_and_keeps_dtype_flags_and_ties(
    tmp_path: Path,
):
    model = tiny_bert()
    prune(model, _decision(slimtune.apply(model, CFG.lora())))
    slimtune.remove(model)
    save_pruned(model, tmp_path / "backbone")
    inputs = bert_inputs()
    want = logits(model, inputs)

    fresh = tiny_bert(seed=3)
    emb = fresh.get_parameter("bert.embeddings.word_embeddings.weight")
    fresh.get_parameter("bert.embeddings.position_embeddings.weight").requires_grad_(False)
    load_pruned(fresh, tmp_path / "backbone")
    got = fresh.get_parameter("bert.embeddings.word_embeddings.weight")
    # the built (unpruned) tensors are not kept alive: the model holds the loaded ones
    assert got.data_ptr() != emb.data_ptr() and torch.equal(
        got, model.get_parameter("bert.embeddings.word_embeddings.weight")
    )
    assert not fresh.get_parameter("bert.embeddings.position_embeddings.weight").requires_grad
    assert got.requires_grad
    assert torch.equal(logits(fresh, inputs), want)

    half = tiny_bert(seed=3).to(torch.bfloat16)  # built in bf16: loads in bf16
    load_pruned(half, tmp_path / "backbone")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}

    tied = tiny_bert(seed=3)  # two LayerNorms sharing one weight stay shared
    a, b = (tied.bert.encoder.layer[i].output.LayerNorm for i in (0, 1))
    b.weight = a.weight
    load_pruned(tied, tmp_path / "backbone")
    assert b.weight is a.weight


def _blocks(n_heads=(6, 6), ffn=(10, 10)):
    model = tiny_bert()
    infos = block_infos(model)
    return [
        type(b)(**{**b.__dict__, "num_heads": h, "ffn": f})
        for b, h, f in zip(infos, n_heads, ffn, strict=True)
    ]


def test_decide_prunes_by_the_stated_quantiles():
    blocks = _blocks()
    heads = [torch.arange(6.0), torch.arange(6.0).flip(0)]
    ffn = [torch.arange(10.0), torch.arange(10.0) + 100]
    modules = {f"m{i}": float(i) for i in range(8)}
    ranks = {f"m{i}": torch.arange(4.0) + 10 * i for i in range(8)}
    cfg = LightPEFTConfig()  # 1/3, 1/3, 75%, 50%
    d = decide(blocks, heads, ffn, modules, ranks, cfg)
    assert d.heads[blocks[0].name] == [2, 3, 4, 5]  # 2 of 6 per block
    assert d.heads[blocks[1].name] == [0, 1, 2, 3]
    assert d.neurons[blocks[0].name] == list(range(6, 10))  # 6 of 20, globally
    assert d.neurons[blocks[1].name] == list(range(10))
    # modules: the top 25% of 8 (m6, m7) survive; ranks: the lower half of their 8 is dropped,
    # which empties m6, so m6 is removed too.
    assert d.ranks == {"m7": [0, 1, 2, 3]}


def test_extreme_ratios_keep_the_model_valid():
    blocks = _blocks(n_heads=(4, 4), ffn=(5, 5))
    heads = [torch.rand(4), torch.rand(4)]
    ffn = [torch.zeros(5), torch.ones(5)]  # block 0 holds every low-mask neuron
    cfg = LightPEFTConfig(head_ratio=0.99, ffn_ratio=0.6, module_ratio=0.99, rank_ratio=0.99)
    d = decide(
        blocks, heads, ffn, {"a": 1.0, "b": 2.0}, {"a": torch.ones(2), "b": torch.ones(2)}, cfg
    )
    assert all(len(v) == 1 for v in d.heads.values())
    assert len(d.neurons[blocks[0].name]) == 1 and len(d.neurons[blocks[1].name]) == 4
    assert sum(len(v) for v in d.ranks.values()) == 1
    with pytest.raises(PlanError, match=r"in \[0, 1\)"):
        LightPEFTConfig(head_ratio=1.0)
    with pytest.raises(PlanError, match="early_steps"):
        LightPEFTConfig(early_steps=0)
    model = tiny_bert()
    with pytest.raises(PlanError, match="keep at least one"):
        shrink(model, heads={block_infos(model)[0].name: []})


def test_early_phase_records_importance_and_prunes(tmp_path: Path):
    torch.manual_seed(0)
    model = slimtune.apply(tiny_bert(), CFG.lora())
    lp = LightPEFT(model, LightPEFTConfig(r=4, alpha=8, l1=1e-2))
    params = [p for p in model.parameters() if p.requires_grad] + lp.mask_parameters()
    opt = torch.optim.AdamW(params, lr=1e-2)
    inputs = bert_inputs()
    labels = torch.tensor([0, 1, 2])
    model.train()
    for step in range(6):
        lp.recording = step >= 3
        loss = torch.nn.functional.cross_entropy(logits(model, inputs), labels) + lp.penalty()
        loss.backward()
        lp.after_backward()
        opt.step()
        opt.zero_grad()
    assert all(c == 3 for c in lp.module_count.values()) and lp.rank_count == 3
    assert any(v > 0 for v in lp.module_importance().values())
    assert any(float(m.detach().min()) < 1.0 for m in lp.masks.heads)
    d = lp.decide()
    lp.remove()
    prune(model, d)
    assert [b.num_heads for b in block_infos(model)] == [3, 3]
    assert sum(b.ffn for b in block_infos(model)) == 64 - 21
    assert len(slimtune.get_state(model).plan.entries) == 3  # 12 modules, 75% dropped
    plot_pruning(d, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_taylor_backbone_score_is_the_task_gradient_times_the_mask_and_ranks_the_pruning():
    model = _lora_model("bert")  # eval mode: no dropout, the same loss twice
    cfg = LightPEFTConfig(r=4, alpha=8, dropout=0.0, l1=0.05, backbone_score="taylor")
    lp = LightPEFT(model, cfg)
    with torch.no_grad():  # masks away from 1 and of both signs, so m and sign(m) matter
        for m in lp.mask_parameters():
            m.copy_(torch.linspace(-1.5, 2.0, m.numel()))
    inputs, labels = bert_inputs(), torch.tensor([0, 1, 2])
    masks = [*lp.masks.heads, *lp.masks.neurons]
    task = torch.nn.functional.cross_entropy(logits(model, inputs), labels)
    grads = torch.autograd.grad(task, masks)
    expected = [(m * g).abs().double() for m, g in zip(masks, grads, strict=True)]
    lp.recording = True
    for _ in range(2):  # the same step twice: the mean over steps equals one step's score
        model.zero_grad(set_to_none=True)
        for m in masks:
            m.grad = None
        loss = torch.nn.functional.cross_entropy(logits(model, inputs), labels) + lp.penalty()
        loss.backward()  # the L1 term's gradient (0.05 sign(m)) is not in the score
        lp.after_backward()
    heads, neurons = lp.backbone_importance()
    for got, want in zip([*heads, *neurons], expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-8)
    d = lp.decide()
    assert d.scores["backbone_score"] == "taylor"
    assert d.scores["head_masks"][0] == pytest.approx(lp.masks.heads[0].tolist())
    for b, score in zip(block_infos(model), heads, strict=True):
        drop = int(cfg.head_ratio * b.num_heads)
        lowest = sorted(range(b.num_heads), key=lambda i: (float(score[i]), i))[:drop]
        assert d.heads[b.name] == sorted(set(range(b.num_heads)) - set(lowest))
    flat = torch.cat(neurons)
    kept = torch.cat(
        [
            torch.tensor(d.neurons[b.name]) + sum(x.ffn for x in block_infos(model)[:i])
            for i, b in enumerate(block_infos(model))
        ]
    )
    dropped = sorted(set(range(len(flat))) - set(kept.tolist()))
    assert len(dropped) == int(len(flat) / 3)
    assert float(flat[dropped].max()) <= float(flat[kept].min())
    # the control: random scores, the same for the same torch seed
    torch.manual_seed(3)
    rand = LightPEFT(_lora_model("bert"), LightPEFTConfig(r=4, backbone_score="random"))
    first, again = rand.backbone_importance(), rand.backbone_importance()
    assert all(torch.equal(a, b) for a, b in zip(first[1], again[1], strict=True))
    torch.manual_seed(4)
    assert not torch.equal(rand.backbone_importance()[1][0], first[1][0])
    assert [len(h) for h in first[0]] == [b.num_heads for b in rand.blocks]
    # the paper's default ranks by the masks
    assert LightPEFTConfig().backbone_score == "mask"
    with pytest.raises(PlanError, match="backbone_score"):
        LightPEFTConfig(backbone_score="magnitude")


def test_padding_is_excluded_from_module_importance():
    model = _lora_model("bert")
    lp = LightPEFT(model, CFG)
    lp.recording = True
    inputs = bert_inputs()
    logits(model, inputs)
    a = lp.module_importance()
    lp.module_sum = dict.fromkeys(lp.module_sum, 0.0)
    lp.module_count = dict.fromkeys(lp.module_count, 0)
    ids = inputs["input_ids"].clone()
    ids[0, 6:] = (ids[0, 6:] + 1) % 50  # change only padded positions
    logits(model, {"input_ids": ids, "attention_mask": inputs["attention_mask"]})
    b = lp.module_importance()
    name = "bert.encoder.layer.0.attention.self.query"
    assert a[name] > 0
    assert a[name] == pytest.approx(b[name], rel=1e-5)
