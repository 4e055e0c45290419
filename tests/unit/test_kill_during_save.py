"""Fault injection: processes killed (SIGKILL) at random moments while saving adapters and
checkpoints into one folder leave the old files or the new ones, never a mix."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import bert_inputs, logits, perturb, tiny_bert

import slimtune
from slimtune import LoRA

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

TRIALS = 300


def _kill_while(save_forever, delay_ms: float) -> None:
    pid = os.fork()
    if pid == 0:  # the child saves until it is killed
        try:
            torch.set_num_threads(1)
            save_forever()
        finally:
            os._exit(1)
    time.sleep(delay_ms / 1000)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_killed_adapter_saves_leave_one_whole_adapter(tmp_path: Path):
    x = bert_inputs()
    models = []
    for seed in (3, 9):
        m = slimtune.apply(tiny_bert(), [LoRA(r=2, alpha=4, targets=["q", "v"], bits=1)])
        perturb(m, seed=seed)
        models.append(m.eval())
    want = [logits(m, x) for m in models]
    d = tmp_path / "adapter"
    slimtune.save(models[0], d)

    def save_forever() -> None:
        i = 0
        while True:
            slimtune.save(models[i % 2], d)
            i += 1

    rng = random.Random(0)
    outcome = {"first": 0, "second": 0}
    leftovers = 0
    for _ in range(TRIALS):
        _kill_while(save_forever, rng.uniform(2, 80))
        leftovers += any(
            p.name not in ("adapter.safetensors", "slimtune.json") for p in d.iterdir()
        )
        got = logits(slimtune.load(tiny_bert(), d).eval(), x)  # never refused, never a mix
        if torch.equal(got, want[0]):
            outcome["first"] += 1
        else:
            assert torch.equal(got, want[1]), "a mix of two adapters loaded"
            outcome["second"] += 1
    assert outcome["first"] > 0 and outcome["second"] > 0, outcome
    print(f"{TRIALS} kills: {outcome}, {leftovers} left temporary files", file=sys.stderr)
    slimtune.save(models[1], d)  # the next save cleans up
    assert sorted(p.name for p in d.iterdir()) == ["adapter.safetensors", "slimtune.json"]


def test_killed_checkpoint_saves_leave_one_whole_checkpoint(tmp_path: Path):
    from slimtune.app.checkpoint import load_checkpoint, save_checkpoint

    def state(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Linear(8, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        extra = {"epoch": seed, "step": seed, "train_s": 0.0, "best_val": 0.0, "best_epoch": 0}
        return model, opt, sched, extra

    states = [state(1), state(2)]
    d = tmp_path / "checkpoint"
    save_checkpoint(d, *states[0], None)

    def save_forever() -> None:
        i = 0
        while True:
            save_checkpoint(d, *states[i % 2], None)
            i += 1

    rng = random.Random(1)
    for _ in range(TRIALS // 3):
        _kill_while(save_forever, rng.uniform(1, 30))
        model, opt, sched, _ = state(5)
        extra, _ = load_checkpoint(d, model, opt, sched)
        epoch = extra["epoch"]
        src = states[[1, 2].index(epoch)][0]  # the tensors belong to the same save as state.json
        assert torch.equal(model.weight, src.weight) and torch.equal(model.bias, src.bias)
