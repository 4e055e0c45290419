"""Command line: ``slimtune train|eval|export|info|demo|plan|bench|data``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from .errors import SlimtuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Parameter-efficient fine-tuning: where to tune, what to prune, how few bits to keep.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (JSON under benchmarks/results/).")
data_app = typer.Typer(no_args_is_help=True, help="Data generators.")
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")

__all__ = ["app", "main"]


def _fail(exc: Exception) -> NoReturn:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML run config")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<name>)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this directory")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train a run: slimtune train --config FILE [--out DIR] [--resume DIR] [key=value ...]."""
    from .train.config import load_config
    from .train.loop import train as run_train

    try:
        if resume is not None:
            cfg_path = config or resume / "config.yaml"
            cfg = load_config(cfg_path, ctx.args, saved=config is None)
            out = resume
        else:
            cfg = load_config(config, ctx.args)
        out = out or Path("runs") / cfg.name
        results = run_train(cfg, out, resume=resume is not None, progress=not quiet)
    except (SlimtuneError, FileNotFoundError) as exc:
        _fail(exc)
        return
    typer.echo(
        json.dumps(
            {
                k: results[k]
                for k in ("method", "trainable_params", "val", "test", "train_s")
                if k in results
            },
            indent=1,
        )
    )
    typer.echo(f"run directory: {out}")


@app.command("eval")
def eval_(run: Path, split: Annotated[str, typer.Option(help="val or test")] = "test") -> None:
    """Evaluate a finished run's saved adapter on a split."""
    from .runs import evaluate_run

    if split not in ("val", "test", "train"):
        _fail(ValueError(f"--split must be val, test or train, got {split!r}"))
    try:
        metrics = evaluate_run(run, split)
    except (SlimtuneError, FileNotFoundError) as exc:
        _fail(exc)
        return
    typer.echo(json.dumps(metrics, indent=1))


@app.command()
def export(
    run: Path,
    format: Annotated[str, typer.Option("--format", help="peft or merged")] = "peft",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("export"),
) -> None:
    """Export a run's adapter to HF peft's format or as a merged model."""
    from .runs import export_run

    try:
        path = export_run(run, format, out)
    except (SlimtuneError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
        return
    typer.echo(f"exported {format} to {path}")


@app.command()
def info(target: str) -> None:
    """Describe a model (modules, roles) or a run (trainable parameters per method)."""
    from .runs import describe

    try:
        typer.echo(describe(target))
    except (SlimtuneError, FileNotFoundError) as exc:
        _fail(exc)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where the demo's runs go")] = Path("runs/demo"),
) -> None:
    """Run configs/demo.yaml: LoRA vs a linear probe on minilm + amazon-reviews."""
    from .runs import run_demo

    try:
        run_demo(out)
    except (SlimtuneError, FileNotFoundError) as exc:
        _fail(exc)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan(
    ctx: typer.Context,
    config: Annotated[
        Path, typer.Option("--config", "-c", help="YAML run config with an allocation section")
    ],
    out: Annotated[Path, typer.Option(help="output directory")] = Path("plan"),
) -> None:
    """SPT: score sensitivity, allocate the budget, write plan.json/.safetensors + allocation.png."""
    import time

    import torch
    from torch.utils.data import DataLoader

    from .io import save_plan
    from .passes.spt import SPTConfig, allocate, plot_allocation, sensitivity
    from .train.build import build_run
    from .train.config import load_config

    try:
        cfg = load_config(config, ctx.args)
        if not cfg.allocation:
            raise SlimtuneError(
                "the config has no allocation section: allocation: {method: spt, budget: 0.5%}"
            )
        spec = {k: v for k, v in cfg.allocation.items() if k != "method"}
        spt = SPTConfig(**spec)
        run = build_run(cfg, apply_methods=False)
        g = torch.Generator().manual_seed(cfg.train.seed)
        loader = DataLoader(
            run.data.train,
            batch_size=spt.batch_size,
            shuffle=True,
            generator=g,
            collate_fn=run.data.collate,
        )
        t0 = time.perf_counter()
        scores = sensitivity(run.model, loader, n_batches=spt.batches)
        result = allocate(run.model, scores, spt, head=cfg.head)
        result.meta["spt"]["sensitivity_s"] = time.perf_counter() - t0
        save_plan(result, out)
        plot_allocation(result, run.model, str(out / "allocation.png"))
    except (SlimtuneError, FileNotFoundError) as exc:
        _fail(exc)
        return
    s = result.meta["spt"]
    typer.echo(
        f"plan: {s['total']:,} parameters (budget {s['budget']:,}), {len(result.entries)} entries -> {out}"
    )


