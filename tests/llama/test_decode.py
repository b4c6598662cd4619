"""The decoding speed paths: llama.cpu_linear's threaded few-row product inside generation, the complex RoPE,
attention without a mask for one token over the cache, last_only prefill logits, and greedy
Llama.generate token for token against HF transformers' generate on the same weights.

References are independent of our code: float64 torch for the linear and the rotation, HF's
LlamaForCausalLM (eager attention, its own KV cache) for whole models and generation.
"""

import pytest
import torch

import llama.cpu_linear as cpu_linear

transformers = pytest.importorskip("transformers")

from finetune.methods.prompt import PromptTuning  # noqa: E402
from llama.errors import LlamaInputError  # noqa: E402
from llama.generation import Llama, compile_mode  # noqa: E402
from llama.model import Transformer, apply_rope, attention_mask  # noqa: E402
from llama.cpu_linear import Linear  # noqa: E402
from llama.tokenizers import Tokenizer  # noqa: E402
from tests.utils import (  # noqa: E402
    CASES, TOL_CACHE, VOCAB, CountCalls, build_hf_model, load_ours, max_diff, num_threads, random_tokens, rel_err,
    tiny_args, write_meta_checkpoint,
)

TOL_LINEAR = 1e-6  # relative error of the float32 product against float64
TOL_SHAPE = 1e-5  # the same float32 logits from GEMMs of different shapes (summation order), logits O(1)
N_NEW = 24  # greedy tokens per prompt (HF's smallest top-1 / top-2 logit gap on these prompts: 1.5e-3)


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def split_path(monkeypatch):
    """The row-block split forced (LLAMA_CPU_LINEAR=split), so the one-row products take it
    whatever this machine's calibration would pick: the counts of bmm below check it was taken.
    Its own tests, and the calibration's, are in test_cpu_linear.py."""
    monkeypatch.setenv(cpu_linear.ENV, "split")


# --- RoPE and masks ---------------------------------------------------------------------------------


