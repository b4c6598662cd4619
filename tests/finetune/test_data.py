"""finetune/data.py: prompt templates against the published formats (the strings below are written
out from the reference formats, not taken from finetune/data.py), label masking, sharegpt turns,
cutoff_len, pt chunking, cls/regression labels, left-padded batches, packing, and the acceptance
test that a packed row gives every sample the same loss (and logits) as running it alone."""
import io
import json

import pytest
import sentencepiece as spm
import torch

from finetune.data import IGNORE, DataConfig, Example, collate, load_examples, pack
from finetune.heads import TaskModel
from llama.tiny import corpus
from llama.tokenizers import Tokenizer
from tests.utils import peaked_random_model, tiny_args

# --- the reference formats, written out by hand ----------------------------------------------

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
BOS, EOS = "<s>", "</s>"


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact_tok(tmp_path_factory) -> Tokenizer:
    """A sentencepiece model that keeps whitespace as is (identity normalisation, byte fallback),
    like LLaMA's, so decoding gives back the exact prompt strings, newlines and double spaces
    included. (The shared test tokenizer folds whitespace, which would hide template mistakes.)"""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=384, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1, normalization_rule_name="identity", remove_extra_whitespaces=False,
    )
    path = tmp_path_factory.mktemp("exact_tok") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    tok = Tokenizer(path)
    probe = "a\n\nb  c"
    assert tok.decode(tok.encode(probe, False, False)) == probe
    return tok


@pytest.fixture(scope="module")
def tok(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def logits_loss_sum(logits, labels):
    """Summed next-token cross-entropy of logits [batch, seq, vocab] and its target count (plain torch)."""
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (targets != IGNORE).sum()


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tmp_path, rows, tokenizer, name="data.jsonl", **cfg):
    return load_examples(write_jsonl(tmp_path / name, rows), tokenizer, DataConfig(**cfg))


