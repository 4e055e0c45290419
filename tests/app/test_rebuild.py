"""One rebuild for every run: ``slimtune eval|export|info`` on Light-PEFT, SPT, low-bit and wheat
runs (through the real command line), and what ``rebuild`` refuses."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_wheat_study
from typer.testing import CliRunner

from slimtune.app.cli import app
from slimtune.app.config import RunConfig
from slimtune.app.loop import train
from slimtune.app.rebuild import rebuild
from slimtune.errors import LoadError
from slimtune.passes.blocks import block_infos

DATA = {"image_size": 32, "n_train": 16, "n_val": 8, "n_test": 8}
TRAIN = {"epochs": 2, "batch_size": 8, "eval_batch_size": 16, "lr": 0.01, "seed": 2}


def _cli(*args: str) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def _eval_reproduces(run: Path, results: dict) -> None:
    out = _cli("eval", str(run))
    metrics = json.loads(out[out.index("{") :])
    assert metrics["accuracy"] == results["test"]["accuracy"]
    assert metrics["loss"] == pytest.approx(results["test"]["loss"], rel=1e-5)


def _runs() -> dict[str, RunConfig]:
    common = {"model": "tiny-vit", "task": "shapes-count", "data": DATA, "train": TRAIN}
    return {
        "light-peft": RunConfig(
            name="lp", pruning={"method": "light-peft", "early_steps": 2, "r": 4}, **common
        ),
        "spt": RunConfig(
            name="spt",
            allocation={"method": "spt", "budget": "2%", "batches": 2, "batch_size": 8},
            **common,
        ),
        "lowbit": RunConfig(
            name="lowbit",
            methods=[{"name": "lora", "r": 4, "targets": ["q", "v"], "bits": 1}],
            head_bits=1,
            **common,
        ),
    }


@pytest.mark.parametrize("kind", ["light-peft", "spt", "lowbit"])
def test_eval_export_info_work_on_every_kind_of_run(kind: str, tmp_path: Path) -> None:
    cfg = _runs()[kind]
    run = tmp_path / "run"
    with pytest.warns() if kind == "light-peft" else _nothing():
        results = train(cfg, run, progress=False)
    _eval_reproduces(run, results)
    info = _cli("info", str(run))
    assert f"run {run}: tiny-vit / shapes-count" in info and "total" in info
    merged = tmp_path / "merged"
    _cli("export", str(run), "--format", "merged", "--out", str(merged))
    assert (merged / "model.safetensors").stat().st_size > 0
    assert (merged / "pruned.json").is_file() == (kind == "light-peft")
    peft_dir = tmp_path / "peft"
    if kind == "lowbit":  # LoRA (1-bit: dequantized) and the head: peft's format holds them
        _cli("export", str(run), "--format", "peft", "--out", str(peft_dir))
        assert json.loads((peft_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    else:  # refused in one line: SPT's sparse deltas have no peft form; a pruned model's
        # LoRA would not fit the unpruned base peft applies it to
        res = CliRunner().invoke(
            app, ["export", str(run), "--format", "peft", "--out", str(peft_dir)]
        )
        text = " ".join(res.output.split())
        want = "no equivalent" if kind == "spt" else "this model is pruned"
        assert res.exit_code == 2 and want in text, text


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_light_peft_run_rebuilds_the_pruned_model_exactly(tmp_path: Path) -> None:
    cfg = _runs()["light-peft"]
    with pytest.warns(UserWarning):
        train(cfg, tmp_path / "run", progress=False)
    rebuilt = rebuild(tmp_path / "run")
    decision = json.loads((tmp_path / "run" / "pruned" / "decision.json").read_text())
    blocks = decision["report"]["blocks"]
    infos = block_infos(rebuilt.model)
    assert [b.num_heads for b in infos] == [b["heads"][1] for b in blocks]
    assert [b.ffn for b in infos] == [b["ffn"][1] for b in blocks]
    x = torch.randn(2, 3, 32, 32)
    again = rebuild(tmp_path / "run").model
    with torch.no_grad():
        assert torch.equal(rebuilt.model(pixel_values=x), again(pixel_values=x))


def test_a_changed_base_is_refused_unless_told(tmp_path: Path, monkeypatch) -> None:
    cfg = replace(_runs()["spt"], name="s")
    train(cfg, tmp_path / "run", progress=False)
    import slimtune.models.tiny as tiny

    real = tiny.TINY_MODELS["tiny-vit"]
    monkeypatch.setitem(tiny.TINY_MODELS, "tiny-vit", lambda n, seed=0: real(n, seed=seed + 1))
    with pytest.raises(LoadError, match="weights differ"):
        rebuild(tmp_path / "run")
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "run")])
    assert res.exit_code == 2 and "weights differ" in res.output


def test_rebuild_refuses_what_is_not_a_finished_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        rebuild(tmp_path)
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    res = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert res.exit_code == 2 and "not valid YAML" in res.output
    (tmp_path / "config.yaml").write_text("model: tiny-vit\n")
    with pytest.raises(FileNotFoundError, match="no saved adapter"):
        rebuild(tmp_path)


def test_wheat_run_rebuilds_through_its_study(tmp_path: Path) -> None:
    from studies.wheat import CONFIGS
    from studies.wheat.segment import SegTrainConfig
    from studies.wheat.study import PretrainConfig, adapt, load_wheat_config, pretrain

    study = tiny_wheat_study()
    pcfg = PretrainConfig(model="tiny", train=SegTrainConfig(epochs=1, batch_size=4))
    path, _ = pretrain(study, pcfg, root=tmp_path, progress=False)
    cfg = replace(load_wheat_config(CONFIGS / "lora.yaml"), model="tiny")
    cfg = replace(cfg, train=replace(cfg.train, epochs=1, batch_size=2))
    run = tmp_path / "run"
    res = adapt(cfg, path, study=study, root=tmp_path, out=run, maps=0, progress=False)
    out = _cli("eval", str(run), "--split", "cross_area")
    metrics = json.loads(out[out.index("{") :])
    assert metrics["f1"] == pytest.approx(res["test"]["cross_area"]["f1"], abs=1e-12)
    assert "wheat run" in _cli("info", str(run))
    res2 = CliRunner().invoke(app, ["eval", str(run), "--split", "nope"])
    assert res2.exit_code == 2 and "cross_year" in res2.output


@pytest.mark.parametrize(
    ("kind", "bits"), [("lora", 4), ("spt", 4), ("light-peft", 4), ("light-peft", 8)]
)
def test_runs_on_a_quantized_base_train_and_rebuild_exactly(
    kind: str, bits: int, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    from slimtune.qbase import BaseQuant, base_quant

    runs = _runs()
    base = runs["lowbit"] if kind == "lora" else runs[kind]
    methods = [{"name": "lora", "r": 4, "targets": ["q", "v"]}] if kind == "lora" else base.methods
    cfg = replace(base, name=f"q-{kind}", methods=methods, head_bits=32, base_bits=bits)
    run = tmp_path / "run"
    with pytest.warns() if kind == "light-peft" else _nothing():
        results = train(cfg, run, progress=False)
    manifest = json.loads((run / "adapter" / "slimtune.json").read_text())
    assert manifest["base"]["quant"]["bits"] == bits
    rebuilt = rebuild(run)
    assert base_quant(rebuilt.model) == BaseQuant.of(bits)
    _eval_reproduces(run, results)
    # the merged export holds float weights only (dequantized + folded), with the class names
    from safetensors.torch import load_file

    _cli("export", str(run), "--format", "merged", "--out", str(tmp_path / "merged"))
    files = sorted((tmp_path / "merged").glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(str(f)).items()}
    assert tensors and all(t.is_floating_point() for t in tensors.values())


def test_merged_exports_name_the_classes_in_the_hf_config() -> None:
    from types import SimpleNamespace

    from tiny_models import tiny_bert

    from slimtune.app.runs import _label_names

    cfg = _runs()["lowbit"]  # shapes-count: classes named by the task
    model = tiny_bert()
    _label_names(model, SimpleNamespace(config=cfg, info={"kind": "image"}))
    names = list(model.config.id2label.values())
    assert len(names) >= 2 and all(not n.startswith("LABEL_") for n in names)
    assert model.config.label2id == {n: i for i, n in enumerate(names)}
