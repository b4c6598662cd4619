"""python -m llama.export --format gguf, read back with the gguf package's own GGUFReader (not our
writer): every key llama.cpp reads against values computed here from the model's hyperparameters,
every tensor under llama.cpp's names (written out here from docs/formats.md) against our
checkpoint's (f32 exactly, f16/bf16 as torch rounds, q8_0/q4_0 as gguf's quantizers encode them
and within their error), Llama-3.1's rope_freqs against the formula transcribed here, and the
tokenizer (sentencepiece pieces; Llama-3 BPE re-run by HF's `tokenizers` from the GGUF's tokens and
merges). Where llama-cpp-python is installed, llama.cpp itself loads the files and gives our
logits and our token ids."""
import json
import math

import numpy as np
import pytest
import torch

from llama.chat import encode_dialog
from llama.errors import LlamaInputError
from llama.export import export
from llama.export.source import ExportSource
from llama.export.tokenizer_files import CHAT_TEMPLATES
from llama.formats import read_model_args, save_checkpoint
from llama.loader import load_model
from llama.model import rope_frequencies
from llama.tokenizers import Tokenizer
from tests.utils import LLAMA3_SCALING, META_PAT, meta_ffn_hidden, peaked_random_model, tiny_args, tiny_tiktoken

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

# llama.cpp's tensor names (docs/formats.md, GGUF), written out here apart from llama/layers.py
TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
       "output.weight": "output.weight"}
