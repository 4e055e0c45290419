"""The decoder benchmark's run configs: every method is a valid causal-LM run of the same data."""

from __future__ import annotations

import pytest

from benchmarks.decoder import METHODS, TASKS, run_config


@pytest.mark.parametrize("task", TASKS)
def test_every_method_is_a_causal_lm_run_with_the_same_data(task):
    configs = {m: run_config(m, task, quick=True, budget=1234) for m in METHODS}
    assert {c.objective for c in configs.values()} == {"causal-lm"}
    assert len({str(c.to_dict()["data"]) for c in configs.values()}) == 1
    assert configs["spt-lora"].allocation.budget == 1234
    assert configs["lora-1bit"].methods[0]["bits"] == 1
    assert configs["full"].train.lr < configs["lora-qv"].train.lr
    with pytest.raises(ValueError, match="budget"):
        run_config("spt-lora", task, quick=True)
