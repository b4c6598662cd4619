"""Meta's Llama-3 `tokenizer.model`: tiktoken's format (one `base64-token rank` line per token),
Meta's split pattern and 256 special tokens after the ranks, encoded exactly as Meta's reference
tokenizer (llama_models/llama3/tokenizer.py) encodes.

The BPE itself is the `tiktoken` library's, as in Meta's reference. `TiktokenKind` holds what the
tiktoken-backed kinds share (this one and HF's byte-level tokenizer.json, llama/tokenizers/hf_json.py):
Meta's encode (the text cut into pieces as Meta cuts it, special-token text encoded as plain text),
tiktoken's decode and the special-token ids.
"""
import base64
import binascii
import re
from pathlib import Path

import tiktoken

from llama.errors import LlamaInputError
from llama.tokenizers.base import Tokenizer, register_tokenizer

# Meta's split pattern (llama_models/llama3/tokenizer.py, `pat_str`)
META_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Meta encodes the text in chunks of at most this many characters (tiktoken's limit) ...
MAX_ENCODE_CHARS = 400_000
# ... each cut again after every this many consecutive white-space / non-white-space characters
# (tiktoken is slow on long runs, github.com/openai/tiktoken/issues/195). The cuts change the ids
# of such runs, so they are part of what Meta's ids are.
MAX_RUN_CHARS = 25_000
# a run longer than MAX_RUN_CHARS, found from its first character (the lookbehinds keep the search
# linear). Python's `\s` is exactly str.isspace, which Meta's cutter tests.
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))

N_SPECIAL = 256
# Meta's special tokens, in Meta's order: ids n_ranks, n_ranks + 1, ...
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(N_SPECIAL - len(LLAMA3_SPECIALS))]
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
STOPS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")  # what ends a generation


def meta_pieces(text: str):
    """The pieces Meta's encode cuts `text` into (chunks of MAX_ENCODE_CHARS, then runs of at most
    MAX_RUN_CHARS, as Meta's `_split_whitespaces_or_nonwhitespaces`): a run of n same-kind
    characters starting at s is cut at s + MAX_RUN_CHARS, s + 2 * MAX_RUN_CHARS, ... < s + n."""
    for i in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[i:i + MAX_ENCODE_CHARS]
        start = 0
        for run in _LONG_RUN.finditer(chunk):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