BLOCK = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
         "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
         "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_name(key: str) -> str:
    if key in TOP:
        return TOP[key]
    _, layer, *module = key.split(".")
    return f"blk.{layer}.{BLOCK['.'.join(module[:-1])]}.weight"


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def llama3_factors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """Llama-3.1's rope scaling as llama.cpp's rope_freqs holds it (convert_hf_to_gguf.py), transcribed:
    per frequency the divisor, 1 above the high-frequency wavelength, `factor` below the low one."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old, low, high, factor = (scaling["original_max_position_embeddings"], scaling["low_freq_factor"],
                              scaling["high_freq_factor"], scaling["factor"])
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.fixture(scope="module")
def sp_ckpt(tmp_path_factory, tokenizer_path):
    """GQA, Llama-3.1 rope scaling with a 16-position original context (so it shows within a few
    tokens), float32, the sentencepiece tokenizer beside it. (folder, state dict)"""
    d = tmp_path_factory.mktemp("gguf") / "sp"
    args = tiny_args(n_kv_heads=2, rope_scaling=dict(LLAMA3_SCALING))
    model = peaked_random_model(args, seed=3, std=0.1)
    save_checkpoint(model, d)
    (d / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    return d, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def bpe_ckpt(tmp_path_factory):
    """A tiny tiktoken vocabulary, tied embeddings (no output.weight stored, as HF's tied
    checkpoints), stored bfloat16. (folder, state dict with the output it means)"""
    d = tmp_path_factory.mktemp("gguf") / "bpe"
    d.mkdir()
    tiny_tiktoken(d / "tokenizer.model")
    args = tiny_args(vocab_size=Tokenizer(d / "tokenizer.model").n_words, tie_word_embeddings=True)
    model = peaked_random_model(args, seed=5, std=0.1).to(torch.bfloat16)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "output.weight"}
    save_checkpoint(model, d, state=state)
    return d, {**state, "output.weight": state["tok_embeddings.weight"]}


@pytest.fixture(scope="module")
def sp_f32(sp_ckpt, tmp_path_factory):
    return export(sp_ckpt[0], "gguf", tmp_path_factory.mktemp("out") / "sp-f32.gguf", outtype="auto", progress=False)


@pytest.fixture(scope="module")
def bpe_auto(bpe_ckpt, tmp_path_factory):
    return export(bpe_ckpt[0], "gguf", tmp_path_factory.mktemp("out") / "bpe.gguf", progress=False)


def test_keys_and_sentencepiece_vocabulary(sp_ckpt, sp_f32, tokenizer_path):
    kv, _ = fields(sp_f32)
    args, sp = read_model_args(sp_ckpt[0]), Tokenizer(tokenizer_path).sp
    want = {
        "general.architecture": "llama", "general.file_type": 0,  # ALL_F32: auto keeps a float32 model
        "llama.context_length": 131072,  # llama3 rope scaling: Llama-3.1's context
        "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": meta_ffn_hidden(64, 32, None),
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 64 // 4,
        "llama.rope.freq_base": 10000.0, "llama.vocab_size": 384,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": CHAT_TEMPLATES["llama2"],
    }
    assert {k: kv.get(k) for k in want} == want
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(args.norm_eps, rel=1e-6)
    n = sp.vocab_size()
    assert kv["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(n)]
    assert kv["tokenizer.ggml.scores"] == pytest.approx([sp.GetScore(i) for i in range(n)])
    kinds = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 1 for i in range(n)]
    assert kv["tokenizer.ggml.token_type"] == kinds and kinds.count(6) == 256
    assert "tokenizer.ggml.merges" not in kv and "llama.rope.scaling.type" not in kv


def test_f32_tensors_exact_and_rope_freqs(sp_ckpt, sp_f32):
    _, tensors = fields(sp_f32)
    state = sp_ckpt[1]
    args = read_model_args(sp_ckpt[0])
    assert set(tensors) == {gguf_name(k) for k in state} | {"rope_freqs.weight"}
    for key, w in state.items():
        t = tensors[gguf_name(key)]
        assert t.tensor_type == T.F32, key
        assert list(t.shape) == list(reversed(w.shape)), key  # GGUF lists dims innermost first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w.numpy(), err_msg=key)
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    assert tensors["rope_freqs.weight"].tensor_type == T.F32 and factors.shape == (args.head_dim // 2,)
    np.testing.assert_allclose(factors, llama3_factors(args.rope_theta, args.head_dim, LLAMA3_SCALING), rtol=1e-6)
    assert factors.max() == 8.0 and 1.0 < factors.min() < 8.0  # divided by factor, and blended
    # what llama.cpp computes from them (base frequency / factor) is our model's scaled frequency
    base = 1.0 / (args.rope_theta ** (np.arange(0, args.head_dim, 2) / args.head_dim))
    np.testing.assert_allclose(base / factors, rope_frequencies(args).numpy(), rtol=1e-5)


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_f16_and_bf16_round_as_torch(sp_ckpt, tmp_path, outtype):
    out = export(sp_ckpt[0], "gguf", tmp_path / "m.gguf", outtype=outtype, progress=False)
    kv, tensors = fields(out)
    assert kv["general.file_type"] == {"f16": 1, "bf16": 32}[outtype]
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[outtype]
    for key, w in sp_ckpt[1].items():
        t = tensors[gguf_name(key)]
        if w.ndim == 1:  # norms stay float32, as llama.cpp keeps them
            assert t.tensor_type == T.F32, key
            continue
        assert t.tensor_type == {"f16": T.F16, "bf16": T.BF16}[outtype], key
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        np.testing.assert_array_equal(got, w.to(dtype).float().numpy(), err_msg=key)
        assert not np.array_equal(got, w.numpy())  # rounded: the comparison can tell


# per block of 32 values: q8_0 steps of amax/127, rounded (half a step); q4_0 steps of amax/8, its top
# code clipped (a step); and the step itself rounded to f16 (2^-11 relative), times the largest code
QUANT_ERROR = {"q8_0": (0.5 + 127 * 2 ** -11) / 127, "q4_0": (1 + 8 * 2 ** -11) / 8}


@pytest.mark.parametrize("outtype,qtype", [("q8_0", T.Q8_0), ("q4_0", T.Q4_0)])
def test_block_quantized_tensors(sp_ckpt, tmp_path, outtype, qtype):
    """Each 2-D tensor as gguf's own quantizer encodes our float32 tensor, and within its error."""
    bound = QUANT_ERROR[outtype]
    out = export(sp_ckpt[0], "gguf", tmp_path / "m.gguf", outtype=outtype, progress=False)
    kv, tensors = fields(out)
    assert kv["general.file_type"] == {"q8_0": 7, "q4_0": 2}[outtype]
    for key, w in sp_ckpt[1].items():
        t = tensors[gguf_name(key)]
        if w.ndim == 1:
            assert t.tensor_type == T.F32
            continue
        assert t.tensor_type == qtype, key
        data = np.asarray(t.data)
        np.testing.assert_array_equal(data, gguf.quants.quantize(w.numpy(), qtype), err_msg=key)
        got = gguf.quants.dequantize(data, qtype).reshape(w.shape)
        blocks = w.numpy().reshape(-1, 32)
        err = np.abs(got.reshape(-1, 32) - blocks)
        assert (err <= np.abs(blocks).max(axis=1, keepdims=True) * bound + 1e-7).all(), key
        assert err.max() > 0, key


