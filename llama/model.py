"""The LLaMA transformer in one file: RMSNorm, rotary embeddings, grouped-query attention with a
preallocated KV cache, SwiGLU feed-forward.

Weights use Meta's names and layout (RoPE on interleaved pairs). Under tensor parallelism the
linears are fairscale's column/row-parallel layers (see llama/tp.py) and each rank holds
n_heads / world_size heads.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.distributed import model_parallel_size
from llama.tp import column_linear, embedding, row_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalise in float32 whatever the model dtype
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] of the rotary embedding, with `rope_scaling` applied."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise LlamaInputError(f"rope_scaling type {kind!r} is not supported (llama3, linear)")
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [batch, seq, heads, head_dim] by the unit
    complex numbers rot [batch, seq, head_dim // 2]: one complex multiply, which runs several
    times faster than rotating real pairs with stack (forward and backward)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rot[:, :, None]).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = model_parallel_size()
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.n_kv_heads // mp
        self.head_dim = args.head_dim
        self.wq = column_linear(args.dim, args.n_heads * self.head_dim)
        self.wk = column_linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wv = column_linear(args.dim, args.n_kv_heads * self.head_dim)
        self.wo = row_linear(args.n_heads * self.head_dim, args.dim)
        # [max_batch, n_local_kv_heads, max_seq, head_dim] once set up for decoding
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None

    def forward(self, x, start_pos: int, rot, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [batch, seq, dim] -> [batch, seq, dim]. mask: bool [batch, 1, seq, kv_len], True where
        a query may attend, or None: causal from position 0, or one query seeing the whole cache."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, heads, seq, hd]
        if self.cache_k is not None:
            end = start_pos + seqlen
            self.cache_k[:bsz, :, start_pos:end] = k
            self.cache_v[:bsz, :, start_pos:end] = v
            # as q: the cache takes the weights' dtype, which FSDP's mixed precision computes below
            k, v = self.cache_k[:bsz, :, :end].to(q.dtype), self.cache_v[:bsz, :, :end].to(q.dtype)
        # seqlen first: a compiled decode step (one token) then never tests its dynamic start_pos
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=seqlen > 1 and mask is None and start_pos == 0,
            enable_gqa=self.n_local_heads != self.n_local_kv_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = column_linear(dim, hidden_dim)  # gate
        self.w2 = row_linear(hidden_dim, dim)  # down
        self.w3 = column_linear(dim, hidden_dim)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start_pos, rot, mask):
        h = x + self.attention(self.attention_norm(x), start_pos, rot, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def attention_mask(seqlen: int, start_pos: int, pad_lens: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """Causal mask combined with a left-padding mask: bool [batch, 1, seq, start_pos + seq].

    Key slot j is hidden from every query of row b when j < pad_lens[b]. A padding query attends
    to itself only, so its (unused) output stays finite instead of NaN. None (no padding) means
    plain causal attention from position 0, or one new token seeing the whole cache: SDPA runs
    both without a mask, and decoding builds none per step."""
    if pad_lens is None and (start_pos == 0 or seqlen == 1):
        return None
    q_pos = torch.arange(start_pos, start_pos + seqlen, device=device)[:, None]
    k_pos = torch.arange(start_pos + seqlen, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None]  # [1, seq, kv]
    if pad_lens is not None:
        real_key = k_pos[None] >= pad_lens[:, None, None]
        allowed = (allowed & real_key) | (k_pos == q_pos)[None]
    return allowed[:, None]


def segment_positions_and_mask(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows packed with several samples, segment_ids [batch, seq] numbers the sample of each
    slot. Returns positions [batch, seq] that restart at 0 in each sample, and a bool mask
    [batch, 1, seq, seq] that is causal and keeps attention inside each sample."""
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    positions = idx - torch.where(starts, idx, 0).cummax(dim=1).values
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = idx[0][None, :] <= idx[0][:, None]
    return positions, (same & causal)[:, None]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise LlamaInputError("vocab_size must be set (take it from the tokenizer)")
        self.args = args
        self.tok_embeddings = embedding(args.vocab_size, args.dim, args.embedding_split_dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = column_linear(args.dim, args.vocab_size, gather_output=True)
        self._inv_freq: Optional[torch.Tensor] = None  # not a buffer: the model may be built on `meta`
        self.checkpoint_layers = False  # activation checkpointing, for training

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Preallocate each layer's KV cache [max_batch, n_local_kv_heads, max_seq, head_dim],
        on its layer's device and dtype, so decoding allocates nothing per step."""
        for layer in self.layers:
            attn = layer.attention
            w = layer.attention_norm.weight  # the layer's device and dtype, whatever its linears are
            shape = (max_batch_size, attn.n_local_kv_heads, max_seq_len, attn.head_dim)
            attn.cache_k = torch.zeros(shape, device=w.device, dtype=w.dtype)
            attn.cache_v = torch.zeros(shape, device=w.device, dtype=w.dtype)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotations e^(i·angle), complex64 [batch, seq, head_dim // 2], for integer positions [batch, seq]."""
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_frequencies(self.args, positions.device)
        angles = positions[..., None].float() * self._inv_freq
        return torch.polar(torch.ones_like(angles), angles)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, pad_lens: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None, last_only: bool = False) -> torch.Tensor:
        """tokens [batch, seq] -> logits [batch, seq, vocab] (float32), or [batch, 1, vocab] for
        the last slot only with last_only (all that decoding reads of a prompt).

        start_pos: cache slot of tokens[:, 0] when decoding with the KV cache (0 without it).
        pad_lens: [batch] count of left-padding slots per row; positions count from the first
        real token, so a padded row sees the same positions as the prompt alone.
        segment_ids: [batch, seq] sample number of each slot when rows are packed."""
        h = self.hidden_states(self.tok_embeddings(tokens), start_pos, pad_lens, segment_ids)
        return self.output(h[:, -1:] if last_only else h).float()

    def hidden_states(self, h: torch.Tensor, start_pos: int = 0, pad_lens: Optional[torch.Tensor] = None,
                      segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input embeddings h [batch, seq, dim] -> final-normed hidden states [batch, seq, dim].
        Fine-tuning enters here: prompt tuning prepends embeddings, a score head reads the output."""
        seqlen = h.shape[1]
        if segment_ids is not None:
            positions, mask = segment_positions_and_mask(segment_ids)
        else:
            positions = torch.arange(start_pos, start_pos + seqlen, device=h.device)[None]
            if pad_lens is not None:
                positions = (positions - pad_lens[:, None]).clamp(min=0)
            mask = attention_mask(seqlen, start_pos, pad_lens, h.device)
        rot = self.rope(positions)
        per_device = {}  # with layers placed on several devices, activations follow the layers
        for layer in self.layers:
            dev = layer.attention_norm.weight.device
            if dev not in per_device:
                per_device[dev] = [t if t is None else t.to(dev) for t in (rot, mask)]
            if self.checkpoint_layers and torch.is_grad_enabled():
                # keep only each layer's input; recompute its activations in backward
                h = checkpoint(layer, h.to(dev), start_pos, *per_device[dev], use_reentrant=False)
            else:
                h = layer(h.to(dev), start_pos, *per_device[dev])
        # frozen norm/output may be 16-bit after float32 trained blocks (freeze tuning)
        return self.norm(h.to(self.norm.weight.device, self.norm.weight.dtype))