def byte_to_unicode() -> dict:
    """GPT-2's table (HF's ByteLevel): printable Latin-1 bytes map to themselves, the other 68 to
    U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


class TiktokenKind(Tokenizer):
    """A tiktoken Encoding behind our interface; a kind sets it up with `_setup`."""

    def _setup(self, path: Path, ranks: dict, specials: dict, pat_str: str, n_words: int) -> None:
        """ranks: bytes -> id; specials: text -> id (must hold BOS and EOS)."""
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:  # tiktoken starts every piece from its bytes; without one it cannot encode
            raise LlamaInputError(f"{path}: no token for byte 0x{missing[0]:02x} ({len(missing)} bytes missing); "
                                  "not a byte-level BPE vocabulary")
        for name in (BOS, EOS):
            if name not in specials:
                raise LlamaInputError(f"{path}: no {name} special token; not a Llama-3 tokenizer")
        try:
            self.model = tiktoken.Encoding(path.name, pat_str=pat_str, mergeable_ranks=ranks,
                                           special_tokens=specials)
        except ValueError as e:  # e.g. a split pattern tiktoken's regex engine does not compile
            raise LlamaInputError(f"{path}: tiktoken cannot use this vocabulary ({str(e).splitlines()[0]})") from None
        self.path = path
        self.specials = dict(specials)
        self.n_words = n_words
        self.bos_id = specials[BOS]
        self.eos_id = specials[EOS]
        self.pad_id = specials.get(PAD, self.eos_id)
        self.stop_ids = frozenset(specials[s] for s in STOPS if s in specials)
        self.chat_format = "llama3" if "<|start_header_id|>" in specials else "llama2"

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        # encode_ordinary: text that looks like a special token is plain text (Meta's default too)
        ids = [i for piece in meta_pieces(text) for i in self.model.encode_ordinary(piece)]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        # a partial UTF-8 character decodes to U+FFFD, which StreamDecoder holds back
        return self.model.decode(list(ids), errors="replace")

    def special_id(self, text: str):
        return self.specials.get(text)

    # --- the vocabulary as HF and llama.cpp write it, for the exporters (llama/export) ---------

    def split_pattern(self) -> str:
        """The regular expression the text is cut with before BPE (Meta's for Llama-3)."""
        return self.model._pat_str

    def bpe_vocab_and_merges(self) -> tuple[dict, list]:
        """The ranks as byte-level strings (GPT-2's byte-to-unicode, as HF's tokenizer.json and
        GGUF write tokens) -> id, and the merges as (left, right) pairs of such strings, listed as
        HF's tiktoken converter (transformers' TikTokenConverter) lists them: every split of a token
        into two tokens, by the joined token's rank, then by the ranks of the parts. A merge-list BPE
        (HF's, llama.cpp's) then merges as tiktoken does (llama/tokenizers/hf_json.py says when not)."""
        ranks = {b: self.model.encode_single_token(b) for b in self.model.token_byte_values()}
        to_text = str.maketrans({chr(b): c for b, c in byte_to_unicode().items()})

        def text(token: bytes) -> str:
            return token.decode("latin-1").translate(to_text)

        merges = []
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
            local.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
            merges += local
        return ({text(b): r for b, r in sorted(ranks.items(), key=lambda kv: kv[1])},
                [(text(left), text(right)) for left, right in merges])


# the first line of a tiktoken file: base64, one space, a rank
_FIRST_LINE = re.compile(rb"\s*[A-Za-z0-9+/=]+ [0-9]+\r?(\n|$)")


class TiktokenTokenizer(TiktokenKind):
    """Meta's Llama-3 tokenizer.model."""

    @classmethod
    def accepts(cls, head: bytes) -> bool:
        return _FIRST_LINE.match(head) is not None

    def __init__(self, model_path):
        path = Path(model_path)
        ranks = load_ranks(path)
        specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
        self._setup(path, ranks, specials, META_PAT, n_words=len(ranks) + N_SPECIAL)


def load_ranks(path: Path) -> dict:
    """bytes -> rank from `base64-token rank` lines (blank lines skipped, as Meta's reader does);
    the ranks must be 0 .. n-1, each once. A file laid out exactly as Meta writes it is read in a
    few C calls (a tenth of a second for Meta's 128,000 lines); any other, or one whose tokens or
    ranks are wrong, is read line by line to say which line is wrong."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LlamaInputError(f"{path}: cannot read the tokenizer ({e.strerror})") from None
    if _META_LAYOUT.fullmatch(data):  # every line `token rank`: split() pairs them up
        fields = data.split()
        try:
            ranks = {base64.b64decode(tok, validate=True): int(rank) for tok, rank in zip(fields[::2], fields[1::2])}
        except (ValueError, binascii.Error):
            ranks = {}
        if len(ranks) * 2 == len(fields) and set(ranks.values()) == set(range(len(ranks))) and ranks:
            return ranks
    return _load_ranks_checked(path, data.splitlines())


_META_LAYOUT = re.compile(rb"(?:[A-Za-z0-9+/=]+ [0-9]+\r?\n)*(?:[A-Za-z0-9+/=]+ [0-9]+\r?)?")


def _load_ranks_checked(path: Path, lines: list) -> dict:
    ranks: dict = {}
    line_of_rank: dict = {}
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}: line {number}"
        if len(fields) != 2:
            raise LlamaInputError(f"{where}: expected `base64-token rank`, got {len(fields)} fields")
        tok, rank_text = fields
        try:
            token = base64.b64decode(tok, validate=True)
        except (ValueError, binascii.Error):
            raise LlamaInputError(f"{where}: bad base64 token {tok[:40].decode('ascii', 'replace')!r}") from None
        try:
            rank = int(rank_text)
        except ValueError:
            raise LlamaInputError(f"{where}: rank {rank_text[:40].decode('ascii', 'replace')!r} "
                                  "is not an integer") from None
        if rank in line_of_rank:
            raise LlamaInputError(f"{where}: duplicate rank {rank} (also on line {line_of_rank[rank]})")
        if token in ranks:
            raise LlamaInputError(f"{where}: duplicate token {tok.decode('ascii')!r} "
                                  f"(also on line {line_of_rank[ranks[token]]})")
        ranks[token] = rank
        line_of_rank[rank] = number
    n = len(ranks)
    if n == 0:
        raise LlamaInputError(f"{path}: no tokens")
    for rank, number in line_of_rank.items():
        if not 0 <= rank < n:
            raise LlamaInputError(f"{path}: line {number}: rank {rank} out of range; the {n} ranks must be 0..{n - 1}")
    return ranks


register_tokenizer(TiktokenTokenizer)
