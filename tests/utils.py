"""The tests' shared helpers: tiny configs, the tests' own format converters and writers, and
the small runners several test files use.

The converters, writers and decoders here (HF names and q/k rows, Meta shards, the GPTQ layout)
are the tests' own references, written from docs/formats.md and independent of the package's own
converters (llama/checkpoint.py, split/, quant/pack.py): the tests compare the package against
them, so they must not call what they check.

Pytest fixtures live in tests/conftest.py (pytest finds them there); every other helper is here,
imported as `from tests.utils import ...`, never from another test module.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import split_model
from finetune.config import TrainConfig
from finetune.data import DataConfig, load_examples
from finetune.trainer import train
from llama.formats import read_model_args, save_checkpoint
from llama.loader import load_model
from llama.config import ModelArgs
from llama.model import Transformer
from llama.tiny import random_model
from llama.tokenizers import Tokenizer
from quant.pack import Int4Weight

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
DEMO_TRAIN, DEMO_EVAL = ROOT / "data" / "demo" / "train.jsonl", ROOT / "data" / "demo" / "eval.jsonl"

TOKENIZER_VOCAB = 384  # the session tokenizer's size (the `tokenizer_path` fixture in conftest.py)


def tiny_args(**overrides) -> ModelArgs:
    """dim 64, 2 layers, 4 heads; pass n_kv_heads=2 for GQA."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=TOKENIZER_VOCAB, multiple_of=32)
    return ModelArgs(**{**base, **overrides})


