"""The offline tasks: real data from packages, parsed and split as documented."""

import gzip
import struct

import numpy as np
import pytest

import tasks  # recipes/tasks.py, on sys.path through conftest.py


def write_idx(path, array):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_are_parsed(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    assert tasks.read_idx(tmp_path / "train-images-idx3-ubyte.gz").shape == (12, 28, 28)
    monkeypatch.setattr(tasks, "FASHION_DIR", tmp_path)
    tasks._fashion.cache_clear()
    try:
        train, test = tasks._fashion()
    finally:
        tasks._fashion.cache_clear()
    assert len(train) == 12 and len(test) == 5
    pixels = train[0]["pixel_values"]
    assert tuple(pixels.shape) == (1, 28, 28) and -1.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    assert train.with_format(None)["labels"] == [i % 10 for i in range(12)]


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "FASHION_DIR", tmp_path)
    tasks._fashion.cache_clear()
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        tasks._fashion()
    tasks._fashion.cache_clear()


def test_bbc_news_is_deduplicated_and_split_without_overlap():
    texts, labels, names = tasks.bbc_articles()
    assert len(texts) == len(set(texts)) == 2127 and names == tuple(sorted(names)) and len(names) == 5
    train, test = tasks.stratified_split(list(labels), test_fraction=0.2, seed=0)
    assert not set(train) & set(test) and len(train) + len(test) == 2127
    for k in range(5):  # the same class proportions on both sides, to within one article
        share = sum(labels[i] == k for i in test) / len(test)
        assert abs(share - labels.count(k) / len(labels)) < 0.01


def test_load_task_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown task"):
        tasks.load_task("cifar", "tiny")
    with pytest.raises(ValueError, match="has no model 'minilm-L2'"):
        tasks.load_task("digits", "minilm-L2")


def test_digits_task_trains_shapes():
    task = tasks.load_task("digits", "tiny", max_test=20)
    batch = task.train[:4]
    out = task.model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    assert out.logits.shape == (4, 10) and out.loss.ndim == 0 and len(task.test) == 20


def test_lm_task_splits_articles_and_predicts_bytes():
    task = tasks.load_task("lm", "tiny", max_train=64, max_test=16)
    assert task.num_labels == 256 and len(task.train) == 64 and len(task.test) == 16
    batch = task.train[:4]
    assert tuple(batch["input_ids"].shape) == (4, tasks.LM_BLOCK) and int(batch["input_ids"].max()) < 256
    out = task.model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert out.logits.shape == (4, tasks.LM_BLOCK, 256) and abs(out.loss.item() - np.log(256)) < 0.5
    train, test = tasks._bbc_bytes(0)
    blocks = {bytes(row) for row in np.asarray(test["input_ids"][:200], dtype=np.uint8)}
    assert not blocks & {bytes(row) for row in np.asarray(train["input_ids"], dtype=np.uint8)}  # by article
