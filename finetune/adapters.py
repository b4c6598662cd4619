"""Attach a fine-tuning method to a loaded model, and save / load / merge what it trained.

Adapters are written in PEFT's format with HF names (adapter_config.json +
adapter_model.safetensors), whole (gathered from tensor-parallel ranks), so one file serves any
number of GPUs and loads into PEFT on an HF model too. Our own settings (method, task, template,
class names) go beside them in finetune.json.
"""
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llama.checkpoint import (meta_to_hf_key, permute_rope_rows, save_checkpoint, save_safetensors, split_dim,
                              unpermute_rope_rows)
from llama.errors import LlamaInputError
from llama.files import atomic_write_bytes
from llama.model import Transformer
from llama.parallel import model_parallel_rank, model_parallel_size
from llama.tokenizer import Tokenizer
from finetune.heads import SCORE_TASKS, ScoreHead, TaskModel
from finetune.lora import TARGETS, LoRALinear, apply_lora, lora_layers
from finetune.prompt_tuning import PromptTuning, init_prompt

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def attach(model: Transformer, cfg, tokenizer: Tokenizer, num_labels: int = 0) -> TaskModel:
    """Freeze the model, add cfg.method's trainable part (and a score head for cls/regression).
    Trainable parameters are float32 whatever the base dtype."""
    model.requires_grad_(False)
    if cfg.method == "lora":
        apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora)
    elif cfg.method == "prompt":
        gen = torch.Generator().manual_seed(cfg.seed)
        init = init_prompt(model, tokenizer, cfg.num_virtual_tokens, cfg.prompt_init, cfg.prompt_init_text, gen)
        model = PromptTuning(model, init)
    elif cfg.method in ("full", "freeze"):
        blocks = list(model.layers) if cfg.method == "freeze" else [model]
        if cfg.method == "freeze":
            if not 1 <= cfg.train_layers <= len(blocks):
                raise LlamaInputError(f"train_layers must be 1..{len(blocks)}, got {cfg.train_layers}")
            blocks = blocks[-cfg.train_layers:]
        for block in blocks:
            for p in block.parameters():
                p.data = p.data.float()
                p.requires_grad_(True)
    head = None
    if cfg.task in SCORE_TASKS:
        model.output.requires_grad_(False)  # a score head replaces it (and DDP rejects unused parameters)
        dev = task_norm_device(model)
        head = ScoreHead(model.args.dim, num_labels if cfg.task == "cls" else 1, device=dev)
    task_model = TaskModel(model, cfg.task, head)
    mark_split_params(task_model.transformer)
    return task_model


def task_norm_device(model) -> torch.device:
    """Where the final hidden states come out (the last stage under layer-wise placement)."""
    return (model.model if isinstance(model, PromptTuning) else model).norm.weight.device


def mark_split_params(model: Transformer) -> None:
    """Tag each parameter split across tensor-parallel ranks with the dim it is split on
    (`p.tp_split_dim`), for the gradient norm and for gathering on save: base weights by the
    checkpoint's split table, LoRA weights by the kind of layer they adapt."""
    if model_parallel_size() == 1:
        return
    for name, p in model.named_parameters():
        dim = split_dim(name.replace(".base.", "."))  # a LoRA-wrapped base keeps its checkpoint key
        if dim is not None:
            p.tp_split_dim = dim
    for layer in lora_layers(model).values():
        if layer.kind == "column":
            layer.lora_B.weight.tp_split_dim = 0
        elif layer.kind == "row":
            layer.lora_A.weight.tp_split_dim = 1


def gather_split(t: torch.Tensor, dim) -> torch.Tensor:
    """This rank's slice -> the whole tensor (all ranks of the tensor-parallel group call it)."""
    if dim is None or model_parallel_size() == 1:
        return t
    from fairscale.nn.model_parallel.initialize import get_model_parallel_group

    parts = [torch.empty_like(t) for _ in range(model_parallel_size())]
    dist.all_gather(parts, t.contiguous(), group=get_model_parallel_group())
    return torch.cat(parts, dim=dim)


