"""Int4 checkpoints in the AutoGPTQ / GPTQ-for-LLaMa layout: an HF folder (`config.json` with
`quantization_config`, `quantize_config.json`, `model.safetensors` with HF names and
`{qweight,qzeros,scales,g_idx}` per quantized linear), read and written; and `load_base`, the one
loader the trainer and example.py call for bf16 / int4 / NF4 bases."""
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llama.checkpoint import (
    assign_from_index, check_shard_count, checkpoint_index, hf_loader, hf_to_meta_key, iter_hf_names, load_model,
    meta_model_outside_blocks, meta_to_hf_key, permute_rope_rows, quantization_config, save_safetensors, split_dim,
    unpermute_rope_rows,
)
from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.files import atomic_write_bytes, fsync_dir
from llama.model import Transformer
from llama.parallel import tensor_parallel_kind
from quant.linear import LAYER_LINEARS, Int4Linear, block_linears, quantized_layer, quantized_linears
from quant.pack import PER_WORD, Int4Weight, check_int4, group_index, pack_cols, unpack_cols

INT4_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def read_quant_config(ckpt_dir) -> dict:
    """The folder's GPTQ settings, checked: 4 bits, GPTQ-for-LLaMa/AutoGPTQ v1 storage."""
    config = quantization_config(ckpt_dir) or {}
    method = config.get("quant_method", "gptq")
    if method != "gptq":
        raise LlamaInputError(f"{ckpt_dir}: quantization method {method!r} is not supported (GPTQ int4 only)")
    bits = config.get("bits")
    if bits != 4:
        raise LlamaInputError(f"{ckpt_dir}: unsupported bits {bits} (int4 GPTQ checkpoints only)")
    if config.get("checkpoint_format", "gptq") != "gptq":
        raise LlamaInputError(f"{ckpt_dir}: checkpoint_format {config['checkpoint_format']!r} is not supported "
                              f"(the GPTQ v1 layout, zero points stored minus one)")
    return config


def rope_column_order(n_out: int, n_heads: int, to_hf: bool) -> torch.Tensor:
    """Index mapping q/k output features between Meta's interleaved and HF's half-rotation RoPE."""
    ids = torch.arange(n_out).unsqueeze(1)
    return (permute_rope_rows(ids, n_heads) if to_hf else unpermute_rope_rows(ids, n_heads)).squeeze(1)


def select_columns(w: Int4Weight, idx: torch.Tensor) -> Int4Weight:
    """The int4 layer restricted/reordered to output features idx (zero points repacked)."""
    if len(idx) % PER_WORD:
        raise LlamaInputError(f"int4 output features must come in multiples of {PER_WORD}, got {len(idx)}")
    return Int4Weight(w.qweight[:, idx].contiguous(), pack_cols(unpack_cols(w.qzeros)[:, idx]),
                      w.scales[:, idx].contiguous(), w.g_idx)


