"""The layer table: every weight of a LLaMA checkpoint under each name it goes by, with the dim
fairscale splits it on and the RoPE row rule, in one place. `{}` stands for the layer index.

Everything that renames, splits or permutes a weight reads this table: the checkpoint readers
(HF names, q/k rows), the splitter and tensor parallelism (split dims), LoRA (target names, q/k
rows of B), int4 (the block linears, q/k columns) and the exporters (GGUF names).

- split_dim: fairscale's tensor-parallel split. Column-parallel weights on dim 0 (output
  features), row-parallel ones on dim 1 (input features); None: replicated (norms). The
  embedding's depends on the model (EMBEDDING): along the vocabulary, dim 0, in Meta's Llama-3
  (VocabParallelEmbedding), along dim 1 in Llama-1/2 (ParallelEmbedding); see
  ModelArgs.embedding_split_dim.
- rope: wq and wk rotate pairs of their output rows. Meta's layout rotates interleaved pairs
  (x[2i], x[2i+1]); HF's rotates halves, so its converter permutes those rows within each head
  (wk with n_kv_heads heads). `rope` names the head count.
"""
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch


EMBEDDING = "embedding"  # split_dim of the token embedding: ModelArgs.embedding_split_dim


@dataclass(frozen=True)
class Weight:
    meta: str  # Meta's key (ours too): "layers.{}.attention.wq.weight"
    hf: str  # HF transformers' key
    gguf: str  # llama.cpp's tensor name
    shape: tuple  # sizes by name (see SIZES), in Meta's layout
    split_dim: Union[int, str, None]  # fairscale's tensor-parallel split; None: replicated; EMBEDDING: per model
    rope: Optional[str] = None  # "n_heads" / "n_kv_heads": rows permuted between Meta and HF, per head

    def tp_dim(self, args) -> Optional[int]:
        """Its split dim in the model `args` describes (resolving EMBEDDING)."""
        return args.embedding_split_dim if self.split_dim == EMBEDDING else self.split_dim

    @property
    def module(self) -> str:
        """The module path inside a transformer block ("attention.wq"), or in the model."""
        return self.meta.removeprefix("layers.{}.").removesuffix(".weight")


WEIGHTS = (
    Weight("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight", ("vocab", "dim"), EMBEDDING),
    Weight("layers.{}.attention.wq.weight", "model.layers.{}.self_attn.q_proj.weight", "blk.{}.attn_q.weight",
           ("q", "dim"), 0, rope="n_heads"),
    Weight("layers.{}.attention.wk.weight", "model.layers.{}.self_attn.k_proj.weight", "blk.{}.attn_k.weight",
           ("kv", "dim"), 0, rope="n_kv_heads"),
    Weight("layers.{}.attention.wv.weight", "model.layers.{}.self_attn.v_proj.weight", "blk.{}.attn_v.weight",
           ("kv", "dim"), 0),
    Weight("layers.{}.attention.wo.weight", "model.layers.{}.self_attn.o_proj.weight", "blk.{}.attn_output.weight",
           ("dim", "q"), 1),
    Weight("layers.{}.feed_forward.w1.weight", "model.layers.{}.mlp.gate_proj.weight", "blk.{}.ffn_gate.weight",
           ("hidden", "dim"), 0),
    Weight("layers.{}.feed_forward.w2.weight", "model.layers.{}.mlp.down_proj.weight", "blk.{}.ffn_down.weight",
           ("dim", "hidden"), 1),
    Weight("layers.{}.feed_forward.w3.weight", "model.layers.{}.mlp.up_proj.weight", "blk.{}.ffn_up.weight",
           ("hidden", "dim"), 0),
    Weight("layers.{}.attention_norm.weight", "model.layers.{}.input_layernorm.weight", "blk.{}.attn_norm.weight",
           ("dim",), None),
    Weight("layers.{}.ffn_norm.weight", "model.layers.{}.post_attention_layernorm.weight", "blk.{}.ffn_norm.weight",
           ("dim",), None),
    Weight("norm.weight", "model.norm.weight", "output_norm.weight", ("dim",), None),
    Weight("output.weight", "lm_head.weight", "output.weight", ("vocab", "dim"), 0),
)

# Each size by name: what it is called in messages, and its value for a ModelArgs.
SIZES = {
    "dim": ("dim", lambda a: a.dim),
    "vocab": ("vocab size", lambda a: a.vocab_size),
    "q": ("n_heads * head_dim", lambda a: a.n_heads * a.head_dim),
    "kv": ("n_kv_heads * head_dim", lambda a: a.n_kv_heads * a.head_dim),
    "hidden": ("hidden dim", lambda a: a.ffn_hidden_dim),
}

