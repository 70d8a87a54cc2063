"""Shared test set-up: offline, small, deterministic, and a private token cache."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import SHAKESPEARE_TEXT as SAMPLE_TEXT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread: tiny models gain nothing from more, and spinning OpenMP threads on a
# loaded 2-core machine slow small steps down a hundredfold.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "lmlab-cache"))


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(SAMPLE_TEXT, encoding="utf-8")
    return p
