"""The Python chain of passes: prune -> allocate -> bits, and the orders it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import logits, tiny_vit

import slimtune
from slimtune.errors import PlanError
from slimtune.passes.base_pruning import pruning_of
from slimtune.passes.blocks import block_infos
from slimtune.passes.compose import Allocate, Bits, Prune, check_order, compose
from slimtune.passes.lightpeft import LightPEFTConfig
from slimtune.passes.spt import SPTConfig

PRUNE = Prune(LightPEFTConfig(r=2, alpha=4, dropout=0.0, head_ratio=0.5, ffn_ratio=0.5), steps=4)
ALLOCATE = Allocate(SPTConfig(budget=400, structured="lora", r=2, unstructured=False, batches=2))


def _batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(4, 3, 28, 28, generator=g),
            "labels": torch.randint(0, 3, (4,), generator=g),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([ALLOCATE, PRUNE], "Prune after Allocate: pruning removes heads"),
        ([Bits(1), ALLOCATE], "Allocate after Bits: bits quantize what the allocation chose"),
        ([PRUNE, Bits(1)], "Bits quantize what an Allocate stage chose"),
        ([PRUNE, PRUNE], "Prune appears twice"),
        ([PRUNE, "lora"], "stage 1 is a str"),
        ([], "empty chain"),
    ],
)
def test_orders_that_make_no_sense_are_refused(stages, match):
    with pytest.raises(PlanError, match=match):
        check_order(stages)
    model = tiny_vit()
    with pytest.raises(PlanError, match=match):
        compose(model, _batches(), stages)
    assert getattr(model, "_slimtune", None) is None and pruning_of(model) is None


def test_stage_settings_are_validated():
    with pytest.raises(PlanError, match="Bits.bits must be 1 to 8 or 32"):
        Bits(16)
    with pytest.raises(PlanError, match="head_bits must be 1, 2, 4, 8 or 32"):
        Bits(1, head_bits=3)
    with pytest.raises(PlanError, match="Prune.steps"):
        Prune(LightPEFTConfig(), steps=0)
    with pytest.raises(PlanError, match="needs an SPTConfig"):
        Allocate(LightPEFTConfig())  # type: ignore[arg-type]


def test_prune_allocate_bits_then_the_task_file_rebuilds_it(tmp_path: Path):
    torch.manual_seed(0)
    model = tiny_vit(seed=0)
    before = [(b.num_heads, b.ffn) for b in block_infos(model)]
    compose(model, _batches(), [PRUNE, ALLOCATE, Bits(1, head_bits=1)])
    after = [(b.num_heads, b.ffn) for b in block_infos(model)]
    assert all(h < h0 and f < f0 for (h, f), (h0, f0) in zip(after, before, strict=True))
    plan = slimtune.get_state(model).plan
    assert {e.method for e in plan.entries} == {"lora", "head"}
    assert all(e.settings["bits"] == 1 for e in plan.entries)
    assert plan.meta["spt"]["bits"] == 1
    # trains like any plan, then its task file gives the same model on the original base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for batch in _batches(2, seed=5):
        loss = torch.nn.functional.cross_entropy(
            logits(model, {"pixel_values": batch["pixel_values"]}), batch["labels"]
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    x = {"pixel_values": _batches(1, seed=9)[0]["pixel_values"]}
    want = logits(model, x)
    slimtune.save(model, tmp_path / "task")
    assert slimtune.storage_report(tmp_path / "task")["parts"].keys() == {"lora", "head", "pruning"}
    fresh = slimtune.load(tiny_vit(seed=0).eval(), tmp_path / "task")
    assert torch.equal(logits(fresh, x), want)


def test_single_stages():
    """Prune alone is Light-PEFT with every rank kept; Allocate alone is SPT on the base."""
    model = tiny_vit(seed=0)
    compose(model, _batches(), [PRUNE])
    assert pruning_of(model) is not None
    assert {e.method for e in slimtune.get_state(model).plan.entries} == {"lora"}
    plain = tiny_vit(seed=0)
    compose(plain, _batches(), [ALLOCATE])
    assert pruning_of(plain) is None
    entries = slimtune.get_state(plain).plan.entries
    assert entries and {e.method for e in entries} == {"lora"}
    assert all(e.settings["bits"] == 32 for e in entries)
    with pytest.raises(PlanError, match="plain base model"):
        compose(plain, _batches(), [ALLOCATE])


def test_warm_start_hands_the_early_lora_to_the_allocation():
    """The new LoRA module's update ``scaling * B A`` equals the early module's top ranks'."""
    from slimtune import LoRA
    from slimtune.passes.compose import early_lora, warm_start

    model = slimtune.apply(tiny_vit(seed=0), LoRA(r=4, alpha=8, targets=["q", "v"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, w in slimtune.core.wrappers(model):
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g))
            w.lora_A.mul_(torch.arange(1, 5, dtype=torch.float32)[:, None])  # rank 3 largest
    early = early_lora(model)
    slimtune.remove(model)
    slimtune.apply(model, LoRA(r=2, alpha=2, targets=["q"]))
    done = warm_start(model, early)
    wrapped = dict(slimtune.core.wrappers(model))
    assert sorted(done) == sorted(wrapped)
    for name in done:
        a, b, scale = early[name]
        top = (b.norm(dim=0) * a.norm(dim=1)).argsort(descending=True)[:2]
        want = scale * b[:, top] @ a[top]
        w = wrapped[name]
        torch.testing.assert_close(w.scaling * w.lora_B @ w.lora_A, want)
    assert warm_start(model, {}) == []
