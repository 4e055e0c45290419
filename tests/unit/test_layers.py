"""The layers of the house: the library stands alone, the method registry is the one list."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import slimtune
from slimtune.app.config import ConfigError, RunConfig, build_methods, method_names
from slimtune.errors import PlanError
from slimtune.methods import METHODS, build_method, config_methods, method_spec
from slimtune.passes.lightpeft import LightPEFTConfig
from slimtune.passes.spt import SPTConfig

SRC = Path(slimtune.__file__).parent


def test_the_library_imports_without_the_applications_dependencies():
    blocked = ("typer", "matplotlib", "accelerate", "yaml", "slimtune.app")
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import slimtune, slimtune.io, slimtune.passes.spt, slimtune.passes.lightpeft\n"
        "import slimtune.passes.shrink, slimtune.export, slimtune.models.tsvit\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_no_library_module_imports_the_application_benchmarks_or_studies():
    for path in SRC.rglob("*.py"):
        if "app" in path.relative_to(SRC).parts or path.name == "__main__.py":
            continue  # __main__ is `python -m slimtune`: the command line, run, never imported
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                assert not mod.lstrip(".").startswith(("app", "benchmarks", "studies")), path
                assert "slimtune.app" not in mod, path
            elif isinstance(node, ast.Import):
                for a in node.names:
                    assert not a.name.startswith(("benchmarks", "studies", "slimtune.app")), path


def test_the_registry_names_every_method_once_with_its_order():
    assert config_methods() == ["full", "bitfit", "lora", "adapter", "prompt"]
    assert {s.name for s in METHODS.values()} == {
        "full",
        "bitfit",
        "sparse",
        "lora",
        "adapter",
        "prompt",
        "head",
    }
    for name, spec in METHODS.items():
        assert spec.config.name == name
    assert [METHODS[m].order for m in ("full", "bitfit", "sparse", "lora")] == [0, 1, 2, 3]
    assert method_names() == [*config_methods(), "linear"]
    assert build_method("lora", {"r": 4}) == slimtune.LoRA(r=4)
    with pytest.raises(PlanError, match="unknown method 'lorra'"):
        method_spec("lorra")
    with pytest.raises(PlanError, match="planned by a pass"):
        build_method("sparse", {})
    with pytest.raises(ConfigError, match=r"methods\[0\] \(lora\): .*r must be"):
        build_methods([{"name": "lora", "r": 0}])


def test_pass_sections_of_a_run_config_are_typed_and_checked():
    cfg = RunConfig(
        allocation={"method": "spt", "budget": "1%"}, model="tiny-vit", task="shapes-count"
    )
    assert isinstance(cfg.allocation, SPTConfig) and cfg.allocation.budget == "1%"
    assert cfg.method_label == "spt-lora"
    assert cfg.to_dict()["allocation"]["method"] == "spt"
    lp = RunConfig(pruning={"early_steps": 3})
    assert isinstance(lp.pruning, LightPEFTConfig) and lp.pruning.early_steps == 3
    assert lp.to_dict()["pruning"]["targets"] == ["q", "k", "v", "o", "fc1", "fc2"]
    assert RunConfig(**{**lp.to_dict(), "compare": None}).pruning == lp.pruning  # round trip
    with pytest.raises(ConfigError, match=r"unknown config key allocation\.budgt"):
        RunConfig(allocation={"budgt": 5})
    with pytest.raises(ConfigError, match="allocation.method must be 'spt'"):
        RunConfig(allocation={"method": "other"})
    with pytest.raises(ConfigError, match="pruning: head_ratio"):
        RunConfig(pruning={"head_ratio": 1.5})
    with pytest.raises(ConfigError, match="allocation must be a mapping"):
        RunConfig(allocation=5)  # type: ignore[arg-type]


def test_the_family_is_stored_once_and_read_back():
    from tiny_models import tiny_bert

    model = tiny_bert()
    assert slimtune.core.family_of(model).name == "bert"
    slimtune.apply(model, [slimtune.LoRA(r=2)])
    assert slimtune.get_state(model).plan.family == "bert"
    assert slimtune.core.family_of(model) is slimtune.FAMILIES["bert"]
