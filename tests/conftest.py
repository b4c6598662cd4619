"""Shared fixtures (pytest finds them here): a sentencepiece tokenizer trained once per session.
The tests' helpers are in tests/utils.py."""
import sys
from pathlib import Path

import pytest

# the worktree's own packages come first (tests.utils.ROOT), ahead of any installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.tiny import train_tokenizer  # noqa: E402
from tests.utils import TOKENIZER_VOCAB  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(path, vocab_size=TOKENIZER_VOCAB)
    return path
