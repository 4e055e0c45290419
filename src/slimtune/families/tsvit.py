"""The TSViT family (:mod:`slimtune.models.tsvit`): a temporal and a spatial encoder.

Module names (``i`` = block index; ``(base_layer.)`` is allowed after a block so the roles still
resolve when a block is wrapped, e.g. by a prompt)::

    patch_embedding, temporal_embedding                        embed
    temporal_encoder.layers.i / space_encoder.layers.i         blocks (TSViTBlock)
        norm1, norm2                                            norm
        attn.q, attn.k, attn.v, attn.o                          q, k, v, o
        mlp.fc1, mlp.fc2                                        fc1, fc2
        norm2 (input = residual stream) / mlp (output)          mlp_in / mlp_out (parallel adapter)
    temporal_encoder.norm, space_encoder.norm                   norm
    mlp_head (0: LayerNorm, 1: Linear), class_adapter           head

``temporal`` and ``spatial`` select every linear (q, k, v, o, fc1, fc2) of one encoder, e.g.
``LoRA(targets=["temporal"])``. The class tokens ``temporal_token`` and the spatial position
embedding ``space_pos_embedding`` are parameters, not modules: :data:`TSVIT` names them in
``extra`` (``cls``, ``pos``) for ``Full(targets=["param:temporal_token"])``.

Prompts go into both encoders: after the K class tokens in the temporal encoder (K read from
``model.config.num_classes``) and in front of the patch tokens in the spatial encoder; both are
stripped after the encoder's last block, since every output token is used downstream.
"""

from __future__ import annotations

from .base import BlockSpec, Encoder, Family

__all__ = ["TSVIT", "TEMPORAL_BLOCKS", "SPATIAL_BLOCKS"]

TEMPORAL_BLOCKS = r"temporal_encoder\.layers\.\d+"
"""Pattern of the temporal encoder's blocks."""
SPATIAL_BLOCKS = r"space_encoder\.layers\.\d+"
"""Pattern of the spatial encoder's blocks."""

_BLOCK = r"(?:temporal|space)_encoder\.layers\.\d+\.(?:base_layer\.)?"

TSVIT = Family(
    name="tsvit",
    block_types=("TSViTBlock",),
    roles={
        "q": _BLOCK + r"attn\.q",
        "k": _BLOCK + r"attn\.k",
        "v": _BLOCK + r"attn\.v",
        "o": _BLOCK + r"attn\.o",
        "fc1": _BLOCK + r"mlp\.fc1",
        "fc2": _BLOCK + r"mlp\.fc2",
        "norm": _BLOCK + r"norm[12]|(?:temporal|space)_encoder\.norm",
        "embed": r"patch_embedding|temporal_embedding",
        "head": r"mlp_head|class_adapter",
        "mlp_in": _BLOCK + r"norm2",
        "mlp_out": _BLOCK + r"mlp",
        "temporal": TEMPORAL_BLOCKS + r"\.(?:base_layer\.)?(?:attn\.[qkvo]|mlp\.fc[12])",
        "spatial": SPATIAL_BLOCKS + r"\.(?:base_layer\.)?(?:attn\.[qkvo]|mlp\.fc[12])",
    },
    blocks=r"(?:temporal|space)_encoder\.layers\.\d+",
    block=BlockSpec(
        q="attn.q",
        k="attn.k",
        v="attn.v",
        o="attn.o",
        attention="attn",
        fc1="mlp.fc1",
        fc2="mlp.fc2",
        heads_attr=("num_heads",),
        head_dim="head_dim",
    ),
    encoders=(
        Encoder(blocks=TEMPORAL_BLOCKS, n_special="num_classes", strip=True),
        Encoder(blocks=SPATIAL_BLOCKS, n_special=0, strip=True),
    ),
    frozen_roles=("embed",),
    parallel_adapter=("mlp_in", "mlp_out"),
    extra={"cls": "temporal_token", "pos": "space_pos_embedding"},
)
