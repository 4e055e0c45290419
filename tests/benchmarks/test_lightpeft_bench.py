"""The Light-PEFT benchmark, its seeds and timing scripts and its command line, on tiny runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import tiny_bert
from tiny_runs import tiny_lightpeft_run

import slimtune


def test_bench_speed_summary_and_timing_threads_option(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from benchmarks.lightpeft import BATCH, _speed_summary
    from slimtune.app.cli import app

    train = {"lora-qv": [3.0, 2.0, 4.0], "lora-all": [4.0], "light-peft": [1.0, 2.0, 1.5]}
    infer = {"lora-qv": [1.0], "lora-all": [1.0], "light-peft": [0.5]}
    nodrop = {"lora-qv": [2.0], "light-peft": [1.0]}
    s = _speed_summary(
        {"train": train, "infer": infer, "infer_unmerged": infer, "train_no_dropout": nodrop}
    )
    assert s["train_speedup_without_dropout"] == 2.0
    assert s["train_samples_per_s"]["lora-qv"] == round(BATCH / 3.0, 2)  # the median step
    assert s["train_speedup"] == 2.0 and s["infer_speedup"] == 2.0
    # per-round ratios 3, 1, 2.67: median 2.67 (not the ratio of medians), open from 1 to 3
    ci = s["speedup_ci"]["train"]
    assert ci == {"median": 2.667, "low": 1.0, "high": 3.0, "coverage": 0.75, "rounds": 3}
    assert s["speedup_ci"]["infer"]["median"] == 2.0
    for bad in ("two", "0", "2,-1"):
        res = CliRunner().invoke(app, ["bench", "lightpeft", "--quick", "--timing-threads", bad])
        assert res.exit_code == 2, res.output
    bad_options = (
        ("--head-ratio", "1.0"),
        ("--ffn-ratio", "-0.1"),
        ("--rank-ratio", "x"),
        ("--early-steps", "1.5"),
        ("--early-steps", "many"),
        ("--rescore-steps", "-1"),
        ("--rescore-steps", "many"),
        ("--backbone-score", "magnitude"),
        ("--timing-steps", "0"),
    )
    for opt, bad in bad_options:
        res = CliRunner().invoke(app, ["bench", "lightpeft", "--quick", opt, bad])
        assert res.exit_code != 0 and opt[2:].split("-")[0] in res.output, res.output
    # the pruning options reach the bench
    import benchmarks.lightpeft as bench

    seen: dict[str, object] = {}
    monkeypatch.setattr(bench, "run", lambda **kw: seen.update(kw))
    given = ["--head-ratio", "0.5", "--early-steps", "60", "--rescore-steps", "0.1"]
    given += ["--backbone-score", "taylor", "--compensate"]
    res = CliRunner().invoke(app, ["bench", "lightpeft", *given])
    assert res.exit_code == 0, res.output
    assert seen["pruning"] == {
        "head_ratio": 0.5,
        "early_steps": 60,
        "rescore_steps": 0.1,
        "backbone_score": "taylor",
        "compensate": True,
    }
    # the argparse front end (python -m benchmarks.lightpeft, the seeds script) agrees
    import argparse

    from benchmarks.lightpeft import add_pruning_options, pruning_overrides

    ap = argparse.ArgumentParser()
    add_pruning_options(ap)
    assert pruning_overrides(ap.parse_args(given)) == seen["pruning"]
    assert pruning_overrides(ap.parse_args([])) == {}
    monkeypatch.undo()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "old.txt").write_text("x")
    for where in (tmp_path / "runs", tmp_path / "runs" / "old.txt"):  # used, or a file
        res = CliRunner().invoke(app, ["bench", "lightpeft", "--quick", "--keep", str(where)])
        assert res.exit_code == 2 and "--keep" in res.output, res.output


def test_bench_pruning_ratios_reach_only_the_light_peft_run():
    from benchmarks.lightpeft import parse_early_steps, run_configs

    ratios = {"head_ratio": 0.4, "ffn_ratio": 0.45}
    configs = run_configs("tiny-vit", "digits", True, {"method": "light-peft", **ratios})
    assert configs["light-peft"].pruning is not None
    assert {k: getattr(configs["light-peft"].pruning, k) for k in ratios} == ratios
    assert configs["lora-qv"].pruning is None and configs["lora-all"].pruning is None
    assert all(c.fast_dropout for c in configs.values())
    assert parse_early_steps("50") == 50 and parse_early_steps("0.35") == 0.35
    # the options the bench and benchmarks/lightpeft_seeds.py share
    import argparse

    from benchmarks.lightpeft import add_pruning_options, pruning_overrides

    ap = argparse.ArgumentParser()
    add_pruning_options(ap)
    assert pruning_overrides(ap.parse_args([])) == {}
    given = ap.parse_args(["--ffn-ratio", "0.45", "--module-ratio", "0", "--early-steps", "50"])
    assert pruning_overrides(given) == {"ffn_ratio": 0.45, "module_ratio": 0.0, "early_steps": 50}
    scored = ap.parse_args(["--backbone-score", "taylor", "--rescore-steps", "0.1"])
    assert pruning_overrides(scored) == {"backbone_score": "taylor", "rescore_steps": 0.1}
    with pytest.raises(SystemExit):
        ap.parse_args(["--backbone-score", "magnitude"])
    plain = run_configs("tiny-vit", "digits", True, {"method": "light-peft"}, fast_dropout=False)
    assert not any(c.fast_dropout for c in plain.values())


def _benchmark_script(name: str) -> Any:
    """The module ``benchmarks.<name>`` (the repository's benchmarks package)."""
    import importlib

    return importlib.import_module(f"benchmarks.{name}")


def test_seeds_script_takes_baseline_runs_from_other_files(tmp_path: Path):
    seeds = _benchmark_script("lightpeft_seeds")
    setup = {"model": "tiny-vit", "task": "digits", "quick": True, "pruning": {}}
    runs = [
        {"method": "lora-qv", "seed": 0, "test": 0.5, "val": 0.5},
        {"method": "lora-qv", "seed": 1, "test": 0.7, "val": 0.6, "source": "bench.json"},
        {"method": "lora-qv", "seed": 2, "test": 0.9, "val": 0.9},
        {"method": "light-peft", "seed": 0, "test": 0.1, "val": 0.1},
    ]
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"setup": setup, "runs": runs}))
    out = tmp_path / "out.json"
    common = ["--model", "tiny-vit", "--task", "digits", "--quick", "--methods", "lora-qv"]
    # every requested run is in the baseline file: nothing is trained
    assert (
        seeds.main([*common, "--seeds", "0", "1", "--baseline", str(base), "--out", str(out)]) == 0
    )
    doc = json.loads(out.read_text())
    assert [(r["seed"], r["test"], r["source"]) for r in doc["runs"]] == [
        (0, 0.5, "base.json"),
        (1, 0.7, "bench.json"),
    ]
    assert doc["summary"]["mean_test"] == {"lora-qv": 0.6}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"setup": {**setup, "model": "tiny-bert"}, "runs": runs}))
    with pytest.raises(SystemExit):
        seeds.main([*common, "--seeds", "0", "--baseline", str(other), "--out", str(out)])


