"""Our LoRA adapter loading against pinned PEFT outputs: tests/golden/golden.safetensors, written by
tests/golden/make_golden.py from PEFT's get_peft_model on HF's LlamaForCausalLM (float32, eager
attention): the gqa model with a LoRA (r 4, alpha 8) on all seven projections, A and B random.

Needs neither transformers nor peft: the base weights (HF names), the adapter tensors (PEFT's
adapter-file names), the inputs and PEFT's logits are all in the file. The base becomes an HF
folder and the adapter a PEFT adapter folder, written here, which the package's loaders read.
The live comparisons with PEFT are in test_lora.py.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


# --- the package API (being moved: update the imports here only) ----------------------------------


def load_with_adapter(base_dir, adapter_dir):
    """Our Transformer (float32, CPU) from an HF checkpoint folder, with a PEFT adapter folder applied."""
    from finetune.adapters import load_adapter
    from llama.formats import read_model_args
    from llama.loader import load_model

    return load_adapter(load_model(base_dir, read_model_args(base_dir)), adapter_dir)


# --- the pinned file ------------------------------------------------------------------------------

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "golden.safetensors"
# float32 ours vs float32 PEFT, logits O(1) (the LoRA moves them by up to 4.2). Measured max |diff|:
# 2.3e-6 (torch 2.13 CPU, 2 cores)
TOL = 1e-5
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings")


def read_golden():
    with safe_open(GOLDEN, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def stored(tensors: dict, prefix: str) -> dict:
    """The tensors under prefix, renamed without it, as float32 (they are float16-exact values)."""
    out = {k.removeprefix(prefix): v.float().contiguous() for k, v in tensors.items() if k.startswith(prefix)}
    assert out, prefix
    return out


def write_folders(root: Path) -> tuple[Path, Path, dict]:
    """(HF base folder, PEFT adapter folder, pinned tensors) of the lora case."""
    tensors, meta = read_golden()
    cfg = json.loads(meta["configs"])["lora"]
    lora = cfg["lora"]
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **{k: cfg[k] for k in CONFIG_KEYS}}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    save_file(stored(tensors, f"weights/{cfg['weights']}/"), str(base / "model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "inference_mode": True,
        "r": lora["r"], "lora_alpha": lora["lora_alpha"], "lora_dropout": lora["lora_dropout"],
        "target_modules": lora["target_modules"], "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
    }
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    save_file(stored(tensors, f"weights/{lora['adapter_weights']}/"), str(adapter / "adapter_model.safetensors"))
    return base, adapter, tensors


def test_lora_logits_match_pinned_peft(tmp_path):
    base, adapter, tensors = write_folders(tmp_path)
    model = load_with_adapter(base, adapter).eval()
    with torch.no_grad():
        ours = model(tensors["input_ids"])
    expected = tensors["logits/lora"]
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    diff = (ours - expected).abs().max().item()
    assert diff < TOL, f"max |ours - PEFT| = {diff:.3g}"
