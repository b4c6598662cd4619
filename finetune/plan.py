"""Memory plan of a fine-tuning config: the bytes each device holds, term by term, before anything is loaded.

    python -m finetune.plan --config torchrun_configs/7B_lora_1gpu.toml --model 7B --gpus 1x24GB
    python -m finetune.plan --config torchrun_configs/13B_int4_lora_2gpu.toml --model 65B --gpus 2x24GB
    python -m finetune.plan --config X.toml --model 65B --method full --quant none --placement fsdp --gpus 8x80GB

The model's shape comes from the checkpoint's params.json / config.json (llama.formats.read_model_args:
no weight is read) or from a preset (--model). The model itself is built on torch's meta device, so
the tensor shapes counted are the model's own and nothing is allocated. Every other key is the
trainer's (finetune.config.TrainConfig): --config and --key value as for ft_main.py.

Per device it prints the bytes of:
- base weights: the frozen model in `dtype` (auto: as the trainer resolves it on this machine); the block
  linears as int4 (GPTQ layout) or NF4 (bitsandbytes) with `quant`, plus the one dequantized
  weight a 4-bit layer's matmul holds at a time;
- trainable weights: float32 (LoRA A and B, the prompt, or the trained blocks of full / freeze);
- gradients: float32, one per trainable weight;
- optimizer: AdamW's two float32 moments per trainable weight (no master copies: the trained
  weights are float32 themselves);
- activations: what autograd keeps for backward at micro_batch_size x cutoff_len, read from
  llama/model.py, finetune/methods/lora.py and finetune/heads.py (see block_activation_bytes), with
  or without grad_checkpointing;
- KV cache: generation for exact_match_samples, which runs outside training steps (the total
  takes the larger of it and the activations);
- overhead on a GPU: CUDA context and allocator fragmentation (CUDA_CONTEXT_BYTES, FRAGMENTATION).

Placements: single (one device; data-parallel copies each hold the same), layerwise (`devices`:
contiguous layer ranges balanced by bytes with llama.placement.plan_stages, as the trainer places
them), tp (tensor parallel: weights / N) and fsdp (full sharding: weights, gradients and optimizer
state / N, plus the largest unit unsharded in flight: sharding = "fsdp"; cpu_offload is not modelled).
"""
import argparse
import importlib
import math
import os
import re
import sys
from dataclasses import dataclass, replace


from finetune.config import TrainConfig, load_config, parser as config_parser
from finetune.data import PAIR_TASKS
from finetune.heads import SCORE_TASKS, LinearCrossEntropy
from finetune.methods import get_method
from finetune.methods.lora import resolve_targets
from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.layers import BLOCK_LINEARS
from llama.loader import model_skeleton
from llama.placement import plan_stages

GiB = 2**30
# The CUDA context, cuBLAS/cuDNN handles and their workspaces, and the kernels loaded: nvidia-smi
# shows 0.4-0.6 GiB used by a PyTorch process that has run one matmul and allocated nothing else
# (CUDA >= 11.7 loads kernels lazily). An assumption: not measured on this project's GPUs yet.
CUDA_CONTEXT_BYTES = GiB // 2
# PyTorch's caching allocator reserves more than it hands out (blocks rounded up to 512 B / 2 MiB,
# cached segments that a larger request can't reuse); a training loop with fixed shapes typically
# reserves 5-15% more than max_memory_allocated. An assumption, the middle of that range.
FRAGMENTATION = 0.10
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights (uint8 with double quant)
NF4_NESTED_BLOCK = 256  # double quant: one float32 absmax per 256 of those
DEFAULT_VOCAB = 32000  # LLaMA-1's params.json says vocab_size -1 (from the tokenizer)

# Model shapes: LLaMA-1 (7B, 13B, 30B, 65B; Llama-2 7B and 13B are the same), Llama-2-70B, Llama-3(.1) 8B, 70B.
PRESETS = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
    "30B": dict(dim=6656, n_layers=60, n_heads=52, vocab_size=32000),
    "65B": dict(dim=8192, n_layers=80, n_heads=64, vocab_size=32000),
    "llama2-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, hidden_dim=28672),
    "8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
               rope_theta=500000.0),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, hidden_dim=28672,
                rope_theta=500000.0),
}
PLACEMENTS = ("auto", "single", "layerwise", "tp", "fsdp")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


# --- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Devices:
    kind: str  # "cuda" or "cpu"
    count: int
    capacity: int  # bytes per device


