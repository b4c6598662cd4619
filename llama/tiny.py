"""A tiny random LLaMA and a sentencepiece tokenizer trained on generated text, for the quick
start and the tests: no downloads.

    python -m llama.tiny --out ckpts/tiny
"""
import argparse
import io
import random
from pathlib import Path

import sentencepiece as spm
import torch

from llama.formats import save_checkpoint
from llama.config import ModelArgs
from llama.files import atomic_write_bytes
from llama.model import Transformer

_WORDS = {
    "adj": "small red quick lazy bright quiet old young green happy".split(),
    "noun": "cat dog bird river tree house robot garden city model".split(),
    "verb": "sees finds follows likes paints builds answers watches".split(),
}


def corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    """Simple sentences and sums, deterministic for a seed."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        if rng.random() < 0.5:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"What is {a} plus {b}? The answer is {a + b}.")
        else:
            w = {k: rng.choice(v) for k, v in _WORDS.items()}
            lines.append(f"The {w['adj']} {w['noun']} {w['verb']} the {rng.choice(_WORDS['noun'])}.")
    return lines


def train_tokenizer(path, vocab_size: int = 384, seed: int = 0, lines: list[str] | None = None) -> None:
    """BPE sentencepiece model with byte fallback (any text encodes), LLaMA's ids: unk 0, bos 1,
    eos 2; trained on `lines` (default: the generated corpus)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines or corpus(seed=seed)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
    )
    atomic_write_bytes(path, model.getvalue())


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    for name, p in model.named_parameters():
        if not name.endswith("norm.weight"):
            torch.nn.init.normal_(p, std=0.02 if p.ndim == 2 else 1.0)
    return model


def make_tiny(out_dir, dim: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, seed: int = 0) -> Path:
    """Write tokenizer.model + params.json + consolidated.00.safetensors into out_dir."""
    out = Path(out_dir)
    train_tokenizer(out / "tokenizer.model", seed=seed)
    vocab = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab, multiple_of=32)
    save_checkpoint(random_model(args, seed), out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ckpts/tiny", help="folder to write the checkpoint and tokenizer into")
    parser.add_argument("--dim", type=int, default=64, help="model width")
    parser.add_argument("--n_layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--n_heads", type=int, default=4, help="attention heads")
    parser.add_argument("--n_kv_heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the tokenizer corpus")
    a = parser.parse_args(argv)
    out = make_tiny(a.out, a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.seed)
    print(f"wrote {out}/ (random weights): try `python example.py --ckpt_dir {out}`")


if __name__ == "__main__":
    main()
