"""Light-PEFT: masks, importance, quantile pruning, physical shrink, save/reload, pipeline."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import MODELS as TINY
from tiny_models import bert_inputs, logits, tiny_bert

import slimtune
from slimtune.app.config import RunConfig
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


def _tiny_run(epochs: int, **pruning: object) -> RunConfig:
    """A tiny Light-PEFT run config (tiny-vit on 16 images, an early phase of 2 steps)."""
    return RunConfig(
        name="lp",
        model="tiny-vit",
        task="shapes-count",
        data={"image_size": 32, "n_train": 16, "n_val": 8, "n_test": 8},
        train={"epochs": epochs, "batch_size": 8, "eval_batch_size": 16, "lr": 0.01, "seed": 2},
        pruning={"method": "light-peft", "early_steps": 2, "r": 4, **pruning},
    )


def test_pipeline_from_a_run_config_and_resume(tmp_path: Path):
    from slimtune.app.loop import train

    cfg = _tiny_run(epochs=2)
    with pytest.warns(UserWarning, match="early phase is 2 steps"):
        full = train(cfg, tmp_path / "a", progress=False)
    p = full["pruning"]
    assert "under 50 steps" in p["early_phase_warning"]
    assert full["method"] == "light-peft"
    assert p["layer_params_after"] < p["layer_params_before"]
    assert 1 <= p["lora_modules_after"] <= 3  # 12 modules, 75% dropped (ranks may empty more)
    for f in ("pruning.png", "report.md", "pruned/backbone/pruned.json", "pruned/decision.json"):
        assert (tmp_path / "a" / f).is_file()
    report = (tmp_path / "a" / "report.md").read_text()
    assert "Light-PEFT pruning" in report and "**Warning**: the Light-PEFT early phase" in report
    # interrupted after one epoch, resumed from the saved pruned model: same results
    with pytest.warns(UserWarning, match="early phase is 2 steps"):
        stopped = train(cfg, tmp_path / "b", stop_after_epoch=1, progress=False)
    assert stopped == {"stopped_after_epoch": 1}
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed["pruning"]["blocks"] == p["blocks"]
    assert resumed["test"] == full["test"]


def test_pipeline_with_compensation_saves_the_shifted_biases(tmp_path: Path):
    from safetensors.torch import load_file

    from slimtune.app.loop import train

    runs = {}
    for name, comp in (("plain", False), ("comp", True)):
        with pytest.warns(UserWarning, match="early phase"):
            runs[name] = train(_tiny_run(1, compensate=comp), tmp_path / name, progress=False)
    assert runs["comp"]["pruning"]["config"]["compensate"] is True
    decision = json.loads((tmp_path / "comp" / "pruned" / "decision.json").read_text())
    plain = json.loads((tmp_path / "plain" / "pruned" / "decision.json").read_text())
    shift = decision["decision"]["bias_shift"]
    assert plain["decision"]["bias_shift"] == {}
    # the same early phase (compensation draws no random numbers): the same units removed
    for key in ("heads", "neurons", "ranks"):
        assert decision["decision"][key] == plain["decision"][key]
    assert len(shift) == 4  # o and fc2 of both blocks
    a = load_file(tmp_path / "plain" / "pruned" / "backbone" / "model.safetensors")
    b = load_file(tmp_path / "comp" / "pruned" / "backbone" / "model.safetensors")
    assert a.keys() == b.keys()
    shifted = set()
    for key in a:
        module = key.removesuffix(".bias")
        if key.endswith(".bias") and module in shift:
            shifted.add(module)
            delta = torch.tensor(shift[module], dtype=a[key].dtype)
            torch.testing.assert_close(b[key], a[key] + delta)
            assert delta.abs().max() > 0
        else:
            assert torch.equal(a[key], b[key]), key
    assert shifted == set(shift)


def test_rescoring_prunes_the_backbone_first_and_takes_the_peft_scores_from_the_pruned_model(
    tmp_path: Path,
):
    from slimtune.app.loop import train

    with pytest.warns(UserWarning, match="early phase"):
        plain = train(_tiny_run(1, module_ratio=0.5), tmp_path / "a", progress=False)
    with pytest.warns(UserWarning, match="early phase"):
        again = train(
            _tiny_run(1, module_ratio=0.5, rescore_steps=2), tmp_path / "b", progress=False
        )
    p, q = plain["pruning"], again["pruning"]
    assert p["rescore_steps"] == 0 and q["rescore_steps"] == 2 and q["rescore_s"] > 0
    # the same early phase (same seed), so the same heads and neurons go
    assert q["blocks"] == p["blocks"] and q["layer_params_after"] == p["layer_params_after"]
    info = json.loads((tmp_path / "b" / "pruned" / "decision.json").read_text())
    d = PruningDecision.from_dict(info["decision"])
    early = d.scores["module_importance_early"]
    assert (
        early
        == json.loads((tmp_path / "a" / "pruned" / "decision.json").read_text())["decision"][
            "scores"
        ]["module_importance"]
    )
    rescored = d.scores["module_importance"]
    assert rescored.keys() == early.keys() and rescored != early
    # the kept modules are the top half by the re-scored importance (ranks may empty more)
    top = sorted(rescored, key=lambda n: -rescored[n])[: len(rescored) // 2]
    assert set(d.ranks) <= set(top) and q["lora_modules_after"] == len(d.ranks)
    saved = json.loads((tmp_path / "b" / "pruned" / "adapter" / "slimtune.json").read_text())
    assert {e["target"]: e["settings"]["r"] for e in saved["plan"]["entries"]} == {
        n: len(r) for n, r in d.ranks.items()
    }
    report = (tmp_path / "b" / "report.md").read_text()
    assert "re-scored on the pruned backbone: 2 steps" in report
    assert "re-scored" not in (tmp_path / "a" / "report.md").read_text()
    with pytest.raises(PlanError, match="rescore_steps"):
        LightPEFTConfig(rescore_steps=-1)
    assert LightPEFTConfig(rescore_steps=0.0).rescoring_steps(100) == 0
    assert LightPEFTConfig(rescore_steps=0.1).rescoring_steps(100) == 10


def test_short_early_phase_warning_threshold():
    from slimtune.app.prune import SHORT_EARLY_PHASE, short_early_phase
    from slimtune.passes.lightpeft import LightPEFTConfig

    assert SHORT_EARLY_PHASE == 50
    assert short_early_phase(50, 500) is None and short_early_phase(131, 657) is None
    assert "38 steps (of 375)" in (short_early_phase(38, 375) or "")
    # the spec's default fraction on a short run: 0.1 of 375 steps -> 38 (warned), of 657 -> 66
    default = LightPEFTConfig()
    assert short_early_phase(default.steps(375), 375) is not None
    assert short_early_phase(default.steps(657), 657) is None


def test_run_config_checks_the_pruning_section():
    from slimtune.app.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="head_ratio"):
        RunConfig(pruning={"method": "light-peft", "head_ratio": 1.0})
    with pytest.raises(ConfigError, match="pruning.early_step"):
        RunConfig(pruning={"early_step": 3})
    with pytest.raises(ConfigError, match="light-peft"):
        RunConfig(pruning={"method": "magnitude"})
    # the early phase's LoRA is pruning's: methods left out, or the same LoRA, or a clear error
    six = ["q", "k", "v", "o", "fc1", "fc2"]
    same = [{"name": "lora", "r": 4, "alpha": 16, "dropout": 0.05, "targets": six}]
    assert RunConfig(methods=same, pruning={"r": 4}).methods == same
    assert RunConfig(pruning={"r": 4}).methods == [{"name": "lora"}]
    with pytest.raises(ConfigError, match="pruning.r"):
        RunConfig(methods=[{"name": "lora", "r": 8, "targets": ["q", "v"]}], pruning={"r": 4})
    with pytest.raises(ConfigError, match="pruning.r"):
        RunConfig(methods=[{"name": "bitfit"}], pruning={})


def test_bench_speed_summary_and_timing_threads_option(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from benchmarks.lightpeft import BATCH, _speed_summary
    from slimtune.app.cli import app

    train = {"lora-qv": [3.0, 2.0, 4.0], "lora-all": [4.0], "light-peft": [1.0, 2.0, 1.5]}
    infer = {"lora-qv": [1.0], "lora-all": [1.0], "light-peft": [0.5]}
    nodrop = {"lora-qv": [2.0], "light-peft": [1.0]}
    s = _speed_summary(
        {"train": train, "infer": infer, "infer_unmerged": infer, "train_no_dropout": nodrop}
    )
    assert s["train_speedup_without_dropout"] == 2.0
    assert s["train_samples_per_s"]["lora-qv"] == round(BATCH / 3.0, 2)  # the median step
    assert s["train_speedup"] == 2.0 and s["infer_speedup"] == 2.0
    # per-round ratios 3, 1, 2.67: median 2.67 (not the ratio of medians), open from 1 to 3
    ci = s["speedup_ci"]["train"]
    assert ci == {"median": 2.667, "low": 1.0, "high": 3.0, "coverage": 0.75, "rounds": 3}
    assert s["speedup_ci"]["infer"]["median"] == 2.0
    for bad in ("two", "0", "2,-1"):
        res = CliRunner().invoke(app, ["bench", "lightpeft", "--quick", "--timing-threads", bad])
        assert res.exit_code == 2, res.output
    bad_options = (
        ("--head-ratio", "1.0"),
        ("--ffn-ratio", "-0.1"),
        ("--rank-ratio", "x"),
        ("--early-steps", "1.5"),
        ("--early-steps", "many"),
        ("--rescore-steps", "-1"),
        ("--rescore-steps", "many"),
        ("--backbone-score", "magnitude"),
        ("--timing-steps", "0"),
    )
    for opt, bad in bad_options:
        res = CliRunner().invoke(app, ["bench", "lightpeft", "--quick", opt, bad])
        assert res.exit_code != 0 and opt[2:].split("-")[0] in res.output, res.output
    # the pruning options reach the bench
    import benchmarks.lightpeft as bench

    seen: dict[str, object] = {}
    monkeypatch.setattr(bench, "run", lambda **kw: seen.update(kw))
    given = ["--head-ratio", "0.5", "--early-steps", "60", "--rescore-steps", "0.1"]
    given += ["--backbone-score", "taylor", "--compensate"]
    res = CliRunner().invoke(app, ["bench", "lightpeft", *given])
    assert res.exit_code == 0, res.output
    assert seen["pruning"] == {
        "head_ratio": 0.5,
        "early_steps": 60,
        "rescore_steps": 0.1,
        "backbone_score": "taylor",
        "compensate": True,
    }
    # the argparse front end (python -m benchmarks.lightpeft, the seeds script) agrees
    import argparse

    from benchmarks.lightpeft import add_pruning_options, pruning_overrides

    ap = argparse.ArgumentParser()
    add_pruning_options(ap)
    assert pruning_overrides(ap.parse_args(given)) == seen["pruning"]
    assert pruning_overrides(ap.parse_args([])) == {}
    monkeypatch.undo()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "old.txt").write_text("x")
    for where in (tmp_path / "runs", tmp_path / "runs" / "old.txt"):  # used, or a file
        res = CliRunner().invoke(app, ["bench", "lightpeft", "--quick", "--keep", str(where)])
        assert res.exit_code == 2 and "--keep" in res.output, res.output


def test_bench_pruning_ratios_reach_only_the_light_peft_run():
    from benchmarks.lightpeft import parse_early_steps, run_configs

    ratios = {"head_ratio": 0.4, "ffn_ratio": 0.45}
    configs = run_configs("tiny-vit", "digits", True, {"method": "light-peft", **ratios})
    assert configs["light-peft"].pruning is not None
    assert {k: getattr(configs["light-peft"].pruning, k) for k in ratios} == ratios
    assert configs["lora-qv"].pruning is None and configs["lora-all"].pruning is None
    assert all(c.fast_dropout for c in configs.values())
    assert parse_early_steps("50") == 50 and parse_early_steps("0.35") == 0.35
    # the options the bench and benchmarks/lightpeft_seeds.py share
    import argparse

    from benchmarks.lightpeft import add_pruning_options, pruning_overrides

    ap = argparse.ArgumentParser()
    add_pruning_options(ap)
    assert pruning_overrides(ap.parse_args([])) == {}
    given = ap.parse_args(["--ffn-ratio", "0.45", "--module-ratio", "0", "--early-steps", "50"])
    assert pruning_overrides(given) == {"ffn_ratio": 0.45, "module_ratio": 0.0, "early_steps": 50}
    scored = ap.parse_args(["--backbone-score", "taylor", "--rescore-steps", "0.1"])
    assert pruning_overrides(scored) == {"backbone_score": "taylor", "rescore_steps": 0.1}
    with pytest.raises(SystemExit):
        ap.parse_args(["--backbone-score", "magnitude"])
    plain = run_configs("tiny-vit", "digits", True, {"method": "light-peft"}, fast_dropout=False)
    assert not any(c.fast_dropout for c in plain.values())


def _benchmark_script(name: str) -> Any:
    """The module ``benchmarks/<name>.py``, loaded from its file."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeds_script_takes_baseline_runs_from_other_files(tmp_path: Path):
    seeds = _benchmark_script("lightpeft_seeds")
    setup = {"model": "tiny-vit", "task": "digits", "quick": True, "pruning": {}}
    runs = [
        {"method": "lora-qv", "seed": 0, "test": 0.5, "val": 0.5},
        {"method": "lora-qv", "seed": 1, "test": 0.7, "val": 0.6, "source": "bench.json"},
        {"method": "lora-qv", "seed": 2, "test": 0.9, "val": 0.9},
        {"method": "light-peft", "seed": 0, "test": 0.1, "val": 0.1},
    ]
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"setup": setup, "runs": runs}))
    out = tmp_path / "out.json"
    common = ["--model", "tiny-vit", "--task", "digits", "--quick", "--methods", "lora-qv"]
    # every requested run is in the baseline file: nothing is trained
    assert (
        seeds.main([*common, "--seeds", "0", "1", "--baseline", str(base), "--out", str(out)]) == 0
    )
    doc = json.loads(out.read_text())
    assert [(r["seed"], r["test"], r["source"]) for r in doc["runs"]] == [
        (0, 0.5, "base.json"),
        (1, 0.7, "bench.json"),
    ]
    assert doc["summary"]["mean_test"] == {"lora-qv": 0.6}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"setup": {**setup, "model": "tiny-bert"}, "runs": runs}))
    with pytest.raises(SystemExit):
        seeds.main([*common, "--seeds", "0", "--baseline", str(other), "--out", str(out)])


