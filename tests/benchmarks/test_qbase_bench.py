"""The qbase benchmark's pieces that need no real model: the backend comparison and the
name mapping that gives slimtune and peft variants the same initial LoRA and head values."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

import slimtune
from benchmarks.qbase import _key, _same_init, backends
from slimtune import LoRA

pytest.importorskip("bitsandbytes")


def test_backends_report_error_bytes_and_time_for_bitsandbytes():
    out = backends(rounds=1)
    fp32 = out["fp32"]
    nf4, int8 = out["bitsandbytes-nf4"], out["bitsandbytes-int8"]
    assert fp32["rel_err"] == 0.0
    assert 0.02 < nf4["rel_err"] < 0.15 and int8["rel_err"] < 0.01
    assert nf4["weight_bytes"] < 0.15 * fp32["weight_bytes"]
    assert int8["weight_bytes"] < 0.27 * fp32["weight_bytes"]
    assert all(v["fwd_bwd_ms"] > 0 for v in out.values() if "fwd_bwd_ms" in v)


def test_slimtune_and_peft_variants_start_from_the_same_lora_and_head():
    import peft

    ours = tiny_llama(num_labels=2)
    slimtune.apply(ours, [LoRA(r=2, alpha=4, targets=["q", "v"])])
    theirs = peft.get_peft_model(
        tiny_llama(num_labels=2),
        peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"
        ),
    )
    _same_init(ours, 0)
    _same_init(theirs, 0)
    a = {_key(n): p for n, p in ours.named_parameters() if p.requires_grad}
    b = {_key(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(a) == sorted(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert any(n.endswith("lora_A") for n in a) and any(n.startswith("score") for n in a)
