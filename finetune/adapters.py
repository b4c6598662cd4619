"""Attach a fine-tuning method (finetune/methods) to a loaded model, and save or load what it trained.

Adapters are written in PEFT's format with HF names (adapter_config.json +
adapter_model.safetensors), whole (gathered from tensor-parallel ranks), so one file serves any
number of GPUs and loads into PEFT on an HF model too; methods that train the base itself save a
checkpoint in our format instead. Our own settings (method, task, template, class names) go beside
them in finetune.json.
"""
import json
from pathlib import Path

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from safetensors.torch import load_file

from llama.distributed import model_parallel_rank, model_parallel_size
from llama.errors import LlamaInputError
from llama.files import atomic_write_bytes, save_safetensors
from llama.formats import save_checkpoint, save_gathered_checkpoint
from llama.layers import split_dim
from llama.model import Transformer
from llama.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, read_adapter_config
from llama.tokenizers import Tokenizer
from finetune.heads import SCORE_TASKS, ScoreHead, TaskModel
from finetune.methods.lora import lora_layers
from finetune.methods import base_transformer, get_method, method_for_peft_type
from finetune.tasks.dpo import DPOSettings


def attach(model: Transformer, cfg, tokenizer: Tokenizer, num_labels: int = 0) -> TaskModel:
    """Freeze the model, add cfg.method's trainable part (and a score head for cls, regression and rm).
    Trainable parameters are float32 whatever the base dtype."""
    model.requires_grad_(False)
    model = get_method(cfg.method).attach(model, cfg, tokenizer)
    head = None
    if cfg.task in SCORE_TASKS:
        transformer = base_transformer(model)
        transformer.output.requires_grad_(False)  # a score head replaces it (and DDP rejects unused parameters)
        head = ScoreHead(transformer.args.dim, num_labels if cfg.task == "cls" else 1, device=transformer.norm.weight.device)
    method = get_method(cfg.method)
    reference = (lambda: method.reference(model)) if method.has_reference else None
    task_model = TaskModel(model, cfg.task, head, DPOSettings(cfg.dpo_beta, cfg.dpo_loss, cfg.dpo_label_smoothing),
                           reference)
    mark_split_params(task_model.transformer)
    return task_model


def mark_split_params(model: Transformer) -> None:
    """Tag each base parameter split across tensor-parallel ranks with the dim it is split on
    (`p.tp_split_dim`), for the gradient norm and for gathering on save (a LoRA layer tags its
    own weights)."""
    if model_parallel_size() == 1:
        return
    for name, p in model.named_parameters():
        dim = split_dim(name.replace(".base.", "."), model.args)  # a LoRA-wrapped base keeps its checkpoint key
        if dim is not None:
            p.tp_split_dim = dim


# --- saving ----------------------------------------------------------------------------------


def save_trained(task_model: TaskModel, cfg, out_dir, label_names=()) -> None:
    """Write what the method trained to out_dir: a PEFT-format adapter, or a checkpoint (one file
    per tensor-parallel rank) for methods that train the base itself. Every rank calls it."""
    out = Path(out_dir)
    method = get_method(cfg.method)
    ours = {"method": cfg.method, "task": cfg.task, "template": cfg.template, "label_names": list(label_names),
            "base_model": cfg.ckpt_dir}
    if method.peft_type is None:
        model = task_model.transformer
        if isinstance(task_model, FSDPModule):  # every rank helps gather; rank 0 writes
            save_gathered_checkpoint(model, out)
        elif _is_writer(per_shard=True):
            save_checkpoint(model, out, rank=model_parallel_rank())
        if task_model.head is not None and _is_writer():
            save_safetensors({"score.weight": task_model.head.weight}, out / "score.safetensors")
    else:
        tensors = method.adapter_tensors(task_model.model)
        if task_model.head is not None:
            tensors[f"{PEFT_PREFIX}score.weight"] = task_model.head.weight.detach()
        if _is_writer():
            config = {"base_model_name_or_path": cfg.ckpt_dir, "inference_mode": True,
                      "task_type": "SEQ_CLS" if cfg.task in SCORE_TASKS else "CAUSAL_LM",
                      "modules_to_save": ["score"] if cfg.task in SCORE_TASKS else None,
                      **method.peft_config(cfg, task_model.model)}
            out.mkdir(parents=True, exist_ok=True)
            save_safetensors(tensors, out / ADAPTER_WEIGHTS)
            atomic_write_bytes(out / ADAPTER_CONFIG, json.dumps(config, indent=2).encode())
    if _is_writer():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "finetune.json", json.dumps(ours, indent=2).encode())


def _is_writer(per_shard: bool = False) -> bool:
    """Rank 0 writes what is whole; with per_shard, the first data-parallel copy of each
    tensor-parallel shard (fairscale numbers the ranks of one model copy consecutively)."""
    if not dist.is_initialized():
        return True
    return dist.get_rank() < (model_parallel_size() if per_shard else 1)


# --- loading ---------------------------------------------------------------------------------


def read_adapter(adapter_dir) -> tuple[dict, dict]:
    """(PEFT adapter_config, our finetune.json) of an adapter folder."""
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    try:
        ours = json.loads((folder / "finetune.json").read_text()) if (folder / "finetune.json").is_file() else {}
    except json.JSONDecodeError as e:
        raise LlamaInputError(f"{folder / 'finetune.json'}: malformed ({e})") from None
    return config, ours


def fold_adapter(model: Transformer, adapter_dir) -> None:
    """Fold a saved LoRA adapter (ours or PEFT's) into a loaded float model's weights, in place:
    the model becomes the fine-tuned one, plain again, so a new method can be attached on top
    (init_adapter: DPO after SFT, whose reference is then the SFT model)."""
    config, _ = read_adapter(adapter_dir)
    if config.get("peft_type") != "LORA":
        raise LlamaInputError(f"init_adapter {adapter_dir}: a {config.get('peft_type')} adapter can't be folded into "
                              "the weights; give a LoRA adapter")
    load_adapter(model, adapter_dir)
    for path, layer in lora_layers(model).items():
        layer.merge()
        parent, child = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, layer.base)


def load_adapter(model: Transformer, adapter_dir):
    """Apply a saved adapter (LoRA, prompt tuning: any method by its PEFT type) to a loaded model
    (this rank's slice under tensor parallelism). Returns the model to generate with."""
    config, _ = read_adapter(adapter_dir)
    method = method_for_peft_type(config.get("peft_type"), adapter_dir)
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    return method.load(model, config, tensors, adapter_dir)
