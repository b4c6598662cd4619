"""GPTQ against round-to-nearest: held-out perplexity of a small pretrained LLaMA in float, RTN
int4 and GPTQ int4 (with and without act-order), at group size 128 and per channel.

    python bench/quant_ppl.py            # builds the model once in ckpts/bench-quant (a few minutes)

The model (dim 256, FFN 768 so group 128 divides every layer, 4 layers) is pretrained for one
epoch on llama.tiny's generated corpus (random sentences and two-digit sums: text with real
uncertainty left in it, where quantization error shows). GPTQ calibrates on windows of that
training text; perplexity is measured on lines generated with another seed. A small model trained
briefly barely notices 4 bits, so each setting also runs on the same model with LLaMA-like
outlier features added by a function-preserving rescale (add_outlier_features), where
quantization error shows. Appends one JSON row to bench/results.jsonl.
"""
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from common import ROOT, append_row  # puts the repo on sys.path

MODEL_DIR = ROOT / "ckpts" / "bench-quant"
MODEL_ARGS = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=256)

from finetune.config import TrainConfig  # noqa: E402
from finetune.trainer import train  # noqa: E402
from llama.formats import read_model_args, save_checkpoint  # noqa: E402
from llama.loader import load_model  # noqa: E402
from llama.config import ModelArgs  # noqa: E402
from llama.tiny import corpus, random_model, train_tokenizer  # noqa: E402
from llama.tokenizers import Tokenizer  # noqa: E402
from quant.gptq import quantize_checkpoint  # noqa: E402


def add_outlier_features(model, n: int = 4, gain: float = 10.0) -> None:
    """The outlier features of real LLMs (LLM.int8, SmoothQuant) on a function-preserving
    rescale: n residual channels' RMSNorm gains times `gain`, the matching input columns of the
    linears they feed divided by it. The float model is unchanged; the quantizers see activations
    `gain` times larger in those channels, as they do in LLaMA."""
    chans = torch.randperm(model.args.dim, generator=torch.Generator().manual_seed(1))[:n]
    with torch.no_grad():
        for block in model.layers:
            block.attention_norm.weight[chans] *= gain
            block.ffn_norm.weight[chans] *= gain
            for lin in (block.attention.wq, block.attention.wk, block.attention.wv, block.feed_forward.w1,
                        block.feed_forward.w3):
                lin.weight[:, chans] /= gain


def build_model(out: Path) -> Path:
    """Tokenizer + random model + one epoch of full pretraining on corpus(seed=0), once."""
    if (out / "params.json").is_file():
        return out
    work = out.with_name(out.name + ".build")
    shutil.rmtree(work, ignore_errors=True)
    lines = corpus(4000, seed=0)
    train_tokenizer(work / "init" / "tokenizer.model", vocab_size=512, lines=lines)
    args = ModelArgs(vocab_size=Tokenizer(work / "init" / "tokenizer.model").n_words, **MODEL_ARGS)
    save_checkpoint(random_model(args, seed=0), work / "init")
    (work / "pretrain.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    train(TrainConfig(ckpt_dir=str(work / "init"), dtype="float32", device="cpu", method="full", task="pt",
                      train_file=str(work / "pretrain.jsonl"), eval_split=0.02, cutoff_len=64, out_dir=str(work / "run"),
                      seed=0, micro_batch_size=16, epochs=1.0, lr=2e-3, warmup_ratio=0.05, save_every=0,
                      resume="none").check())
    shutil.copy(work / "init" / "tokenizer.model", work / "run" / "model" / "tokenizer.model")
    (work / "run" / "model").rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out


@torch.no_grad()
def perplexity(model, rows: list[list[int]], batch_size: int = 32) -> float:
    """exp(mean next-token loss) over rows (bos ... eos, as in pretraining), left-padded in batches."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(map(len, batch))
        pad = torch.tensor([width - len(r) for r in batch])
        x = torch.tensor([[0] * (width - len(r)) + r for r in batch])
        logits = model(x, pad_lens=pad)
        targets = x[:, 1:].masked_fill(torch.arange(1, width)[None] < pad[:, None] + 1, -100)
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += int((targets != -100).sum())
    return math.exp(total / count)


def main() -> None:
    ckpt = build_model(MODEL_DIR)
    tokenizer = Tokenizer(ckpt / "tokenizer.model")
    held_out = [tokenizer.encode(line, bos=True, eos=True) for line in corpus(1000, seed=1)]
    ids = tokenizer.encode(" ".join(corpus(4000, seed=0)), bos=True, eos=False)
    seq, n = 128, 64
    stride = (len(ids) - seq) // (n - 1)
    calib = torch.tensor([ids[i * stride:i * stride + seq] for i in range(n)])

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        outliers = Path(tmp) / "outliers"
        model = load_model(ckpt, read_model_args(ckpt))
        add_outlier_features(model)
        save_checkpoint(model, outliers)
        for variant, path in (("plain", ckpt), ("outliers", outliers)):
            results[f"{variant} float"] = perplexity(load_model(path, read_model_args(path)), held_out)
            print(f"{variant + ' float32':<30} ppl {results[f'{variant} float']:.5f}")
            for group_size in (128, -1):
                for method, act_order in (("rtn", False), ("gptq", False), ("gptq", True)):
                    name = f"{variant} {method}{'+act_order' if act_order else ''} g{group_size}"
                    model, _ = quantize_checkpoint(path, method, group_size, act_order, calib=calib, progress=False)
                    results[name] = perplexity(model, held_out)
                    change = results[name] / results[f"{variant} float"] - 1
                    print(f"{name:<30} ppl {results[name]:.5f}  ({change:+.4%} vs float)")
    append_row("quant_ppl", {"model": MODEL_ARGS, "calibration": f"{n} windows of {seq} tokens",
                             "held_out_tokens": sum(map(len, held_out)),
                             "perplexity": {k: round(v, 6) for k, v in results.items()}}, "bench/quant_ppl.py")


if __name__ == "__main__":
    main()
