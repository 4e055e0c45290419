"""Tiny models built in the tests: a 2-layer BERT, a 2-layer DINOv2, a 1+1-layer TSViT and
2-layer Llama (grouped-query attention, gated FFN), OPT and GPT-2 (Conv1D, fused qkv) decoders."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def tiny_bert(num_labels: int = 3, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


class TinyViTClassifier(torch.nn.Module):
    """A 2-layer DINOv2 backbone with a linear head on the CLS token."""

    def __init__(self, num_labels: int = 3) -> None:
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            mlp_ratio=2,
            image_size=28,
            patch_size=7,
            layerscale_value=0.5,
        )
        self.backbone = Dinov2Model(cfg)
        self.classifier = torch.nn.Linear(16, num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.backbone(pixel_values=pixel_values).last_hidden_state
        return self.classifier(h[:, 0])


def tiny_vit(num_labels: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TinyViTClassifier(num_labels).eval()


def tiny_tsvit(num_labels: int = 3, seed: int = 0) -> torch.nn.Module:
    """TSViT with 8x8 tiles, 4 bands, width 16, one temporal and one spatial block."""
    from slimtune.models.tsvit import TSViT, TSViTConfig

    torch.manual_seed(seed)
    return TSViT(TSViTConfig.tiny(num_classes=num_labels, num_channels=4)).eval()


def tiny_llama(num_labels: int = 3, seed: int = 0, causal: bool = False) -> torch.nn.Module:
    """A 2-layer Llama: 4 query heads sharing 2 key/value heads (GQA), gated FFN of 24."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=24,
        vocab_size=50,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
        tie_word_embeddings=causal,
    )
    cls = LlamaForCausalLM if causal else LlamaForSequenceClassification
    return cls(cfg).eval()


def tiny_opt(num_labels: int = 3, seed: int = 0, causal: bool = False) -> torch.nn.Module:
    """A 2-layer OPT: 4 heads, hidden 16, FFN 32."""
    from transformers import OPTConfig, OPTForCausalLM, OPTForSequenceClassification

    torch.manual_seed(seed)
    cfg = OPTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=32,
        vocab_size=50,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        num_labels=num_labels,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
    )
    cls = OPTForCausalLM if causal else OPTForSequenceClassification
    return cls(cfg).eval()


def tiny_gpt2(num_labels: int = 3, seed: int = 0, causal: bool = False) -> torch.nn.Module:
    """A 2-layer GPT-2: Conv1D layers, fused c_attn, 4 heads, hidden 16."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=4,
        vocab_size=50,
        n_positions=64,
        num_labels=num_labels,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    cls = GPT2LMHeadModel if causal else GPT2ForSequenceClassification
    return cls(cfg).eval()


def decoder_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """Three sequences of 9 tokens (ids 3..49), the first right-padded after 6 (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[0, 6:] = 0
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def bert_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def vit_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(3, 3, 28, 28, generator=g)}


def tsvit_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    doy = torch.sort(torch.randint(0, 300, (3, 5), generator=g), dim=1).values
    return {"x": torch.randn(3, 5, 4, 8, 8, generator=g), "doy": doy}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return getattr(out, "logits", out)


MODELS = {
    "bert": (tiny_bert, bert_inputs),
    "vit": (tiny_vit, vit_inputs),
    "tsvit": (tiny_tsvit, tsvit_inputs),
    "llama": (tiny_llama, decoder_inputs),
    "opt": (tiny_opt, decoder_inputs),
    "gpt2": (tiny_gpt2, decoder_inputs),
}
DECODERS = ("llama", "opt", "gpt2")


def perturb(model: torch.nn.Module, seed: int = 3, scale: float = 0.1) -> None:
    """Give every trainable tensor random non-zero values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def dinov2_like(hidden: int, layers: int, labels: int = 10) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    from slimtune.models.classifier import ImageClassifier

    torch.manual_seed(0)
    backbone = Dinov2Model(
        Dinov2Config(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            mlp_ratio=1,
            image_size=14,
            patch_size=7,
        )
    )
    return ImageClassifier(backbone, labels)
