"""Winter-wheat mapping with TSViT: pre-train on a source domain, adapt with PEFT, evaluate.

::

    area A, year 2019 (7 classes)          area B, year 2020 (wheat vs other)
    ─────────────────────────────          ──────────────────────────────────────────────
    pretrain(): TSViT, all parameters  ──► adapt(): load checkpoint, adapt_classes(2),
      model.safetensors + config.json        slimtune.apply(methods), train, keep best val F1
      (cached under the data root)         evaluate on in_domain  (B 2020, unseen tiles)
                                                       cross_year (B 2021)
                                                       cross_area (C 2020)

The class change (7 source classes -> wheat/other) follows the study: by default a
``Linear(K -> 2)`` on the logits (``classes: linear``; the pretrained class tokens are kept), or
fresh class tokens (``classes: tokens``; they are then trained with the head). The head
(``mlp_head`` and the class adapter) is trained by every method, as in the study.

Each split is a folder of seeded synthetic tiles (:mod:`studies.wheat.s2synth`) generated on first
use under ``$SLIMTUNE_DATA/s2synth``; real ``.npz`` stacks go through the same code (point the
:class:`Study` folders at them). Inputs are standardised with the band statistics of the training
folder of each stage. Scores are for winter wheat, from softmax probabilities
(:mod:`studies.wheat.segmetrics`).

Command line (run configs in ``studies/wheat/configs/``)::

    python -m studies.wheat pretrain [--quick]
    python -m studies.wheat adapt --config studies/wheat/configs/lora.yaml --out runs/wheat/lora

A run directory's ``config.yaml`` (``study: wheat``, :func:`run_record`) lets
``slimtune eval|export|info`` rebuild it (:func:`rebuild`).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune import core
from slimtune.app.config import ConfigError, build_methods
from slimtune.io import atomic_write, atomic_write_text, save
from slimtune.models.tsvit import TSViT, TSViTConfig
from studies.wheat.segment import SegTrainConfig, evaluate_segmentation, predict, train_segmentation

__all__ = [
    "SIZES",
    "SPLITS",
    "Split",
    "Study",
    "PretrainConfig",
    "WheatConfig",
    "load_wheat_config",
    "save_pretrained",
    "load_pretrained",
    "pretrain",
    "build_adapted",
    "adapt",
    "save_maps",
    "rebuild",
    "run_record",
    "main",
]

SIZES = {"tiny": TSViTConfig.tiny, "small": TSViTConfig.small, "pastis": TSViTConfig.pastis}
"""TSViT sizes by name."""
SPLITS = ("in_domain", "cross_year", "cross_area")
"""Test splits of the study."""
WHEAT = 1
"""Class id of winter wheat in the source labels and in the binary labels."""


@dataclass(frozen=True)
class Split:
    """A folder of generated tiles: one area, one year, one seed."""

    area: str
    """Area profile (:data:`studies.wheat.s2synth.AREAS`)."""
    year: int
    """Harvest year."""
    tiles: int
    """Number of 24x24 tiles."""
    seed: int
    """Base seed (distinct per split of one area/year, so no tile is shared)."""
    size: int = 24
    """Tile side in pixels (the model's ``img_size``)."""

    def folder(self, root: Path) -> Path:
        px = "" if self.size == 24 else f"-px{self.size}"
        return root / f"{self.area}{self.year}-s{self.seed}-n{self.tiles}{px}"

    def ensure(self, root: Path) -> Path:
        """The split's folder, generating missing tiles first (resumes a stopped run)."""
        from studies.wheat.s2synth import generate

        out = self.folder(root)
        if not (out / "meta.json").is_file():
            generate(
                out,
                area=self.area,
                year=self.year,
                tiles=self.tiles,
                seed=self.seed,
                size=self.size,
            )
        return out


@dataclass(frozen=True)
class Study:
    """The data of the study: a source domain to pre-train on, a target domain and OOD tests."""

    source_train: Split = Split("A", 2019, 600, 0)
    """Multi-class pre-training tiles (source area and year)."""
    source_val: Split = Split("A", 2019, 80, 1)
    """Pre-training validation tiles."""
    target_train: Split = Split("B", 2020, 200, 10)
    """Wheat-vs-other training tiles (target area and year)."""
    target_val: Split = Split("B", 2020, 60, 11)
    """Model-selection tiles (target area and year)."""
    in_domain: Split = Split("B", 2020, 150, 12)
    """Test: target area and year, unseen tiles."""
    cross_year: Split = Split("B", 2021, 150, 13)
    """Test: target area, another year."""
    cross_area: Split = Split("C", 2020, 150, 14)
    """Test: another area, target year."""

    @classmethod
    def quick(cls) -> Study:
        """A smaller study for a CPU run of minutes."""
        return cls(
            source_train=Split("A", 2019, 300, 0),
            source_val=Split("A", 2019, 40, 1),
            target_train=Split("B", 2020, 100, 10),
            target_val=Split("B", 2020, 32, 11),
            in_domain=Split("B", 2020, 64, 12),
            cross_year=Split("B", 2021, 64, 13),
            cross_area=Split("C", 2020, 64, 14),
        )

    def tests(self) -> dict[str, Split]:
        return {s: getattr(self, s) for s in SPLITS}


def _data_root() -> Path:
    from slimtune.app.data.base import data_root

    return data_root() / "s2synth"


@dataclass
class PretrainConfig:
    """Pre-training of TSViT on the source domain (all classes, all parameters)."""

    model: str = "small"
    """TSViT size: ``tiny``, ``small`` or ``pastis``."""
    train: SegTrainConfig = field(
        default_factory=lambda: SegTrainConfig(epochs=15, batch_size=16, lr=1e-3, weight_decay=0.01)
    )
    """Optimisation settings."""

    def __post_init__(self) -> None:
        if self.model not in SIZES:
            raise ConfigError(f"model must be one of {sorted(SIZES)}, got {self.model!r}")

    @classmethod
    def quick(cls, model: str = "small") -> PretrainConfig:
        """The schedule of the quick benchmark (6 epochs)."""
        return cls(
            model=model, train=SegTrainConfig(epochs=6, batch_size=16, lr=1e-3, weight_decay=0.01)
        )

    def key(self, study: Study) -> str:
        """Cache key: everything that changes the pre-trained weights."""
        t, s = self.train, study.source_train
        return (
            f"tsvit-{self.model}-{s.area}{s.year}-s{s.seed}-n{s.tiles}"
            f"-e{t.epochs}-b{t.batch_size}-lr{t.lr:g}-seed{t.seed}"
        )


@dataclass
class WheatConfig:
    """One adaptation run (a YAML file in ``studies/wheat/configs/``)."""

    name: str = "run"
    """Run (method) name."""
    model: str = "small"
    """TSViT size of the pre-trained checkpoint."""
    classes: str = "linear"
    """Class change: ``linear`` (Linear(K -> 2) on the logits) or ``tokens`` (new class tokens)."""
    methods: list[dict[str, Any]] = field(default_factory=list)
    """Methods with their settings (``[]`` = head only), as in the trainer's run configs."""
    head: list[str] | None = None
    """Roles/regexes of the always-trained head (default: the family's head)."""
    train: SegTrainConfig = field(default_factory=lambda: SegTrainConfig(lr=1e-3))
    """Optimisation settings."""

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            valid = [f.name for f in fields(SegTrainConfig)]
            bad = [k for k in self.train if k not in valid]
            if bad:
                raise ConfigError(f"unknown train keys {bad}; valid: {valid}")
            self.train = SegTrainConfig(**self.train)
        if self.model not in SIZES:
            raise ConfigError(f"model must be one of {sorted(SIZES)}, got {self.model!r}")
        if self.classes not in ("linear", "tokens"):
            raise ConfigError(f"classes must be 'linear' or 'tokens', got {self.classes!r}")
        if not isinstance(self.methods, list):
            raise ConfigError(f"methods must be a list, got {self.methods!r}")
        for i, m in enumerate(self.methods):
            if not isinstance(m, dict) or "name" not in m:
                raise ConfigError(f"methods[{i}] must be a mapping with a 'name', got {m!r}")
        build_methods(self.methods)  # validates every method's fields


def load_wheat_config(path: str | os.PathLike[str], **overrides: Any) -> WheatConfig:
    """Read a :class:`WheatConfig` from YAML; ``overrides`` replace top-level keys."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a run config must be a YAML mapping, got {type(data).__name__}")
    data.update(overrides)
    valid = [f.name for f in fields(WheatConfig)]
    bad = [k for k in data if k not in valid]
    if bad:
        raise ConfigError(f"{p}: unknown keys {bad}; valid: {valid}")
    return WheatConfig(**data)


# --- pre-trained checkpoints: model.safetensors + config.json (no pickle) -----------------------


def save_pretrained(model: TSViT, path: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture + ``info``) into ``path``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp))
    meta = {"format": "slimtune-tsvit", "config": asdict(model.config), **info}
    atomic_write_text(out / "config.json", json.dumps(meta, indent=1))
    return out


def load_pretrained(path: str | os.PathLike[str]) -> tuple[TSViT, dict[str, Any]]:
    """Rebuild a TSViT saved by :func:`save_pretrained`; returns (model, config.json content)."""
    p = Path(path)
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise FileNotFoundError(f"{p}: no pre-trained TSViT (model.safetensors + config.json)")
    meta = json.loads((p / "config.json").read_text(encoding="utf-8"))
    model = TSViT(TSViTConfig(**meta["config"]))
    model.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
    return model, meta


def pretrain(
    study: Study | None = None,
    cfg: PretrainConfig | None = None,
    *,
    root: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Pre-train TSViT on the source domain, or reuse the cached checkpoint.

    Returns:
        The checkpoint folder and its ``config.json`` content, with ``cached`` telling whether
        it was reused.
    """
    from studies.wheat.s2 import BandStats, S2TileDataset
    from studies.wheat.s2synth import CLASSES

    study = study or Study()
    cfg = cfg or PretrainConfig()
    root = root or _data_root()
    path = root / "pretrained" / cfg.key(study)
    if not force and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        _, meta = load_pretrained(path)
        return path, {**meta, "cached": True}
    tr = study.source_train.ensure(root)
    va = study.source_val.ensure(root)
    stats = BandStats.from_folder(tr)
    train = S2TileDataset(tr, stats=stats, train=True, seed=cfg.train.seed)
    val = S2TileDataset(va, stats=stats)
    torch.manual_seed(cfg.train.seed)
    model = TSViT(SIZES[cfg.model](num_classes=len(CLASSES)))
    res = train_segmentation(
        model,
        train,
        val,
        cfg.train,
        out=path / "run",
        positive=None,
        resume=True,
        progress=progress,
    )
    info = {
        "source": asdict(study.source_train),
        "classes": list(CLASSES),
        "band_stats": asdict(stats),
        "train": asdict(cfg.train),
        "train_s": res["train_s"],
        "best_epoch": res["best_epoch"],
        "val": res["val"],
    }
    save_pretrained(model, path, info)
    _, meta = load_pretrained(path)
    return path, {**meta, "cached": False}


# --- adaptation ----------------------------------------------------------------------------------


def build_adapted(pretrained: TSViT, cfg: WheatConfig) -> nn.Module:
    """Change the classes of a pre-trained TSViT to wheat/other and apply the run's methods."""
    model = pretrained.adapt_classes(2, mode=cfg.classes)
    methods = build_methods(cfg.methods)
    if cfg.classes == "tokens":
        # Fresh class tokens carry no pre-trained knowledge: they are trained by every method.
        from slimtune.methods import Full

        if not any(isinstance(m, Full) for m in methods):
            methods.append(Full(targets=["param:temporal_token"]))
    return core.apply(model, methods, head=cfg.head)


def save_maps(
    model: nn.Module, data: Any, out_png: str | os.PathLike[str], *, n: int = 4, title: str = ""
) -> Path:
    """Plot ``n`` tiles: an RGB composite, the truth, the prediction and the errors.

    Truth and prediction show winter wheat in gold and other land in green-grey (unlabelled
    pixels white); errors show true positives green, false positives red, false negatives blue.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from studies.wheat.s2synth import BANDS
    from studies.wheat.segmetrics import positive_probability

    n = min(n, len(data))
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n + 0.4), squeeze=False)
    lab_cmap = ListedColormap(["white", "#9aa889", "#e3b505"])
    err_cmap = ListedColormap(["white", "#e8e8e8", "#2ca02c", "#d62728", "#1f77b4"])
    for i in range(n):
        item = data[i]
        batch = {"x": item["x"][None], "doy": item["doy"][None]}
        prob = positive_probability(predict(model, batch))[0].cpu()
        pred = (prob >= 0.5).long()
        y = item["y"]
        with np.load(data.files[i]) as z:
            img, doy = z["images"], z["doy"]
        t = int(np.argmin(np.abs(doy.astype(int) - 110)))  # a spring date (~20 April)
        rgb = img[t, [BANDS.index("B4"), BANDS.index("B3"), BANDS.index("B2")]].transpose(1, 2, 0)
        known = y >= 0
        truth = torch.where(known, y + 1, 0)
        shown = torch.where(known, pred + 1, 0)
        err = torch.zeros_like(y)
        err[known & (pred == 0) & (y == 0)] = 1
        err[known & (pred == 1) & (y == 1)] = 2
        err[known & (pred == 1) & (y == 0)] = 3
        err[known & (pred == 0) & (y == 1)] = 4
        panels = [
            (np.clip(rgb * 3.5, 0, 1), None, f"RGB doy {int(doy[t])}"),
            (truth.numpy(), lab_cmap, "truth"),
            (shown.numpy(), lab_cmap, "prediction"),
            (err.numpy(), err_cmap, "errors (FP red, FN blue)"),
        ]
        for ax, (im, cmap, name) in zip(axes[i], panels, strict=True):
            if cmap is None:
                ax.imshow(im)
            else:
                ax.imshow(im, cmap=cmap, vmin=0, vmax=cmap.N - 1, interpolation="nearest")
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out_png)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return out


def adapt(
    cfg: WheatConfig,
    pretrained: str | os.PathLike[str],
    *,
    study: Study | None = None,
    root: Path | None = None,
    out: str | os.PathLike[str] | None = None,
    maps: int = 4,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Adapt a pre-trained TSViT to winter wheat vs other and evaluate it on every test split.

    Args:
        cfg: the run (methods, class change, optimisation).
        pretrained: folder written by :func:`pretrain`.
        study: the data (default :class:`Study`).
        root: folder of the generated data (default ``$SLIMTUNE_DATA/s2synth``).
        out: run folder: ``results.json``, ``metrics.jsonl``, ``adapter/``, ``maps/<split>.png``.
        maps: tiles per prediction map (0 = no maps).
        resume: continue from ``out/checkpoint`` (a stopped run).
        progress: show progress bars.

    Returns:
        The content of ``results.json``: trainable parameters, training time, validation and
        per-split scores (F1, IoU, precision, recall of winter wheat).
    """
    from studies.wheat.s2 import BandStats, S2TileDataset
    from studies.wheat.s2synth import WHEAT_VS_OTHER

    study = study or Study()
    root = root or _data_root()
    base, meta = load_pretrained(pretrained)
    if meta["config"]["dim"] != SIZES[cfg.model]().dim:
        raise ConfigError(
            f"run {cfg.name!r} expects a {cfg.model!r} TSViT, {pretrained} holds dim "
            f"{meta['config']['dim']}"
        )
    torch.manual_seed(cfg.train.seed)
    model = build_adapted(base, cfg)
    summ = core.summary(model)
    tr = study.target_train.ensure(root)
    stats = BandStats.from_folder(tr)

    def dataset(split: Split, train: bool = False) -> S2TileDataset:
        return S2TileDataset(
            split.ensure(root),
            stats=stats,
            train=train,
            label_map=WHEAT_VS_OTHER,
            seed=cfg.train.seed,
        )

    run = Path(out) if out is not None else None
    if run is not None:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            run / "config.yaml",
            yaml.safe_dump(run_record(cfg, pretrained, study, root), sort_keys=False),
        )
    res = train_segmentation(
        model,
        dataset(study.target_train, train=True),
        dataset(study.target_val),
        cfg.train,
        out=run,
        positive=WHEAT,
        resume=resume,
        progress=progress,
    )
    scores: dict[str, dict[str, float]] = {}
    for name, split in study.tests().items():
        ds = dataset(split)
        scores[name] = evaluate_segmentation(
            model, ds, batch_size=cfg.train.eval_batch_size, positive=WHEAT
        )
        if run is not None and maps:
            save_maps(model, ds, run / "maps" / f"{name}.png", n=maps, title=f"{cfg.name}: {name}")
    results = {
        "name": cfg.name,
        "methods": cfg.methods,
        "classes": cfg.classes,
        "pretrained": str(pretrained),
        "trainable_params": summ.trainable,
        "trainable_pct": summ.pct,
        "base_params": summ.base,
        "by_method": summ.by_method,
        "train_s": res["train_s"],
        "best_epoch": res["best_epoch"],
        "val": res["val"],
        "test": scores,
    }
    if run is not None:
        save(model, run / "adapter")
        atomic_write_text(run / "results.json", json.dumps(results, indent=1))
    return results


