"""Shared fixtures: a sentencepiece tokenizer trained once per session, tiny configs."""
import json
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




def meta_to_hf_rows(w, n_heads: int):
    """Meta q/k rows (rotate interleaved pairs) -> HF rows (rotate halves), per head, as
    REFERENCE.md writes it: the tests' own converter, independent of llama/checkpoint.py."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def hf_to_meta_rows(w, n_heads: int):
    """The inverse of meta_to_hf_rows."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)


def metrics_by_step(out_dir) -> dict:
    """{(step, 'train'|'eval'): record} from a run's metrics.jsonl; a step logged twice fails."""
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        key = (r["step"], "eval" if "eval_loss" in r else "train")
        assert key not in out, f"{key} logged twice"
        out[key] = r
    return out


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(path, vocab_size=TOKENIZER_VOCAB)
    return path


def tiny_args(**overrides) -> ModelArgs:
    """dim 64, 2 layers, 4 heads; pass n_kv_heads=2 for GQA."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=TOKENIZER_VOCAB, multiple_of=32)
    return ModelArgs(**{**base, **overrides})
