"""Command line: ``slimtune train|eval|export|info|demo|plan|bench|data``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ..errors import SlimtuneError

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
    """Train a run: slimtune train --config FILE --out DIR (or --resume DIR) KEY=VALUE ...

    Overrides: any config key after the options as KEY=VALUE, dotted for nested keys, the value read as YAML, e.g. train.epochs=2 train.lr=5e-4 data.n_train=400 model=smollm2-135m objective=causal-lm task=chat-qa methods.0.r=16.
    """
    from .config import ConfigError, load_config
    from .loop import train as run_train

    try:
        if resume is not None:
            cfg_path = config or resume / "config.yaml"
            cfg = load_config(cfg_path, ctx.args, saved=config is None)
            out = resume
        else:
            cfg = load_config(config, ctx.args)
        out = out or Path("runs") / cfg.name
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: a file is there; a run directory is a folder")
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


_NO_BASE_CHECK = typer.Option(
    "--no-base-check",
    help="load even if the base's weights differ from the ones the run was trained on "
    "(to inspect a run whose base changed on purpose; results are then not the run's)",
)


@app.command("eval")
def eval_(
    run: Path,
    split: Annotated[
        str, typer.Option(help="train, val or test (a study's run may have others)")
    ] = "test",
    no_base_check: Annotated[bool, _NO_BASE_CHECK] = False,
) -> None:
    """Evaluate a finished run's saved adapter on a split."""
    from .runs import evaluate_run

    try:
        metrics = evaluate_run(run, split, check_base=not no_base_check)
    except (SlimtuneError, FileNotFoundError) as exc:
        _fail(exc)
        return
    typer.echo(json.dumps(metrics, indent=1))


@app.command()
def export(
    run: Path,
    format: Annotated[str, typer.Option("--format", help="peft or merged")] = "peft",
    out: Annotated[Path, typer.Option(help="output directory")] = Path("export"),
    no_base_check: Annotated[bool, _NO_BASE_CHECK] = False,
) -> None:
    """Export a run's adapter to HF peft's format or as a merged model."""
    from .runs import export_run

    try:
        path = export_run(run, format, out, check_base=not no_base_check)
    except (SlimtuneError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
        return
    typer.echo(f"exported {format} to {path}")


@app.command()
def info(target: str, no_base_check: Annotated[bool, _NO_BASE_CHECK] = False) -> None:
    """Describe a model (modules, roles), a run (trainable parameters per method, task-file
    bytes) or a saved adapter/task file (bytes per part, bits per tensor, what was pruned)."""
    from .runs import describe

    try:
        typer.echo(describe(target, check_base=not no_base_check))
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
    from ..io import save_plan
    from .allocate import spt_plan
    from .build import build_run
    from .config import load_config
    from .plots import plot_allocation

    try:
        cfg = load_config(config, ctx.args)
        if out.exists() and not out.is_dir():
            raise SlimtuneError(f"--out {out}: a file is there; a plan is written to a folder")
        if cfg.allocation is None:
            raise SlimtuneError(
                "the config has no allocation section: allocation: {method: spt, budget: 0.5%}"
            )
        run = build_run(cfg, apply_methods=False)
        result = spt_plan(run.model, run.data, cfg.allocation, seed=cfg.train.seed, head=cfg.head)
        save_plan(result, out)
        plot_allocation(result, run.model, str(out / "allocation.png"))
    except (SlimtuneError, FileNotFoundError) as exc:
        _fail(exc)
        return
    s = result.meta["spt"]
    typer.echo(
        f"plan: {s['total']:,} parameters (budget {s['budget']:,}), {len(result.entries)} entries -> {out}"
    )


BENCHMARKS = {
    "lora-vs-peft": "slimtune vs HF peft LoRA step time on minilm or smollm2-135m (and the frozen floor).",
    "dropout": "Training step with torch's dropout vs fast_dropout vs no dropout (minilm, LoRA q, v).",
    "spt": "SPT-LoRA/SPT-Adapter vs LoRA, Adapter, linear probe and full fine-tuning at equal budget.",
    "lowbit": "AdaptFormer at 32/8/4/2/1 bits, 1-bit with Bi-Head and 1-bit LoRA: accuracy and bytes.",
    "wheat": "TSViT winter-wheat adaptation: every PEFT method, in-domain, cross-year, cross-area.",
    "lightpeft": "Light-PEFT vs LoRA on q,v and on all linears: accuracy, speed, memory, sizes.",
    "decoder": "smollm2-135m as a causal LM: zero-shot, LoRA, SPT-LoRA, 1-bit LoRA, full FT.",
    "perplexity": "smollm2-135m perplexity on plain English against random init; conversion time.",
    "qbase": "LoRA on a 4-bit/8-bit base vs the fp32 base and peft+bitsandbytes QLoRA (smollm2-135m).",
    "compose": "Prune -> allocate -> 1 bit in one run vs LoRA q,v, SPT, Light-PEFT, 1-bit AdaptFormer.",
}
"""``slimtune bench NAME`` -> ``benchmarks/NAME.py`` (``-`` as ``_``), whose ``main(argv)``
parses the options: each benchmark declares its options once, in its own file."""

_PASS_THROUGH = {
    "allow_extra_args": True,
    "ignore_unknown_options": True,
    "help_option_names": [],
}


def _repo_main(module: str, argv: list[str]) -> None:
    """Run ``module.main(argv)`` from the repository (benchmarks, studies); exit with its code."""
    from .plugins import repo_module

    try:
        code = repo_module(module).main(argv)
    except SlimtuneError as exc:
        _fail(exc)
    if code:
        raise typer.Exit(int(code))


def _bench_command(name: str, text: str) -> None:
    def command(ctx: typer.Context) -> None:
        _repo_main("benchmarks." + name.replace("-", "_"), list(ctx.args))

    command.__doc__ = text + " Options: slimtune bench " + name + " --help."
    bench_app.command(name, context_settings=_PASS_THROUGH, add_help_option=False)(command)


for _name, _text in BENCHMARKS.items():
    _bench_command(_name, _text)


@data_app.command("s2-synth", context_settings=_PASS_THROUGH, add_help_option=False)
def data_s2_synth(ctx: typer.Context) -> None:
    """Generate synthetic Sentinel-2 time-series tiles (.npz) with crop labels (the wheat study;
    options: slimtune data s2-synth --help)."""
    _repo_main("studies.wheat.s2synth", list(ctx.args))


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
