"""Evaluation during fine-tuning: loss (and perplexity, accuracy or MSE) over the eval set, and
exact match of greedily generated answers. Every rank calls these; results are identical on all."""
import math

import torch
import torch.distributed as dist

from llama.generation import Llama
from finetune.data import Example, collate
from finetune.heads import TaskModel
from finetune.sharding import gathered_root, is_sharded


def all_reduce_sum(values: list[float], group=None, device="cpu") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t.tolist()


@torch.no_grad()
def eval_metrics(task_model: TaskModel, items: list, batch_size: int, pad_id: int, device, autocast,
                 dp_rank: int, dp_size: int, dp_group) -> dict[str, float]:
    """Mean loss over the eval items, each data-parallel rank taking every dp_size-th batch. An
    FSDP-sharded model gathers each block's weights from every rank in its forward, so there every
    rank runs the same number of forwards: one short of batches repeats its first, uncounted.
    rm and dpo add their metrics (eval_accuracy, eval_rewards/accuracies, ...) as means over pairs."""
    task_model.eval()
    loss_sum, count, correct, metric_sums = 0.0, 0.0, 0.0, {}
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    mine = batches[dp_rank::dp_size]
    rounds = -(-len(batches) // dp_size) if is_sharded(task_model) else len(mine)
    for i in range(rounds):
        counted = i < len(mine)
        b = {k: v.to(device) for k, v in collate(mine[i] if counted else batches[0], pad_id, task_model.task).items()}
        with autocast():
            loss, n, extra = task_model(**b)
        if not counted:
            continue
        loss_sum += loss.item()
        count += float(n)
        if task_model.task == "cls":
            correct += (extra.argmax(-1) == b["labels"]).sum().item()
        if isinstance(extra, dict):  # rm, dpo: metric sums over the batch's pairs (one device sync)
            for name, value in zip(extra, torch.stack(list(extra.values())).tolist()):
                metric_sums[name] = metric_sums.get(name, 0.0) + value
    loss_sum, count, correct, *sums = all_reduce_sum([loss_sum, count, correct, *metric_sums.values()], dp_group, device)
    task_model.train()
    mean = loss_sum / max(count, 1.0)
    out = {"eval_loss": mean}
    if task_model.task in ("sft", "pt"):
        out["eval_ppl"] = math.exp(min(mean, 50.0))
    elif task_model.task == "cls":
        out["eval_accuracy"] = correct / max(count, 1.0)
    out.update({f"eval_{name}": v / max(count, 1.0) for name, v in zip(metric_sums, sums)})
    return out


@torch.no_grad()
def reference_logps(task_model: TaskModel, pairs: list, batch_size: int, pad_id: int, device, autocast,
                    dp_rank: int, dp_size: int, dp_group) -> torch.Tensor:
    """DPO's reference log-probs of every pair, [pairs, 2] (chosen, rejected; float64), from the
    model as it is now (the reference is the model before training) or, for a method that can
    switch itself off, without it. Each data-parallel rank computes every dp_size-th batch; a sum
    over the ranks then gives every rank the whole table."""
    task_model.eval()
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    starts = range(0, len(pairs), batch_size)
    for start in list(starts)[dp_rank::dp_size]:
        b = {k: v.to(device) for k, v in collate(pairs[start:start + batch_size], pad_id, "dpo").items()
             if k != "ref_logps"}
        with autocast():
            logps = task_model.reference_logps(b["tokens"], b["labels"], b["pad_lens"])
        out[start:start + len(logps) // 2] = torch.stack(logps.double().chunk(2), dim=1)
    if dist.is_initialized():
        dist.all_reduce(out, group=dp_group)
    task_model.train()
    return out.cpu()


@torch.no_grad()
def exact_match(task_model: TaskModel, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int) -> float:
    """Fraction of examples whose greedy answer, generated after the prompt tokens, equals the
    reference answer token for token, up to its first stop token (eos; Llama-3's <|eot_id|>)."""
    task_model.eval()
    model = task_model.model
    longest = max(len(ex.ids) for ex in examples) + max_new_tokens
    model.setup_caches(batch_size, longest)
    generator = Llama(model, tokenizer, longest, batch_size, inference_mode=not is_sharded(task_model))
    hits = 0
    with gathered_root(task_model):  # generation calls the transformer, not the (FSDP root) task model
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            answers = generator.generate([ex.ids[:ex.prompt_len] for ex in chunk], max_new_tokens, temperature=0.0)
            for ex, got in zip(chunk, answers):
                rest = ex.ids[ex.prompt_len:]
                want = rest[:next((j for j, t in enumerate(rest) if t in tokenizer.stop_ids), len(rest))]
                hits += got == want
    model.clear_caches()
    task_model.train()
    return hits / len(examples)
