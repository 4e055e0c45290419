"""The composition in a run: prune (Light-PEFT) -> allocate (SPT on the pruned model) -> bits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_image_run

from slimtune.app.config import ConfigError, RunConfig


def tiny_compose_run(epochs: int = 2, **extra: object) -> RunConfig:
    return tiny_image_run(
        "compose",
        epochs,
        pruning={"method": "light-peft", "early_steps": 2, "r": 4, "head_ratio": 0.5},
        allocation={
            "method": "spt",
            "budget": "2%",
            "structured": "adapter",
            "r": 2,
            "unstructured": False,
            "batches": 2,
            "batch_size": 8,
        },
        bits=1,
        head_bits=1,
        **extra,
    )


def test_prune_then_allocate_then_one_bit_in_one_run(tmp_path: Path):
    from slimtune.app.loop import train
    from slimtune.app.rebuild import rebuild

    cfg = tiny_compose_run()
    assert cfg.method_label == "light-peft+spt-adapter-1bit"
    with pytest.warns(UserWarning, match="early phase"):
        res = train(cfg, tmp_path / "run", progress=False)
    p, a, t = res["pruning"], res["allocation"], res["task"]
    assert p["then_allocation"] and p["layer_params_after"] < p["layer_params_before"]
    assert a["bits"] == 1 and not a["unstructured"]
    assert set(a["modules"]) == {"adapter", "head"} and a["sparse_positions"] == 0
    assert res["by_method"].keys() == {"adapter", "head"}
    # every trained matrix is stored at 1 bit; nothing of the base is in the task file
    assert {x["method"]: x["bits"] for x in t["tensors"]} == {"adapter": 1, "head": 1}
    assert t["pruned"] and set(t["parts"]) == {"adapter", "head", "pruning"}
    files = sum(f.stat().st_size for f in (tmp_path / "run" / "adapter").iterdir())
    assert t["bytes"] == files
    report = (tmp_path / "run" / "report.md").read_text()
    for section in ("## Light-PEFT pruning", "## SPT allocation", "## Task file", "Composition"):
        assert section in report
    # the task file on the original base gives the trained run's test accuracy
    rebuilt = rebuild(tmp_path / "run")
    assert rebuilt.evaluate("test")["accuracy"] == res["test"]["accuracy"]
    config = json.loads((tmp_path / "run" / "adapter" / "slimtune.json").read_text())
    assert config["pruned"]["sizes"] and config["pruned"]["shift"] == []
    # exports: peft is refused (it applies adapters to the unpruned base); sequential adapters
    # cannot be merged (a LoRA composition's merged export: test_lightpeft_run)
    from slimtune.app.runs import export_run
    from slimtune.errors import ExportError

    with pytest.raises(ExportError, match="this model is pruned"):
        export_run(tmp_path / "run", "peft", tmp_path / "peft")
    with pytest.raises(ExportError, match="cannot be merged"):
        export_run(tmp_path / "run", "merged", tmp_path / "merged")
    # slimtune info: the byte breakdown of the task file, alone or with its run
    from typer.testing import CliRunner

    from slimtune.app.cli import app

    for target in (tmp_path / "run", tmp_path / "run" / "adapter"):
        out = CliRunner().invoke(app, ["info", str(target)])
        assert out.exit_code == 0, out.output
        assert f"task file {tmp_path / 'run' / 'adapter'}: {t['bytes']:,} bytes" in out.output
        assert f"| pruning | {t['parts']['pruning']:,} |" in out.output
        kept = p["blocks"][0]
        assert f"| {kept['heads'][1]} / {kept['heads'][0]} |" in out.output


def test_compose_resumes_to_the_same_result(tmp_path: Path):
    from slimtune.app.loop import train

    cfg = tiny_compose_run()
    with pytest.warns(UserWarning, match="early phase"):
        full = train(cfg, tmp_path / "a", progress=False)
    with pytest.warns(UserWarning, match="early phase"):
        assert train(cfg, tmp_path / "b", stop_after_epoch=1, progress=False) == {
            "stopped_after_epoch": 1
        }
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed["test"] == full["test"] and resumed["allocation"] == full["allocation"]
    # the same tensors (the manifests differ in the allocation's timings, so do their digests)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / r / "adapter" / "adapter.safetensors") for r in "ab")
    a.pop("digest/manifest_sha256")
    b.pop("digest/manifest_sha256")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compose_config_errors_are_clear():
    with pytest.raises(ConfigError, match="bits applies to what an allocation chose"):
        RunConfig(bits=1)
    with pytest.raises(ConfigError, match="allocation \\(SPT\\) decides the methods"):
        RunConfig(allocation={"method": "spt"}, methods=[{"name": "bitfit"}])
    with pytest.raises(ConfigError, match="bits is 1 but allocation.bits is 4"):
        RunConfig(allocation={"method": "spt", "bits": 4}, bits=1)
    with pytest.raises(ConfigError, match="bits must be 1 to 8"):
        RunConfig(allocation={"method": "spt"}, bits=16)
    with pytest.raises(ConfigError, match="unknown config key allocation.unstructure"):
        RunConfig(allocation={"method": "spt", "unstructure": False})
    ok = RunConfig(allocation={"method": "spt", "bits": 2})
    assert (
        ok.allocation is not None and ok.allocation.bits == 2 and ok.method_label == "spt-lora-2bit"
    )
    again = RunConfig(**{**ok.to_dict(), "compare": None})
    assert again.allocation == ok.allocation


def test_a_spt_run_trains_its_head_at_head_bits(tmp_path: Path):
    from slimtune.app.loop import train

    cfg = tiny_compose_run(epochs=1)
    cfg = RunConfig(**{**cfg.to_dict(), "pruning": None, "compare": None})
    res = train(cfg, tmp_path / "run", progress=False)
    heads = [x for x in res["task"]["tensors"] if x["method"] == "head"]
    assert heads and all(x["bits"] == 1 for x in heads)
    assert not res["task"]["pruned"]
    assert torch.isfinite(torch.tensor(res["test"]["loss"]))
