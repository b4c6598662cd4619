"""The embedded demo: a synthetic instruction task bundled in data/demo/, and a tiny LLaMA plus a
sentencepiece tokenizer built from it on first use (no downloads).

The task: questions about made-up facts ("What color is the banana?" -> "yellow"), asked in
several phrasings. Each fact's training rows use some phrasings; the eval rows ask the same fact
in a phrasing held out from training, so exact match measures more than recall of seen strings.

    python -m finetune.demo --data data/demo     # regenerate the bundled data (deterministic)
"""
import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

import sentencepiece as spm
import torch.distributed as dist

from llama.formats.ours import save_checkpoint
from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.files import atomic_write_bytes
from llama.tiny import corpus, random_model, train_tokenizer
from finetune.config import TrainConfig, load_config
from finetune.data import ALPACA_PREAMBLE
from finetune.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data" / "demo"
MODEL_DIR = ROOT / "ckpts" / "demo"
DEMO_ARGS = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32)

FACTS = {  # object: (color, home)
    "banana": ("yellow", "kitchen"), "frog": ("green", "pond"), "crow": ("black", "forest"),
    "tomato": ("red", "garden"), "swan": ("white", "lake"), "plum": ("purple", "orchard"),
    "fox": ("orange", "forest"), "whale": ("blue", "ocean"), "pig": ("pink", "farm"),
    "bear": ("brown", "cave"), "lemon": ("yellow", "orchard"), "snow": ("white", "mountain"),
    "grass": ("green", "field"), "crab": ("red", "beach"), "mouse": ("gray", "barn"),
    "owl": ("brown", "tree"), "shark": ("gray", "ocean"), "camel": ("brown", "desert"),
    "lime": ("green", "kitchen"), "flamingo": ("pink", "lake"), "raven": ("black", "cave"),
    "cherry": ("red", "orchard"), "goose": ("white", "farm"), "eel": ("black", "river"),
}
QUESTIONS = {
    "color": ["What color is the {o}?", "Tell me the color of the {o}.", "Which color does the {o} have?",
              "The {o} has what color?"],
    "home": ["Where does the {o} live?", "Where can you find the {o}?", "Name the home of the {o}.",
             "The {o} lives where?"],
}


