"""Int4 checkpoints in the AutoGPTQ / GPTQ-for-LLaMa layout: an HF folder (`config.json` with
`quantization_config`, `quantize_config.json`, `model.safetensors` with HF names and
`{qweight,qzeros,scales,g_idx}` per quantized linear), read (`GPTQ`, a registered checkpoint
format: `llama.loader.load_model` on such a folder lands here) and written (`save_int4`)."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.files import atomic_folder, atomic_write_bytes, check_new_output, save_safetensors
from llama.formats import Checkpoint, TensorEntry, iter_hf_names, quantization_config, register_format
from llama.formats.base import single_part, tokenizer_beside
from llama.formats.hf import HFLayout, hf_weight_files
from llama.layers import BLOCK_LINEARS, expected_shapes, from_hf_rows, hf_to_meta_key, lookup, meta_to_hf_key, \
    rope_heads, to_hf_rows
from llama.loader import fill, load_outside_blocks, replace_module
from llama.model import Transformer
from llama.tokenizers import tokenizer_file_name
from llama.tp import tensor_parallel_kind
from quant.linear import Int4Linear, quantized_linears
from quant.pack import PER_WORD, Int4Weight, check_int4, dequantize, group_index, pack_cols, unpack_cols

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


def rope_columns(w: Int4Weight, key: str, args: ModelArgs, to_hf: bool) -> Int4Weight:
    """The output features of int4 layer `key` (wq, wk) reordered between Meta's interleaved and
    HF's half-rotation RoPE, by the layer table's row rule applied to their indices."""
    ids = torch.arange(w.out_features).unsqueeze(1)
    return select_columns(w, (to_hf_rows if to_hf else from_hf_rows)(ids, key, args).squeeze(1))


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


def read_gptq_folder(d: Path, args: ModelArgs, tie: bool = True) -> tuple[dict, Checkpoint, dict]:
    """(quantization config, a Checkpoint of the float tensors, {module path: int4 parts found})
    of a GPTQ folder; tie: a tied output reads the embedding (not under tensor parallelism)."""
    config = read_quant_config(d)
    parts: dict[str, dict] = {}
    plain = {}  # the float tensors, as checkpoint entries
    expected = expected_shapes(args)
    for path, f, name, key in iter_hf_names(d, _meta_key):
        if key.endswith(INT4_PARTS + ("bias",)):
            module, part = key.rsplit(".", 1)
            parts.setdefault(module, {})[part] = (path, f, name)
        elif key in expected:
            plain[key] = single_part(f, name, key, rope_heads(key, args))
        else:
            raise LlamaInputError(f"{path}: unexpected tensor {name} for the {args.n_layers}-layer model config.json describes")
    emb = plain.get("tok_embeddings.weight")
    if "output.weight" not in plain and args.tie_word_embeddings and emb is not None and tie:
        plain["output.weight"] = replace(emb, key="output.weight", tied_to=emb.key)
    for module_path in parts:
        table_row, layer = lookup(module_path + ".weight")
        if table_row is None or table_row.module not in BLOCK_LINEARS:  # e.g. a quantized lm_head: ours stays float
            raise LlamaInputError(f"{d}: unexpected quantized layer {module_path} (only the blocks' linears may be int4)")
        if int(layer) >= args.n_layers:
            raise LlamaInputError(f"{d}: unexpected quantized layer {module_path} for a {args.n_layers}-layer model")
    ckpt = Checkpoint(d, GPTQ.name, args, plain, [d / "config.json"] + hf_weight_files(d), tokenizer_beside(d))
    return config, ckpt, parts


def int4_layer(d: Path, config: dict, module_path: str, found: dict, args: ModelArgs):
    """(whole Int4Weight in Meta's row order, bias or None) of one quantized linear, checked."""
    tensors = {part: f.get(name) for part, (_, f, name) in found.items()}
    hf_name = meta_to_hf_key(module_path + ".weight").removesuffix(".weight")
    if "g_idx" not in tensors and "qweight" in tensors and not config.get("desc_act"):
        group_size = int(config.get("group_size", -1))  # older files: implied
        tensors["g_idx"] = group_index(tensors["qweight"].shape[0] * PER_WORD, group_size)
    missing = [p for p in INT4_PARTS if p not in tensors]
    if missing:
        raise LlamaInputError(f"{found['qweight'][0] if 'qweight' in found else d}: quantized layer "
                              f"{hf_name} lacks {missing[0]}")
    w = Int4Weight(*(tensors[p] for p in INT4_PARTS))
    check_int4(w, hf_name)
    want = expected_shapes(args)[module_path + ".weight"]
    if (w.out_features, w.in_features) != want:
        raise LlamaInputError(f"{found['qweight'][0]}: {module_path} is {w.out_features}x{w.in_features} int4 "
                              f"but the config implies {want[0]}x{want[1]}")
    if rope_heads(module_path + ".weight", args):
        w = rope_columns(w, module_path + ".weight", args, to_hf=False)
    return w, tensors.get("bias")


def load_int4(ckpt_dir, args: ModelArgs, dtype=torch.float32, device="cpu", mp_rank: int = 0, mp_size: int = 1) -> Transformer:
    """Build the model on `meta` and fill it from a GPTQ folder: quantized linears become
    Int4Linear, the rest (embeddings, norms, output) load in `dtype`. Under tensor parallelism
    each rank takes its share of the one whole checkpoint."""
    d = Path(ckpt_dir)
    config, ckpt, parts = read_gptq_folder(d, args, tie=mp_size == 1)
    group_size = int(config.get("group_size", -1))
    share = (mp_rank, mp_size)
    model = load_outside_blocks(ckpt, args, dtype, device, share)
    for module_path, found in parts.items():
        w, bias = int4_layer(d, config, module_path, found, args)
        kind = tensor_parallel_kind(model.get_submodule(module_path))
        w = tp_share(w, kind, mp_rank, mp_size)
        if bias is not None and kind == "column":
            bias = bias.chunk(mp_size)[mp_rank]
        replace_module(model, module_path, Int4Linear.from_int4(
            Int4Weight(*(t.to(device) for t in w.tensors().values())), group_size, kind,
            None if bias is None else bias.to(device, torch.float32)))
    for i, block in enumerate(model.layers):  # norms (and any linear the file left in float)
        fill(block, ckpt, f"layers.{i}.", dtype, device, share)
    return model.eval()


def open_dequantized(d: Path) -> Checkpoint:
    """A GPTQ folder as a float checkpoint: each int4 linear read as its dequantized weight (in
    Meta's row order), one at a time (the exporters). Listed as float16, the folder's own dtype;
    read in float32, exact, so that an f32 export holds what the int4 layer computes with."""
    args = GPTQ.read_args(d)
    config, ckpt, parts = read_gptq_folder(d, args)
    for module_path, found in parts.items():
        if "bias" in found:
            raise LlamaInputError(f"{d}: quantized layer {module_path} has a bias, which the LLaMA model has not")
        key = module_path + ".weight"
        shape = expected_shapes(args)[key]
        ckpt.tensors[key] = TensorEntry(key, shape, torch.float16, [], compute=lambda m=module_path, f=found: dequantize(
            int4_layer(d, config, m, f, args)[0], torch.float32))
    return ckpt.check()


def _meta_key(name: str):
    """hf_to_meta_key, with each quantized part (q_proj.qweight ...) keyed like its module
    (layers.0.attention.wq.qweight)."""
    stem, _, part = name.rpartition(".")
    module_key = hf_to_meta_key(f"{stem}.weight")
    if module_key is not None and part in INT4_PARTS + ("bias",):
        return f"{module_key.removesuffix('.weight')}.{part}"
    return hf_to_meta_key(name)


def save_int4(model: Transformer, out_dir, quant: dict, tokenizer_path=None) -> Path:
    """Write a one-process model with Int4Linear blocks as a GPTQ folder (HF names, q/k columns
    in HF's RoPE order), readable by AutoGPTQ-style loaders. Embeddings, norms and the output
    layer are stored in fp16 (GPTQ's convention, `torch_dtype: float16`). The folder appears
    whole: it is written under a temporary name and renamed."""
    out = Path(out_dir)
    check_new_output(out)
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
        if rope_heads(f"{module_path}.weight", args):
            w = rope_columns(w, f"{module_path}.weight", args, to_hf=True)
        stem = meta_to_hf_key(f"{module_path}.weight").removesuffix(".weight")
        for part, t in w.tensors().items():
            tensors[f"{stem}.{part}"] = t.cpu()
        if layer.bias is not None:
            tensors[f"{stem}.bias"] = layer.bias.to(torch.float16).cpu()
    quant = {"bits": 4, "quant_method": "gptq", "checkpoint_format": "gptq", "true_sequential": False, **quant}
    config = {**args.to_hf_config(), "quantization_config": quant}
    with atomic_folder(out) as tmp:
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_bytes(tmp / "config.json", json.dumps(config, indent=2).encode())
        atomic_write_bytes(tmp / "quantize_config.json", json.dumps(quant, indent=2).encode())
        if tokenizer_path is not None and Path(tokenizer_path).is_file():
            shutil.copyfile(tokenizer_path, tmp / tokenizer_file_name(tokenizer_path))
    return out


class GPTQLayout(HFLayout):
    """An HF folder of GPTQ int4 weights: read as int4 (quant "int4"), never as float; the
    splitter and other float readers refuse it (HFLayout.open)."""
    name = "gptq"
    quant = "int4"

    def detect(self, d: Path) -> bool:
        return super().detect(d) and bool(quantization_config(d))

    def load_model(self, ckpt_dir, args: ModelArgs, dtype=torch.float32, device="cpu", mp_rank: int = 0,
                   mp_size: int = 1) -> Transformer:
        return load_int4(ckpt_dir, args, dtype, device, mp_rank, mp_size)

    def open_float(self, d: Path) -> Checkpoint:
        return open_dequantized(d)


GPTQ = GPTQLayout()
register_format(GPTQ, first=True)
