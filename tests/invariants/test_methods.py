"""Invariants of every method on tiny models: a 2-layer BERT, a 2-layer DINOv2, a 1+1-layer
TSViT and 2-layer Llama, OPT and GPT-2 decoders (the matrix of methods x backbone families)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import logits, perturb

import slimtune
from slimtune import Adapter, BitFit, Full, LoRA, Sparse
from slimtune.linear import dims
from slimtune.methods.lora import drop_mask


def _sparse_for(model: torch.nn.Module) -> Sparse:
    """Positions in the first two query matrices and the first norm, found through the family."""
    fam = slimtune.detect_family(model)
    q = [n + ".weight" for n in fam.role_names(model, "q")]
    ln = [n + ".weight" for n in fam.role_names(model, "norm")]
    return Sparse(indices={q[0]: [0, 5, 17, 100], q[1]: [3], ln[0]: [1, 2]})


def _has_bias(model: torch.nn.Module) -> bool:
    return any(n.endswith("bias") for n, _ in model.named_parameters())


METHODS = {
    "lora": lambda m: [LoRA(r=2, alpha=4, targets=["q", "k", "v", "o", "fc1", "fc2"])],
    "lora-dropout": lambda m: [LoRA(r=2, alpha=4, dropout=0.1, targets=["q", "v"])],
    "adapter-seq": lambda m: [Adapter(dim=3, targets=["fc2"])],
    "adapter-par": lambda m: [
        Adapter(dim=3, placement="parallel", activation="relu", bias=False, scale=0.5)
    ],
    "bitfit": lambda m: [BitFit(add_missing=True)],
    "sparse": lambda m: [_sparse_for(m)],
    "full": lambda m: [Full(targets=["fc1"])],
    "mixed": lambda m: [
        LoRA(r=2, targets=["q", "v"]),
        BitFit(add_missing=not _has_bias(m)),  # Llama-style models have no bias at all
        Adapter(dim=2, targets=["o"]),
    ],
    "lora-1bit": lambda m: [LoRA(r=2, targets=["q", "v"], bits=1)],
    "adapter-2bit": lambda m: [Adapter(dim=4, placement="parallel", bias=False, bits=2)],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_init_leaves_outputs_unchanged(tiny, method):
    factory, inputs = tiny
    model = factory()
    x = inputs()
    before = logits(model, x)
    slimtune.apply(model, METHODS[method](model))
    after = logits(model, x)
    tol = (
        1e-2 if "bit" in method and method != "bitfit" else 1e-6
    )  # quantized up-projections start tiny, not zero
    assert torch.allclose(before, after, atol=tol), (before - after).abs().max()


@pytest.mark.parametrize("method", ["lora", "sparse", "mixed", "bitfit", "full", "lora-1bit"])
def test_merge_equals_unmerged(tiny, method):
    factory, inputs = tiny
    model = factory()
    slimtune.apply(model, METHODS[method](model))
    perturb(model)
    x = inputs()
    ref = logits(model, x)
    left = slimtune.merge(model)
    merged = logits(model, x)
    assert torch.allclose(ref, merged, atol=1e-5)
    slimtune.unmerge(model)
    assert torch.allclose(ref, logits(model, x), atol=1e-5)
    if method == "mixed":
        o = slimtune.detect_family(model).role_names(model, "o")  # where the adapters went
        assert left and set(left) == set(o)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_load_round_trip_is_bit_exact(tiny, method, tmp_path):
    factory, inputs = tiny
    model = factory()
    slimtune.apply(model, METHODS[method](model))
    perturb(model)
    x = inputs()
    ref = logits(model, x)
    slimtune.save(model, tmp_path / "ad")
    fresh = slimtune.load(factory(), tmp_path / "ad")
    out = logits(fresh, x)
    assert torch.equal(ref, out)
    # A second round trip (saving a loaded model) must not move anything either.
    slimtune.save(fresh, tmp_path / "ad2")
    again = slimtune.load(factory(), tmp_path / "ad2")
    assert torch.equal(ref, logits(again, x))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_only_intended_parameters_get_gradients(tiny, method):
    factory, inputs = tiny
    model = factory()
    slimtune.apply(model, METHODS[method](model))
    model.train()
    owner = slimtune.core.method_parameters(model)
    logits(model, inputs()).square().sum().backward()
    for name, p in model.named_parameters():
        if owner[name] == "base":
            assert p.grad is None, name
            assert not p.requires_grad, name
        else:
            assert p.requires_grad, name
    got = {
        owner[n]
        for n, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert "head" in got


def _linear_shapes(model, role_names):
    """(inputs, outputs updated) per module the roles name; roles that are parts of one fused
    linear (GPT-2's q and v in c_attn) add their share of its outputs to one entry."""
    fam = slimtune.detect_family(model)
    shapes: dict[str, list[int]] = {}
    for role in role_names:
        for n in fam.role_names(model, role):
            d_in, d_out = dims(model.get_submodule(n))
            part = fam.fused.get(role)
            rows = d_out if part is None else d_out // part[1]
            if n in shapes:
                shapes[n][1] += rows
            else:
                shapes[n] = [d_in, rows]
    return [tuple(v) for v in shapes.values()]


def test_trainable_counts_equal_their_formula(tiny):
    factory, _ = tiny
    model = factory()
    shapes = _linear_shapes(model, ["q", "v"])
    fc2 = _linear_shapes(model, ["fc2"])
    fam = slimtune.detect_family(model)
    head = sum(
        p.numel()
        for h in fam.role_names(model, "head")
        for p in model.get_submodule(h).parameters()
    )
    base = sum(p.numel() for p in model.parameters())
    slimtune.apply(model, [LoRA(r=3, targets=["q", "v"]), Adapter(dim=2, targets=["fc2"])])
    s = slimtune.summary(model)
    assert s.by_method["lora"] == sum(3 * (i + o) for i, o in shapes)
    assert s.by_method["adapter"] == sum(2 * o + 2 + o * 2 + o for _, o in fc2)
    assert s.by_method["head"] == head
    assert s.base == base
    assert s.pct == pytest.approx(100 * s.trainable / base)


def test_bitfit_counts_every_bias_outside_embeddings():
    from tiny_models import tiny_bert

    model = tiny_bert()
    biases = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.endswith("bias") and "embeddings" not in n and not n.startswith("classifier")
    )
    slimtune.apply(model, [BitFit()])
    assert slimtune.summary(model).by_method["bitfit"] == biases