def test_rope_is_a_rotation_of_interleaved_pairs():
    """apply_rope with Transformer.rope's complex rotations equals rotating (x[2i], x[2i+1]) by
    position * inv_freq[i] in float64 (angles taken from the same float32 product)."""
    torch.manual_seed(8)
    model = Transformer(tiny_args(n_kv_heads=2))
    positions = torch.tensor([[0, 1, 2, 5, 17, 63, 100], [3, 3, 0, 9, 8, 7, 6]])
    rot = model.rope(positions)
    hd = model.args.head_dim
    assert rot.dtype == torch.complex64 and rot.shape == (2, 7, hd // 2)
    x = torch.randn(2, 7, 3, hd)
    got = apply_rope(x, rot)
    assert got.dtype == x.dtype and got.shape == x.shape

    inv_freq = 1.0 / (model.args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = (positions[..., None].float() * inv_freq).double()[:, :, None, :]  # [b, s, 1, hd/2]
    x0, x1 = x.double()[..., 0::2], x.double()[..., 1::2]
    ref = torch.empty_like(x, dtype=torch.float64)
    ref[..., 0::2] = x0 * angles.cos() - x1 * angles.sin()
    ref[..., 1::2] = x0 * angles.sin() + x1 * angles.cos()
    assert rel_err(got, ref) <= 1e-6


def test_attention_mask_none_cases():
    assert attention_mask(7, 0, None, "cpu") is None  # causal prefill
    assert attention_mask(1, 9, None, "cpu") is None  # one token over the cache
    m = attention_mask(3, 9, None, "cpu")  # a chunk at start_pos > 0 still needs causality
    assert m is not None and m.shape == (1, 1, 3, 12)
    q, k = torch.arange(9, 12)[:, None], torch.arange(12)[None]
    assert torch.equal(m[0, 0], k <= q)
    m = attention_mask(1, 9, torch.tensor([2, 0]), "cpu")  # padding: mask even for one token
    assert m is not None and m.shape == (2, 1, 1, 10)
    assert m[0, 0, 0].tolist() == [False, False] + [True] * 8 and m[1, 0, 0].all()


# --- models built from HF weights --------------------------------------------------------------------


def hf_generation_model(case, seed: int):
    """build_hf_model, then every matrix ~N(0, 0.15): peaked logits, so greedy tokens vary."""
    hf = build_hf_model(case, seed=seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
    return hf


@pytest.fixture(scope="module", params=[c for c in CASES if c.name in ("mha", "gqa")], ids=lambda c: c.name)
def pair(request, tmp_path_factory, tokenizer_path):
    """(case, hf_model, our Llama) on the same weights, via a Meta checkpoint written from HF's."""
    case = request.param
    hf = hf_generation_model(case, seed=40 + CASES.index(case))
    d = tmp_path_factory.mktemp(f"decode_{case.name}") / "meta"
    write_meta_checkpoint(hf, case, d)
    model = load_ours(d)
    assert isinstance(model.layers[0].attention.wq, Linear)
    tokenizer = Tokenizer(tokenizer_path)
    assert tokenizer.n_words == VOCAB == model.args.vocab_size
    # neither side stops at eos (HF: eos_token_id=None): both must produce exactly N_NEW tokens
    tokenizer.eos_id, tokenizer.stop_ids = -1, frozenset()
    model.setup_caches(4, 64)
    return case, hf, Llama(model, tokenizer, max_seq_len=64, max_batch_size=4)


def hf_greedy(hf, prompt: list[int], n: int = N_NEW) -> list[int]:
    """HF's greedy continuation of the prompt on its own (batch 1, no padding), eos ignored;
    memoised on the HF model, so each prompt goes through HF once per model."""
    memo = hf.__dict__.setdefault("_test_greedy_memo", {})
    key = (tuple(prompt), n)
    if key not in memo:
        memo[key] = _hf_greedy(hf, prompt, n)
    return memo[key]


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad(), num_threads(1):  # the reference's thread count changes nothing but its speed
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    assert len(new) == n  # HF did not stop early
    return new


PROMPTS = [[1, 57, 203, 11, 99], [1, 300, 4, 4, 18, 260, 77, 150, 31, 9, 222], [1, 140]]


def spy_forward(monkeypatch, model):
    """Record (seqlen, start_pos, pad_lens, last_only, output shape) of each model call."""
    calls = []
    orig = model.forward

    def forward(tokens, start_pos=0, pad_lens=None, *args, last_only=False, **kwargs):
        out = orig(tokens, start_pos, pad_lens, *args, last_only=last_only, **kwargs)
        calls.append((tokens.shape[1], start_pos, pad_lens, last_only, tuple(out.shape)))
        return out

    monkeypatch.setattr(model, "forward", forward)
    return calls


@pytest.mark.parametrize("prompt, threads", [(PROMPTS[0], 2), (PROMPTS[2], 1)], ids=["len5-bmm", "len2-1thread"])
def test_greedy_generate_matches_hf_batch_of_one(pair, prompt, threads, monkeypatch):
    """Batch 1 (no padding: pad_lens None, last_only prefill, unmasked decode steps) gives
    exactly HF's greedy tokens; with 2 threads the one-row products go through linear's bmm
    path, with 1 thread through F.linear."""
    case, hf, llama = pair
    calls = spy_forward(monkeypatch, llama.model)
    with num_threads(threads), CountCalls() as fns:
        ours = llama.generate([prompt], max_gen_len=N_NEW, temperature=0)[0]
    expected = hf_greedy(hf, prompt)
    assert len(set(expected)) >= 8, "greedy tokens barely vary: the comparison would be weak"
    assert ours == expected
    # the fast paths were the ones taken
    assert calls[0] == (len(prompt), 0, None, True, (1, 1, VOCAB))
    assert all(c[0] == 1 and c[2] is None and c[4] == (1, 1, VOCAB) for c in calls[1:])
    assert len(calls) == N_NEW  # prefill + N_NEW - 1 decode steps
    # few-row products (a 5-token prompt is one too): 7 linears per layer and the output, per call
    assert len(prompt) <= cpu_linear.GEMV_MAX_ROWS
    assert fns.count("bmm") == ((7 * llama.model.args.n_layers + 1) * N_NEW if threads > 1 else 0)
    n_layers = llama.model.args.n_layers
    assert fns.sdpa[:n_layers] == [(True, True)] * n_layers  # prefill: causal, no mask
    assert set(fns.sdpa[n_layers:]) == {(True, False)}  # decode: no mask, not causal


def test_greedy_generate_left_padded_batch_matches_hf_alone(pair, monkeypatch):
    """Prompts of different lengths left-padded into one batch (pad_lens path) give each
    prompt's HF greedy tokens on its own."""
    case, hf, llama = pair
    calls = spy_forward(monkeypatch, llama.model)
    # several rows never take linear's one-row path: one thread tests the same code, and keeps
    # the test fast on a busy machine
    with num_threads(1):
        batched = llama.generate(PROMPTS, max_gen_len=N_NEW, temperature=0)
    assert torch.equal(calls[0][2], torch.tensor([6, 0, 9])) and calls[0][3] is True
    assert calls[0][4] == (3, 1, VOCAB)
    assert batched == [hf_greedy(hf, p) for p in PROMPTS]


def test_greedy_generate_equal_length_batch_matches_hf_alone(pair, monkeypatch):
    """Several rows, none padded: pad_lens None with batch > 1."""
    case, hf, llama = pair
    prompts = [PROMPTS[0], [1, 300, 4, 18, 260]]
    assert len(prompts[0]) == len(prompts[1])
    calls = spy_forward(monkeypatch, llama.model)
    with num_threads(1):  # as above
        batched = llama.generate(prompts, max_gen_len=N_NEW, temperature=0)
    assert all(c[2] is None for c in calls)
    assert batched == [hf_greedy(hf, p) for p in prompts]


# compiling takes ~35 s: the GQA model alone (SDPA's enable_gqa in the graph)
@pytest.mark.parametrize("mode", [True, "max"])
@pytest.mark.parametrize("pair", [c for c in CASES if c.name == "gqa"], indirect=True, ids=["gqa"])
def test_compiled_decode_matches_hf(pair, mode):
    """Llama(compile=True or "max"): the one-token steps run as one torch.compile graph (no graph
    breaks, the threaded one-row products inside it) and give HF's greedy tokens, unpadded and
    left-padded; "max" with the weights frozen into the graph and inductor's GEMMs timed (unpadded
    only: each batch size is a graph of its own there, and a second costs ~25 s)."""
    from torch._dynamo.utils import counters

    case, hf, llama = pair
    compiled = Llama(llama.model, llama.tokenizer, llama.max_seq_len, llama.max_batch_size, compile=mode)
    torch._dynamo.reset()
    counters.clear()
    try:
        with num_threads(2):
            assert compiled.generate([PROMPTS[0]], max_gen_len=N_NEW, temperature=0)[0] == hf_greedy(hf, PROMPTS[0])
            if mode is True:
                assert compiled.generate(PROMPTS, max_gen_len=N_NEW, temperature=0) == [hf_greedy(hf, p) for p in PROMPTS]
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()


def test_compile_modes():
    """compile takes a bool or a mode name; a name we don't know stops with one line."""
    assert [compile_mode(c) for c in (False, None, True, "default", "max")] == [None, None, "default", "default", "max"]
    with pytest.raises(LlamaInputError, match="unknown compile mode 'fast'; choose from default, max"):
        compile_mode("fast")


# --- last_only ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    case = next(c for c in CASES if c.name == "gqa")
    d = tmp_path_factory.mktemp("decode_gqa_plain") / "meta"
    write_meta_checkpoint(build_hf_model(case, seed=51), case, d)
    return load_ours(d)


def check_last_only(full: torch.Tensor, last: torch.Tensor, hidden_last: torch.Tensor, weight: torch.Tensor):
    """last [b, 1, vocab] equals full[:, -1:] up to GEMM summation order, and both equal the
    float64 product of the last hidden state with the output weight."""
    assert last.shape == (full.shape[0], 1, full.shape[2]) and last.dtype == torch.float32
    assert full.abs().max() > 1.0
    assert max_diff(last, full[:, -1:]) <= TOL_SHAPE
    ref = (hidden_last.double() @ weight.double().T)[:, None]
    assert rel_err(last, ref) <= TOL_LINEAR and rel_err(full[:, -1:], ref) <= TOL_LINEAR


@pytest.mark.parametrize("pad", [None, [3, 0, 5]], ids=["unpadded", "padded"])
@pytest.mark.parametrize("batch", [1, 3])
def test_transformer_last_only(gqa_model, pad, batch):
    model = gqa_model
    tokens = random_tokens(seed=60 + batch, shape=(batch, 12))
    pad_lens = None if pad is None else torch.tensor(pad[:batch]) if batch > 1 else torch.tensor([4])
    with torch.no_grad(), num_threads(2):
        full = model(tokens, 0, pad_lens)
        last = model(tokens, 0, pad_lens, last_only=True)
        hidden = model.hidden_states(model.tok_embeddings(tokens), 0, pad_lens)
    check_last_only(full, last, hidden[:, -1], model.output.weight)


def test_transformer_last_only_with_cache(gqa_model):
    """last_only on a chunk at start_pos > 0 (through the KV cache) too."""
    model = gqa_model
    tokens = random_tokens(seed=65, shape=(2, 14))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, 32)
        try:
            model(tokens[:, :9], 0)
            last = model(tokens[:, 9:], 9, last_only=True)
        finally:
            model.clear_caches()
    assert last.shape == (2, 1, VOCAB)
    assert max_diff(last, full[:, -1:]) <= TOL_CACHE


@pytest.mark.parametrize("pad", [None, [2, 0, 6]], ids=["unpadded", "padded"])
def test_prompt_tuning_last_only(gqa_model, pad):
    g = torch.Generator().manual_seed(70)
    pm = PromptTuning(gqa_model, torch.randn(4, gqa_model.args.dim, generator=g)).eval()
    tokens = random_tokens(seed=71, shape=(3, 10))
    pad_lens = None if pad is None else torch.tensor(pad)
    with torch.no_grad():
        full = pm(tokens, 0, pad_lens)
        last = pm(tokens, 0, pad_lens, last_only=True)
        hidden = pm.encode(tokens, pad_lens)
        plain = gqa_model(tokens, 0, pad_lens)
    assert (plain[:, -1] - full[:, -1]).abs().max() > 0.1  # the virtual tokens matter
    check_last_only(full, last, hidden[:, -1], gqa_model.output.weight)


# --- one token over the cache without a mask --------------------------------------------------------


def test_single_token_decode_without_mask_matches_full_forward(gqa_model):
    """GQA, pad_lens None: each token decoded at start_pos > 0 (attention_mask None, SDPA not
    causal) equals the full forward at its position. The cache first holds a longer, different
    sequence, so reading slots past the current position would show."""
    model = gqa_model
    tokens = random_tokens(seed=80, shape=(2, 24))
    other = random_tokens(seed=81, shape=(2, 40))
    prefix = 15
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, 48)
        try:
            model(other, 0)  # stale cache content beyond every position decoded below
            model(tokens[:, :prefix], 0)
            steps = []
            with CountCalls() as fns:
                for t in range(prefix, tokens.shape[1]):
                    steps.append(model(tokens[:, t:t + 1], t))
        finally:
            model.clear_caches()
    assert set(fns.sdpa) == {(True, False)}  # no mask, not causal: the path under test
    assert len(fns.sdpa) == model.args.n_layers * (tokens.shape[1] - prefix)
    for i, t in enumerate(range(prefix, tokens.shape[1])):
        assert max_diff(steps[i][:, 0], full[:, t]) <= TOL_CACHE