def runs(ex: Example, tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """The sample as [(text, trained)]: bos/eos as "<s>"/"</s>", every other maximal run of tokens
    with the same trained-ness decoded on its own. Checks that a trained slot's label is its id."""
    assert len(ex.ids) == len(ex.labels)
    out, cur, cur_trained = [], [], None

    def flush():
        if cur:
            out.append((tokenizer.decode(cur), cur_trained))

    for t, lab in zip(ex.ids, ex.labels):
        trained = lab != IGNORE
        if trained:
            assert lab == t, f"label {lab} on token {t}"
        if t in (tokenizer.bos_id, tokenizer.eos_id):
            flush()
            cur, cur_trained = [], None
            out.append((BOS if t == tokenizer.bos_id else EOS, trained))
        elif cur and trained == cur_trained:
            cur.append(t)
        else:
            flush()
            cur, cur_trained = [t], trained
    flush()
    return out


# --- templates -------------------------------------------------------------------------------


def test_alpaca_with_input(tmp_path, exact_tok):
    row = {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "The answer is 42."}
    (ex,), _ = load(tmp_path, [row], exact_tok, template="alpaca")
    prompt = ALPACA_WITH_INPUT.format(instruction="Add the two numbers.", input="12 and 30")
    assert runs(ex, exact_tok) == [(BOS, False), (prompt, False), ("The answer is 42.", True), (EOS, True)]
    assert ex.ids[0] == exact_tok.bos_id and ex.ids[-1] == exact_tok.eos_id
    assert exact_tok.decode(ex.ids[1:ex.prompt_len]) == prompt
    assert all(lab == IGNORE for lab in ex.labels[:ex.prompt_len])
    assert ex.labels[ex.prompt_len:] == ex.ids[ex.prompt_len:]


@pytest.mark.parametrize("row", [
    {"instruction": "Name the home of the shark.", "output": "ocean"},
    {"instruction": "Name the home of the shark.", "input": "", "output": "ocean"},
])
def test_alpaca_without_input(tmp_path, exact_tok, row):
    (ex,), _ = load(tmp_path, [row], exact_tok, template="alpaca")
    prompt = ALPACA_NO_INPUT.format(instruction="Name the home of the shark.")
    assert runs(ex, exact_tok) == [(BOS, False), (prompt, False), ("ocean", True), (EOS, True)]
    assert exact_tok.decode(ex.ids[1:ex.prompt_len]) == prompt
    assert exact_tok.decode(ex.ids[ex.prompt_len:-1]) == "ocean"


def test_vicuna_default_system_two_turns(tmp_path, exact_tok):
    row = {"conversations": [
        {"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi there."},
        {"from": "human", "value": "How are you?"}, {"from": "gpt", "value": "I am good."},
    ]}
    (ex,), _ = load(tmp_path, [row], exact_tok, template="vicuna")
    # "{system} USER: {msg} ASSISTANT: {reply}</s>", turns separated by a space
    assert runs(ex, exact_tok) == [
        (BOS, False), (f"{VICUNA_SYSTEM} USER: Hello! ASSISTANT:", False), ("Hi there.", True), (EOS, True),
        (" USER: How are you? ASSISTANT:", False), ("I am good.", True), (EOS, True),
    ]


def test_vicuna_custom_system_and_alpaca_rows(tmp_path, exact_tok):
    row = {"conversations": [{"from": "system", "value": "Be brief."},
                             {"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi."}]}
    (ex,), _ = load(tmp_path, [row], exact_tok, template="vicuna")
    assert runs(ex, exact_tok) == [(BOS, False), ("Be brief. USER: Hello! ASSISTANT:", False), ("Hi.", True), (EOS, True)]
    (ex,), _ = load(tmp_path, [{"instruction": "Say hi.", "output": "hi"}], exact_tok, name="a.jsonl", template="vicuna")
    assert runs(ex, exact_tok) == [(BOS, False), (f"{VICUNA_SYSTEM} USER: Say hi. ASSISTANT:", False), ("hi", True), (EOS, True)]


def test_llama2_chat_multi_turn_with_system(tmp_path, exact_tok):
    row = {"conversations": [
        {"from": "system", "value": "You are terse."},
        {"from": "human", "value": "What is 2 plus 2?"}, {"from": "gpt", "value": "4"},
        {"from": "human", "value": "  And 3 plus 3?  "}, {"from": "gpt", "value": " 6 "},
    ]}
    (ex,), _ = load(tmp_path, [row], exact_tok, template="llama2-chat")
    # [INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST] ...
    # (Meta strips user and answer text and keeps the space after the answer; every round starts
    # with bos and ends with eos)
    assert runs(ex, exact_tok) == [
        (BOS, False), ("[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is 2 plus 2? [/INST]", False), ("4 ", True), (EOS, True),
        (BOS, False), ("[INST] And 3 plus 3? [/INST]", False), ("6 ", True), (EOS, True),
    ]


def test_llama2_chat_without_system(tmp_path, exact_tok):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    (ex,), _ = load(tmp_path, [row], exact_tok, template="llama2-chat")
    assert runs(ex, exact_tok) == [(BOS, False), ("[INST] Hi [/INST]", False), ("Hello ", True), (EOS, True)]


def test_plain_template(tmp_path, exact_tok):
    (ex,), _ = load(tmp_path, [{"instruction": "The red cat", "output": "sees the dog."}], exact_tok, template="plain")
    assert runs(ex, exact_tok) == [(BOS, False), ("The red cat\n", False), ("sees the dog.", True), (EOS, True)]


def test_unknown_template_is_an_input_error(tmp_path, exact_tok):
    from llama.errors import LlamaInputError

    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    with pytest.raises(LlamaInputError, match="chatml"):
        load(tmp_path, rows, exact_tok, template="chatml")


# --- labels ----------------------------------------------------------------------------------


def test_labels_mask_prompt_and_bos(tmp_path, tok):
    rows = [{"instruction": f"What is {i} plus {i}?", "output": f"The answer is {2 * i}."} for i in range(4)]
    examples, _ = load(tmp_path, rows, tok, template="alpaca")
    for row, ex in zip(rows, examples):
        answer = tok.encode(row["output"], bos=False, eos=True)
        assert ex.ids[-len(answer):] == answer
        assert ex.prompt_len == len(ex.ids) - len(answer)
        assert ex.labels == [IGNORE] * ex.prompt_len + answer
        assert ex.ids[0] == tok.bos_id and ex.labels[0] == IGNORE


def test_train_on_prompt_labels_everything_but_bos(tmp_path, tok):
    rows = [{"instruction": "What is 3 plus 4?", "input": "be quick", "output": "The answer is 7."}]
    (plain,), _ = load(tmp_path, rows, tok, template="alpaca")
    (ex,), _ = load(tmp_path, rows, tok, template="alpaca", train_on_prompt=True)
    assert ex.ids == plain.ids
    assert ex.labels == [IGNORE] + ex.ids[1:]


def test_sharegpt_masks_every_human_turn(tmp_path, exact_tok):
    humans = ["first question here", "second question there", "third question again"]
    gpts = ["answer one", "answer two", "answer three"]
    conv = [{"from": "system", "value": "system words"}]
    for h, g in zip(humans, gpts):
        conv += [{"from": "human", "value": h}, {"from": "gpt", "value": g}]
    for template in ("vicuna", "llama2-chat", "plain"):
        (ex,), _ = load(tmp_path, [{"conversations": conv}], exact_tok, template=template)
        r = runs(ex, exact_tok)
        trained = [text for text, t in r if t]
        end = " " if template == "llama2-chat" else ""  # Meta's `{answer} ` before </s>
        assert trained == [gpts[0] + end, EOS, gpts[1] + end, EOS, gpts[2] + end, EOS], template
        masked = " ".join(text for text, t in r if not t)
        for h in humans:
            assert h in masked, (template, h)
            assert not any(h in text for text in trained)
        if template != "plain":
            assert "system words" in masked


def test_sharegpt_without_a_pair_is_skipped_or_fatal(tmp_path, tok, capsys):
    from llama.errors import LlamaInputError

    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"conversations": [{"from": "human", "value": "alone"}]}]
    examples, _ = load(tmp_path, rows, tok, template="vicuna")
    assert len(examples) == 1
    assert "data.jsonl:2" in capsys.readouterr().err
    with pytest.raises(LlamaInputError, match=r"data\.jsonl:2"):
        load(tmp_path, rows, tok, template="vicuna", strict=True)


