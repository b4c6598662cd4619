"""Tokenizers behind one interface (`Tokenizer(path)` picks the kind from the file's content):
sentencepiece today."""
from pathlib import Path

from llama.errors import LlamaInputError
from llama.tokenizers.base import KINDS, StreamDecoder, Tokenizer, register_tokenizer
from llama.tokenizers.sentencepiece import SentencePieceTokenizer


def find_tokenizer(ckpt_dir) -> Path:
    """tokenizer.model in the checkpoint folder or its parent (Meta's layout)."""
    d = Path(ckpt_dir)
    for candidate in (d / "tokenizer.model", d.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise LlamaInputError(f"{d}: no tokenizer.model here or in the parent folder; pass --tokenizer_path")


def check_vocab(args, tokenizer: Tokenizer) -> None:
    """LLaMA-1's params.json says vocab_size -1: take it from the tokenizer; otherwise they must agree."""
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    elif args.vocab_size != tokenizer.n_words:
        raise LlamaInputError(
            f"{tokenizer.path}: tokenizer has {tokenizer.n_words} tokens but the model's vocab_size is {args.vocab_size}"
        )


__all__ = ["KINDS", "SentencePieceTokenizer", "StreamDecoder", "Tokenizer", "check_vocab", "find_tokenizer",
           "register_tokenizer"]