def local_slice(t: torch.Tensor, dim) -> torch.Tensor:
    if dim is None or model_parallel_size() == 1:
        return t
    return t.chunk(model_parallel_size(), dim=dim)[model_parallel_rank()]


# --- saving ----------------------------------------------------------------------------------


def adapter_tensors(task_model: TaskModel) -> dict[str, torch.Tensor]:
    """The trained tensors under PEFT's HF names, whole. q/k LoRA B rows are permuted to HF's
    rotary layout so the adapter fits HF weights."""
    args = task_model.transformer.args
    out = {}
    if isinstance(task_model.model, PromptTuning):
        out["prompt_embeddings"] = task_model.model.prompt_embeddings.detach()
    for path, layer in lora_layers(task_model.model).items():
        hf = meta_to_hf_key(f"{path}.weight").removesuffix(".weight")
        a = gather_split(layer.lora_A.weight.detach(), getattr(layer.lora_A.weight, "tp_split_dim", None))
        b = gather_split(layer.lora_B.weight.detach(), getattr(layer.lora_B.weight, "tp_split_dim", None))
        name = path.rsplit(".", 1)[1]
        if name in ("wq", "wk"):
            b = permute_rope_rows(b, args.n_heads if name == "wq" else args.n_kv_heads)
        out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = a
        out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = b
    if task_model.head is not None:
        out[f"{PEFT_PREFIX}score.weight"] = task_model.head.weight.detach()
    return out


def peft_config(cfg, n_virtual: int = 0, dim: int = 0, n_layers: int = 0, n_heads: int = 0) -> dict:
    common = {"base_model_name_or_path": cfg.ckpt_dir, "inference_mode": True,
              "task_type": "SEQ_CLS" if cfg.task in SCORE_TASKS else "CAUSAL_LM",
              "modules_to_save": ["score"] if cfg.task in SCORE_TASKS else None}
    if cfg.method == "prompt":
        init = {"text": "TEXT", "vocab": "SAMPLE_VOCAB", "random": "RANDOM"}[cfg.prompt_init]
        return {**common, "peft_type": "PROMPT_TUNING", "num_virtual_tokens": n_virtual, "token_dim": dim,
                "num_transformer_submodules": 1, "num_attention_heads": n_heads, "num_layers": n_layers,
                "prompt_tuning_init": init, "prompt_tuning_init_text": cfg.prompt_init_text if init == "TEXT" else None,
                # PEFT insists on a tokenizer for TEXT init, though in inference mode it never loads it
                "tokenizer_name_or_path": cfg.tokenizer_path or cfg.ckpt_dir}
    from finetune.lora import resolve_targets

    return {**common, "peft_type": "LORA", "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout, "use_rslora": cfg.use_rslora, "bias": "none", "fan_in_fan_out": False,
            "target_modules": [TARGETS[t] for t in resolve_targets(cfg.lora_targets)]}


def save_adapter(task_model: TaskModel, cfg, out_dir, label_names=()) -> None:
    """Write what the method trained to out_dir: a PEFT-format adapter for lora/prompt, a full
    checkpoint (one file per tensor-parallel rank) for full/freeze. Every rank calls it."""
    out = Path(out_dir)
    ours = {"method": cfg.method, "task": cfg.task, "template": cfg.template, "label_names": list(label_names),
            "base_model": cfg.ckpt_dir}
    if cfg.method in ("full", "freeze"):
        model = task_model.transformer
        if _is_writer(per_shard=True):
            save_checkpoint(model, out, rank=model_parallel_rank())
        if task_model.head is not None and _is_writer():
            save_safetensors({"score.weight": task_model.head.weight}, out / "score.safetensors")
    else:
        tensors = adapter_tensors(task_model)
        if _is_writer():
            args = task_model.transformer.args
            n_virtual = task_model.model.n_virtual if cfg.method == "prompt" else 0
            config = peft_config(cfg, n_virtual, args.dim, args.n_layers, args.n_heads)
            out.mkdir(parents=True, exist_ok=True)
            save_safetensors(tensors, out / ADAPTER_WEIGHTS)
            atomic_write_bytes(out / "adapter_config.json", json.dumps(config, indent=2).encode())
    if _is_writer():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "finetune.json", json.dumps(ours, indent=2).encode())


