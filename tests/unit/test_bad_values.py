"""Values that used to load or train silently are refused with the tensor or key named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_files import without_digests
from safetensors.torch import load_file, save_file
from tiny_models import perturb, tiny_bert

import slimtune
from slimtune import LoRA, Sparse
from slimtune.app.config import ConfigError, RunConfig
from slimtune.errors import LoadError, PlanError


def _saved(tmp_path: Path, methods) -> Path:
    model = slimtune.apply(tiny_bert(), methods)
    perturb(model, seed=3)
    return without_digests(slimtune.save(model, tmp_path / "a"))


def _edit(d: Path, edit) -> None:
    tensors = load_file(str(d / "adapter.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "adapter.safetensors"), {"format": "slimtune-adapter"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_values_are_refused(value, tmp_path):
    d = _saved(tmp_path, [LoRA(r=2, alpha=4, targets=["q", "v"])])

    def poison(t):
        key = next(k for k, v in t.items() if v.is_floating_point() and v.numel() > 1)
        t[key].view(-1)[1] = value

    _edit(d, poison)
    base = tiny_bert()
    with pytest.raises(LoadError, match="NaN or infinite"):
        slimtune.load(base, d)
    assert getattr(base, "_slimtune", None) is None


def test_integer_tensors_where_floats_belong_are_refused(tmp_path):
    d = _saved(tmp_path, [LoRA(r=2, alpha=4, targets=["q", "v"])])

    def to_int(t):
        key = next(k for k, v in t.items() if v.is_floating_point() and v.numel() > 1)
        t[key] = t[key].to(torch.int64)

    _edit(d, to_int)
    with pytest.raises(LoadError, match="is torch.int64, the model's parameter is torch.float32"):
        slimtune.load(tiny_bert(), d)


def test_nan_quantization_scales_are_refused(tmp_path):
    d = _saved(tmp_path, [LoRA(r=2, alpha=4, targets=["q", "v"], bits=1)])

    def poison(t):
        t["quant/scales"][0, 1] = float("nan")

    _edit(d, poison)
    with pytest.raises(LoadError, match="quantization scales are not finite"):
        slimtune.load(tiny_bert(), d)


@pytest.mark.parametrize("bad", [-1, 10_000])
def test_out_of_range_sparse_positions_are_refused_at_load(bad, tmp_path):
    name = "bert.encoder.layer.0.attention.self.query.weight"
    d = _saved(tmp_path, [Sparse(indices={name: [0, 3, 7]})])

    def move(t):
        key = next(k for k in t if k.startswith("plan/"))
        t[key][0] = bad

    _edit(d, move)
    base = tiny_bert()
    with pytest.raises(LoadError, match=r"positions of 'weight' must be in \[0, 256\)"):
        slimtune.load(base, d)
    assert getattr(base, "_slimtune", None) is None
    with pytest.raises(PlanError, match="must be in"):
        slimtune.apply(tiny_bert(), [Sparse(indices={name: [bad]})])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"train": {"lr": float("inf")}}, "train.lr must be a finite number"),
        ({"train": {"weight_decay": float("nan")}}, "train.weight_decay must be a finite"),
        ({"train": {"grad_clip": float("nan")}}, "train.grad_clip must be a finite"),
        ({"methods": [{"name": "lora", "alpha": float("nan")}]}, "LoRA alpha must be a finite"),
        ({"methods": [{"name": "lora", "dropout": 1.5}]}, r"LoRA dropout must be in \[0, 1\)"),
        ({"methods": [{"name": "adapter", "scale": float("inf")}]}, "Adapter scale must be"),
        ({"allocation": {"method": "spt", "budget": "nan"}}, "budget must be a finite"),
        ({"allocation": {"method": "spt", "budget": float("inf")}}, "budget must be a finite"),
        ({"pruning": {"method": "light-peft", "l1": float("nan")}}, "l1 must be a finite"),
    ],
)
def test_non_finite_run_settings_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**overrides)


def test_yaml_inf_and_nan_are_refused(tmp_path):
    from slimtune.app.config import load_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text("train: {lr: .inf}\n")
    with pytest.raises(ConfigError, match="train.lr must be a finite number, got inf"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="LoRA alpha must be a finite number, got nan"):
        load_config(None, ["methods=[{name: lora, alpha: .nan}]"])


def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    from torch.utils.data import TensorDataset

    from slimtune.app.config import TrainConfig
    from slimtune.app.loop import LoopHooks, TrainingError, fit

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    steps = {"n": 0}

    def loss(m, batch):
        x, y = batch["x"], batch["labels"]
        steps["n"] += 1
        out = torch.nn.functional.cross_entropy(m(x), y)
        return (out * float("nan") if steps["n"] > 5 else out), len(y)

    def score(m, d):
        return {"accuracy": 0.5}

    hooks = LoopHooks(
        loss=loss,
        evaluate=score,
        collate=lambda items: {
            "x": torch.stack([a for a, _ in items]),
            "labels": torch.stack([b for _, b in items]),
        },
    )
    settings = TrainConfig(epochs=3, batch_size=8, lr=0.1)
    with pytest.raises(TrainingError, match=r"loss became nan at step 6 \(epoch 2\).*epoch 1"):
        fit(model, data, data, settings, hooks, out=tmp_path / "run", progress=False)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["extra"]["epoch"] == 1
