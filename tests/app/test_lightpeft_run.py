"""Light-PEFT in a run: config section, early phase, pruning, compensation, re-scoring, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_lightpeft_run

from slimtune.app.config import RunConfig
from slimtune.errors import PlanError
from slimtune.passes.lightpeft import (
    LightPEFTConfig,
    PruningDecision,
)


def test_pipeline_from_a_run_config_and_resume(tmp_path: Path):
    from slimtune.app.loop import train

    cfg = tiny_lightpeft_run(epochs=2)
    with pytest.warns(UserWarning, match="early phase is 2 steps"):
        full = train(cfg, tmp_path / "a", progress=False)
    p = full["pruning"]
    assert "under 50 steps" in p["early_phase_warning"]
    assert full["method"] == "light-peft"
    assert p["layer_params_after"] < p["layer_params_before"]
    assert 1 <= p["lora_modules_after"] <= 3  # 12 modules, 75% dropped (ranks may empty more)
    for f in ("pruning.png", "report.md", "pruned/adapter/slimtune.json", "pruned/decision.json"):
        assert (tmp_path / "a" / f).is_file()
    assert not (tmp_path / "a" / "pruned" / "backbone").exists()  # a task file, not the base
    assert full["task"]["pruned"] and full["task"]["parts"]["pruning"] > 0
    report = (tmp_path / "a" / "report.md").read_text()
    assert "Light-PEFT pruning" in report and "**Warning**: the Light-PEFT early phase" in report
    # the merged export of a pruned run: a pruned-backbone folder with the run's logits
    from slimtune.app.build import build_model
    from slimtune.app.rebuild import rebuild
    from slimtune.app.runs import export_run
    from slimtune.io import load_pruned

    rebuilt = rebuild(tmp_path / "a").model
    merged = export_run(tmp_path / "a", "merged", tmp_path / "merged")
    fresh, _ = build_model("tiny-vit", rebuilt.classifier.out_features)
    load_pruned(fresh, merged)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        fresh.eval()(pixel_values=x), rebuilt(pixel_values=x), rtol=1e-5, atol=1e-5
    )
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
            runs[name] = train(
                tiny_lightpeft_run(1, compensate=comp), tmp_path / name, progress=False
            )
    assert runs["comp"]["pruning"]["config"]["compensate"] is True
    decision = json.loads((tmp_path / "comp" / "pruned" / "decision.json").read_text())
    plain = json.loads((tmp_path / "plain" / "pruned" / "decision.json").read_text())
    shift = decision["decision"]["bias_shift"]
    assert plain["decision"]["bias_shift"] == {}
    # the same early phase (compensation draws no random numbers): the same units removed
    for key in ("heads", "neurons", "ranks"):
        assert decision["decision"][key] == plain["decision"][key]
    assert len(shift) == 4  # o and fc2 of both blocks
    stored = load_file(tmp_path / "comp" / "adapter" / "adapter.safetensors")["pruned/shift"]
    names = json.loads((tmp_path / "comp" / "adapter" / "slimtune.json").read_text())["pruned"]
    assert sorted(names["shift"]) == sorted(shift)
    for i, n in enumerate(names["shift"]):
        assert torch.equal(stored[i], torch.tensor(shift[n], dtype=torch.float32))
    # the task files rebuilt on the original base: the biases differ by the shifts exactly
    from slimtune.app.rebuild import rebuild
    from slimtune.io import base_state_dict

    a = base_state_dict(rebuild(tmp_path / "plain").model)
    b = base_state_dict(rebuild(tmp_path / "comp").model)
    assert a.keys() == b.keys()
    shifted = set()
    for key in a:
        module = key.removesuffix(".bias")
        if key.endswith(".bias") and module in shift:
            shifted.add(module)
            delta = torch.tensor(shift[module], dtype=a[key].dtype)
            torch.testing.assert_close(b[key], a[key] + delta)
            assert delta.abs().max() > 0
        elif ".classifier." not in f".{key}":  # the heads train on differently shifted models
            assert torch.equal(a[key], b[key]), key
    assert shifted == set(shift)


def test_rescoring_prunes_the_backbone_first_and_takes_the_peft_scores_from_the_pruned_model(
    tmp_path: Path,
):
    from slimtune.app.loop import train

    with pytest.warns(UserWarning, match="early phase"):
        plain = train(tiny_lightpeft_run(1, module_ratio=0.5), tmp_path / "a", progress=False)
    with pytest.warns(UserWarning, match="early phase"):
        again = train(
            tiny_lightpeft_run(1, module_ratio=0.5, rescore_steps=2), tmp_path / "b", progress=False
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
    from slimtune.app.config import ConfigError

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