# --- cutoff_len ------------------------------------------------------------------------------


def test_cutoff_keeps_the_prefix(tmp_path, tok):
    rows = [{"instruction": "Tell.", "output": "The red cat sees the dog. The old bird finds the tree. " * 3}]
    (full,), _ = load(tmp_path, rows, tok, template="plain", cutoff_len=1000)
    cut = full.prompt_len + 5
    assert len(full.ids) > cut + 5
    (ex,), _ = load(tmp_path, rows, tok, template="plain", cutoff_len=cut)
    assert ex.ids == full.ids[:cut] and ex.labels == full.labels[:cut]
    assert sum(lab != IGNORE for lab in ex.labels) == 5


def test_cutoff_drops_samples_whose_prompt_fills_it(tmp_path, tok, capsys):
    long_q = "What is 1 plus 2? The answer is 3. " * 6
    rows = [{"instruction": "Hi.", "output": "ok"}, {"instruction": long_q, "output": "fine"},
            {"instruction": "Go.", "output": "done"}]
    full, _ = load(tmp_path, rows, tok, template="plain", cutoff_len=1000)
    p = full[1].prompt_len
    assert p > len(full[0].ids) and p > len(full[2].ids)
    capsys.readouterr()
    kept, _ = load(tmp_path, rows, tok, template="plain", cutoff_len=p)  # nothing of the answer would be left
    assert [ex.ids for ex in kept] == [full[0].ids, full[2].ids]
    assert f"dropped 1 of 3 rows: 1 too long for cutoff_len {p} (the prompt fills it" in capsys.readouterr().err
    kept, _ = load(tmp_path, rows, tok, template="plain", cutoff_len=p + 1)  # one answer token left
    assert [ex.ids for ex in kept] == [full[0].ids, full[1].ids[:p + 1], full[2].ids]
    assert kept[1].labels[p] == full[1].ids[p] != IGNORE


