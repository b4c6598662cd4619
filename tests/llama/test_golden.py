"""Our model against pinned HF transformers outputs: tests/golden/golden.safetensors, written by
tests/golden/make_golden.py from LlamaForCausalLM (float32, eager attention) on tiny seeded models.

Needs neither transformers nor peft: the weights, the inputs and HF's logits and greedy tokens are
all in the file. Each case's stored weights (HF names) and a config.json written here from the
file's metadata make an HF folder, which the package's loader reads. The live comparisons with
HF are in test_model.py / test_decode.py; these keep meaning something when transformers changes
or is missing.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file


# --- the package API (being moved: update the imports here only) ----------------------------------


def load_hf_folder(ckpt_dir):
    """Our Transformer (float32, CPU) from an HF checkpoint folder."""
    from llama.formats import read_model_args
    from llama.loader import load_model

    return load_model(ckpt_dir, read_model_args(ckpt_dir))


def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    """Llama.generate at temperature 0 (argmax), n tokens, never stopping at eos: the tokenizer is
    only asked for pad_id, eos_id and stop_ids, and there is no stop token (HF generated with
    min_new_tokens = n, and make_golden.py checked its tokens are the plain argmax ones)."""
    from llama.generation import Llama

    model.setup_caches(1, 32)
    llama = Llama(model, SimpleNamespace(pad_id=0, eos_id=-1, stop_ids=frozenset()), max_seq_len=32, max_batch_size=1)
    return llama.generate([prompt], max_gen_len=n, temperature=0)[0]


# --- the pinned file ------------------------------------------------------------------------------

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "golden.safetensors"
# float32 ours vs float32 HF, logits O(1). Measured max |diff|: mha 1.9e-6, gqa 1.1e-6,
# llama3 1.2e-6 (torch 2.13 CPU, 2 cores)
TOL = 1e-5
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings")


@pytest.fixture(scope="module")
def golden():
    """(tensors, metadata) of the pinned file."""
    with safe_open(GOLDEN, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def write_hf_folder(golden, case: str, d: Path) -> Path:
    """An HF checkpoint of the case: config.json from the pinned config, model.safetensors from the
    pinned weights (float16-exact values, written as the float32 that HF ran on)."""
    tensors, meta = golden
    cfg = json.loads(meta["configs"])[case]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **{k: cfg[k] for k in CONFIG_KEYS}}
    prefix = f"weights/{cfg['weights']}/"
    weights = {k.removeprefix(prefix): v.float().contiguous() for k, v in tensors.items() if k.startswith(prefix)}
    assert weights, prefix
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(d / "model.safetensors"))
    return d


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", ["mha", "gqa", "llama3"])
def test_logits_match_pinned_hf(golden, case, tmp_path):
    tensors, _ = golden
    model = load_hf_folder(write_hf_folder(golden, case, tmp_path / case)).eval()
    with torch.no_grad():
        ours = model(tensors["input_ids"])
    expected = tensors[f"logits/{case}"]
    assert ours.dtype == torch.float32
    assert max_diff(ours, expected) < TOL, f"{case}: max |ours - HF| = {max_diff(ours, expected):.3g}"


def test_greedy_decoding_matches_pinned_hf(golden, tmp_path):
    """Prefill + KV-cache steps give HF generate's greedy tokens (gqa)."""
    tensors, meta = golden
    settings = json.loads(meta["greedy"])
    assert settings["case"] == "gqa" and settings["prompt"] == "input_ids[0, :5]"
    expected = tensors["greedy/gqa"].tolist()
    model = load_hf_folder(write_hf_folder(golden, "gqa", tmp_path / "gqa")).eval()
    prompt = tensors["input_ids"][0, :5].tolist()
    assert greedy_tokens(model, prompt, len(expected)) == expected