def test_cpu_steal_counters():
    from benchmarks.common import cpu_counters, steal_fraction

    assert steal_fraction(None) is None
    now = cpu_counters()
    if now is None:  # no /proc/stat here
        return
    steal, total = now
    assert 0 <= steal <= total
    sum(i * i for i in range(200_000))  # some CPU time passes
    f = steal_fraction(now)
    assert f is None or 0.0 <= f <= 1.0


def test_bench_timing_runs_every_step_kind_on_tiny_models():
    from benchmarks.lightpeft import BATCH, SIX, _speed_summary, _time

    models = {
        m: slimtune.apply(tiny_bert(2), slimtune.LoRA(r=2, targets=t, dropout=0.1))
        for m, t in (("lora-qv", ("q", "v")), ("lora-all", SIX), ("light-peft", ("o",)))
    }
    before = {
        m: [p.clone() for p in mod.parameters() if p.requires_grad] for m, mod in models.items()
    }
    ids = torch.randint(0, 50, (BATCH, 16))  # the tiny model: 50 tokens, 32 positions
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    steal: dict[str, float | None] = {}
    times = _time(models, dict.fromkeys(models, batch), 0, 2, "test", steal)
    assert set(steal) == {"train, test", "inference, test"}
    for f in steal.values():  # a fraction of CPU time where /proc/stat exists
        assert f is None or 0.0 <= f <= 1.0
    assert set(times) == {"train", "infer", "infer_unmerged", "train_no_dropout"}
    assert set(times["train_no_dropout"]) == {"lora-qv", "light-peft"}
    assert all(len(v) == 2 and min(v) > 0 for d in times.values() for v in d.values())
    for m, mod in models.items():  # training steps really updated the trainable tensors
        after = [p for p in mod.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(before[m], after, strict=True))
    assert _speed_summary(times)["train_speedup"] > 0