# --- pt --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cutoff", [16, 23])
def test_pt_splits_long_texts_into_chunks(tmp_path, tok, cutoff):
    long_text = " ".join(corpus(12, seed=3))
    rows = [{"text": "The cat."}, {"text": long_text}]
    examples, _ = load(tmp_path, rows, tok, task="pt", cutoff_len=cutoff)
    short = tok.encode("The cat.", bos=True, eos=True)
    assert examples[0].ids == short and examples[0].labels == [IGNORE] + short[1:]
    full = tok.encode(long_text, bos=True, eos=True)
    chunks = examples[1:]
    assert len(full) > 3 * cutoff
    assert all(len(c.ids) == cutoff for c in chunks[:-1]) and 1 < len(chunks[-1].ids) <= cutoff
    joined = [t for c in chunks for t in c.ids]
    expected = full[:-1] if len(full) % cutoff == 1 else full  # a lone last token has nothing to predict
    assert joined == expected
    # every token but a chunk's first is a target: each chunk is trained as a row of its own
    assert all(c.labels[0] == IGNORE for c in chunks)
    assert all(c.labels[1:] == c.ids[1:] for c in chunks)


# --- cls and regression ----------------------------------------------------------------------


def test_cls_labels_sorted_by_default(tmp_path, tok):
    rows = [{"text": "The red cat.", "label": "pos"}, {"text": "The dog.", "label": "neg"},
            {"text": "A tree.", "label": "neutral"}, {"text": "The bird.", "label": "pos"}]
    examples, names = load(tmp_path, rows, tok, task="cls")
    assert names == ["neg", "neutral", "pos"]
    assert [ex.labels for ex in examples] == [2, 0, 1, 2]
    assert examples[0].ids == tok.encode("The red cat.", bos=True, eos=False)


def test_cls_label_names_given_are_honoured(tmp_path, tok, capsys):
    from llama.errors import LlamaInputError

    rows = [{"text": "The red cat.", "label": "pos"}, {"text": "The dog.", "label": "neg"},
            {"text": "A tree.", "label": "neutral"}]
    examples, names = load(tmp_path, rows, tok, task="cls", label_names=("pos", "neutral", "neg"))
    assert names == ["pos", "neutral", "neg"]
    assert [ex.labels for ex in examples] == [0, 2, 1]
    # a label outside the given names: skipped with file:line, or fatal with strict
    examples, _ = load(tmp_path, rows, tok, task="cls", label_names=("pos", "neg"))
    assert [ex.labels for ex in examples] == [0, 1]
    assert "data.jsonl:3" in capsys.readouterr().err
    with pytest.raises(LlamaInputError, match=r"data\.jsonl:3"):
        load(tmp_path, rows, tok, task="cls", label_names=("pos", "neg"), strict=True)


def test_cls_integer_labels(tmp_path, tok):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": 1}]
    examples, names = load(tmp_path, rows, tok, task="cls")
    assert names == ["0", "1"] and [ex.labels for ex in examples] == [1, 0, 1]


