"""The training loop: AdamW + cosine warm-up, clipping, bf16 on CUDA, per-epoch validation,
model selection, JSONL metrics, atomic per-epoch checkpoints and exact resume.

:func:`fit` is the loop itself, for any task: a :class:`LoopHooks` says how a batch gives a loss,
how a split is scored and which score selects the best epoch (the wheat study trains
segmentation through it). :func:`train` is a whole classification run from a
:class:`~slimtune.app.config.RunConfig`: build, optional Light-PEFT stage, :func:`fit`, final
validation and test, adapter, ``results.json`` and ``report.md``.

Multi-process through accelerate: ``torchrun --nproc_per_node 2 -m slimtune train ...`` runs
two processes (gloo on CPU, NCCL on GPUs); each process takes its own shard of every epoch's
shuffled order, gradients are averaged by DDP, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .. import core
from ..errors import LoadError, SlimtuneError
from ..io import atomic_write_text, save
from ..io.files import group_file
from .build import build_run
from .checkpoint import STATE_JSON, load_checkpoint, save_checkpoint, trainable_state
from .config import RunConfig

__all__ = [
    "LoopHooks",
    "TrainSettings",
    "TrainingError",
    "classification_hooks",
    "run_hooks",
    "cosine_with_warmup",
    "evaluate",
    "fit",
    "param_groups",
    "total_steps",
    "train",
]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and other 1-D tensors."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup`` steps, then cosine decay to zero at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    return getattr(out, "logits", out)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset,
    collate: Any,
    batch_size: int,
    device: torch.device,
    autocast: Any,
) -> dict[str, float]:
    """Mean loss and accuracy over a whole dataset."""
    was = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = _logits(model, batch).float()
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        n += len(batch["labels"])
    model.train(was)
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1)}


class TrainSettings(Protocol):
    """The optimisation settings :func:`fit` reads (:class:`~slimtune.app.config.TrainConfig`
    has them all; ``max_steps`` may be missing)."""

    epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    weight_decay: float
    warmup: float
    grad_clip: float
    seed: int


Batch = dict[str, Tensor]


@dataclass
class LoopHooks:
    """What :func:`fit` needs to know about a task.

    Attributes:
        loss: ``(model, batch on the device) -> (mean loss, examples in the batch)``; ``model``
            may be wrapped for data parallelism.
        evaluate: ``(model, dataset) -> scores`` (a mapping of floats), called after every
            epoch on the validation split.
        select: the score that picks the best epoch (higher is better).
        collate: the data loaders' ``collate_fn`` (``None``: torch's default).
        hidden: scores left out of ``metrics.jsonl`` (counts, not metrics).
    """

    loss: Callable[[nn.Module, Batch], tuple[Tensor, int]]
    evaluate: Callable[[nn.Module, Dataset], dict[str, float]]
    select: str = "accuracy"
    collate: Any = None
    hidden: tuple[str, ...] = ()


def classification_hooks(
    collate: Any, batch_size: int, device: torch.device, autocast: Any
) -> LoopHooks:
    """Cross-entropy on ``batch["labels"]``; accuracy selects."""

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        with autocast():
            out = F.cross_entropy(_logits(model, batch).float(), batch["labels"])
        return out, len(batch["labels"])

    def score(model: nn.Module, data: Dataset) -> dict[str, float]:
        return evaluate(model, data, collate, batch_size, device, autocast)

    return LoopHooks(loss=loss, evaluate=score, select="accuracy", collate=collate)


class TrainingError(SlimtuneError):
    """A run cannot go on (a NaN loss, gradients that never arrive)."""


def check_gradients(trainable: list[torch.nn.Parameter], epoch: int) -> None:
    """Refuse to go on when every trainable tensor got an exactly zero (or no) gradient.

    This is how a base whose kernels changed state during evaluation shows itself (bitsandbytes
    repacking 4-bit weights in an eval-mode, no-grad forward on avx512_bf16 CPUs made LoRA train
    on zeros, silently): checked on the first step of every epoch, i.e. after each evaluation.
    """
    if any(p.grad is not None and bool(p.grad.any()) for p in trainable):
        return
    raise TrainingError(
        f"epoch {epoch + 1}: every trainable tensor ({len(trainable)}) has a zero gradient; "
        "training would not move. The base model's layers may have changed state during "
        "evaluation (e.g. a quantized base repacked by its backend) or nothing reaches the loss"
    )


def _epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return perm[rank::world]


def total_steps(settings: TrainSettings, n_train: int, world: int = 1) -> int:
    """Optimizer steps of a run of ``n_train`` examples over ``world`` processes."""
    per_epoch = math.ceil(math.ceil(n_train / world) / settings.batch_size)
    total = per_epoch * settings.epochs
    max_steps = getattr(settings, "max_steps", None)
    return min(total, max_steps) if max_steps is not None else total


def fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    settings: TrainSettings,
    hooks: LoopHooks,
    *,
    out: str | Path | None = None,
    accelerator: Any = None,
    seed: bool = False,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the trainable parameters of ``model``; restore the best validation epoch.

    Args:
        model: only parameters with ``requires_grad`` are trained (apply methods first).
        train_data: training items (``set_epoch(epoch)`` is called when it has one).
        val_data: validation items, scored by ``hooks.evaluate`` after every epoch.
        settings: optimisation settings (:class:`TrainSettings`).
        hooks: the task (:class:`LoopHooks`).
        out: run directory for ``metrics.jsonl`` and the per-epoch ``checkpoint/`` (``None``:
            no files).
        accelerator: an ``accelerate.Accelerator`` (default: one process, bf16 on CUDA).
        seed: call ``torch.manual_seed(settings.seed)`` first (callers that built the model
            under that seed already leave it ``False``).
        resume: continue from ``out/checkpoint`` (same final weights as an uninterrupted run).
        stop_after_epoch: stop right after this epoch's checkpoint (simulates a killed run).
        progress: show a progress bar per epoch.

    Returns:
        ``train_s`` (seconds in training steps), ``best_epoch`` (1-based), ``best_val``,
        ``history`` (one record per epoch), ``steps``; ``stopped_after_epoch`` when stopped.

    Raises:
        ValueError: the model has nothing to train.
        FileNotFoundError: ``resume`` without a checkpoint.
    """
    if accelerator is None:
        from accelerate import Accelerator

        cuda = torch.cuda.is_available()
        accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    acc = accelerator
    if seed:
        torch.manual_seed(settings.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter: apply a method or a head first")
    device = acc.device
    model.to(device)
    run = Path(out) if out is not None else None
    main = acc.is_main_process
    world, rank = acc.num_processes, acc.process_index
    opt = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr)
    total = total_steps(settings, len(train_data), world)  # type: ignore[arg-type]
    sched = cosine_with_warmup(opt, int(settings.warmup * total), total)
    ddp_model = acc.prepare_model(model) if world > 1 else model
    start_epoch, step, train_s = 0, 0, 0.0
    best: dict[str, torch.Tensor] | None = None
    best_val, best_epoch = -1.0, -1
    history: list[dict[str, Any]] = []
    ck = run / "checkpoint" if run is not None else None
    if resume:
        if ck is None or not group_file(ck, STATE_JSON).is_file():
            raise FileNotFoundError(f"{ck}: no checkpoint to resume from")
        extra, best = load_checkpoint(ck, model, opt, sched)
        if extra["epoch"] > settings.epochs or extra["step"] > total:
            raise LoadError(
                f"{ck}: the checkpoint is at epoch {extra['epoch']}, step {extra['step']}; this "
                f"run has {settings.epochs} epochs, {total} steps (another run's checkpoint?)"
            )
        start_epoch, step, train_s = extra["epoch"], extra["step"], extra["train_s"]
        best_val, best_epoch = extra["best_val"], extra["best_epoch"]
        history = list(extra.get("history", []))
        if main and run is not None:
            _truncate_metrics(run / "metrics.jsonl", start_epoch)
            _truncate_steps(run / STEPS, step)
    elif main and run is not None:
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").unlink(missing_ok=True)
        (run / STEPS).unlink(missing_ok=True)
    for epoch in range(start_epoch, settings.epochs):
        if step >= total:
            break
        model.train()
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        order = _epoch_order(len(train_data), settings.seed, epoch, rank, world)  # type: ignore[arg-type]
        loader = DataLoader(
            Subset(train_data, order),
            batch_size=settings.batch_size,
            shuffle=False,
            collate_fn=hooks.collate,
        )
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{settings.epochs}",
            disable=not (progress and main),
            leave=False,
        )
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        steps_log: list[dict[str, float]] = []
        for batch in bar:
            if step >= total:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, n = hooks.loss(ddp_model, batch)
            if not bool(torch.isfinite(loss.detach())):
                raise TrainingError(
                    f"the training loss became {loss.item()} at step {step + 1} (epoch "
                    f"{epoch + 1}); nothing of this epoch was kept"
                    + (
                        f", the last good checkpoint (epoch {epoch}) is in {ck}"
                        if ck is not None and epoch > 0
                        else ""
                    )
                    + ": lower train.lr or raise train.grad_clip"
                )
            acc.backward(loss)
            if seen == 0:  # the first step of each epoch, i.e. after every evaluation pass
                check_gradients(trainable, epoch)
            if settings.grad_clip > 0:
                acc.clip_grad_norm_(trainable, settings.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            value = loss.item()
            loss_sum += value * n
            seen += n
            bar.set_postfix(loss=f"{value:.4f}")
            steps_log.append(
                {"step": step, "epoch": epoch + len(steps_log) / max(1, len(loader)),
                 "loss": value, "lr": float(sched.get_last_lr()[0])}
            )  # fmt: skip
        train_s += time.perf_counter() - t0
        if progress and main:
            tqdm.write(f"epoch {epoch + 1}: evaluating on {len(val_data)} validation examples")  # type: ignore[arg-type]
        val = hooks.evaluate(model, val_data)
        if val[hooks.select] > best_val:
            best_val, best_epoch, best = val[hooks.select], epoch, trainable_state(model)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "lr": sched.get_last_lr()[0],
            "train_loss": loss_sum / max(seen, 1),
            **{f"val_{k}": v for k, v in val.items() if k not in hooks.hidden},
            "train_s": train_s,
        }
        history.append(record)
        if main and run is not None and ck is not None:
            with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            with open(run / STEPS, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in steps_log)
            extra = {
                "epoch": epoch + 1,
                "step": step,
                "train_s": train_s,
                "best_val": best_val,
                "best_epoch": best_epoch,
                "history": history,
            }
            save_checkpoint(ck, model, opt, sched, extra, best)
        if progress and main:
            tqdm.write(
                f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}  "
                f"val {hooks.select} {val[hooks.select]:.4f}"
            )
        acc.wait_for_everyone()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            return {"stopped_after_epoch": epoch + 1, "history": history, "steps": step}
    if best is not None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for pname, t in best.items():
                params[pname].copy_(t)
    return {
        "train_s": train_s,
        "best_epoch": best_epoch + 1,
        "best_val": best_val,
        "history": history,
        "steps": step,
    }


