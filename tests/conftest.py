"""Shared fixtures: a sentencepiece tokenizer trained once per session, tiny configs."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama.config import ModelArgs  # noqa: E402
from llama.tiny import train_tokenizer  # noqa: E402

TOKENIZER_VOCAB = 384


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(path, vocab_size=TOKENIZER_VOCAB)
    return path


def tiny_args(**overrides) -> ModelArgs:
    """dim 64, 2 layers, 4 heads; pass n_kv_heads=2 for GQA."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=TOKENIZER_VOCAB, multiple_of=32)
    return ModelArgs(**{**base, **overrides})
