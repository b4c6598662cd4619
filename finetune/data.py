"""Training data: read JSON/JSONL rows, render them with a prompt template, tokenize with prompt
tokens masked, cut to cutoff_len, optionally pack, and batch with left padding.

Row formats (detected from the first row's keys):
    alpaca    {"instruction", "input"?, "output"}
    sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value"}]}
    text      {"text"}                      (task pt: plain language modelling)
    labelled  {"text", "label"}             (tasks cls and regression)
    preference, for tasks rm and dpo: a prompt and two answers, the chosen one preferred:
              {"instruction", "input"?, "chosen", "rejected"}          (LLaMA-Factory's ranking rows)
              {"prompt", "chosen", "rejected"}                         (TRL's; strings, or lists of
                                                                        {"role", "content"} messages)
              {"chosen", "rejected"}  whole conversations, their common prefix the prompt
                                      (Anthropic HH: text; or lists of messages)
              {"conversations", "chosen", "rejected"}                  (sharegpt: the answers are
                                                                        {"from": "gpt", "value"} messages)
"""

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llama.chat import llama3_content, llama3_header, llama3_message
from llama.errors import LlamaInputError
from llama.tokenizers import Tokenizer

IGNORE = -100
ALPACA_PREAMBLE = {
    True: "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n",
    False: "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
}
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("alpaca", "vicuna", "llama2-chat", "llama3-chat", "plain")


PAIR_TASKS = ("rm", "dpo")  # tasks that read preference pairs


@dataclass
class Example:
    """One tokenized sample: ids [seq], labels [seq] (token ids with IGNORE on prompt slots for LM
    tasks; one class id or float for cls/regression), and where the first answer starts."""
    ids: list[int]
    labels: list[int] | int | float
    prompt_len: int = 0


@dataclass
class PairExample:
    """One tokenized preference pair: the prompt's ids (bos first) and the two answers' ids (each
    ending as an SFT answer does: eos, or <|eot_id|>), rendered exactly as SFT renders them.
    ref: the reference model's summed answer log-probs (chosen, rejected), once precomputed."""
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref: tuple[float, float] | None = None

    def sequences(self) -> tuple[Example, Example]:
        """(chosen, rejected) as SFT examples: the loss on the answer's tokens only."""
        return tuple(Example(self.prompt + answer, [IGNORE] * len(self.prompt) + answer, len(self.prompt))
                     for answer in (self.chosen, self.rejected))


# --- reading ---------------------------------------------------------------------------------


def read_rows(path, strict: bool) -> tuple[list[tuple[str, dict]], int]:
    """([(where, row)], how many malformed rows were skipped) from a JSON array or JSONL file;
    `where` is "file:line" for error messages. A malformed row is fatal with strict, else reported
    on stderr and skipped."""
    path = Path(path)
    if not path.is_file():
        raise LlamaInputError(f"{path}: data file not found")
    text = path.read_text(encoding="utf-8")
    rows, bad = [], []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlamaInputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, item in enumerate(items):
            (rows if isinstance(item, dict) else bad).append((f"{path}[{i}]", item))
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append((f"{path}:{lineno}", f"not valid JSON ({e.msg})"))
                continue
            (rows if isinstance(item, dict) else bad).append((f"{path}:{lineno}", item))
    for where, why in bad:
        report(f"{where}: {why if isinstance(why, str) else 'row is not a JSON object'}", strict)
    return rows, len(bad)


def report(message: str, strict: bool) -> None:
    if strict:
        raise LlamaInputError(message)
    print(f"warning: skipping {message}", file=sys.stderr)


def detect_row_format(row: dict) -> str:
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "text" in row:
        return "labelled" if "label" in row else "text"
    raise LlamaInputError(f"cannot tell the data format from keys {sorted(row)}: expected alpaca "
                          "(instruction/output), sharegpt (conversations), text, text + label, or "
                          "preference pairs (chosen/rejected)")


