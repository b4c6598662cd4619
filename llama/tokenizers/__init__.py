"""Tokenizers behind one interface (`Tokenizer(path)` picks the kind from the file's content, not
its name): Meta's Llama-3 tiktoken `tokenizer.model` (tiktoken_bpe.py), HF's byte-level BPE
`tokenizer.json` as Llama-3 ships it (hf_json.py), and sentencepiece models (LLaMA-1/2), the
fallback that reports the files no kind reads."""
from pathlib import Path

from llama.errors import LlamaInputError
from llama.tokenizers.base import KINDS, StreamDecoder, Tokenizer, register_tokenizer
# imported for their registration; sentencepiece (the fallback) goes last whatever the order
from llama.tokenizers.sentencepiece import SentencePieceTokenizer
from llama.tokenizers.tiktoken_bpe import TiktokenTokenizer
from llama.tokenizers.hf_json import HFJsonTokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # in the order we look for them


def find_tokenizer(ckpt_dir) -> Path:
    """tokenizer.model in the checkpoint folder or its parent (Meta's layout); failing that,
    tokenizer.json there (HF Llama-3 folders ship it, sometimes without tokenizer.model)."""
    d = Path(ckpt_dir)
    for name in TOKENIZER_FILES:
        for candidate in (d / name, d.parent / name):
            if candidate.is_file():
                return candidate
    raise LlamaInputError(f"{d}: no tokenizer.model or tokenizer.json here or in the parent folder; "
                          "pass --tokenizer_path")


def tokenizer_file_name(path) -> str:
    """The name a tokenizer file goes by beside the weights it was copied to."""
    return "tokenizer.json" if Path(path).suffix == ".json" else "tokenizer.model"


def check_vocab(args, tokenizer: Tokenizer) -> None:
    """LLaMA-1's params.json says vocab_size -1: take it from the tokenizer; otherwise they must agree."""
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    elif args.vocab_size != tokenizer.n_words:
        raise LlamaInputError(
            f"{tokenizer.path}: tokenizer has {tokenizer.n_words} tokens but the model's vocab_size is {args.vocab_size}: "
            "a tokenizer of another model? use the one the checkpoint came with"
        )


__all__ = ["KINDS", "HFJsonTokenizer", "SentencePieceTokenizer", "StreamDecoder", "TiktokenTokenizer", "Tokenizer",
           "check_vocab", "find_tokenizer", "tokenizer_file_name", "register_tokenizer"]