def peaked_random_model(args, seed: int, std: float) -> Transformer:
    """llama.tiny.random_model with its 2-D weights redrawn at `std` (from the RNG it seeded),
    larger than its 0.02: peaked logits and attention far from uniform, so greedy text varies and
    mixing shows."""
    model = random_model(args, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(std=std)
    return model


# --- HF names and the q/k row permutation (docs/formats.md, "HF LLaMA checkpoints") ---------------

# HF LlamaForCausalLM's names for our per-layer weights, written from docs/formats.md for the tests'
# own converters (independent of llama/checkpoint.py's table)
HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# the seven block linears by their short names: wq -> q_proj ... w3 -> up_proj (PEFT's target names)
HF_NAME = {ours.split(".")[1]: hf.split(".")[1] for ours, hf in HF_LAYER_NAMES.items() if "." in ours}
ALL_HF = list(HF_NAME.values())


def meta_to_hf_rows(w, n_heads: int):
    """Meta q/k rows (rotate interleaved pairs) -> HF rows (rotate halves), per head, as
    docs/formats.md writes it: the tests' own converter, independent of llama/checkpoint.py."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def hf_to_meta_rows(w, n_heads: int):
    """The inverse of meta_to_hf_rows."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)


def hf_state_to_meta(sd: dict, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """An HF LlamaForCausalLM state dict -> Meta names and q/k row order (a missing lm_head:
    tied, the embedding)."""
    embed = sd["model.embed_tokens.weight"]
    out = {
        "tok_embeddings.weight": embed,
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd.get("lm_head.weight", embed),
    }
    heads = {"attention.wq": n_heads, "attention.wk": n_kv_heads}
    for i in range(n_layers):
        for meta, hf in HF_LAYER_NAMES.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            out[f"layers.{i}.{meta}.weight"] = hf_to_meta_rows(w, heads[meta]) if meta in heads else w
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def meta_state_to_hf(state: dict, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    """A Meta-layout state dict (ours has the same names) -> HF LlamaForCausalLM's names, q/k rows
    permuted to HF's rotary order: the inverse of hf_state_to_meta."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["output.weight"]}
    heads = {"attention.wq": n_heads, "attention.wk": n_kv_heads}
    for i in range(n_layers):
        for ours, hf in HF_LAYER_NAMES.items():
            w = state[f"layers.{i}.{ours}.weight"]
            out[f"model.layers.{i}.{hf}.weight"] = meta_to_hf_rows(w, heads[ours]) if ours in heads else w
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def rope_heads(name: str, args):
    """The head count a linear's output rows are permuted by (wq: n_heads, wk: n_kv_heads), else None."""
    return {"wq": args.n_heads, "wk": args.n_kv_heads}.get(name)


def peft_module_name(path: str) -> str:
    """Our layers.{i}.attention.wq -> PEFT's base_model.model.model.layers.{i}.self_attn.q_proj."""
    _, i, block, name = path.split(".")
    sub = "self_attn" if block == "attention" else "mlp"
    return f"base_model.model.model.layers.{i}.{sub}.{HF_NAME[name]}"


# --- HF reference models (tests/llama/test_model.py, test_decode.py) ------------------------------

# the HF models' shape (VOCAB is the session tokenizer's: test_decode generates text with them)
DIM, N_LAYERS, N_HEADS, VOCAB, SEQ = 64, 2, 4, 384, 40
NORM_EPS = 1e-5
TOL_CACHE = 1e-5  # incremental decoding vs full forward, float32


@dataclass
class Case:
    name: str
    n_kv_heads: int
    intermediate_size: int
    # Meta params.json values that make Meta's FFN rule give intermediate_size
    multiple_of: int
    ffn_dim_multiplier: Optional[float] = None
    rope_theta: float = 10000.0
    hf_rope_scaling: Optional[dict] = None
    meta_rope: dict = field(default_factory=dict)  # extra params.json keys for the rope
    max_position_embeddings: int = 128


LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# What Meta's Llama-3.1 params.json means by `"use_scaled_rope": true`.
LLAMA31_SCALING = {**LLAMA3_SCALING, "original_max_position_embeddings": 8192}

CASES = [
    Case("mha", n_kv_heads=4, intermediate_size=192, multiple_of=32),
    Case("gqa", n_kv_heads=2, intermediate_size=176, multiple_of=16),
    Case(
        "llama3_scaling", n_kv_heads=2, intermediate_size=160, multiple_of=32, ffn_dim_multiplier=0.9,
        rope_theta=500000.0, hf_rope_scaling=LLAMA3_SCALING, meta_rope={"rope_scaling": LLAMA3_SCALING},
    ),
    Case(
        "linear_scaling", n_kv_heads=4, intermediate_size=192, multiple_of=32,
        hf_rope_scaling={"rope_type": "linear", "factor": 4.0},
        meta_rope={"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ),
    Case(
        "llama31_use_scaled_rope", n_kv_heads=2, intermediate_size=192, multiple_of=64,
        rope_theta=500000.0, hf_rope_scaling=LLAMA31_SCALING, meta_rope={"use_scaled_rope": True},
        max_position_embeddings=131072,
    ),
]


def meta_ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's FFN width rule, as stated in docs/formats.md."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def build_hf_model(case: Case, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    """A float32 HF Llama with every weight random (RMSNorm weights too), scaled so that the
    logits are O(1) and differences are visible."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=DIM, intermediate_size=case.intermediate_size, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=case.n_kv_heads, vocab_size=VOCAB,
        max_position_embeddings=case.max_position_embeddings, rms_norm_eps=NORM_EPS, rope_theta=case.rope_theta,
        rope_scaling=dict(case.hf_rope_scaling) if case.hf_rope_scaling else None,
        tie_word_embeddings=tie, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model.eval()


def write_meta_checkpoint(hf_model, case: Case, out_dir) -> None:
    """`params.json` + `consolidated.00.pth` in Meta's format, holding hf_model's weights."""
    assert meta_ffn_hidden(DIM, case.multiple_of, case.ffn_dim_multiplier) == case.intermediate_size
    params = {
        "dim": DIM, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": case.n_kv_heads,
        "vocab_size": VOCAB, "multiple_of": case.multiple_of, "norm_eps": NORM_EPS,
        "rope_theta": case.rope_theta, **case.meta_rope,
    }
    if case.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = case.ffn_dim_multiplier
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params))
    state = hf_state_to_meta(hf_model.state_dict(), N_LAYERS, N_HEADS, case.n_kv_heads)
    torch.save(state, out_dir / "consolidated.00.pth")


def load_ours(ckpt_dir):
    return load_model(ckpt_dir, read_model_args(ckpt_dir))


def random_tokens(seed: int, shape=(2, SEQ)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g)



@contextlib.contextmanager
def num_threads(n: int):
    """torch.set_num_threads(n) inside the block, the old count restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ref_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T in float64: the reference of every linear-path test."""
    return x.double() @ w.double().T


def write_ckpt(folder, args, tokenizer_path, seed: int):
    """A random tiny LLaMA of `args` (seed) in our format in `folder`, the tokenizer beside it."""
    save_checkpoint(random_model(args, seed=seed), folder)
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder

def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest absolute difference relative to ref's largest magnitude, in float64."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --- our Transformer and the HF model computing the same (tests/finetune) -------------------------


def init_weights(model: Transformer, seed: int = 0) -> Transformer:
    """Weights that make the logits O(1), so differences show (random_model's 0.02 would not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "tok_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model


def make_ours(args, seed: int = 0) -> Transformer:
    return init_weights(Transformer(args), seed).eval()


def hf_from_ours(model: Transformer) -> LlamaForCausalLM:
    """An HF LlamaForCausalLM computing what `model` (a plain Transformer) computes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    cfg = LlamaConfig(hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim, num_hidden_layers=a.n_layers,
                      num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                      rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=256,
                      rope_scaling=dict(a.rope_scaling) if a.rope_scaling else None,
                      tie_word_embeddings=False, attn_implementation="eager")
    hf = LlamaForCausalLM(cfg).float()
    hf.load_state_dict(meta_state_to_hf(model.state_dict(), a.n_layers, a.n_heads, a.n_kv_heads), strict=True)
    return hf.eval()


# --- Meta's model-parallel shards (docs/formats.md: fairscale's split dims) -----------------------

COLUMN, ROW = ("wq", "wk", "wv", "w1", "w3", "output"), ("wo", "w2", "tok_embeddings")


def fs_dim(key: str):
    """Column-parallel weights split on dim 0, row-parallel and the embedding (LLaMA-1/2) on dim 1,
    norms whole (replicated)."""
    name = key.split(".")[-2]
    return 0 if name in COLUMN else 1 if name in ROW else None


def chunk_state(state: dict, n: int) -> list[dict]:
    shards = [{} for _ in range(n)]
    for key, t in state.items():
        dim = fs_dim(key)
        for rank, shard in enumerate(shards):
            shard[key] = t if dim is None else torch.chunk(t, n, dim)[rank].clone()
    return shards


def merge_shards(folder) -> dict:
    """Our fairscale-layout shards (2 ranks) -> whole tensors; replicated ones must be equal."""
    parts = [load_file(str(folder / f"consolidated.{r:02d}.safetensors")) for r in range(2)]
    whole = {}
    for key in parts[0]:
        dim = fs_dim(key)
        whole[key] = parts[0][key] if dim is None else torch.cat([p[key] for p in parts], dim)
        if dim is None:
            torch.testing.assert_close(parts[1][key], parts[0][key], rtol=0, atol=0)
    return whole


def params_of(args) -> dict:
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                  vocab_size=args.vocab_size, multiple_of=args.multiple_of, norm_eps=args.norm_eps)
    if args.hidden_dim is not None:
        params["hidden_dim"] = args.hidden_dim
    return params


def write_meta(state: dict, args, out, n: int, tokenizer_path=None):
    """Meta's layout: consolidated.NN.pth (torch.save of each rank's dict) + params.json."""
    out.mkdir(parents=True)
    for rank, shard in enumerate(chunk_state(state, n)):
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
    (out / "params.json").write_text(json.dumps(params_of(args)))
    if tokenizer_path is not None:
        shutil.copy(tokenizer_path, out / "tokenizer.model")
    return out


def load_dir(d) -> list[dict]:
    """Every consolidated.NN file of a folder, with the safetensors library or plain torch.load."""
    files = sorted(d.glob("consolidated.*"))
    return [load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True) for f in files]


def random_ours(tmp_path, name="src", dtype=torch.float32, seed=0, **overrides):
    """A random tiny model (tiny_args(**overrides)) saved in our format as tmp_path / name."""
    model = random_model(tiny_args(**overrides), seed=seed).to(dtype)
    save_checkpoint(model, tmp_path / name)
    return tmp_path / name


def run_split(*argv) -> int:
    """split_model.py in this process; its exit status."""
    return split_model.main([str(a) for a in argv] + ["--quiet"])


# The faults of a Meta checkpoint a user can make by copying files, and what the error must say.
BROKEN_META = {
    "missing_last": "consolidated.01.pth is missing",  # a 2-shard checkpoint with one file: no gap in the names
    "extra_shard": "consolidated.02.pth is one shard too many",
    "mixed_same_shapes": "consolidated.01.pth: the shards disagree",  # another model's shard 1, same shapes
    "mixed_other_shapes": "consolidated.01.pth: the shards disagree",  # another model's shard 1, other shapes
}


def broken_meta(root: Path, case: str, tokenizer_path=None) -> Path:
    """A 2-shard Meta checkpoint at root / case (with the tokenizer, if given), broken as
    BROKEN_META[case] says."""
    args = tiny_args()
    d = write_meta(random_model(args).state_dict(), args, root / case, 2, tokenizer_path)
    if case == "missing_last":
        (d / "consolidated.01.pth").unlink()
    elif case == "extra_shard":
        shutil.copy(d / "consolidated.01.pth", d / "consolidated.02.pth")
    else:  # a fine-tune's shard 1 of the same shapes gives itself away by its moved norms
        other = tiny_args(n_kv_heads=2) if case == "mixed_other_shapes" else args
        state = random_model(other, seed=1).state_dict()
        state["norm.weight"] = state["norm.weight"] + 0.01
        shutil.copy(write_meta(state, other, root / f"{case}_other", 2) / "consolidated.01.pth", d / "consolidated.01.pth")
    return d


# `python -m MODULE ARGS...` with the function at HOOK ("module:attr[.attr]") wrapped so that its
# CALL-th call sends this very process SIGNAL: a real kill or Ctrl-C at a chosen moment of a run.
SIGNAL_AT = """
import importlib, os, runpy, signal, sys
hook, call, signame, module = sys.argv[1:5]
owner_name, _, path = hook.partition(":")
owner = importlib.import_module(owner_name)
*outer, name = path.split(".")
for part in outer:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(call):
        os.kill(os.getpid(), getattr(signal, signame))  # SIGKILL: no cleanup of any kind runs
    return real(*args, **kwargs)
setattr(owner, name, wrapped)
sys.argv = [module, *sys.argv[5:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_signalled(hook: str, call: int, signame: str, module: str, *argv, timeout=120) -> subprocess.CompletedProcess:
    """Run `python -m module argv...` and send it signame at the call-th call of hook (SIGNAL_AT)."""
    return subprocess.run([sys.executable, "-c", SIGNAL_AT, hook, str(call), signame, module, *map(str, argv)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        assert torch.equal(got[key], want[key]), key


# --- GPTQ int4 layout, in torch (docs/formats.md, "GPTQ int4 layout") -----------------------------

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)  # element j of a word at bits 4j..4j+3


def pack_dim0(q: torch.Tensor) -> torch.Tensor:
    """ints [R, C] in 0..15 -> int32 [R/8, C]: rows 8w..8w+7 into word w, low nibble first."""
    q = q.to(torch.int64)
    r, c = q.shape
    assert r % 8 == 0 and int(q.min()) >= 0 and int(q.max()) <= 15
    words = (q.view(r // 8, 8, c) << _SHIFTS.view(1, 8, 1)).sum(dim=1)  # exact in int64
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # the uint32 word read as int32
    return words.to(torch.int32)


def unpack_dim0(words: torch.Tensor) -> torch.Tensor:
    """int32 [R/8, C] -> int64 [R, C] (the inverse of pack_dim0)."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    return ((u.unsqueeze(1) >> _SHIFTS.view(1, 8, 1)) & 0xF).reshape(-1, words.shape[1])


def gptq_tensors(q, zeros, scales, g_idx) -> dict:
    """q [out, in] 0..15, integer zero points zeros [G, out] in 1..15, scales [G, out], g_idx [in]."""
    return {
        "qweight": pack_dim0(q.t()),
        "qzeros": pack_dim0((zeros - 1).t()).t().contiguous(),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def parts(t) -> dict:
    return t.tensors() if isinstance(t, Int4Weight) else t


def unpack_all(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q [in, out] int64, zero points [G, out] int64 (stored + 1), scales [G, out] float64, g_idx long."""
    t = parts(t)
    q = unpack_dim0(t["qweight"])
    zeros = unpack_dim0(t["qzeros"].t()).t() + 1
    return q, zeros, t["scales"].double(), t["g_idx"].long()


def dequant64(t) -> torch.Tensor:
    """float64 W [out, in] (nn.Linear orientation) by docs/formats.md's formula."""
    q, zeros, scales, g = unpack_all(t)
    return (scales[g] * (q - zeros[g]).double()).t()


# --- GPTQ int4 layout, in numpy (tests/quant/test_pack.py, test_kernels.py) -----------------------


def np_pack_rows(q: np.ndarray) -> np.ndarray:
    """q [K, N] in 0..15 -> int32 [K/8, N]: element j of a word at bits 4j..4j+3."""
    q = np.asarray(q, dtype=np.int64)
    k, n = q.shape
    assert k % 8 == 0 and q.min() >= 0 and q.max() <= 15
    words = np.zeros((k // 8, n), dtype=np.int64)
    for j in range(8):
        words |= q[j::8] << (4 * j)
    words[words >= 2 ** 31] -= 2 ** 32  # the unsigned 32-bit word read as int32 (two's complement)
    return words.astype(np.int32)


def np_unpack_rows(words: np.ndarray) -> np.ndarray:
    """int32 [K/8, N] -> int64 [K, N]."""
    u = np.asarray(words, dtype=np.int64) & 0xFFFFFFFF
    k8, n = u.shape
    q = np.zeros((k8 * 8, n), dtype=np.int64)
    for j in range(8):
        q[j::8] = (u >> (4 * j)) & 0xF
    return q


def gptq_layer(q, zeros, scales, g_idx) -> dict:
    """q [out, in] 0..15, zeros [G, out] 1..15, scales [G, out], g_idx [in] -> the four GPTQ tensors."""
    q, zeros = np.asarray(q), np.asarray(zeros)
    return {
        "qweight": torch.from_numpy(np_pack_rows(q.T)),
        "qzeros": torch.from_numpy(np.ascontiguousarray(np_pack_rows((zeros - 1).T).T)),
        "scales": torch.as_tensor(np.asarray(scales), dtype=torch.float16),
        "g_idx": torch.as_tensor(np.asarray(g_idx), dtype=torch.int32),
    }


def gptq_unpack(t: dict) -> tuple[np.ndarray, np.ndarray]:
    """-> q [in, out] and the stored qzeros [G, out] (zero - 1)."""
    return np_unpack_rows(t["qweight"].numpy()), np_unpack_rows(t["qzeros"].numpy().T).T


def ref_dequant(t: dict) -> torch.Tensor:
    """float64 W [out, in] (nn.Linear orientation) by docs/formats.md's formula, element by element
    through numpy fancy indexing."""
    q, z = gptq_unpack(t)
    s = t["scales"].to(torch.float64).numpy()
    g = t["g_idx"].numpy().astype(np.int64)
    w_kn = s[g, :] * (q - (z[g, :] + 1))
    return torch.from_numpy(np.ascontiguousarray(w_kn.T))


def make_g_idx(k: int, group_size: int, act_order: bool, rng: np.random.Generator) -> np.ndarray:
    size = k if group_size == -1 else group_size
    g = np.arange(k) // size
    return rng.permutation(g) if act_order else g


def random_layer(k: int, n: int, group_size: int, act_order: bool = False, seed: int = 0):
    """Random q / zeros / scales / g_idx -> (raw dict, GPTQ tensors dict, Int4Weight, float64 W [out, in])."""
    rng = np.random.default_rng(seed)
    g = make_g_idx(k, group_size, act_order, rng)
    groups = int(g.max()) + 1
    raw = {
        "q": rng.integers(0, 16, size=(n, k)),
        "zeros": rng.integers(1, 16, size=(groups, n)),
        "scales": rng.uniform(0.005, 0.05, size=(groups, n)).astype(np.float16),
        "g_idx": g,
    }
    t = gptq_layer(raw["q"], raw["zeros"], raw["scales"], raw["g_idx"])
    w = Int4Weight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    return raw, t, w, ref_dequant(t)


def nf4_dequant(layer) -> torch.Tensor:
    """bitsandbytes' own dequantization of an NF4Linear's packed NF4 weight (double quant state)."""
    import bitsandbytes.functional as bnbf

    w = layer.inner.weight
    return bnbf.dequantize_4bit(w.data, w.quant_state).float()


# --- runs: subprocesses, torchrun, the trainer and its metrics ------------------------------------

PROMPTS = ["The red cat", "What is 12 plus 30? The answer", "hi"]


def prompt_flags():
    """example.py's flags for greedy float32 text of PROMPTS (float32: dtype auto would be bfloat16 on
    some CPUs, where rounding differs between one process and tensor-parallel ranks)."""
    return [f for p in PROMPTS for f in ("--prompt", p)] + ["--temperature", "0", "--max_gen_len", "16",
                                                             "--dtype", "float32"]


def run(cmd, timeout=300, env=None, **kw) -> subprocess.CompletedProcess:
    """cmd (items str()'d) from the repository root, one OpenMP thread (unless env says otherwise:
    it is added to the environment), output captured as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


def torchrun(common: dict, ckpt, out_dir, timeout=300, nproc: int = 2, **kw):
    """ft_main.py on `nproc` processes with common + kw as command-line keys; returns the completed run."""
    values = {**common, "ckpt_dir": str(ckpt), "out_dir": str(out_dir), **kw}
    flags = [x for k, v in values.items() for x in (f"--{k}", ",".join(map(str, v)) if isinstance(v, list) else str(v))]
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                  ROOT / "ft_main.py"] + flags, timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def one_process(common: dict, ckpt, out_dir, **kw) -> dict:
    """finetune.trainer.train in this process with common + kw."""
    return train(TrainConfig(**{**common, "ckpt_dir": str(ckpt), "out_dir": str(out_dir), **kw}).check())


def trainer_config(ckpt, out_dir, **kw) -> TrainConfig:
    """Small sft LoRA defaults on the bundled demo data; the plain template keeps rows ~25 tokens."""
    base = dict(ckpt_dir=str(ckpt), dtype="float32", device="cpu", method="lora", task="sft",
                train_file=str(DEMO_TRAIN), eval_file=str(DEMO_EVAL), template="plain", cutoff_len=64,
                out_dir=str(out_dir), seed=0, micro_batch_size=8, max_steps=30, lr=3e-3, warmup_steps=0,
                lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_targets=["all-linear"], num_virtual_tokens=8,
                train_layers=1, eval_every=0, save_every=0, exact_match_samples=0)
    return TrainConfig(**{**base, **kw}).check()


def eval_loss_of(model, ckpt) -> float:
    """Mean next-token cross-entropy of model over the eval answers, one unpadded example at a time."""
    tokenizer = Tokenizer(str(ckpt / "tokenizer.model"))
    examples, _ = load_examples(DEMO_EVAL, tokenizer, DataConfig("sft", "plain", cutoff_len=64))
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(torch.tensor([ex.ids]))[0]
            labels = torch.tensor(ex.labels)
            # the answer (prompt_len..) is the target; the prompt is masked
            assert (labels[: ex.prompt_len] == -100).all() and (labels[ex.prompt_len:] != -100).all()
            total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    return total / count


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def metrics_by_step(out_dir) -> dict:
    """{(step, 'train'|'eval'): record} from a run's metrics.jsonl; a step logged twice fails."""
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        key = (r["step"], "eval" if "eval_loss" in r else "train")
        assert key not in out, f"{key} logged twice"
        out[key] = r
    return out


def assert_same_tensors(a: dict, b: dict, tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=k)


# --- instrumentation ------------------------------------------------------------------------------


class CountCalls(torch.overrides.TorchFunctionMode):
    """Records the torch functions called inside the block (and SDPA's mask arguments)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.sdpa: list[tuple[bool, bool]] = []  # (attn_mask is None, is_causal) per call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        self.names.append(name)
        if name == "scaled_dot_product_attention":
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.sdpa.append((mask is None, bool(kwargs.get("is_causal", False))))
        return func(*args, **kwargs)

    def count(self, name: str) -> int:
        return self.names.count(name)


# --- tiny tiktoken vocabularies (tests/llama/test_tokenizers.py) ----------------------------------

# Meta's Llama-3 split pattern, transcribed from llama_models/llama3/tokenizer.py (`pat_str`)
META_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# Meta's 256 Llama-3 special tokens in order, as llama_models/llama3/tokenizer.py lists them
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(SPECIALS))]
assert len(SPECIALS) == 256 and SPECIALS[-1] == "<|reserved_special_token_245|>"


def tiktoken_training_text() -> str:
    """A few KB: llama.tiny's sentences, plus CJK, accents, emoji, CRLF, code and white-space runs,
    so the vocabulary holds multi-byte pieces and white-space tokens."""
    from llama.tiny import corpus

    uni = ("日本語のテキストです。中文文本也在这里。한국어 텍스트. Ünïcödé àccents — “quotes” "
           "😀👍🏽 emoji 😀😀!\r\n")
    code = "    indented code\n\tdef f(x):\n\t\treturn x  # comment\n\n\n"
    caps = "'SA 'SA 'LL 'LL " * 5  # tokens "SA", "LL": "IT'SALL" then encodes by where the pattern splits it
    return "\n".join(corpus(n_lines=80, seed=0)) + "\n" + uni * 6 + code * 6 + caps + " " * 7 + "\n" * 5


def write_tiktoken_file(path, ranks: dict) -> None:
    """tiktoken's format, as Meta's tokenizer.model: `base64(token) rank` per line, by rank."""
    import base64

    lines = [f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("".join(lines))


def tiny_tiktoken(path, vocab_size: int = 360) -> dict:
    """Train byte-level BPE ranks with tiktoken's educational trainer and Meta's pattern on
    tiktoken_training_text(), write them to `path` in tiktoken's format; return the ranks."""
    from tiktoken._educational import bpe_train

    ranks = bpe_train(tiktoken_training_text(), vocab_size=vocab_size, pat_str=META_PAT, visualise=None)
    write_tiktoken_file(path, ranks)
    return ranks


def convert_to_hf_json(tiktoken_path, out: Path) -> Path:
    """transformers' own tiktoken -> tokenizer.json converter (what made Llama-3's tokenizer.json)."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's loader would cache a copy of the file in /tmp
        hf = TikTokenConverter(vocab_file=str(tiktoken_path), pattern=META_PAT).converted()
    # Meta's specials, added after the vocabulary in this order (as transformers' Llama-3 conversion does)
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    hf.save(str(out))
    return out
