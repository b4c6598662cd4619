"""The llama2-chat training template against Meta's Llama-2 chat format, on a sentencepiece
tokenizer normalized as Llama-2's is (identity rule, white space kept): Meta's chat_completion
encodes `[INST] {user} [/INST] {answer} ` whole, bos and eos per exchange, so each answer ends
with a "▁" token before </s>."""
import io
import json

import pytest
import sentencepiece as spm

from finetune.data import IGNORE, DataConfig, load_examples
from llama.tiny import corpus
from llama.tokenizers import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


@pytest.fixture(scope="module")
def llama2_like(tmp_path_factory):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed=1) + ["[INST] <<SYS>> [/INST] <</SYS>>"] * 50), model_writer=model,
        vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        minloglevel=2, num_threads=1)
    path = tmp_path_factory.mktemp("llama2_tok") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return Tokenizer(path)


def metas_dialog_tokens(tok, system, turns) -> list[int]:
    """Meta's llama/generation.py chat_completion, for a dialog of whole exchanges."""
    users = [u for u, _ in turns]
    users[0] = B_SYS + system + E_SYS + users[0]
    return [t for u, (_, a) in zip(users, turns)
            for t in tok.encode(f"{B_INST} {u.strip()} {E_INST} {a.strip()} ", bos=True, eos=True)]


def test_llama2_chat_template_is_metas_format(tmp_path, llama2_like):
    system, turns = "You are terse.", [("What is 2 plus 2?", "4"), ("  And 3 plus 3? ", " It is 6. ")]
    row = {"conversations": [{"from": "system", "value": system}]
           + [m for u, a in turns for m in ({"from": "human", "value": u}, {"from": "gpt", "value": a})]}
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(row) + "\n")
    (ex,), _ = load_examples(data, llama2_like, DataConfig(template="llama2-chat", cutoff_len=512))
    assert ex.ids == metas_dialog_tokens(llama2_like, system, turns)
    trained = [t for t in ex.labels if t != IGNORE]
    space = llama2_like.sp.PieceToId("▁")
    assert trained[-2:] == [space, llama2_like.eos_id]  # the "▁" Meta's format has before </s>
    assert llama2_like.decode(trained) == "4  It is 6. "
