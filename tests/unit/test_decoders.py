"""Decoder families (Llama-style, OPT, GPT-2) beyond the invariant matrix: detection, roles,
LoRA on Conv1D and fused qkv, peft round trips with generation, prompt tuning at the input,
Light-PEFT with grouped-query attention and gated FFNs, SPT on token labels, heads."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import DECODERS, MODELS, decoder_inputs, logits, perturb, tiny_gpt2, tiny_llama

import slimtune
from slimtune import LoRA, Prompt
from slimtune.errors import PlanError
from slimtune.families import FAMILIES, Family, detect_family, register_family
from slimtune.io import load_pruned, save_pruned
from slimtune.linear import dims, weight_oi
from slimtune.losses import task_loss
from slimtune.methods.lora import LoRALinear
from slimtune.passes.blocks import block_infos, layer_params
from slimtune.passes.lightpeft import LightPEFT, LightPEFTConfig, PruningDecision, decide, prune
from slimtune.passes.shrink import shrink
from slimtune.passes.spt import sensitivity
from slimtune.passes.spt.sensitivity import candidates

BUILD = {"llama": tiny_llama, "opt": MODELS["opt"][0], "gpt2": tiny_gpt2}


@pytest.mark.parametrize("kind", DECODERS)
def test_decoders_are_recognised_by_structure_with_their_seven_or_six_linears(kind):
    model = BUILD[kind]()
    fam = detect_family(model)
    assert fam.name == kind and fam.block_types == ()  # no class list involved
    blocks = block_infos(model)
    assert len(blocks) == 2
    b = blocks[0]
    if kind == "llama":
        assert (b.num_heads, b.kv_heads, b.group_size, b.head_dim) == (4, 2, 2, 8)
        assert b.gate is not None and b.gate.endswith("mlp.gate_proj")
        # fc1 is the gated FFN's two input linears; seven distinct linears per block
        assert [n.rsplit(".", 1)[1] for n in fam.role_names(model, "fc1")[:2]] == [
            "gate_proj",
            "up_proj",
        ]
        roles = ["q", "k", "v", "o", "gate", "up", "down"]
        assert len({n for r in roles for n in fam.role_names(model, r)}) == 14
    else:
        assert b.kv_heads == b.num_heads == 4 and b.gate is None
    assert b.fused_qkv == (kind == "gpt2")
    # causal LMs of the same layout are recognised too
    assert detect_family(BUILD[kind](causal=True)).name == kind


def test_a_new_family_registers_by_structure_and_overrides_built_ins_when_first():
    model = tiny_llama()
    custom = Family(
        name="my-llama",
        block_types=(),
        structure=("self_attn.q_proj", "mlp.down_proj"),
        blocks=r"layers\.\d+",
        roles={"q": r"layers\.\d+\.self_attn\.q_proj", "head": "score"},
        block=None,
    )
    try:
        register_family(custom)
        assert detect_family(model).name == "llama"  # built-ins come first by default
        register_family(custom, first=True)
        assert detect_family(model).name == "my-llama"
        slimtune.apply(model, LoRA(r=2, targets=["q"]))
        assert len(list(slimtune.core.wrappers(model))) == 2
    finally:
        FAMILIES.pop("my-llama", None)
    assert detect_family(tiny_llama()).name == "llama"


def test_lora_on_gpt2_conv1d_merges_exactly_and_matches_the_linear_formula():
    model = tiny_gpt2()
    x = decoder_inputs()
    slimtune.apply(model, LoRA(r=3, alpha=6, targets=["o", "fc1", "fc2"]))
    perturb(model)
    ref = logits(model, x)
    w = model.get_submodule("transformer.h.0.attn.c_proj")
    assert isinstance(w, LoRALinear)
    base = w.base_layer
    h = torch.randn(2, 5, 16)
    manual = h @ weight_oi(base).t() + base.bias + (h @ w.lora_A.t()) @ w.lora_B.t() * 2.0
    torch.testing.assert_close(w(h), manual, rtol=1e-5, atol=1e-6)
    before = base.weight.detach().clone()
    slimtune.merge(model)
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)
    # Conv1D stores [in, out]: the merged weight moved by the transposed update
    torch.testing.assert_close(base.weight - before, (w.lora_B @ w.lora_A).t() * 2.0)
    slimtune.unmerge(model)
    torch.testing.assert_close(base.weight, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [["q"], ["v"], ["q", "v"], ["q", "k", "v"]])
def test_lora_on_parts_of_a_fused_qkv_updates_only_those_rows(targets):
    model = tiny_gpt2()
    slimtune.apply(model, LoRA(r=2, targets=targets))
    perturb(model)
    w = model.get_submodule("transformer.h.1.attn.c_attn")
    assert isinstance(w, LoRALinear)
    parts = {"q": 0, "k": 1, "v": 2}
    chosen = sorted(parts[t] for t in targets)
    d = 16
    assert w.lora_B.shape == (d * len(chosen), 2)
    delta = w.delta_weight()
    for p in range(3):
        block = delta[p * d : (p + 1) * d]
        assert (block.abs().sum() > 0) == (p in chosen), (targets, p)
    h = torch.randn(2, 4, d)
    expect = w.base_layer(h) + h @ delta.t()
    torch.testing.assert_close(w(h), expect, rtol=1e-5, atol=1e-6)
    if len(chosen) < 3:
        entry = next(
            e for e in slimtune.get_state(model).plan.entries if e.target.endswith("1.attn.c_attn")
        )
        assert entry.settings["parts"] == chosen and entry.settings["n_parts"] == 3


@pytest.mark.parametrize("kind", DECODERS)
def test_peft_export_of_a_causal_lm_gives_equal_logits_and_the_same_greedy_generation(
    kind, tmp_path
):
    from peft import PeftModel

    targets = ["q", "v"] if kind == "gpt2" else list(slimtune.families.LINEAR_ROLES)
    model = BUILD[kind](causal=True)
    slimtune.apply(model, LoRA(r=4, alpha=8, targets=targets), head=[])
    perturb(model, scale=0.3)
    model.eval()
    x = decoder_inputs()
    ref = logits(model, x)
    slimtune.export_peft(model, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(BUILD[kind](causal=True), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, x), ref, rtol=1e-5, atol=1e-5)
    prompt = torch.tensor([[5, 9, 13, 7]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    ours = model.generate(input_ids=prompt, **kw)
    assert torch.equal(ours, theirs.generate(input_ids=prompt, **kw))
    assert not torch.equal(ours, BUILD[kind](causal=True).generate(input_ids=prompt, **kw))


@pytest.mark.parametrize("kind", DECODERS)
def test_input_prompts_keep_the_output_length_train_and_generate_with_a_cache(kind):
    model = BUILD[kind](causal=True)
    x = decoder_inputs()
    base = logits(model, x)
    slimtune.apply(model, Prompt(length=3), head=[])
    out = logits(model, x)
    assert out.shape == base.shape
    assert not torch.allclose(out, base, atol=1e-4)  # the prompts are attended to
    model.train()
    task_loss(model(**x), x["input_ids"]).backward()
    (name, w), *_ = slimtune.core.wrappers(model)
    assert w.prompts.grad is not None and w.prompts.grad.abs().sum() > 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == w.prompts.numel()
    model.eval()
    prompt = torch.tensor([[5, 9, 13, 7]])
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    out = model.generate(
        input_ids=prompt, use_cache=True, output_scores=True, return_dict_in_generate=True, **kw
    )
    # every cached decoding step scores as a full forward of the prefix without a cache does
    with torch.no_grad():
        for step, scores in enumerate(out.scores):
            prefix = out.sequences[:, : prompt.shape[1] + step]
            full = logits(model, {"input_ids": prefix})[:, -1]
            torch.testing.assert_close(scores, full, rtol=1e-5, atol=1e-5)


def test_deep_prompts_on_a_decoder_are_refused_clearly():
    with pytest.raises(PlanError, match="deep prompts"):
        slimtune.apply(tiny_llama(), Prompt(length=2, deep=True))


def test_heads_seq_cls_score_trains_lm_head_stays_frozen_generic_warns():
    seq = slimtune.apply(tiny_llama(), LoRA(r=2))
    assert slimtune.get_state(seq).plan.head == ["score"]
    assert seq.score.weight.requires_grad
    lm = tiny_llama(causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimtune.apply(lm, LoRA(r=2))  # a causal LM: no warning, lm_head known
    assert slimtune.get_state(lm).plan.head == []
    assert not lm.lm_head.weight.requires_grad
    generic = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"no task head found.*candidates: 2"):
        slimtune.apply(generic, LoRA(r=2, targets=["0"]))


# ----------------------------------------------------------------------------- Light-PEFT


def _lora_decoder(kind: str, **kw) -> torch.nn.Module:
    model = slimtune.apply(BUILD[kind](**kw), LightPEFTConfig(r=2, alpha=4, dropout=0.0).lora())
    perturb(model, scale=0.3)
    return model.eval()


def _masked_vs_pruned(kind, heads, neurons, ranks):
    """Logits with the heads/neurons/ranks outside a decision masked to zero, then after
    pruning to that decision physically; the model is returned pruned."""
    model = _lora_decoder(kind)
    x = decoder_inputs()
    blocks = block_infos(model)
    dec = PruningDecision(
        heads={b.name: h for b, h in zip(blocks, heads, strict=True)},
        neurons={b.name: neurons(b.ffn) for b in blocks},
        ranks={n: ranks for n, _ in slimtune.core.wrappers(model)},
    )
    lp = LightPEFT(model, LightPEFTConfig(r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        for b, mh, mn in zip(lp.blocks, lp.masks.heads, lp.masks.neurons, strict=True):
            mh.zero_()[dec.heads[b.name]] = 1.0
            mn.zero_()[dec.neurons[b.name]] = 1.0
        for name, w in lp.lora.items():  # dropped ranks contribute nothing
            w.lora_B[:, [i for i in range(w.r) if i not in dec.ranks[name]]] = 0.0
    masked = logits(model, x)
    lp.remove()
    prune(model, dec)
    return model, masked, logits(model, x)


@pytest.mark.parametrize(
    ("kind", "heads", "neurons", "ranks"),
    [
        # block 0 drops kv group 0 (query heads 0, 1)
        ("llama", [[2, 3], [0, 1, 2, 3]], lambda n: list(range(0, n, 3)), [1]),
        ("llama", [[0, 2], [1, 3]], lambda n: list(range(0, n, 3)), [1]),  # 1 head per group
        ("llama", [[2, 3], [0, 2]], lambda n: list(range(1, n, 2)), [0, 1]),
        ("opt", [[1, 3], [0, 1, 2]], lambda n: list(range(0, n, 3)), [1]),
        ("gpt2", [[0, 2, 3], [1]], lambda n: list(range(0, n, 3)), [1]),  # fused c_attn, Conv1D
        ("gpt2", [[0, 2, 3], [1]], lambda n: list(range(1, n, 2)), [0, 1]),
    ],
)
def test_physical_pruning_equals_zero_masks_on_decoders(kind, heads, neurons, ranks):
    before = layer_params(_lora_decoder(kind))
    model, masked, pruned = _masked_vs_pruned(kind, heads, neurons, ranks)
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    after = block_infos(model)
    assert [b.num_heads for b in after] == [len(h) for h in heads]
    assert layer_params(model) < before
    if kind == "llama":
        groups_kept = [len({h // 2 for h in kept}) for kept in heads]
        assert [b.kv_heads for b in after] == groups_kept
        assert (
            model.model.layers[0].self_attn.num_key_value_groups == len(heads[0]) // groups_kept[0]
        )
        assert dims(model.get_submodule(after[0].gate))[1] == after[0].ffn  # gate shrank with up


def test_gqa_heads_that_do_not_form_equal_groups_are_refused():
    model = tiny_llama()
    b = block_infos(model)[0]
    with pytest.raises(PlanError, match="same number of query heads"):
        shrink(model, heads={b.name: [0, 1, 2]})


@pytest.mark.parametrize(("mode", "expect"), [("groups", [2, 3]), ("heads", [1, 2])])
def test_gqa_decision_modes(mode, expect):
    model = _lora_decoder("llama")
    blocks = block_infos(model)
    score = torch.tensor([0.1, 0.9, 0.8, 0.7])  # group 0: 1.0, group 1: 1.5
    cfg = LightPEFTConfig(
        r=2, head_ratio=0.5, ffn_ratio=0.0, module_ratio=0, rank_ratio=0, gqa=mode
    )
    lora = {n: torch.ones(2) for n, _ in slimtune.core.wrappers(model)}
    dec = decide(
        blocks,
        [score, score],
        [torch.ones(b.ffn) for b in blocks],
        {n: 1.0 for n in lora},
        lora,
        cfg,
    )
    assert dec.heads[blocks[0].name] == expect
    prune(model, dec)  # both forms are valid GQA layers
    logits(model, decoder_inputs())


def test_pruned_llama_saves_and_reloads_with_its_kv_groups(tmp_path):
    model = tiny_llama()
    x = decoder_inputs()
    blocks = block_infos(model)
    shrink(
        model,
        heads={blocks[0].name: [2, 3], blocks[1].name: [1, 3]},
        neurons={blocks[1].name: [0, 5, 7]},
    )
    ref = logits(model, x)
    save_pruned(model, tmp_path / "p")
    fresh = load_pruned(tiny_llama(seed=7), tmp_path / "p")
    assert torch.equal(logits(fresh, x), ref)
    assert [(b.num_heads, b.kv_heads, b.ffn) for b in block_infos(fresh)] == [(2, 1, 24), (2, 2, 3)]


def test_compensation_applies_to_opt_and_is_refused_clearly_on_llama():
    cfg = LightPEFTConfig(r=2, dropout=0.0, compensate=True)
    opt = _lora_decoder("opt")
    LightPEFT(opt, cfg).remove()
    with pytest.raises(PlanError, match="no biases"):
        LightPEFT(_lora_decoder("llama"), cfg)


@pytest.mark.parametrize("kind", DECODERS)
def test_early_phase_on_a_causal_lm_records_and_prunes(kind):
    cfg = LightPEFTConfig(r=2, alpha=4, dropout=0.0, head_ratio=0.5, ffn_ratio=0.3)
    model = slimtune.apply(BUILD[kind](causal=True), cfg.lora(), head=[])
    lp = LightPEFT(model, cfg)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad] + lp.mask_parameters(), lr=1e-2
    )
    x = decoder_inputs()
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    model.train()
    for step in range(4):
        lp.recording = step >= 2
        loss = task_loss(model(**x), labels) + lp.penalty()
        opt.zero_grad()
        loss.backward()
        lp.after_backward()
        opt.step()
    dec = lp.decide()
    lp.remove()
    before = layer_params(model)
    prune(model, dec)
    assert layer_params(model) < before
    model.eval()
    out = model.generate(
        input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert out.shape == (1, 6)


# ----------------------------------------------------------------------------------- SPT


def test_spt_scores_the_seven_linears_and_norms_of_a_llama_on_token_labels():
    model = tiny_llama(causal=True)
    pool = candidates(model)
    mats = {n.rsplit(".", 2)[-2] for n, p in pool.items() if p.dim() == 2}
    assert mats == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any("layernorm" in n for n, p in pool.items() if p.dim() == 1)
    x = decoder_inputs()
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    scores = sensitivity(model, [{**x, "labels": labels}])
    # equals the hand-computed squared gradient of the shifted next-token loss
    model.zero_grad()
    model.train()
    task_loss(model(**x), labels).backward()
    q = "model.layers.0.self_attn.q_proj.weight"
    g = dict(model.named_parameters())[q].grad
    torch.testing.assert_close(scores[q], g.square(), rtol=1e-5, atol=1e-12)


def test_spt_allocation_on_gpt2_uses_the_fused_qkv_as_one_candidate():
    from slimtune.passes.spt import SPTConfig, allocate

    model = tiny_gpt2()
    x = decoder_inputs()
    scores = sensitivity(model, [{**x, "labels": torch.tensor([0, 1, 2])}])
    assert sum(n.endswith("c_attn.weight") for n in scores) == 2
    # a budget that makes some matrices structured (LoRA) and others sparse
    plan = allocate(model, scores, SPTConfig(budget=600, r=2, alpha=4.0))
    kinds = {e.method for e in plan.entries}
    assert "lora" in kinds and plan.meta["spt"]["total"] == pytest.approx(600, rel=0.05)
    # the LoRA cost of a Conv1D counts its (in, out), not its stored [in, out] shape
    for name, c in plan.meta["spt"]["counts"].items():
        if c["kind"] == 1:
            d_in, d_out = dims(model.get_submodule(name.rpartition(".")[0]))
            assert c["cost"] == 2 * (d_in + d_out)
    slimtune.apply_plan(model, plan)
    model.train()
    logits(model, x).sum().backward()


def test_unfolded_lora_equals_peft_bit_for_bit_and_the_fold_is_close():
    from peft import LoraConfig, get_peft_model

    from slimtune.methods.lora import unfolded

    ours = slimtune.apply(tiny_llama(causal=True), LoRA(r=4, alpha=8, targets=["q", "v", "fc2"]))
    theirs = get_peft_model(
        tiny_llama(causal=True),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    g = torch.Generator().manual_seed(0)
    mine = dict(slimtune.core.wrappers(ours))
    with torch.no_grad():
        for name, m in theirs.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in mine:
                a = torch.randn(mine[key].lora_A.shape, generator=g)
                b = torch.randn(mine[key].lora_B.shape, generator=g)
                mine[key].lora_A.copy_(a)
                mine[key].lora_B.copy_(b)
                m.lora_A["default"].weight.copy_(a)
                m.lora_B["default"].weight.copy_(b)
    ids = torch.randint(3, 50, (4, 40), generator=g)  # 160 tokens: the fold pays on q, v
    ours.eval()
    theirs.eval()
    ref = logits(theirs, {"input_ids": ids})
    with unfolded():
        assert torch.equal(logits(ours, {"input_ids": ids}), ref)
    torch.testing.assert_close(logits(ours, {"input_ids": ids}), ref, rtol=1e-5, atol=1e-5)


def test_other_methods_on_a_fused_part_warn_that_they_train_the_whole_layer():
    from slimtune import BitFit

    with pytest.warns(UserWarning, match="only LoRA updates a part"):
        slimtune.apply(tiny_gpt2(), BitFit(targets=["q"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimtune.apply(tiny_gpt2(), LoRA(r=2, targets=["q"]))