def parse_gpus(spec: str) -> Devices:
    """'2x24GB' -> 2 GPUs of 24 GiB. GPU makers' "GB" is GiB (a 24 GB card has ~24560 MiB,
    an 80 GB one 81920 MiB), so GB and GiB both mean 2**30 here; MB/MiB, TB/TiB likewise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+(?:\.\d+)?)\s*([KMGT])(?:i?B)\s*", spec)
    if not m or int(m[1]) < 1 or float(m[2]) <= 0:
        raise LlamaInputError(f"--gpus {spec!r}: expected COUNTxSIZE such as 2x24GB or 8x80GiB")
    return Devices("cuda", int(m[1]), int(float(m[2]) * _UNITS[m[3]]))


@dataclass(frozen=True)
class Setup:
    """What the plan depends on, resolved from the config: sizes, dtypes (bytes per element),
    what trains and how the model is placed."""
    args: ModelArgs
    cfg: TrainConfig
    devices: Devices
    placement: str  # single, layerwise, tp, fsdp
    float_bytes: int  # the frozen base's float tensors (dtype)
    act_bytes: int  # matmul outputs: the autocast dtype, else the weights'
    stream_bytes: int  # the residual stream between blocks (the embedding's dtype, float32 when trained)
    autocast: bool
    quant: str  # none, int4, nf4
    group_size: int
    lora: frozenset  # LoRA target linears (attention.wq ...), empty for other methods
    trained_blocks: frozenset  # block indices whose own weights train (full, freeze)
    trains_outside: bool  # embedding, final norm and output train (full)
    seq: int  # tokens per row through the blocks (cutoff_len, plus virtual tokens for prompt tuning)

    @property
    def rows(self) -> int:
        """Sequences per forward: micro_batch_size, or twice it for preference pairs (rm, dpo:
        chosen and rejected in one batch)."""
        return self.cfg.micro_batch_size * (2 if self.cfg.task in PAIR_TASKS else 1)

    @property
    def tokens(self) -> int:
        return self.rows * self.seq

    @property
    def targets(self) -> int:
        """Rows of the loss: batch * (seq - 1) next-token targets (every slot counted: the planner
        does not know how many the data masks out)."""
        return self.rows * (self.cfg.cutoff_len - 1)


def resolve(cfg: TrainConfig, args: ModelArgs, devices: Devices, placement: str, quant: str) -> Setup:
    """The Setup of a config on devices, dtypes resolved as the trainer does (trainer.base_dtype,
    setup_optimizer): auto is bfloat16 / bf16 autocast on a GPU; on the CPU a bfloat16 base where
    this CPU runs it natively (for methods that keep the base frozen), else float32, no autocast."""
    from finetune.trainer import base_dtype  # the trainer's own rule; its imports are heavy for --help

    gpu = devices.kind == "cuda"
    dtype = str(base_dtype(cfg.dtype, devices.kind, get_method(cfg.method).trains_base)[0]).removeprefix("torch.")
    float_bytes = 4 if dtype == "float32" else 2
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if gpu else "fp32")
    autocast = precision in ("bf16", "fp16")
    trained = set()
    if cfg.method == "full":
        trained = set(range(args.n_layers))
    elif cfg.method == "freeze":
        if not 1 <= cfg.train_layers <= args.n_layers:
            raise LlamaInputError(f"train_layers must be 1..{args.n_layers}, got {cfg.train_layers}")
        trained = set(range(args.n_layers - cfg.train_layers, args.n_layers))
    full = cfg.method == "full"
    lora = {m for m in BLOCK_LINEARS if m.rsplit(".", 1)[1] in resolve_targets(cfg.lora_targets)} \
        if cfg.method == "lora" else set()
    if placement == "auto" and cfg.sharding == "fsdp":
        placement = "fsdp"
    elif placement == "auto":  # as the trainer: layer-wise placement when `devices` names several
        listed = [d for d in cfg.devices.split(",") if d] if cfg.devices != "auto" else []
        several = len(listed) > 1 or (cfg.devices == "auto" and devices.count > 1)
        placement = "layerwise" if several else "single"
    return Setup(args, cfg, devices, placement, float_bytes,
                 act_bytes=2 if autocast else (4 if trained else float_bytes),
                 stream_bytes=4 if full else float_bytes, autocast=autocast, quant=quant,
                 group_size=cfg.quant_group_size, lora=frozenset(lora), trained_blocks=frozenset(trained),
                 trains_outside=full,
                 seq=cfg.cutoff_len + (cfg.num_virtual_tokens if cfg.method == "prompt" else 0))


# --- shapes --------------------------------------------------------------------------------------


_SHAPES: dict[tuple, dict] = {}


def linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(out, in) of each block linear, read from a one-block model built on the meta device
    (kept per shape: the planner asks often)."""
    key = (args.dim, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim)
    if key not in _SHAPES:
        block = model_skeleton(replace(args, n_layers=1)).layers[0]
        _SHAPES[key] = {name: tuple(block.get_submodule(name).weight.shape) for name in BLOCK_LINEARS}
    return _SHAPES[key]


def block_params(args: ModelArgs) -> int:
    """Parameters of one block: its seven linears and two RMSNorm weights [dim]."""
    return sum(o * i for o, i in linear_shapes(args).values()) + 2 * args.dim


def outside_params(args: ModelArgs) -> tuple[int, int, int]:
    """(embedding [vocab, dim], final norm [dim], output [vocab, dim]; 0 when tied)."""
    vd = args.vocab_size * args.dim
    return vd, args.dim, 0 if args.tie_word_embeddings else vd


