"""Llama-3 tokenizers: Meta's tiktoken `tokenizer.model` and HF's byte-level `tokenizer.json`,
chosen by content, against independent references.

References: a tiktoken.Encoding built here from Meta's pattern and special-token list (transcribed
from llama_models/llama3/tokenizer.py), with Meta's cutting of the text transcribed below; Meta's
own tokenizer (llama-models) when installed, on the tiny vocabulary and on the real Llama-3 one;
HF's `tokenizers` library on tokenizer.json files made by transformers' own tiktoken converter.
"""
import json
import random
import time
from pathlib import Path

import pytest
import tiktoken

from llama.errors import LlamaInputError
from llama.tokenizers import HFJsonTokenizer, TiktokenTokenizer, Tokenizer, find_tokenizer
from tests.utils import META_PAT, SPECIALS, convert_to_hf_json, tiny_tiktoken, write_tiktoken_file

# Meta's special tokens, in Meta's order, transcribed from llama_models/llama3/tokenizer.py
def meta_cut(s: str, limit: int = 25_000):
    """Meta's _split_whitespaces_or_nonwhitespaces, transcribed as written (character by character)."""
    run, is_space, start = 0, s[0].isspace() if s else False, 0
    for i in range(len(s)):
        now = s[i].isspace()
        if is_space ^ now:
            run, is_space = 1, now
        else:
            run += 1
            if run > limit:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


def meta_encode(enc: tiktoken.Encoding, s: str) -> list[int]:
    """Meta's encode without bos/eos: 400,000-character chunks, each cut by meta_cut, specials as text."""
    return [t for i in range(0, len(s), 400_000) for piece in meta_cut(s[i:i + 400_000])
            for t in enc.encode(piece, allowed_special=set(), disallowed_special=())]


# texts whose encoding has gone wrong somewhere: long runs (Meta cuts them), CJK, emoji, CRLF,
# special-token text (plain text), contractions (case-insensitive), digit groups, unicode spaces
SHORT_TEXTS = [
    "",
    "Hello world! What is 12 plus 34? The answer is 46.",
    "日本語のテキストです。中文文本，한국어 텍스트",
    "😀👍🏽👨‍👩‍👧 emoji😀😀 ok",
    "line one\r\nline two\r\n\r\n    indented\ttab\n\n\n",
    "<|eot_id|>",
    "<|begin_of_text|>Hi there<|eot_id|><|start_header_id|>user<|end_header_id|>",
    "DON'T I'LL we've they'RE it's IT'SALL WE'VEGOT I'MOK I'LLSEE they'REready",
    "1234567 3.14159 2024-01-01",
    "a\u00a0b\u3000c\u2028d\u0085e  \u200b f",
    "   leading and trailing   ",
]
LONG_TEXTS = {  # name -> text; each needs Meta's cuts (checked in test_long_texts_need_the_cuts)
    "newlines_25001": "\n" * 25_001,
    "nonspace_run_30000": "The" * 10_000 + " " + "\u3000" * 25_001,
    "chunk_400000": "x" + " The" * 105_000,
}
OTHER_LONG = {  # long runs the cuts happen not to change with the tiny vocabulary (they do with Llama-3's)
    "spaces_25001": " " * 25_001,
    "spaces_30000": " " * 30_000,
    "newlines_30000": "\n" * 30_000,
    "mixed_ws": " \n\t" * 12_000,
    "unicode_space_between": "The" * 5_000 + "\u3000\u3000" + "The" * 5_000,
}
ALL_TEXTS = SHORT_TEXTS + list(LONG_TEXTS.values()) + list(OTHER_LONG.values())


