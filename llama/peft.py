"""PEFT's adapter folders (adapter_config.json + adapter_model.safetensors), and its LoRA adapters
read as plain tensors under Meta's names: for each adapted linear its A [r, in], its B [out, r]
with q/k rows in Meta's RoPE order, its rank and alpha; and the whole weights it replaces. What
finetune's LoRA puts on a model and what the exporters fold into the weights: one reading, so
the two can't drift. Options PEFT writes that we can't reproduce exactly are refused, naming the
option."""
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from llama.errors import LlamaInputError
from llama.layers import BLOCK_LINEARS, LINEAR_NAMES, WEIGHTS, expected_shapes, from_hf_rows, hf_to_meta_key, lookup

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# adapter_config.json's keys (peft.LoraConfig, PEFT 0.21), by what loading does with each.
#
# Honoured: which modules get an adapter, its rank and scaling, and which whole weights the
# adapter replaces (modules_to_save). See load_peft_lora.
_HONOURED = {"peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
             "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save"}
# Ignored, as they don't change what the loaded adapter computes:
#   lora_dropout (training only); inference_mode, base_model_name_or_path, revision, task_type,
#   auto_mapping, peft_version (bookkeeping); megatron_config, megatron_core (which parallel linear
#   class PEFT wraps: same math); qalora_group_size (read only with use_qalora, refused below);
#   loftq_config, eva_config, corda_config, lora_ga_config (settings of initialisations: the
#   initialisation itself is checked, see _INIT_OK); velora_config (VeLoRA changes only the
#   backward pass); ensure_weight_tying (ties the adapters of tied embeddings: we refuse LoRA on
#   embeddings and replacing a tied weight); runtime_config (PEFT doesn't save it).
_IGNORED = {"lora_dropout", "inference_mode", "base_model_name_or_path", "revision", "task_type", "auto_mapping",
            "peft_version", "megatron_config", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
            "corda_config", "lora_ga_config", "velora_config", "ensure_weight_tying", "runtime_config"}
# Refused unless off (null, false, empty; bias: "none"): what each would add that we don't compute.
_REFUSED = {
    "use_dora": "DoRA", "lora_bias": "a bias on LoRA's B", "bias": "trained biases of the base layers",
    "fan_in_fan_out": "transposed base weights", "target_parameters": "LoRA on bare parameters",
    "layer_replication": "replicated layers", "use_qalora": "QALoRA", "trainable_token_indices": "trained token rows",
    "alora_invocation_tokens": "activated LoRA", "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
}
# init_lora_weights values that leave the base weights alone when PEFT loads the adapter (B, A
# are overwritten by the saved ones). The others (pissa*, corda*, olora, loftq, lora_ga) are run
# again on the base weights by PEFT's own loader, so PEFT's model is not base + B A; mica is a
# LoRA variant.
_INIT_OK = (True, False, None, "gaussian", "eva", "orthogonal")
# target_modules = null: PEFT's default for Llama (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
_PEFT_LLAMA_DEFAULT = ["q_proj", "v_proj"]
# Whole embeddings PEFT saves without modules_to_save naming them (save_pretrained's
# save_embedding_layers: when embeddings are LoRA targets, the vocabulary was resized, or asked
# for); PEFT's loader puts them into the base model, and so do we.
_EMBEDDING_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
# Whole tensors of a task head outside the Transformer (HF's LlamaForSequenceClassification `score`,
# also what our cls/regression adapters save): the caller's head reads them, not the model.
_HEAD_TENSORS = ("score.weight",)


def trained_on(config: dict) -> str:
    """The likely cause of an adapter whose shapes don't fit the model, from its adapter_config.json."""
    base = config.get("base_model_name_or_path")
    return f": an adapter for another base model (trained on {base})" if base else ": an adapter for another base model?"


def _check_options(config: dict, where) -> None:
    for key, value in config.items():
        if key in _HONOURED or key in _IGNORED:
            continue
        if key == "init_lora_weights":
            ok = value in _INIT_OK if not isinstance(value, str) else value.lower() in _INIT_OK
            if not ok:
                raise LlamaInputError(f"{where}: LoRA option init_lora_weights = {json.dumps(value)} is not supported "
                                      "(PEFT re-applies it to the base weights when it loads the adapter)")
            continue
        off = value == "none" if key == "bias" else value in (None, False) or value == [] or value == {}
        if not off:
            what = f" ({_REFUSED[key]})" if key in _REFUSED else " (an option this loader does not know)"
            raise LlamaInputError(f"{where}: LoRA option {key} = {json.dumps(value)}{what} is not supported")


