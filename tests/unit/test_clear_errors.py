"""Inputs that used to end in a traceback: each is now one clear error naming the file or key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_files import without_digests
from safetensors.torch import load_file, save_file
from tiny_models import perturb, tiny_bert

import slimtune
from slimtune import LoRA
from slimtune.app.config import ConfigError, RunConfig, load_config
from slimtune.errors import LoadError


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    model = slimtune.apply(tiny_bert(), [LoRA(r=2, alpha=4, targets=["q", "v"])])
    perturb(model, seed=3)
    return without_digests(slimtune.save(model, tmp_path_factory.mktemp("a")))


def _with_manifest(saved: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "edited"
    d.mkdir()
    for f in saved.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    text = (d / "slimtune.json").read_text()
    (d / "slimtune.json").write_text(edit(json.loads(text), text))
    return d


def _set(key, value):
    def edit(m, _):
        m[key] = value
        return json.dumps(m)

    return edit


def _head_string(m, _):
    m["plan"]["head"] = "classifier"
    return json.dumps(m)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda m, t: json.dumps({**m, "format_version": "X"}).replace('"X"', "1e999"),
            "invalid format version inf",
        ),
        (_set("base", 5), "'base' must be a JSON object, got int"),
        (lambda m, t: "[" * 100_000 + "]" * 100_000, "nested too deeply|not a slimtune"),
        (_head_string, "plan 'head' must be a list of module names"),
    ],
)
def test_malformed_manifests_are_one_clear_error(saved, tmp_path, edit, match):
    d = _with_manifest(saved, tmp_path, edit)
    with pytest.raises(LoadError, match=match):
        slimtune.load(tiny_bert(), d)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["methods=[{name: lora}]", "methods.5.r=4"], r"methods\.5 is not an index of the 1 items"),
        (["name.x=1"], "name must be str"),
        (["train.lr=[1"], r"override train.lr=\[1: not a YAML value"),
        (["name=x", "name.y.z=1"], "name is a str, not a section with keys"),
    ],
)
def test_bad_overrides_are_one_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("section", "value", "match"),
    [
        ("train", 5, "train must be a mapping of train settings"),
        ("data", "x", "data must be a mapping of data settings"),
        ("head", 5, "head must be a list of roles or regular expressions"),
    ],
)
def test_sections_of_the_wrong_type_are_refused(section, value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**{section: value})


def _tiny_run(epochs: int = 2) -> RunConfig:
    return RunConfig(
        name="r",
        model="tiny-vit",
        task="shapes-count",
        data={"image_size": 32, "n_train": 16, "n_val": 8, "n_test": 8},
        train={"epochs": epochs, "batch_size": 8, "eval_batch_size": 16, "lr": 0.01},
    )


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    from slimtune.app.loop import train

    out = tmp_path_factory.mktemp("run") / "r"
    train(_tiny_run(), out, stop_after_epoch=1, progress=False)
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_state(run: Path, edit) -> None:
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    edit(state)
    (run / "checkpoint" / "state.json").write_text(json.dumps(state))


def _edit_tensors(run: Path, edit) -> None:
    path = run / "checkpoint" / "state.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _drop_model_tensors(t):
    for k in [k for k in t if k.startswith("model/")]:
        del t[k]


def _reshape_one(t):
    k = next(k for k in t if k.startswith("model/"))
    t[k] = torch.zeros(3, 3)


@pytest.mark.parametrize(
    ("state_edit", "tensor_edit", "match"),
    [
        (lambda s: s.pop("param_groups"), None, "must hold param_groups"),
        (lambda s: s["extra"].update(epoch=99), None, "at epoch 99"),
        (lambda s: s["extra"].update(epoch=-3), None, "epoch must be an integer >= 0, got -3"),
        (lambda s: s["extra"].update(train_s=float("nan")), None, "train_s must be a finite"),
        (None, _drop_model_tensors, "not this model's trainable ones"),
        (None, _reshape_one, r"the model's is torch.float32"),
    ],
)
def test_resume_from_a_damaged_checkpoint_is_refused(
    stopped_run, tmp_path, state_edit, tensor_edit, match
):
    from slimtune.app.loop import train

    run = _copy_run(stopped_run, tmp_path / "r")
    if state_edit:
        _edit_state(run, state_edit)
    if tensor_edit:
        _edit_tensors(run, tensor_edit)
    with pytest.raises(LoadError, match=match):
        train(_tiny_run(), run, resume=True, progress=False)


def test_cli_errors_are_one_line(tmp_path, stopped_run):
    from typer.testing import CliRunner

    from slimtune.app.cli import app

    runner = CliRunner()
    broken = _copy_run(stopped_run, tmp_path / "broken")
    (broken / "config.yaml").write_text("name: [unclosed\n")
    for cmd in (["eval", str(broken)], ["info", str(broken)]):
        out = runner.invoke(app, cmd)
        assert out.exit_code == 2 and "not valid YAML" in out.output, out.output
        assert "Traceback" not in out.output
    a_file = tmp_path / "file"
    a_file.write_text("x")
    out = runner.invoke(app, ["train", "--out", str(a_file), "model=tiny-vit"])
    assert out.exit_code == 2 and "a file is there" in out.output, out.output
    cfg = tmp_path / "plan.yaml"
    cfg.write_text("model: tiny-vit\ntask: shapes-count\nallocation: {method: spt}\n")
    out = runner.invoke(app, ["plan", "--config", str(cfg), "--out", str(a_file)])
    assert out.exit_code == 2 and "a file is there" in out.output, out.output
    out = runner.invoke(app, ["export", str(stopped_run), "--out", str(a_file)])
    assert out.exit_code == 2 and "a file is there" in out.output, out.output


def test_a_finished_run_vouches_for_its_files(tmp_path):
    """``digests.json``: eval/export/info (rebuild) refuse a run whose files changed."""
    from slimtune.app.loop import train
    from slimtune.app.rebuild import rebuild
    from slimtune.app.rundigest import DIGESTS, RUN_FILES

    run = tmp_path / "r"
    res = train(_tiny_run(1), run, progress=False)
    # every classification run also reports the majority-class floor
    from collections import Counter

    from slimtune.app.build import load_data

    data = load_data(_tiny_run(1), {"kind": "image"})
    counts = Counter(int(x) for x in data.train.labels)
    top = max(sorted(counts), key=lambda c: counts[c])  # ties: the lowest class
    want_test = sum(int(y) == top for y in data.test.labels) / len(data.test.labels)
    assert (
        res["majority"]["test"] == want_test and res["majority"]["class"] == data.class_names[top]
    )
    assert "Majority-class baseline" in (run / "report.md").read_text()
    want = json.loads((run / DIGESTS).read_text())["sha256"]
    assert sorted(want) == sorted(RUN_FILES)
    rebuild(run)
    original = (run / "results.json").read_bytes()
    (run / "results.json").write_bytes(original.replace(b'"name"', b'"nome"'))
    with pytest.raises(LoadError, match="results.json changed since the run was written"):
        rebuild(run)
    (run / "results.json").write_bytes(original)
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "\n# edited\n")
    with pytest.raises(LoadError, match="config.yaml changed"):
        rebuild(run)
    (run / DIGESTS).unlink()  # the documented way to accept the change
    rebuild(run)


def test_an_override_fills_a_null_section(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("allocation: null\n")
    assert load_config(cfg, ["allocation.budget=1000"]).allocation.budget == 1000