def test_rows_not_in_whole_blocks_stay_f16(tmp_path, tokenizer_path):
    """dim 48: rows of 48 inputs are not whole blocks of 32 (F16, as llama.cpp's converter falls
    back); ffn_down's 128 inputs are (Q8_0)."""
    d = tmp_path / "odd"
    model = peaked_random_model(tiny_args(dim=48, n_heads=4, n_kv_heads=4), seed=1, std=0.1)
    save_checkpoint(model, d)
    out = export(d, "gguf", tmp_path / "m.gguf", tokenizer_path=tokenizer_path, outtype="q8_0", progress=False)
    _, tensors = fields(out)
    assert model.args.ffn_hidden_dim % 32 == 0
    for key, w in model.state_dict().items():
        want = T.F32 if w.ndim == 1 else T.Q8_0 if w.shape[1] % 32 == 0 else T.F16
        assert tensors[gguf_name(key)].tensor_type == want, key
    assert tensors["blk.0.ffn_down.weight"].tensor_type == T.Q8_0 and tensors["token_embd.weight"].tensor_type == T.F16


# the last: words the tiny vocabulary holds no whole token for, whose ids depend on the merges' order
TEXTS = ["Hello world! What is 12 plus 34?", "日本語のテキスト 😀👍🏽 emoji", "line one\r\nline two\n\n    indented\ttab",
         "DON'T I'LL we've IT'SALL", "1234567 3.14159", "   leading and trailing   ", "<|eot_id|> as text",
         "theriver molikes watchesis therobot thesees"]