def _peft_targets(config: dict, key: str) -> bool:
    """Whether the LoRA config targets the HF module named `key` ("model.layers.0.self_attn.q_proj"),
    as peft.tuners.tuners_utils.check_target_module_exists decides it."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    # modules_to_save are saved whole, never given an adapter
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.get("modules_to_save") or ()):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if found and layers is not None and (len(layers) != 0 if isinstance(layers, list) else True):
        patterns = config.get("layers_pattern")
        match = None
        if not patterns:  # the first numbered segment
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match["idx"])
        return index == layers if isinstance(layers, int) else index in layers
    return found


def _pattern_value(patterns: dict, key: str, default):
    """rank_pattern / alpha_pattern's value for module `key`, as PEFT picks it
    (peft.utils.other.get_pattern_key: the first pattern p that re.match(rf"(.*\\.)?({p})$", key)
    matches; else the value under `key` itself, else `default`)."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return patterns.get(key, default)


def _hf_modules(args) -> dict[str, list[str]]:
    """Every module of HF's LlamaForCausalLM that holds weights (containers too) -> HF keys under it."""
    out: dict[str, list[str]] = {}
    for w in WEIGHTS:
        for key in ([w.hf.format(i) for i in range(args.n_layers)] if "{}" in w.hf else [w.hf]):
            parts = key.split(".")[:-1]
            for n in range(1, len(parts) + 1):
                out.setdefault(".".join(parts[:n]), []).append(key)
    return out


def _few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" ... ({len(names)} in all)" if len(names) > 3 else "")


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json of an adapter folder, checked to hold both files."""
    folder = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise LlamaInputError(f"{folder}: not an adapter folder (no {name})")
    try:
        return json.loads((folder / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise LlamaInputError(f"{folder / ADAPTER_CONFIG}: malformed adapter config ({e})") from None


@dataclass
class LoRAPair:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], q/k rows in Meta's order
    r: int
    alpha: float
    rslora: bool

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling [out, in], float32."""
        return (self.b.float() @ self.a.float()) * self.scaling


@dataclass
class PeftLoRA:
    pairs: dict[str, LoRAPair]  # Meta weight key ("layers.0.attention.wq.weight") -> its adapter
    whole: dict[str, torch.Tensor]  # Meta key -> a whole weight the adapter replaces, Meta's layout
    heads: list[str] = field(default_factory=list)  # task-head tensors (score.weight) left to the caller


