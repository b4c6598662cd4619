"""finetune.prompt_tuning: virtual tokens before each row's first real token, with left padding,
the KV cache and llama.generation; its PEFT-format adapter (PEFT itself is the reference for the
format and, on an unpadded batch, for the logits)."""
import dataclasses
import json

import pytest
import sentencepiece as spm
import torch

from finetune.adapters import attach, load_adapter, save_trained
from finetune.config import TrainConfig
from finetune.methods.prompt import PromptTuning, init_prompt
from llama.errors import LlamaInputError
from llama.generation import Llama
from llama.tokenizers import Tokenizer
from tests.utils import hf_from_ours, make_ours, tiny_args

P = 5  # virtual tokens
TOL = 1e-5  # our own paths against each other, float32
TOL_HF = 1e-4  # ours vs PEFT on HF's model


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def base_model(seed: int = 0):
    return make_ours(tiny_args(n_kv_heads=2), seed=seed)  # GQA, O(1) logits


def prompt_model(seed: int = 0, n_virtual: int = P) -> PromptTuning:
    model = base_model(seed)
    emb = torch.randn(n_virtual, model.args.dim, generator=torch.Generator().manual_seed(seed + 100))
    return PromptTuning(model, emb).eval()


def tokens_of(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], filler: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded batch and pad_lens. The padding slots hold an arbitrary real token, so a
    leak through the mask would show."""
    width = max(len(r) for r in rows)
    batch = torch.full((len(rows), width), filler, dtype=torch.long)
    for b, r in enumerate(rows):
        batch[b, width - len(r):] = r
    return batch, torch.tensor([width - len(r) for r in rows])


def hand_reference(pm: PromptTuning, tokens: torch.Tensor) -> torch.Tensor:
    """Unpadded rows: prompt embeddings, then the token embeddings, through the transformer;
    drop the P virtual outputs."""
    model = pm.model
    prompt = pm.prompt_embeddings.expand(tokens.shape[0], -1, -1)
    h = torch.cat([prompt, model.tok_embeddings(tokens)], dim=1)
    return model.output(model.hidden_states(h)[:, pm.n_virtual:]).float()


# --- forward -------------------------------------------------------------------------------------------


@torch.no_grad()
def test_matches_hand_written_reference_unpadded():
    pm = prompt_model()
    tokens = torch.stack([tokens_of(1, 9), tokens_of(2, 9), tokens_of(3, 9)])
    ref = hand_reference(pm, tokens)
    torch.testing.assert_close(pm(tokens), ref, atol=TOL, rtol=0)
    torch.testing.assert_close(pm(tokens, 0, torch.zeros(3, dtype=torch.long)), ref, atol=TOL, rtol=0)
    # the virtual tokens matter
    assert (pm.model(tokens) - ref).abs().max() > 0.1


@torch.no_grad()
def test_left_padding_invariance():
    """Each row of a left-padded batch gives, on its real slots, the logits it gives alone."""
    pm = prompt_model(seed=1)
    rows = [tokens_of(4, 6), tokens_of(5, 11), tokens_of(6, 1), tokens_of(7, 9)]
    batch, pad_lens = left_pad(rows)
    logits = pm(batch, 0, pad_lens)
    for b, row in enumerate(rows):
        alone = pm(row[None])
        torch.testing.assert_close(logits[b, int(pad_lens[b]):], alone[0], atol=TOL, rtol=0)
        torch.testing.assert_close(alone, hand_reference(pm, row[None]), atol=TOL, rtol=0)
    # what fills the padding slots does not matter
    other, _ = left_pad(rows, filler=300)
    refilled = pm(other, 0, pad_lens)
    for b in range(len(rows)):
        real = slice(int(pad_lens[b]), None)
        torch.testing.assert_close(refilled[b, real], logits[b, real], atol=TOL, rtol=0)


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward():
    pm = prompt_model(seed=2)
    rows = [tokens_of(8, 7), tokens_of(9, 12)]
    batch, pad_lens = left_pad(rows)
    full = pm(batch, 0, pad_lens)  # no cache yet
    pm.setup_caches(max_batch_size=2, max_seq_len=24)
    n0 = 8  # prefill the first 8 slots, then one token at a time
    pre = pm(batch[:, :n0], 0, pad_lens)
    for b in range(2):
        real = slice(int(pad_lens[b]), n0)
        torch.testing.assert_close(pre[b, real], full[b, real], atol=TOL, rtol=0)
    for t in range(n0, batch.shape[1]):
        step = pm(batch[:, t:t + 1], t, pad_lens)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=TOL, rtol=0, msg=f"slot {t}")
    pm.clear_caches()
    torch.testing.assert_close(pm(batch, 0, pad_lens), full, atol=TOL, rtol=0)


def test_generate_with_llama(tokenizer):
    """llama.generation.Llama decodes a PromptTuning model (KV cache, left padding) exactly as a
    greedy loop re-running the whole unpadded sequence without a cache."""
    pm = prompt_model(seed=3)
    prompts = [tokenizer.encode("The quick cat sees the", bos=True, eos=False),
               tokenizer.encode("What is 12 plus 30? The answer is", bos=True, eos=False)]
    max_gen = 8
    pm.setup_caches(max_batch_size=2, max_seq_len=48)
    out = Llama(pm, tokenizer, max_seq_len=48, max_batch_size=2).generate(prompts, max_gen, temperature=0)
    pm.clear_caches()
    with torch.no_grad():
        for prompt, got in zip(prompts, out):
            seq, expected = list(prompt), []
            for _ in range(max_gen):
                nxt = int(hand_reference(pm, torch.tensor([seq]))[0, -1].argmax())
                if nxt == tokenizer.eos_id:
                    break
                expected.append(nxt)
                seq.append(nxt)
            assert got == expected
        # the virtual tokens steer the model: the next-token distribution differs from the plain model's
        first = torch.tensor([prompts[0]])
        assert (pm(first)[0, -1] - pm.model(first)[0, -1]).abs().max() > 0.1


# --- initialisation ---------------------------------------------------------------------------------


@torch.no_grad()
def test_init_prompt_text_is_the_text_embeddings(tokenizer, tokenizer_path):
    model = base_model()
    text = "The red robot paints the garden."
    ids = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).encode(text)
    assert 3 < len(ids) < 20
    table = model.tok_embeddings.weight
    for n in (2, len(ids), 20):  # cut, exact, repeated
        got = init_prompt(model, tokenizer, n, "text", text)
        want = table[[ids[i % len(ids)] for i in range(n)]]
        assert got.shape == (n, model.args.dim) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    # vocab: rows of the embedding table; random: fresh noise of the table's spread
    vocab_init = init_prompt(model, tokenizer, 4, "vocab", generator=torch.Generator().manual_seed(0))
    for row in vocab_init:
        assert (table == row).all(dim=1).any()
    random_init = init_prompt(model, tokenizer, 64, "random", generator=torch.Generator().manual_seed(0))
    assert random_init.shape == (64, model.args.dim)
    assert random_init.std().item() == pytest.approx(table.std().item(), rel=0.15)
    for bad in [dict(n_virtual=0, how="text", text="x"), dict(n_virtual=3, how="text", text=""),
                dict(n_virtual=3, how="nonsense", text="x")]:
        with pytest.raises(LlamaInputError):
            init_prompt(model, tokenizer, **bad)


# --- adapter files ---------------------------------------------------------------------------------


def trained_prompt_adapter(tmp_path, tokenizer, how: str, seed: int = 4):
    """attach(method=prompt), then move the embeddings as training would, and save."""
    cfg = TrainConfig(method="prompt", num_virtual_tokens=6, prompt_init=how,
                      prompt_init_text="Answer the question.", ckpt_dir=str(tmp_path / "base"))
    model = base_model(seed)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    task_model = attach(model, cfg, tokenizer)
    pm = task_model.model
    assert isinstance(pm, PromptTuning) and pm.n_virtual == 6
    trainable = [n for n, p in task_model.named_parameters() if p.requires_grad]
    assert trainable == ["model.prompt_embeddings"]
    if how == "text":
        torch.testing.assert_close(pm.prompt_embeddings.detach(),
                                   init_prompt(pm.model, tokenizer, 6, "text", cfg.prompt_init_text), atol=0, rtol=0)
    with torch.no_grad():
        pm.prompt_embeddings.add_(torch.randn(pm.prompt_embeddings.shape, generator=torch.Generator().manual_seed(1)))
    out = tmp_path / f"adapter_{how}"
    save_trained(task_model, cfg, out)
    return cfg, pm, plain, out


@pytest.mark.parametrize("how", ["text", "vocab", "random"])
def test_prompt_adapter_round_trip(tmp_path, tokenizer, how):
    from safetensors.torch import load_file

    cfg, pm, plain, out = trained_prompt_adapter(tmp_path, tokenizer, how)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"]
    assert tensors["prompt_embeddings"].shape == (6, pm.args.dim)
    torch.testing.assert_close(tensors["prompt_embeddings"], pm.prompt_embeddings.detach(), atol=0, rtol=0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert config["num_virtual_tokens"] == 6 and config["token_dim"] == pm.args.dim
    assert config["num_transformer_submodules"] == 1
    assert config["prompt_tuning_init"] == {"text": "TEXT", "vocab": "SAMPLE_VOCAB", "random": "RANDOM"}[how]
    ours = json.loads((out / "finetune.json").read_text())
    assert ours["method"] == "prompt"

    peft = pytest.importorskip("peft")
    fields = {f.name for f in dataclasses.fields(peft.PromptTuningConfig)}
    assert set(config) <= fields, set(config) - fields  # every key is one PEFT knows

    fresh = base_model(seed=99)
    fresh.load_state_dict(plain)
    loaded = load_adapter(fresh.eval(), out)
    assert isinstance(loaded, PromptTuning)
    torch.testing.assert_close(loaded.prompt_embeddings, pm.prompt_embeddings, atol=0, rtol=0)
    rows = [tokens_of(10, 5), tokens_of(11, 9)]
    batch, pad_lens = left_pad(rows)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch, 0, pad_lens), pm(batch, 0, pad_lens), atol=0, rtol=0)


def _peft_logits_check(tmp_path, tokenizer, how):
    peft = pytest.importorskip("peft")
    cfg, pm, plain, out = trained_prompt_adapter(tmp_path, tokenizer, how)
    config = json.loads((out / "adapter_config.json").read_text())
    peft.PromptTuningConfig(**config)  # PEFT accepts the config as written
    hf = hf_from_ours(base_model(seed=4))
    tokens = torch.stack([tokens_of(12, 10), tokens_of(13, 10)])
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
        theirs = peft_model(input_ids=tokens).logits.float()
        ours = pm(tokens)
    assert theirs.shape == (2, 6 + 10, pm.args.vocab_size)  # PEFT returns the virtual slots too
    torch.testing.assert_close(theirs[:, 6:], ours, atol=TOL_HF, rtol=0)


@pytest.mark.parametrize("how", ["vocab", "random"])
def test_prompt_adapter_loads_into_peft(tmp_path, tokenizer, how):
    """PEFT's PeftModel.from_pretrained reads our folder onto HF's model and, on an unpadded batch
    (PEFT puts the virtual tokens before any padding), gives our logits."""
    _peft_logits_check(tmp_path, tokenizer, how)


def test_text_init_prompt_adapter_loads_into_peft(tmp_path, tokenizer):
    _peft_logits_check(tmp_path, tokenizer, "text")
