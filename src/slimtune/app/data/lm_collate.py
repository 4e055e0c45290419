"""Batches for causal language-model fine-tuning: the loss falls on the response tokens only.

Each :class:`~slimtune.app.data.decoder.PromptPair` becomes one token sequence::

    input_ids  [bos] p1 p2 ... pm   r1 r2 ... rn  eos   pad pad
    labels     -100 -100 ...  -100  r1 r2 ... rn  eos  -100 -100
    attention    1    1  ...    1    1  1  ...  1   1     0   0

Labels sit at the same positions as ``input_ids``: Hugging Face causal LMs shift them inside
``forward`` (the logits at position ``t`` predict the label at ``t + 1``), so ``-100`` on the
prompt and on the padding means that only the response and its ``eos`` are learnt.

With ``pack=True`` the examples of a batch are laid end to end and cut into rows of exactly
``max_length`` tokens (no padding except at the end of the last row, whose padded positions
have attention mask 0 and label -100; nothing is dropped)::

    row 0  [p p p r r e p p p p]      labels  [- - - r r e - - - -]
    row 1  [r r r e p p r e p p]      labels  [r r r e - - r e - -]

Caveat: a packed row is one sequence to the model, so an example attends to the examples
before it in the same row (no block-diagonal mask; ``eos`` is the only separator), and
position ids run on across example boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from .decoder import PromptPair

__all__ = [
    "IGNORE_INDEX",
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
    "encode_pair",
    "fit_prompt",
    "LMDataset",
    "LMCollator",
]

IGNORE_INDEX = -100
"""Label of the positions that carry no loss (``ignore_index`` of ``cross_entropy``)."""


def _first(token_id: Any) -> int | None:
    """An id, or the first of a list of ids (``eos_token_id`` may be a list)."""
    if isinstance(token_id, list | tuple):
        token_id = token_id[0] if token_id else None
    return None if token_id is None else int(token_id)


def eos_token_id(tokenizer: Any) -> int:
    """The tokenizer's end-of-sequence id.

    Raises:
        ValueError: the tokenizer has no eos token.
    """
    eos = _first(getattr(tokenizer, "eos_token_id", None))
    if eos is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no eos token; a causal LM needs one to "
            "end its responses: set tokenizer.eos_token first"
        )
    return eos


def bos_token_id(tokenizer: Any) -> int | None:
    """The tokenizer's beginning-of-sequence id, or ``None``."""
    return _first(getattr(tokenizer, "bos_token_id", None))


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the pad token, or the eos token when there is none.

    Many decoder tokenizers (Llama, SmolLM, GPT-2) define no pad token. Padding with ``eos`` is
    safe because padded positions have attention mask 0 and label ``-100``; a model that
    finds the last real token through ``config.pad_token_id`` must be given the same id.
    """
    pad = _first(getattr(tokenizer, "pad_token_id", None))
    return eos_token_id(tokenizer) if pad is None else pad


def encode_pair(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt (with the tokenizer's special prefix, e.g. ``bos``) and a response.

    The response ids are what the tokenizer makes of ``prompt + response`` after the prompt's
    ids, so the model is trained on (and scored against) the tokens it would read in running
    text. When the joint tokenisation does not start with the prompt's ids (a token merging
    across the boundary), the response is tokenised on its own instead.
    """
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not response:
        return prompt_ids, []
    full = list(tokenizer(prompt + response)["input_ids"])
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full[len(prompt_ids) :]
    return prompt_ids, list(tokenizer(response, add_special_tokens=False)["input_ids"])


def fit_prompt(prompt_ids: list[int], room: int, bos_id: int | None) -> list[int]:
    """The last ``room`` prompt ids, keeping a leading ``bos`` (cut from the left)."""
    if len(prompt_ids) <= room:
        return prompt_ids
    if room <= 0:
        return []
    if bos_id is not None and prompt_ids[0] == bos_id:
        return prompt_ids[:1] + prompt_ids[len(prompt_ids) - room + 1 :]
    return prompt_ids[len(prompt_ids) - room :]


