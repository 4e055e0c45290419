"""One way to rebuild a run directory: the backbone as trained (pruned, compensated), the head
and the methods, with the saved tensors restored exactly.

``slimtune eval``, ``export``, ``info``, a resumed Light-PEFT run and the benchmarks all go
through :func:`rebuild` (and :func:`attach` for a model already built):

    config.yaml --build--> original base --adapter/ (a task file when pruned: kept heads and
                neurons replayed, slimtune.io.task)--> methods and head restored (fingerprints
                of the original and of the pruned base checked)

(Runs written before task files have ``pruned/backbone``, loaded first.)

A run written by ``slimtune train`` is rebuilt here. A study's run (``config.yaml`` with
``study: NAME``) is rebuilt by that study's own ``rebuild(run_dir, check_base=...)``, found in the
repository's ``studies/`` package (:mod:`slimtune.app.plugins`); it returns the same
:class:`Rebuilt`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..io import load, load_pruned, tensor_descriptions
from .config import ConfigError, RunConfig, load_config

__all__ = ["Rebuilt", "attach", "read_run_config", "rebuild"]

ADAPTER = "adapter"
"""A run directory's final adapter."""
PRUNED = Path("pruned") / "backbone"
"""A Light-PEFT run directory's pruned backbone."""


@dataclass
class Rebuilt:
    """A run's model as trained, and how to score it.

    Attributes:
        model: the rebuilt model (methods applied, tensors restored, in eval mode).
        config: the run's configuration (a :class:`RunConfig` or the study's own).
        title: one line naming the run (``run DIR: model / task``).
        splits: the split names :meth:`evaluate` accepts.
        score: ``(model, split) -> metrics``; loads the split's data on first use.
        info: what export needs to know of the base (``kind``, ``tokenizer``, ...).
    """

    model: nn.Module
    config: Any
    title: str
    splits: tuple[str, ...]
    score: Callable[[nn.Module, str], dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, split: str) -> dict[str, Any]:
        """Metrics of the model on ``split`` (one of :attr:`splits`)."""
        if split not in self.splits:
            raise ConfigError(f"unknown split {split!r}; this run has {', '.join(self.splits)}")
        return self.score(self.model, split)


def attach(
    model: nn.Module,
    adapter: str | Path,
    *,
    backbone: str | Path | None = None,
    check_base: bool = True,
) -> nn.Module:
    """Bring a freshly built base model to a trained state: shrink it to the pruned
    ``backbone`` when one is given (:func:`slimtune.io.load_pruned`), then load ``adapter``
    (:func:`slimtune.load`, the base checked against the adapter's fingerprint)."""
    if backbone is not None:
        load_pruned(model, backbone)
    return load(model, adapter, check_base=check_base)


def read_run_config(run: str | Path) -> dict[str, Any]:
    """A run directory's ``config.yaml`` as a mapping (errors name the file)."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: not a run directory (no config.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a YAML mapping, got {type(data).__name__}")
    return data


def head_classes(adapter: str | Path, default: int = 2) -> int:
    """Number of classes of a saved adapter's task head (its last linear's output rows)."""
    rows = [
        int(info["shape"][0])
        for name, info in tensor_descriptions(adapter).items()
        if info.get("method") == "head" and name.endswith(".weight") and info.get("shape")
    ]
    return rows[-1] if rows else default


def rebuild(run: str | Path, *, check_base: bool = True) -> Rebuilt:
    """Rebuild the model of a finished run directory (see the module docstring).

    Args:
        run: a directory written by ``slimtune train`` (or by a study).
        check_base: refuse a base whose weights differ from the ones the run was trained on
            (``False`` only to inspect a run whose base has changed on purpose).

    Raises:
        FileNotFoundError: not a run directory, or the run has no saved adapter.
        ConfigError: an unreadable ``config.yaml``.
        LoadError: the saved files do not fit the rebuilt base.
    """
    run = Path(run)
    raw = read_run_config(run)
    from .rundigest import check_run

    check_run(run)  # its files as the finished run wrote them
    if not (run / ADAPTER).is_dir():
        raise FileNotFoundError(f"{run}: the run has no saved adapter (did it finish?)")
    study = raw.get("study")
    if study is not None:
        from .plugins import repo_module

        if not isinstance(study, str) or not study.isidentifier():
            raise ConfigError(f"{run / 'config.yaml'}: study must be a study's name, got {study!r}")
        rebuilt: Rebuilt = repo_module(f"studies.{study}").rebuild(run, check_base=check_base)
        return rebuilt
    cfg = load_config(run / "config.yaml", saved=True)
    return _rebuild_run(run, cfg, check_base)


def _rebuild_run(run: Path, cfg: RunConfig, check_base: bool) -> Rebuilt:
    from .build import build_model, causal_lm, load_data, quantize_for
    from .loop import run_hooks

    torch.manual_seed(cfg.train.seed)  # as the run did before building (random heads, tiny models)
    loaded: dict[str, Any] = {}
    if cfg.objective == "causal-lm":
        model, info, loaded["data"] = causal_lm(cfg)
    else:
        model, info = build_model(
            cfg.model, head_classes(run / ADAPTER), cfg.model_dropout, cfg.fast_dropout
        )
    quantize_for(cfg, model)
    # runs written before task files kept the pruned backbone beside the adapter; a task file
    # (adapter/ with a "pruned" section) is applied to the original base directly
    backbone = run / PRUNED if (run / PRUNED).is_dir() else None
    attach(model, run / ADAPTER, backbone=backbone, check_base=check_base)
    model.eval()

    def score(m: nn.Module, split: str) -> dict[str, Any]:
        from contextlib import nullcontext

        if "data" not in loaded:
            loaded["data"] = load_data(cfg, info)
        data = loaded["data"]
        device = next(m.parameters()).device
        hooks = run_hooks(cfg, info, data, device, nullcontext)
        scores = hooks.evaluate(m, getattr(data, split))
        return {"accuracy": scores[hooks.select], **scores}

    return Rebuilt(
        model=model,
        config=cfg,
        title=f"run {run}: {cfg.model} / {cfg.task}",
        splits=("train", "val", "test"),
        score=score,
        info=info,
    )