# The seven linears of a transformer block, by module path ("attention.wq", ...).
BLOCK_LINEARS = tuple(w.module for w in WEIGHTS if w.meta.startswith("layers.") and len(w.shape) == 2)
# Their short names and the HF names users know them by (PEFT's target_modules): {"wq": "q_proj", ...}
LINEAR_NAMES = {w.module.rsplit(".", 1)[1]: w.hf.removesuffix(".weight").rsplit(".", 1)[1]
                for w in WEIGHTS if w.module in BLOCK_LINEARS}

# Tensors some checkpoints carry that the model recomputes (RoPE frequencies): skipped.
IGNORED_KEYS = re.compile(r"(^|\.)(rope\.freqs|rotary_emb\.inv_freq)$")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))


_BY = {kind: [(_pattern(getattr(w, kind)), w) for w in WEIGHTS] for kind in ("meta", "hf")}


def lookup(key: str, kind: str = "meta") -> tuple[Optional[Weight], Optional[str]]:
    """(table row, layer index or None) of a key in `kind` naming ("meta" or "hf"); (None, None)
    for a key the table does not have."""
    for pattern, w in _BY[kind]:
        m = pattern.fullmatch(key)
        if m:
            return w, (m.group(1) if m.groups() else None)
    return None, None


def rename(key: str, src: str, dst: str) -> Optional[str]:
    """A key in naming `src` ("meta" or "hf") under naming `dst` ("meta", "hf" or "gguf"), or None."""
    w, layer = lookup(key, src)
    if w is None:
        return None
    return getattr(w, dst).format(layer)


def hf_to_meta_key(name: str) -> Optional[str]:
    return rename(name, "hf", "meta")


def meta_to_hf_key(key: str) -> Optional[str]:
    """'layers.0.attention.wq.weight' -> 'model.layers.0.self_attn.q_proj.weight'."""
    return rename(key, "meta", "hf")


def split_dim(key: str, args) -> Optional[int]:
    """The dim along which tensor-parallel ranks split Meta key `key` of the model `args`
    describes, or None if replicated."""
    w, _ = lookup(key)
    if w is None:
        return None
    return w.tp_dim(args)


def rope_heads(key: str, args) -> Optional[int]:
    """How many heads the rows of Meta key `key` rotate in (wq: n_heads, wk: n_kv_heads), or None
    for a weight without RoPE rows."""
    w, _ = lookup(key)
    return None if w is None or w.rope is None else getattr(args, w.rope)


def expected_shapes(args, parts: int = 1) -> dict[str, tuple]:
    """Meta's keys and shapes for a config, in the model's order (embedding, each layer's
    weights, norm, output); with parts > 1, the shapes of one tensor-parallel rank's share (split
    dims divided by parts)."""
    def shape(w: Weight) -> tuple:
        sizes = [SIZES[s][1](args) for s in w.shape]
        dim = w.tp_dim(args)
        if parts > 1 and dim is not None:
            sizes[dim] //= parts
        return tuple(sizes)

    block = [w for w in WEIGHTS if "{}" in w.meta]
    first, *last = [w for w in WEIGHTS if "{}" not in w.meta]  # the embedding; norm and output
    out = {first.meta: shape(first)}
    for i in range(args.n_layers):
        out.update({w.meta.format(i): shape(w) for w in block})
    out.update({w.meta: shape(w) for w in last})
    return out


def size_name(key: str, dim: int) -> str:
    """What dim `dim` of Meta key `key` is, in words ("hidden dim"), for messages."""
    w, _ = lookup(key)
    return SIZES[w.shape[dim]][0]


# --- the RoPE row rule ---------------------------------------------------------------------------


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta q/k rows (interleaved pairs) -> HF rows (half rotation), per head: the inverse of
    unpermute_rope_rows."""
    head_dim = w.shape[0] // n_heads
    return w.view(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q/k rows (half rotation) -> Meta rows (interleaved pairs), per head."""
    head_dim = w.shape[0] // n_heads
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


def unpermute_rope_rows_(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """unpermute_rope_rows in place, one head at a time: the loader's temp is one head's rows, not
    a second full tensor (whose freed buffers would fragment the heap and stay in RSS)."""
    src = w.view(n_heads, 2, -1, w.shape[-1])  # HF: [head, half, row, dim]
    dst = w.view(n_heads, -1, 2, w.shape[-1])  # Meta: [head, pair, 2, dim]
    tmp = torch.empty_like(src[0])
    for h in range(n_heads):
        tmp.copy_(src[h])
        dst[h].copy_(tmp.transpose(0, 1))
    return w


def to_hf_rows(t: torch.Tensor, key: str, args) -> torch.Tensor:
    """Rows of tensor `t` of Meta key `key` (its weight, or anything with its output rows: a LoRA
    B, an index) in HF's order; unchanged for weights without RoPE rows."""
    n = rope_heads(key, args)
    return t if n is None else permute_rope_rows(t, n)


def from_hf_rows(t: torch.Tensor, key: str, args) -> torch.Tensor:
    """The inverse of to_hf_rows."""
    n = rope_heads(key, args)
    return t if n is None else unpermute_rope_rows(t, n)