def longest_run(s: str) -> int:
    best = run = 0
    for i, c in enumerate(s):
        run = run + 1 if i and c.isspace() == s[i - 1].isspace() else 1
        best = max(best, run)
    return best


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, ranks, reference Encoding) of a tiny tiktoken vocabulary trained here."""
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    ranks = tiny_tiktoken(path)
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIALS)}
    ref = tiktoken.Encoding("reference", pat_str=META_PAT, mergeable_ranks=ranks, special_tokens=specials)
    return path, ranks, ref


@pytest.fixture(scope="module")
def tiny_tok(tiny):
    return Tokenizer(tiny[0])


# --- Meta's tiktoken tokenizer.model, tiny vocabulary ------------------------------------------


@pytest.mark.parametrize("text", ALL_TEXTS, ids=lambda t: repr(t[:12]))
def test_encode_equals_meta_reference(tiny, tiny_tok, text):
    _, _, ref = tiny
    assert isinstance(tiny_tok, TiktokenTokenizer)
    want = meta_encode(ref, text)
    assert tiny_tok.encode(text, bos=False, eos=False) == want
    assert tiny_tok.encode(text, bos=True, eos=True) == [ref.encode_single_token("<|begin_of_text|>"), *want,
                                                         ref.encode_single_token("<|end_of_text|>")]
    assert tiny_tok.decode(want) == text  # byte-level BPE: every text comes back


def test_long_texts_need_the_cuts(tiny):
    """The long texts above would catch an encoder that does not cut as Meta does."""
    _, _, ref = tiny
    for name, text in LONG_TEXTS.items():
        assert meta_encode(ref, text) != ref.encode_ordinary(text), name
    assert longest_run(OTHER_LONG["unicode_space_between"]) == 15_000  # U+3000 is white space


def test_bos_eos_flags(tiny_tok):
    ids = tiny_tok.encode("The cat", bos=False, eos=False)
    assert tiny_tok.encode("The cat", bos=True, eos=False) == [tiny_tok.bos_id, *ids]
    assert tiny_tok.encode("The cat", bos=False, eos=True) == [*ids, tiny_tok.eos_id]
    assert tiny_tok.encode("", bos=True, eos=True) == [tiny_tok.bos_id, tiny_tok.eos_id]


@pytest.mark.parametrize("text", ["<|eot_id|>", "<|begin_of_text|>Hi<|eot_id|>", "x<|end_of_text|>y"])
def test_special_token_text_is_plain_text(tiny, tiny_tok, text):
    _, ranks, ref = tiny
    ids = tiny_tok.encode(text, bos=False, eos=False)
    assert ids == ref.encode_ordinary(text)
    assert max(ids) < len(ranks)  # no special ids
    assert ids != ref.encode(text, allowed_special="all")  # parsing specials would give other ids


def test_ids_follow_metas_special_list(tiny, tiny_tok):
    _, ranks, _ = tiny
    n = len(ranks)
    tok = tiny_tok
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (n + 256, n, n + 1, n + 4)
    assert tok.stop_ids == frozenset({n + 1, n + 8, n + 9})
    assert tok.chat_format == "llama3"
    for i, name in enumerate(SPECIALS):
        assert tok.special_id(name) == n + i
        assert tok.decode([n + i]) == name
    assert tok.special_id("<|reserved_special_token_246|>") is None and tok.special_id("hello") is None


def test_partial_character_decodes_to_replacement(tiny_tok):
    ids = tiny_tok.encode("🦙", bos=False, eos=False)
    assert len(ids) > 1  # the tiny vocabulary splits it into byte pieces
    assert tiny_tok.decode(ids[:1]) == "\ufffd" and tiny_tok.decode(ids) == "🦙"


def test_same_as_metas_own_tokenizer_on_tiny_vocab(tiny):
    """Checks the references above (pattern, special list, cutting) against Meta's code itself."""
    mt = pytest.importorskip("llama_models.llama3.tokenizer")
    path, ranks, ref = tiny
    assert mt.Tokenizer.pat_str == META_PAT
    meta = mt.Tokenizer(Path(path))
    assert meta.special_tokens == {s: len(ranks) + i for i, s in enumerate(SPECIALS)}
    for text in ALL_TEXTS:
        assert meta.encode(text, bos=False, eos=False) == meta_encode(ref, text), repr(text[:12])


# --- streaming -----------------------------------------------------------------------------


def assert_streams_whole_characters(tok, text="日本語 😀👍🏽 done 👨‍👩‍👧!"):
    context = tok.encode("Say:", bos=True, eos=False)
    ids = tok.encode(text, bos=False, eos=False)
    stream = tok.stream(context)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some token ended inside a character and was held back


