"""PEFT methods: each a configuration dataclass plus the layer that applies it."""

from .adapter import Adapter, AdapterLayer, Tap
from .base import REGISTRY, MethodConfig, Wrapper, unwrap
from .head import Head, QuantizedHead
from .lora import LoRA, LoRALinear
from .lora_conv import LoRAConv2d
from .params import BitFit, Full
from .prompt import Prompt, PromptedBlock
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
    "REGISTRY",
    "Sparse",
    "SparseLayer",
    "Tap",
    "Wrapper",
    "unwrap",
]