def test_cpu_steal_counters():
    from benchmarks.common import cpu_counters, steal_fraction

    assert steal_fraction(None) is None
    now = cpu_counters()
    if now is None:  # no /proc/stat here
        return
    steal, total = now
    assert 0 <= steal <= total
    sum(i * i for i in range(200_000))  # some CPU time passes
    f = steal_fraction(now)
    assert f is None or 0.0 <= f <= 1.0


def test_bench_timing_runs_every_step_kind_on_tiny_models():
    from benchmarks.lightpeft import BATCH, SIX, _speed_summary, _time

    models = {
        m: slimtune.apply(tiny_bert(2), slimtune.LoRA(r=2, targets=t, dropout=0.1))
        for m, t in (("lora-qv", ("q", "v")), ("lora-all", SIX), ("light-peft", ("o",)))
    }
    before = {
        m: [p.clone() for p in mod.parameters() if p.requires_grad] for m, mod in models.items()
    }
    ids = torch.randint(0, 50, (BATCH, 16))  # the tiny model: 50 tokens, 32 positions
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    steal: dict[str, float | None] = {}
    times = _time(models, dict.fromkeys(models, batch), 0, 2, "test", steal)
    assert set(steal) == {"train, test", "inference, test"}
    for f in steal.values():  # a fraction of CPU time where /proc/stat exists
        assert f is None or 0.0 <= f <= 1.0
    assert set(times) == {"train", "infer", "infer_unmerged", "train_no_dropout"}
    assert set(times["train_no_dropout"]) == {"lora-qv", "light-peft"}
    assert all(len(v) == 2 and min(v) > 0 for d in times.values() for v in d.values())
    for m, mod in models.items():  # training steps really updated the trainable tensors
        after = [p for p in mod.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(before[m], after, strict=True))
    assert _speed_summary(times)["train_speedup"] > 0


