"""The tokenizer files of an HF folder, written from our tokenizer so that transformers'
`AutoTokenizer.from_pretrained(folder)` gives our ids, and the chat templates (Jinja, as HF's
tokenizer_config.json and GGUF's tokenizer.chat_template carry them) of our chat formats.

- Llama-3 (Meta's tiktoken tokenizer.model, or a byte-level tokenizer.json): a byte-level BPE
  tokenizer.json as Llama-3's: the ranks as GPT-2 byte-to-unicode strings, the merges rebuilt from
  the ranks as transformers' TikTokenConverter does (TiktokenKind.bpe_vocab_and_merges), Meta's
  split pattern then ByteLevel, ignore_merges, the special tokens added, a post-processor adding
  <|begin_of_text|>. Our HFJsonTokenizer reads it back with the same ids.
- Sentencepiece (LLaMA-1/2): tokenizer.model copied, and a tokenizer.json (byte-fallback BPE, the
  merges as transformers' generate_merges lists them, sentencepiece's normalization as normalizer
  steps: the "▁" prefix and spaces as "▁", as HF's first Llama-2 tokenizer.json had them, and for a
  model that normalizes (sentencepiece's default nmt_nfkc and white-space collapsing; Llama-2 has
  neither) its precompiled character map and white-space rules). Its class is the generic fast
  tokenizer: transformers 5's LlamaTokenizer rebuilds its own pipeline (Metaspace, no normalizer),
  whose ids differ from sentencepiece's on text starting with a space, and it builds one from
  tokenizer.model alone only with the protobuf package. Non-BPE (unigram) models get tokenizer.model
  only, as LlamaTokenizer.
- tokenizer_config.json: bos/eos (and unk, add_bos_token true, add_eos_token false for
  sentencepiece), the chat template of the tokenizer's chat format, model_max_length if given.
"""
import base64
import json
import shutil
from pathlib import Path
from typing import Optional

from llama.errors import LlamaInputError
from llama.files import atomic_write_bytes
from llama.tokenizers import SentencePieceTokenizer, Tokenizer
from llama.tokenizers.tiktoken_bpe import TiktokenKind

# Meta's Llama-3 Instruct template (Meta-Llama-3-8B-Instruct's tokenizer_config.json): what
# llama/chat.py's llama3_dialog encodes: bos, per message a header, the content stripped and
# <|eot_id|>, then an open assistant header.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama-2-chat's template (Llama-2-7b-chat-hf's tokenizer_config.json): llama/chat.py's llama2_dialog,
# `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>` per exchange.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

CHAT_TEMPLATES = {"llama2": LLAMA2_CHAT_TEMPLATE, "llama3": LLAMA3_CHAT_TEMPLATE}

# sentencepiece piece types (sentencepiece_model.proto)
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6


