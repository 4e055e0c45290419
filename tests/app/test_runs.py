"""Runs end to end on a tiny model and tiny generated data: CLI, reports, resume, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slimtune.app.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "model": "tiny-vit",
    "task": "shapes-count",
    "methods": [{"name": "lora", "r": 2, "alpha": 4, "targets": ["q", "v"], "dropout": 0.1}],
    "data": {"image_size": 32, "n_train": 48, "n_val": 16, "n_test": 24},
    "train": {"epochs": 3, "batch_size": 16, "eval_batch_size": 32, "lr": 0.01, "seed": 3},
}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def _cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "slimtune", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=e,
        timeout=300,
    )


def test_cli_train_eval_export_info(tiny_config: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = _cli("train", "--config", str(tiny_config), "--out", str(run), "--quiet", "train.epochs=2")
    assert r.returncode == 0, r.stderr
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "results.json",
        "report.md",
        "curves.png",
        "adapter/slimtune.json",
    ):
        assert (run / f).is_file(), f
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == "lora"
    assert 0.0 <= res["val"]["accuracy"] <= 1.0 and 0.0 <= res["test"]["accuracy"] <= 1.0
    assert res["trainable_params"] > 0 and 0 < res["trainable_pct"] < 100
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    ev = _cli("eval", str(run), "--split", "test")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(res["test"]["accuracy"])
    ex = _cli("export", str(run), "--format", "peft", "--out", str(tmp_path / "peft"))
    assert ex.returncode == 0, ex.stderr
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    info = _cli("info", str(run))
    assert info.returncode == 0 and "lora" in info.stdout


def test_resume_equals_uninterrupted(tiny_config: Path, tmp_path: Path):
    from slimtune.app.loop import train

    cfg = load_config(tiny_config)
    full = train(cfg, tmp_path / "full", progress=False)
    stopped = train(
        load_config(tiny_config), tmp_path / "killed", stop_after_epoch=1, progress=False
    )
    assert stopped == {"stopped_after_epoch": 1}
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = train(
        load_config(tmp_path / "killed" / "config.yaml"),
        tmp_path / "killed",
        resume=True,
        progress=False,
    )
    for key in ("val", "test"):
        assert resumed[key] == full[key]
    a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "train_s"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    # every step's loss is saved; the resumed run's steps are the uninterrupted run's
    sa = [json.loads(r) for r in (tmp_path / "full" / "steps.jsonl").read_text().splitlines()]
    sb = [json.loads(r) for r in (tmp_path / "killed" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sa] == list(range(1, full_steps(tmp_path / "full") + 1))
    assert sa == sb
    assert all(0 <= r["epoch"] < len(a) and r["loss"] > 0 for r in sa)


def full_steps(run: Path) -> int:
    return int(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"])


def test_config_errors_name_the_key(tiny_config: Path):
    with pytest.raises(ConfigError, match=r"train\.lrr.*did you mean 'lr'"):
        load_config(tiny_config, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"train\.epochs must be int"):
        load_config(tiny_config, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*'model'"):
        load_config(tiny_config, ["modle=x"])
    with pytest.raises(ConfigError, match=r"methods\[0\]\.rank.*did you mean 'r'"):
        load_config(tiny_config, ["methods=[{name: lora, rank: 4}]"])
    with pytest.raises(ConfigError, match=r"warmup"):
        load_config(tiny_config, ["train.warmup=2"])
    r = _cli("train", "--config", str(tiny_config), "train.batchsize=3")
    assert r.returncode == 2 and "batch_size" in r.stderr


def test_two_process_run_agrees_and_only_rank0_writes(tiny_config: Path, tmp_path: Path):
    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "slimtune", "train", "--config", str(tiny_config), "--out", str(run), "--quiet", "train.epochs=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    outs = [json.loads(chunk) for chunk in _json_blocks(r.stdout)]
    assert len(outs) == 2, r.stdout
    assert outs[0]["val"] == outs[1]["val"] and outs[0]["test"] == outs[1]["test"]
    res = json.loads((run / "results.json").read_text())
    assert res["processes"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def _json_blocks(text: str) -> list[str]:
    blocks, cur, depth = [], [], 0
    for line in text.splitlines():
        if line.startswith("{") and depth == 0:
            cur = []
        if line.startswith("{") or cur:
            cur.append(line)
            depth += line.count("{") - line.count("}")
            if depth == 0 and cur:
                blocks.append("\n".join(cur))
                cur = []
    return blocks


def test_model_dropout_sets_every_dropout_module_and_is_validated():
    import torch

    from slimtune.app.build import build_model, set_dropout
    from slimtune.app.config import ConfigError, RunConfig

    model, _ = build_model("tiny-vit", 3, dropout=0.3)
    ps = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert ps and all(p == 0.3 for p in ps)
    model.train()
    x = torch.randn(2, 3, 28, 28)
    assert not torch.equal(model(pixel_values=x), model(pixel_values=x))
    assert set_dropout(model, 0.0) == len(ps)
    assert torch.equal(model(pixel_values=x), model(pixel_values=x))
    assert RunConfig(model_dropout=0).model_dropout == 0.0
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ConfigError, match="model_dropout"):
            RunConfig(model_dropout=bad)
    with pytest.raises(ValueError, match="dropout"):
        set_dropout(model, 1.5)


def test_train_help_explains_key_value_overrides():
    r = _cli("train", "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "KEY=VALUE" in r.stdout and "train.epochs=2" in r.stdout and "dotted" in r.stdout


def test_curves_are_titled_with_the_run_not_the_directory(tmp_path: Path):
    from slimtune.app.plots import plot_curves

    rows = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_exact_match": 0.2}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles: list[str] = []
    real = plt.Figure.suptitle

    def keep(self, text, *a, **k):  # records the title the real suptitle is given
        titles.append(text)
        return real(self, text, *a, **k)

    plt.Figure.suptitle = keep
    try:
        assert plot_curves(tmp_path, "lm-chat: lora on smollm2-135m / chat-qa") is not None
    finally:
        plt.Figure.suptitle = real
    assert titles == ["lm-chat: lora on smollm2-135m / chat-qa"]
    assert (tmp_path / "curves.png").stat().st_size > 0
