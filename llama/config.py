"""ModelArgs: the LLaMA hyperparameters, read from Meta `params.json` or HF `config.json`."""
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from llama.errors import LlamaInputError

# Llama-3's vocabulary has 128,256 tokens, Llama-1/2's 32,000: a whole checkpoint with at least
# this many is split along the vocabulary, as Meta's Llama-3 code does.
LLAMA3_MIN_VOCAB = 128_000

# Meta's Llama-3.1 `params.json` says `use_scaled_rope: true` and leaves these values implicit.
LLAMA31_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (multi-head attention)
    vocab_size: int = -1  # -1 (LLaMA-1): taken from the tokenizer
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # explicit FFN width (HF intermediate_size); else derived
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    tie_word_embeddings: bool = False
    # How tensor-parallel shards split the embedding: True along the vocabulary (Meta's Llama-3
    # code, VocabParallelEmbedding), False along dim (Llama-1/2, ParallelEmbedding). Read from
    # the shards' shapes; None (a whole checkpoint): Llama-3's layout for a Llama-3-sized
    # vocabulary (LLAMA3_MIN_VOCAB), Llama-2's below. A layout, not a hyperparameter: never written.
    vocab_parallel: Optional[bool] = field(default=None, compare=False)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise LlamaInputError(
                f"dim {self.dim} must divide by n_heads {self.n_heads}, "
                f"and n_heads by n_kv_heads {self.n_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def embedding_split_dim(self) -> int:
        """The dim tensor-parallel shards split tok_embeddings on: 0 (vocabulary) or 1 (dim)."""
        vocab_parallel = self.vocab_parallel
        if vocab_parallel is None:
            vocab_parallel = self.vocab_size >= LLAMA3_MIN_VOCAB
        return 0 if vocab_parallel else 1

    @property
    def ffn_hidden_dim(self) -> int:
        """FFN width: Meta's rule (2/3 of 4*dim, scaled, rounded up to multiple_of) unless explicit."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    # --- reading and writing -------------------------------------------------------------

    @classmethod
    def from_params_json(cls, path) -> "ModelArgs":
        params = _read_json(path)
        known = {f.name for f in fields(cls)} - {"vocab_parallel"}
        if params.pop("use_scaled_rope", False) and "rope_scaling" not in params:
            params["rope_scaling"] = dict(LLAMA31_ROPE_SCALING)
        # Meta files carry keys we don't model (max_batch_size, max_seq_len...): ignore them.
        kwargs = {k: v for k, v in params.items() if k in known}
        for required in ("dim", "n_layers", "n_heads"):
            if kwargs.get(required) is None:
                raise LlamaInputError(f"{path}: missing key '{required}'")
        _check_values(path, kwargs, ints=("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "hidden_dim"),
                      numbers=("ffn_dim_multiplier", "norm_eps", "rope_theta"))
        if kwargs.get("vocab_size", -1) != -1:  # -1 (LLaMA-1): from the tokenizer
            _check_values(path, kwargs, ints=("vocab_size",))
        return _construct(cls, path, kwargs)

    @classmethod
    def from_hf_config(cls, path) -> "ModelArgs":
        cfg = _read_json(path)
        # transformers < 5 writes rope_theta + rope_scaling; >= 5 puts both in rope_parameters.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.pop("type", None) or rope.pop("rope_type", "default")
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        for required in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if cfg.get(required) is None:
                raise LlamaInputError(f"{path}: missing key '{required}'")
        _check_values(
            path, {**cfg, "rope_theta": rope_theta},
            ints=("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                  "intermediate_size"),
            numbers=("rms_norm_eps", "rope_theta"),
        )
        try:
            args = _construct(
                cls, path, dict(
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads"),
                vocab_size=cfg["vocab_size"],
                hidden_dim=cfg["intermediate_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            ))
        except KeyError as e:
            raise LlamaInputError(f"{path}: missing key {e}") from None
        if cfg.get("head_dim") not in (None, args.head_dim):
            raise LlamaInputError(f"{path}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
        return args

    def to_params(self) -> dict:
        """The `params.json` we write: Meta's keys, plus `hidden_dim` only where Meta's rule can't
        reproduce the width, and `rope_scaling`/`tie_word_embeddings` only when set."""
        params = asdict(self)
        params.pop("vocab_parallel")
        derived = ModelArgs(**{**params, "hidden_dim": None}).ffn_hidden_dim
        if self.hidden_dim == derived:
            params["hidden_dim"] = None
        return {k: v for k, v in params.items() if v is not None and v is not False}

    @property
    def context_length(self) -> int:
        """The context the model was trained for, which config.json / GGUF state and our files do
        not: 131072 with llama3 rope scaling (every Llama-3.1+ release), 8192 for Llama-3
        (rope_theta 500000), 4096 (Llama-2) otherwise."""
        if (self.rope_scaling or {}).get("rope_type") == "llama3":
            return 131072
        return 8192 if self.rope_theta >= 500000 else 4096

    def to_hf_config(self, dtype: str = "float16", bos_id: Optional[int] = None, eos_id=None) -> dict:
        """An HF `config.json` for these hyperparameters (the inverse of from_hf_config); bos/eos
        ids from the tokenizer (eos: one id or the list of stop ids)."""
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.dim,
            "intermediate_size": self.ffn_hidden_dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu", "torch_dtype": dtype, "max_position_embeddings": self.context_length,
            "head_dim": self.head_dim, "attention_bias": False, "mlp_bias": False,
        }
        if self.rope_scaling:
            config["rope_scaling"] = dict(self.rope_scaling)
        if bos_id is not None:
            config["bos_token_id"] = bos_id
        if eos_id is not None:
            config["eos_token_id"] = eos_id
        return config

    def write_params_json(self, path) -> None:
        from llama.files import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(self.to_params(), indent=2).encode() + b"\n")


def _check_values(path, values: dict, ints=(), numbers=()) -> None:
    """Keys present (and not null where optional) must be positive ints / positive numbers, so a
    bad file gives an error naming it rather than a TypeError deep in model construction."""
    for key in ints:
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise LlamaInputError(f"{path}: '{key}' must be a positive integer, got {v!r}")
    for key in numbers:
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise LlamaInputError(f"{path}: '{key}' must be a positive number, got {v!r}")


def _construct(cls, path, kwargs: dict) -> "ModelArgs":
    """cls(**kwargs), with the file named in any consistency error (e.g. dim vs n_heads)."""
    try:
        return cls(**kwargs)
    except LlamaInputError as e:
        raise LlamaInputError(f"{path}: {e}") from None


def _read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LlamaInputError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamaInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LlamaInputError(f"{path}: expected a JSON object")
    return data
