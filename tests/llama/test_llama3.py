"""The Llama-3 family end to end: Meta's ChatFormat token for token (against llama-models' own
code on the real tokenizer, and against the format as docs/formats.md states it on a tiny
tiktoken vocabulary), stop ids, left padding with a real pad token, the llama3-chat training
template, an HF Llama-3.2-style folder (tokenizer.json, tied embeddings, llama3 rope scaling)
against transformers, and ft_main.py / example.py on a tiny Llama-3 model."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from finetune.config import TrainConfig
from finetune.data import IGNORE, DataConfig, load_examples, resolve_template
from llama.chat import encode_dialog
from llama.errors import LlamaInputError
from llama.formats import save_checkpoint
from llama.generation import Llama
from llama.tiny import random_model
from llama.tokenizers import Tokenizer
from tests.utils import convert_to_hf_json, peaked_random_model, run, tiny_args, tiny_tiktoken

DIALOG = [
    {"role": "system", "content": "  Be brief.\n"},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": " 4 "},
    {"role": "user", "content": "And <|eot_id|> 3 plus 3?"},  # special-token text stays text
]


@pytest.fixture(scope="module")
def tiny_tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3_tok") / "tokenizer.model"
    tiny_tiktoken(path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_tok_path):
    return Tokenizer(tiny_tok_path)


def meta_tokenizer():
    """Meta's reference tokenizer on the real Llama-3 tokenizer.model (llama-models), and ours on the same file."""
    mt = pytest.importorskip("llama_models.llama3.tokenizer")
    meta = mt.Tokenizer.get_instance()
    return meta, Tokenizer(Path(mt.__file__).parent / "tokenizer.model")


def spec_dialog(tok, dialog) -> list[int]:
    """The ChatFormat as docs/formats.md states it, built from the special ids by name."""
    sp = {name: tok.special_id(name) for name in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}

    def header(role):
        return [sp["<|start_header_id|>"]] + tok.encode(role, bos=False, eos=False) + [sp["<|end_header_id|>"]] \
            + tok.encode("\n\n", bos=False, eos=False)

    ids = [tok.bos_id]
    for m in dialog:
        ids += header(m["role"]) + tok.encode(m["content"].strip(), bos=False, eos=False) + [sp["<|eot_id|>"]]
    return ids + header("assistant")


# --- chat format ---------------------------------------------------------------------------------


def test_chat_prompt_equals_metas_chat_format():
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat

    meta, ours = meta_tokenizer()
    dialog = [{**m, "content": m["content"].strip()} for m in DIALOG]  # llama-models 0.3.0 leaves content unstripped
    messages = [RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn) for m in dialog]
    want = ChatFormat(meta).encode_dialog_prompt(messages).tokens
    assert encode_dialog(ours, dialog) == want
    assert ours.stop_ids == set(meta.stop_tokens) and ours.chat_format == "llama3"


def test_chat_prompt_follows_the_format_on_a_tiny_vocabulary(tok):
    ids = encode_dialog(tok, DIALOG)
    assert ids == spec_dialog(tok, DIALOG)
    assert ids.count(tok.special_id("<|eot_id|>")) == len(DIALOG)  # the one in the text is plain text
    with pytest.raises(LlamaInputError, match="unknown chat role 'bot'"):
        encode_dialog(tok, [{"role": "bot", "content": "hi"}])


def make_llama(tok, seed=3, max_seq_len=96):
    model = peaked_random_model(tiny_args(vocab_size=tok.n_words), seed=seed, std=0.15)
    model.setup_caches(4, max_seq_len)
    return Llama(model, tok, max_seq_len, 4)


def test_chat_completion_stops_at_eot(tok):
    """Generation ends at the first stop id (<|eot_id|> here) and does not return it."""
    llama = make_llama(tok)
    prompt = encode_dialog(tok, DIALOG)
    free = llama.generate([prompt], max_gen_len=12, temperature=0)[0]
    assert len(set(free)) > 2
    eot = tok.special_id("<|eot_id|>")
    with torch.no_grad():  # make the fourth greedy token <|eot_id|>: raise its logit at that step only
        llama.model.output.weight[eot] = llama.model.output.weight[free[3]]
        llama.model.output.weight[free[3]] = 0
    got = llama.chat_completion([DIALOG], temperature=0, max_gen_len=12)[0]["generation"]
    cut = llama.generate([prompt], max_gen_len=12, temperature=0)[0]
    assert eot not in cut and len(cut) < 12
    assert got == {"role": "assistant", "content": tok.decode(cut)}


def test_left_padding_with_a_real_pad_token_changes_nothing(tok):
    """Llama-3's pad id is a real token (<|finetune_right_pad_id|>): padded rows must generate what
    they generate alone, whichever token pads them."""
    llama = make_llama(tok)
    prompts = [encode_dialog(tok, DIALOG), tok.encode("The red cat", bos=True, eos=False)]
    alone = [llama.generate([p], max_gen_len=10, temperature=0)[0] for p in prompts]
    assert tok.pad_id == tok.special_id("<|finetune_right_pad_id|>")
    assert llama.generate(prompts, max_gen_len=10, temperature=0) == alone
    llama.tokenizer.pad_id = prompts[0][5]  # an ordinary token of the prompt
    assert llama.generate(prompts, max_gen_len=10, temperature=0) == alone


# --- the llama3-chat training template -----------------------------------------------------------


def sharegpt_row():
    return {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there"},
                              {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "2+2?"},
                              {"from": "gpt", "value": " 4\n"}]}


