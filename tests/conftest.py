"""Shared fixtures: a sentencepiece tokenizer trained once per session, tiny configs."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama.config import ModelArgs  # noqa: E402
from llama.tiny import train_tokenizer  # noqa: E402

TOKENIZER_VOCAB = 384

# HF LlamaForCausalLM's names for our per-layer weights, written from REFERENCE.md for the tests'
# own converters (independent of llama/checkpoint.py's table)
HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(path, vocab_size=TOKENIZER_VOCAB)
    return path


def tiny_args(**overrides) -> ModelArgs:
    """dim 64, 2 layers, 4 heads; pass n_kv_heads=2 for GQA."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=TOKENIZER_VOCAB, multiple_of=32)
    return ModelArgs(**{**base, **overrides})
