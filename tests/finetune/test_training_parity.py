"""Issue acceptance: 20 LoRA steps through finetune.trainer.train follow, within 1e-3, the loss
curve of a plain loop written here with HF's LlamaForCausalLM + PEFT (same initial weights, data
order and hyperparameters; the loss, its token-count normalisation over the whole optimizer step,
the warmup + cosine schedule, clipping and AdamW are all this file's own). Gradient accumulation
changes nothing but memory."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

from finetune.adapters import attach  # noqa: E402
from finetune.config import TrainConfig  # noqa: E402
from finetune.data import DataConfig, load_examples  # noqa: E402
from finetune.methods.lora import lora_layers  # noqa: E402
from finetune.trainer import train  # noqa: E402
from llama.formats import save_checkpoint  # noqa: E402
from llama.model import Transformer  # noqa: E402
from llama.tokenizers import Tokenizer  # noqa: E402
from tests.utils import (  # noqa: E402
    ALL_HF, hf_from_ours, make_ours, meta_to_hf_rows, peft_module_name, rope_heads, tiny_args,
)

N_ROWS, STEPS, MICRO, ACCUM, WARMUP, LR, SEED = 40, 20, 4, 2, 3, 5e-3, 7
TOL_CURVE = 1e-3  # trainer vs the plain PEFT loop (issue acceptance)
TOL_ACCUM = 1e-5  # grad_accum 2 x micro 2 vs 1 x 4, both through train()


def alpaca_rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        if i % 3 == 0:  # some rows with an input field, some without
            rows.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)})
        else:
            rows.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"The answer is {a + b}."})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path):
    """A tiny checkpoint (ours, O(1) logits, GQA) with its tokenizer, and alpaca train/eval files."""
    root = tmp_path_factory.mktemp("parity")
    ckpt = root / "ckpt"
    save_checkpoint(make_ours(tiny_args(n_kv_heads=2), seed=21), ckpt)
    shutil.copy(tokenizer_path, ckpt / "tokenizer.model")
    for name, n, seed in (("train", N_ROWS, 1), ("eval", 6, 2)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(n, seed)))
    return root


def config(root, out: str, **overrides) -> TrainConfig:
    base = dict(ckpt_dir=str(root / "ckpt"), dtype="float32", precision="fp32", method="lora",
                lora_targets=["all-linear"], lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                train_file=str(root / "train.jsonl"), eval_file=str(root / "eval.jsonl"), template="alpaca",
                cutoff_len=512, out_dir=str(root / out), seed=SEED, micro_batch_size=MICRO, grad_accum=ACCUM,
                max_steps=STEPS, shuffle=False, lr=LR, warmup_steps=WARMUP, max_grad_norm=1.0, weight_decay=0.0,
                eval_every=0, save_every=0, exact_match_samples=0, resume="none", log_every=1)
    return TrainConfig(**{**base, **overrides}).check()


def step_records(out_dir) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


# --- the plain reference loop -------------------------------------------------------------------


def reference_batch(examples, pad_id: int):
    """Left-padded input_ids, HF attention_mask and position_ids counting from each row's first
    real token, and labels (-100 on padding)."""
    width = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.ids)
        ids[b, width - n:] = torch.tensor(ex.ids)
        labels[b, width - n:] = torch.tensor(ex.labels)
        mask[b, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, labels


def summed_loss(model, batch) -> tuple[torch.Tensor, int]:
    ids, mask, positions, labels = batch
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def initial_lora(cfg: TrainConfig, tokenizer, base_state: dict, args) -> dict:
    """The trainer's starting adapter: it seeds the global RNG with cfg.seed right before attach."""
    model = Transformer(args)
    model.load_state_dict(base_state)
    torch.manual_seed(cfg.seed)
    task_model = attach(model, cfg, tokenizer)
    return {path: (layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone())
            for path, layer in lora_layers(task_model.model).items()}


def peft_reference_model(base: Transformer, init: dict, args):
    hf = hf_from_ours(base)
    model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_HF))
    modules = dict(model.named_modules())
    assert len(init) == 7 * args.n_layers
    with torch.no_grad():
        for path, (a, b) in init.items():
            heads = rope_heads(path.rsplit(".", 1)[1], args)
            layer = modules[peft_module_name(path)]
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(meta_to_hf_rows(b, heads) if heads else b)
    return model


