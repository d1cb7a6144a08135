"""Shared fixtures: tiny GPT-2-shaped models built and trained locally; nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: on a small shared CI machine two torch threads fight over the cores and run ~10x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own DETOX_TUI_HOME so the run store and caches never leak between tests."""
    monkeypatch.setenv("DETOX_TUI_HOME", str(tmp_path / "detox-home"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An untrained 4-layer GPT-2 (d_model 64, MLP 256) with a trained byte-level BPE tokenizer."""
    from detox_tui.tiny import save_random_model

    return save_random_model(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def insult_model_dir(tmp_path_factory):
    """A tiny GPT-2 trained to complete INSULT_PAIRS' prompts with fixed insults (greedy)."""
    from detox_tui.tiny import train_insult_model

    return train_insult_model(tmp_path_factory.mktemp("insult-gpt2"), steps=300)


@pytest.fixture
def tiny_lm(tiny_model_dir):
    from detox_tui.backends.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture
def insult_lm(insult_model_dir):
    """A fresh copy per test: tests may edit its weights."""
    from detox_tui.backends.models import load_model

    return load_model(str(insult_model_dir), device="cpu", dtype="float32")