def test_sparse_memory_is_proportional_to_positions(tiny):
    factory, _ = tiny
    model = factory()
    m = _sparse_for(model)
    slimtune.apply(model, [m])
    n_pos = sum(len(v) for v in m.indices.values())
    assert slimtune.summary(model).by_method["sparse"] == n_pos
    # No parameter or buffer of a sparse layer is as large as the weight it tunes.
    for _, w in slimtune.core.wrappers(model):
        for t in list(w.parameters(recurse=False)) + list(w.buffers(recurse=False)):
            assert t.numel() <= 4


def test_sparse_gradients_match_dense_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    idx = torch.tensor([0, 7, 13, 29])
    model = torch.nn.Sequential(lin)
    slimtune.apply(model, [Sparse(indices={"0.weight": idx})], head=[])
    layer = model[0]
    with torch.no_grad():
        layer.weight_delta.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    x = torch.randn(4, 3, 6, requires_grad=True)
    y = model(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = lin.weight.detach().clone().view(-1)
    d = torch.zeros_like(w).index_add(0, idx, layer.weight_delta.detach()).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, (w + d).view(5, 6), lin.bias)
    y2.backward(g)
    assert torch.allclose(y, y2, atol=1e-6)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert torch.allclose(layer.weight_delta.grad, d.grad[idx], atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_matches_reference(dropout):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6)
    model = torch.nn.Sequential(lin)
    slimtune.apply(model, [LoRA(r=2, alpha=3, dropout=dropout, targets=[r"0"])], head=[])
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    model.train()
    x = torch.randn(2, 5, 8, requires_grad=True)
    torch.manual_seed(5)
    y = model(x)
    g = torch.randn_like(y)
    y.backward(g)
    ga, gb, gx = layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), x.grad.clone()
    # Same dropout mask: regenerate it with the same seed as the fused path used.
    torch.manual_seed(5)
    keep = (
        (~drop_mask(x.shape, dropout, x.device)).float() / (1 - dropout)
        if dropout
        else torch.ones_like(x)
    )
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = lin(x2) + (x2 * keep) @ a.t() @ b.t() * 1.5
    y2.backward(g)
    assert torch.allclose(y, y2, atol=1e-5)
    assert torch.allclose(gx, x2.grad, atol=1e-5)
    assert torch.allclose(ga, a.grad, atol=1e-5)
    assert torch.allclose(gb, b.grad, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_mask_rate_and_independence(p):
    torch.manual_seed(0)
    m = drop_mask((300, 1001), p, torch.device("cpu"))
    assert m.dtype == torch.bool and m.shape == (300, 1001)
    n = m.numel()
    # drop rate within 5 standard deviations of p
    assert abs(m.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    # neighbours (the four 16-bit parts of one draw) are uncorrelated
    f = m.flatten().float()
    corr = torch.corrcoef(torch.stack([f[:-1], f[1:]]))[0, 1].item()
    assert abs(corr) < 0.02
    # a fresh call gives a fresh mask; the same seed gives the same mask
    assert not torch.equal(m, drop_mask((300, 1001), p, torch.device("cpu")))
    torch.manual_seed(0)
    assert torch.equal(m, drop_mask((300, 1001), p, torch.device("cpu")))


def test_disabled_equals_base(tiny):
    factory, inputs = tiny
    model = factory()
    x = inputs()
    ref = logits(model, x)
    slimtune.apply(model, [LoRA(r=2, targets=["q", "v"]), Adapter(dim=2)])
    perturb(model)
    assert not torch.allclose(ref, logits(model, x))
    for _, w in slimtune.core.wrappers(model):
        w.enabled = False
    # the head was perturbed too: compare with the head restored
    assert logits(model, x).shape == ref.shape


def test_remove_restores_the_base(tiny):
    factory, inputs = tiny
    model = factory()
    names = [n for n, _ in model.named_parameters()]
    x = inputs()
    ref = logits(model, x)
    slimtune.apply(
        model,
        [LoRA(r=2, targets=["q"]), Adapter(dim=2, placement="parallel"), BitFit(add_missing=True)],
    )
    slimtune.remove(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert torch.equal(ref, logits(model, x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_methods_follow_the_mode_of_the_model_they_are_applied_to(mode, tmp_path):
    from tiny_models import tiny_bert

    model = tiny_bert()
    slimtune.apply(model, [LoRA(r=2, dropout=0.5, targets=["q", "v"]), Adapter(dim=2)])
    perturb(model)
    slimtune.save(model, tmp_path / "ad")
    fresh = tiny_bert().train(mode == "train")
    loaded = slimtune.load(fresh, tmp_path / "ad")
    assert {m.training for m in loaded.modules()} == {mode == "train"}
    if mode == "eval":  # no LoRA dropout at inference: two forwards agree exactly
        from tiny_models import bert_inputs

        x = bert_inputs()
        assert torch.equal(logits(loaded, x), logits(loaded, x))
