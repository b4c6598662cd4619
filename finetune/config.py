"""Fine-tuning configuration: one flat set of keys, read from a TOML file (optionally grouped in
[model], [method], [data], [train] tables) and overridable on the command line (--lr 1e-4)."""
import argparse
import difflib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from llama.errors import LlamaInputError
from finetune.data import TEMPLATES
from finetune.methods import METHODS
from finetune.tasks.dpo import DPO_LOSSES


def _key(default, help: str, group: str, **kw):
    return field(default_factory=lambda: default, metadata={"help": help, "group": group, **kw})


@dataclass
class TrainConfig:
    # [model]
    ckpt_dir: str = _key("", "base checkpoint folder (Meta, HF or ours; a split checkpoint trains tensor-parallel)", "model")
    tokenizer_path: str = _key("", "tokenizer.model (sentencepiece or Llama-3 tiktoken) or tokenizer.json, kind read from the content (default: tokenizer.model, then tokenizer.json, in ckpt_dir or its parent)", "model")
    dtype: str = _key("auto", "dtype of the frozen base weights: bfloat16, float16, float32, or auto: bfloat16 on a GPU "
                              "and on a CPU with AVX512-BF16 or AMX (float32 there for full and freeze, whose trained "
                              "weights are float32 anyway), float32 on other CPUs, where 16-bit matmuls run ~10x slower",
                     "model")
    quant: str = _key("none", "base weights: int4 (a GPTQ folder as is; float weights rounded to nearest on load), "
                              "nf4 (bitsandbytes, double quant), or none (as loaded)", "model")
    quant_group_size: int = _key(128, "int4 on load: input features per scale (must divide every layer's input width); -1 per channel", "model")
    device: str = _key("", "cpu, cuda or cuda:N (default: this rank's GPU if any, else cpu)", "model")
    devices: str = _key("", "spread layers over devices in one process: cuda:0,cuda:1 or auto", "model")
    threads: int = _key(0, "CPU threads for PyTorch per process (0: OMP_NUM_THREADS if set, else one per core)", "model")
    sharding: str = _key("ddp", "data parallelism under torchrun: ddp (each rank holds the model) or fsdp (torch's "
                                "FSDP2: parameters, gradients and optimizer state split across ranks)", "model")
    cpu_offload: bool = _key(False, "fsdp: keep the sharded parameters, gradients and optimizer state in host memory "
                                    "(CPUOffloadPolicy)", "model")
    init_adapter: str = _key("", "a LoRA adapter folder (ours or PEFT's) folded into the base weights on load, so the "
                                 "run starts from that fine-tuned model (e.g. DPO after SFT: dpo's reference is then "
                                 "the SFT model)", "model")
    # [method]
    method: str = _key("lora", "lora, prompt (prompt tuning), full, or freeze (train only the last train_layers blocks)", "method")
    lora_r: int = _key(8, "LoRA rank", "method")
    lora_alpha: float = _key(16.0, "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)", "method")
    lora_dropout: float = _key(0.05, "dropout on the LoRA input", "method")
    lora_targets: list = _key(["wq", "wv"], "linears to adapt, ours (wq) or HF names (q_proj), or all-linear", "method")
    use_rslora: bool = _key(False, "rank-stabilised LoRA scaling alpha / sqrt(r)", "method")
    num_virtual_tokens: int = _key(20, "prompt tuning: number of virtual tokens", "method")
    prompt_init: str = _key("text", "prompt tuning init: text, vocab (random vocabulary rows) or random", "method")
    prompt_init_text: str = _key("Answer the question.", "prompt tuning: text whose embeddings start the prompt", "method")
    train_layers: int = _key(2, "freeze: how many of the last transformer blocks to train", "method")
    # [data]
    task: str = _key("sft", "sft (instructions), pt (plain text), cls (classification), regression, rm (a reward "
                            "model's score head on preference pairs), dpo (direct preference optimisation)", "data")
    train_file: str = _key("", "training data: JSON array or JSONL", "data")
    eval_file: str = _key("", "evaluation data (default: eval_split of train_file held out)", "data")
    eval_split: float = _key(0.05, "fraction of train_file held out for eval when there is no eval_file", "data")
    template: str = _key("auto", "sft, rm and dpo prompt template: auto (llama3-chat with a Llama-3 tokenizer, else alpaca), "
                               "alpaca, vicuna, llama2-chat, llama3-chat or plain", "data")
    train_on_prompt: bool = _key(False, "also compute the loss on prompt tokens", "data")
    cutoff_len: int = _key(512, "longest sample in tokens; longer ones are cut (pt: split; rm, dpo: the prompt loses "
                                "its first tokens after bos, and a pair whose longer answer does not fit is dropped)", "data")
    packing: bool = _key(False, "pack several samples into one row (attention stays inside each sample)", "data")
    strict: bool = _key(False, "stop at the first malformed data row instead of skipping it", "data")
    label_names: list = _key([], "cls: class names in label order (default: the sorted labels found)", "data")
    shuffle: bool = _key(True, "shuffle the training data each epoch", "data")
    dpo_beta: float = _key(0.1, "dpo: beta, how far the policy may move from the reference (larger: less)", "data")
    dpo_loss: str = _key("sigmoid", "dpo: sigmoid (DPO) or ipo (IPO, on length-averaged log-probs)", "data")
    dpo_label_smoothing: float = _key(0.0, "dpo sigmoid: the fraction of pairs assumed mislabelled (conservative DPO), "
                                           "0 <= x < 0.5", "data")
    precompute_ref: bool = _key(False, "dpo: compute the reference log-probs of every pair once before training "
                                       "(out_dir/ref_logps.safetensors, reused on resume); needed by methods full and "
                                       "freeze, whose base trains; lora and prompt switch themselves off instead", "data")
    # [train]
    out_dir: str = _key("runs/ft", "where checkpoints, metrics.jsonl, loss.png and the adapter go", "train")
    seed: int = _key(42, "seed for adapter init, data order and dropout", "train")
    micro_batch_size: int = _key(4, "samples per process per forward", "train")
    grad_accum: int = _key(1, "micro-batches per optimizer step", "train")
    epochs: float = _key(1.0, "passes over the training data (ignored when max_steps > 0)", "train")
    max_steps: int = _key(0, "optimizer steps to run (0: from epochs)", "train")
    lr: float = _key(2e-4, "peak learning rate", "train")
    weight_decay: float = _key(0.0, "AdamW weight decay", "train")
    adam_betas: list = _key([0.9, 0.999], "AdamW betas", "train")
    adam_eps: float = _key(1e-8, "AdamW epsilon", "train")
    warmup_steps: int = _key(-1, "linear warmup steps (-1: warmup_ratio of all steps)", "train")
    warmup_ratio: float = _key(0.03, "warmup as a fraction of all steps, when warmup_steps is -1", "train")
    min_lr_ratio: float = _key(0.0, "the cosine schedule ends at lr * min_lr_ratio", "train")
    max_grad_norm: float = _key(1.0, "clip the global gradient norm to this (0: no clipping)", "train")
    precision: str = _key("auto", "bf16 (autocast), fp16 (autocast + loss scaling), fp32, or auto (bf16 on GPU, fp16 on "
                                  "one without bf16, fp32 on CPU)", "train")
    grad_checkpointing: bool = _key(False, "recompute each block's activations in backward to save memory", "train")
    eval_every: int = _key(0, "evaluate every N steps (0: only at the end)", "train")
    save_every: int = _key(0, "checkpoint every N steps (0: only at the end)", "train")
    keep_last: int = _key(2, "checkpoints to keep", "train")
    log_every: int = _key(1, "write a metrics.jsonl line every N steps", "train")
    resume: str = _key("auto", "auto (latest checkpoint in out_dir if any), none, or a checkpoint folder", "train")
    merge: bool = _key(False, "LoRA: also write out_dir/merged, a full checkpoint with the adapter folded in", "train")
    merge_format: str = _key("hf", "format of out_dir/merged and of full/freeze runs' out_dir/model, the tokenizer "
                                   "beside it: hf (transformers), pth (Meta), gguf (llama.cpp) or ours", "train")
    exact_match_samples: int = _key(0, "sft: greedy-generate answers for this many eval samples before and after training, and report exact match", "train")
    max_new_tokens: int = _key(32, "longest generated answer for exact match", "train")

    def check(self) -> "TrainConfig":
        choices = {
            "method": tuple(METHODS), "task": ("sft", "pt", "cls", "regression", "rm", "dpo"),
            "dpo_loss": DPO_LOSSES,
            "precision": ("auto", "bf16", "fp16", "fp32"), "quant": ("none", "int4", "nf4"),
            "prompt_init": ("text", "vocab", "random"), "dtype": ("auto", "bfloat16", "float16", "float32"),
            "template": ("auto",) + TEMPLATES, "merge_format": ("hf", "pth", "gguf", "ours"),
            "sharding": ("ddp", "fsdp"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise LlamaInputError(f"{key} = {getattr(self, key)!r}: choose from {', '.join(allowed)}"
                                      f"{did_you_mean(str(getattr(self, key)), allowed)}")
        if self.threads < 0:
            raise LlamaInputError(f"threads = {self.threads}: expected a whole number of threads, at least 1 "
                                  f"(or 0: OMP_NUM_THREADS, else one per core)")
        for key in ("micro_batch_size", "grad_accum", "cutoff_len", "keep_last"):
            if getattr(self, key) < 1:
                raise LlamaInputError(f"{key} must be at least 1")
        method = METHODS[self.method]
        if self.dpo_beta <= 0:
            raise LlamaInputError(f"dpo_beta must be positive, got {self.dpo_beta}")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            raise LlamaInputError(f"dpo_label_smoothing must be in [0, 0.5), got {self.dpo_label_smoothing}")
        if self.dpo_label_smoothing and self.dpo_loss != "sigmoid":
            raise LlamaInputError(f"dpo_label_smoothing applies to dpo_loss 'sigmoid', not {self.dpo_loss!r}")
        if self.task == "dpo" and not method.has_reference and not self.precompute_ref:
            raise LlamaInputError(f"task dpo with method {self.method} trains the base, so it can't be its own reference: "
                                  "set precompute_ref = true (the reference log-probs computed once before training)")
        if self.init_adapter and self.quant != "none":
            raise LlamaInputError(f"init_adapter is folded into float base weights; quant = {self.quant!r} keeps them "
                                  "quantized: merge the adapter first (python -m llama.export --adapter), then quantize")
        if self.quant != "none" and method.trains_base:
            frozen = " or ".join(name for name, m in METHODS.items() if not m.trains_base)
            raise LlamaInputError(f"quant = {self.quant!r} keeps the base frozen: use method {frozen}, "
                                  f"not {self.method!r}")
        if self.sharding == "fsdp":
            refused = [f"method {self.method}" if self.method not in ("full", "freeze", "lora") else "",
                       f"task {self.task}" if self.task not in ("sft", "pt") else "",
                       f"quant {self.quant}" if self.quant != "none" else "", "devices" if self.devices else "",
                       "merge (fold the adapter in afterwards: python -m llama.export --adapter)" if self.merge else ""]
            if any(refused):
                raise LlamaInputError(f"sharding = 'fsdp' takes methods full, freeze and lora on a float base for sft "
                                      f"and pt, not {', '.join(r for r in refused if r)}")
        elif self.cpu_offload:
            raise LlamaInputError("cpu_offload needs sharding = 'fsdp'")
        if self.packing and (not method.packs or self.task not in ("sft", "pt")):
            unpacked = ", ".join(name for name, m in METHODS.items() if not m.packs)
            raise LlamaInputError(f"packing works for sft and pt, without method {unpacked}")
        return self


GROUPS = ("model", "method", "data", "train")
KEYS = {f.name: f for f in fields(TrainConfig)}


def did_you_mean(word: str, choices) -> str:
    """"; did you mean 'x'?" for the closest of choices, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key(key: str, where: str) -> LlamaInputError:
    return LlamaInputError(f"unknown config key {key!r} in {where}{did_you_mean(key, KEYS)}")


EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def coerce(key: str, value, where: str):
    """A TOML or command-line value -> the key's type ("1e-4" -> 1e-4, "q_proj,v_proj" -> list).
    Command-line values are strings, parsed; TOML values must already be of the key's kind (an
    integer is a number, a whole float an integer), so `merge = 3` or `max_steps = true` is
    refused rather than read as true or 1. The error names the key, the type and the value."""
    default = KEYS[key].default_factory()
    try:
        return _as_type_of(default, value)
    except (TypeError, ValueError):
        if isinstance(default, list):
            expected = f"a list of {'numbers' if default and isinstance(default[0], float) else 'strings'}"
        else:
            expected = EXPECTED[type(default)]
        raise LlamaInputError(f"{where}: {key} = {json.dumps(value, default=str)}: expected {expected}") from None


def _as_type_of(default, value):
    """value as default's type, a command-line string parsed; TypeError or ValueError if it isn't one."""
    if isinstance(default, list):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise TypeError(value)
        item_default = default[0] if default else ""
        items = [_as_type_of(item_default, x) for x in items]
        return [x.strip() for x in items if x.strip()] if isinstance(item_default, str) else items
    if isinstance(default, str):
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if isinstance(value, str):  # from the command line
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return type(default)(value)
    if isinstance(default, bool) or isinstance(value, bool):  # bool is an int to Python, not to TOML
        if type(value) is not type(default):
            raise TypeError(value)
        return value
    if not isinstance(value, (int, float)):
        raise TypeError(value)
    if isinstance(default, int) and not float(value).is_integer():
        raise ValueError(value)
    return type(default)(value)


def read_toml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LlamaInputError(f"{path}: config file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise LlamaInputError(f"{path}: not valid TOML ({e})") from None
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in GROUPS:
            flat.update(value)
        else:
            flat[key] = value
    for key in flat:
        if key not in KEYS:
            raise unknown_key(key, str(path))
    return {k: coerce(k, v, str(path)) for k, v in flat.items()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ft_main.py", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        description="Fine-tune a LLaMA checkpoint (LoRA, prompt tuning, full or frozen) under torchrun.\n"
        "With no arguments: the embedded demo on CPU. Every config key can be given here and wins over the TOML.",
    )
    p.add_argument("--config", help="TOML file of keys (see torchrun_configs/)")
    for group in GROUPS:
        g = p.add_argument_group(f"[{group}]")
        for f in fields(TrainConfig):
            if f.metadata["group"] == group:
                default = f.default_factory()
                shown = ",".join(map(str, default)) if isinstance(default, list) else default
                g.add_argument(f"--{f.name}", metavar=type(default).__name__.upper(), default=None,
                               nargs="?" if isinstance(default, bool) else None, const="true" if isinstance(default, bool) else None,
                               help=f"{f.metadata['help']} (default: {shown!r})")
    return p


def load_config(argv: list[str], default_config=None) -> TrainConfig:
    """Defaults <- TOML (--config, else default_config) <- command-line flags."""
    args, rest = parser().parse_known_args(argv)
    for extra in rest:
        if extra.startswith("--"):
            raise unknown_key(extra[2:].split("=")[0], "the command line")
        raise LlamaInputError(f"unexpected argument {extra!r} (keys are given as --key value)")
    values = read_toml(args.config or default_config) if (args.config or default_config) else {}
    for key in KEYS:
        if getattr(args, key) is not None:
            values[key] = coerce(key, getattr(args, key), "the command line")
    return TrainConfig(**values).check()