def test_bench_keeps_the_trained_runs_only_when_asked(tmp_path: Path, monkeypatch):
    import benchmarks.lightpeft as lp

    seen: list[tuple[Path, tuple[int, int]]] = []

    def fake_compare(model, task, quick, work, settings, timing, *rest):
        (work / "light-peft").mkdir(parents=True)
        (work / "light-peft" / "config.yaml").write_text("name: light-peft\n")
        seen.append((work, timing))
        return {}

    monkeypatch.setattr(lp, "compare", fake_compare)
    res = lp.run(quick=True, out=str(tmp_path / "a.json"), timing_steps=12)
    assert seen[0][1] == (1, 12) and res["runs_kept_in"] is None
    assert not seen[0][0].exists()  # the temporary directory is gone
    keep = tmp_path / "kept"
    res = lp.run(quick=True, out=str(tmp_path / "b.json"), keep=keep)
    assert seen[1] == (keep / "minilm", (1, 5)) and res["runs_kept_in"] == str(keep)
    assert (keep / "minilm" / "light-peft" / "config.yaml").is_file()
    assert json.loads((tmp_path / "b.json").read_text())["runs_kept_in"] == str(keep)


def test_bench_full_mode_saves_the_first_model_before_the_second(tmp_path: Path, monkeypatch):
    import benchmarks.lightpeft as lp

    out = tmp_path / "full.json"

    def fake_compare(model, task, quick, work, settings, timing, *rest):
        if model == "dinov2-s":  # the first model's figures are on disk by now
            saved = json.loads(out.read_text())
            assert saved["acc"] == {"lora-qv": 0.5} and "partial" in saved
            raise RuntimeError("second model failed")
        assert timing == (3, 20) and settings["early_steps"] == 0.2
        return {"acc": {"lora-qv": 0.5}}

    monkeypatch.setattr(lp, "compare", fake_compare)
    with pytest.raises(RuntimeError, match="second model failed"):
        lp.run(quick=False, out=str(out))
    assert json.loads(out.read_text())["acc"] == {"lora-qv": 0.5}


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize(
    ("model", "task"), [("minilm", "amazon-reviews"), ("dinov2-s", "fashion-mnist")]
)
def test_bench_data_sizes_fit_the_task(quick, model, task):
    """Every split size the bench asks for exists (the full mode once asked for 4500 of 4000)."""
    from benchmarks.lightpeft import run_configs
    from slimtune.app.build import load_data
    from slimtune.app.data.base import DataSourceError

    cfg = run_configs(model, task, quick, {"method": "light-peft"})["lora-qv"]
    d = cfg.data
    try:  # as the run loads it (no model info: text tasks take MiniLM's tokenizer)
        data = load_data(cfg, {})
    except DataSourceError as exc:  # `make setup` was not run on this machine
        pytest.skip(str(exc))
    assert (len(data.train), len(data.val)) == (d.n_train, d.n_val)
    assert len(data.test) == d.n_test


def test_timing_script_times_kept_runs_against_the_base_run(tmp_path: Path):
    import dataclasses

    from slimtune.app.loop import train

    timing = _benchmark_script("lightpeft_timing")
    pruned_cfg = tiny_lightpeft_run(epochs=1)
    base_cfg = dataclasses.replace(
        pruned_cfg, name="base", pruning=None, methods=[{"name": "lora", "r": 4}]
    )
    with pytest.warns(UserWarning, match="early phase"):
        train(pruned_cfg, tmp_path / "lp", progress=False)
    train(base_cfg, tmp_path / "qv", progress=False)
    out = tmp_path / "t.json"
    args = ["--base", str(tmp_path / "qv"), "--pruned", f"lp={tmp_path / 'lp'}"]
    assert timing.main([*args, "--rounds", "3", "--warmup", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    kinds = ("train", "train_no_dropout", "infer", "infer_unmerged")
    for kind in kinds:
        sps = doc["samples_per_s"][kind]
        assert set(sps) == {"base", "lp"} and all(v > 0 for v in sps.values())
        assert len(doc["step_times_s"][kind]["lp"]) == 3
        assert doc["speedup"]["lp"][kind] == pytest.approx(sps["lp"] / sps["base"], abs=2e-3)
        assert doc["paired"]["lp"][kind]["rounds"] == 3
    # the pruned backbone was rebuilt from its saved files: smaller than the base run's
    assert doc["sizes"]["lp"]["base"] < doc["sizes"]["base"]["base"]
    for bad in (
        ["--pruned", "lp"],
        ["--pruned", f"base={tmp_path / 'lp'}"],
        ["--pruned", "x=/nope"],
    ):
        with pytest.raises(SystemExit):
            timing.main(["--base", str(tmp_path / "qv"), *bad])