def reference_run(root, cfg: TrainConfig):
    tokenizer = Tokenizer(root / "ckpt" / "tokenizer.model")
    args = tiny_args(n_kv_heads=2)
    base = make_ours(args, seed=21)
    init = initial_lora(cfg, tokenizer, base.state_dict(), args)
    assert all(torch.count_nonzero(b) == 0 for _, b in init.values())
    model = peft_reference_model(base, init, args).train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * 7 * args.n_layers

    data_cfg = DataConfig(task="sft", template="alpaca", cutoff_len=cfg.cutoff_len)
    examples, _ = load_examples(cfg.train_file, tokenizer, data_cfg)
    assert len(examples) == N_ROWS
    per_epoch = N_ROWS // cfg.micro_batch_size

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    records = []
    for step in range(STEPS):
        batches = []
        for i in range(cfg.grad_accum):
            k = (step * cfg.grad_accum + i) % per_epoch  # no shuffling: the file order, epoch after epoch
            batches.append(reference_batch(examples[k * cfg.micro_batch_size:(k + 1) * cfg.micro_batch_size],
                                           tokenizer.pad_id))
        step_count = sum(int((b[3][:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for batch in batches:
            loss, _ = summed_loss(model, batch)
            (loss / step_count).backward()
            total += loss.item()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        lr = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        records.append({"step": step + 1, "loss": total / step_count, "lr": lr, "grad_norm": grad_norm})

    model.eval()
    eval_examples, _ = load_examples(cfg.eval_file, tokenizer, data_cfg)
    with torch.no_grad():
        sums = [summed_loss(model, reference_batch(eval_examples[i:i + cfg.micro_batch_size], tokenizer.pad_id))
                for i in range(0, len(eval_examples), cfg.micro_batch_size)]
    eval_loss = sum(s.item() for s, _ in sums) / sum(n for _, n in sums)
    return records, eval_loss, model, base


def test_lora_loss_curve_matches_plain_peft_loop(setup):
    cfg = config(setup, "run_parity")
    results = train(cfg)
    ours = step_records(setup / "run_parity")
    ref, ref_eval, ref_model, base = reference_run(setup, cfg)

    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    # the run really trains: the curve moves well beyond the tolerance
    assert ref[0]["loss"] - min(r["loss"] for r in ref) > 0.5
    for mine, theirs in zip(ours, ref):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=TOL_CURVE), mine["step"]
        assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-9, abs=1e-12), mine["step"]
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3), mine["step"]
    assert ours[0]["lr"] == 0.0 and ours[WARMUP]["lr"] == pytest.approx(LR)
    assert any(r["grad_norm"] > 1.0 for r in ref)  # clipping is exercised
    assert results["eval_loss"] == pytest.approx(ref_eval, abs=TOL_CURVE)

    # the exported adapter, loaded into PEFT on HF's model, holds the reference loop's weights
    trained = PeftModel.from_pretrained(hf_from_ours(base), str(setup / "run_parity" / "adapter")).eval()
    want = {n: p for n, p in ref_model.named_parameters() if "lora_" in n}
    got = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    assert set(got) == set(want)
    for name, p in want.items():
        scale = p.abs().max().item()
        assert (got[name] - p).abs().max().item() <= 1e-3 * max(scale, 1e-3), name
    assert max(p.abs().max().item() for n, p in want.items() if "lora_B" in n) > 1e-3  # B moved off zero


def test_grad_accumulation_changes_nothing(setup):
    """2 micro-batches of 2 per step follow the same trajectory as 1 micro-batch of 4."""
    train(config(setup, "run_accum2", micro_batch_size=2, grad_accum=2))
    train(config(setup, "run_accum1", micro_batch_size=4, grad_accum=1))
    two, one = step_records(setup / "run_accum2"), step_records(setup / "run_accum1")
    assert len(two) == len(one) == STEPS
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOL_ACCUM), a["step"]
        assert a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
    assert two[0]["loss"] - two[-1]["loss"] > 0.1