# --- weights -------------------------------------------------------------------------------------


def base_linear_bytes(out: int, inp: int, setup: Setup) -> int:
    """A frozen linear [out, in]:
    - none: out*in*float_bytes;
    - int4 (GPTQ): qweight int32 [in/8, out] (0.5 B/weight) + qzeros int32 [groups, out/8] +
      scales fp16 [groups, out] + g_idx int32 [in], groups = in/group_size (1 for -1);
    - nf4 (bitsandbytes, double quant): packed uint8 (0.5 B/weight) + one uint8 absmax per 64
      weights + one float32 absmax of those per 256 blocks (the code tables, ~1 KiB per layer,
      are left out)."""
    n = out * inp
    if setup.quant == "int4":
        groups = 1 if setup.group_size == -1 else inp // setup.group_size
        return n // 2 + groups * out // 2 + 2 * groups * out + 4 * inp
    if setup.quant == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        return n // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK)
    return n * setup.float_bytes


def block_base_bytes(setup: Setup, i: int, shard: int = 1) -> int:
    """Frozen weights of block i: its linears (base_linear_bytes) and norms (2*dim*float_bytes);
    0 for a trained block (its weights are counted as trainable, in float32). shard: tensor
    parallel ranks, which each hold 1/shard of the linears (the norms are replicated)."""
    if i in setup.trained_blocks:
        return 0
    linears = sum(base_linear_bytes(o, n, setup) for o, n in linear_shapes(setup.args).values())
    return linears // shard + 2 * setup.args.dim * setup.float_bytes


def outside_base_bytes(setup: Setup, shard: int = 1) -> tuple[int, int]:
    """(embedding, final norm + output) frozen bytes in float_bytes (they stay float with int4 and
    nf4); 0 when they train (full). Split over tensor-parallel ranks but the norm."""
    if setup.trains_outside:
        return 0, 0
    emb, norm, out = outside_params(setup.args)
    return emb * setup.float_bytes // shard, (norm + out // shard) * setup.float_bytes


def dequant_scratch_bytes(setup: Setup, shard: int = 1) -> int:
    """A 4-bit base dequantizes one linear at a time for its matmuls (quant/kernels.py's scratch
    buffer for int4, a transient for bitsandbytes' NF4): the largest linear's out*in in the
    activations' dtype."""
    if setup.quant == "none":
        return 0
    return max(o * i for o, i in linear_shapes(setup.args).values()) * setup.act_bytes // shard


