"""The SPT pass: sensitivity, the concatenation-free threshold, allocation, plans."""

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


def test_sensitivity_equals_finite_differences():
    """Each score is the sum over batches of (dL/dw)^2, dL/dw by central differences (float64)."""
    model = tiny_vit().double()
    batches = [
        {"pixel_values": b["pixel_values"].double(), "labels": b["labels"]} for b in _batches(2)
    ]
    scores = sensitivity(model, batches, n_batches=2)
    model.train()
    picks = [
        ("backbone.encoder.layer.0.attention.q_proj.weight", 5),
        ("backbone.encoder.layer.1.mlp.fc2.bias", 3),
        ("backbone.encoder.layer.1.norm1.weight", 7),
    ]
    eps = 1e-6
    for name, i in picks:
        assert name in scores, sorted(scores)
        flat = model.get_parameter(name).data.view(-1)
        want = 0.0
        for b in batches:
            losses = []
            for sign in (1, -1):
                flat[i] += sign * eps
                with torch.no_grad():
                    out = logits(model, {"pixel_values": b["pixel_values"]})
                    losses.append(torch.nn.functional.cross_entropy(out, b["labels"]).item())
                flat[i] -= sign * eps
            want += ((losses[0] - losses[1]) / (2 * eps)) ** 2
        got = scores[name].view(-1)[i].item()
        assert want > 0
        assert got == pytest.approx(want, rel=1e-3), name


def test_sensitivity_over_n_batches_only_and_restores_flags():
    model = tiny_vit()
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_("classifier" in n)
    batches = _batches(3)
    two = sensitivity(model, batches, n_batches=2)
    again = sensitivity(model, batches[:2], n_batches=5)
    assert all(torch.equal(two[n], again[n]) for n in two)
    assert not model.training
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "classifier.weight",
        "classifier.bias",
    ]
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(slimtune.PlanError, match="at least one batch"):
        sensitivity(model, [], n_batches=2)


def test_multi_rank_threshold_equals_naive_and_single():
    from slimtune.passes.spt import topk_thresholds

    g = torch.Generator().manual_seed(3)
    tensors = [torch.rand(n, generator=g).square() for n in (1, 17, 900, 3000)]
    tensors.append(torch.full((30,), 0.5))
    tensors.append(torch.zeros(10))
    ordered = [t.sort().values for t in tensors]
    total = sum(t.numel() for t in tensors)
    ks = [1, 2, 29, 30, 31, 500, 3947, total]
    naive = torch.cat(tensors).sort(descending=True).values
    got = topk_thresholds(ordered, ks)
    assert got.tolist() == [naive[k - 1].item() for k in ks]
    assert [topk_threshold(ordered, k) for k in ks] == got.tolist()
    # many close ranks (gathered between the extremes, ties included) and many spread ranks
    for many in (list(range(20, 60)), list(range(3900, 3957)), list(range(1, total, 97))):
        assert topk_thresholds(ordered, many).tolist() == [naive[k - 1].item() for k in many]
    for bad in ([0], [total + 1], []):
        with pytest.raises(slimtune.PlanError, match="rank k"):
            topk_thresholds(ordered, bad)


