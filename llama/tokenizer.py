"""Sentencepiece tokenizer with LLaMA's bos/eos handling and streaming decode."""
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from llama.errors import LlamaInputError


class Tokenizer:
    def __init__(self, model_path):
        path = Path(model_path)
        if not path.is_file():
            raise LlamaInputError(f"{path}: tokenizer file not found")
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise LlamaInputError(f"{path}: not a sentencepiece model ({e})") from None
        self.path = path
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # sentencepiece models usually have no pad piece (-1); padding slots are masked anyway
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(list(ids))

    def stream(self, context: list[int] = ()) -> "StreamDecoder":
        return StreamDecoder(self, context)


class StreamDecoder:
    """Turns tokens arriving one at a time into text to print, whole characters only.

    Decoding token by token would drop sentencepiece's word-leading spaces and split multi-byte
    characters encoded as byte pieces, so we decode the whole sequence each step and emit what is
    new, holding back a trailing incomplete character (U+FFFD) until its bytes arrive. `context`
    (the prompt) is decoded along but never emitted, so the first word keeps its leading space."""

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)
        self.emitted = len(tokenizer.decode(self.ids))  # characters already shown

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new
