"""Evaluation of causal language models on prompt/response pairs.

Two metrics, both fractions in [0, 1]:

* :func:`choice_accuracy`: the model picks the class whose response is most likely::

      score(pair, c) = sum_t log p(choice_c[t] | prompt, choice_c[:t])
      prediction     = argmax_c score(pair, c)          (compared with pair.label)

  When every choice is a single token after the prompt (``" A"`` .. ``" D"``), one forward
  pass of the prompt scores all of them.
* :func:`exact_match`: greedy decoding from the left-padded prompt until ``eos``, the end of
  the first non-blank line or ``max_new_tokens``; that line is compared with the response
  after :func:`normalize`.

Any model works whose call ``model(input_ids=..., attention_mask=...)`` returns logits (a
tensor, or an object with ``.logits``), including models whose linears slimtune wrapped.
``position_ids`` (needed for left padding) and the KV cache (``cache`` or
``past_key_values``, with ``use_cache``) are used when the model's ``forward`` accepts them;
otherwise each step runs on the whole sequence so far. The model runs in eval mode under ``torch.no_grad`` on its own
device; every module's training flag is restored afterwards.
"""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.decoder import PromptPair
from .data.lm_collate import bos_token_id, encode_pair, eos_token_id, fit_prompt, pad_token_id

__all__ = [
    "choice_scores",
    "choice_predictions",
    "choice_accuracy",
    "generate_greedy",
    "first_line",
    "normalize",
    "exact_match",
]

_SPACE = re.compile(r"\s+")


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients; every module's own training flag is restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, tuple | list):
        return output[0]
    raise TypeError(f"model returned {type(output).__name__}; expected logits or .logits")


def _check_pairs(pairs: Sequence[PromptPair]) -> None:
    if not pairs:
        raise ValueError("no pairs to evaluate")


def choice_scores(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PromptPair],
    choices: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
) -> Tensor:
    """Log-likelihood of each choice after each prompt: a float tensor (len(pairs), len(choices)).

    Prompts longer than ``max_length`` minus the longest choice lose their start (a leading
    ``bos`` is kept), as in :class:`~slimtune.app.data.lm_collate.LMCollator`.
    """
    _check_pairs(pairs)
    if not choices:
        raise ValueError("choices is empty")
    bos = bos_token_id(tokenizer)
    # a request: (token ids, [(pair, choice, first scored position, choice ids)])
    requests: list[tuple[list[int], list[tuple[int, int, int, list[int]]]]] = []
    for i, pair in enumerate(pairs):
        encoded = [encode_pair(tokenizer, pair.prompt, choice) for choice in choices]
        longest = max(len(ids) for _, ids in encoded)
        if longest == 0 or longest >= max_length:
            raise ValueError(
                f"choices {list(choices)!r} tokenise to 0 or >= max_length={max_length} tokens"
            )
        if not encoded[0][0]:
            raise ValueError(f"prompt {pair.prompt!r} tokenises to no token: nothing to score from")
        shared = all(p == encoded[0][0] and len(c) == 1 for p, c in encoded)
        if shared:  # one pass of the prompt scores every single-token choice
            context = fit_prompt(encoded[0][0], max_length - 1, bos)
            items = [(i, j, len(context), c) for j, (_, c) in enumerate(encoded)]
            requests.append((context, items))
            continue
        for j, (prompt_ids, choice_ids) in enumerate(encoded):
            context = fit_prompt(prompt_ids, max_length - len(choice_ids), bos)
            requests.append((context + choice_ids, [(i, j, len(context), choice_ids)]))
    scores = torch.full((len(pairs), len(choices)), float("nan"))
    pad, device = pad_token_id(tokenizer), _device(model)
    order = sorted(range(len(requests)), key=lambda r: len(requests[r][0]))  # less padding
    with _inference(model):
        for start in range(0, len(order), batch_size):
            batch = [requests[r] for r in order[start : start + batch_size]]
            longest = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, (ids, _) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            logits = _logits(model(input_ids=input_ids.to(device), attention_mask=mask.to(device)))
            where: list[tuple[int, int]] = []
            values: list[Tensor] = []
            for row, (_, items) in enumerate(batch):
                for i, j, first, choice_ids in items:
                    # log-softmax over the vocabulary at the scored positions only
                    at = logits.device
                    steps = torch.arange(first - 1, first - 1 + len(choice_ids), device=at)
                    logp = F.log_softmax(logits[row, steps].float(), dim=-1)
                    targets = torch.tensor(choice_ids, dtype=torch.long, device=at)
                    values.append(logp.gather(1, targets[:, None]).sum())
                    where.append((i, j))
            for (i, j), value in zip(where, torch.stack(values).cpu(), strict=True):
                scores[i, j] = value
    return scores