def test_regression_floats(tmp_path, tok, capsys):
    rows = [{"text": "a", "label": 0.5}, {"text": "b", "label": "2.25"}, {"text": "c", "label": -3},
            {"text": "d", "label": "nan"}]
    examples, _ = load(tmp_path, rows, tok, task="regression")
    assert [ex.labels for ex in examples] == [0.5, 2.25, -3.0]
    assert all(isinstance(ex.labels, float) for ex in examples)
    assert "data.jsonl:4" in capsys.readouterr().err
    batch = collate(examples, tok.pad_id, "regression")
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.5, 2.25, -3.0]


# --- collate ---------------------------------------------------------------------------------


def test_collate_left_pads(tok):
    items = [Example([1, 10, 11], [IGNORE, IGNORE, 11]), Example([1, 20, 21, 22, 23], [IGNORE, IGNORE, 21, 22, 23]),
             Example([1, 30, 31, 32], [IGNORE, 30, 31, 32])]
    b = collate(items, pad_id=7, task="sft")
    assert set(b) == {"tokens", "labels", "pad_lens"}
    assert b["pad_lens"].tolist() == [2, 0, 1]
    assert b["tokens"].tolist() == [[7, 7, 1, 10, 11], [1, 20, 21, 22, 23], [7, 1, 30, 31, 32]]
    assert b["labels"].tolist() == [[-100, -100, -100, -100, 11], [-100, -100, 21, 22, 23], [-100, -100, 30, 31, 32]]
    cls = collate([Example([1, 5], 2), Example([1, 5, 6, 7], 0)], pad_id=7, task="cls")
    assert cls["tokens"].tolist() == [[7, 7, 1, 5], [1, 5, 6, 7]] and cls["pad_lens"].tolist() == [2, 0]
    assert cls["labels"].dtype == torch.long and cls["labels"].tolist() == [2, 0]


def test_left_padded_batch_gives_each_sample_its_own_loss(tmp_path, tok):
    model = boosted_model()
    examples, _ = load(tmp_path, sft_rows(4), tok, template="plain")
    b = collate(examples, tok.pad_id, "sft")
    with torch.no_grad():
        logits = model(b["tokens"], pad_lens=b["pad_lens"])
        for r, ex in enumerate(examples):
            alone = model(torch.tensor([ex.ids]))
            real = logits[r:r + 1, int(b["pad_lens"][r]):]
            assert (real - alone).abs().max() <= 1e-5
            assert abs(logits_loss_sum(real, b["labels"][r:r + 1, int(b["pad_lens"][r]):])[0]
                       - logits_loss_sum(alone, torch.tensor([ex.labels]))[0]) <= 1e-5


def pt_chunks(tmp_path, tok, cutoff=15):
    text = " ".join(corpus(8, seed=5))
    examples, _ = load(tmp_path, [{"text": text}], tok, task="pt", cutoff_len=cutoff)
    assert len(examples) >= 3 and len(examples[-1].ids) < cutoff
    return examples


def alone_loss(model, ex):
    return logits_loss_sum(model(torch.tensor([ex.ids])), torch.tensor([ex.labels]))


def test_pt_left_padded_batch_gives_each_chunk_its_own_loss(tmp_path, tok):
    model = boosted_model()
    examples = pt_chunks(tmp_path, tok)
    batch_items = [examples[0], examples[-1]]  # a full chunk and the shorter last one (left-padded)
    b = collate(batch_items, tok.pad_id, "pt")
    with torch.no_grad():
        total, count, _ = TaskModel(model, "pt")(**b)
        parts = [alone_loss(model, ex) for ex in batch_items]
    assert int(count) == sum(int(c) for _, c in parts)
    assert abs(total.item() - sum(loss.item() for loss, _ in parts)) <= 1e-4


def test_pt_packing_gives_the_same_loss_as_unpacked(tmp_path, tok):
    model = boosted_model()
    examples = pt_chunks(tmp_path, tok)
    rows = pack(examples, cutoff_len=40)
    assert any(len(r) > 1 for r in rows)
    b = collate(rows, tok.pad_id, "pt")
    with torch.no_grad():
        total, count, _ = TaskModel(model, "pt")(**b)
        parts = [alone_loss(model, ex) for ex in examples]
    assert int(count) == sum(int(c) for _, c in parts)
    assert abs(total.item() - sum(loss.item() for loss, _ in parts)) <= 1e-4


