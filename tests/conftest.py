"""Test session settings: offline Hub, one thread (2-core machines), recipes/ importable, fixtures."""

import os
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.testing_utils import tiny_bert, tiny_dataset  # noqa: E402


torch.set_num_threads(1)
# The recipes' data and models (recipes/tasks.py) are not part of hf_mlrs: import them as the recipes do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def dataset():
    return tiny_dataset()