def test_stream_yields_whole_characters(tiny_tok):
    assert_streams_whole_characters(tiny_tok)


# --- the kind comes from the content ---------------------------------------------------------


@pytest.mark.parametrize("name", ["tokenizer.json", "foo.bin", "tokenizer.model"])
def test_tiktoken_file_under_any_name(tiny, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(tiny[0].read_bytes())
    tok = Tokenizer(path)
    assert isinstance(tok, TiktokenTokenizer) and tok.path == path
    assert tok.encode("The cat", bos=False, eos=False) == tiny[2].encode_ordinary("The cat")


def assert_one_line_error(path, match: str = ""):
    with pytest.raises(LlamaInputError) as e:
        Tokenizer(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    assert match in msg, msg
    return msg


def test_unknown_file_names_the_kinds_we_read(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x00\x01" + random.Random(0).randbytes(4000))
    msg = assert_one_line_error(path, "not a tokenizer we read")
    assert "sentencepiece" in msg and "tiktoken" in msg and "tokenizer.json" in msg
    text = tmp_path / "notes.txt"
    text.write_text("hello world\nsecond line\n")
    assert_one_line_error(text, "not a tokenizer we read")


def tiny_lines(tiny) -> list[str]:
    return tiny[0].read_text().splitlines()


@pytest.mark.parametrize("case", ["bad_base64", "not_integer", "duplicate_rank", "duplicate_token", "rank_gap",
                                  "three_fields"])
def test_bad_tiktoken_file_names_the_line(tiny, tmp_path, case):
    lines = tiny_lines(tiny)
    tok3, rank3 = lines[2].split()
    if case == "bad_base64":
        lines[2] = f"{tok3[:-1]}! {rank3}"
    elif case == "not_integer":
        lines[2] = f"{tok3} {rank3}.0"
    elif case == "duplicate_rank":
        lines[2] = f"{tok3} {lines[0].split()[1]}"
    elif case == "duplicate_token":
        lines[2] = f"{lines[0].split()[0]} {rank3}"
    elif case == "rank_gap":
        lines[2] = f"{tok3} {len(lines) + 7}"
    else:
        lines[2] = f"{tok3} {rank3} 5"
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    assert_one_line_error(path, "line 3")


def test_missing_byte_is_refused(tiny, tmp_path):
    _, ranks, _ = tiny
    kept = [t for t in sorted(ranks, key=ranks.get) if t != b"\x00"]
    path = tmp_path / "tokenizer.model"
    write_tiktoken_file(path, {t: i for i, t in enumerate(kept)})
    assert_one_line_error(path, "0x00")


def test_blank_lines_are_skipped_as_meta_does(tiny, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(tiny_lines(tiny)).replace("\n", "\n\n", 3) + "\n\n")
    tok = Tokenizer(path)
    assert tok.encode(SHORT_TEXTS[1], bos=False, eos=False) == tiny[2].encode_ordinary(SHORT_TEXTS[1])


# --- HF tokenizer.json ---------------------------------------------------------------------


def hf_reference(path):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(path))
    hf.encode_special_tokens = True  # special-token text as plain text, as Meta encodes it
    return hf


def hf_comparable(text: str) -> bool:
    """HF encodes the text whole; Meta cuts runs over 25,000 characters (our ids follow Meta's)."""
    return longest_run(text) <= 25_000 and len(text) <= 400_000


@pytest.fixture(scope="module")
def tiny_json(tiny, tmp_path_factory):
    return convert_to_hf_json(tiny[0], tmp_path_factory.mktemp("hf") / "tokenizer.json")


def test_hf_json_equals_hf_and_tiktoken_kind(tiny_json, tiny_tok):
    tok, hf = Tokenizer(tiny_json), hf_reference(tiny_json)
    assert isinstance(tok, HFJsonTokenizer)
    for text in ALL_TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == tiny_tok.encode(text, bos=False, eos=False), repr(text[:12])
        if hf_comparable(text):
            assert ids == hf.encode(text, add_special_tokens=False).ids, repr(text[:12])
            assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("hi", bos=True, eos=True) == tiny_tok.encode("hi", bos=True, eos=True)
    for name in ("n_words", "bos_id", "eos_id", "pad_id", "stop_ids", "chat_format"):
        assert getattr(tok, name) == getattr(tiny_tok, name), name
    assert [tok.special_id(s) for s in SPECIALS] == [hf.token_to_id(s) for s in SPECIALS]
    assert tok.n_words == hf.get_vocab_size(with_added_tokens=True)
    assert_streams_whole_characters(tok)


def test_hf_json_with_string_merges_and_no_pad(tiny_json, tiny, tmp_path):
    """Older files write merges as "a b"; a file without <|finetune_right_pad_id|> pads with eos;
    without <|eom_id|> it stops on the others."""
    spec = json.loads(tiny_json.read_text())
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in ("<|finetune_right_pad_id|>",
                                                                                    "<|eom_id|>")]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    tok, hf = Tokenizer(path), hf_reference(path)
    n = len(tiny[1])
    assert (tok.pad_id, tok.stop_ids, tok.n_words) == (tok.eos_id, frozenset({n + 1, n + 9}), n + 256)
    assert tok.encode(SHORT_TEXTS[2], bos=False, eos=False) == hf.encode(SHORT_TEXTS[2], add_special_tokens=False).ids


def test_hf_json_opened_by_content(tiny_json, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n  " + tiny_json.read_bytes())
    assert isinstance(Tokenizer(path), HFJsonTokenizer)


def swap_first_out_of_order(spec):
    merges, vocab = spec["model"]["merges"], spec["model"]["vocab"]
    i = next(i for i in range(len(merges) - 1) if vocab["".join(merges[i])] != vocab["".join(merges[i + 1])])
    merges[i], merges[i + 1] = merges[i + 1], merges[i]


def drop_a_merge(spec):
    del spec["model"]["merges"][len(spec["model"]["merges"]) // 2]


def set_path(spec, keys, value):
    for k in keys[:-1]:
        spec = spec[k]
    spec[keys[-1]] = value


BAD_JSON = {  # name -> (edit of the tiny tokenizer.json, words the message has)
    "byte_fallback": (lambda s: set_path(s, ["model", "byte_fallback"], True), "byte fallback"),
    "metaspace": (lambda s: set_path(s, ["pre_tokenizer"], {"type": "Metaspace", "replacement": "▁",
                                                            "prepend_scheme": "first", "split": False}), "Metaspace"),
    "normalizer": (lambda s: set_path(s, ["normalizer"], {"type": "NFC"}), "normalizer"),
    "no_ignore_merges": (lambda s: set_path(s, ["model", "ignore_merges"], False), "ignore_merges"),
    "merges_out_of_order": (swap_first_out_of_order, "not in id order"),
    "merge_missing": (drop_a_merge, "not listed"),
    "non_special_added": (lambda s: s["added_tokens"].append({"id": 9999, "content": "<extra>", "special": False,
                                                              "single_word": False, "lstrip": False, "rstrip": False,
                                                              "normalized": False}), "not special"),
}


@pytest.mark.parametrize("case", BAD_JSON)
def test_unsupported_hf_json_is_refused(tiny_json, tmp_path, case):
    edit, words = BAD_JSON[case]
    spec = json.loads(tiny_json.read_text())
    edit(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    assert_one_line_error(path, words)


def test_wordpiece_and_broken_json_are_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordPiece

    path = tmp_path / "tokenizer.json"
    HFTokenizer(WordPiece({"[UNK]": 0, "the": 1, "##s": 2}, unk_token="[UNK]")).save(str(path))
    msg = assert_one_line_error(path, "WordPiece")
    assert "tokenizer.model" in msg  # what to use instead
    path.write_text('{"model": {"type": "BPE", ')
    assert_one_line_error(path, "JSON")


# --- finding the tokenizer in a checkpoint folder --------------------------------------------


def test_find_tokenizer_prefers_tokenizer_model(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(LlamaInputError):
        find_tokenizer(ckpt)
    (ckpt / "tokenizer.json").write_text("{}")
    assert find_tokenizer(ckpt) == ckpt / "tokenizer.json"
    (tmp_path / "tokenizer.model").write_text("")
    assert find_tokenizer(ckpt) == tmp_path / "tokenizer.model"  # Meta's layout: one folder up
    (ckpt / "tokenizer.model").write_text("")
    assert find_tokenizer(ckpt) == ckpt / "tokenizer.model"


# --- the real Llama-3 tokenizer (llama-models ships it) --------------------------------------


def real_path() -> Path:
    """Meta's Llama-3 tokenizer.model, shipped with llama-models (the test skips without it)."""
    mt = pytest.importorskip("llama_models.llama3.tokenizer")
    return Path(mt.__file__).parent / "tokenizer.model"


@pytest.fixture(scope="module")
def real():
    """(Meta's tokenizer, ours) on Meta's Llama-3 tokenizer.model."""
    path = real_path()
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(path), Tokenizer(path)


@pytest.fixture(scope="module")
def real_json(real, tmp_path_factory):
    return convert_to_hf_json(real_path(), tmp_path_factory.mktemp("hf_real") / "tokenizer.json")


def test_real_llama3_equals_meta(real):
    meta, ours = real
    assert isinstance(ours, TiktokenTokenizer)
    assert (ours.n_words, ours.bos_id, ours.eos_id, ours.pad_id) == (128256, 128000, 128001, 128004)
    assert ours.stop_ids == frozenset({128001, 128008, 128009}) == frozenset(meta.stop_tokens)
    assert ours.special_id("<|eot_id|>") == meta.special_tokens["<|eot_id|>"] == 128009
    long_ws = {" " * 30_000, "\n" * 30_000, " \n\t" * 12_000}
    for text in ALL_TEXTS:
        want = meta.encode(text, bos=True, eos=True)
        assert ours.encode(text, bos=True, eos=True) == want, repr(text[:12])
        assert ours.decode(want) == meta.decode(want)
        if text in long_ws:  # the cuts matter here with Llama-3's vocabulary
            assert want[1:-1] != meta.model.encode_ordinary(text)
    assert_streams_whole_characters(ours)


def test_real_llama3_loads_fast():
    path = real_path()
    start = time.perf_counter()
    Tokenizer(path)
    assert time.perf_counter() - start < 1.0  # about 0.2 s; Meta's own reader takes as long


def test_real_hf_json_equals_hf_and_meta(real, real_json):
    """Llama-3's tokenizer.json as transformers makes it: ours equals HF's tokenizers and Meta's ids.
    Also the texts where HF's merge order and tiktoken's could disagree: two different merges into
    the same token that overlap (x+y == y+z) and that HF lists right one first."""
    meta, _ = real
    tok, hf = Tokenizer(real_json), hf_reference(real_json)
    assert isinstance(tok, HFJsonTokenizer)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.chat_format) == (
        128256, 128000, 128001, 128004, frozenset({128001, 128008, 128009}), "llama3")
    for text in ALL_TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == meta.encode(text, bos=False, eos=False), repr(text[:12])
        if hf_comparable(text):
            assert ids == hf.encode(text, add_special_tokens=False).ids, repr(text[:12])
    spec = json.loads(real_json.read_text())
    merges = [tuple(m) for m in spec["model"]["merges"]]
    by_token: dict = {}
    for index, (a, b) in enumerate(merges):
        by_token.setdefault(a + b, []).append((index, a, b))
    decode = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
    texts = []
    for group in by_token.values():
        for i, x, y in group:
            for j, y2, z in group:
                if y2 == y and j < i:  # (y, z) listed before (x, y): HF prefers the right one
                    texts.append(bytes(decode[c] for c in x + y + z).decode("utf-8", "replace"))
    assert len(texts) > 1000
    hf.encode_special_tokens = True
    want = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert [tok.encode(t, bos=False, eos=False) for t in texts] == want


def _gpt2_bytes_to_unicode() -> dict:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()
