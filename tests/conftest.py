"""Shared test set-up: offline, small, deterministic, and a private token cache."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import SHAKESPEARE_TEXT as SAMPLE_TEXT
from helpers import private_cache, write_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread: tiny models gain nothing from more, and spinning OpenMP threads on a
# loaded 2-core machine slow small steps down a hundredfold.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(private_cache(tmp_path_factory)))


@pytest.fixture
def corpus_path(tmp_path):
    """SAMPLE_TEXT in a file of this test's own."""
    return write_corpus(tmp_path, SAMPLE_TEXT)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """SAMPLE_TEXT in a file the tests of a module share (none may change it)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), SAMPLE_TEXT)
