"""Families of decoder-only language models: Llama-style, OPT and GPT-2 layouts.

Recognised by structure (:attr:`~slimtune.families.Family.structure`), not by class name, so
every model with the layout is covered: Llama, Mistral, Qwen2/3, SmolLM, Gemma 3 (Llama-style),
OPT, GPT-2 (and its descendants that keep ``c_attn``).

Module names (``i`` = block index)::

    Llama-style  model.layers.i.self_attn.{q,k,v,o}_proj     q k v o  (grouped-query attention)
                 model.layers.i.mlp.{gate,up,down}_proj       gate up down (fc1 = gate and up,
                                                              fc2 = down: the gated FFN)
                 model.layers.i.{input,post_attention,...}_layernorm, model.norm   norm
    OPT          model.decoder.layers.i.self_attn.{q,k,v,out}_proj, fc1, fc2
                 ...self_attn_layer_norm, final_layer_norm                        norm
    GPT-2        transformer.h.i.attn.c_attn (q | k | v fused), attn.c_proj (o),
                 mlp.c_fc (fc1), mlp.c_proj (fc2), ln_1, ln_2, ln_f (norm); all ``Conv1D``

Heads: ``head`` is a sequence-classification head (``score``) and is trained with any method;
``lm_head`` (a causal LM's output layer, usually tied to the input embeddings) is known but
not trained unless asked for (``apply(..., head="lm_head")``), since training it trains the
embeddings it is tied to.

Grouped-query attention: Light-PEFT removes whole key/value groups by default (or the same
number of query heads in every group); see :mod:`slimtune.passes.lightpeft`.
"""

from __future__ import annotations

from .base import BlockSpec, Family

__all__ = ["LLAMA", "OPT", "GPT2"]

_L = r"layers\.\d+\.(?:base_layer\.)?"
_NORMS = (
    "input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm"
)

LLAMA = Family(
    name="llama",
    block_types=(),
    structure=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    roles={
        "q": _L + r"self_attn\.q_proj",
        "k": _L + r"self_attn\.k_proj",
        "v": _L + r"self_attn\.v_proj",
        "o": _L + r"self_attn\.o_proj",
        "gate": _L + r"mlp\.gate_proj",
        "up": _L + r"mlp\.up_proj",
        "down": _L + r"mlp\.down_proj",
        "fc1": _L + r"mlp\.(?:gate_proj|up_proj)",
        "fc2": _L + r"mlp\.down_proj",
        "norm": _L + rf"(?:{_NORMS})|norm",
        "embed": r"embed_tokens",
        "head": r"score|classifier",
        "lm_head": r"lm_head",
        "mlp_in": _L + r"post_attention_layernorm|" + _L + r"pre_feedforward_layernorm",
        "mlp_out": _L + r"mlp",
    },
    blocks=r"layers\.\d+",
    block=BlockSpec(
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        attention="self_attn",
        fc1="mlp.up_proj",
        fc2="mlp.down_proj",
        gate="mlp.gate_proj",
        heads_attr=(),
        head_dim="head_dim",
        width_attrs=(),
        groups_attr="num_key_value_groups",
    ),
    frozen_roles=("embed",),
    parallel_adapter=("mlp_in", "mlp_out"),
    prompt_input=r"model",
)

OPT = Family(
    name="opt",
    block_types=(),
    structure=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "fc1",
        "fc2",
        "final_layer_norm",
    ),
    roles={
        "q": _L + r"self_attn\.q_proj",
        "k": _L + r"self_attn\.k_proj",
        "v": _L + r"self_attn\.v_proj",
        "o": _L + r"self_attn\.out_proj",
        "fc1": _L + r"fc1",
        "fc2": _L + r"fc2",
        "norm": _L + r"(?:self_attn_layer_norm|final_layer_norm)|decoder\.final_layer_norm",
        "embed": r"embed_tokens|embed_positions",
        "head": r"score|classifier",
        "lm_head": r"lm_head",
        "mlp_in": _L + r"final_layer_norm",
        "mlp_out": _L + r"fc2",
    },
    blocks=r"decoder\.layers\.\d+",
    block=BlockSpec(
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        attention="self_attn",
        fc1="fc1",
        fc2="fc2",
        heads_attr=("num_heads",),
        head_dim="head_dim",
        width_attrs=(),
    ),
    frozen_roles=("embed",),
    parallel_adapter=("mlp_in", "mlp_out"),
    prompt_input=r"decoder",
)

_H = r"h\.\d+\.(?:base_layer\.)?"

GPT2 = Family(
    name="gpt2",
    block_types=(),
    structure=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "ln_1", "ln_2"),
    roles={
        "q": _H + r"attn\.c_attn",
        "k": _H + r"attn\.c_attn",
        "v": _H + r"attn\.c_attn",
        "qkv": _H + r"attn\.c_attn",
        "o": _H + r"attn\.c_proj",
        "fc1": _H + r"mlp\.c_fc",
        "fc2": _H + r"mlp\.c_proj",
        "norm": _H + r"ln_[12]|ln_f",
        "embed": r"wte|wpe",
        "head": r"score|classifier",
        "lm_head": r"lm_head",
        "mlp_in": _H + r"ln_2",
        "mlp_out": _H + r"mlp",
    },
    fused={"q": (0, 3), "k": (1, 3), "v": (2, 3)},
    blocks=r"h\.\d+",
    block=BlockSpec(
        q="attn.c_attn",
        k="attn.c_attn",
        v="attn.c_attn",
        o="attn.c_proj",
        attention="attn",
        fc1="mlp.c_fc",
        fc2="mlp.c_proj",
        heads_attr=("num_heads",),
        head_dim="head_dim",
        width_attrs=("split_size",),
    ),
    candidate_roles=("qkv", "o", "fc1", "fc2"),
    frozen_roles=("embed",),
    parallel_adapter=("mlp_in", "mlp_out"),
    prompt_input=r"transformer",
)