def test_llama3_bpe_vocabulary_and_tied_output(bpe_ckpt, bpe_auto):
    """The GGUF's tokens and merges, run by HF's BPE with Meta's split, give our ids; specials are
    control tokens; the tied output is left to token_embd; auto writes a bf16 model as f16."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers

    kv, tensors = fields(bpe_auto)
    tok = Tokenizer(bpe_ckpt[0] / "tokenizer.model")
    n_ranks = tok.n_words - 256
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == tok.n_words == kv["llama.vocab_size"]
    assert types == [1] * n_ranks + [3] * 256
    assert tokens[n_ranks:] == [s for s, _ in sorted(tok.specials.items(), key=lambda kv: kv[1])]
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    ids = {name: tok.special_id(s) for name, s in (("bos", "<|begin_of_text|>"), ("eos", "<|end_of_text|>"),
                                                    ("eot", "<|eot_id|>"), ("eom", "<|eom_id|>"))}
    assert {name: kv[f"tokenizer.ggml.{name}_token_id"] for name in ids} == ids
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.chat_template"] == CHAT_TEMPLATES["llama3"]
    merges = [tuple(m.split(" ")) for m in kv["tokenizer.ggml.merges"]]
    bpe = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens[:n_ranks])}, merges, ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(META_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for text in TEXTS:
        assert bpe.encode(text, add_special_tokens=False).ids == tok.encode(text, bos=False, eos=False), text
    # the merges matter: without them HF's BPE falls back to single bytes
    no_merges = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens[:n_ranks])}, [], ignore_merges=True))
    no_merges.pre_tokenizer = bpe.pre_tokenizer
    assert no_merges.encode(TEXTS[0]).ids != tok.encode(TEXTS[0], bos=False, eos=False)

    state = bpe_ckpt[1]
    assert kv["general.file_type"] == 1 and "output.weight" not in tensors and "rope_freqs.weight" not in tensors
    assert set(tensors) == {gguf_name(k) for k in state} - {"output.weight"}
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == T.F16
    np.testing.assert_array_equal(np.asarray(emb.data), state["tok_embeddings.weight"].half().numpy())


def test_llama31_use_scaled_rope_context(tmp_path, tokenizer_path):
    """Meta's Llama-3.1 scaling (original context 8192, theta 500000): the factors and context 131072."""
    from tests.utils import LLAMA31_SCALING

    d = tmp_path / "m"
    save_checkpoint(peaked_random_model(tiny_args(rope_theta=500000.0, rope_scaling=dict(LLAMA31_SCALING)), 0, 0.1), d)
    kv, tensors = fields(export(d, "gguf", tmp_path / "m.gguf", tokenizer_path=tokenizer_path, progress=False))
    assert kv["llama.context_length"] == 131072 and kv["llama.rope.freq_base"] == 500000.0
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    np.testing.assert_allclose(factors, llama3_factors(500000.0, 16, LLAMA31_SCALING), rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == 8.0  # the high frequencies kept, the low divided


def test_linear_rope_scaling_keys(tmp_path, tokenizer_path):
    d = tmp_path / "m"
    save_checkpoint(peaked_random_model(tiny_args(rope_scaling={"rope_type": "linear", "factor": 4.0}), 0, 0.1), d)
    kv, tensors = fields(export(d, "gguf", tmp_path / "m.gguf", tokenizer_path=tokenizer_path, progress=False))
    assert (kv["llama.rope.scaling.type"], kv["llama.rope.scaling.factor"]) == ("linear", 4.0)
    assert kv["llama.context_length"] == 4096 and "rope_freqs.weight" not in tensors


def test_no_tokenizer_is_one_line_and_nothing_written(tmp_path):
    d = tmp_path / "deep" / "m"
    save_checkpoint(peaked_random_model(tiny_args(), 0, 0.1), d)
    with pytest.raises(LlamaInputError, match="GGUF needs the tokenizer") as e:
        export(d, "gguf", tmp_path / "m.gguf", progress=False)
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == [tmp_path / "deep"]


def test_other_split_pattern_is_refused(bpe_ckpt, tmp_path):
    """llama.cpp runs its own copy of Meta's split for "llama-bpe": a tokenizer.json with another
    pattern would tokenize differently there."""
    from llama.export.tokenizer_files import write_hf_tokenizer

    write_hf_tokenizer(Tokenizer(bpe_ckpt[0] / "tokenizer.model"), tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = META_PAT.replace(r"\p{N}{1,3}", r"\p{N}")
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(LlamaInputError, match="split pattern"):
        export(bpe_ckpt[0], "gguf", tmp_path / "m.gguf", tokenizer_path=tmp_path / "tokenizer.json", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_streams_one_tensor_at_a_time_and_fails_whole(sp_ckpt, tmp_path, monkeypatch):
    """Each tensor is read, then written, before the next is read; a failure midway leaves no file
    and no temporary file behind."""
    events = []
    read, write = ExportSource.read, gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(ExportSource, "read", lambda self, key, dtype: events.append("read") or read(self, key, dtype))
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data",
                        lambda self, t, *a: events.append("write") or write(self, t, *a))
    export(sp_ckpt[0], "gguf", tmp_path / "ok.gguf", outtype="q8_0", progress=False)
    n = len(sp_ckpt[1])
    assert events == ["write"] + ["read", "write"] * n  # rope_freqs first, computed

    def fail(self, key, dtype):
        if key == "layers.1.attention.wq.weight":
            raise RuntimeError("disk gone")
        return read(self, key, dtype)
    monkeypatch.setattr(ExportSource, "read", fail)
    with pytest.raises(RuntimeError, match="disk gone"):
        export(sp_ckpt[0], "gguf", tmp_path / "bad.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.gguf"]


# --- llama.cpp itself (llama-cpp-python, when installed) -------------------------------------


def llama_cpp_logits(path, tokens: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    # float32 KV cache (llama.cpp's default is f16), so only float32 rounding separates us
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)]), llm


def our_logits(ckpt, tokens: list[int], **overrides) -> np.ndarray:
    args = read_model_args(ckpt)
    for k, v in overrides.items():
        setattr(args, k, v)
    model = load_model(ckpt, args, torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).float()[0].numpy()


