"""The training loop: AdamW + cosine warm-up, clipping, bf16 on CUDA, per-epoch validation,
model selection, final test, JSONL metrics, atomic per-epoch checkpoints and exact resume.

Multi-process through accelerate: ``torchrun --nproc_per_node 2 -m slimtune train ...`` runs
two processes (gloo on CPU, NCCL on GPUs); each process takes its own shard of every epoch's
shuffled order, gradients are averaged by DDP, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .. import core
from ..io import atomic_write_text, save
from .build import build_run
from .checkpoint import load_checkpoint, save_checkpoint, trainable_state
from .config import RunConfig

__all__ = ["train", "evaluate", "param_groups", "cosine_with_warmup"]


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


def _epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return perm[rank::world]


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
        out: run directory (config.yaml, metrics.jsonl, results.json, report.md, curves.png,
            adapter/, checkpoint/).
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
    run = build_run(cfg, apply_methods=not cfg.pruning)
    model, data = run.model, run.data
    pruning = None
    if cfg.pruning:  # Light-PEFT: early phase -> prune -> train the pruned model below
        from .prune import light_peft_stage, run_steps

        model, pruning = light_peft_stage(
            model,
            data,
            cfg,
            out,
            total_steps=run_steps(cfg, len(data.train), acc.num_processes),
            device=acc.device,
            resume=resume,
            write=acc.is_main_process,
            progress=progress and acc.is_main_process,
        )
    summary = core.summary(model)
    device = acc.device
    model.to(device)
    ck = out / "checkpoint"
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    world, rank = acc.num_processes, acc.process_index
    per_epoch = math.ceil(math.ceil(len(data.train) / world) / cfg.train.batch_size)
    total = per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    sched = cosine_with_warmup(opt, int(cfg.train.warmup * total), total)
    ddp_model = acc.prepare_model(model) if world > 1 else model
    start_epoch, step, train_s = 0, 0, 0.0
    best: dict[str, torch.Tensor] | None = None
    best_val, best_epoch = -1.0, -1
    if resume:
        if not (ck / "state.json").is_file():
            raise FileNotFoundError(f"{ck}: no checkpoint to resume from")
        extra, best = load_checkpoint(ck, model, opt, sched)
        start_epoch, step, train_s = extra["epoch"], extra["step"], extra["train_s"]
        best_val, best_epoch = extra["best_val"], extra["best_epoch"]
        _truncate_metrics(out / "metrics.jsonl", start_epoch) if acc.is_main_process else None
    elif acc.is_main_process and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    autocast = acc.autocast
    for epoch in range(start_epoch, cfg.train.epochs):
        if step >= total:
            break
        model.train()
        order = _epoch_order(len(data.train), cfg.train.seed, epoch, rank, world)
        loader = DataLoader(
            Subset(data.train, order),
            batch_size=cfg.train.batch_size,
            shuffle=False,
            collate_fn=data.collate,
        )
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            disable=not (progress and acc.is_main_process),
            leave=False,
        )
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        for batch in bar:
            if step >= total:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss = F.cross_entropy(_logits(ddp_model, batch).float(), batch["labels"])
            acc.backward(loss)
            if cfg.train.grad_clip > 0:
                acc.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip
                )
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_sum += loss.item() * len(batch["labels"])
            seen += len(batch["labels"])
            bar.set_postfix(loss=f"{loss.item():.4f}")
        train_s += time.perf_counter() - t0
        val = evaluate(model, data.val, data.collate, cfg.train.eval_batch_size, device, autocast)
        if val["accuracy"] > best_val:
            best_val, best_epoch, best = val["accuracy"], epoch, trainable_state(model)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "lr": sched.get_last_lr()[0],
            "train_loss": loss_sum / max(seen, 1),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "train_s": train_s,
        }
        if acc.is_main_process:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            extra = {
                "epoch": epoch + 1,
                "step": step,
                "train_s": train_s,
                "best_val": best_val,
                "best_epoch": best_epoch,
            }
            save_checkpoint(ck, model, opt, sched, extra, best)
            if progress:
                tqdm.write(
                    f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}  val acc {val['accuracy']:.4f}"
                )
        acc.wait_for_everyone()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            return {"stopped_after_epoch": epoch + 1}
    if best is not None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, t in best.items():
                params[n].copy_(t)
    val = evaluate(model, data.val, data.collate, cfg.train.eval_batch_size, device, autocast)
    test = evaluate(model, data.test, data.collate, cfg.train.eval_batch_size, device, autocast)
    results = {
        "name": cfg.name,
        "method": f"spt-{cfg.allocation.get('structured', 'lora')}"
        if cfg.allocation
        else "+".join(m["name"] for m in cfg.methods) or "linear",
        "model": cfg.model,
        "task": cfg.task,
        "trainable_params": summary.trainable,
        "trainable_pct": summary.pct,
        "base_params": summary.base,
        "by_method": summary.by_method,
        "val": {"accuracy": val["accuracy"], "loss": val["loss"], "best_epoch": best_epoch + 1},
        "test": {"accuracy": test["accuracy"], "loss": test["loss"]},
        "train_s": train_s,
        "processes": world,
        "device": str(device),
    }
    if pruning is not None:
        results["method"] = "light-peft"
        results["pruning"] = pruning
    if acc.is_main_process:
        save(model, out / "adapter")
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
        write_report(out, results)
    acc.wait_for_everyone()
    return results


def _truncate_metrics(path: Path, epochs: int) -> None:
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()[:epochs]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