def test_llama3_chat_template_is_metas_dialog_with_loss_on_answers_only(tmp_path):
    meta, ours = meta_tokenizer()
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(sharegpt_row()) + "\n")
    (ex,), _ = load_examples(data, ours, DataConfig(template="llama3-chat", cutoff_len=512))
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages = [RawMessage(role=roles[t["from"]], content=t["value"].strip(), stop_reason=StopReason.end_of_turn)
                for t in sharegpt_row()["conversations"]]
    fmt = ChatFormat(meta)
    want = fmt.encode_dialog_prompt(messages).tokens[:-len(fmt._encode_header("assistant"))]  # no open header
    assert ex.ids == want
    answers = [t for m in messages if m.role == "assistant"
               for t in fmt.encode_message(m, None)[0][len(fmt._encode_header("assistant")):]]
    assert [t for t in ex.labels if t != IGNORE] == answers  # each answer's tokens and its <|eot_id|>
    assert answers.count(ours.special_id("<|eot_id|>")) == 2
    first = ex.labels.index(next(t for t in ex.labels if t != IGNORE))
    assert ex.ids[first - len(fmt._encode_header("assistant")):first] == fmt._encode_header("assistant")


def test_auto_template_is_llama3_chat_with_a_llama3_tokenizer(tok, tokenizer_path):
    assert TrainConfig().template == "auto"
    assert resolve_template("auto", tok) == "llama3-chat"
    assert resolve_template("auto", Tokenizer(tokenizer_path)) == "alpaca"
    assert resolve_template("vicuna", tok) == "vicuna"


def test_llama3_chat_template_needs_a_llama3_tokenizer(tmp_path, tokenizer_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(sharegpt_row()) + "\n")
    with pytest.raises(LlamaInputError, match=r"tokenizer.model: has no <\|start_header_id\|> token"):
        load_examples(data, Tokenizer(tokenizer_path), DataConfig(template="llama3-chat"))


# --- an HF Llama-3.2-style folder ------------------------------------------------------------------


def test_hf_llama32_folder_with_tokenizer_json_and_tied_embeddings(tmp_path, tiny_tok_path, tok):
    """transformers writes the folder; we load it (tokenizer.json found and read, output tied to
    the embedding, llama3 rope scaling) and give its logits and its greedy tokens."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tok.n_words, max_position_embeddings=256, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 1.0 if "embed" in name else 0.15) if not name.endswith("norm.weight") else p.uniform_(0.5, 1.5)
    folder = tmp_path / "llama32"
    hf.save_pretrained(folder)
    convert_to_hf_json(tiny_tok_path, folder / "tokenizer.json")
    assert not (folder / "tokenizer.model").exists()
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once, as the embedding
    llama = Llama.build(folder, max_seq_len=128, max_batch_size=1)
    assert llama.model.output.weight is llama.model.tok_embeddings.weight
    assert type(llama.tokenizer).__name__ == "HFJsonTokenizer"
    prompt = encode_dialog(llama.tokenizer, DIALOG)
    assert prompt == encode_dialog(tok, DIALOG)
    x = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(llama.model(x), hf(x).logits, atol=1e-4, rtol=1e-5)  # logits up to ~30
        want = hf.generate(x, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x),
                           eos_token_id=sorted(tok.stop_ids), pad_token_id=tok.pad_id)[0, x.shape[1]:].tolist()
    want = [t for t in want if t not in tok.stop_ids][:8]
    got = llama.generate([prompt], max_gen_len=8, temperature=0)[0]
    assert got == want[:len(got)] and len(got) >= min(len(want), 1)


# --- the scripts on a tiny Llama-3 model ------------------------------------------------------------


def test_ft_main_and_example_chat_on_a_tiny_llama3(tmp_path, tiny_tok_path, tok):
    """Full fine-tuning on chat data with the default template (auto -> llama3-chat) learns the
    answer (exact match counts it up to <|eot_id|>), and example.py --chat on the tuned model
    answers through the same chat format, stopping at <|eot_id|>."""
    ckpt = tmp_path / "tiny3"
    save_checkpoint(random_model(tiny_args(vocab_size=tok.n_words, n_kv_heads=2, rope_theta=500000.0), seed=1), ckpt)
    shutil.copy(tiny_tok_path, ckpt / "tokenizer.model")
    data = tmp_path / "chat.jsonl"
    row = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]}
    data.write_text("".join(json.dumps(row) + "\n" for _ in range(8)))
    out = tmp_path / "run"
    trained = run([sys.executable, "ft_main.py", "--ckpt_dir", ckpt, "--train_file", data, "--eval_file", data,
                   "--out_dir", out, "--method", "full", "--lr", "1e-2", "--max_steps", "30", "--micro_batch_size", "2",
                   "--exact_match_samples", "2", "--max_new_tokens", "8", "--dtype", "float32", "--device", "cpu"],
                  timeout=240)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "exact match before training: 0.0%" in trained.stdout
    assert "exact match after training: 100.0% of 2 eval samples" in trained.stdout
    answer = run([sys.executable, "example.py", "--ckpt_dir", out / "model", "--tokenizer_path", tiny_tok_path,
                  "--chat", "--prompt", "Hi there", "--prompt", "Hi there", "--temperature", "0",
                  "--max_gen_len", "8", "--dtype", "float32"], timeout=240)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.count("Hi there\n> Hello!\n") == 2


def test_a_llama3_tokenizer_of_another_vocabulary_is_refused(tmp_path, tiny_tok_path, tok):
    ckpt = tmp_path / "other_vocab"
    save_checkpoint(random_model(tiny_args(vocab_size=tok.n_words + 2), seed=1), ckpt)
    result = run([sys.executable, "example.py", "--ckpt_dir", ckpt, "--tokenizer_path", tiny_tok_path,
                  "--prompt", "hi"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tiny_tok_path}: tokenizer has {tok.n_words} tokens but the model's vocab_size is {tok.n_words + 2}: "
        "a tokenizer of another model? use the one the checkpoint came with"]