def test_llama_cpp_gives_our_logits_with_llama31_scaling(sp_ckpt, sp_f32):
    """24 positions, past the original context of 16 where the scaling acts: llama.cpp's logits
    are ours to float32 rounding, and far from those of the model without the scaling."""
    tokens = [1] + torch.randint(3, 384, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    got, llm = llama_cpp_logits(sp_f32, tokens)
    want = our_logits(sp_ckpt[0], tokens)
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)
    assert np.abs(our_logits(sp_ckpt[0], tokens, rope_scaling=None) - want).max() > 1e-2
    tok = Tokenizer(sp_ckpt[0] / "tokenizer.model")
    # text that sentencepiece's normalization leaves alone (llama.cpp does not normalize)
    for text in ("Hello world", "The red cat sat on the mat.", "What is 12 plus 30?"):
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text, bos=True, eos=False)


def test_llama_cpp_bpe_tied_logits_and_token_ids(bpe_ckpt, tmp_path):
    out = export(bpe_ckpt[0], "gguf", tmp_path / "m.gguf", outtype="f32", progress=False)
    tok = Tokenizer(bpe_ckpt[0] / "tokenizer.model")
    tokens = tok.encode(TEXTS[0] + " " + TEXTS[1], bos=True, eos=False)
    got, llm = llama_cpp_logits(out, tokens)
    np.testing.assert_allclose(got, our_logits(bpe_ckpt[0], tokens), atol=5e-5, rtol=0)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text, bos=True, eos=False), text
    dialog = [{"role": "user", "content": "Hi there"}]
    assert llm.tokenize(b"<|start_header_id|>", add_bos=False, special=True) == [tok.special_id("<|start_header_id|>")]
    assert encode_dialog(tok, dialog)[0] == tok.bos_id


def test_llama_cpp_runs_q8_0(sp_ckpt, tmp_path):
    out = export(sp_ckpt[0], "gguf", tmp_path / "m.gguf", outtype="q8_0", progress=False)
    tokens = [1, 40, 41, 42, 43, 44, 45, 46]
    got, _ = llama_cpp_logits(out, tokens)
    want = our_logits(sp_ckpt[0], tokens)
    err = np.abs(got - want).max()
    assert 0 < err < 0.05 * np.abs(want).max()


def test_real_llama3_vocabulary(tmp_path):
    """Meta's Llama-3 tokenizer.model (llama-models ships it) on a one-layer model: llama.cpp reads
    its 128,256 tokens and ids, and its ids equal Meta's (which needs every merge, in order).
    llama.cpp reads the file back here: gguf's reader takes seconds over 400,000 strings."""
    mt = pytest.importorskip("llama_models.llama3.tokenizer")
    llama_cpp = pytest.importorskip("llama_cpp")
    path = mt.Path(mt.__file__).parent / "tokenizer.model"
    d = tmp_path / "m"
    args = tiny_args(dim=32, n_heads=2, n_kv_heads=2, n_layers=1, vocab_size=128256, tie_word_embeddings=True)
    model = peaked_random_model(args, 0, 0.1).half()
    save_checkpoint(model, d, state={k: v for k, v in model.state_dict().items() if k != "output.weight"})
    out = export(d, "gguf", tmp_path / "m.gguf", tokenizer_path=path, progress=False)
    llm = llama_cpp.Llama(str(out), n_ctx=32, vocab_only=True, verbose=False)
    meta = mt.Tokenizer(path)
    assert (llm.n_vocab(), llm.token_bos(), llm.token_eos()) == (128256, 128000, 128001)
    md = llm.metadata
    assert (md["tokenizer.ggml.pre"], md["tokenizer.ggml.eot_token_id"], md["tokenizer.ggml.eom_token_id"]) == (
        "llama-bpe", "128009", "128008")
    for text in TEXTS + ["日本語のテキストです。中文文本，한국어 텍스트", "a\u00a0b\u3000c\u2028d\u0085e  \u200b f",
                         "DON'T I'LL we've they'RE it's IT'SALL WE'VEGOT I'MOK", "    indented\n\tdef f(x):\r\n"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == meta.encode(text, bos=True, eos=False), text