def select_rows(w: Int4Weight, start: int, stop: int) -> Int4Weight:
    """Input features [start, stop) of an int4 layer (a row-parallel rank's share). Keeps only
    the groups those features use when they are contiguous, else all of them (act-order)."""
    if start % PER_WORD or stop % PER_WORD:
        raise LlamaInputError(f"int4 input features split across ranks must stay multiples of {PER_WORD}")
    g_idx = w.g_idx[start:stop]
    g0, g1 = int(g_idx.min()), int(g_idx.max()) + 1
    qweight = w.qweight[start // PER_WORD:stop // PER_WORD].contiguous()
    if torch.equal(torch.unique(g_idx), torch.arange(g0, g1, dtype=g_idx.dtype)) and bool((g_idx[1:] >= g_idx[:-1]).all()):
        return Int4Weight(qweight, w.qzeros[g0:g1].contiguous(), w.scales[g0:g1].contiguous(), (g_idx - g0).contiguous())
    return Int4Weight(qweight, w.qzeros, w.scales, g_idx.contiguous())


def tp_share(w: Int4Weight, kind, rank: int, size: int) -> Int4Weight:
    if kind == "column":
        n = w.out_features // size
        return select_columns(w, torch.arange(rank * n, (rank + 1) * n))
    if kind == "row":
        k = w.in_features // size
        return select_rows(w, rank * k, (rank + 1) * k)
    return w


def load_int4(ckpt_dir, args: ModelArgs, dtype=torch.float32, device="cpu", mp_rank: int = 0, mp_size: int = 1) -> Transformer:
    """Build the model on `meta` and fill it from a GPTQ folder: quantized linears become
    Int4Linear, the rest (embeddings, norms, output) load in `dtype`. Under tensor parallelism
    each rank takes its share of the one whole checkpoint."""
    config = read_quant_config(ckpt_dir)
    group_size = int(config.get("group_size", -1))
    parts: dict[str, dict] = {}
    plain = {}  # the float tensors, as a checkpoint_index of this rank's shares
    for path, f, name, key in iter_hf_names(ckpt_dir, _meta_key):
        if key.endswith(INT4_PARTS + ("bias",)):
            module, part = key.rsplit(".", 1)
            parts.setdefault(module, {})[part] = (path, f, name)
        else:
            plain[key] = (path, _share(hf_loader(f, name, key, args), split_dim(key), mp_rank, mp_size))
    for module_path in parts:
        if not module_path.endswith(LAYER_LINEARS):  # e.g. a quantized lm_head: ours stays float
            raise LlamaInputError(f"{ckpt_dir}: unexpected quantized layer {module_path} (only the blocks' linears may be int4)")
    model = meta_model_outside_blocks(plain, args, dtype, device, mp_size)
    modules = dict(model.named_modules())
    for module_path, found in parts.items():
        if module_path not in modules:
            raise LlamaInputError(f"{ckpt_dir}: unexpected quantized layer {module_path} for a {args.n_layers}-layer model")
        tensors = {part: f.get(name) for part, (_, f, name) in found.items()}
        if "g_idx" not in tensors and "qweight" in tensors and not config.get("desc_act"):
            tensors["g_idx"] = group_index(tensors["qweight"].shape[0] * PER_WORD, group_size)  # older files: implied
        missing = [p for p in INT4_PARTS if p not in tensors]
        if missing:
            raise LlamaInputError(f"{found['qweight'][0] if 'qweight' in found else ckpt_dir}: quantized layer "
                                  f"{meta_to_hf_key(module_path + '.weight').removesuffix('.weight')} lacks {missing[0]}")
        w = Int4Weight(*(tensors[p] for p in INT4_PARTS))
        check_int4(w, meta_to_hf_key(module_path + ".weight").removesuffix(".weight"))
        old = modules[module_path]
        full_out, full_in = _full_shape(old, mp_size)
        if (w.out_features, w.in_features) != (full_out, full_in):
            raise LlamaInputError(f"{found['qweight'][0]}: {module_path} is {w.out_features}x{w.in_features} int4 "
                                  f"but the config implies {full_out}x{full_in}")
        name = module_path.rsplit(".", 1)[1]
        if name in ("wq", "wk"):
            w = select_columns(w, rope_column_order(w.out_features, args.n_heads if name == "wq" else args.n_kv_heads, False))
        kind = tensor_parallel_kind(old)
        w = tp_share(w, kind, mp_rank, mp_size)
        bias = tensors.get("bias")
        if bias is not None and kind == "column":
            bias = bias.chunk(mp_size)[mp_rank]
        layer = Int4Linear.from_int4(Int4Weight(*(t.to(device) for t in w.tensors().values())), group_size, kind,
                                     None if bias is None else bias.to(device, torch.float32))
        parent, child = module_path.rsplit(".", 1)
        setattr(modules[parent], child, layer)
    for i, block in enumerate(model.layers):  # norms (and any linear the file left in float)
        assign_from_index(block, plain, f"layers.{i}.", dtype, device)
    return model.eval()


def _share(load, dim, rank: int, size: int):
    """A loader for this rank's slice of a whole tensor split on `dim` (None: replicated)."""
    if dim is None or size == 1:
        return load
    return lambda: load().chunk(size, dim=dim)[rank]


def _meta_key(name: str):
    """hf_to_meta_key, with each quantized part (q_proj.qweight ...) keyed like its module
    (layers.0.attention.wq.qweight)."""
    stem, _, part = name.rpartition(".")
    module_key = hf_to_meta_key(f"{stem}.weight")
    if module_key is not None and part in INT4_PARTS + ("bias",):
        return f"{module_key.removesuffix('.weight')}.{part}"
    return hf_to_meta_key(name)


def _full_shape(layer, mp_size: int) -> tuple[int, int]:
    out_features, in_features = layer.weight.shape
    kind = tensor_parallel_kind(layer)
    return out_features * (mp_size if kind == "column" else 1), in_features * (mp_size if kind == "row" else 1)


def save_int4(model: Transformer, out_dir, quant: dict, tokenizer_path=None) -> Path:
    """Write a one-process model with Int4Linear blocks as a GPTQ folder (HF names, q/k columns
    in HF's RoPE order), readable by AutoGPTQ-style loaders. Embeddings, norms and the output
    layer are stored in fp16 (GPTQ's convention, `torch_dtype: float16`). The folder appears
    whole: it is written under a temporary name and renamed."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise LlamaInputError(f"{out}: exists and is not empty; choose another --out or remove it")
    args = model.args
    tensors = {}
    layers = quantized_linears(model)
    for key, t in model.state_dict().items():
        module_path, _, part = key.rpartition(".")
        if module_path in layers:
            continue
        tensors[meta_to_hf_key(key)] = t.to(torch.float16) if t.is_floating_point() else t
    for module_path, layer in layers.items():
        if not isinstance(layer, Int4Linear):
            raise LlamaInputError(f"{module_path}: only int4 layers can be written as GPTQ (NF4 exports as float)")
        w = layer.int4()
        name = module_path.rsplit(".", 1)[1]
        if name in ("wq", "wk"):
            w = select_columns(w, rope_column_order(w.out_features, args.n_heads if name == "wq" else args.n_kv_heads, True))
        stem = meta_to_hf_key(f"{module_path}.weight").removesuffix(".weight")
        for part, t in w.tensors().items():
            tensors[f"{stem}.{part}"] = t.cpu()
        if layer.bias is not None:
            tensors[f"{stem}.bias"] = layer.bias.to(torch.float16).cpu()
    quant = {"bits": 4, "quant_method": "gptq", "checkpoint_format": "gptq", "true_sequential": False, **quant}
    config = {**args.to_hf_config(), "quantization_config": quant}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_bytes(tmp / "config.json", json.dumps(config, indent=2).encode())
        atomic_write_bytes(tmp / "quantize_config.json", json.dumps(quant, indent=2).encode())
        if tokenizer_path is not None and Path(tokenizer_path).is_file():
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_base(ckpt_dir, args: ModelArgs, dtype=torch.float32, device="cpu", mp_rank: int = 0, mp_size: int = 1,
              quant: str = "none", group_size: int = 128) -> Transformer:
    """The base model for fine-tuning or generation: a GPTQ folder loads as int4; a float
    checkpoint loads as is (quant none), or quantized on load: int4 by round-to-nearest with
    `group_size`, or NF4 through bitsandbytes, one block at a time (host memory holds one float
    block, never the float model)."""
    if quantization_config(ckpt_dir):
        if quant != "int4":
            raise LlamaInputError(f"{ckpt_dir}: holds GPTQ int4 weights; use quant = int4 (--quant int4), not {quant!r}")
        return load_int4(ckpt_dir, args, dtype, device, mp_rank, mp_size)
    if quant == "none":
        return load_model(ckpt_dir, args, dtype, device, mp_rank, mp_size)
    check_shard_count(ckpt_dir, mp_size)
    index = checkpoint_index(ckpt_dir, args, mp_rank, mp_size)
    model = meta_model_outside_blocks(index, args, dtype, device, mp_size)
    for i, block in enumerate(model.layers):  # one float block in host memory at a time
        assign_from_index(block, index, f"layers.{i}.", dtype, "cpu")
        for name, linear in block_linears(block).items():
            parent, child = name.split(".")
            setattr(getattr(block, parent), child, quantized_layer(f"layers.{i}.{name}", linear, quant, group_size, device))
        block.to(device)
    return model.eval()