@bench_app.command("lora-vs-peft")
def bench_lora_vs_peft(
    quick: Annotated[bool, typer.Option(help="few steps")] = False,
    dropout: Annotated[float, typer.Option(help="LoRA dropout")] = 0.0,
    out: Annotated[str | None, typer.Option(help="JSON output file")] = None,
) -> None:
    """slimtune vs HF peft LoRA step time on minilm (and the frozen-model floor)."""
    from .bench.lora_vs_peft import run

    run(quick=quick, dropout=dropout, out=out)


@bench_app.command("dropout")
def bench_dropout(
    quick: Annotated[bool, typer.Option(help="5 timed steps instead of 15")] = False,
    threads: Annotated[
        str, typer.Option(help="comma-separated thread counts, e.g. 2,1 (default: every core)")
    ] = "",
    out: Annotated[str | None, typer.Option(help="JSON output file")] = None,
) -> None:
    """Training step with torch's dropout vs fast_dropout vs no dropout (minilm, LoRA q, v)."""
    _bench("dropout", quick, out, threads=_thread_counts(threads, "--threads"))


def _thread_counts(text: str, option: str) -> list[int]:
    """``"2,1"`` -> ``[2, 1]``; anything else exits with code 2 naming ``option``."""
    from .bench.lightpeft import parse_threads

    try:
        return parse_threads(text)
    except ValueError as exc:
        _fail(SlimtuneError(f"{option}: {exc}"))


def _bench(name: str, quick: bool, out: str | None, **kwargs: object) -> None:
    import importlib

    module = importlib.import_module(f"slimtune.bench.{name}")
    try:
        module.run(quick=quick, out=out, **kwargs)
    except SlimtuneError as exc:
        _fail(exc)


QuickOpt = Annotated[bool, typer.Option(help="the small version (minutes on 2 CPU cores)")]
OutOpt = Annotated[str | None, typer.Option(help="JSON output file")]


@bench_app.command("spt")
def bench_spt(quick: QuickOpt = False, out: OutOpt = None) -> None:
    """SPT-LoRA/SPT-Adapter vs LoRA, Adapter, linear probe and full fine-tuning at equal budget."""
    _bench("spt", quick, out)


@bench_app.command("lowbit")
def bench_lowbit(quick: QuickOpt = False, out: OutOpt = None) -> None:
    """AdaptFormer at 32/8/4/2/1 bits, 1-bit with Bi-Head and 1-bit LoRA: accuracy and bytes."""
    _bench("lowbit", quick, out)


@bench_app.command("wheat")
def bench_wheat(quick: QuickOpt = False, out: OutOpt = None) -> None:
    """TSViT winter-wheat adaptation: every PEFT method, in-domain, cross-year, cross-area."""
    _bench("wheat", quick, out)