def test_counting_totals_match_the_materialised_plan():
    """The vectorised totals used by the tau sweep equal the totals of the real allocation."""
    from slimtune.passes.spt import topk_thresholds
    from slimtune.passes.spt.allocate import _allocate_at, _totals_at

    model = _wider_vit()
    scores = sensitivity(model, _batches(2), n_batches=2)
    sorted_scores = {n: s.reshape(-1).sort().values for n, s in scores.items()}
    pool = sum(s.numel() for s in scores.values())
    taus = [1, 10, 100, 1000, 5000, pool // 2, pool]
    for structured in ("lora", "adapter"):
        cfg = SPTConfig(budget=1000, structured=structured, r=2)
        thr = topk_thresholds(list(sorted_scores.values()), taus)
        fast = _totals_at(scores, sorted_scores, thr, cfg, 7).tolist()
        slow = [
            _allocate_at(scores, sorted_scores, float(t), cfg, 7, materialise).total
            for t in thr
            for materialise in (False, True)
        ]
        assert slow[::2] == slow[1::2] == fast


@pytest.mark.parametrize("budget", [0, -100, "-1%", "0.0M"])
def test_zero_or_negative_budget_is_a_clear_error(budget):
    model = tiny_vit()
    scores = sensitivity(model, _batches(1), n_batches=1)
    with pytest.raises(slimtune.PlanError, match="must be positive"):
        allocate(model, scores, SPTConfig(budget=budget))


def test_budget_larger_than_the_model_is_a_clear_error():
    model = tiny_vit()
    scores = sensitivity(model, _batches(1), n_batches=1)
    base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))
    for budget in (base + 1, "150%", "1B"):
        with pytest.raises(slimtune.PlanError, match="exceeds the model's"):
            allocate(model, scores, SPTConfig(budget=budget))


def test_spt_plan_file_round_trip_gives_the_same_model(tmp_path):
    """save_plan/load_plan (JSON + safetensors): the same plan on the same backbone."""
    from slimtune.io import load_plan, save_plan

    model = _wider_vit()
    scores = sensitivity(model, _batches(2), n_batches=2)
    plan = allocate(model, scores, SPTConfig(budget=2500, r=2))
    save_plan(plan, tmp_path / "plan")
    assert (tmp_path / "plan" / "plan.json").is_file()
    assert (tmp_path / "plan" / "plan.safetensors").is_file()
    again = load_plan(tmp_path / "plan")
    assert again.meta["spt"]["total"] == plan.meta["spt"]["total"]
    assert [(e.method, e.target) for e in again.entries] == [
        (e.method, e.target) for e in plan.entries
    ]
    assert set(again.tensors) == set(plan.tensors)
    assert all(torch.equal(again.tensors[k], plan.tensors[k]) for k in plan.tensors)
    a, b = _wider_vit(), _wider_vit()
    slimtune.apply_plan(a, plan)
    slimtune.apply_plan(b, again)
    names = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert names(a) == names(b)
    assert slimtune.summary(b).trainable == slimtune.summary(a).trainable


