"""HF `tokenizer.json` of the byte-level BPE kind Llama-3 ships, read into the same tiktoken
encoding Meta's tokenizer.model gives (llama/tokenizers/tiktoken_bpe.py).

What we read: model.type "BPE" (no dropout, unknown token, byte fallback or word affixes;
ignore_merges true), no normalizer, pre_tokenizer a Sequence of a Split on a Regex (isolated) and
a ByteLevel (use_regex false, no prefix space), decoder ByteLevel, added_tokens all special.
The vocabulary's strings are bytes through GPT-2's byte-to-unicode table; ids are tiktoken's ranks;
the Split pattern is tiktoken's pat_str. Anything else is refused with one line, rather than
tokenized differently from what the file means.

tiktoken merges the adjacent pair whose concatenation has the lowest id; HF merges the pair listed
first in `merges`. They agree when (checked in `check_merges`):
  1. every merge (a, b) joins two vocabulary tokens into a vocabulary token a+b;
  2. the merged tokens' ids never decrease along the list, so the list orders pairs as their ids do;
  3. every split of every token into two vocabulary tokens is listed, so HF can merge every pair
     tiktoken can (tiktoken merges any adjacent pair whose concatenation is a token).
What this leaves open is the order of different merges into the same token (" ab"+"c", " a"+"bc"):
tiktoken takes the leftmost, HF the first listed; they only differ when two such merges are
possible at once and overlap. HF's own tiktoken converter (transformers' TikTokenConverter, which
made Llama-3's tokenizer.json) lists them by the ranks of their parts; on Llama-3's vocabulary the
tests find no text where this differs (tests/llama/test_tokenizers.py).
Like the BPE, a whole pre-token that is itself a token is that token in both (ignore_merges).

Encoding follows Meta's reference, as the tokenizer.model kind does: the text is cut as Meta cuts
it (runs over 25,000 characters; HF does not cut, so its ids differ on such runs) and text that
looks like a special token is plain text (HF's default matches special tokens in the text).
"""
import json
from pathlib import Path

from llama.errors import LlamaInputError
from llama.tokenizers.base import register_tokenizer
from llama.tokenizers.tiktoken_bpe import TiktokenKind, byte_to_unicode


# byte-level string -> its bytes: str.translate each character to chr(byte), then latin-1
_TO_LATIN1 = {ord(c): b for b, c in byte_to_unicode().items()}
_BYTE_CHARS = frozenset(byte_to_unicode().values())


