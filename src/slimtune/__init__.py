"""slimtune: parameter-efficient fine-tuning that decides where to tune, what to prune and how
few bits to keep.

>>> import slimtune
>>> from slimtune import LoRA, BitFit
>>> model = slimtune.apply(model, [LoRA(r=8, alpha=16, targets=["q", "v"]), BitFit()])
>>> print(slimtune.summary(model))
>>> slimtune.save(model, "run/adapter")
"""

from .core import apply, apply_plan, get_state, merge, remove, summary, unmerge
from .errors import ExportError, LoadError, PlanError, SlimtuneError, TargetError
from .export import export_peft, merged_state_dict
from .families import FAMILIES, Family, detect_family, register_family
from .io import import_peft, load, save, storage_report
from .methods import Adapter, BitFit, Full, Head, LoRA, Prompt, Sparse
from .plan import Plan, PlanEntry
from .qbase import BaseQuant, base_quant, dequantize_base, quantize_base

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "BaseQuant",
    "BitFit",
    "ExportError",
    "FAMILIES",
    "Family",
    "Full",
    "Head",
    "LoadError",
    "LoRA",
    "Plan",
    "PlanEntry",
    "PlanError",
    "Prompt",
    "SlimtuneError",
    "Sparse",
    "TargetError",
    "apply",
    "apply_plan",
    "base_quant",
    "dequantize_base",
    "detect_family",
    "export_peft",
    "get_state",
    "import_peft",
    "load",
    "merge",
    "merged_state_dict",
    "quantize_base",
    "register_family",
    "remove",
    "save",
    "storage_report",
    "summary",
    "unmerge",
]
