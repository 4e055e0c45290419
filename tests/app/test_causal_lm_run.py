"""Causal-LM runs through the application: ``objective: causal-lm`` trains a decoder on a
task's prompt/response pairs (loss on the responses), evaluates by exact match or label-word
likelihood, saves an adapter that ``slimtune eval`` reproduces; SPT and Light-PEFT run on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_text import tiny_llama, tiny_tokenizer

from slimtune.app.config import ConfigError, RunConfig
from slimtune.app.loop import train
from slimtune.app.rebuild import rebuild


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama causal LM with its tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer()
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _config(folder: Path, task: str, **extra: object) -> RunConfig:
    base: dict = {
        "name": f"lm-{task}",
        "objective": "causal-lm",
        "model": str(folder),
        "task": task,
        "methods": [{"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v", "fc2"]}],
        "data": {"n_train": 24, "n_val": 8, "n_test": 8, "max_length": 48},
        "train": {"epochs": 2, "batch_size": 8, "eval_batch_size": 8, "lr": 5e-3},
        "fast_dropout": False,
    }
    base.update(extra)
    if "allocation" in extra:  # the allocation decides the methods
        base.pop("methods")
    return RunConfig(**base)


def _chat_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("chatterbot_corpus") is not None


@pytest.mark.skipif(not _chat_available(), reason="chatterbot-corpus is not installed")
def test_chat_qa_run_trains_on_responses_and_eval_reproduces_it(lm_folder, tmp_path):
    cfg = _config(lm_folder, "chat-qa")
    res = train(cfg, tmp_path / "run", progress=False)
    assert res["objective"] == "causal-lm" and res["metric"] == "exact_match"
    assert 0.0 <= res["test"]["accuracy"] <= 1.0 and res["test"]["loss"] > 0
    assert res["by_method"]["lora"] > 0 and "head" not in res["by_method"]  # no head on a LM
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train_loss"] for line in lines]
    assert losses[-1] < losses[0]  # it learns the responses
    again = rebuild(tmp_path / "run").evaluate("test")
    assert again["exact_match"] == res["test"]["accuracy"]
    assert again["loss"] == pytest.approx(res["test"]["loss"], rel=1e-5)


def test_movie_sentiment_by_label_word_likelihood_with_spt(lm_folder, tmp_path):
    from slimtune.app.data.decoder import vader_sdist

    try:
        vader_sdist()
    except Exception as exc:  # the data source is not installed here
        pytest.skip(str(exc))
    cfg = _config(
        lm_folder,
        "movie-sentiment",
        allocation={"method": "spt", "budget": 2000, "r": 2, "batches": 2, "batch_size": 8},
    )
    res = train(cfg, tmp_path / "spt", progress=False)
    assert res["metric"] == "accuracy" and res["method"] == "spt-lora"
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    assert res["trainable_params"] == pytest.approx(2000, rel=0.05)
    again = rebuild(tmp_path / "spt").evaluate("test")
    assert again["accuracy"] == res["test"]["accuracy"]


@pytest.mark.skipif(not _chat_available(), reason="chatterbot-corpus is not installed")
def test_light_peft_on_a_causal_lm_prunes_and_reloads(lm_folder, tmp_path):
    cfg = _config(
        lm_folder,
        "chat-qa",
        methods=[{"name": "lora"}],
        pruning={"method": "light-peft", "early_steps": 2, "r": 4, "ffn_ratio": 0.5},
    )
    res = train(cfg, tmp_path / "lp", progress=False)
    assert res["pruning"]["pruned_fraction"] > 0.2
    rebuilt = rebuild(tmp_path / "lp")
    assert rebuilt.evaluate("test")["exact_match"] == res["test"]["accuracy"]
    heads = [m.self_attn.o_proj for m in rebuilt.model.model.layers]
    assert all(torch.is_tensor(h.weight) for h in heads)


def test_objective_is_checked():
    with pytest.raises(ConfigError, match="objective must be one of classify, causal-lm"):
        RunConfig(objective="lm")


def test_eval_refuses_a_base_folder_rewritten_with_other_weights(lm_folder, tmp_path):
    """``slimtune eval|export|info`` check the base against the run's fingerprint (every value);
    ``--no-base-check`` is the explicit way past it."""
    import shutil

    from typer.testing import CliRunner

    from slimtune.app.cli import app
    from slimtune.app.data.decoder import vader_sdist

    try:
        vader_sdist()
    except Exception as exc:  # the data source is not installed here
        pytest.skip(str(exc))
    folder = tmp_path / "base"
    shutil.copytree(lm_folder, folder)
    cfg = _config(folder, "movie-sentiment", train={"epochs": 1, "batch_size": 8, "lr": 5e-3})
    train(cfg, tmp_path / "run", progress=False)
    runner = CliRunner()
    assert runner.invoke(app, ["eval", str(tmp_path / "run")]).exit_code == 0
    tok = tiny_tokenizer()
    tiny_llama(tok, seed=1).save_pretrained(folder)  # same architecture, other weights
    for cmd in (["eval"], ["info"], ["export", "--out", str(tmp_path / "x")]):
        out = runner.invoke(app, [*cmd, str(tmp_path / "run")])
        text = " ".join(out.output.split())
        assert out.exit_code == 2 and "weights differ from the ones" in text, (cmd, text)
    out = runner.invoke(app, ["eval", str(tmp_path / "run"), "--no-base-check"])
    assert out.exit_code == 0, out.output
