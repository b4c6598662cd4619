"""The tokenizer interface and the registry of tokenizer kinds, chosen from a file's content.

`Tokenizer(path)` opens any kind: each registered kind is asked, in order, whether it reads the
file (`accepts`, from its first bytes); the last registered is the fallback that reports what is
wrong with the file. A kind is one subclass that registers itself with `register_tokenizer`.
"""
from pathlib import Path

from llama.errors import LlamaInputError

SNIFF_BYTES = 4096  # what `accepts` sees of the file


class Tokenizer:
    """encode(text, bos, eos) -> ids and decode(ids) -> text, with bos_id, eos_id, pad_id, n_words,
    the ids that end a generation (`stop_ids`), the chat format the vocabulary was made for
    ("llama2" or "llama3", see llama/chat.py) and the file's path. Text that looks like a special
    token (`<|eot_id|>`) is encoded as plain text: special tokens only come from `special_id`."""

    path: Path
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: frozenset
    chat_format: str = "llama2"

    def __new__(cls, model_path):
        kind = tokenizer_kind(model_path)  # Tokenizer(path): the kind the file's content says
        return super().__new__(kind if cls is Tokenizer else cls)

    @classmethod
    def accepts(cls, head: bytes) -> bool:
        """Whether this kind reads a file that starts with `head`."""
        raise NotImplementedError

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def special_id(self, text: str):
        """The id of special token `text` ("<|eot_id|>"), or None if the vocabulary has none."""
        return None

    def stream(self, context: list[int] = ()) -> "StreamDecoder":
        return StreamDecoder(self, context)


KINDS: list[type] = []


def register_tokenizer(kind: type, fallback: bool = False) -> type:
    """Add a tokenizer kind; the fallback kind goes last (it reports the unreadable files)."""
    KINDS.insert(len(KINDS) if fallback else 0, kind)
    return kind


def tokenizer_kind(model_path) -> type:
    path = Path(model_path)
    if not path.is_file():
        raise LlamaInputError(f"{path}: tokenizer file not found")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    return next((kind for kind in KINDS[:-1] if kind.accepts(head)), KINDS[-1])


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
