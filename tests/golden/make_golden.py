"""Writes tests/golden/golden.safetensors: pinned outputs of the REFERENCES (HF transformers'
LlamaForCausalLM, PEFT's LoRA) on tiny seeded models, for tests that must mean something when
transformers or peft change or are not installed (tests/llama/test_golden.py,
tests/finetune/test_golden.py). Nothing of this package is imported here.

    python tests/golden/make_golden.py

Contents (tensor names; everything a test needs is in the file, so no test depends on RNG
stability):
- `input_ids`: the [2, 12] int64 tokens every case is run on.
- `weights/<w>/<HF name>`: the weights of model <w> under HF LlamaForCausalLM's names, e.g.
  `weights/mha/model.layers.0.self_attn.q_proj.weight`. Stored as float16: the values are drawn
  in float32, rounded to float16 once, and HF ran on exactly those values in float32, so a float32
  copy of the stored tensor is the reference's weight, bit for bit (half the file size).
- `weights/lora/<PEFT adapter key>`: the LoRA A/B tensors under PEFT's adapter-file names
  (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...), float16 likewise.
- `logits/<case>`: the reference's float32 logits [2, 12, vocab] for input_ids.
- `greedy/gqa`: HF's greedy `generate` of GREEDY_NEW tokens after input_ids[0, :GREEDY_PROMPT].

`__metadata__` (all strings): versions of torch/transformers/peft, the date, `configs` (JSON:
per case the LlamaConfig values, `weights` naming the stored weight set it runs on, and for lora
the LoraConfig values and its base case) and the greedy settings.

Cases: mha (4 kv heads), gqa (2 kv heads), llama3 (gqa shapes, rope_theta 500000, llama3 rope
scaling with original_max_position_embeddings 16 so the scaling changes positions 0..11),
lora (the gqa model with a LoRA on all seven projections, B random instead of PEFT's zeros).
llama3 runs on gqa's weight set (same shapes): a second set would add ~45 KB and test nothing
more, and with shared weights the script can check that the scaling is what moves its logits.
"""
import datetime
import json
import math
import sys
from pathlib import Path

import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parent / "golden.safetensors"

