"""The adapter's two files vouch for each other: every single flipped bit is refused, and a
save interrupted at any step leaves the old adapter or the new one, never a mix."""

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


def test_a_save_interrupted_at_any_step_leaves_the_old_adapter_or_the_new_one(
    tmp_path, monkeypatch
):
    """A crash after each file operation of a save (every ``os.replace`` and ``unlink`` of
    :func:`slimtune.io.files.write_group` in turn): the directory loads as the old adapter
    before the commit marker is written and as the new one after it, never a mix; the next
    save completes it and leaves no leftovers."""
    import os

    import slimtune.io.files as files

    x = bert_inputs()
    old = _adapter(tmp_path / "ref_old", seed=3).eval()
    new = slimtune.apply(tiny_bert(), [LoRA(r=2, alpha=4, targets=["q", "v"], bits=1)])
    perturb(new, seed=9)
    new.eval()
    want = {"old": logits(old, x), "new": logits(new, x)}
    seen = set()
    real_replace, real_unlink = os.replace, os.unlink
    for crash_at in range(12):
        d = tmp_path / f"crash{crash_at}"
        slimtune.save(old, d)
        calls = {"n": 0}

        def counted(real, calls=calls, crash_at=crash_at):
            def op(*args, **kwargs):
                if calls["n"] == crash_at:
                    raise OSError(f"killed at file operation {crash_at}")
                calls["n"] += 1
                return real(*args, **kwargs)

            return op

        monkeypatch.setattr(files.os, "replace", counted(real_replace))
        monkeypatch.setattr(files.os, "unlink", counted(real_unlink))
        try:
            slimtune.save(new, d)
            finished = True
        except OSError:
            finished = False
        monkeypatch.undo()
        got = logits(slimtune.load(tiny_bert(), d).eval(), x)
        which = [k for k, v in want.items() if torch.equal(got, v)]
        assert len(which) == 1, f"crash at {crash_at}: neither the old nor the new adapter"
        seen.add(which[0])
        if finished:
            assert which == ["new"]
            break
        slimtune.save(new, d)  # completes the directory: the new adapter, no leftovers
        assert torch.equal(logits(slimtune.load(tiny_bert(), d).eval(), x), want["new"])
        assert sorted(p.name for p in d.iterdir()) == ["adapter.safetensors", "slimtune.json"]
    assert seen == {"old", "new"}, seen


def test_weights_copied_from_another_adapter_are_refused(tmp_path):
    _adapter(tmp_path / "a", seed=3)
    _adapter(tmp_path / "b", seed=4)
    (tmp_path / "a" / "adapter.safetensors").write_bytes(
        (tmp_path / "b" / "adapter.safetensors").read_bytes()
    )
    with pytest.raises(LoadError, match="does not match"):
        slimtune.load(tiny_bert(), tmp_path / "a")