def test_bench_keeps_the_trained_runs_only_when_asked(tmp_path: Path, monkeypatch):
    import benchmarks.lightpeft as lp

    seen: list[tuple[Path, tuple[int, int]]] = []

    def fake_compare(model, task, quick, work, settings, timing, *rest):
        (work / "light-peft").mkdir(parents=True)
        (work / "light-peft" / "config.yaml").write_text("name: light-peft\n")
        seen.append((work, timing))
        return {}

    monkeypatch.setattr(lp, "compare", fake_compare)
    res = lp.run(quick=True, out=str(tmp_path / "a.json"), timing_steps=12)
    assert seen[0][1] == (1, 12) and res["runs_kept_in"] is None
    assert not seen[0][0].exists()  # the temporary directory is gone
    keep = tmp_path / "kept"
    res = lp.run(quick=True, out=str(tmp_path / "b.json"), keep=keep)
    assert seen[1] == (keep / "minilm", (1, 5)) and res["runs_kept_in"] == str(keep)
    assert (keep / "minilm" / "light-peft" / "config.yaml").is_file()
    assert json.loads((tmp_path / "b.json").read_text())["runs_kept_in"] == str(keep)


def test_bench_full_mode_saves_the_first_model_before_the_second(tmp_path: Path, monkeypatch):
    import benchmarks.lightpeft as lp

    out = tmp_path / "full.json"

    def fake_compare(model, task, quick, work, settings, timing, *rest):
        if model == "dinov2-s":  # the first model's figures are on disk by now
            saved = json.loads(out.read_text())
            assert saved["acc"] == {"lora-qv": 0.5} and "partial" in saved
            raise RuntimeError("second model failed")
        assert timing == (3, 20) and settings["early_steps"] == 0.2
        return {"acc": {"lora-qv": 0.5}}

    monkeypatch.setattr(lp, "compare", fake_compare)
    with pytest.raises(RuntimeError, match="second model failed"):
        lp.run(quick=False, out=str(out))
    assert json.loads(out.read_text())["acc"] == {"lora-qv": 0.5}


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize(
    ("model", "task"), [("minilm", "amazon-reviews"), ("dinov2-s", "fashion-mnist")]
)
def test_bench_data_sizes_fit_the_task(quick, model, task):
    """Every split size the bench asks for exists (the full mode once asked for 4500 of 4000)."""
    from benchmarks.lightpeft import run_configs
    from slimtune.app.build import load_data
    from slimtune.app.data.base import DataSourceError

    cfg = run_configs(model, task, quick, {"method": "light-peft"})["lora-qv"]
    d = cfg.data
    try:  # as the run loads it (no model info: text tasks take MiniLM's tokenizer)
        data = load_data(cfg, {})
    except DataSourceError as exc:  # `make setup` was not run on this machine
        pytest.skip(str(exc))
    assert (len(data.train), len(data.val)) == (d.n_train, d.n_val)
    assert len(data.test) == d.n_test


