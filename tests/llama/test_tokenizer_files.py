"""The tokenizer files of an exported HF folder (llama/export/tokenizer_files.py): transformers'
AutoTokenizer on the folder gives our ids (without special tokens, and with bos) on hard texts and
on random ones, for a tiny Llama-3 tiktoken vocabulary and for sentencepiece models (one that
normalizes as sentencepiece does by default, one with Llama-2's identity normalizer), its chat
template renders our chat format, and our own tokenizer reads the written tokenizer.json back."""
import json
import random

import pytest
import sentencepiece as spm

from llama.chat import encode_dialog
from llama.export.tokenizer_files import write_hf_tokenizer
from llama.tiny import corpus
from llama.tokenizers import HFJsonTokenizer, Tokenizer
from tests.utils import convert_to_hf_json, tiny_tiktoken

transformers = pytest.importorskip("transformers")

# white-space runs, CRLF, tabs, CJK and emoji (bytes for a tiny vocabulary), NFKC-changed letters,
# unicode spaces, contractions, digit groups, leading/trailing spaces, empty and blank text
HARD = ["Hello world! What is 12 plus 34?", "  two  spaces  ", "line one\r\nline two\r\n\r\n    indented\ttab\n\n",
        "日本語のテキスト 中文 한국어 😀👍🏽👨‍👩‍👧", "ｆｕｌｌ ﬁ ① Ａ ½ é vs e\u0301", "a\u00a0b\u3000c\u2028d \u200b e",
        "DON'T I'LL we've IT'SALL", "1234567 3.14159", " leading", "trailing ", "", " ", "\n"]
# characters to draw random texts from (no "<": HF finds special-token text in the text, we never do)
POOL = list("abcdeTHE xyz  \t\n\r.,!?'0123456789") + ["日", "本", "😀", "ｆ", "ﬁ", "\u00a0", "\u3000", "é", "–"]
DIALOG = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "What is the red cat?\n"},
          {"role": "assistant", "content": " A cat."}, {"role": "user", "content": "And 12 plus 30?"}]


def texts(n: int = 300) -> list[str]:
    rng = random.Random(0)
    return HARD + ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def assert_same_ids(hf, tok, sample) -> None:
    for text in sample:
        want = tok.encode(text, bos=False, eos=False)
        assert hf.encode(text, add_special_tokens=False) == want, repr(text)
        assert hf.encode(text) == [tok.bos_id] + want, repr(text)


def rendered(hf, dialog) -> list[int]:
    out = hf.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    tiny_tiktoken(path)
    return path


@pytest.fixture(scope="module")
def tiktoken_folder(tiktoken_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tiktoken")
    files = write_hf_tokenizer(Tokenizer(tiktoken_path), d, model_max_length=8192)
    assert sorted(p.name for p in files) == ["tokenizer.json", "tokenizer_config.json"]
    return d


def test_tiktoken_folder_gives_our_ids_and_chat(tiktoken_path, tiktoken_folder):
    tok, hf = Tokenizer(tiktoken_path), transformers.AutoTokenizer.from_pretrained(tiktoken_folder)
    assert_same_ids(hf, tok, texts())
    assert (hf.bos_token, hf.eos_token, hf.model_max_length) == ("<|begin_of_text|>", "<|end_of_text|>", 8192)
    for text in HARD:
        assert hf.decode(tok.encode(text, bos=False, eos=False)) == text
    assert rendered(hf, DIALOG) == encode_dialog(tok, DIALOG)


def test_tiktoken_merges_are_transformers_converters(tiktoken_path, tiktoken_folder, tmp_path):
    """The vocabulary and merges, in order, are what transformers' TikTokenConverter makes."""
    ours = json.loads((tiktoken_folder / "tokenizer.json").read_text())["model"]
    theirs = json.loads(convert_to_hf_json(tiktoken_path, tmp_path / "tokenizer.json").read_text())["model"]
    assert ours["vocab"] == theirs["vocab"]
    assert [tuple(m) for m in ours["merges"]] == [tuple(m.split(" ") if isinstance(m, str) else m)
                                                  for m in theirs["merges"]]
    assert ours["ignore_merges"] is True


def test_our_tokenizer_reads_the_json_back(tiktoken_path, tiktoken_folder):
    tok, back = Tokenizer(tiktoken_path), Tokenizer(tiktoken_folder / "tokenizer.json")
    assert isinstance(back, HFJsonTokenizer)
    for text in texts():
        assert back.encode(text, bos=True, eos=True) == tok.encode(text, bos=True, eos=True), repr(text)
    for name in ("n_words", "bos_id", "eos_id", "pad_id", "stop_ids", "chat_format", "specials"):
        assert getattr(back, name) == getattr(tok, name), name


def test_sentencepiece_folder_gives_our_ids(tokenizer_path, tmp_path):
    """The session's tokenizer normalizes (nmt_nfkc, white space collapsed) as sentencepiece
    does by default; the json carries that normalization."""
    tok = Tokenizer(tokenizer_path)
    files = write_hf_tokenizer(tok, tmp_path)
    assert sorted(p.name for p in files) == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert (tmp_path / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert_same_ids(hf, tok, texts())
    # the normalization is in play: without it HF would keep the spaces and the full-width letters
    assert tok.encode("  two  spaces ", False, False) == tok.encode("two spaces", False, False)
    assert tok.encode("ｆｕｌｌ", False, False) == tok.encode("full", False, False)
    assert rendered(hf, DIALOG) == encode_dialog(tok, DIALOG)


@pytest.fixture(scope="module")
def llama2_style(tmp_path_factory):
    """A sentencepiece BPE model with Llama-2's settings: identity normalizer, white space kept
    (and white-space pieces allowed), digits split, byte fallback, unk 0, bos 1, eos 2."""
    path = tmp_path_factory.mktemp("sp_identity") / "tokenizer.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed=1) + ["    indented code", "        deeper  x  y", "    return x"] * 100),
        model_prefix=str(path.with_suffix("")), vocab_size=320, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1)
    return path


def test_llama2_style_sentencepiece(llama2_style, tmp_path):
    """Llama-2's settings: the json prefixes "▁" as sentencepiece does, also to text starting with
    spaces (where transformers' LlamaTokenizer pipeline, Metaspace, does not)."""
    tok = Tokenizer(llama2_style)
    assert tok.model_spec()["normalizer"] == "identity"
    assert any(set(tok.sp.IdToPiece(i)) == {"\u2581"} and len(tok.sp.IdToPiece(i)) > 1 for i in range(tok.n_words))
    write_hf_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "add_bos_token", "add_eos_token")} == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert [n["type"] for n in spec["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert_same_ids(hf, tok, texts() + ["    indented code\n        deeper  x  y", "  two", "\t x"])
    assert rendered(hf, DIALOG) == encode_dialog(tok, DIALOG)
