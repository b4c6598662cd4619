"""Meta's layout for Meta's own code: consolidated.00.pth (torch.save of Meta-named tensors) and a
params.json holding only the keys Meta's ModelArgs takes: Llama-2's dataclass refuses any other
key (rope_theta, hidden_dim), Llama-3's reads rope_theta and use_scaled_rope. An FFN width is
said through multiple_of / ffn_dim_multiplier, the only way Meta's params.json can."""
import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from llama.config import LLAMA31_ROPE_SCALING, ModelArgs
from llama.errors import LlamaInputError
from llama.export import register_exporter
from llama.export.source import ExportSource
from llama.files import atomic_folder, atomic_write_bytes
from llama.tokenizers import tokenizer_file_name

LLAMA2_ROPE_THETA = 10000.0  # fixed in Meta's Llama-2 code


def ffn_params(args: ModelArgs) -> dict:
    """multiple_of (and ffn_dim_multiplier) that make Meta's FFN rule give args.ffn_hidden_dim."""
    hidden = args.ffn_hidden_dim
    candidates = [{"multiple_of": args.multiple_of, "ffn_dim_multiplier": args.ffn_dim_multiplier}]
    base = int(2 * 4 * args.dim / 3)
    if hidden >= base:  # rounded up to a multiple of itself, the rule's width is the width
        candidates.append({"multiple_of": hidden, "ffn_dim_multiplier": None})
    else:  # scaled down below it, then rounded up to a multiple of itself
        candidates.append({"multiple_of": hidden, "ffn_dim_multiplier": hidden / base})
    for c in candidates:
        if ModelArgs(dim=args.dim, n_heads=args.n_heads, **c).ffn_hidden_dim == hidden:
            return {k: v for k, v in c.items() if v is not None}
    raise LlamaInputError(f"Meta's params.json cannot express the FFN width {hidden} of dim {args.dim}; "
                          f"export as hf or gguf instead")


def meta_params(args: ModelArgs) -> dict:
    """params.json for Meta's reference code (Llama-2's or Llama-3's, as the model is)."""
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, **ffn_params(args), "norm_eps": args.norm_eps}
    scaling = args.rope_scaling
    if scaling is not None and scaling != LLAMA31_ROPE_SCALING:
        raise LlamaInputError(f"Meta's params.json can say only use_scaled_rope (Llama-3.1's scaling), not "
                              f"rope_scaling {scaling}; export as hf or gguf instead")
    if args.rope_theta != LLAMA2_ROPE_THETA or scaling is not None:  # Llama-3's code, which reads these
        params["rope_theta"] = args.rope_theta
        if scaling is not None:
            params["use_scaled_rope"] = True
    return params


def write_pth(source: ExportSource, out: Path, outtype: str = "auto", progress: bool = True) -> Path:
    """out/consolidated.00.pth + params.json (+ the tokenizer), the folder renamed into place
    when complete. The tensors are collected for torch.save, which writes a whole dict: peak
    memory is the output plus one tensor (split_model.py --format pth writes shards)."""
    dtype = source.out_dtype(outtype)
    params = meta_params(source.args)
    with atomic_folder(out) as tmp:
        keys = source.keys()
        state = {key: source.read(key, dtype).clone() for key in tqdm(keys, unit="tensor", disable=not progress,
                                                                       desc=f"pth {out.name}")}
        torch.save(state, tmp / "consolidated.00.pth")
        del state
        atomic_write_bytes(tmp / "params.json", json.dumps(params, indent=2).encode() + b"\n")
        if source.tokenizer is not None:
            shutil.copyfile(source.tokenizer.path, tmp / tokenizer_file_name(source.tokenizer.path))
    return out


register_exporter("pth", write_pth, ("auto", "f32", "f16", "bf16"))
