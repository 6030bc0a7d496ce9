"""Test session settings: offline Hub, one thread (2-core machines), fixtures."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.testing_utils import tiny_bert, tiny_dataset  # noqa: E402


torch.set_num_threads(1)


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def dataset():
    return tiny_dataset()
