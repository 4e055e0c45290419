"""The adapter's two files vouch for each other: every single flipped bit is refused, and a
save interrupted between the two files leaves a directory that is refused, never a mix."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import bert_inputs, logits, perturb, tiny_bert

import slimtune
from slimtune import LoRA
from slimtune.errors import LoadError


def _adapter(tmp_path, seed: int = 3):
    model = slimtune.apply(tiny_bert(), [LoRA(r=2, alpha=4, targets=["q", "v"], bits=1)])
    perturb(model, seed=seed)
    slimtune.save(model, tmp_path)
    return model


def test_the_manifest_and_the_weights_carry_each_others_digest(tmp_path):
    from safetensors.torch import load_file

    _adapter(tmp_path)
    manifest = json.loads((tmp_path / "slimtune.json").read_text())
    digest = load_file(str(tmp_path / "adapter.safetensors"))["digest/manifest_sha256"]
    assert len(manifest["weights_sha256"]) == 64 and digest.dtype == torch.uint8
    assert digest.numel() == 32


@pytest.mark.parametrize("name", ["adapter.safetensors", "slimtune.json"])
def test_every_single_flipped_bit_is_refused(name, tmp_path):
    _adapter(tmp_path)
    path = tmp_path / name
    good = path.read_bytes()
    base = tiny_bert()  # load leaves the model untouched when it refuses: one base for all
    accepted = []
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 1 << (i % 8)
        path.write_bytes(bytes(bad))
        try:
            slimtune.load(base, tmp_path)
        except LoadError:
            continue
        accepted.append(i)
        slimtune.remove(base)
    path.write_bytes(good)
    assert not accepted, f"{len(accepted)} of {len(good)} flipped bytes loaded, e.g. {accepted[:5]}"
    slimtune.load(base, tmp_path)  # the intact files still load


def test_a_save_interrupted_between_the_two_files_is_refused_not_mixed(tmp_path, monkeypatch):
    import slimtune.io.adapter as adapter_io

    _adapter(tmp_path, seed=3)
    other = slimtune.apply(tiny_bert(), [LoRA(r=2, alpha=4, targets=["q", "v"], bits=1)])
    perturb(other, seed=9)

    def crash(*args, **kwargs):
        raise OSError("killed after the weights were renamed")

    monkeypatch.setattr(adapter_io, "atomic_write_text", crash)
    with pytest.raises(OSError):
        slimtune.save(other, tmp_path)
    monkeypatch.undo()
    with pytest.raises(LoadError, match="interrupted"):
        slimtune.load(tiny_bert(), tmp_path)
    # saving again completes the directory: the new adapter, exactly
    slimtune.save(other, tmp_path)
    x = bert_inputs()
    again = slimtune.load(tiny_bert(), tmp_path).eval()
    assert torch.equal(logits(again, x), logits(other.eval(), x))


def test_weights_copied_from_another_adapter_are_refused(tmp_path):
    _adapter(tmp_path / "a", seed=3)
    _adapter(tmp_path / "b", seed=4)
    (tmp_path / "a" / "adapter.safetensors").write_bytes(
        (tmp_path / "b" / "adapter.safetensors").read_bytes()
    )
    with pytest.raises(LoadError, match="does not match"):
        slimtune.load(tiny_bert(), tmp_path / "a")
