"""Families of Hugging Face encoders: BERT-like text encoders and ViT/DINOv2 image encoders."""

from __future__ import annotations

from .base import BlockSpec, Encoder, Family

__all__ = ["BERT", "VIT"]

BERT = Family(
    name="bert",
    block_types=("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer", "CamembertLayer"),
    roles={
        "q": r"layer\.\d+\.attention\.self\.query",
        "k": r"layer\.\d+\.attention\.self\.key",
        "v": r"layer\.\d+\.attention\.self\.value",
        "o": r"layer\.\d+\.attention\.output\.dense",
        "fc1": r"layer\.\d+\.intermediate\.dense",
        "fc2": r"layer\.\d+\.output\.dense",
        "norm": r"layer\.\d+\.(?:attention\.output|output)\.LayerNorm",
        "embed": r"embeddings",
        "pooler": r"pooler\.dense",
        "head": r"classifier|score",
        "mlp_in": r"layer\.\d+\.intermediate",
        "mlp_out": r"layer\.\d+\.output\.dense",
    },
    blocks=r"encoder\.layer\.\d+",
    block=BlockSpec(
        q="attention.self.query",
        k="attention.self.key",
        v="attention.self.value",
        o="attention.output.dense",
        attention="attention.self",
        fc1="intermediate.dense",
        fc2="output.dense",
        heads_attr=("num_attention_heads",),
        head_dim="attention_head_size",
    ),
    encoders=(),
    frozen_roles=("embed",),
    parallel_adapter=("mlp_in", "mlp_out"),
)

VIT = Family(
    name="vit",
    block_types=("ViTLayer", "Dinov2Layer", "Dinov2WithRegistersLayer", "DeiTLayer"),
    roles={
        "q": r"layers?\.\d+\.attention\.(?:attention\.)?(?:q_proj|query)",
        "k": r"layers?\.\d+\.attention\.(?:attention\.)?(?:k_proj|key)",
        "v": r"layers?\.\d+\.attention\.(?:attention\.)?(?:v_proj|value)",
        "o": r"layers?\.\d+\.attention\.(?:o_proj|output\.dense)",
        "fc1": r"layers?\.\d+\.mlp\.fc1",
        "fc2": r"layers?\.\d+\.mlp\.fc2",
        "norm": r"layers?\.\d+\.(?:norm1|norm2|layernorm_before|layernorm_after)|layernorm",
        "embed": r"embeddings",
        "head": r"classifier|head",
        "mlp_in": r"layers?\.\d+\.(?:norm2|layernorm_after)",
        "mlp_out": r"layers?\.\d+\.(?:layer_scale2|mlp)",
    },
    blocks=r"(?:encoder\.)?layers?\.\d+",
    block=BlockSpec(
        q="attention.q_proj",
        k="attention.k_proj",
        v="attention.v_proj",
        o="attention.o_proj",
        attention="attention",
        fc1="mlp.fc1",
        fc2="mlp.fc2",
        heads_attr=("num_attention_heads", "num_heads"),
        head_dim="head_dim",
    ),
    encoders=(Encoder(blocks=r"(?:encoder\.)?layers?\.\d+", n_special=1),),
    parallel_adapter=("mlp_in", "mlp_out"),
)