class LMDataset(Dataset):
    """A list of :class:`~slimtune.app.data.decoder.PromptPair`; batch it with :class:`LMCollator`."""

    def __init__(self, pairs: Sequence[PromptPair]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PromptPair:
        return self.pairs[index]


@dataclass
class LMCollator:
    """Tokenises prompt-response pairs into ``input_ids``, ``attention_mask``, ``labels``.

    Without packing, each row is ``prompt + response + eos``, right-padded to the longest row
    of the batch. A row longer than ``max_length`` keeps its whole response and loses the
    start of its prompt (cut from the left, after a leading ``bos``); a response that alone
    exceeds ``max_length`` keeps its first ``max_length`` tokens and no prompt.

    With ``pack=True`` (see the module docstring) the rows are blocks of exactly
    ``max_length`` tokens, the last one padded (nothing is dropped; a batch shorter than one
    block is one padded row). Evaluation never packs.

    Example:
        >>> loader = DataLoader(LMDataset(task.train), batch_size=8,
        ...                     collate_fn=LMCollator(tokenizer, 256))  # doctest: +SKIP
    """

    tokenizer: Any
    """A Hugging Face tokenizer (needs an eos token; pads with eos when it has no pad)."""
    max_length: int
    """Longest row (or exact row length when packing), in tokens."""
    pack: bool = False
    """Concatenate the examples into full rows instead of padding them."""
    pad_id: int = field(init=False)
    """Id written into padded positions (:func:`pad_token_id`)."""
    eos_id: int = field(init=False)
    """Id appended to every response (:func:`eos_token_id`)."""
    bos_id: int | None = field(init=False)
    """The tokenizer's ``bos`` id, kept at the start of a prompt cut from the left."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        self.eos_id = eos_token_id(self.tokenizer)
        self.pad_id = pad_token_id(self.tokenizer)
        self.bos_id = bos_token_id(self.tokenizer)

    def encode(self, pair: PromptPair) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one pair, untruncated."""
        prompt_ids, response_ids = encode_pair(self.tokenizer, pair.prompt, pair.response)
        target = [*response_ids, self.eos_id]
        return prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target

    def __call__(self, pairs: Sequence[PromptPair]) -> dict[str, Tensor]:
        if not pairs:
            raise ValueError("cannot collate an empty batch")
        return self._packed(pairs) if self.pack else self._padded(pairs)

    def _padded(self, pairs: Sequence[PromptPair]) -> dict[str, Tensor]:
        rows: list[tuple[list[int], list[int]]] = []
        for pair in pairs:
            prompt_ids, response_ids = encode_pair(self.tokenizer, pair.prompt, pair.response)
            target = [*response_ids, self.eos_id][: self.max_length]
            prompt_ids = fit_prompt(prompt_ids, self.max_length - len(target), self.bos_id)
            rows.append((prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target))
        longest = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for row, (ids, labs) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _packed(self, pairs: Sequence[PromptPair]) -> dict[str, Tensor]:
        stream: list[int] = []
        stream_labels: list[int] = []
        for pair in pairs:
            ids, labs = self.encode(pair)
            stream += ids
            stream_labels += labs
        n_rows = -(-len(stream) // self.max_length)  # the last row padded, nothing dropped
        size = n_rows * self.max_length
        pad = size - len(stream)
        input_ids = torch.tensor(stream + [self.pad_id] * pad, dtype=torch.long)
        labels = torch.tensor(stream_labels + [IGNORE_INDEX] * pad, dtype=torch.long)
        attention_mask = torch.ones(size, dtype=torch.long)
        attention_mask[len(stream) :] = 0
        shape = (n_rows, self.max_length)
        return {
            "input_ids": input_ids.view(shape),
            "attention_mask": attention_mask.view(shape),
            "labels": labels.view(shape),
        }