def run_hooks(
    cfg: RunConfig, info: dict[str, Any], data: Any, device: torch.device, autocast: Any
) -> LoopHooks:
    """The loop hooks of a run: classification, or a causal-LM task's (see :mod:`.lm`)."""
    if cfg.objective == "causal-lm":
        from .lm import lm_hooks

        return lm_hooks(
            info["lm_task"],
            data,
            info["tokenizer_object"],
            batch_size=cfg.train.eval_batch_size,
            max_length=cfg.data.max_length,
            device=device,
            autocast=autocast,
            pack=cfg.data.pack,
        )
    return classification_hooks(data.collate, cfg.train.eval_batch_size, device, autocast)


def train(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``cfg`` and write the run directory ``out``; return ``results.json``'s content.

    Args:
        cfg: the run configuration.
        out: run directory (config.yaml, metrics.jsonl, steps.jsonl, results.json, report.md,
            curves.png, adapter/, checkpoint/, digests.json; pruned/ and pruning.png with
            Light-PEFT).
        resume: continue from ``out/checkpoint`` (same final metrics as an uninterrupted run).
        stop_after_epoch: stop right after this epoch's checkpoint (simulates a killed run).
        progress: show a progress bar.
    """
    from accelerate import Accelerator

    from .report import write_report

    out = Path(out)
    cuda = torch.cuda.is_available()
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    torch.manual_seed(cfg.train.seed)
    if progress and acc.is_main_process:
        print(f"loading model {cfg.model} and task {cfg.task} ...", flush=True)
    run = build_run(cfg, apply_methods=cfg.pruning is None)
    model, data = run.model, run.data
    pruning = None
    if cfg.pruning is not None:  # Light-PEFT: early phase -> prune -> train the pruned model below
        from .prune import light_peft_stage

        model, pruning = light_peft_stage(
            model,
            data,
            cfg,
            out,
            total_steps=total_steps(cfg.train, len(data.train), acc.num_processes),
            device=acc.device,
            resume=resume,
            write=acc.is_main_process,
            progress=progress and acc.is_main_process,
            keep_lora=cfg.allocation is None,
        )
        if cfg.allocation is not None:  # the composition: allocate on the pruned model
            from ..passes.compose import early_lora, warm_start
            from .allocate import allocate_run

            early = early_lora(model)
            core.remove(model)  # the pruned base (its record kept) with the early phase's head
            allocate_run(model, data, cfg)
            if cfg.warm_start:
                pruning["warm_started"] = warm_start(model, early)
    summary = core.summary(model)
    device = acc.device
    model.to(device)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    autocast = acc.autocast
    hooks = run_hooks(cfg, run.info, data, device, autocast)
    res = fit(
        model,
        data.train,
        data.val,
        cfg.train,
        hooks,
        out=out,
        accelerator=acc,
        resume=resume,
        stop_after_epoch=stop_after_epoch,
        progress=progress,
    )
    if "stopped_after_epoch" in res:
        return {"stopped_after_epoch": res["stopped_after_epoch"]}
    val = hooks.evaluate(model, data.val)
    test = hooks.evaluate(model, data.test)
    metric = hooks.select
    results = {
        "name": cfg.name,
        "method": cfg.method_label,
        "model": cfg.model,
        "task": cfg.task,
        "objective": cfg.objective,
        "metric": metric,
        "trainable_params": summary.trainable,
        "trainable_pct": summary.pct,
        "base_params": summary.base,
        "by_method": summary.by_method,
        # "accuracy" holds the selection metric (exact match for generation tasks), so every
        # report reads one key; "metric" names it
        "val": {"accuracy": val[metric], "loss": val["loss"], "best_epoch": res["best_epoch"]},
        "test": {"accuracy": test[metric], "loss": test["loss"]},
        "train_s": res["train_s"],
        "processes": acc.num_processes,
        "device": str(device),
    }
    if cfg.objective == "classify":
        from .report import majority_baseline

        results["majority"] = majority_baseline(data)
    if pruning is not None:
        results["pruning"] = pruning
    if cfg.allocation is not None:
        from .allocate import allocation_summary

        results["allocation"] = allocation_summary(core.get_state(model).plan)
    if acc.is_main_process:
        from .report import task_summary

        save(model, out / "adapter")
        results["task"] = task_summary(out / "adapter")
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
        write_report(out, results)
        from .rundigest import write_run_digests

        write_run_digests(out)  # last: the finished run vouches for its files
    acc.wait_for_everyone()
    return results


STEPS = "steps.jsonl"
"""Per-step training loss and learning rate of a run (``epoch`` is fractional)."""


def _truncate_steps(path: Path, steps: int) -> None:
    """Keep the records of the first ``steps`` steps (a resumed run writes the rest again)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= steps
    ]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _truncate_metrics(path: Path, epochs: int) -> None:
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()[:epochs]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
