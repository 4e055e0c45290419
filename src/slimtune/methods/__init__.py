"""PEFT methods: each a configuration dataclass plus the layer that applies it."""

from .adapter import Adapter, AdapterLayer, Tap
from .base import MethodConfig, Wrapper, unwrap
from .head import Head, QuantizedHead
from .lora import LoRA, LoRALinear
from .lora_conv import LoRAConv2d
from .params import BitFit, Full
from .prompt import Prompt, PromptedBlock
from .registry import (
    METHODS,
    MethodSpec,
    build_method,
    config_methods,
    method_spec,
    register_method,
)
from .sparse import Sparse, SparseLayer

__all__ = [
    "Adapter",
    "AdapterLayer",
    "BitFit",
    "Full",
    "Head",
    "LoRA",
    "LoRAConv2d",
    "LoRALinear",
    "MethodConfig",
    "Prompt",
    "PromptedBlock",
    "QuantizedHead",
    "METHODS",
    "MethodSpec",
    "build_method",
    "config_methods",
    "method_spec",
    "register_method",
    "Sparse",
    "SparseLayer",
    "Tap",
    "Wrapper",
    "unwrap",
]
