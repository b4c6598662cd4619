"""python -m llama.export against the real clients: transformers loads the HF folder (from a Meta
checkpoint, with a LoRA adapter folded in, from a GPTQ int4 folder, sharded with an index) and
gives our logits; Meta's own Llama-3 reference code (llama-models) loads the pth export, and
Llama-2's strict ModelArgs takes its params.json; bad requests are one line, nothing written."""
import dataclasses
import json
import subprocess
import sys
from typing import Optional

import pytest
import torch

from llama.errors import LlamaInputError
from llama.export import export
from llama.export.hf import write_hf
from llama.export.source import open_export_source
from llama.formats import read_model_args, save_checkpoint
from llama.layers import from_hf_rows, meta_to_hf_key
from llama.loader import load_model
from llama.tiny import random_model
from tests.utils import CASES, ROOT, hf_from_ours, peaked_random_model, random_tokens, tiny_args, write_meta

transformers = pytest.importorskip("transformers")


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out).float()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_path):
    """A tiny GQA model with Llama-3.1 rope scaling, ours, with the sentencepiece tokenizer beside it."""
    d = tmp_path_factory.mktemp("export") / "src"
    args = tiny_args(n_kv_heads=2, rope_theta=500000.0, rope_scaling=dict(CASES[4].hf_rope_scaling))
    save_checkpoint(peaked_random_model(args, seed=4, std=0.1), d)
    (d / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    return d


def test_hf_export_loads_in_transformers_with_our_logits(ckpt, tmp_path):
    out = export(ckpt, "hf", tmp_path / "hf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_scaling"]["rope_type"] == "llama3"
    assert config["bos_token_id"] == 1 and config["eos_token_id"] == 2 and config["max_position_embeddings"] == 131072
    x = random_tokens(3)
    torch.testing.assert_close(logits(hf, x), logits(load_model(ckpt, read_model_args(ckpt)), x), atol=2e-5, rtol=0)
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()


def test_hf_export_from_meta_shards(tmp_path, tokenizer_path):
    """Meta's .pth in 2 shards (fairscale's split dims) exports whole: transformers gives the logits
    of the model the shards were cut from."""
    model = peaked_random_model(tiny_args(n_kv_heads=2), seed=5, std=0.1).eval()
    meta = write_meta(model.state_dict(), model.args, tmp_path / "meta", 2, tokenizer_path)
    out = export(meta, "hf", tmp_path / "hf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = random_tokens(4)
    torch.testing.assert_close(logits(hf, x), logits(model, x), atol=2e-5, rtol=0)


def test_hf_export_sharded_with_an_index(ckpt, tmp_path):
    source = open_export_source(ckpt)
    out = write_hf(source, tmp_path / "sharded", "bf16", progress=False, max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.bfloat16
    ours = load_model(ckpt, read_model_args(ckpt), dtype=torch.bfloat16)
    x = random_tokens(4)
    torch.testing.assert_close(logits(hf, x), logits(ours, x), atol=0.05, rtol=0.02)


def test_hf_export_with_a_peft_adapter_equals_peft_merged(ckpt, tmp_path):
    """PEFT writes the adapter on HF's model; our export folds it in; transformers loads the result
    and gives what PEFT's merge_and_unload gives."""
    peft = pytest.importorskip("peft")
    base = hf_from_ours(load_model(ckpt, read_model_args(ckpt)))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                                                      alpha_pattern={"down_proj": 4}, lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "adapter")
    x = random_tokens(5)
    want = logits(model.merge_and_unload(), x)
    out = export(ckpt, "hf", tmp_path / "merged_hf", adapter=tmp_path / "adapter", progress=False)
    got = logits(transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), x)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=0)
    assert (got - logits(load_model(ckpt, read_model_args(ckpt)), x)).abs().max() > 0.05  # the adapter mattered