def chat_template(tokenizer: Tokenizer) -> str:
    return CHAT_TEMPLATES[tokenizer.chat_format]


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The text of a special token (bos, eos...) of any kind."""
    if isinstance(tokenizer, TiktokenKind):
        return next(s for s, i in tokenizer.specials.items() if i == token_id)
    return tokenizer.sp.IdToPiece(token_id)


def write_hf_tokenizer(tokenizer: Tokenizer, folder: Path, model_max_length: Optional[int] = None) -> list[Path]:
    """Write the tokenizer files into `folder` (each atomically); returns their paths."""
    folder = Path(folder)
    config = {"bos_token": token_text(tokenizer, tokenizer.bos_id),
              "eos_token": token_text(tokenizer, tokenizer.eos_id),
              "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
              "chat_template": chat_template(tokenizer)}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    written = []
    if isinstance(tokenizer, TiktokenKind):
        spec = byte_level_bpe_json(tokenizer)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    elif isinstance(tokenizer, SentencePieceTokenizer):
        shutil.copyfile(tokenizer.path, folder / "tokenizer.model")
        written.append(folder / "tokenizer.model")
        spec = sentencepiece_bpe_json(tokenizer)
        unk = tokenizer.sp.unk_id()
        # LlamaTokenizer where only tokenizer.model is written (transformers converts it); with the
        # json, the generic fast tokenizer: transformers 5's LlamaTokenizer rebuilds its own pipeline
        # (Metaspace, no normalizer), which differs from sentencepiece on text starting with spaces
        config = {"tokenizer_class": "LlamaTokenizer" if spec is None else "PreTrainedTokenizerFast", **config,
                  "unk_token": tokenizer.sp.IdToPiece(unk) if unk >= 0 else None, "pad_token": None,
                  "add_bos_token": True, "add_eos_token": False}  # Llama-2's: bos added, eos not
    else:
        raise LlamaInputError(f"{tokenizer.path}: no HF tokenizer files for a {type(tokenizer).__name__}")
    if spec is not None:
        _write_json(folder / "tokenizer.json", spec)
        written.append(folder / "tokenizer.json")
    _write_json(folder / "tokenizer_config.json", config)
    written.append(folder / "tokenizer_config.json")
    return written


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, ensure_ascii=False).encode() + b"\n")


def _added_token(content: str, token_id: int, special: bool = True) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _bos_post_processor(bos: str, bos_id: int) -> dict:
    """HF's TemplateProcessing adding bos before each sequence (add_special_tokens=True)."""
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def byte_level_bpe_json(tokenizer: TiktokenKind) -> dict:
    """Llama-3's tokenizer.json layout (what transformers' TikTokenConverter and Meta's HF release
    wrote), for the tiktoken-backed kinds."""
    vocab, merges = tokenizer.bpe_vocab_and_merges()
    bos = token_text(tokenizer, tokenizer.bos_id)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added_token(s, i) for s, i in sorted(tokenizer.specials.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.split_pattern()}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            _bos_post_processor(bos, tokenizer.bos_id)]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }


def sentencepiece_bpe_json(tokenizer: SentencePieceTokenizer) -> Optional[dict]:
    """HF's Llama tokenizer.json (byte-fallback BPE) for a sentencepiece BPE model; None for
    another model type (HF would need its Unigram model and the protobuf package)."""
    spec = tokenizer.model_spec()
    if spec["model_type"] != "bpe":
        return None
    vocab, merges = tokenizer.bpe_vocab_and_merges()
    pieces = spec["pieces"]
    unk = tokenizer.sp.unk_id()
    # control and unknown pieces are special tokens; user-defined ones are found in the text as sentencepiece does
    added = [_added_token(p, i, special=kind != SP_USER_DEFINED) for i, (p, _, kind) in enumerate(pieces)
             if kind in (SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED)]
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if spec["add_dummy_prefix"]:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = tokenizer.sp.IdToPiece(tokenizer.bos_id)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added,
        "normalizer": _sentencepiece_normalizer(spec),
        "pre_tokenizer": None,
        "post_processor": _bos_post_processor(bos, tokenizer.bos_id),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[unk][0] if unk >= 0 else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": [list(m) for m in merges]},
    }


def _sentencepiece_normalizer(spec: dict) -> dict:
    """sentencepiece's normalization in HF's terms, in its order: the character map (HF's
    Precompiled is a port of it), removing leading, trailing and repeated spaces, the "▁" prefix
    (HF's Prepend skips an empty text, as sentencepiece does) and spaces as "▁". Llama-2 (identity,
    white space kept) has the last two only: HF's first Llama-2 tokenizer.json (HF's Metaspace
    pre-tokenizer, used later, prefixes no "▁" to text that starts with a space; sentencepiece does)."""
    steps = []
    if spec["precompiled_charsmap"]:
        steps.append({"type": "Precompiled",
                      "precompiled_charsmap": base64.b64encode(spec["precompiled_charsmap"]).decode()})
    if spec["remove_extra_whitespaces"]:
        steps += [{"type": "Strip", "strip_left": True, "strip_right": True},
                  {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if spec["add_dummy_prefix"]:
        steps.append({"type": "Prepend", "prepend": "\u2581"})
    steps.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    return {"type": "Sequence", "normalizers": steps}
