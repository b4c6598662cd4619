"""Generation: batched left-padded greedy decoding, streaming decode, chat format, sampling."""
import pytest
import torch

from llama.generation import Llama, sample
from llama.tokenizers import Tokenizer
from tests.utils import peaked_random_model, tiny_args


def make_llama(tokenizer_path, n_kv_heads=4, max_batch_size=4, max_seq_len=64) -> Llama:
    # larger weights than init: peaked logits, varied greedy tokens
    model = peaked_random_model(tiny_args(n_kv_heads=n_kv_heads), seed=1, std=0.15)
    model.eval().setup_caches(max_batch_size, max_seq_len)
    return Llama(model, Tokenizer(tokenizer_path), max_seq_len, max_batch_size)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_batched_greedy_equals_each_prompt_alone(tokenizer_path, n_kv_heads):
    llama = make_llama(tokenizer_path, n_kv_heads)
    tok = llama.tokenizer
    prompts = [tok.encode(t, bos=True, eos=False) for t in
               ["The red cat", "What is 12 plus 30? The answer", "hi", "The quiet robot paints the old garden"]]
    assert len({len(p) for p in prompts}) == 4  # really different lengths, so rows are padded
    batched = llama.generate(prompts, max_gen_len=20, temperature=0)
    alone = [llama.generate([p], max_gen_len=20, temperature=0)[0] for p in prompts]
    assert batched == alone
    assert any(len(t) > 5 for t in alone)


def test_each_row_stops_at_its_own_first_stop_token(tokenizer_path):
    llama = make_llama(tokenizer_path)
    prompts = [[1, 5, 6, 7], [1, 9]]
    alone = [llama.generate([p], max_gen_len=12, temperature=0)[0] for p in prompts]
    # call row 1's third greedy token and row 0's fifth "stop tokens" (as Llama-3 has eos,
    # <|eot_id|> and <|eom_id|>): each row must stop before the first of either it meets, and
    # neither may change the other's tokens
    stops = {alone[1][2], alone[0][4]}
    llama.tokenizer.stop_ids = frozenset(stops)
    expected = [t[:min((t.index(s) for s in stops if s in t), default=len(t))] for t in alone]
    assert len(expected[1]) == 2 and len(expected[0]) not in (2, 12)
    assert llama.generate(prompts, max_gen_len=12, temperature=0) == expected


def test_stream_decoder_emits_whole_characters(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = "héllo wörld ☃ 😀 the end"
    ids = tok.encode(text, bos=False, eos=False)
    prompt = tok.encode("Say:", bos=True, eos=False)
    stream = tok.stream(context=prompt)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.sp.DecodeIds(prompt + ids)[len(tok.sp.DecodeIds(prompt)):]
    assert sum(1 for p in pieces if p == "") >= 2  # multi-byte characters were held back


def test_chat_format_matches_llama2_template(tokenizer_path):
    llama = make_llama(tokenizer_path, max_seq_len=160)
    sp, bos, eos = llama.tokenizer.sp, llama.tokenizer.bos_id, llama.tokenizer.eos_id
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 plus 3?"},
    ]
    expected = (
        [bos] + sp.EncodeAsIds("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 plus 2? [/INST] 4 ") + [eos]
        + [bos] + sp.EncodeAsIds("[INST] And 3 plus 3? [/INST]")
    )
    assert llama.encode_dialog(dialog) == expected
    out = llama.chat_completion([dialog], temperature=0, max_gen_len=4)
    assert out[0]["generation"]["role"] == "assistant"


def test_sampling_limits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, 0, 0.9, None, g), greedy)
    assert torch.equal(sample(logits, 1.0, 1.0, 1, g), greedy)  # top_k=1
    assert torch.equal(sample(logits, 1.0, 1e-6, None, g), greedy)  # top_p keeps only the best
    draws = torch.stack([sample(logits, 1.0, 1.0, 5, g) for _ in range(200)])
    top5 = logits.topk(5, dim=-1).indices
    assert all(int(d) in top5[row].tolist() for row in range(3) for d in draws[:, row])
    assert len(set(draws[:, 0].tolist())) > 1


def test_seeded_sampling_is_reproducible(tokenizer_path):
    a = make_llama(tokenizer_path).text_completion(["The red cat"], temperature=1.0, max_gen_len=12)
    b = make_llama(tokenizer_path).text_completion(["The red cat"], temperature=1.0, max_gen_len=12)
    assert a == b
