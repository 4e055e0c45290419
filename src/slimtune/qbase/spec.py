"""What a quantized frozen base is: :class:`BaseQuant` (kind, bits, block size), saved with
every adapter trained on it so that ``load`` can refuse a base quantized differently.

Kinds (all through bitsandbytes, the default backend; see ``docs/qbase.md`` for the side by side
measurement of bitsandbytes, torchao, optimum-quanto and hqq that chose it):

- ``nf4``: 4-bit NormalFloat, one absmax per ``block_size`` weights (QLoRA's data type);
  ``double_quant`` quantizes those absmax values again (8 bits, blocks of 256).
- ``fp4``: 4-bit float, same blocking.
- ``int8``: 8 bits per weight, one absmax per output row (LLM.int8() without outliers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import PlanError

__all__ = ["BaseQuant", "KINDS"]

KINDS: dict[str, int] = {"nf4": 4, "fp4": 4, "int8": 8}
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class BaseQuant:
    """How the frozen linears of a base model are quantized."""

    kind: str = "nf4"
    """``nf4`` | ``fp4`` (4 bits) or ``int8`` (8 bits)."""
    block_size: int = 64
    """Weights per absmax for the 4-bit kinds (bitsandbytes' blocksize); 0 for int8 (per row)."""
    double_quant: bool = True
    """4-bit kinds: quantize the absmax values too (QLoRA's double quantization)."""
    embeddings: bool = False
    """Also store the input embedding table as int8 rows (an option beyond QLoRA, which keeps
    it in full precision; the table is a large share of a small decoder's weights)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PlanError(
                f"base quantization kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}"
            )
        if self.kind == "int8":
            if self.block_size not in (0, 64):  # 64: the untouched default
                raise PlanError("int8 base quantization has one scale per row: leave block_size")
            object.__setattr__(self, "block_size", 0)
            object.__setattr__(self, "double_quant", False)
        elif self.block_size not in BLOCK_SIZES:
            raise PlanError(
                f"block_size {self.block_size} is not supported; use one of {BLOCK_SIZES}"
            )

    @property
    def bits(self) -> int:
        """4 or 8."""
        return KINDS[self.kind]

    @classmethod
    def of(cls, bits: int, kind: str | None = None, **kw: Any) -> BaseQuant:
        """From ``bits`` (4 -> nf4, 8 -> int8) and an optional ``kind`` that must agree."""
        if bits not in (4, 8):
            raise PlanError(f"base_bits must be 4 or 8, got {bits!r}")
        kind = kind or ("nf4" if bits == 4 else "int8")
        if kind not in KINDS:
            raise PlanError(
                f"base quantization kind {kind!r} is unknown; use one of {', '.join(KINDS)}"
            )
        if KINDS[kind] != bits:
            raise PlanError(f"base kind {kind!r} has {KINDS[kind]} bits, not base_bits={bits}")
        return cls(kind=kind, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseQuant:
        keys = {"kind", "block_size", "double_quant", "embeddings"}
        return cls(**{k: v for k, v in d.items() if k in keys})

    def describe(self) -> str:
        if self.kind == "int8":
            text = "int8 (8-bit, one scale per row)"
        else:
            dq = ", double-quantized scales" if self.double_quant else ""
            text = f"{self.kind} ({self.bits}-bit, blocks of {self.block_size}{dq})"
        return text + (", int8 embeddings" if self.embeddings else "")