def conversation(row: dict, fmt: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(system prompt or None, [(user, assistant)]) from an alpaca or sharegpt row."""
    if fmt == "alpaca":
        user = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
        return None, [(user, row["output"])]
    system, turns, pending = None, [], None
    for msg in row["conversations"]:
        who, value = msg["from"], msg["value"]
        if who == "system":
            system = value
        elif who in ("human", "user"):
            pending = value
        elif who in ("gpt", "assistant") and pending is not None:
            turns.append((pending, value))
            pending = None
        else:
            raise ValueError(f"unexpected turn from {who!r}")
    if not turns:
        raise ValueError("no human/gpt turn pair")
    return system, turns


# --- templates -------------------------------------------------------------------------------


def render(template: str, system: str | None, turns: list[tuple[str, str]], alpaca_row: dict | None = None,
           tokenizer: Tokenizer | None = None):
    """[(text, is_answer, new_round)] pieces of a conversation in a prompt template. Text answers
    end with eos; new_round marks a piece that starts with bos (Llama-2 chat's later rounds).
    llama3-chat's pieces are token ids already (Meta's ChatFormat, llama/chat.py: special
    tokens, each answer ending in <|eot_id|>), so it needs the tokenizer."""
    pieces = []
    for i, (user, answer) in enumerate(turns):
        if template == "alpaca":
            if alpaca_row is not None and alpaca_row.get("input"):
                body = f"### Instruction:\n{alpaca_row['instruction']}\n\n### Input:\n{alpaca_row['input']}\n\n### Response:"
            else:
                body = f"### Instruction:\n{user}\n\n### Response:"
            head = ALPACA_PREAMBLE[bool(alpaca_row and alpaca_row.get("input"))] if i == 0 else "\n\n"
            pieces += [(head + body, False, False), (answer, True, False)]
        elif template == "vicuna":
            head = f"{system or VICUNA_SYSTEM} USER: {user} ASSISTANT:" if i == 0 else f" USER: {user} ASSISTANT:"
            pieces += [(head, False, False), (answer, True, False)]
        elif template == "llama2-chat":
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}" if i == 0 and system else user
            # Meta's format encodes `[INST] {user} [/INST] {answer} ` whole: the answer keeps its
            # trailing space (a "▁" token before </s> with Llama-2's tokenizer)
            pieces += [(f"[INST] {user.strip()} [/INST]", False, i > 0), (answer.strip() + " ", True, False)]
        elif template == "llama3-chat":
            if i == 0 and system:
                pieces.append((llama3_message(tokenizer, "system", system), False, False))
            pieces += [(llama3_message(tokenizer, "user", user) + llama3_header(tokenizer, "assistant"), False, False),
                       (llama3_content(tokenizer, answer), True, False)]
        elif template == "plain":
            pieces += [(user + "\n", False, False), (answer, True, False)]
        else:
            raise LlamaInputError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    return pieces


def resolve_template(template: str, tokenizer: Tokenizer) -> str:
    """"auto": Llama-3's chat format for a Llama-3 vocabulary, alpaca otherwise."""
    if template != "auto":
        return template
    return "llama3-chat" if tokenizer.chat_format == "llama3" else "alpaca"


def prompt_for(template: str, user: str) -> str:
    """The text a template puts before the answer to a single user message (for generation).
    llama3-chat is a chat format of special tokens: generate with chat_completion instead."""
    if template == "llama3-chat":
        raise LlamaInputError("llama3-chat prompts are dialogs of special tokens: use chat completion (--chat)")
    return "".join(text for text, is_answer, _ in render(template, None, [(user, "")]) if not is_answer)


def tokenize_pieces(tokenizer: Tokenizer, pieces, train_on_prompt: bool) -> Example:
    ids, labels, prompt_len = [tokenizer.bos_id], [IGNORE], None
    for text, is_answer, new_round in pieces:
        toks = text if isinstance(text, list) else tokenizer.encode(text, bos=new_round, eos=is_answer)
        if is_answer and prompt_len is None:
            prompt_len = len(ids)
        ids += toks
        labels += toks if (is_answer or train_on_prompt) else [IGNORE] * len(toks)
    return Example(ids, labels, prompt_len or len(ids))


# --- datasets --------------------------------------------------------------------------------


@dataclass
class DataConfig:
    task: str = "sft"
    template: str = "alpaca"
    train_on_prompt: bool = False
    cutoff_len: int = 512
    strict: bool = False
    label_names: tuple[str, ...] = ()  # cls: class names in label order (default: sorted labels seen)


def load_examples(path, tokenizer: Tokenizer, cfg: DataConfig) -> tuple[list, list[str]]:
    """Read and tokenize a file for cfg.task. Returns (examples, class names for cls); the
    examples are PairExamples for the preference tasks (rm, dpo)."""
    if cfg.task in ("sft",) + PAIR_TASKS:
        check_cutoff_len(cfg, tokenizer)
    rows, malformed = read_rows(path, cfg.strict)
    if not rows:
        raise LlamaInputError(f"{path}: no usable rows" + (f": {dropped_rows(malformed, malformed, 0, cfg)}"
                                                           if malformed else " (the file holds no data)"))
    fmt = detect_row_format(rows[0][1])
    wanted = {"sft": ("alpaca", "sharegpt"), "pt": ("text", "labelled"), "cls": ("labelled",), "regression": ("labelled",),
              "rm": ("preference",), "dpo": ("preference",)}
    if cfg.task not in wanted:
        raise LlamaInputError(f"unknown task {cfg.task!r}; choose from {', '.join(wanted)}")
    if fmt not in wanted[cfg.task]:
        where, keys = rows[0][0], sorted(rows[0][1])
        if fmt == "preference":
            raise LlamaInputError(f"{where}: a preference row (chosen/rejected), which task {cfg.task} does not read: "
                                  f"tasks {' and '.join(PAIR_TASKS)} do")
        need = "a 'label' column" if cfg.task in ("cls", "regression") else \
            "preference rows (chosen and rejected answers)" if cfg.task in PAIR_TASKS else f"{' or '.join(wanted[cfg.task])} rows"
        raise LlamaInputError(f"{where}: task {cfg.task} needs {need}, but the row has keys {keys}")
    if cfg.task in PAIR_TASKS:
        return load_pairs(path, rows, malformed, tokenizer, cfg), []
    label_names = list(cfg.label_names)
    if cfg.task == "cls" and not label_names:
        label_names = sorted({str(r["label"]) for _, r in rows if "label" in r})
    examples, too_long, total = [], 0, len(rows) + malformed
    for where, row in rows:
        try:
            ex = make_example(row, fmt, tokenizer, cfg, label_names)
        except LlamaInputError:
            raise  # a bad setting (e.g. the template), not a bad row
        except (KeyError, TypeError, ValueError) as e:
            missing = f"missing {e}" if isinstance(e, KeyError) else str(e)
            report(f"{where}: {missing}", cfg.strict)
            malformed += 1
            continue
        if cfg.task == "pt":
            examples += split_long(ex, cfg.cutoff_len)
            continue
        if len(ex.ids) > cfg.cutoff_len:
            if cfg.task == "sft" and ex.prompt_len >= cfg.cutoff_len:
                too_long += 1  # nothing left to learn from after the cut
                continue
            ex = Example(ex.ids[: cfg.cutoff_len], ex.labels[: cfg.cutoff_len] if cfg.task == "sft" else ex.labels,
                         ex.prompt_len)
        examples.append(ex)
    if not examples:
        raise LlamaInputError(f"{path}: no usable rows: {dropped_rows(total, malformed, too_long, cfg)}")
    if too_long:
        print(f"warning: {path}: {dropped_rows(total, 0, too_long, cfg)}", file=sys.stderr)
    return examples, label_names


def load_pairs(path, rows: list, malformed: int, tokenizer: Tokenizer, cfg: DataConfig) -> list[PairExample]:
    """The preference rows of a file as pairs that fit cutoff_len. Malformed rows are reported
    (fatal with strict); pairs whose answers are the same, or whose longer answer does not fit
    cutoff_len, are counted and dropped, in one warning (one error if nothing is left)."""
    pairs, same, too_long, total = [], 0, 0, len(rows) + malformed
    for where, row in rows:
        try:
            pair = make_pair(row, tokenizer, cfg.template)
        except LlamaInputError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            report(f"{where}: {f'missing {e}' if isinstance(e, KeyError) else e}", cfg.strict)
            malformed += 1
            continue
        if pair.chosen == pair.rejected:
            same += 1  # no preference to learn: both terms of the loss cancel
            continue
        fitted = fit_pair(pair, cfg.cutoff_len)
        if fitted is None:
            too_long += 1
            continue
        pairs.append(fitted)
    dropped = dropped_rows(total, malformed, too_long, cfg, same)
    if not pairs:
        raise LlamaInputError(f"{path}: no usable pairs: {dropped}")
    if same or too_long:
        print(f"warning: {path}: {dropped_rows(total, 0, too_long, cfg, same)}", file=sys.stderr)
    return pairs


def dropped_rows(total: int, malformed: int, too_long: int, cfg: DataConfig, same: int = 0) -> str:
    """"dropped 7 of 10 rows: 2 malformed (warned above), 5 too long for cutoff_len 64 (...)"."""
    reasons = []
    if malformed:
        reasons.append(f"{malformed} malformed (warned above)")
    if same:
        reasons.append(f"{same} with the chosen answer equal to the rejected one")
    if too_long:
        why = "the longer answer does not fit after bos" if cfg.task in PAIR_TASKS else \
            "the prompt fills it: no answer tokens left"
        reasons.append(f"{too_long} too long for cutoff_len {cfg.cutoff_len} ({why})")
    return f"dropped {malformed + same + too_long} of {total} rows: {', '.join(reasons)}"


def check_cutoff_len(cfg: DataConfig, tokenizer: Tokenizer) -> None:
    """Refuse a cutoff_len that the template's own prompt fills, before reading any data: no
    sample could keep an answer token."""
    pieces = render(cfg.template, None, [("", "")], None, tokenizer)
    prompt_len = tokenize_pieces(tokenizer, pieces, False).prompt_len
    if cfg.cutoff_len <= prompt_len:
        raise LlamaInputError(f"cutoff_len {cfg.cutoff_len} leaves no room for an answer: the {cfg.template} "
                              f"template's own prompt is {prompt_len} token{'s' * (prompt_len != 1)} before any instruction")


def make_example(row: dict, fmt: str, tokenizer: Tokenizer, cfg: DataConfig, label_names: list[str]) -> Example:
    if cfg.task == "sft":
        system, turns = conversation(row, fmt)
        pieces = render(cfg.template, system, turns, row if fmt == "alpaca" else None, tokenizer)
        return tokenize_pieces(tokenizer, pieces, cfg.train_on_prompt)
    text = row["text"]
    if not isinstance(text, str) or not text:
        raise ValueError("empty or non-string 'text'")
    ids = tokenizer.encode(text, bos=True, eos=cfg.task == "pt")
    if cfg.task == "pt":
        return Example(ids, [IGNORE] + ids[1:])
    label = row["label"]
    if cfg.task == "regression":
        value = float(label)
        if not math.isfinite(value):
            raise ValueError(f"label {label!r} is not a finite number")
        return Example(ids, value)
    if str(label) not in label_names:
        raise ValueError(f"label {label!r} is not one of {label_names}")
    return Example(ids, label_names.index(str(label)))


ROLES = {"system": "system", "human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def as_sharegpt(messages) -> list[dict]:
    """Messages as {"role", "content"} (TRL, OpenAI) or {"from", "value"} (sharegpt) -> sharegpt's."""
    if not isinstance(messages, list):
        raise TypeError(f"expected a list of messages, got {type(messages).__name__}")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError("a message is not a JSON object")
        who, text = (m["role"], m["content"]) if "role" in m else (m["from"], m["value"])
        if who not in ROLES or not isinstance(text, str):
            raise ValueError(f"unexpected message from {who!r}")
        out.append({"from": ROLES[who], "value": text})
    return out


def answer_text(answer) -> str:
    """A chosen/rejected answer: a string, one message, or a list ending in the assistant's message."""
    if isinstance(answer, str):
        return answer
    message = as_sharegpt(answer if isinstance(answer, list) else [answer])[-1]
    if message["from"] != "gpt":
        raise ValueError("the answer's last message is not the assistant's")
    return message["value"]


def make_pair(row: dict, tokenizer: Tokenizer, template: str) -> PairExample:
    """A preference row in any of the forms of the module docstring -> its tokenized pair. The
    prompt and each answer are rendered with the template as an SFT conversation ending in that
    answer; whole-conversation text (HH) is tokenized as it is, its common prefix the prompt."""
    chosen, rejected = row["chosen"], row["rejected"]
    if "instruction" in row:  # LLaMA-Factory: the prompt as alpaca renders it
        history, alpaca_row = [], row
        system, ((user, _),) = conversation({**row, "output": ""}, "alpaca")
    else:
        alpaca_row = None
        if "conversations" in row:
            history = as_sharegpt(row["conversations"])
        elif "prompt" in row:
            prompt = row["prompt"]
            history = [{"from": "human", "value": prompt}] if isinstance(prompt, str) else as_sharegpt(prompt)
        elif isinstance(chosen, str) and isinstance(rejected, str):
            return text_pair(tokenizer, chosen, rejected)
        else:  # whole conversations as messages: the common messages are the prompt
            chosen, rejected = as_sharegpt(chosen), as_sharegpt(rejected)
            shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
            history, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            if len(chosen) != 1 or len(rejected) != 1:
                raise ValueError("chosen and rejected conversations must differ in their last message only")
        if not history or history[-1]["from"] != "human":
            raise ValueError("the prompt must end with a user message")
    seqs = []
    for answer in (answer_text(chosen), answer_text(rejected)):
        if alpaca_row is None:
            system, turns = conversation({"conversations": history + [{"from": "gpt", "value": answer}]}, "sharegpt")
        else:
            turns = [(user, answer)]
        pieces = render(template, system, turns, alpaca_row, tokenizer)
        prompt = tokenize_pieces(tokenizer, pieces[:-1], False).ids  # everything before the last answer
        seqs.append((prompt, tokenize_pieces(tokenizer, pieces, False).ids[len(prompt):]))
    (prompt, chosen_ids), (_, rejected_ids) = seqs
    return PairExample(prompt, chosen_ids, rejected_ids)


def text_pair(tokenizer: Tokenizer, chosen: str, rejected: str) -> PairExample:
    """Whole conversations as text (Anthropic HH): the common prefix is the prompt. As TRL does, a
    space that ends the prefix goes to the answers, so each answer starts with its own word."""
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if 0 < n and chosen[n - 1] == " ":
        n -= 1
    if n == 0:
        raise ValueError("chosen and rejected share no prompt")
    prompt = tokenizer.encode(chosen[:n], bos=True, eos=False)
    return PairExample(prompt, tokenizer.encode(chosen[n:], bos=False, eos=True),
                       tokenizer.encode(rejected[n:], bos=False, eos=True))


def fit_pair(pair: PairExample, cutoff_len: int) -> PairExample | None:
    """The pair with its prompt cut to fit cutoff_len: tokens are dropped from the prompt's start
    (after bos), keeping the words nearest the answers; None if the longer answer alone does not
    fit after bos."""
    room = cutoff_len - max(len(pair.chosen), len(pair.rejected))
    if room < 1:
        return None
    if len(pair.prompt) <= room:
        return pair
    return replace(pair, prompt=pair.prompt[:1] + pair.prompt[len(pair.prompt) - room + 1:])


def split_long(ex: Example, cutoff_len: int) -> list[Example]:
    """pt: a long text becomes several rows of cutoff_len tokens rather than being cut."""
    chunks = [ex.ids[i:i + cutoff_len] for i in range(0, len(ex.ids), cutoff_len)]
    # each chunk is a row of its own: its first token has nothing before it to be predicted from
    return [Example(ids, [IGNORE] + ids[1:]) for ids in chunks if len(ids) > 1]


def pack(examples: list[Example], cutoff_len: int) -> list[list[Example]]:
    """Greedily fill rows of at most cutoff_len tokens with whole samples, in order."""
    rows, row, used = [], [], 0
    for ex in examples:
        if row and used + len(ex.ids) > cutoff_len:
            rows.append(row)
            row, used = [], 0
        row.append(ex)
        used += len(ex.ids)
    return rows + ([row] if row else [])


# --- batching --------------------------------------------------------------------------------


def collate(items: list, pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Left-pad a batch. Items are Examples, or lists of Examples (packed rows).
    Returns tokens [batch, seq], labels, and pad_lens [batch] or segment_ids [batch, seq].
    Preference pairs (tasks rm, dpo) become one batch of 2 * pairs rows, every pair's chosen
    sequence first, then the rejected ones in the same order (one forward for both): tokens and
    labels [2 * pairs, seq] (labels on the answers only), pad_lens [2 * pairs], and ref_logps
    [2 * pairs] when every pair has its reference log-probs precomputed."""
    if task in PAIR_TASKS:
        chosen, rejected = zip(*(pair.sequences() for pair in items))
        batch = collate(list(chosen + rejected), pad_id, "sft")
        if all(pair.ref is not None for pair in items):
            batch["ref_logps"] = torch.tensor([p.ref[0] for p in items] + [p.ref[1] for p in items], dtype=torch.float64)
        return batch
    packed = isinstance(items[0], list)
    rows = [[t for ex in item for t in ex.ids] if packed else item.ids for item in items]
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, ids in enumerate(rows):
        tokens[b, width - len(ids):] = torch.tensor(ids)
    batch = {"tokens": tokens}
    if task in ("sft", "pt"):
        labels = torch.full_like(tokens, IGNORE)
        for b, item in enumerate(items):
            lab = [t for ex in item for t in ex.labels] if packed else item.labels
            labels[b, width - len(lab):] = torch.tensor(lab)
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([item.labels for item in items],
                                       dtype=torch.long if task == "cls" else torch.float32)
    if packed:
        seg = torch.full_like(tokens, -1)  # padding is a segment of its own
        for b, item in enumerate(items):
            ids = torch.cat([torch.full((len(ex.ids),), k) for k, ex in enumerate(item)])
            seg[b, width - len(ids):] = ids
        batch["segment_ids"] = seg
    else:
        batch["pad_lens"] = torch.tensor([width - len(ids) for ids in rows])
    return batch


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The sample order of one epoch: a permutation fixed by (seed, epoch), so a resumed run
    replays it without saving it."""
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()


def micro_batch(items: list, global_size: int, index: int, seed: int, shuffle: bool, dp_rank: int, dp_size: int) -> list:
    """The items this data-parallel rank trains on in global micro-batch `index` (counted across
    epochs). Each global micro-batch holds global_size items; rank r takes its r-th slice, so N
    ranks with batch b see exactly what one process with batch N*b sees. The last partial
    batch of an epoch is dropped (a different one each epoch); len(items) >= global_size."""
    per_epoch = len(items) // global_size
    epoch, k = divmod(index, per_epoch)
    order = epoch_order(len(items), seed, epoch, shuffle)
    chunk = order[k * global_size:(k + 1) * global_size]
    local = global_size // dp_size
    return [items[i] for i in chunk[dp_rank * local:(dp_rank + 1) * local]]
