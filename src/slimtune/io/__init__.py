"""slimtune's files, one module per job.

==============  ==============================================================================
``files``       atomic writes (temporary file + rename): every file slimtune writes
``adapter``     :func:`save` / :func:`load` of adapters, :func:`storage_report`
``manifest``    the format-3 manifest: tensor groups, descriptions, reading and checking
``legacy``      adapters of format versions 1 and 2
``pruned``      pruned backbones (:func:`save_pruned` / :func:`load_pruned`)
``plans``       plans alone (:func:`save_plan` / :func:`load_plan`)
``peft``        Hugging Face peft LoRA folders into slimtune (:func:`import_peft`)
==============  ==============================================================================
"""

from .adapter import load, save, storage_report
from .files import atomic_write, atomic_write_text
from .manifest import MANIFEST, WEIGHTS, tensor_descriptions
from .peft import import_peft
from .plans import load_plan, save_plan
from .pruned import base_state_dict, load_pruned, save_pruned

__all__ = [
    "MANIFEST",
    "WEIGHTS",
    "atomic_write",
    "atomic_write_text",
    "base_state_dict",
    "import_peft",
    "load",
    "load_plan",
    "load_pruned",
    "save",
    "save_plan",
    "save_pruned",
    "storage_report",
    "tensor_descriptions",
]