# --- packing ---------------------------------------------------------------------------------


def test_pack_respects_cutoff_and_order():
    lengths = [5, 3, 4, 6, 2, 8, 1, 1, 7]
    examples = [Example([i] * n, [i] * n) for i, n in enumerate(lengths)]
    rows = pack(examples, cutoff_len=8)
    assert [[len(ex.ids) for ex in row] for row in rows] == [[5, 3], [4], [6, 2], [8], [1, 1], [7]]
    assert [ex for row in rows for ex in row] == examples  # same samples, same order
    for row, nxt in zip(rows, rows[1:]):
        assert sum(len(ex.ids) for ex in row) <= 8
        assert sum(len(ex.ids) for ex in row) + len(nxt[0].ids) > 8  # greedy: the next one did not fit
    assert pack(examples, cutoff_len=100) == [examples]


def sft_rows(n: int) -> list[dict]:
    return [{"instruction": f"What is {i} plus {3 * i}?", "output": "The answer is " + str(4 * i) + "." * (i % 3 + 1)}
            for i in range(n)]


def boosted_model(n_kv_heads: int = 4):
    """A tiny random model with weights large enough that attention is far from uniform, so a
    leak across samples would show in the logits."""
    return peaked_random_model(tiny_args(n_kv_heads=n_kv_heads), seed=1, std=0.1).eval()


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_packing_gives_the_same_per_sample_loss_as_unpacked(tmp_path, tok, n_kv_heads):
    """Acceptance: 'Packing gives the same per-sample loss as unpacked batches'."""
    model = boosted_model(n_kv_heads)
    examples, _ = load(tmp_path, sft_rows(5), tok, template="plain", cutoff_len=64)
    rows = pack(examples, cutoff_len=48)
    assert [len(r) for r in rows] == [3, 2]  # two packed rows of unequal length: one is left-padded
    b = collate(rows, tok.pad_id, "sft")
    assert "segment_ids" in b and "pad_lens" not in b
    with torch.no_grad():
        alone_logits = [model(torch.tensor([ex.ids])) for ex in examples]
        alone_loss = [logits_loss_sum(lg, torch.tensor([ex.labels]))[0].item() for lg, ex in zip(alone_logits, examples)]
        logits = model(b["tokens"], segment_ids=b["segment_ids"])
        k = 0
        for r, row in enumerate(rows):
            seg = b["segment_ids"][r]
            width = sum(len(ex.ids) for ex in row)
            assert (seg[: seg.numel() - width] == -1).all()
            assert (b["labels"][r, : seg.numel() - width] == IGNORE).all()
            for s, ex in enumerate(row):
                pos = (seg == s).nonzero().flatten()
                assert b["tokens"][r, pos].tolist() == ex.ids and b["labels"][r, pos].tolist() == ex.labels
                # per-segment loss from the packed logits, computed here
                seg_logits, seg_labels = logits[r, pos], b["labels"][r, pos]
                ce = torch.nn.functional.cross_entropy(seg_logits[:-1], seg_labels[1:], ignore_index=IGNORE,
                                                       reduction="sum")
                assert abs(ce.item() - alone_loss[k]) <= 1e-5, (r, s)
                # the model's packed attention: logits equal the sample run alone
                assert (seg_logits - alone_logits[k][0]).abs().max() <= 1e-5, (r, s)
                k += 1
        assert k == len(examples)
        # the whole packed batch's summed loss (as the trainer computes it) is the sum of the parts
        total, count = TaskModel(model, "sft")(**b)[:2]
        assert abs(total.item() - sum(alone_loss)) <= 1e-4
        assert int(count) == sum(sum(lab != IGNORE for lab in ex.labels[1:]) for ex in examples)