BASE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    vocab_size=64, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
    max_position_embeddings=64,
)
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
MODELS = {  # case -> (LlamaConfig values, stored weight set, seed of that set)
    "mha": ({**BASE}, "mha", 1),
    "gqa": ({**BASE, "num_key_value_heads": 2}, "gqa", 2),
    "llama3": ({**BASE, "num_key_value_heads": 2, "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}, "gqa", 2),
}
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
LORA_BASE, LORA_SEED = "gqa", 3
TOKENS_SEED = 4
SHAPE = (2, 12)
GREEDY_CASE, GREEDY_PROMPT, GREEDY_NEW = "gqa", 5, 8

MIN_GREEDY_MARGIN = 1e-3  # top-1 minus top-2 logit along the greedy path: a tie would make the test flaky
MIN_EFFECT = 0.1  # what the llama3 scaling and the LoRA must each move the logits by (max abs), logits O(1)


def half_exact(t: torch.Tensor) -> torch.Tensor:
    """t rounded to float16 values, kept in float32 (what is stored is exactly what HF runs on)."""
    return t.half().float()


def hf_model(values: dict) -> LlamaForCausalLM:
    # a copy: transformers 5 writes rope_theta into the rope_scaling dict it is given
    cfg = LlamaConfig(**json.loads(json.dumps(values)), attn_implementation="eager")
    # guard against a transformers version that silently drops or renames a setting
    rope = getattr(cfg, "rope_parameters", None) or {**(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    assert rope["rope_theta"] == values["rope_theta"], rope
    if values["rope_scaling"]:
        assert {k: rope[k] for k in values["rope_scaling"]} == values["rope_scaling"], rope
    assert cfg.tie_word_embeddings is values["tie_word_embeddings"]
    return LlamaForCausalLM(cfg).float().eval()


def random_weights(model: LlamaForCausalLM, seed: int) -> dict:
    """HF name -> float32 tensor of float16 values: norms U(0.5, 1.5), embeddings N(0, 1), matrices
    N(0, 1/fan_in) so the logits are O(1) and differences show."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in sorted(model.state_dict().items()):
        if name.endswith("norm.weight"):
            t = torch.rand(p.shape, generator=g) + 0.5
        elif "embed_tokens" in name:
            t = torch.randn(p.shape, generator=g)
        else:
            t = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
        out[name] = half_exact(t)
    return out


def load(model: LlamaForCausalLM, weights: dict) -> LlamaForCausalLM:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    return model


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert out.dtype == torch.float32 and out.shape == (*ids.shape, model.config.vocab_size)
    return out.contiguous()


@torch.no_grad()
def greedy(model, prompt: torch.Tensor) -> tuple[torch.Tensor, float]:
    """HF generate's greedy continuation, checked against argmax over full forwards (so neither the
    KV cache nor min_new_tokens' eos suppression decided a token); returns it and the smallest
    top-1/top-2 logit gap on the way."""
    ids = prompt[None]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=GREEDY_NEW,
                         min_new_tokens=GREEDY_NEW, pad_token_id=0)
    new = out[0, ids.shape[1]:]
    assert new.shape == (GREEDY_NEW,), new
    seq, margin = ids, math.inf
    for _ in range(GREEDY_NEW):
        last = logits(model, seq)[0, -1]
        top2 = last.topk(2).values
        margin = min(margin, (top2[0] - top2[1]).item())
        seq = torch.cat([seq, last.argmax()[None, None]], dim=1)
    assert torch.equal(seq[0, ids.shape[1]:], new), (seq, new)
    return new.clone(), margin


def main() -> None:
    torch.set_num_threads(1)  # determinism of the reductions is not at stake, but keep runs comparable
    ids = torch.randint(0, BASE["vocab_size"], SHAPE, generator=torch.Generator().manual_seed(TOKENS_SEED))
    tensors = {"input_ids": ids}
    weight_sets, models, configs = {}, {}, {}
    notes = {}

    for case, (values, wset, seed) in MODELS.items():
        model = hf_model(values)
        if wset not in weight_sets:
            weight_sets[wset] = random_weights(model, seed)
        models[case] = load(model, weight_sets[wset])
        tensors[f"logits/{case}"] = logits(models[case], ids)
        configs[case] = {**values, "weights": wset, "weights_seed": seed}

    # the llama3 scaling must matter at these positions: same weights and theta, no scaling
    plain = load(hf_model({**MODELS["llama3"][0], "rope_scaling": None}), weight_sets["gqa"])
    notes["llama3_vs_unscaled_max_abs"] = (logits(plain, ids) - tensors["logits/llama3"]).abs().max().item()
    assert notes["llama3_vs_unscaled_max_abs"] > MIN_EFFECT, notes

    new, margin = greedy(models[GREEDY_CASE], ids[0, :GREEDY_PROMPT])
    tensors[f"greedy/{GREEDY_CASE}"] = new
    notes["greedy_min_top2_margin"] = margin
    assert margin > MIN_GREEDY_MARGIN, margin

    # lora: a fresh gqa model (get_peft_model wraps it in place), A and B from our generator
    base_values = MODELS[LORA_BASE][0]
    peft_model = get_peft_model(load(hf_model(base_values), weight_sets[LORA_BASE]), LoraConfig(**LORA)).eval()
    g = torch.Generator().manual_seed(LORA_SEED)
    adapter = {}
    with torch.no_grad():
        for key, p in sorted(get_peft_model_state_dict(peft_model).items()):
            if ".lora_A." in key:
                t = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
            else:
                assert ".lora_B." in key, key
                t = torch.randn(p.shape, generator=g) * 0.3  # PEFT inits B to zero: no LoRA at all
            adapter[key] = half_exact(t)
    n = len(peft_model.load_state_dict(
        {k.replace(".weight", ".default.weight"): v for k, v in adapter.items()}, strict=False).unexpected_keys)
    assert n == 0
    assert all(torch.equal(v, get_peft_model_state_dict(peft_model)[k]) for k, v in adapter.items())
    assert len(adapter) == 2 * len(LORA["target_modules"]) * base_values["num_hidden_layers"]
    tensors["logits/lora"] = logits(peft_model, ids)
    notes["lora_vs_base_max_abs"] = (tensors["logits/lora"] - tensors[f"logits/{LORA_BASE}"]).abs().max().item()
    assert notes["lora_vs_base_max_abs"] > MIN_EFFECT, notes
    configs["lora"] = {**base_values, "weights": LORA_BASE, "weights_seed": MODELS[LORA_BASE][2],
                       "lora": {**LORA, "adapter_weights": "lora", "seed": LORA_SEED}}

    for wset, weights in weight_sets.items():
        tensors.update({f"weights/{wset}/{k}": v.half() for k, v in weights.items()})
    tensors.update({f"weights/lora/{k}": v.half() for k, v in adapter.items()})

    metadata = {
        "script": "tests/golden/make_golden.py",
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "python": sys.version.split()[0],
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "attn_implementation": "eager", "dtype": "float32 (weights stored as float16-exact values)",
        "configs": json.dumps(configs, sort_keys=True),
        "greedy": json.dumps({"case": GREEDY_CASE, "prompt": f"input_ids[0, :{GREEDY_PROMPT}]",
                              "max_new_tokens": GREEDY_NEW, "min_new_tokens": GREEDY_NEW, "do_sample": False}),
        "notes": json.dumps(notes, sort_keys=True),
    }
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(OUT), metadata=metadata)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(tensors)} tensors)")
    print(json.dumps(notes, indent=2))


if __name__ == "__main__":
    main()
