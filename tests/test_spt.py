"""SPT: sensitivity, concatenation-free threshold, allocation rules and budget, plans."""

from __future__ import annotations

import pytest
import torch
from tiny_models import logits, tiny_vit, vit_inputs

import slimtune
from slimtune.passes.spt import (
    SPTConfig,
    allocate,
    candidates,
    parse_budget,
    sensitivity,
    topk_threshold,
)


def _batches(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(4, 3, 28, 28, generator=g),
            "labels": torch.randint(0, 3, (4,), generator=g),
        }
        for _ in range(n)
    ]


def test_sensitivity_equals_hand_computed_squared_gradients():
    model = tiny_vit()
    batches = _batches(2)
    scores = sensitivity(model, batches, n_batches=2)
    pool = candidates(model)
    assert set(scores) == set(pool)
    assert not any("embeddings" in n or "classifier" in n for n in scores)
    # by hand: one backward per batch, square, sum
    name = next(n for n in pool if n.endswith("q_proj.weight"))
    p = model.get_parameter(name)
    want = torch.zeros_like(p)
    model.train()
    for b in batches:
        p.requires_grad_(True)
        p.grad = None
        loss = torch.nn.functional.cross_entropy(
            logits(model, {"pixel_values": b["pixel_values"]}), b["labels"]
        )
        (g,) = torch.autograd.grad(loss, [p])
        want += g.square()
    assert torch.allclose(scores[name], want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("k", [1, 7, 100, 1000, 5000])
def test_concatenation_free_threshold_equals_naive(k):
    g = torch.Generator().manual_seed(k)
    tensors = [torch.rand(n, generator=g).square() for n in (10, 333, 2048, 4000)]
    tensors.append(torch.zeros(50))
    tensors.append(torch.full((20,), 0.25))  # ties
    naive = torch.cat(tensors).topk(k).values[-1].item()
    assert topk_threshold([t.sort().values for t in tensors], k) == naive


def test_budget_parsing_and_impossible_budgets():
    assert parse_budget("0.5M", 10**7) == 500_000
    assert parse_budget("200k", 10**7) == 200_000
    assert parse_budget("1%", 10**6) == 10_000
    assert parse_budget(1234, 10**6) == 1234
    for bad in (0, -5, "0%", "lots"):
        with pytest.raises(slimtune.PlanError):
            parse_budget(bad, 10**6)
    with pytest.raises(slimtune.PlanError, match="exceeds"):
        parse_budget(10**7, 10**6)
    model = tiny_vit()
    scores = sensitivity(model, _batches(1), n_batches=1)
    pool = sum(s.numel() for s in scores.values())
    with pytest.raises(slimtune.PlanError, match="exceeds"):
        allocate(model, scores, SPTConfig(budget=pool + 500))
    with pytest.raises(slimtune.PlanError, match="more than SPT can allocate"):
        allocate(model, scores, SPTConfig(budget=pool - 10, r=1))


def _wider_vit() -> torch.nn.Module:
    """Width 64: enough resolution for a 1% budget tolerance (the 16-wide model jumps by 64)."""
    from tiny_models import TinyViTClassifier
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    m = TinyViTClassifier(3)
    m.backbone = Dinov2Model(
        Dinov2Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            mlp_ratio=2,
            image_size=28,
            patch_size=7,
        )
    )
    m.classifier = torch.nn.Linear(64, 3)
    return m.eval()


@pytest.mark.parametrize("structured", ["lora", "adapter"])
@pytest.mark.parametrize("budget", [1000, 2500, 4000])
def test_allocation_obeys_rules_and_budget(structured, budget):
    model = _wider_vit()
    scores = sensitivity(model, _batches(2), n_batches=2)
    cfg = SPTConfig(budget=budget, structured=structured, r=2, alpha=10, beta=5)
    plan = allocate(model, scores, cfg)
    meta = plan.meta["spt"]
    assert abs(meta["total"] - budget) <= 0.01 * budget, meta["total"]
    thr = meta["threshold"]
    for name, c in meta["counts"].items():
        s = scores[name]
        count = int((s >= thr).sum())
        assert c["count"] == count
        if c.get("extra"):  # top-up positions go only to tensors kept sparse at the threshold
            assert c["kind"] == 0 and c["cost"] == count + c["extra"]
        if s.dim() == 2:
            d_out, d_in = s.shape
            cost = 2 * (d_in + d_out) if structured == "lora" else 2 * d_out * 2 + 2 + d_out
            assert (c["kind"] == 1) == (count >= cost / 10)
        else:
            assert (c["kind"] == 2) == (count >= s.numel() / 5)
    # the applied model has exactly the planned number of trainable parameters (+ head)
    x = vit_inputs()
    ref = logits(model, x)
    slimtune.apply_plan(model, plan)
    s = slimtune.summary(model)
    assert s.trainable - s.by_method.get("head", 0) == meta["total"]
    assert torch.allclose(ref, logits(model, x), atol=1e-6)


def test_spt_plan_save_load_round_trip(tmp_path):
    model = tiny_vit()
    scores = sensitivity(model, _batches(2), n_batches=2)
    plan = allocate(model, scores, SPTConfig(budget=1000, r=2))
    slimtune.apply_plan(model, plan)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    x = vit_inputs()
    ref = logits(model, x)
    slimtune.save(model, tmp_path / "spt")
    again = slimtune.load(tiny_vit(), tmp_path / "spt")
    assert torch.equal(ref, logits(again, x))
    assert slimtune.get_state(again).plan.meta["spt"]["total"] == plan.meta["spt"]["total"]
