"""Sentencepiece models (LLaMA-1/2 `tokenizer.model`), with LLaMA's bos/eos handling."""
import struct
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

    # --- the model file's contents, for the exporters (llama/export) ---------------------------

    def model_spec(self) -> dict:
        """What the model file says beyond encode/decode, read from its protobuf
        (sentencepiece_model.proto) without the protobuf library: `pieces` [(piece, score, type)]
        with type as the proto numbers it (1 normal, 2 unknown, 3 control, 4 user-defined,
        5 unused, 6 byte: GGUF's token types too), `model_type` ("unigram", "bpe", "word", "char"),
        and the normalizer: `normalizer` (its name: "identity" for Llama-2, "nmt_nfkc" by default),
        `precompiled_charsmap` (bytes), `add_dummy_prefix`, `remove_extra_whitespaces`."""
        model = self.sp.serialized_model_proto()
        pieces, trainer, normalizer = [], b"", b""
        for field, value in _proto_fields(model):
            if field == 1:  # repeated SentencePiece {1 piece, 2 score, 3 type}
                piece = {1: b"", 2: 0.0, 3: 1}
                piece.update(_proto_fields(value))
                pieces.append((piece[1].decode("utf-8"), piece[2], piece[3]))
            elif field == 2:
                trainer = value
            elif field == 3:
                normalizer = value
        # proto defaults where the field is absent: unigram, no charsmap, prefix and white-space removal on
        trainer_spec = {3: 1, **dict(_proto_fields(trainer))}
        norm = {1: b"", 2: b"", 3: 1, 4: 1, **dict(_proto_fields(normalizer))}
        return {"pieces": pieces, "model_type": {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(trainer_spec[3]),
                "normalizer": norm[1].decode("utf-8"), "precompiled_charsmap": norm[2],
                "add_dummy_prefix": bool(norm[3]), "remove_extra_whitespaces": bool(norm[4])}

    def bpe_vocab_and_merges(self) -> tuple[dict, list]:
        """Every piece -> its id, and the merges as (left, right) pairs in the order HF's Llama
        converter (transformers' generate_merges) lists them: every split of a normal piece into two
        normal pieces, by the joined piece's id (sentencepiece's BPE merges the best-scored piece
        first, and a BPE model's scores fall with the id), then by the parts' lengths and ids."""
        pieces = self.model_spec()["pieces"]
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        normal = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == 1}
        merges = []
        for piece, i in normal.items():
            local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                     if piece[:k] in normal and piece[k:] in normal]
            local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
            merges += [(i, len(left), len(right), left, right) for left, right in local]
        merges.sort(key=lambda m: m[:3])  # stable: equal keys keep the parts' id order
        return vocab, [(left, right) for *_, left, right in merges]


def _proto_fields(data: bytes):
    """(field number, value) of each field of a serialized protobuf message: varints as ints,
    32-bit fields as float, length-delimited ones as bytes (what sentencepiece's model holds)."""
    i, n = 0, len(data)

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            b = data[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, varint()
        elif wire == 2:
            size = varint()
            yield field, data[i:i + size]
            i += size
        elif wire == 5:
            yield field, struct.unpack_from("<f", data, i)[0]
            i += 4
        elif wire == 1:
            yield field, struct.unpack_from("<d", data, i)[0]
            i += 8
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")


register_tokenizer(SentencePieceTokenizer, fallback=True)