@pytest.mark.parametrize("n_cols", [2, 16])
def test_sparse_linear_gradients_equal_dense(n_cols):
    """Sparse deltas (few or many input columns kept for the backward) match a dense delta."""
    from slimtune.methods.sparse import SparseLayer

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 12).requires_grad_(False)
    cols = torch.randperm(16)[:n_cols]
    idx = torch.randint(0, 12, (20,))[:, None] * 16 + cols[torch.randint(0, n_cols, (20,))][:, None]
    idx = idx.reshape(-1).unique()
    layer = SparseLayer(lin, {"weight": idx})
    with torch.no_grad():
        layer.weight_delta.normal_()
    x = torch.randn(5, 3, 16, requires_grad=True)
    layer(x).square().sum().backward()
    d = torch.zeros(12 * 16).index_add(0, idx, layer.weight_delta.detach()).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, lin.weight + d.view(12, 16), lin.bias).square().sum().backward()
    assert torch.allclose(layer.weight_delta.grad, d.grad[idx], atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_sorted_matches_torch_sort() -> None:
    from slimtune.passes.spt.threshold import sorted_scores_of as _sorted

    g = torch.Generator().manual_seed(0)
    x = torch.rand(37, 53, generator=g).pow(8)
    x[0, :5] = 0.0  # ties
    for desc in (False, True):
        assert torch.equal(_sorted(x, desc), x.reshape(-1).sort(descending=desc).values)
    ints = torch.randint(0, 9, (100,), generator=g)
    assert torch.equal(_sorted(ints), ints.sort().values)


@pytest.mark.parametrize("structured", ["lora", "adapter"])
def test_structured_only_low_bit_allocation(structured, tmp_path):
    """``unstructured=False``: only structured modules, the most sensitive matrices first;
    ``bits``: their matrices quantized (a low-bit adapter has no biases), stored bit-packed."""
    from slimtune.passes.spt import topk_thresholds
    from slimtune.passes.spt.allocate import _allocate_at, _totals_at

    model = _wider_vit()
    scores = sensitivity(model, _batches(2), n_batches=2)
    cfg = SPTConfig(budget=3000, structured=structured, r=2, bits=1, unstructured=False)
    plan = allocate(model, scores, cfg)
    assert {e.method for e in plan.entries} == {structured}
    assert not plan.tensors
    assert all(e.settings["bits"] == 1 for e in plan.entries)
    if structured == "adapter":
        assert all(e.settings["bias"] is False for e in plan.entries)
    meta = plan.meta["spt"]
    chosen = {e.target for e in plan.entries}
    thr = meta["threshold"]
    for name, s in scores.items():  # structured exactly where the count clears the threshold
        if s.dim() != 2:
            continue
        d_out, d_in = s.shape
        cost = 2 * (d_in + d_out) if structured == "lora" else 2 * d_out * 2
        assert (name.rpartition(".")[0] in chosen) == (int((s >= thr).sum()) >= cost / 10)
    slimtune.apply_plan(model, plan)
    summary = slimtune.summary(model)
    assert summary.trainable - summary.by_method.get("head", 0) == meta["total"]
    # the counting totals agree with the materialised plans in this mode too
    sorted_scores = {n: s.reshape(-1).sort().values for n, s in scores.items()}
    thrs = topk_thresholds(list(sorted_scores.values()), [10, 100, 1000])
    fast = _totals_at(scores, sorted_scores, thrs, cfg, 0).tolist()
    assert fast == [_allocate_at(scores, sorted_scores, float(t), cfg, 0, True).total for t in thrs]
    x = vit_inputs()
    ref = logits(model, x)
    slimtune.save(model, tmp_path / "spt")
    report = slimtune.storage_report(tmp_path / "spt")
    assert report["parts"][structured] <= meta["total"] / 8 + 8 * 2 * len(plan.entries)
    assert torch.equal(logits(slimtune.load(_wider_vit(), tmp_path / "spt"), x), ref)


def test_spt_bits_and_unstructured_are_validated():
    with pytest.raises(slimtune.PlanError, match="bits must be 1 to 8"):
        SPTConfig(bits=16)
    with pytest.raises(slimtune.PlanError, match="unstructured must be"):
        SPTConfig(unstructured="no")


def test_per_block_reserve_spreads_structured_modules_over_the_blocks():
    """``per_block`` (beyond the paper): every block gets its most sensitive matrix structured
    before the rest of the budget goes where SPT puts it; the total stays at the budget."""
    model = _wider_vit()
    scores = sensitivity(model, _batches(2), n_batches=2)
    cfg = SPTConfig(budget=3000, structured="lora", r=2, bits=1, unstructured=False)
    plain = allocate(model, scores, cfg)
    spread = allocate(model, scores, SPTConfig(**{**vars(cfg), "per_block": 0.5}))
    meta = spread.meta["spt"]
    blocks = {int(t.split(".")[t.split(".").index("layer") + 1]) for t in meta["reserved_modules"]}
    assert blocks == set(range(len(blocks))) and len(blocks) >= 2  # block order, one each
    for t in meta["reserved_modules"]:  # each block's most sensitive matrix
        block = t.split(".layer.")[1].split(".")[0]
        mats = {n: float(s.sum()) for n, s in scores.items()
                if s.dim() == 2 and f".layer.{block}." in n}  # fmt: skip
        assert t + ".weight" == max(mats, key=mats.get)
    assert meta["reserved"] <= 0.5 * 3000 and meta["total"] >= meta["reserved"]
    assert {e.target for e in spread.entries} >= set(meta["reserved_modules"])
    slimtune.apply_plan(model, spread)
    s = slimtune.summary(model)
    assert s.trainable - s.by_method.get("head", 0) == meta["total"]
    assert plain.meta["spt"].get("reserved") is None
    with pytest.raises(slimtune.PlanError, match="per_block"):
        SPTConfig(per_block=1.0)
