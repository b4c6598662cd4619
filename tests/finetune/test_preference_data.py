"""Preference rows (tasks rm, dpo) in each supported form become the pairs SFT would train on:
the chosen and rejected sequences are, token for token, the SFT examples of the same prompt
answered each way (the loss on the last answer only), whatever the row form; cutoff_len cuts the
prompt's start; collate lays out chosen rows then rejected rows."""
import json

import pytest

from finetune.data import IGNORE, DataConfig, PairExample, collate, load_examples
from llama.errors import LlamaInputError
from llama.tokenizers import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(str(tokenizer_path))


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_of(path, tok, template="alpaca", cutoff_len=256, task="dpo", **kw):
    return load_examples(path, tok, DataConfig(task, template, cutoff_len=cutoff_len, **kw))[0]


def sft_of(path, tok, template="alpaca", cutoff_len=256):
    return load_examples(path, tok, DataConfig("sft", template, cutoff_len=cutoff_len))[0]


def assert_pair_is_sft(pair: PairExample, chosen_sft, rejected_sft):
    """Each side's ids equal the SFT example's; its labels are the SFT labels of the last answer."""
    for ex, sft in zip(pair.sequences(), (chosen_sft, rejected_sft)):
        assert ex.ids == sft.ids
        assert ex.labels[: len(pair.prompt)] == [IGNORE] * len(pair.prompt)
        assert ex.labels[len(pair.prompt):] == sft.labels[len(pair.prompt):]
        assert all(t != IGNORE for t in ex.labels[len(pair.prompt):])


@pytest.mark.parametrize("template", ["alpaca", "vicuna", "llama2-chat", "plain"])
def test_llama_factory_rows_are_sft_rows_answered_both_ways(tmp_path, tok, template):
    row = {"instruction": "Name a color.", "input": "Something warm.", "chosen": "red", "rejected": "blue"}
    pair, = pairs_of(write(tmp_path / "p.jsonl", [row]), tok, template)
    sft = [sft_of(write(tmp_path / f"{k}.jsonl", [{"instruction": row["instruction"], "input": row["input"],
                                                     "output": row[k]}]), tok, template)[0]
           for k in ("chosen", "rejected")]
    assert_pair_is_sft(pair, *sft)
    assert pair.prompt[0] == tok.bos_id and pair.chosen[-1] == tok.eos_id


