"""A quantized frozen base (QLoRA-style): 4-bit or 8-bit linears under slimtune's methods."""

from .layers import Int8Embedding, dequantized_weight, is_quantized, logical_shape
from .model import base_quant, base_tensors, dequantize_base, quantize_base, weights_bytes
from .spec import KINDS, BaseQuant

__all__ = [
    "KINDS",
    "BaseQuant",
    "Int8Embedding",
    "base_quant",
    "base_tensors",
    "dequantize_base",
    "dequantized_weight",
    "is_quantized",
    "logical_shape",
    "quantize_base",
    "weights_bytes",
]