def choice_predictions(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PromptPair],
    choices: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
) -> list[int]:
    """Index of the most likely choice for each pair (the first one on ties)."""
    scores = choice_scores(
        model, tokenizer, pairs, choices, batch_size=batch_size, max_length=max_length
    )
    return [int(k) for k in scores.argmax(dim=1)]


def choice_accuracy(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PromptPair],
    choices: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
) -> float:
    """Fraction of pairs whose most likely choice is ``pair.label``.

    Raises:
        ValueError: no pairs, or a pair without a label in ``0 .. len(choices) - 1``.
    """
    _check_pairs(pairs)
    for pair in pairs:
        if pair.label is None or not 0 <= pair.label < len(choices):
            raise ValueError(f"label {pair.label!r} outside 0..{len(choices) - 1} in {pair!r}")
    predicted = choice_predictions(
        model, tokenizer, pairs, choices, batch_size=batch_size, max_length=max_length
    )
    hits = sum(p == pair.label for p, pair in zip(predicted, pairs, strict=True))
    return hits / len(pairs)


def _greedy_batch(
    model: nn.Module,
    prompts: list[list[int]],
    pad: int,
    eos: int,
    max_new_tokens: int,
    stop: Callable[[list[int]], bool],
) -> list[list[int]]:
    """Greedy continuations of left-padded prompts (``stop(ids)`` ends a row early)."""
    device = _device(model)
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, longest - len(ids) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    with_positions = _accepts(model, "position_ids")
    # transformers >= 5.2x names the KV cache ``cache``; earlier versions ``past_key_values``
    cache_name = next((n for n in ("cache", "past_key_values") if _accepts(model, n)), None)
    with_cache = cache_name is not None and _accepts(model, "use_cache")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    step_ids, cache = input_ids, None
    for _ in range(max_new_tokens):
        kwargs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": mask}
        if with_positions:
            kwargs["position_ids"] = positions[:, -step_ids.shape[1] :]
        if with_cache:
            kwargs["use_cache"] = True
            if cache is not None:
                kwargs[str(cache_name)] = cache
        output = model(**kwargs)
        next_ids = _logits(output)[:, -1, :].argmax(dim=-1)
        next_ids = torch.where(torch.tensor(done, device=device), pad, next_ids)
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token == eos:
                done[row] = True
            else:
                generated[row].append(token)
                done[row] = bool(stop(generated[row]))
        if all(done):
            break
        cache = getattr(output, str(cache_name), None) if with_cache else None
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        input_ids = torch.cat([input_ids, next_ids.unsqueeze(1)], dim=1)
        step_ids = input_ids[:, -1:] if cache is not None else input_ids
    return generated


def generate_greedy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_length: int = 256,
) -> list[str]:
    """Greedy continuation of each prompt: its first non-blank line.

    Decoding stops at ``eos``, at the newline that ends the first non-blank line (blank lines
    before it are skipped: a model may start its answer on a new line) or after
    ``max_new_tokens`` tokens. Prompts longer than ``max_length`` tokens lose their start.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos, pad = eos_token_id(tokenizer), pad_token_id(tokenizer)
    bos = bos_token_id(tokenizer)

    def text(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    encoded = [fit_prompt(list(tokenizer(p)["input_ids"]), max_length, bos) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = [""] * len(encoded)
    with _inference(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            generated = _greedy_batch(
                model,
                [encoded[i] for i in rows],
                pad,
                eos,
                max_new_tokens,
                stop=lambda ids: "\n" in text(ids).lstrip(),  # a non-blank line has ended
            )
            for i, ids in zip(rows, generated, strict=True):
                out[i] = first_line(text(ids))
    return out


def first_line(text: str) -> str:
    """The first line of ``text`` that is not blank (``""`` when there is none)."""
    return next((line for line in text.split("\n") if line.strip()), "")


def normalize(text: str) -> str:
    """Lower case, inner whitespace runs as one space, no surrounding whitespace or trailing
    punctuation (``"  Python. "`` -> ``"python"``)."""
    text = _SPACE.sub(" ", text.lower()).strip()
    return text.rstrip(string.punctuation + " ")


def exact_match(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PromptPair],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_length: int = 256,
) -> float:
    """Fraction of pairs whose greedy continuation equals the response after :func:`normalize`."""
    _check_pairs(pairs)
    outputs = generate_greedy(
        model,
        tokenizer,
        [pair.prompt for pair in pairs],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_length=max_length,
    )
    hits = sum(
        normalize(out) == normalize(pair.response) for out, pair in zip(outputs, pairs, strict=True)
    )
    return hits / len(pairs)
