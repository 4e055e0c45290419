"""A tiny offline byte-level BPE tokenizer and a tiny random Llama causal LM for the tests."""

from __future__ import annotations

import os
from functools import lru_cache

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CORPUS = (
    "Review: a gorgeous, witty film.\nSentiment: positive",
    "Review: tedious and far too long.\nSentiment: negative",
    "Question: What language are you written in?\nAnswer: Python.",
    "Question: Who wrote Hamlet?\nAnswer: William Shakespeare",
    "The following are multiple choice questions (with answers) about anatomy.",
    "A. one B. two C. three D. four Answer: A B C D",
    "the quick brown fox jumps over the lazy dog, 0123456789 times!",
)


@lru_cache(maxsize=2)
def _trained(pad: bool) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD] if pad else [BOS, EOS]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def tiny_tokenizer(pad: bool = True):
    """A ``PreTrainedTokenizerFast``: byte-level BPE (exact round trip), ``bos`` prepended,
    ``eos`` ``</s>``, and a pad token ``<pad>`` unless ``pad=False``."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {"pad_token": PAD} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=_trained(pad), bos_token=BOS, eos_token=EOS, **kwargs
    )


def tiny_llama(tokenizer, seed: int = 0) -> torch.nn.Module:
    """A random ``LlamaForCausalLM``: hidden 32, 2 layers, 4 heads, 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()
