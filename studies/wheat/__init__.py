"""Winter-wheat mapping with TSViT: pre-train on a source area, adapt with PEFT, test in-domain,
cross-year and cross-area (see ``docs/wheat.md``).

=================  ============================================================================
``study``          the study: splits, pre-training, adaptation, maps, ``rebuild(run_dir)``
``segment``        segmentation on the application's loop (hooks: loss, scores, selection)
``segmetrics``     F1, IoU, precision, recall of the positive class
``s2``             Sentinel-2 tiles (``.npz``/GeoTIFF), band statistics, flips
``s2synth``        the seeded synthetic tile generator (``slimtune data s2-synth``)
``configs/``       one YAML file per adaptation run
=================  ============================================================================

Command line: ``python -m studies.wheat pretrain|adapt ...``.
"""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
"""The study's run configs (one per PEFT method)."""


def rebuild(run: str | Path, *, check_base: bool = True) -> object:
    """Rebuild a wheat adaptation run directory (:func:`studies.wheat.study.rebuild`)."""
    from .study import rebuild as _rebuild

    return _rebuild(run, check_base=check_base)