def run_record(
    cfg: WheatConfig, pretrained: str | os.PathLike[str], study: Study, root: Path
) -> dict[str, Any]:
    """A wheat run directory's ``config.yaml``: what :func:`rebuild` needs to rebuild it."""
    return {
        "study": "wheat",
        "run": asdict(cfg),
        "pretrained": str(Path(pretrained).resolve()),
        "data": asdict(study),
        "root": str(Path(root).resolve()),
    }


def rebuild(run: str | os.PathLike[str], *, check_base: bool = True) -> Any:
    """Rebuild a wheat adaptation run (the application's
    :class:`~slimtune.app.rebuild.Rebuilt`): the pre-trained TSViT with its class change and the
    run's adapter; splits ``val``, ``in_domain`` (also ``test``), ``cross_year``, ``cross_area``,
    scored as :func:`adapt` scores them."""
    from slimtune.app.rebuild import Rebuilt, attach, read_run_config
    from studies.wheat.s2 import BandStats, S2TileDataset
    from studies.wheat.s2synth import WHEAT_VS_OTHER

    run = Path(run)
    raw = read_run_config(run)
    try:
        cfg = WheatConfig(**raw["run"])
        study = Study(**{k: Split(**v) for k, v in raw["data"].items()})
        pretrained, root = Path(raw["pretrained"]), Path(raw["root"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{run / 'config.yaml'}: not a wheat run record ({exc})") from exc
    base, _ = load_pretrained(pretrained)
    torch.manual_seed(cfg.train.seed)  # as adapt() did before the class change
    model = base.adapt_classes(2, mode=cfg.classes)
    attach(model, run / "adapter", check_base=check_base)
    model.eval()
    named = {"val": study.target_val, "test": study.in_domain, **study.tests()}

    def score(m: nn.Module, split: str) -> dict[str, Any]:
        stats = BandStats.from_folder(study.target_train.ensure(root))
        ds = S2TileDataset(
            named[split].ensure(root), stats=stats, label_map=WHEAT_VS_OTHER, seed=cfg.train.seed
        )
        return evaluate_segmentation(m, ds, batch_size=cfg.train.eval_batch_size, positive=WHEAT)

    return Rebuilt(
        model=model,
        config=cfg,
        title=f"wheat run {run}: {cfg.name} on TSViT-{cfg.model} ({pretrained.name})",
        splits=tuple(named),
        score=score,
        info={"kind": "tsvit"},
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m studies.wheat pretrain|adapt ...``."""
    ap = argparse.ArgumentParser(prog="python -m studies.wheat", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="pre-train TSViT on the source domain (cached)")
    p.add_argument("--quick", action="store_true", help="the smaller study and schedule")
    p.add_argument("--model", default="small", choices=sorted(SIZES))
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    a = sub.add_parser(
        "adapt", help="adapt to winter wheat from a studies/wheat/configs/ run config"
    )
    a.add_argument("--config", required=True, help="YAML run config")
    a.add_argument("--out", required=True, help="run folder")
    a.add_argument("--quick", action="store_true", help="the smaller study")
    a.add_argument("--pretrained", default=None, help="checkpoint folder (default: pre-train)")
    a.add_argument("--resume", action="store_true", help="continue a stopped run in --out")
    args = ap.parse_args(argv)
    study = Study.quick() if args.quick else Study()
    if args.cmd == "pretrain":
        pcfg = PretrainConfig.quick(args.model) if args.quick else PretrainConfig(args.model)
        path, meta = pretrain(study, pcfg, force=args.force)
        print(json.dumps({"path": str(path), "cached": meta["cached"], "val": meta["val"]}))
        return 0
    cfg = load_wheat_config(args.config)
    pre = args.pretrained
    if pre is None:
        pcfg = PretrainConfig.quick(cfg.model) if args.quick else PretrainConfig(cfg.model)
        pre, _ = pretrain(study, pcfg)
    results = adapt(cfg, pre, study=study, out=args.out, resume=args.resume)
    print(json.dumps({k: results[k] for k in ("trainable_pct", "train_s", "test")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
