"""The base fingerprint covers every value: changes the strided sample never sees are refused."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_files import without_digests
from tiny_models import bert_inputs, logits, perturb, tiny_bert

import slimtune
from slimtune import LoRA
from slimtune.core import fingerprint, value_sum
from slimtune.errors import LoadError


def test_value_sum_sees_every_value_of_every_dtype():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8):
        base = (torch.randn(10_007, generator=g) * 50).to(dtype)  # not a multiple of 8 bytes
        ref = value_sum(base)
        assert value_sum(base.clone()) == ref
        for i in (0, 1, 5_000, 10_006):  # first, last (in the padded tail), middle
            changed = base.clone()
            changed[i] = changed[i] + 1 if dtype != torch.int8 else changed[i] ^ 1
            assert value_sum(changed) != ref, (dtype, i)
    x = torch.arange(24, dtype=torch.float32)
    assert value_sum(x[1:]) == value_sum(x[1:].clone())  # an unaligned view reads the same
    assert value_sum(torch.zeros(0)) == 0
    # more than one chunk: a change in the second one counts
    big = torch.zeros(3 * (1 << 21) * 2 + 3)
    ref = value_sum(big)
    big[-1] = 1.0
    assert value_sum(big) != ref


def _wide(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # 8,000 values in the first weight: the sample reads 1,000 of them
    return torch.nn.Sequential(torch.nn.Linear(80, 100), torch.nn.ReLU(), torch.nn.Linear(100, 3))


@pytest.mark.parametrize("edit", ["unsampled", "tail"])
def test_changes_the_sample_misses_are_refused(edit, tmp_path):
    model = slimtune.apply(_wide(), [LoRA(r=2, alpha=4, targets=[r"^0$"])], head=["2"])
    perturb(model, seed=3)
    slimtune.save(model, tmp_path)
    other = _wide()
    flat = other[0].weight.detach().view(-1)
    step = max(1, flat.numel() // 1024)
    with torch.no_grad():
        if edit == "unsampled":  # the 6,976 values the strided sample does not read
            mask = torch.ones(flat.numel(), dtype=torch.bool)
            mask[::step][:1024] = False
            assert int(mask.sum()) == 6976
            flat[mask] += 0.5
        else:  # the last 832 values, past the sample's last one
            flat[-832:] = 0.0
    assert fingerprint(other)["weights"] == fingerprint(_wide())["weights"]
    with pytest.raises(LoadError, match="weights differ"):
        slimtune.load(other, tmp_path)
    assert getattr(other, "_slimtune", None) is None


def test_adapters_saved_before_the_full_checksum_still_load(tmp_path):
    model = slimtune.apply(tiny_bert(), [LoRA(r=2, alpha=4, targets=["q", "v"])])
    perturb(model, seed=3)
    d = without_digests(slimtune.save(model, tmp_path))
    manifest = json.loads((d / "slimtune.json").read_text())
    del manifest["base"]["values"]
    (d / "slimtune.json").write_text(json.dumps(manifest))
    x = bert_inputs()
    assert torch.equal(logits(slimtune.load(tiny_bert(), d).eval(), x), logits(model.eval(), x))


def test_a_base_in_another_dtype_is_named_as_such(tmp_path):
    model = slimtune.apply(_wide(), [LoRA(r=2, alpha=4, targets=[r"^0$"])], head=["2"])
    slimtune.save(model, tmp_path)
    with pytest.raises(LoadError, match="trained on a base in float32, this one is in bfloat16"):
        slimtune.load(_wide().to(torch.bfloat16), tmp_path)


def test_restore_accepts_adapters_saved_before_the_full_checksum(tmp_path):
    """Resuming (``restore``) compares only the fingerprint keys the adapter recorded."""
    from slimtune.io.adapter import restore

    model = slimtune.apply(_wide(), [LoRA(r=2, alpha=4, targets=[r"^0$"])], head=["2"])
    perturb(model, seed=3)
    d = without_digests(slimtune.save(model, tmp_path))
    manifest = json.loads((d / "slimtune.json").read_text())
    for key in ("values", "dtypes"):
        del manifest["base"][key]
    (d / "slimtune.json").write_text(json.dumps(manifest))
    again = slimtune.apply(_wide(), [LoRA(r=2, alpha=4, targets=[r"^0$"])], head=["2"])
    restore(again, d)
    x = torch.randn(2, 80)
    assert torch.equal(again(x), model(x))
    other = slimtune.apply(_wide(seed=1), [LoRA(r=2, alpha=4, targets=[r"^0$"])], head=["2"])
    with pytest.raises(LoadError, match="another base model"):
        restore(other, d)
