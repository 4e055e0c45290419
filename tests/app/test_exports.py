"""Exports open whole in other tools: a classification run on a Hugging Face folder exported
as peft LoRA loads with ``AutoPeftModelForSequenceClassification``, merged with the Auto
classes; both with their tokenizer and label names, both reproducing the run's test accuracy."""

from __future__ import annotations

import json

import pytest
from tiny_text import tiny_llama, tiny_tokenizer

from slimtune.app.config import RunConfig
from slimtune.app.loop import train
from slimtune.app.rebuild import rebuild
from slimtune.app.runs import export_run


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory: pytest.TempPathFactory):
    from slimtune.app.data.decoder import vader_sdist

    try:
        vader_sdist()
    except Exception as exc:  # the data source is not installed here
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("export")
    folder = root / "tiny-llama"
    tok = tiny_tokenizer()
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = RunConfig(
        name="cls",
        model=str(folder),
        task="movie-sentiment",
        methods=[{"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}],
        data={"n_train": 32, "n_val": 8, "n_test": 24, "max_length": 48},
        train={"epochs": 1, "batch_size": 8, "eval_batch_size": 8, "lr": 5e-3},
        fast_dropout=False,
    )
    res = train(cfg, root / "run", progress=False)
    return root / "run", res, folder


def test_peft_export_opens_with_auto_peft_and_reproduces_the_run(cls_run, tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    run, res, folder = cls_run
    out = export_run(run, "peft", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert config["base_model_name_or_path"] == str(folder)  # the base as the run named it
    assert AutoTokenizer.from_pretrained(out).pad_token == "<pad>"  # the tokenizer travels
    model = AutoPeftModelForSequenceClassification.from_pretrained(out).eval()
    scored = rebuild(run).score(model, "test")
    assert scored["accuracy"] == res["test"]["accuracy"]


def test_merged_export_opens_with_auto_classes_and_reproduces_the_run(cls_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, res, _ = cls_run
    out = export_run(run, "merged", tmp_path / "merged")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.id2label == {0: "negative", 1: "positive"}
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) > 100 and tok("a gorgeous film")["input_ids"][0] == tok.bos_token_id
    scored = rebuild(run).score(model, "test")
    assert scored["accuracy"] == res["test"]["accuracy"]