def test_int4_folder_exports_dequantized(tmp_path, tokenizer_path):
    """A GPTQ folder (python -m quant, round to nearest) exports as its dequantized weights, each
    equal to what our int4 layer dequantizes; transformers on the export gives our int4 model's
    logits (within the int4 kernel's float32 summation order). The command line finds the GPTQ
    reader through the quant package's plugin entry point (llama/ imports nothing of quant)."""
    src = tmp_path / "float"
    save_checkpoint(random_model(tiny_args(), seed=2), src)
    result = subprocess.run([sys.executable, "-m", "quant", "--ckpt_dir", src, "--out", tmp_path / "int4",
                             "--method", "rtn", "--group_size", "32", "--tokenizer_path", tokenizer_path],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    qcfg = json.loads((tmp_path / "int4" / "config.json").read_text())["quantization_config"]
    assert "method" not in qcfg and qcfg["quant_method"] == "gptq"  # standard GPTQ keys only
    int4 = load_model(tmp_path / "int4", read_model_args(tmp_path / "int4"))  # no flag: its config says int4
    out = tmp_path / "deq"
    result = subprocess.run([sys.executable, "-m", "llama.export", "--ckpt_dir", tmp_path / "int4", "--format", "hf",
                             "--out", out, "--outtype", "f32", "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_state = hf.state_dict()
    quantized = {path: m for path, m in int4.named_modules() if hasattr(m, "dequantized_weight")}
    assert len(quantized) == 7 * int4.args.n_layers
    for path, layer in quantized.items():
        key = meta_to_hf_key(f"{path}.weight")
        torch.testing.assert_close(from_hf_rows(hf_state[key], f"{path}.weight", int4.args),
                                   layer.dequantized_weight(torch.float32), atol=0, rtol=0)
    x = random_tokens(6)
    torch.testing.assert_close(logits(hf, x), logits(int4, x), atol=2e-5, rtol=0)


# --- pth: Meta's own code -----------------------------------------------------------------------------


@dataclasses.dataclass
class Llama2ModelArgs:
    """Meta's Llama-2 ModelArgs (meta-llama/llama, llama/model.py), a strict dataclass: an unknown
    key in params.json is a TypeError there."""
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    max_batch_size: int = 32
    max_seq_len: int = 2048


def test_pth_params_are_taken_by_llama2_modelargs(tmp_path):
    args = tiny_args(hidden_dim=100)  # a width Meta's rule gives only through multiple_of
    src = tmp_path / "src"
    save_checkpoint(random_model(args, seed=1), src)
    out = export(src, "pth", tmp_path / "pth", progress=False)
    params = json.loads((out / "params.json").read_text())
    Llama2ModelArgs(**params)
    assert read_model_args(out).ffn_hidden_dim == 100
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert state["layers.0.feed_forward.w1.weight"].shape == (100, 64)


META_REFERENCE = """
import json, sys, torch
import torch.distributed as dist
import fairscale.nn.model_parallel.initialize as fs_init
from llama_models.llama3.args import ModelArgs
from llama_models.llama3.model import Transformer
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
fs_init.initialize_model_parallel(1)
folder, tokens = sys.argv[1], torch.load(sys.argv[2])
params = json.loads(open(folder + "/params.json").read())
model = Transformer(ModelArgs(max_batch_size=2, max_seq_len=64, **params))
model.load_state_dict(torch.load(folder + "/consolidated.00.pth", weights_only=True), strict=False)
torch.save(model(tokens, 0).float(), sys.argv[3])
"""


def test_pth_export_runs_in_metas_llama3_reference_code(ckpt, tmp_path):
    pytest.importorskip("llama_models")
    out = export(ckpt, "pth", tmp_path / "pth", progress=False)
    params = json.loads((out / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_theta"] == 500000.0
    x = random_tokens(7)
    torch.save(x, tmp_path / "x.pt")
    run = subprocess.run([sys.executable, "-c", META_REFERENCE, out, tmp_path / "x.pt", tmp_path / "y.pt"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    want = logits(load_model(ckpt, read_model_args(ckpt)), x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, atol=2e-5, rtol=0)


# --- bad requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(fmt="hf", outtype="q8_0"), "--outtype 'q8_0' is not a hf type"),
    (dict(fmt="onnx"), "--format 'onnx': choose from"),
])
def test_bad_requests_write_nothing(ckpt, tmp_path, kw, match):
    with pytest.raises(LlamaInputError, match=match):
        export(ckpt, kw.pop("fmt"), tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused(ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert subprocess.run([sys.executable, "-m", "llama.export", "--ckpt_dir", ckpt, "--format", "hf", "--out",
                           tmp_path / "out"], cwd=ROOT, capture_output=True, text=True).returncode == 2
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("option", [{"use_dora": True}, {"lora_bias": True}, {"bias": "all"},
                                    {"peft_type": "PROMPT_TUNING"}])
def test_adapters_we_cannot_fold_in_are_refused(ckpt, tmp_path, option):
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **option}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(LlamaInputError, match=str(adapter)):
        export(ckpt, "hf", tmp_path / "out", adapter=adapter, progress=False)
    assert not (tmp_path / "out").exists()