def test_timing_script_times_kept_runs_against_the_base_run(tmp_path: Path):
    import dataclasses

    from slimtune.app.loop import train

    timing = _benchmark_script("lightpeft_timing")
    pruned_cfg = _tiny_run(epochs=1)
    base_cfg = dataclasses.replace(
        pruned_cfg, name="base", pruning=None, methods=[{"name": "lora", "r": 4}]
    )
    with pytest.warns(UserWarning, match="early phase"):
        train(pruned_cfg, tmp_path / "lp", progress=False)
    train(base_cfg, tmp_path / "qv", progress=False)
    out = tmp_path / "t.json"
    args = ["--base", str(tmp_path / "qv"), "--pruned", f"lp={tmp_path / 'lp'}"]
    assert timing.main([*args, "--rounds", "3", "--warmup", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    kinds = ("train", "train_no_dropout", "infer", "infer_unmerged")
    for kind in kinds:
        sps = doc["samples_per_s"][kind]
        assert set(sps) == {"base", "lp"} and all(v > 0 for v in sps.values())
        assert len(doc["step_times_s"][kind]["lp"]) == 3
        assert doc["speedup"]["lp"][kind] == pytest.approx(sps["lp"] / sps["base"], abs=2e-3)
        assert doc["paired"]["lp"][kind]["rounds"] == 3
    # the pruned backbone was rebuilt from its saved files: smaller than the base run's
    assert doc["sizes"]["lp"]["base"] < doc["sizes"]["base"]["base"]
    for bad in (
        ["--pruned", "lp"],
        ["--pruned", f"base={tmp_path / 'lp'}"],
        ["--pruned", "x=/nope"],
    ):
        with pytest.raises(SystemExit):
            timing.main(["--base", str(tmp_path / "qv"), *bad])
