"""Winter-wheat mapping: scores from probabilities, trainable percentages of every run config,
pre-trained checkpoints, and pre-training -> adaptation -> evaluation end to end on tiny tiles."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_wheat_study

import slimtune
from benchmarks.wheat import METHODS, config_dir
from slimtune.app.config import ConfigError
from slimtune.models.tsvit import TSViT, TSViTConfig
from studies.wheat.segment import SegTrainConfig
from studies.wheat.segmetrics import Confusion, confusion, positive_probability
from studies.wheat.study import (
    PretrainConfig,
    WheatConfig,
    adapt,
    build_adapted,
    load_pretrained,
    load_wheat_config,
    pretrain,
    save_pretrained,
)

# --- scores ----------------------------------------------------------------------------------


def test_f1_on_a_hand_made_example() -> None:
    #            pixel:  0    1    2    3    4    5    6    7
    prob = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.7, 0.1, 0.5, 0.8])
    target = torch.tensor([1, 1, 1, 0, 0, 0, 1, -1])  # pixel 7 unlabelled
    c = confusion(prob, target)
    # prob >= 0.5 -> positive: TP = {0, 1, 6}, FP = {4}, FN = {2}, TN = {3, 5}
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 1, 1, 2)
    assert c.precision == pytest.approx(3 / 4)
    assert c.recall == pytest.approx(3 / 4)
    assert c.f1 == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert c.iou == pytest.approx(3 / 5)
    assert c.accuracy == pytest.approx(5 / 7)
    assert (c + c).f1 == pytest.approx(c.f1)
    # No positive anywhere, none predicted: the class was never found.
    assert Confusion(0, 0, 0, 10).f1 == 0.0 and Confusion(0, 0, 0, 10).iou == 0.0


def test_f1_uses_probabilities_not_logits() -> None:
    """Logits (other 0.0, wheat 0.3): wheat is the likelier class (p = 0.57) although its logit
    is below 0.5; thresholding the logit at 0.5 would call it 'other'."""
    logits = torch.tensor([[0.0, 0.3], [0.0, -0.3], [2.0, 0.6]]).reshape(3, 2, 1, 1)
    target = torch.tensor([1, 0, 0]).reshape(3, 1, 1)
    prob = positive_probability(logits)
    assert prob.shape == (3, 1, 1)
    torch.testing.assert_close(prob, logits.softmax(1)[:, 1])
    c = confusion(prob, target)
    assert (c.tp, c.fp, c.fn, c.tn) == (1, 0, 0, 2)
    assert c.f1 == 1.0
    # The thresholded-logit rule gets pixel 0 wrong and pixel 2 wrong (logit 0.6 >= 0.5).
    wrong = ((logits[:, 1] >= 0.5).long() == target).float().mean()
    assert wrong < 1.0
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        confusion(logits[:, 1], target)


# --- trainable percentages of every run config ----------------------------------------------


def _tiny() -> TSViT:
    torch.manual_seed(0)
    return TSViT(TSViTConfig.tiny())


def _expected_trainable(method: str, cfg: WheatConfig, c: TSViTConfig) -> int:
    """Trainable parameters of a run on the tiny TSViT, written out from the architecture."""
    d, inner, mlp, p = c.dim, c.num_heads * c.head_dim, c.mlp_dim, c.patch_size
    blocks = c.temporal_depth + c.spatial_depth
    head = (2 * d + (d + 1) * p * p) + (c.num_classes * 2 + 2)  # mlp_head + Linear(K -> 2)
    spec = cfg.methods[0] if cfg.methods else {}
    if method == "head":
        return head
    if method == "bitfit":  # o, fc1, fc2, norm1, norm2 biases per block; the encoders' norms
        return head + blocks * (d + mlp + d + 2 * d) + 2 * d
    if method == "lora":
        r = spec["r"]
        per = 3 * r * (d + inner) + r * (inner + d) + r * (d + mlp) + r * (mlp + d)
        return head + blocks * per
    if method == "adaptformer":
        m = spec["dim"]
        return head + blocks * (d * m + m + m * d + d)
    if method == "prompt-shallow":  # one prompt in front of each encoder
        return head + 2 * spec["length"] * d
    if method == "prompt-deep":  # a prompt at every block of both encoders
        return head + blocks * spec["length"] * d
    if method == "full":
        return sum(x.numel() for x in _tiny().adapt_classes(2, mode="linear").parameters())
    raise AssertionError(method)


@pytest.mark.parametrize("method", METHODS)
def test_trainable_percentage_matches_formula(method: str) -> None:
    cfg = replace(load_wheat_config(config_dir() / f"{method}.yaml"), model="tiny")
    assert cfg.name == method
    model = build_adapted(_tiny(), cfg)
    s = slimtune.summary(model)
    c = model.config
    base = sum(x.numel() for x in _tiny().adapt_classes(2, mode="linear").parameters())
    expected = _expected_trainable(method, cfg, c)
    assert s.trainable == expected
    assert s.base == base
    assert s.pct == pytest.approx(100.0 * expected / base)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_prompt_configs_prompt_both_encoders() -> None:
    for method, n in (("prompt-shallow", 2), ("prompt-deep", 4)):
        cfg = replace(load_wheat_config(config_dir() / f"{method}.yaml"), model="tiny")
        c = TSViTConfig.tiny(temporal_depth=2, spatial_depth=2)
        torch.manual_seed(0)
        model = build_adapted(TSViT(c), cfg)
        prompts = [name for name, _ in model.named_parameters() if name.endswith("prompts")]
        assert len(prompts) == n
        assert any(p.startswith("temporal_encoder") for p in prompts)
        assert any(p.startswith("space_encoder") for p in prompts)


def test_token_class_change_trains_the_new_tokens() -> None:
    cfg = WheatConfig(name="bitfit", model="tiny", classes="tokens", methods=[{"name": "bitfit"}])
    model = build_adapted(_tiny(), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "temporal_token" in trainable and model.temporal_token.shape[1] == 2


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'linear' or 'tokens'"):
        WheatConfig(classes="logits")
    with pytest.raises(ConfigError, match="unknown train keys"):
        WheatConfig(train={"epoch": 3})  # type: ignore[arg-type]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethod: []\n")
    with pytest.raises(ConfigError, match="unknown keys \\['method'\\]"):
        load_wheat_config(bad)
    with pytest.raises(ConfigError):
        WheatConfig(methods=[{"name": "lora", "rank": 2}])


# --- checkpoints and the whole pipeline -----------------------------------------------------


def test_pretrained_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _tiny().eval()
    save_pretrained(model, tmp_path / "ck", {"note": "test"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    again, meta = load_pretrained(tmp_path / "ck")
    assert meta["note"] == "test" and meta["config"]["dim"] == 16
    x, doy = torch.randn(2, 4, 10, 8, 8), torch.randint(0, 366, (2, 4))
    torch.testing.assert_close(again.eval()(x, doy), model(x, doy), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no pre-trained TSViT"):
        load_pretrained(tmp_path / "missing")


def test_pretrain_then_adapt_end_to_end(tmp_path: Path) -> None:
    study = tiny_wheat_study()
    pcfg = PretrainConfig(model="tiny", train=SegTrainConfig(epochs=1, batch_size=4))
    path, meta = pretrain(study, pcfg, root=tmp_path, progress=False)
    assert not meta["cached"] and meta["config"]["num_classes"] == 7
    assert (path / "model.safetensors").is_file()
    again, meta2 = pretrain(study, pcfg, root=tmp_path, progress=False)
    assert again == path and meta2["cached"]
    cfg = replace(load_wheat_config(config_dir() / "lora.yaml"), model="tiny")
    cfg = replace(cfg, train=replace(cfg.train, epochs=2, batch_size=2))
    out = tmp_path / "run"
    res = adapt(cfg, path, study=study, root=tmp_path, out=out, maps=2, progress=False)
    assert set(res["test"]) == {"in_domain", "cross_year", "cross_area"}
    for scores in res["test"].values():
        assert set(scores) >= {"f1", "iou", "precision", "recall"}
        assert 0.0 <= scores["f1"] <= 1.0 and scores["iou"] <= scores["f1"] + 1e-12
    assert json.loads((out / "results.json").read_text())["trainable_pct"] == res["trainable_pct"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    for split in ("in_domain", "cross_year", "cross_area"):
        assert (out / "maps" / f"{split}.png").stat().st_size > 0
    assert (out / "adapter" / "adapter.safetensors").is_file()