@bench_app.command("lightpeft")
def bench_lightpeft(
    quick: QuickOpt = False,
    out: OutOpt = None,
    timing_threads: Annotated[
        str,
        typer.Option(
            help="comma-separated thread counts to time the steps with, e.g. 2,1 "
            "(default: every core; the first gives the top-level speed keys)"
        ),
    ] = "",
    model_dropout: Annotated[
        float | None,
        typer.Option(help="the backbone's dropout for every method (default: the checkpoint's)"),
    ] = None,
    torch_dropout: Annotated[
        bool,
        typer.Option(
            help="train every method with torch's own dropout instead of fast_dropout "
            "(see slimtune.dropout)"
        ),
    ] = False,
    head_ratio: Annotated[
        float | None, typer.Option(help="fraction of each layer's heads removed (default 1/3)")
    ] = None,
    ffn_ratio: Annotated[
        float | None, typer.Option(help="fraction of all FFN neurons removed (default 1/3)")
    ] = None,
    module_ratio: Annotated[
        float | None, typer.Option(help="fraction of LoRA modules removed (default 0.75)")
    ] = None,
    rank_ratio: Annotated[
        float | None, typer.Option(help="fraction of LoRA ranks removed (default 0.5)")
    ] = None,
    early_steps: Annotated[
        str | None,
        typer.Option(
            help="Light-PEFT's early phase: steps (integer) or a fraction of the run "
            "(default 0.35 with --quick, else 0.2)"
        ),
    ] = None,
    rescore_steps: Annotated[
        str | None,
        typer.Option(
            help="score the PEFT modules again on the pruned backbone for this many steps "
            "(or a fraction of the run; default 0: off, the paper's)"
        ),
    ] = None,
    backbone_score: Annotated[
        str | None,
        typer.Option(
            help="what ranks heads and FFN neurons: mask (default, the paper's), taylor "
            "(|m dL/dm|) or random (a control)"
        ),
    ] = None,
    compensate: Annotated[
        bool,
        typer.Option(
            help="add the removed heads' and neurons' mean contribution to the biases "
            "(off by default, the paper's)"
        ),
    ] = False,
    timing_steps: Annotated[
        int | None,
        typer.Option(help="timed steps per method and step kind (default 5 with --quick, else 20)"),
    ] = None,
    keep: Annotated[
        Path | None, typer.Option(help="a new or empty directory to keep the trained runs in")
    ] = None,
) -> None:
    """Light-PEFT vs LoRA on q,v and on all linears: accuracy, speed, memory, sizes."""
    from .bench.lightpeft import parse_early_steps

    threads = _thread_counts(timing_threads, "--timing-threads")
    given = {
        "head_ratio": head_ratio,
        "ffn_ratio": ffn_ratio,
        "module_ratio": module_ratio,
        "rank_ratio": rank_ratio,
    }
    pruning: dict[str, object] = {k: v for k, v in given.items() if v is not None}
    for key, text in (("early_steps", early_steps), ("rescore_steps", rescore_steps)):
        if text is not None:
            try:
                pruning[key] = parse_early_steps(text)
            except ValueError:
                flag = "--" + key.replace("_", "-")
                _fail(SlimtuneError(f"{flag}: a step count or a fraction, got {text!r}"))
    if backbone_score is not None:
        pruning["backbone_score"] = backbone_score
    if compensate:
        pruning["compensate"] = True
    _bench(
        "lightpeft",
        quick,
        out,
        timing_threads=threads,
        model_dropout=model_dropout,
        fast_dropout=not torch_dropout,
        pruning=pruning,
        timing_steps=timing_steps,
        keep=keep,
    )


@data_app.command("s2-synth")
def data_s2_synth(
    out: Annotated[Path, typer.Option(help="output folder")],
    area: Annotated[
        str, typer.Option(help="area profile (A source, B target, C cross-area)")
    ] = "A",
    year: Annotated[int, typer.Option(help="harvest year")] = 2020,
    tiles: Annotated[int, typer.Option(help="number of tiles")] = 100,
    seed: Annotated[int, typer.Option(help="base seed")] = 0,
    figure: Annotated[bool, typer.Option(help="also write tile_00000.png")] = True,
) -> None:
    """Generate synthetic Sentinel-2 time-series tiles (.npz) with crop labels."""
    from tqdm import tqdm

    from .data.s2synth import AREAS, generate, plot_tile

    if area not in AREAS:
        _fail(ValueError(f"--area must be one of {', '.join(sorted(AREAS))}, got {area!r}"))
    try:
        paths = []
        for i in tqdm(range(tiles), desc=f"s2-synth {area}/{year}", unit="tile"):
            paths = generate(out, area=area, year=year, tiles=i + 1, seed=seed)
    except ValueError as exc:
        _fail(exc)
        return
    if figure:
        plot_tile(paths[0], out / "tile_00000.png")
    typer.echo(f"{len(paths)} tiles -> {out}")


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
