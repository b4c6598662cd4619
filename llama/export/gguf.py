"""GGUF for llama.cpp (arch "llama"), written with llama.cpp's own Python writer and quantizers
(the `gguf` package), one tensor at a time.

What llama.cpp reads (its convert_hf_to_gguf.py writes the same for a Llama checkpoint):
- keys: llama.context_length (ModelArgs.context_length: 131072 with Llama-3.1's rope scaling,
  8192 for Llama-3, else 4096), embedding_length, block_count, feed_forward_length,
  attention.head_count / head_count_kv / layer_norm_rms_epsilon, rope.dimension_count (head_dim),
  rope.freq_base, vocab_size, general.file_type and general.quantization_version; linear rope
  scaling as rope.scaling.type / rope.scaling.factor.
- Llama-3.1's rope scaling is no key but a tensor, `rope_freqs.weight` [head_dim / 2] float32:
  the divisor of each inverse frequency (1 for high frequencies, `factor` for low ones, smooth in
  between), computed as llama.cpp's converter does.
- tensors under llama.cpp's names (llama/layers.py, `gguf`), q/k rows in Meta's interleaved RoPE
  order (llama.cpp's "norm" rope rotates adjacent pairs), 1-D tensors (the norms) always F32. An
  output tied to the embedding is not written: llama.cpp uses token_embd when `output` is absent.
- the tokenizer, which llama.cpp cannot run without: sentencepiece as tokenizer.ggml.model "llama"
  (pieces, scores, piece types, bos/eos/unk/pad, add_space_prefix); Llama-3's BPE as "gpt2" with
  pre "llama-bpe" (llama.cpp's own copy of Meta's split pattern: another pattern is refused),
  GPT-2 byte-to-unicode tokens, the merges (rebuilt from the ranks, TiktokenKind.bpe_vocab_and_merges)
  and the special tokens as control tokens, with bos/eos/eot/eom/pad; add_bos_token true,
  add_eos_token false; tokenizer.chat_template (llama/export/tokenizer_files.py).

--outtype: f32, f16, bf16, q8_0, q4_0 (llama.cpp's block quantizations of 32 values; every 2-D
tensor, embedding and output included; a tensor whose rows do not divide into blocks is written
F16, as llama.cpp's converter falls back); auto: f32 for a float32 model, else f16.
"""
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llama.errors import LlamaInputError
from llama.export import register_exporter
from llama.export.source import ExportSource
from llama.export.tokenizer_files import SP_BYTE, chat_template
from llama.files import atomic_path
from llama.layers import rename
from llama.tokenizers import SentencePieceTokenizer
from llama.tokenizers.tiktoken_bpe import META_PAT, TiktokenKind

OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0", "q4_0")
LLAMA3_PRE = "llama-bpe"  # llama.cpp's name for Meta's Llama-3 split pattern


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LlamaInputError("--format gguf needs the gguf package (llama.cpp's writer): pip install gguf") from None
    return gguf


def resolve_outtype(source: ExportSource, outtype: str) -> str:
    if outtype == "auto":
        return "f32" if source.stored_dtype() == torch.float32 else "f16"
    return outtype


def rope_freq_factors(args) -> torch.Tensor:
    """Llama-3.1's rope scaling as llama.cpp takes it: per inverse frequency the divisor
    (convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, computed alike in float32)."""
    scaling = args.rope_scaling
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def write_gguf(source: ExportSource, out: Path, outtype: str = "auto", progress: bool = True) -> Path:
    """Write the GGUF file `out` (under a temporary name beside it, renamed when complete)."""
    gguf = _gguf()
    out = Path(out)
    if out.is_dir():
        raise LlamaInputError(f"{out}: is a folder; --out names the .gguf file to write")
    tok = source.tokenizer
    if tok is None:
        raise LlamaInputError("GGUF needs the tokenizer (llama.cpp runs none without it): no tokenizer.model or "
                              "tokenizer.json beside the checkpoint or in its parent folder; pass --tokenizer_path")
    outtype = resolve_outtype(source, outtype)
    args = source.args
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[outtype]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype]

    w = gguf.GGUFWriter(None, "llama")  # the path comes with write_header_to_file (the temp file)
    w.add_name(out.stem)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(gguf, w, args)
    _add_tokenizer(gguf, w, tok, args.vocab_size)

    # the plan: (gguf name, Meta key or a tensor, shape, type), the extra rope tensor first as llama.cpp's converter
    plan = []
    scaling = args.rope_scaling
    if scaling is not None and scaling.get("rope_type") == "llama3":
        factors = rope_freq_factors(args)
        plan.append(("rope_freqs.weight", factors, tuple(factors.shape), gguf.GGMLQuantizationType.F32))
    for key in source.keys():
        if source.tied(key):
            continue  # llama.cpp uses token_embd for an absent output
        name = rename(key, "meta", "gguf")
        if name is None:
            raise LlamaInputError(f"{key}: no llama.cpp name for this tensor")
        shape = tuple(source.shape(key))
        plan.append((name, key, shape, _tensor_type(gguf, shape, qtype)))
    for name, _, shape, t in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(gguf, shape, t), raw_dtype=t)

    with atomic_path(out) as tmp:
        try:
            w.write_header_to_file(path=Path(tmp))
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for name, what, shape, t in tqdm(plan, unit="tensor", disable=not progress, desc=f"gguf {out.name}"):
                w.write_tensor_data(_encode(gguf, source, what, t))
        finally:
            w.close()
    return out


