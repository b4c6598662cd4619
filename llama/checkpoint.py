"""Detect, read and write LLaMA checkpoints.

Formats (detected from the folder):
- meta: `params.json` + `consolidated.NN.pth` (Meta's release; one file per tensor-parallel rank)
- ours: `params.json` + `consolidated.NN.safetensors` (the same keys and fairscale layout)
- hf:   `config.json` + `model.safetensors`, `model-0000X-of-0000N.safetensors` with an index,
        or `pytorch_model*.bin`; HF key names, q/k rows permuted for half-rotation RoPE

Everything is returned with Meta key names and layout. The model is built on the `meta` device
and tensors are assigned to it, one at a time, so loading never holds two copies of the weights.
"""
import json
import math
import re
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import save_file

from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.files import atomic_path
from llama.model import Transformer

# --- the fairscale split rule: one table for the loader, split_model.py and tensor parallel ----
# Column-parallel weights are split on dim 0 (output features), row-parallel ones on dim 1
# (input features), the embedding on dim 1 (LLaMA-1/2); anything else (norms) is replicated.
SPLIT_DIMS = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
}
_LAYER_PREFIX = re.compile(r"^layers\.\d+\.")
IGNORED_KEYS = re.compile(r"(^|\.)(rope\.freqs|rotary_emb\.inv_freq)$")


def split_dim(key: str) -> Optional[int]:
    """The dim along which tensor-parallel ranks split Meta key `key`, or None if replicated."""
    return SPLIT_DIMS.get(_LAYER_PREFIX.sub("", key))


# --- reading tensor files ------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsFile:
    """Reads one safetensors file tensor by tensor, straight from disk into the tensor's memory
    (no mmap, whose touched pages would count twice), checking the header against the file size."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise LlamaInputError(f"{path}: not a safetensors file, or truncated")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LlamaInputError(f"{path}: corrupt safetensors header") from None
        if not isinstance(header, dict):
            raise LlamaInputError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.entries = {}
        for key, info in header.items():
            try:
                begin, end = info["data_offsets"]
                dtype_name, shape = info["dtype"], tuple(info["shape"])
                valid = all(isinstance(x, int) and x >= 0 for x in (begin, end, *shape)) and begin <= end
            except (TypeError, KeyError, ValueError):
                valid = False
            if not valid:
                raise LlamaInputError(f"{path}: corrupt safetensors header (bad entry for tensor {key})")
            dtype = _ST_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
            if dtype is None:
                raise LlamaInputError(f"{path}: tensor {key} has unsupported dtype {dtype_name}")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise LlamaInputError(
                    f"{path}: corrupt safetensors header (tensor {key}: shape {shape} does not match its byte range)"
                )
            if 8 + n + end > size:
                raise LlamaInputError(f"{path}: truncated (tensor {key} runs past the end of the file)")
            self.entries[key] = (8 + n + begin, end - begin, dtype, shape)

    def keys(self):
        return self.entries.keys()

    def get(self, key: str) -> torch.Tensor:
        offset, nbytes, dtype, shape = self.entries[key]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf.numpy()) != nbytes:
                raise LlamaInputError(f"{self.path}: truncated while reading {key}")
        return buf.view(dtype).reshape(shape)


class PthFile:
    """A torch pickle (`.pth`/`.bin`), opened with weights_only=True and, where the file is in the
    zip format, mmap=True so tensors are paged in from disk as they are used."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise _unreadable(path, e) from None
            self.tensors = self._load_legacy(path)
        except Exception as e:  # unpickling errors come in many types
            raise _unreadable(path, e) from None
        if not isinstance(self.tensors, dict) or not all(isinstance(k, str) for k in self.tensors):
            raise LlamaInputError(f"{path}: expected a dict of tensors")

    @staticmethod
    def _load_legacy(path):  # pre-zip torch.save files can't be mmapped
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise _unreadable(path, e) from None

    def keys(self):
        return self.tensors.keys()

    def get(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        if not isinstance(t, torch.Tensor):
            raise LlamaInputError(f"{self.path}: {key} is a {type(t).__name__}, not a tensor")
        return t


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _unreadable(path: Path, e: Exception) -> LlamaInputError:
    """torch.load's errors are long and, for weights_only, suggest weights_only=False (unsafe, and
    no help for a corrupt file): keep the one line that says what went wrong."""
    msg = str(e)
    if "WeightsUnpickler error:" in msg:
        detail = msg.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0][:200]
    else:
        detail = _first_line(e).split(". ")[0]
    return LlamaInputError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {detail}")