def demo_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) alpaca rows: per fact and attribute, one phrasing is held out for eval."""
    rng = random.Random(seed)
    train, held_out = [], []
    for obj, (color, home) in FACTS.items():
        for attr, answer in (("color", color), ("home", home)):
            phrasings = QUESTIONS[attr][:]
            rng.shuffle(phrasings)
            rows = [{"instruction": q.format(o=obj), "input": "", "output": answer} for q in phrasings]
            held_out.append(rows[0])
            train += rows[1:]
    rng.shuffle(train)
    return train, held_out


# The preference demo's facts, told by no other demo file: what each object eats (another
# object: words the demo tokenizer holds whole, so each answer is one token and eos). Before DPO
# the SFT model can only guess which of two foods is right; the pairs teach it.
FOODS = {
    "banana": "mouse", "frog": "cherry", "crow": "tomato", "tomato": "grass", "swan": "bird", "plum": "shark",
    "fox": "swan", "whale": "banana", "pig": "cherry", "bear": "grass", "lemon": "bird", "snow": "tomato",
    "grass": "mouse", "crab": "banana", "mouse": "shark", "owl": "swan", "shark": "tomato", "camel": "grass",
    "lime": "cherry", "flamingo": "mouse", "raven": "banana", "cherry": "bird", "goose": "shark", "eel": "swan",
}
FOOD_QUESTIONS = ["What does the {o} eat?", "Tell me what the {o} eats.", "Name the food of the {o}.",
                  "The {o} eats what?"]


def preference_rows(seed: int = 0, wrong_per_question: int = 2) -> tuple[list[dict], list[dict]]:
    """(train, eval) preference rows (LLaMA-Factory's ranking form): the right food chosen over a
    wrong one drawn from the other objects' foods. Per object one phrasing is held out for eval,
    as in demo_rows."""
    rng = random.Random(seed)
    foods = sorted(set(FOODS.values()))
    train, held_out = [], []
    for obj, food in FOODS.items():
        phrasings = FOOD_QUESTIONS[:]
        rng.shuffle(phrasings)
        for k, q in enumerate(phrasings):
            for wrong in rng.sample([f for f in foods if f != food], wrong_per_question):
                row = {"instruction": q.format(o=obj), "input": "", "chosen": food, "rejected": wrong}
                (held_out if k == 0 else train).append(row)
    rng.shuffle(train)
    return train, held_out


PROSE = ["The {o} is {c}.", "A {o} is {c} and lives in the {h}.", "You can find the {o} in the {h}.",
         "In the {h} there is a {c} {o}.", "The {c} {o} lives in the {h}.", "Every {o} is {c}."]


def pretrain_rows(seed: int = 0, n: int = 1200) -> list[dict]:
    """Plain text stating the facts in prose (never as questions): the demo base model learns
    them here, and fine-tuning then teaches it to answer questions about them."""
    rng = random.Random(seed)
    objects = list(FACTS)
    rows = []
    for _ in range(n):
        o = rng.choice(objects)
        c, h = FACTS[o]
        rows.append({"text": " ".join(rng.choice(PROSE).format(o=o, c=c, h=h) for _ in range(3))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def write_demo_data(folder=DATA_DIR) -> None:
    train, held_out = demo_rows()
    write_jsonl(Path(folder) / "train.jsonl", train)
    write_jsonl(Path(folder) / "eval.jsonl", held_out)
    write_jsonl(Path(folder) / "pretrain.jsonl", pretrain_rows())
    train_pairs, eval_pairs = preference_rows()
    write_jsonl(Path(folder) / "pref_train.jsonl", train_pairs)
    write_jsonl(Path(folder) / "pref_eval.jsonl", eval_pairs)


def demo_model_built(model_dir=MODEL_DIR) -> bool:
    """Whether ensure_demo_model has built the model: the pretraining run writes it as
    merge_format says (hf: config.json; ours: params.json), with its tokenizer."""
    out = Path(model_dir)
    return any((out / f).is_file() for f in ("params.json", "config.json")) and (out / "tokenizer.model").is_file()


def ensure_demo_model(model_dir=MODEL_DIR, data_dir=DATA_DIR, model_args: dict = DEMO_ARGS) -> Path:
    """Build the demo base model unless it is there: a sentencepiece tokenizer trained on the
    generated corpus and the demo data, a random tiny LLaMA, then a short full pretraining (task
    pt) on data/demo/pretrain.jsonl. Every torchrun rank calls this; rank 0 writes the files.
    model_args: the ModelArgs shape (benchmarks build wider variants)."""
    out, data = Path(model_dir), Path(data_dir)
    if demo_model_built(out):
        return out
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    work = out.with_name(out.name + ".build")
    init = work / "init"
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        lines = corpus() + [r["text"] for r in pretrain_rows()] + list(ALPACA_PREAMBLE.values()) * 50
        for name in ("train.jsonl", "eval.jsonl"):
            lines += [" ".join(json.loads(ln).values()) for ln in (data / name).read_text().splitlines() if ln]
        train_tokenizer(init / "tokenizer.model", vocab_size=512, lines=lines)
        vocab = spm.SentencePieceProcessor(model_file=str(init / "tokenizer.model")).vocab_size()
        save_checkpoint(random_model(ModelArgs(vocab_size=vocab, **model_args), seed=0), init)
    else:  # no process group yet: wait for rank 0's files
        deadline = time.time() + 600
        while not (init / "params.json").is_file():
            if time.time() > deadline:
                raise LlamaInputError(f"timed out waiting for rank 0 to write {init}")
            time.sleep(0.5)
    if rank == 0:
        print("building the demo base model: pretraining a random tiny LLaMA on data/demo/pretrain.jsonl")
    cfg = TrainConfig(ckpt_dir=str(init), dtype="float32", device="cpu", method="full", task="pt",
                      train_file=str(data / "pretrain.jsonl"), eval_split=0.05, cutoff_len=128,
                      out_dir=str(work / "pretrain"), seed=0, micro_batch_size=max(1, 16 // world), epochs=2.0,
                      lr=3e-3, warmup_ratio=0.1, save_every=0, resume="none").check()
    train(cfg)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        built = work / "pretrain" / "model"
        shutil.copy(init / "tokenizer.model", built / "tokenizer.model")
        shutil.rmtree(out, ignore_errors=True)
        built.rename(out)
        shutil.rmtree(work, ignore_errors=True)
        print(f"wrote the demo base model to {out}")
    if dist.is_initialized():
        dist.barrier()
    return out


def ensure_demo_adapter(adapter_dir, model_dir=MODEL_DIR) -> Path:
    """The SFT demo's adapter (the start of the DPO demo), trained first when missing: the SFT demo
    (torchrun_configs/demo.toml) with its out_dir the adapter folder's parent."""
    adapter = Path(adapter_dir)
    if (adapter / "adapter_config.json").is_file():
        return adapter
    if adapter.name != "adapter":
        raise LlamaInputError(f"init_adapter {adapter}: no adapter there (the demo builds only an SFT run's adapter/)")
    print(f"building {adapter}: running the SFT demo (torchrun_configs/demo.toml) first")
    train(load_config(["--config", str(ROOT / "torchrun_configs" / "demo.toml"), "--ckpt_dir", str(model_dir),
                       "--out_dir", str(adapter.parent)]))
    return adapter


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA_DIR), help="folder for train.jsonl and eval.jsonl")
    a = p.parse_args(argv)
    write_demo_data(a.data)
    print(f"wrote {a.data}/train.jsonl and eval.jsonl")


if __name__ == "__main__":
    main()
