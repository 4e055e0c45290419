"""Peak-memory helpers of the benchmarks (CPU: the RSS high-water mark)."""

from __future__ import annotations

import sys

import pytest
import torch

from benchmarks.memory import peak_mb, reset_peak, status_mb

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or torch.cuda.is_available(),
    reason="RSS high-water mark via /proc (CPU runs on Linux)",
)


@linux_only
def test_peak_follows_an_allocation_and_restarts_after_it_is_freed():
    mark = reset_peak()
    assert mark["before_mb"] > 0 and mark["previous_peak_mb"] >= mark["before_mb"] - 1
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    during = peak_mb()
    assert during >= mark["before_mb"] + 60
    del x
    again = reset_peak()  # trims the freed pages, so the new mark starts below the old peak
    assert again["previous_peak_mb"] >= during - 1
    assert peak_mb() < during - 40
    assert status_mb("NoSuchField") == 0.0


def test_emit_prints_and_writes_the_json(tmp_path, capsys):
    import json

    from benchmarks.common import emit

    path = tmp_path / "sub" / "r.json"
    path.parent.mkdir()
    emit({"acc": {"a": 0.5}, "n": 3}, path)
    assert json.loads(path.read_text()) == {"acc": {"a": 0.5}, "n": 3}
    out = capsys.readouterr()
    assert json.loads(out.out) == {"acc": {"a": 0.5}, "n": 3} and str(path) in out.err


def test_machine_info_names_where_the_numbers_were_taken():
    import os

    from benchmarks.common import cores, machine_info

    info = machine_info(torch.device("cpu"))
    assert info["device"] == "cpu" and "gpu" not in info
    assert info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()
    want = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert info["cores"] == cores() == want
    assert isinstance(info["cpu"], str) and info["cpu"]


def test_paired_speedup_median_and_order_statistic_interval():
    from benchmarks.common import paired_speedup

    base = [2.0 + 0.1 * i for i in range(20)]
    ratios = [1.2 + 0.02 * i for i in range(20)]  # 1.2 .. 1.58, shuffled against the rounds
    order = [7, 3, 19, 0, 11, 5, 16, 9, 1, 14, 18, 2, 8, 13, 6, 17, 4, 12, 10, 15]
    new = [b / ratios[j] for b, j in zip(base, order, strict=True)]
    s = paired_speedup(base, new)
    assert s["rounds"] == 20 and s["median"] == 1.39  # (1.38 + 1.40) / 2
    # n = 20 at 95 %: the 6th and 15th smallest ratio (coverage 1 - 2 P(Bin(20, 1/2) <= 5))
    assert (s["low"], s["high"]) == (1.3, 1.48) and s["coverage"] == 0.9586
    few = paired_speedup([2.0] * 5, [1.0, 2.0, 0.5, 1.0, 1.0])
    assert (few["low"], few["median"], few["high"]) == (1.0, 2.0, 4.0)
    assert few["coverage"] == 0.9375  # the widest interval of 5 rounds: below 0.95, said so
    for a, b in (([], []), ([1.0], [1.0, 2.0]), ([1.0], [0.0])):
        with pytest.raises(ValueError):
            paired_speedup(a, b)