def open_tensor_file(path: Path):
    return SafetensorsFile(path) if path.suffix == ".safetensors" else PthFile(path)


# --- format detection ------------------------------------------------------------------------


def detect_format(ckpt_dir) -> str:
    """'meta' (params.json, .pth shards), 'ours' (params.json, .safetensors shards) or 'hf'."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise LlamaInputError(f"{d}: checkpoint folder not found")
    if (d / "config.json").is_file():
        return "hf"
    if not (d / "params.json").is_file():
        raise LlamaInputError(f"{d}: no params.json (Meta format) or config.json (HF format) in the folder")
    if any(d.glob("consolidated.*.safetensors")):
        return "ours"
    return "meta"


def quantization_config(ckpt_dir) -> Optional[dict]:
    """The GPTQ settings of a quantized HF folder (quantize_config.json, or config.json's
    quantization_config), or None for float weights."""
    d = Path(ckpt_dir)
    for path, pick in ((d / "quantize_config.json", lambda c: c), (d / "config.json", lambda c: c.get("quantization_config"))):
        if path.is_file():
            try:
                found = pick(json.loads(path.read_text()))
            except (json.JSONDecodeError, AttributeError):
                raise LlamaInputError(f"{path}: not valid JSON") from None
            if found:
                return found
    return None


def read_model_args(ckpt_dir) -> ModelArgs:
    d = Path(ckpt_dir)
    if detect_format(d) == "hf":
        return ModelArgs.from_hf_config(d / "config.json")
    return ModelArgs.from_params_json(d / "params.json")


def shard_files(ckpt_dir) -> list[Path]:
    """Meta-layout shards consolidated.00 .. consolidated.{N-1}, checked for gaps."""
    d = Path(ckpt_dir)
    ext = ".safetensors" if detect_format(d) == "ours" else ".pth"
    files = sorted(d.glob(f"consolidated.*{ext}"))
    if not files:
        raise LlamaInputError(f"{d}: params.json found but no consolidated.*.pth or .safetensors weights")
    numbers = {int(m.group(1)) for f in files if (m := re.fullmatch(r"consolidated\.(\d+)\..*", f.name))}
    n = max(numbers) + 1
    missing = sorted(set(range(n)) - numbers)
    if missing:
        raise LlamaInputError(f"{d}: shard consolidated.{missing[0]:02d}{ext} is missing from a {n}-shard checkpoint")
    return [d / f"consolidated.{i:02d}{ext}" for i in range(n)]


def hf_weight_files(ckpt_dir) -> list[Path]:
    """The weight files of an HF folder (those its index lists, when it has one)."""
    d = Path(ckpt_dir)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise LlamaInputError(f"{index}: not a valid weight index") from None
            files = [d / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise LlamaInputError(f"{f}: listed in {index.name} but missing")
            return files
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "pytorch_model*.bin"):
        files = sorted(d.glob(pattern))
        if files:
            return files
    raise LlamaInputError(f"{d}: config.json found but no *.safetensors or pytorch_model*.bin weights")


# --- HF -> Meta names and layout -------------------------------------------------------------

_HF_NAMES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
]


def hf_to_meta_key(name: str) -> Optional[str]:
    for pattern, meta in _HF_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, meta, name)
    return None


def meta_to_hf_key(name: str) -> Optional[str]:
    """The inverse of hf_to_meta_key: 'layers.0.attention.wq.weight' -> 'model.layers.0.self_attn.q_proj.weight'."""
    for hf, meta in _HF_NAMES:
        pattern = re.escape(meta).replace(re.escape(r"\1"), r"(\d+)")
        if re.fullmatch(pattern, name):
            return re.sub(pattern, hf.replace(r"(\d+)", r"\1").replace("\\.", "."), name)
    return None


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta q/k rows (interleaved pairs) -> HF rows (half rotation), per head: the inverse of
    unpermute_rope_rows."""
    head_dim = w.shape[0] // n_heads
    return w.view(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q/k rows (half rotation) -> Meta rows (interleaved pairs), per head."""
    head_dim = w.shape[0] // n_heads
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


def _unpermute_rope_rows_(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """unpermute_rope_rows in place, one head at a time: the loader's temp is one head's rows, not
    a second full tensor (whose freed buffers would fragment the heap and stay in RSS)."""
    src = w.view(n_heads, 2, -1, w.shape[-1])  # HF: [head, half, row, dim]
    dst = w.view(n_heads, -1, 2, w.shape[-1])  # Meta: [head, pair, 2, dim]
    tmp = torch.empty_like(src[0])
    for h in range(n_heads):
        tmp.copy_(src[h])
        dst[h].copy_(tmp.transpose(0, 1))
    return w


# --- loading ---------------------------------------------------------------------------------


def _meta_layout_index(files: list[Path], mp_rank: int, mp_size: int) -> dict:
    """key -> (file, loader) for this rank: its own shard when there is one per rank, or all
    shards concatenated along their split dims when one process loads a sharded checkpoint."""
    if len(files) == mp_size:
        shard = open_tensor_file(files[mp_rank])
        return {key: (files[mp_rank], lambda key=key: shard.get(key)) for key in shard.keys()}
    shards = [open_tensor_file(f) for f in files]
    index = {}
    for key in shards[0].keys():
        dim = split_dim(key)
        if dim is None or len(shards) == 1:
            index[key] = (files[0], lambda key=key: shards[0].get(key))
            continue
        for f, s in zip(files, shards):
            if key not in s.keys():
                raise LlamaInputError(f"{f}: tensor {key} is missing")
        index[key] = (files[0], lambda key=key, dim=dim: torch.cat([s.get(key) for s in shards], dim=dim))
    return index


def iter_hf_names(ckpt_dir, key_of=hf_to_meta_key) -> Iterator[tuple[Path, object, str, str]]:
    """(weight file, opened file, HF name, Meta key) for every tensor of an HF folder. key_of maps
    an HF name to its key (None for a name to skip or refuse)."""
    for path in hf_weight_files(ckpt_dir):
        f = open_tensor_file(path)
        for name in f.keys():
            key = key_of(name)
            if key is None:
                if IGNORED_KEYS.search(name):
                    continue
                raise LlamaInputError(f"{path}: unexpected tensor {name}")
            yield path, f, name, key


def hf_loader(f, name: str, key: str, args: ModelArgs):
    """Reads HF tensor `name` in Meta layout (q/k rows back to interleaved-pair RoPE order)."""
    def load() -> torch.Tensor:
        t = f.get(name)
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):
            n = args.n_heads if key.endswith("wq.weight") else args.n_kv_heads
            if tuple(t.shape) == (n * args.head_dim, args.dim):  # else load_model reports the shape
                t = _unpermute_rope_rows_(t.contiguous(), n)
        return t

    return load


def checkpoint_index(ckpt_dir, args: ModelArgs, mp_rank: int = 0, mp_size: int = 1) -> dict:
    """meta_key -> (source file, loader) for every tensor this rank needs; nothing is read until
    a loader is called, so callers can take tensors one at a time and in any order."""
    d = Path(ckpt_dir)
    if detect_format(d) == "hf":
        return {key: (path, hf_loader(f, name, key, args)) for path, f, name, key in iter_hf_names(d)}
    index = _meta_layout_index(shard_files(d), mp_rank, mp_size)
    return {key: entry for key, entry in index.items() if not IGNORED_KEYS.search(key)}


def assign_from_index(module: torch.nn.Module, index: dict, prefix: str, dtype=None, device="cpu") -> list[str]:
    """Give each parameter of `module` (built on `meta`) the checkpoint tensor `prefix + name`
    from checkpoint_index, shape-checked, in dtype (None: as stored) on device. Lets callers
    load a model piece by piece. Returns the keys used."""
    state = {}
    for name, p in module.named_parameters():
        key = prefix + name
        if key not in index:
            raise LlamaInputError(f"checkpoint lacks tensor {key}")
        path, load = index[key]
        t = load()
        if tuple(t.shape) != tuple(p.shape):
            raise LlamaInputError(f"{path}: tensor {key} has shape {tuple(t.shape)} but the config implies {tuple(p.shape)}")
        state[name] = t.to(device=device, dtype=dtype or t.dtype)
    module.load_state_dict(state, strict=False, assign=True)
    return [prefix + name for name in state]


def iter_checkpoint(ckpt_dir, args: ModelArgs, mp_rank: int = 0, mp_size: int = 1):
    """(meta_key, tensor, source_file) for every tensor this rank needs, one at a time."""
    for key, (path, load) in checkpoint_index(ckpt_dir, args, mp_rank, mp_size).items():
        yield key, load(), path


def check_shard_count(ckpt_dir, mp_size: int) -> None:
    """One process loads any checkpoint; N tensor-parallel processes need N Meta-layout shards."""
    if mp_size == 1:
        return
    d = Path(ckpt_dir)
    n = 1 if detect_format(d) == "hf" else len(shard_files(d))
    if n != mp_size:
        raise LlamaInputError(
            f"{d}: checkpoint has {n} shard(s) but {mp_size} processes were started; "
            f"run `python split_model.py --n {mp_size} --ckpt_dir {d}` first"
        )


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skips random initialisers while the model is built on `meta` (the checkpoint replaces every
    weight anyway). `normal_` on a meta tensor (nn.Embedding's init) would otherwise pull in
    torch's Python meta kernels and sympy on first use: ~70 MB of RSS and ~2 s per process."""

    _INITIALISERS = {
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.nn.init.normal_, torch.nn.init.uniform_,
        torch.nn.init.trunc_normal_, torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_,
        torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._INITIALISERS:
            tensor = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def meta_model_outside_blocks(index: dict, args, dtype, device, mp_size: int = 1):
    """A Transformer on `meta` with everything outside the blocks (embeddings, final norm,
    output) read from checkpoint_index `index`; the blocks stay on meta for the caller to fill
    one at a time. Tensors of the checkpoint that the model has no place for are reported."""
    with torch.device("meta"), _SkipInit():
        model = Transformer(args)
    known = set(model.state_dict())
    unexpected = sorted(set(index) - known - ({"output.weight"} if args.tie_word_embeddings else set()))
    if unexpected:
        path = index[unexpected[0]][0]
        raise LlamaInputError(f"{path}: unexpected tensor {unexpected[0]} for a {args.n_layers}-layer model")
    assign_from_index(model.tok_embeddings, index, "tok_embeddings.", dtype, device)
    assign_from_index(model.norm, index, "norm.", dtype, device)
    if "output.weight" in index or not args.tie_word_embeddings or mp_size > 1:
        assign_from_index(model.output, index, "output.", dtype, device)
    else:
        model.output.weight = model.tok_embeddings.weight
    return model


def load_model(ckpt_dir, args: ModelArgs, dtype=torch.float32, device="cpu", mp_rank=0, mp_size=1) -> Transformer:
    """Build the model on `meta`, then assign each checkpoint tensor (converted to dtype/device)
    after checking it against the shape the config implies."""
    if quantization_config(ckpt_dir):
        raise LlamaInputError(f"{ckpt_dir}: holds quantized (GPTQ) weights; load it with quant = int4 "
                              f"(ft_main.py) or --quant int4 (example.py)")
    check_shard_count(ckpt_dir, mp_size)
    with torch.device("meta"), _SkipInit():
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = {}
    for key, t, path in iter_checkpoint(ckpt_dir, args, mp_rank, mp_size):
        if key not in expected:
            raise LlamaInputError(f"{path}: unexpected tensor {key} for a {args.n_layers}-layer model")
        if tuple(t.shape) != tuple(expected[key]):
            raise LlamaInputError(
                f"{path}: tensor {key} has shape {tuple(t.shape)} but the config implies {tuple(expected[key])}"
            )
        state[key] = t.to(device=device, dtype=dtype)
    if "output.weight" not in state and args.tie_word_embeddings and mp_size == 1:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LlamaInputError(f"{ckpt_dir}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# --- writing ---------------------------------------------------------------------------------


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: Optional[dict] = None) -> None:
    """Write tensors atomically (temp file, fsync, rename)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous()
        if v.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=metadata)


def save_checkpoint(model: Transformer, out_dir, state: Optional[dict] = None, rank: int = 0) -> None:
    """Write a model in our format: params.json + consolidated.{rank:02d}.safetensors holding this
    tensor-parallel rank's slices (every rank calls it). `state` replaces model.state_dict()."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict() if state is None else state, out / f"consolidated.{rank:02d}.safetensors")
    if rank == 0:
        model.args.write_params_json(out / "params.json")