class HFJsonTokenizer(TiktokenKind):
    """HF tokenizer.json, byte-level BPE (Llama-3's)."""

    @classmethod
    def accepts(cls, head: bytes) -> bool:
        return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{")

    def __init__(self, model_path):
        path = Path(model_path)
        try:
            spec = json.loads(path.read_bytes())
        except OSError as e:
            raise LlamaInputError(f"{path}: cannot read the tokenizer ({e.strerror})") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise LlamaInputError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise LlamaInputError(f"{path}: not an HF tokenizer.json (no \"model\" object)")
        try:
            unsupported = unsupported_kind(spec)
        except (AttributeError, TypeError):  # a field of the wrong JSON type somewhere
            raise LlamaInputError(f"{path}: not an HF tokenizer.json we understand (a field has an unexpected "
                                  "type)") from None
        if unsupported:
            raise LlamaInputError(f"{path}: a tokenizer.json of kind {unsupported} is not supported (byte-level "
                                  "BPE as Llama-3 ships only); use the checkpoint's tokenizer.model")
        model = spec["model"]
        vocab, merges = model["vocab"], parse_merges(path, model["merges"])
        bad = next((s for s, i in vocab.items() if not s or not _BYTE_CHARS.issuperset(s) or not _is_id(i)), None)
        if bad is not None:
            raise LlamaInputError(f"{path}: vocabulary entry {bad!r} is not byte-level (GPT-2 byte-to-unicode) text "
                                  "with an id (an integer from 0)")
        check_merges(path, vocab, merges)
        ranks = {s.translate(_TO_LATIN1).encode("latin-1"): i for s, i in vocab.items()}
        if len(set(ranks.values())) != len(ranks):
            raise LlamaInputError(f"{path}: two vocabulary entries share an id")
        specials, ids = {}, set(ranks.values())
        for t in spec.get("added_tokens") or []:
            content, i = t.get("content"), t.get("id")
            if not isinstance(content, str) or not _is_id(i) or content in specials or content in vocab or i in ids:
                raise LlamaInputError(f"{path}: added token {content!r} (id {i}) repeats a token or an id, "
                                      "or is not text with an id")
            specials[content] = i
            ids.add(i)
        n_words = max([*vocab.values(), *specials.values()]) + 1
        self._setup(path, ranks, specials, spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"], n_words)


def _is_id(i) -> bool:
    return type(i) is int and 0 <= i < 2 ** 31


def unsupported_kind(spec: dict):
    """A short description of what makes `spec` other than Llama-3's byte-level BPE, or None."""
    model = spec["model"]
    if model.get("type") != "BPE":
        return f"model {model.get('type')!r}"
    if model.get("byte_fallback") or model.get("unk_token") is not None:
        return "BPE with byte fallback / unknown token (sentencepiece-style)"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE with dropout or word prefixes/suffixes"
    if not model.get("ignore_merges"):
        return "BPE without ignore_merges (HF splits whole-token words that Meta keeps)"
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        return "BPE without a vocab object and a merges list"
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer != {"type": "Sequence", "normalizers": []}:
        return f"with a normalizer ({normalizer.get('type') if isinstance(normalizer, dict) else normalizer!r})"
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") if isinstance(s, dict) else None for s in steps or []]
    if types != ["Split", "ByteLevel"]:
        return f"pre-tokenizer {'+'.join(map(str, types)) or 'none'}"
    split, byte_level = steps
    if not isinstance(split.get("pattern"), dict) or not isinstance(split["pattern"].get("Regex"), str) \
            or split.get("behavior") != "Isolated" or split.get("invert"):
        return "pre-tokenizer Split other than an isolating Regex"
    if byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return "pre-tokenizer ByteLevel with its own regex or a prefix space"
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        return f"decoder {decoder.get('type')!r}"
    added = [t for t in spec.get("added_tokens") or [] if not (isinstance(t, dict) and t.get("special"))]
    if added:  # HF finds these in the text; we would encode them as text
        first = added[0].get("content") if isinstance(added[0], dict) else added[0]
        return f"added tokens that are not special ({first!r})"
    return None


def parse_merges(path: Path, merges: list) -> list:
    """Merges as (a, b) pairs: HF writes "a b" (older files) or ["a", "b"]."""
    pairs = []
    for i, m in enumerate(merges):
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)):
            raise LlamaInputError(f"{path}: merge {i} ({str(m)[:40]!r}) is not a pair of tokens")
        pairs.append(tuple(pair))
    return pairs


def check_merges(path: Path, vocab: dict, merges: list) -> None:
    """Refuse merges that tiktoken (merging by the merged token's id) would not follow: see the
    module docstring for the three rules."""
    previous = -1
    for i, (a, b) in enumerate(merges):
        merged = vocab.get(a + b)
        if a not in vocab or b not in vocab or merged is None:
            raise LlamaInputError(f"{path}: merge {i} ({a!r} + {b!r}) joins or makes a token not in the vocabulary")
        if merged < previous:
            raise LlamaInputError(f"{path}: merge {i} ({a!r} + {b!r}) makes id {merged} after a merge that made id "
                                  f"{previous}: the merges are not in id order, so tiktoken would merge differently")
        previous = merged
    listed = set(merges)
    if len(listed) != len(merges):
        raise LlamaInputError(f"{path}: a merge is listed twice")
    # every listed merge is a split of a token into two tokens (rule 1), so equal counts: all are listed
    splits = sum(1 for s in vocab for k in range(1, len(s)) if s[:k] in vocab and s[k:] in vocab)
    if splits != len(listed):
        missing = next((s[:k], s[k:]) for s in vocab for k in range(1, len(s))
                       if s[:k] in vocab and s[k:] in vocab and (s[:k], s[k:]) not in listed)
        raise LlamaInputError(f"{path}: merge {missing[0]!r} + {missing[1]!r} is not listed though both parts and "
                              "their join are tokens; tiktoken would merge it and HF would not")


register_tokenizer(HFJsonTokenizer)
