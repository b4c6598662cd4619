"""Sentencepiece models (LLaMA-1/2 `tokenizer.model`), with LLaMA's bos/eos handling."""
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from llama.errors import LlamaInputError
from llama.tokenizers.base import Tokenizer, register_tokenizer


class SentencePieceTokenizer(Tokenizer):
    @classmethod
    def accepts(cls, head: bytes) -> bool:
        return True  # the fallback: sentencepiece says what is wrong with any other file

    def __init__(self, model_path):
        path = Path(model_path)
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise LlamaInputError(f"{path}: not a tokenizer we read: sentencepiece model, Llama-3 tiktoken "
                                  f"tokenizer.model, or HF tokenizer.json (sentencepiece: {e})") from None
        self.path = path
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # sentencepiece models usually have no pad piece (-1); padding slots are masked anyway
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.stop_ids = frozenset({self.eos_id})

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(list(ids))


register_tokenizer(SentencePieceTokenizer, fallback=True)