def _tensor_type(gguf, shape: tuple, qtype):
    """1-D tensors F32 (llama.cpp computes norms in float32); a block quantization needs rows that
    divide into its blocks, else F16 (llama.cpp's converter falls back so too)."""
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _nbytes(gguf, shape: tuple, t) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def _encode(gguf, source: ExportSource, what, t) -> np.ndarray:
    """One tensor's bytes in type t: read (in Meta's layout) as that dtype, or as float32 for
    gguf's quantizers."""
    T = gguf.GGMLQuantizationType

    def read(dtype):
        return what.to(dtype) if isinstance(what, torch.Tensor) else source.read(what, dtype)

    if t == T.F32:
        return read(torch.float32).contiguous().numpy()
    if t == T.F16:
        return read(torch.float16).contiguous().numpy()
    if t == T.BF16:  # torch rounds to nearest even, as gguf's BF16 quantizer does
        return read(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(read(torch.float32).contiguous().numpy(), t)


def _add_hparams(gguf, w, args) -> None:
    w.add_vocab_size(args.vocab_size)
    w.add_context_length(args.context_length)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    scaling = args.rope_scaling
    if scaling is None or scaling.get("rope_type") == "llama3":  # llama3: the rope_freqs tensor
        return
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
        return
    raise LlamaInputError(f"rope_scaling type {scaling.get('rope_type')!r} has no GGUF form here (llama3, linear)")


def _add_tokenizer(gguf, w, tok, vocab_size: int) -> None:
    if isinstance(tok, SentencePieceTokenizer):
        _add_sentencepiece(gguf, w, tok, vocab_size)
    elif isinstance(tok, TiktokenKind):
        _add_llama3_bpe(gguf, w, tok, vocab_size)
    else:
        raise LlamaInputError(f"{tok.path}: no GGUF form for a {type(tok).__name__}")
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template(tok))


def _add_sentencepiece(gguf, w, tok: SentencePieceTokenizer, vocab_size: int) -> None:
    spec = tok.model_spec()
    pieces = spec["pieces"]
    if len(pieces) > vocab_size:
        raise LlamaInputError(f"{tok.path}: {len(pieces)} pieces for a vocabulary of {vocab_size}")
    if spec["normalizer"] not in ("identity", "") or spec["remove_extra_whitespaces"]:
        print(f"warning: {tok.path}: the tokenizer normalizes text ({spec['normalizer'] or 'charsmap'}"
              f"{', collapses white space' if spec['remove_extra_whitespaces'] else ''}); llama.cpp's Llama "
              "tokenizer does not, so its ids can differ on such text (Llama-2's tokenizer has neither)")
    # ids past the pieces (a model padded beyond its tokenizer), as llama.cpp's converter pads them
    pad = range(len(pieces), vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p for p, _, _ in pieces] + [f"[PAD{i}]" for i in pad])
    w.add_token_scores([s for _, s, _ in pieces] + [-1000.0] * len(pad))
    w.add_token_types([t for _, _, t in pieces] + [gguf.TokenType.UNUSED] * len(pad))
    unk = tok.sp.unk_id()
    if unk >= 0:
        w.add_unk_token_id(unk)
    if tok.sp.pad_id() >= 0:
        w.add_pad_token_id(tok.sp.pad_id())
    w.add_add_space_prefix(spec["add_dummy_prefix"])
    assert gguf.TokenType.BYTE == SP_BYTE  # sentencepiece's piece types are GGUF's token types


def _add_llama3_bpe(gguf, w, tok: TiktokenKind, vocab_size: int) -> None:
    if tok.split_pattern() != META_PAT:
        raise LlamaInputError(f"{tok.path}: its split pattern is not Meta's Llama-3 pattern, the only byte-level BPE "
                              f"split llama.cpp runs for a Llama model (pre-tokenizer {LLAMA3_PRE!r})")
    vocab, merges = tok.bpe_vocab_and_merges()
    if not merges:  # gguf writes no empty array, and llama.cpp refuses a BPE vocabulary without the key
        raise LlamaInputError(f"{tok.path}: a byte-level vocabulary without merges (only single bytes); "
                              "llama.cpp needs tokenizer.ggml.merges")
    tokens: list = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for table, kind in ((vocab, gguf.TokenType.NORMAL), (tok.specials, gguf.TokenType.CONTROL)):
        for text, i in table.items():
            if i >= vocab_size:
                raise LlamaInputError(f"{tok.path}: token {text!r} has id {i}, past the vocabulary of {vocab_size}")
            tokens[i], types[i] = text, kind
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(LLAMA3_PRE)
    w.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    for name, add in (("<|eot_id|>", w.add_eot_token_id), ("<|eom_id|>", w.add_eom_token_id),
                      ("<|finetune_right_pad_id|>", w.add_pad_token_id)):
        if tok.special_id(name) is not None:
            add(tok.special_id(name))


register_exporter("gguf", write_gguf, OUTTYPES)