def _is_writer(per_shard: bool = False) -> bool:
    """Rank 0 writes what is whole; with per_shard, the first data-parallel copy of each
    tensor-parallel shard (fairscale numbers the ranks of one model copy consecutively)."""
    if not dist.is_initialized():
        return True
    return dist.get_rank() < (model_parallel_size() if per_shard else 1)


def merged_state_dict(model: nn.Module, quantized_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A LoRA'd model's weights with each adapter folded into its base weight, under the plain
    model's names (layers.0.attention.wq.weight), in the base dtype. Quantized (int4/NF4) bases
    are dequantized to `quantized_dtype`, so the result is a plain float checkpoint (re-quantize
    it with `python -m quant` if wanted)."""
    quantized = {path: m for path, m in model.named_modules() if hasattr(m, "dequantized_weight")}
    state = {}
    for name, t in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name or any(name.startswith(f"{p}.") for p in quantized):
            continue
        state[name.replace(".base.", ".")] = t
    for path, layer in quantized.items():  # one layer at a time onto the host: the GPU never holds a float copy
        state[f"{path.removesuffix('.base')}.weight"] = layer.dequantized_weight(quantized_dtype).cpu()
    for path, layer in lora_layers(model).items():
        key = f"{path}.weight"
        delta = layer.delta_weight().detach().to(state[key].device)
        state[key] = (state[key].float() + delta).to(state[key].dtype)
    return state


# --- loading ---------------------------------------------------------------------------------


def read_adapter(adapter_dir) -> tuple[dict, dict]:
    """(PEFT adapter_config, our finetune.json) of an adapter folder."""
    folder = Path(adapter_dir)
    for name in ("adapter_config.json", ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise LlamaInputError(f"{folder}: not an adapter folder (no {name})")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        ours = json.loads((folder / "finetune.json").read_text()) if (folder / "finetune.json").is_file() else {}
    except json.JSONDecodeError as e:
        raise LlamaInputError(f"{folder}: malformed adapter config ({e})") from None
    return config, ours


def load_adapter(model: Transformer, adapter_dir) -> nn.Module:
    """Apply a saved LoRA or prompt-tuning adapter to a loaded model (this rank's slice under
    tensor parallelism). Returns the model to generate with (a PromptTuning for prompt tuning)."""
    from safetensors.torch import load_file

    config, _ = read_adapter(adapter_dir)
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    device = model.tok_embeddings.weight.device
    kind = config.get("peft_type")
    if kind == "PROMPT_TUNING":
        prompt = tensors["prompt_embeddings"]
        if prompt.shape[-1] != model.args.dim:
            raise LlamaInputError(f"{adapter_dir}: prompt width {prompt.shape[-1]} but the model's dim is {model.args.dim}")
        return PromptTuning(model, prompt.to(device))
    if kind != "LORA":
        raise LlamaInputError(f"{adapter_dir}: adapter type {kind!r} is not supported (LORA, PROMPT_TUNING)")
    apply_lora(model, config["target_modules"], config["r"], config["lora_alpha"], 0.0, config.get("use_rslora", False))
    mark_split_params(model)
    for path, layer in lora_layers(model).items():
        hf = f"{PEFT_PREFIX}{meta_to_hf_key(f'{path}.weight').removesuffix('.weight')}"
        name = path.rsplit(".", 1)[1]
        for part in ("lora_A", "lora_B"):
            key = f"{hf}.{part}.weight"
            if key not in tensors:
                raise LlamaInputError(f"{adapter_dir}: adapter lacks {key}")
            t = tensors[key].float()
            if part == "lora_B" and name in ("wq", "wk"):
                t = unpermute_rope_rows(t, model.args.n_heads if name == "wq" else model.args.n_kv_heads)
            weight = getattr(layer, part).weight
            t = local_slice(t, getattr(weight, "tp_split_dim", None))
            if t.shape != weight.shape:
                raise LlamaInputError(f"{adapter_dir}: {key} has shape {tuple(t.shape)}, expected {tuple(weight.shape)}")
            with torch.no_grad():
                weight.copy_(t)
    return model