def lora_params(setup: Setup, shard: int = 1) -> int:
    """LoRA per block: sum over targets of r*(in+out) (A [r, in], B [out, r]). Under tensor
    parallelism a column-parallel target splits B ([out/N, r]), a row-parallel one (wo, w2) A."""
    total = 0
    for name, (out, inp) in linear_shapes(setup.args).items():
        if name in setup.lora:
            row = name.endswith(("wo", "w2"))
            total += setup.cfg.lora_r * (inp // shard + out if row else inp + out // shard)
    return total


def trainable_params_block(setup: Setup, i: int, shard: int = 1) -> int:
    """Trainable parameters of block i: LoRA's A and B, or the whole block for full / freeze."""
    if i in setup.trained_blocks:
        return (block_params(setup.args) - 2 * setup.args.dim) // shard + 2 * setup.args.dim
    return lora_params(setup, shard)


def trainable_params_outside(setup: Setup, shard: int = 1) -> tuple[int, int]:
    """(first device's, last device's) trainable parameters outside the blocks: full trains the
    embedding (first) and the final norm + output (last); prompt tuning its virtual tokens
    [num_virtual_tokens, dim] (first); cls/regression a score head [num_labels, dim] (last;
    num_labels: len(label_names), else 2, 1 for regression)."""
    first = last = 0
    if setup.trains_outside:
        emb, norm, out = outside_params(setup.args)
        first, last = emb // shard, norm + out // shard
    if setup.cfg.method == "prompt":
        first += setup.cfg.num_virtual_tokens * setup.args.dim
    if setup.cfg.task in SCORE_TASKS:
        last += (len(setup.cfg.label_names) or 2 if setup.cfg.task == "cls" else 1) * setup.args.dim
    return first, last


# --- activations ---------------------------------------------------------------------------------


def block_activation_bytes(setup: Setup, i: int, shard: int = 1) -> int:
    """What autograd keeps of block i for backward, tokens T = batch * seq, read from the code
    (llama/model.py TransformerBlock, RMSNorm, Attention, FeedForward, apply_rope; LoRALinear):

    - RMSNorm keeps its input as float32 (x.float(): T*dim*4) when it needs a gradient, and the
      normalised x [T, dim] (stream dtype) when its weight trains;
    - attention (SDPA, flash / memory-efficient kernels: no [seq, seq] scores) keeps q, k, v and
      its output, [T, heads*head_dim] and [T, kv_heads*head_dim] twice, plus the logsumexp
      [batch, heads, seq] float32; the trainer always passes pad_lens, so SDPA gets a bool mask and
      keeps it as an additive float mask [batch, 1, seq, seq] per layer;
    - SwiGLU keeps w1's output g, silu(g) and w3's output u: 3 * [T, hidden];
    - a trained linear keeps its input (shared by wq/wk/wv and w1/w3 without autocast; under
      autocast each keeps its own 16-bit cast of a float32 input);
    - a LoRA target keeps its dropout mask (float in the input's dtype on CPU, bool on GPU) and
      the dropped input, or with lora_dropout 0 the input itself (its own 16-bit copy under
      autocast, the input's .to(float32) cast back); and A's output [T, r] for B;
    - under autocast, a trained float32 weight's bf16 cast is cached for the step: 2 B/weight.

    Nothing requires a gradient before the first trained tensor: with a frozen embedding block 0's
    input needs none (its norm keeps nothing); frozen blocks below freeze's keep nothing at all.
    shard: tensor-parallel ranks hold heads / N and hidden / N, and the [T, dim] tensors whole."""
    a, args = setup.act_bytes, setup.args
    d, T, B, S = args.dim, setup.tokens, setup.rows, setup.seq
    q, kv, f = args.n_heads * args.head_dim // shard, args.n_kv_heads * args.head_dim // shard, args.ffn_hidden_dim // shard
    trained = i in setup.trained_blocks
    if setup.trains_outside or setup.cfg.method == "prompt":
        x_grad = True  # a trained embedding or prompt feeds block 0
    elif setup.trained_blocks:  # freeze
        if not trained:
            return 0  # a frozen block below the trained ones keeps nothing
        x_grad = i > min(setup.trained_blocks)
    else:  # LoRA: block 0's input comes from the frozen embedding
        x_grad = i > 0
    mask_bytes = 1 if setup.devices.kind == "cuda" else a  # dropout mask: bool on GPU, the input's dtype on CPU
    dropout = setup.cfg.lora_dropout > 0
    kept = 0

    def norm(grad: bool) -> int:
        return (T * d * 4 if grad else 0) + (T * d * setup.stream_bytes if trained else 0)

    def lora_inputs(names, width: int, grad: bool, shared: bool) -> int:
        """LoRA targets among `names` reading one input [T, width]; shared: that input is kept
        anyway (by SDPA or a trained linear)."""
        n = sum(1 for name in names if name in setup.lora)
        if not n:
            return 0
        lora_a = n * T * setup.cfg.lora_r * a
        if dropout:
            return lora_a + n * T * width * ((mask_bytes if grad else 0) + a)
        if setup.autocast:
            return lora_a + n * T * width * a
        return lora_a + (0 if shared else T * width * a)

    kept += norm(x_grad)
    n1_grad = x_grad or trained
    linear_copies = 3 if setup.autocast and trained else 1  # under autocast each trained linear casts its input
    kept += T * d * a * linear_copies if trained else 0
    kept += lora_inputs(("attention.wq", "attention.wk", "attention.wv"), d, n1_grad, shared=trained)
    attn_grad = n1_grad or any(n in setup.lora for n in ("attention.wq", "attention.wk", "attention.wv"))
    if attn_grad:
        kept += T * (2 * q + 2 * kv) * a + B * (args.n_heads // shard) * S * 4 + B * S * S * a
    kept += lora_inputs(("attention.wo",), q, attn_grad, shared=attn_grad)
    h_grad = attn_grad or "attention.wo" in setup.lora
    kept += norm(h_grad)
    n2_grad = h_grad or trained
    kept += 2 * T * d * a if trained and setup.autocast else (T * d * a if trained else 0)
    kept += lora_inputs(("feed_forward.w1", "feed_forward.w3"), d, n2_grad, shared=trained)
    g_grad = n2_grad or "feed_forward.w1" in setup.lora
    u_grad = n2_grad or "feed_forward.w3" in setup.lora
    kept += T * f * a * ((2 if g_grad else 0) + (1 if u_grad else 0))  # g and u if g needs grad; silu(g) if u does
    kept += T * f * a if trained else 0  # w2's input silu(g) * u
    kept += lora_inputs(("feed_forward.w2",), f, g_grad or u_grad, shared=trained)
    if trained and setup.autocast:
        kept += 2 * (block_params(args) - 2 * d) // shard  # the bf16 casts of its float32 linears
    return kept


def loss_activation_bytes(setup: Setup, shard: int = 1) -> int:
    """The final RMSNorm's float32 input [T, dim] and the loss (finetune/heads.py):
    - sft/pt, LinearCrossEntropy: d(loss)/d(logits) [targets, vocab] (16-bit under autocast, else
      float32), the hidden rows [targets, dim] it multiplies, and under 16-bit one float32 chunk
      (CHUNK_ELEMENTS) while it is written; targets = batch * (cutoff_len - 1);
    - under tensor parallelism the output layer is fairscale's, and lm_loss_sum takes the plain
      path: float32 log-probs [targets, vocab] kept, and their gradient as large in backward;
    - cls/regression: the last slot's hidden state only (negligible)."""
    T, d = setup.tokens, setup.args.dim
    kept = T * d * 4 + (T * d * setup.stream_bytes if setup.trains_outside else 0)  # final norm: input (+ normed)
    if setup.cfg.task in SCORE_TASKS:
        return kept
    n, vocab = setup.targets, setup.args.vocab_size
    if shard > 1:
        return kept + 2 * n * vocab * 4
    grad_bytes = 2 if setup.autocast else 4
    chunk = min(n * vocab, LinearCrossEntropy.CHUNK_ELEMENTS) * 4 if grad_bytes == 2 else 0
    return kept + n * vocab * grad_bytes + n * d * setup.act_bytes + chunk


def shared_activation_bytes(setup: Setup) -> int:
    """Per device that holds blocks: the rotations [batch, seq, head_dim/2] complex64 and the
    bool attention mask [batch, 1, seq, seq] the blocks share."""
    B, S = setup.rows, setup.seq
    return B * S * setup.args.head_dim * 4 + B * S * S


def checkpointed_bytes(setup: Setup, blocks: list[int], shard: int = 1) -> int:
    """grad_checkpointing keeps each block's input [T, dim] (stream dtype) and recomputes one
    block's activations at a time in backward: sum of inputs + the largest block's activations."""
    if not blocks:
        return 0
    inputs = len(blocks) * setup.tokens * setup.args.dim * setup.stream_bytes
    return inputs + max(block_activation_bytes(setup, i, shard) for i in blocks)


def activation_bytes(setup: Setup, blocks: list[int], has_loss: bool, shard: int = 1) -> int:
    """A device's activations: its blocks' (block_activation_bytes, or checkpointed_bytes), their
    shared rotations and mask, and the loss on the device that holds the output layer."""
    if setup.cfg.grad_checkpointing:
        kept = checkpointed_bytes(setup, blocks, shard)
    else:
        kept = sum(block_activation_bytes(setup, i, shard) for i in blocks)
    kept += shared_activation_bytes(setup) if blocks else 0
    return kept + (loss_activation_bytes(setup, shard) if has_loss else 0)


def kv_cache_bytes(setup: Setup, n_blocks: int, shard: int = 1) -> int:
    """Generation for exact match (exact_match_samples > 0) preallocates per block k and v
    [batch, kv_heads, cutoff_len + max_new_tokens, head_dim] in the base's float dtype."""
    cfg, args = setup.cfg, setup.args
    if cfg.exact_match_samples <= 0 or cfg.task != "sft":
        return 0
    length = cfg.cutoff_len + cfg.max_new_tokens
    return 2 * n_blocks * cfg.micro_batch_size * (args.n_kv_heads // shard) * length * args.head_dim * setup.float_bytes


# --- per device ----------------------------------------------------------------------------------


@dataclass
class DeviceMemory:
    """Bytes one device holds at the peak of a training step, term by term."""
    name: str
    layers: str = ""
    base_weights: int = 0
    trainable: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    kv_cache: int = 0
    overhead: int = 0

    @property
    def training_step(self) -> int:
        """What a training step adds to the loaded base: trainable + gradients + optimizer + activations."""
        return self.trainable + self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> int:
        """The peak: everything, with generation's KV cache instead of activations when larger
        (exact match runs outside training steps)."""
        return (self.base_weights + self.trainable + self.gradients + self.optimizer
                + max(self.activations, self.kv_cache) + self.overhead)


def device_memory(setup: Setup, name: str, blocks: list[int], first: bool, last: bool, shard: int = 1) -> DeviceMemory:
    """One device holding `blocks` (and the embedding if first, the norm and output if last),
    each weight split over `shard` tensor-parallel ranks. Trainable weights are float32: gradients
    4 B and AdamW's two moments 8 B per trainable parameter."""
    emb, out = outside_base_bytes(setup, shard)
    t_first, t_last = trainable_params_outside(setup, shard)
    trainable = sum(trainable_params_block(setup, i, shard) for i in blocks)
    trainable += (t_first if first else 0) + (t_last if last else 0)
    mem = DeviceMemory(
        name, layers=f"{blocks[0]}-{blocks[-1]}" if blocks else "-",
        base_weights=sum(block_base_bytes(setup, i, shard) for i in blocks) + (emb if first else 0)
        + (out if last else 0) + (dequant_scratch_bytes(setup, shard) if blocks else 0),
        trainable=4 * trainable, gradients=4 * trainable, optimizer=8 * trainable,
        activations=activation_bytes(setup, blocks, last, shard),
        kv_cache=kv_cache_bytes(setup, len(blocks), shard),
    )
    return add_overhead(setup, mem)


def add_overhead(setup: Setup, mem: DeviceMemory) -> DeviceMemory:
    """GPU: CUDA_CONTEXT_BYTES + FRAGMENTATION of what is allocated; CPU: none."""
    if setup.devices.kind == "cuda":
        mem.overhead = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * mem.total)
    return mem


def plan_single(setup: Setup) -> list[DeviceMemory]:
    """Everything on one device; N data-parallel processes each hold the same."""
    return [device_memory(setup, "each" if setup.devices.count > 1 else "device 0", list(range(setup.args.n_layers)),
                          True, True)]


def plan_layerwise(setup: Setup) -> list[DeviceMemory]:
    """Units (embedding, block 0..L-1, norm + output) in contiguous ranges over the devices,
    balanced by their loaded bytes with llama.placement.plan_stages (equal devices, equal
    shares), as llama.placement.place_layers does before the method is attached."""
    emb, out = outside_base_bytes(replace(setup, trained_blocks=frozenset(), trains_outside=False))
    loaded = replace(setup, trained_blocks=frozenset())
    units = [emb] + [block_base_bytes(loaded, i) for i in range(setup.args.n_layers)] + [out]
    stages = plan_stages(units, [1.0] * setup.devices.count)
    plans = []
    for k in range(setup.devices.count):
        blocks = [i for i, s in enumerate(stages[1:-1]) if s == k]
        plans.append(device_memory(setup, f"cuda:{k}" if setup.devices.kind == "cuda" else f"cpu {k}", blocks,
                                   stages[0] == k, stages[-1] == k))
    return plans


def plan_tensor_parallel(setup: Setup) -> list[DeviceMemory]:
    """Every rank holds 1/N of each linear, of the embedding and of the output, of the heads and
    the FFN width (activations), and the norms whole."""
    return [device_memory(setup, f"each of {setup.devices.count}", list(range(setup.args.n_layers)), True, True,
                          shard=setup.devices.count)]


def plan_fsdp(setup: Setup) -> list[DeviceMemory]:
    """Full sharding over N ranks: parameters (frozen and trainable), gradients and optimizer
    state / N; in flight, the largest unit (a block, or the embedding / output) unsharded, with
    its gradient while its backward runs; activations as one device at the rank's micro batch."""
    n = setup.devices.count
    whole = device_memory(replace(setup, devices=replace(setup.devices, kind="cpu")), "", list(range(setup.args.n_layers)),
                          True, True)
    if setup.trains_outside or setup.trained_blocks:  # a float32 unit and its gradient
        emb, _, out = outside_params(setup.args)
        in_flight = 8 * max(block_params(setup.args), emb, out)
    else:  # the largest frozen unit as loaded
        emb, out = outside_base_bytes(setup)
        in_flight = max(emb, out, block_base_bytes(setup, 0))
    mem = DeviceMemory(f"each of {n}", layers="all, sharded", base_weights=whole.base_weights // n + in_flight,
                       trainable=whole.trainable // n, gradients=whole.gradients // n, optimizer=whole.optimizer // n,
                       activations=whole.activations, kv_cache=whole.kv_cache)
    return [add_overhead(setup, mem)]


PLANNERS = {"single": plan_single, "layerwise": plan_layerwise, "tp": plan_tensor_parallel, "fsdp": plan_fsdp}


def plan(setup: Setup) -> list[DeviceMemory]:
    if setup.placement in ("layerwise", "tp", "fsdp") and setup.devices.count < 2:
        raise LlamaInputError(f"placement {setup.placement} needs at least 2 devices: give --gpus 2x...")
    if setup.placement == "layerwise" and setup.devices.count > setup.args.n_layers + 2:
        raise LlamaInputError(f"{setup.devices.count} devices but only {setup.args.n_layers + 2} units to place")
    return PLANNERS[setup.placement](setup)


def fits(setup: Setup) -> bool:
    return all(m.total <= setup.devices.capacity for m in plan(setup))


def largest_fitting(setup: Setup, key: str, low: int, high: int) -> int:
    """The largest value of the config key (micro_batch_size, cutoff_len) in [low, high] that
    fits, by bisection (memory grows with both); low - 1 if none does."""
    def at(v: int) -> Setup:
        cfg = replace(setup.cfg, **{key: v})
        seq = cfg.cutoff_len + (cfg.num_virtual_tokens if cfg.method == "prompt" else 0)
        return replace(setup, cfg=cfg, seq=seq)

    if not fits(at(low)):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(at(mid)) else (low, mid - 1)
    return low


def fewest_devices(setup: Setup, placement: str, limit: int = 1024) -> int:
    """The fewest devices of this size on which `placement` fits (0: none up to limit)."""
    for n in range(2, limit + 1):
        if placement == "layerwise" and n > setup.args.n_layers + 2:
            return 0
        if fits(replace(setup, placement=placement, devices=replace(setup.devices, count=n))):
            return n
    return 0


def suggestions(setup: Setup) -> list[str]:
    """What would fit, when the config does not: a smaller micro batch, a shorter sequence,
    gradient checkpointing, more devices."""
    cfg, out = setup.cfg, []
    batch = largest_fitting(setup, "micro_batch_size", 1, cfg.micro_batch_size)
    if batch >= 1:
        out.append(f"micro_batch_size {batch} (raise grad_accum to keep the effective batch)")
    length = largest_fitting(replace(setup, cfg=replace(cfg, micro_batch_size=1)), "cutoff_len", 2, cfg.cutoff_len)
    if length >= 2 and batch < 1:
        out.append(f"micro_batch_size 1 with cutoff_len {length}")
    if not cfg.grad_checkpointing:
        ckpt = replace(setup, cfg=replace(cfg, grad_checkpointing=True))
        b = largest_fitting(ckpt, "micro_batch_size", 1, 4096)
        if b >= 1:
            out.append(f"grad_checkpointing = true, which fits micro_batch_size up to {b}")
    for placement in ("layerwise", "fsdp") if setup.placement in ("single", "layerwise") else (setup.placement,):
        n = fewest_devices(setup, placement)
        if n and n > setup.devices.count or (n and placement != setup.placement):
            out.append(f"{n} x {setup.devices.capacity / GiB:g} GiB devices with placement {placement}"
                       + (" (sharding = \"fsdp\")" if placement == "fsdp" else ""))
    return out or ["nothing short of larger devices: even micro_batch_size 1 at cutoff_len 2 does not fit"]


# --- report --------------------------------------------------------------------------------------


ROWS = ("base_weights", "trainable", "gradients", "optimizer", "activations", "kv_cache", "overhead")


def describe(setup: Setup) -> list[str]:
    """One line each on the model, the method and the assumptions the numbers rest on."""
    args, cfg = setup.args, setup.cfg
    n_params = sum(p.numel() for p in model_skeleton(args).parameters())
    quant = {"none": f"{'float32' if setup.float_bytes == 4 else cfg.dtype if cfg.dtype != 'auto' else 'bfloat16'}",
             "int4": f"int4 (GPTQ layout, group {setup.group_size})", "nf4": "NF4 (double quant)"}[setup.quant]
    method = {"lora": f"LoRA r {cfg.lora_r} on {', '.join(sorted(n.rsplit('.', 1)[1] for n in setup.lora))}, "
                      f"dropout {cfg.lora_dropout}",
              "prompt": f"prompt tuning, {cfg.num_virtual_tokens} virtual tokens", "full": "full fine-tuning",
              "freeze": f"freeze: the last {cfg.train_layers} blocks train"}[cfg.method]
    lines = [
        f"model: {n_params / 1e9:.2f}B parameters (dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, "
        f"{args.n_kv_heads} KV heads, FFN {args.ffn_hidden_dim}, vocab {args.vocab_size}); base {quant}",
        f"method: {method}; task {cfg.task}; trainable weights, gradients and AdamW's 2 moments in float32 "
        f"(no master copies)",
        f"step: micro_batch_size {cfg.micro_batch_size} x {setup.seq} tokens, "
        f"{'bf16' if setup.act_bytes == 2 and setup.autocast else 'fp32' if not setup.autocast else cfg.precision} "
        f"activations, gradient checkpointing {'on' if cfg.grad_checkpointing else 'off'} (grad_checkpointing)",
        f"devices: {setup.devices.count} x {setup.devices.capacity / GiB:.1f} GiB {setup.devices.kind}, "
        f"placement {setup.placement}",
    ]
    if setup.devices.kind == "cuda":
        lines.append(f"overhead: CUDA context {CUDA_CONTEXT_BYTES / GiB:.1f} GiB + {FRAGMENTATION:.0%} allocator "
                     "fragmentation per GPU (assumed: see finetune/plan.py)")
    if setup.placement == "single" and setup.devices.count > 1:
        lines.append(f"single: each of the {setup.devices.count} data-parallel processes holds all of this")
    return lines


def report(setup: Setup, notes: list[str]) -> str:
    plans = plan(setup)
    width = max(12, *(len(m.name) + 2 for m in plans))
    lines = describe(setup) + notes + [""]
    lines.append(f"{'GiB':<14}" + "".join(f"{m.name:>{width}}" for m in plans))
    lines.append(f"{'layers':<14}" + "".join(f"{m.layers:>{width}}" for m in plans))
    for row in ROWS:
        lines.append(f"{row.replace('_', ' '):<14}" + "".join(f"{getattr(m, row) / GiB:>{width}.2f}" for m in plans))
    lines.append(f"{'total':<14}" + "".join(f"{m.total / GiB:>{width}.2f}" for m in plans))
    lines.append(f"{'capacity':<14}" + "".join(f"{setup.devices.capacity / GiB:>{width}.2f}" for _ in plans))
    lines.append("")
    worst = max(plans, key=lambda m: m.total - setup.devices.capacity)
    if worst.total <= setup.devices.capacity:
        lines.append(f"fits: {(setup.devices.capacity - worst.total) / GiB:.2f} GiB to spare on the fullest device "
                     f"({worst.name})")
    else:
        lines.append(f"does NOT fit: {worst.name} needs {(worst.total - setup.devices.capacity) / GiB:.2f} GiB more "
                     f"than its {setup.devices.capacity / GiB:.1f} GiB")
    batch = largest_fitting(setup, "micro_batch_size", 1, 1 << 16)
    lines.append(f"largest micro_batch_size that fits at cutoff_len {setup.cfg.cutoff_len}: "
                 f"{batch if batch >= 1 else 'none (not even 1)'}")
    if worst.total > setup.devices.capacity:
        lines += ["what would fit:"] + [f"  - {s}" for s in suggestions(setup)]
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------


def add_plan_flags(p) -> None:
    """The planner's own flags (validated in main, so a bad value is a one-line error)."""
    g = p.add_argument_group("[plan]")
    g.add_argument("--model", metavar="PRESET", default=None,
                   help="take the model's shape from a preset instead of ckpt_dir's params.json / config.json: "
                        + ", ".join(PRESETS) + " (7B-65B: LLaMA-1, also Llama-2 7B/13B; llama2-70B; 8B, 70B: Llama-3)")
    g.add_argument("--gpus", metavar="NxSIZE", default=None,
                   help="the GPUs to plan for, COUNTxSIZE such as 1x24GB, 2x24GB or 8x80GB (GB = GiB, as GPUs are "
                        "sold). Default: one 24 GB GPU per device in `devices` (else one); with --device cpu, this "
                        "machine's memory, no CUDA overhead")
    g.add_argument("--placement", metavar="HOW", default="auto",
                   help="single: one device (data-parallel copies each hold the same); layerwise: layer ranges over "
                        "the devices, as `devices` places them; tp: tensor parallel, weights / N; fsdp: full "
                        "sharding (sharding = \"fsdp\"); auto (default): fsdp with sharding = \"fsdp\", layerwise "
                        "when `devices` lists several, else single")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        p = config_parser()  # ft_main.py's keys, then ours
        p.prog = "python -m finetune.plan"
        p.description = (
            "Plan the memory of a fine-tuning config per device without reading any weight: base weights, trainable "
            "weights, gradients, AdamW state, activations, KV cache and CUDA overhead; whether it fits, and the "
            "largest micro batch that does. Every trainer key can be given, as for ft_main.py.")
        add_plan_flags(p)
        p.print_help()
        return 0
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_plan_flags(own)
    mine, rest = own.parse_known_args(argv)
    try:
        if mine.model is not None and mine.model not in PRESETS:
            raise LlamaInputError(f"unknown preset --model {mine.model!r}: choose from {', '.join(PRESETS)}")
        if mine.placement not in PLACEMENTS:
            raise LlamaInputError(f"--placement {mine.placement!r}: choose from {', '.join(PLACEMENTS)}")
        cfg = load_config(rest)
        if cfg.device == "cpu" and mine.gpus is not None:
            raise LlamaInputError("--gpus with device = cpu: plan for the CPU (leave --gpus out) or for GPUs "
                                  "(leave device unset)")
        devices = default_devices(cfg) if mine.gpus is None else parse_gpus(mine.gpus)
        args, quant, notes = model_args(cfg, mine.model)
        print(report(resolve(cfg, args, devices, mine.placement, quant), notes))
    except LlamaInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def model_args(cfg: TrainConfig, preset) -> tuple[ModelArgs, str, list[str]]:
    """(ModelArgs, base quant, notes): the preset's, or ckpt_dir's through read_model_args (a GPTQ
    folder is int4 whatever `quant` says, as the loader takes it)."""
    notes = []
    if preset:
        args = ModelArgs(**PRESETS[preset])
        notes.append(f"shape: preset {preset} (ckpt_dir not read)")
        quant = cfg.quant
    else:
        from llama.formats import detect_format, read_model_args

        importlib.import_module("quant")  # registers GPTQ folders with detect_format

        if not cfg.ckpt_dir or not os.path.isdir(cfg.ckpt_dir):
            raise LlamaInputError(f"ckpt_dir {cfg.ckpt_dir!r} is not a folder: name a preset with --model "
                                  f"({', '.join(PRESETS)})")
        args = read_model_args(cfg.ckpt_dir)
        held = detect_format(cfg.ckpt_dir).quant
        quant = held or cfg.quant
        notes.append(f"shape: {cfg.ckpt_dir} (its params.json / config.json only)")
    if args.vocab_size <= 0:
        args = replace(args, vocab_size=DEFAULT_VOCAB)
        notes.append(f"vocab_size: -1 in params.json (from the tokenizer): assumed {DEFAULT_VOCAB}")
    return args, quant, notes


def default_devices(cfg: TrainConfig) -> Devices:
    if cfg.device == "cpu":
        return Devices("cpu", 1, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    count = len([d for d in cfg.devices.split(",") if d]) if cfg.devices and cfg.devices != "auto" else 1
    return Devices("cuda", count, 24 * GiB)


if __name__ == "__main__":
    sys.exit(main())