def parse_peft_lora(config: dict, tensors: dict, args, where) -> PeftLoRA:
    """A PEFT LoRA adapter (adapter_config.json as a dict, its tensors) for the model `args`
    describes, read as PEFT's PeftModel.from_pretrained puts it on HF's LlamaForCausalLM.

    The modules that get an adapter are those the config targets (target_modules: a list of names
    or full-name suffixes, or a regex fullmatched to the full name; exclude_modules,
    layers_to_transform, layers_pattern), and must be exactly those the tensors hold A and B for.
    Each gets its own rank and alpha (rank_pattern, alpha_pattern; use_rslora). Whole weights the
    adapter saves (modules_to_save: embed_tokens, lm_head, norms, ...) must be exactly those
    modules_to_save names (embeddings may come without: PEFT's save_embedding_layers). Everything
    is checked against the model's shapes; options we can't reproduce (DoRA, biases, ...) are
    refused, naming the option."""
    _check_options(config, where)
    if config.get("layers_to_transform") is not None and isinstance(config.get("target_modules"), str):
        raise LlamaInputError(f"{where}: LoRA option layers_to_transform can't go with a regex target_modules "
                              "(PEFT refuses it too)")
    config = dict(config)
    targets = config.get("target_modules")
    if targets is None:
        targets = _PEFT_LLAMA_DEFAULT
    elif isinstance(targets, str) and targets.lower() == "all-linear":  # PEFT: every linear but the output layer
        targets = list(LINEAR_NAMES.values())
    config["target_modules"] = targets

    saved = config.get("modules_to_save") or []
    # the file's tensors: A and B per module, whole weights by HF key
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    heads = []
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", name)
        if name == key:
            raise LlamaInputError(f"{where}: tensor {key} is not under PEFT's {PEFT_PREFIX}")
        if m:
            pairs.setdefault(m[1], {})[m[2]] = t
        elif ".lora_" in f".{name}":
            raise LlamaInputError(f"{where}: tensor {key} is not a LoRA A or B weight (DoRA, LoRA bias or "
                                  "embedding LoRA?), which this loader does not support")
        elif name in _HEAD_TENSORS and any(name.split(".")[0].endswith(e) for e in saved):
            heads.append(name)
        else:
            whole[name] = t

    # which modules get an adapter: the config's targets, which must be the tensors' modules
    shapes = expected_shapes(args)
    modules = _hf_modules(args)
    linears = {}  # HF module of every 2-D weight (block linears, embed_tokens, lm_head) -> our key
    for w in (w for w in WEIGHTS if len(w.shape) == 2):
        for i in range(args.n_layers if "{}" in w.hf else 1):
            linears[w.hf.format(i).removesuffix(".weight")] = w.meta.format(i)
    block = {m: meta for m, meta in linears.items() if lookup(meta)[0].module in BLOCK_LINEARS}
    unknown = set(pairs) - set(linears)
    if unknown:
        raise LlamaInputError(f"{where}: LoRA tensors for {_few(unknown)}, not a linear layer of this LLaMA model")
    targeted = {m for m in linears if _peft_targets(config, m)}
    other = (set(pairs) | targeted) - set(block)
    if other:
        raise LlamaInputError(f"{where}: LoRA on {_few(other)} is not supported (only the block linears "
                              f"{', '.join(LINEAR_NAMES.values())})")
    if set(pairs) - targeted:
        raise LlamaInputError(f"{where}: the adapter has LoRA tensors for {_few(set(pairs) - targeted)}, which its "
                              "adapter_config.json does not target")
    if targeted - set(pairs):
        raise LlamaInputError(f"{where}: adapter_config.json targets {_few(targeted - set(pairs))}, but the adapter "
                              "has no LoRA tensors for it")
    rslora = bool(config.get("use_rslora", False))
    lora = {}
    for m in sorted(targeted):
        meta = block[m]
        r = _pattern_value(config.get("rank_pattern") or {}, m, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, m, config.get("lora_alpha", 8))
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise LlamaInputError(f"{where}: LoRA rank {r!r} for {m} is not a positive integer")
        out_f, in_f = shapes[meta]
        for part, want in (("lora_A", (r, in_f)), ("lora_B", (out_f, r))):
            key = f"{PEFT_PREFIX}{m}.{part}.weight"
            if part not in pairs[m]:
                raise LlamaInputError(f"{where}: adapter lacks {key}")
            if tuple(pairs[m][part].shape) != want:
                raise LlamaInputError(f"{where}: {key} has shape {tuple(pairs[m][part].shape)}, expected {want} "
                                      f"(rank {r}){trained_on(config)}")
        b = from_hf_rows(pairs[m]["lora_B"].float(), meta, args)
        lora[meta] = LoRAPair(pairs[m]["lora_A"].float(), b, r, alpha, rslora)

    # whole weights: exactly what modules_to_save names (PEFT: every module whose name ends with an
    # entry), plus any saved embeddings
    wanted = {key for mod, keys in modules.items() if any(mod.endswith(e) for e in saved) for key in keys}
    if set(whole) - wanted - set(_EMBEDDING_TENSORS):
        extra = set(whole) - wanted - set(_EMBEDDING_TENSORS)
        known = all(hf_to_meta_key(k) in shapes for k in extra)
        what = "which its modules_to_save does not name" if known else "not weights of this LLaMA model"
        raise LlamaInputError(f"{where}: the adapter has whole tensors {_few(extra)}, {what}")
    if wanted - set(whole):
        raise LlamaInputError(f"{where}: modules_to_save names {_few(wanted - set(whole))}, but the adapter lacks it")
    replace = {}
    for key, t in sorted(whole.items()):
        meta = hf_to_meta_key(key)
        if tuple(t.shape) != shapes[meta]:
            hint = " (a vocabulary resized in fine-tuning?)" if key in _EMBEDDING_TENSORS else trained_on(config)
            raise LlamaInputError(f"{where}: {PEFT_PREFIX}{key} has shape {tuple(t.shape)}, expected "
                                  f"{shapes[meta]}{hint}")
        replace[meta] = from_hf_rows(t, meta, args)
    return PeftLoRA(lora, replace, heads)


def read_peft_lora(adapter_dir, args) -> PeftLoRA:
    """parse_peft_lora on an adapter folder; refuses adapters of other kinds (prompt tuning)."""
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    if config.get("peft_type") != "LORA":
        raise LlamaInputError(f"{folder}: a {config.get('peft_type')} adapter has no weights to fold in "
                              "(only LoRA adapters merge)")
    return parse_peft_lora(config, load_file(str(folder / ADAPTER_WEIGHTS)), args, folder)