def test_every_chat_form_gives_the_same_pair(tmp_path, tok):
    """One two-turn conversation as sharegpt conversations + chosen/rejected messages, as TRL's
    prompt/chosen/rejected messages, and as whole message lists (common prefix = prompt): the
    same pair, equal to sharegpt SFT rows ending in each answer (only the last answer labelled)."""
    history = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
               {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "A fruit?"}]
    as_roles = [{"role": {"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]), "content": m["value"]}
                for m in history]
    forms = [
        {"conversations": history, "chosen": {"from": "gpt", "value": "Plum."}, "rejected": {"from": "gpt", "value": "Rock."}},
        {"prompt": as_roles, "chosen": [{"role": "assistant", "content": "Plum."}],
         "rejected": [{"role": "assistant", "content": "Rock."}]},
        {"chosen": as_roles + [{"role": "assistant", "content": "Plum."}],
         "rejected": as_roles + [{"role": "assistant", "content": "Rock."}]},
    ]
    got = [pairs_of(write(tmp_path / f"f{i}.jsonl", [row]), tok, "vicuna")[0] for i, row in enumerate(forms)]
    assert got[0] == got[1] == got[2]
    sft = [sft_of(write(tmp_path / f"s{k}.jsonl", [{"conversations": history + [{"from": "gpt", "value": k}]}]),
                  tok, "vicuna")[0] for k in ("Plum.", "Rock.")]
    assert_pair_is_sft(got[0], *sft)
    # the earlier answer "Hello." is in the prompt, unlabelled
    assert sft[0].labels.count(IGNORE) < got[0].sequences()[0].labels.count(IGNORE)


def test_hh_text_takes_the_common_prefix_as_prompt(tmp_path, tok):
    row = {"chosen": "\n\nHuman: Is it cold?\n\nAssistant: Yes, wear a coat.",
           "rejected": "\n\nHuman: Is it cold?\n\nAssistant: Yes, it is hot."}
    pair, = pairs_of(write(tmp_path / "hh.jsonl", [row]), tok)
    # the prefix ends at "Yes," and the space goes with the answers, as TRL's extract_prompt does
    assert pair.prompt == tok.encode("\n\nHuman: Is it cold?\n\nAssistant: Yes,", bos=True, eos=False)
    assert pair.chosen == tok.encode(" wear a coat.", bos=False, eos=True)
    assert pair.rejected == tok.encode(" it is hot.", bos=False, eos=True)


def test_trl_plain_prompt_is_rendered_with_the_template(tmp_path, tok):
    pair, = pairs_of(write(tmp_path / "t.jsonl", [{"prompt": "Sky?", "chosen": "blue", "rejected": "green"}]), tok, "plain")
    assert pair.prompt == [tok.bos_id] + tok.encode("Sky?\n", bos=False, eos=False)
    assert pair.chosen == tok.encode("blue", bos=False, eos=True)


def test_cutoff_len_cuts_the_prompt_start_and_drops_what_cannot_fit(tmp_path, tok, capsys):
    long_prompt = " ".join(f"word{i}" for i in range(40))
    rows = [{"prompt": long_prompt, "chosen": "yes", "rejected": "no no no"},   # prompt cut
            {"prompt": "Hi", "chosen": "a", "rejected": "b"},                  # fits
            {"prompt": "Hi", "chosen": " ".join(["long"] * 40), "rejected": "b"},  # answer alone too long
            {"prompt": "Hi", "chosen": "same", "rejected": "same"}]             # no preference
    path = write(tmp_path / "c.jsonl", rows)
    whole = pairs_of(path, tok, "plain", cutoff_len=512)
    cut = pairs_of(path, tok, "plain", cutoff_len=24)
    assert len(whole) == 3 and len(cut) == 2
    err = capsys.readouterr().err
    assert "dropped 2 of 4 rows: 1 with the chosen answer equal to the rejected one, 1 too long for cutoff_len 24" in err
    full, short = whole[0], cut[0]
    assert short.chosen == full.chosen and short.rejected == full.rejected
    assert len(short.prompt) + len(short.rejected) == 24  # the longer answer fills what the prompt left
    assert short.prompt[0] == tok.bos_id and short.prompt[1:] == full.prompt[len(full.prompt) - 23 + len(full.rejected):]
    assert cut[1] == whole[1]


def test_collate_puts_chosen_rows_then_rejected_rows(tok):
    pairs = [PairExample([1, 5, 6], [7, 2], [8, 9, 2], ref=(-1.0, -2.0)),
             PairExample([1, 5], [10, 11, 12, 2], [13, 2], ref=(-3.0, -4.0))]
    b = collate(pairs, 0, "dpo")
    assert b["tokens"].tolist() == [[0, 1, 5, 6, 7, 2], [1, 5, 10, 11, 12, 2], [1, 5, 6, 8, 9, 2], [0, 0, 1, 5, 13, 2]]
    assert b["labels"].tolist() == [[-100] * 4 + [7, 2], [-100] * 2 + [10, 11, 12, 2], [-100] * 3 + [8, 9, 2],
                                    [-100] * 4 + [13, 2]]
    assert b["pad_lens"].tolist() == [1, 0, 0, 2]
    assert b["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]
    assert "ref_logps" not in collate([PairExample([1], [2], [3])], 0, "rm")


@pytest.mark.parametrize("task", ["sft", "pt", "cls"])
def test_a_preference_file_names_the_tasks_that_read_it(tmp_path, tok, task):
    path = write(tmp_path / "p.jsonl", [{"instruction": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(LlamaInputError, match=rf"{path}:1: a preference row \(chosen/rejected\), which task {task} "
                                              "does not read: tasks rm and dpo do"):
        load_examples(path, tok, DataConfig(task, "plain"))


def test_sft_rows_are_refused_by_dpo(tmp_path, tok):
    path = write(tmp_path / "s.jsonl", [{"instruction": "Q", "output": "a"}])
    with pytest.raises(LlamaInputError, match=r"task dpo needs preference rows \(chosen and rejected answers\)"):
        load_examples(path, tok, DataConfig("dpo", "plain"))


def test_a_row_without_rejected_names_its_line(tmp_path, tok, capsys):
    path = write(tmp_path / "m.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "a"}])
    with pytest.raises(LlamaInputError, match=rf"{path}:2: missing 'rejected'"):
        load_examples(path, tok, DataConfig("dpo", "plain", strict=True))
    assert len(load_examples(path, tok, DataConfig("dpo", "plain"))[0]) == 1
    assert f"warning: skipping {path}:2: missing 'rejected'" in capsys.readouterr().err


def test_every_pair_unusable_says_how_many_and_why(tmp_path, tok):
    path = write(tmp_path / "u.jsonl", [{"prompt": "Q", "chosen": "a " * 30, "rejected": "b"},
                                        {"prompt": "Q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(LlamaInputError) as e:
        load_examples(path, tok, DataConfig("rm", "plain", cutoff_len=16))
    assert str(e.value) == (f"{path}: no usable pairs: dropped 2 of 2 rows: 1 with the chosen answer equal to the "
                            "rejected one, 1 too long for cutoff_len 16 (the longer answer does not fit after bos)")
