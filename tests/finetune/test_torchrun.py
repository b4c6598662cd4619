"""ft_main.py under `torchrun --nproc_per_node 2` (gloo, CPU) against one process: data parallel
(2 x micro-batch 2 = 1 x 4, with and without gradient accumulation), tensor parallel on a
split_model.py checkpoint (LoRA on every linear with GQA, prompt tuning, full fine-tuning; full
fine-tuning on Llama-3-layout shards, the embedding split along the vocabulary), resuming a
2-process run from its checkpoint, and one process under torchrun (its own group, FSDP2, resume)."""
import json
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from finetune.demo import FACTS
from llama.formats import read_model_args
from llama.loader import load_model
from tests.utils import (
    DEMO_EVAL, DEMO_TRAIN, assert_same_tensors, metrics_by_step as metrics, one_process, run,
    tiny_args, torchrun, write_ckpt,
)

COMMON = dict(dtype="float32", device="cpu", method="lora", task="sft", train_file=str(DEMO_TRAIN),
              eval_file=str(DEMO_EVAL), template="plain", cutoff_len=64, seed=0, lr=1e-2, warmup_steps=0,
              lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=["all-linear"], num_virtual_tokens=6,
              shuffle=True, max_steps=6, eval_every=3, save_every=0, exact_match_samples=0, epochs=1.0,
              precision="fp32", adam_eps=1e-6)
# adam_eps 1e-6 rather than 1e-8: Adam divides by sqrt(v) + eps, so a weight whose gradient is ~0
# turns float32 summation-order noise (1e-7) into an update of up to lr; a larger eps damps that
# without hiding real differences (a wrong gradient scale still shows in grad_norm and the loss)


@pytest.fixture(scope="module")
def mha_ckpt(tmp_path_factory, tokenizer_path):
    return write_ckpt(tmp_path_factory.mktemp("mha"), tiny_args(), tokenizer_path, seed=1)


@pytest.fixture(scope="module")
def gqa_ckpts(tmp_path_factory, tokenizer_path):
    """(whole, split in 2 by split_model.py) GQA checkpoints: 4 query heads, 2 kv heads."""
    whole = write_ckpt(tmp_path_factory.mktemp("gqa"), tiny_args(n_kv_heads=2), tokenizer_path, seed=2)
    split = whole.parent / (whole.name + "_tp2")
    result = run([sys.executable, "split_model.py", "--n", "2", "--ckpt_dir", str(whole), "--out", str(split),
                  "--quiet"])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in split.glob("consolidated.*")) == ["consolidated.00.safetensors",
                                                                     "consolidated.01.safetensors"]
    if not (split / "tokenizer.model").is_file():
        shutil.copy(tokenizer_path, split / "tokenizer.model")
    return whole, split


@pytest.fixture(scope="module")
def vocab_split_ckpt(gqa_ckpts):
    """The GQA checkpoint in 2 shards of Meta's Llama-3 layout, chunked here: the embedding and
    the column-parallel weights on dim 0 (VocabParallelEmbedding), row-parallel ones on dim 1."""
    whole, _ = gqa_ckpts
    out = whole.parent / (whole.name + "_vocab_tp2")
    out.mkdir()
    state = load_file(str(whole / "consolidated.00.safetensors"))
    for rank in range(2):
        shard = {}
        for key, t in state.items():
            name = key.split(".")[-2]
            dim = 1 if name in ("wo", "w2") else None if name.endswith("norm") else 0
            shard[key] = t if dim is None else t.chunk(2, dim)[rank].contiguous()
        save_file(shard, str(out / f"consolidated.{rank:02d}.safetensors"))
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(whole / name, out / name)
    return out


def assert_same_run(got_dir, want_dir, tol, steps=None, names=("loss", "grad_norm", "lr", "eval_loss")):
    got, want = metrics(got_dir), metrics(want_dir)
    keys = sorted(k for k in want if steps is None or k[0] in steps)
    assert sorted(k for k in got if steps is None or k[0] in steps) == keys
    assert len(keys) >= 2
    for key in keys:
        for name in names:
            if name in want[key]:
                assert got[key][name] == pytest.approx(want[key][name], rel=tol, abs=tol), (key, name)


def adapter(out_dir) -> dict:
    return load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))


# --- data parallel -----------------------------------------------------------------------------


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_data_parallel_matches_one_process(mha_ckpt, tmp_path, grad_accum):
    """2 processes x micro-batch 2 follow 1 process x micro-batch 4 step for step: each step's
    loss is the mean over all its target tokens, whatever the split."""
    dp = tmp_path / "dp"
    result = torchrun(COMMON, mha_ckpt, dp, micro_batch_size=2, grad_accum=grad_accum)
    assert "tensor-parallel 1 x data-parallel 2" in result.stdout
    one_process(COMMON, mha_ckpt, tmp_path / "one", micro_batch_size=4, grad_accum=grad_accum)
    assert_same_run(dp, tmp_path / "one", tol=1e-5)
    assert len([k for k in metrics(dp) if k[1] == "train"]) == COMMON["max_steps"]
    assert_same_tensors(adapter(dp), adapter(tmp_path / "one"), tol=3e-5)
    # only rank 0 writes: one checkpoint folder with each rank's state, nothing partial
    ckpts = sorted(p.name for p in (dp / "checkpoints").iterdir())
    assert ckpts == ["step_000006"]
    assert sorted(p.name for p in (dp / "checkpoints" / "step_000006").glob("rank*")) == \
        ["rank0.json", "rank0.safetensors", "rank1.json", "rank1.safetensors"]


def test_two_process_run_resumes_identically(mha_ckpt, tmp_path):
    """A 2-process run with LoRA dropout (per-rank RNG streams), resumed on 2 processes from its
    step-3 checkpoint, logs steps 4-6 and ends with the adapter of the uninterrupted run."""
    kw = dict(micro_batch_size=2, grad_accum=2, lora_dropout=0.1, save_every=3, keep_last=5, eval_every=1)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    torchrun(COMMON, mha_ckpt, whole, **kw)
    step3 = whole / "checkpoints" / "step_000003"
    assert step3.is_dir()
    result = torchrun(COMMON, mha_ckpt, resumed, resume=str(step3), **kw)
    assert f"resumed from {step3} at step 3" in result.stdout
    assert sorted(k[0] for k in metrics(resumed)) == [4, 4, 5, 5, 6, 6]
    assert_same_run(resumed, whole, tol=1e-6, steps={4, 5, 6})
    assert_same_tensors(adapter(resumed), adapter(whole), tol=1e-6)
    # dropout was on: a run from the same checkpoint without restoring each rank's RNG differs
    # (guards the test itself: with dropout inert the comparison above would be vacuous)
    no_dropout = tmp_path / "no_dropout"
    one_process(COMMON, mha_ckpt, no_dropout, micro_batch_size=4, grad_accum=2, lora_dropout=0.0, save_every=3,
                        keep_last=5, eval_every=1)
    assert metrics(no_dropout)[(4, "train")]["loss"] != pytest.approx(metrics(whole)[(4, "train")]["loss"], rel=1e-4)


def test_one_process_under_torchrun_starts_its_group_and_resumes_fsdp(mha_ckpt, tmp_path):
    """torchrun --nproc_per_node 1: a process group of one (gloo here, nccl on a GPU: what
    bench/gpu_check.py runs there), sharding = 'fsdp' takes FSDP2 on it, and a run resumed from its
    step-3 checkpoint (torch.distributed.checkpoint) logs steps 4-6 as the uninterrupted run did."""
    kw = dict(micro_batch_size=4, sharding="fsdp", save_every=3, keep_last=5, eval_every=3)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    result = torchrun(COMMON, mha_ckpt, whole, nproc=1, **kw)
    assert "> initializing model parallel with size 1" in result.stdout  # the group was started
    assert "data-parallel 1 (fsdp)" in result.stdout
    step3 = whole / "checkpoints" / "step_000003"
    assert (step3 / "sharded").is_dir()
    result = torchrun(COMMON, mha_ckpt, resumed, nproc=1, resume=str(step3), **kw)
    assert f"resumed from {step3} at step 3" in result.stdout
    assert sorted(k[0] for k in metrics(resumed)) == [4, 5, 6, 6]
    assert_same_run(resumed, whole, tol=1e-6, steps={4, 5, 6})
    assert_same_tensors(adapter(resumed), adapter(whole), tol=1e-6)


# --- tensor parallel ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "prompt", "full"])
def test_tensor_parallel_matches_one_process(gqa_ckpts, tmp_path, method):
    whole, split = gqa_ckpts
    kw = dict(method=method, micro_batch_size=4, lr=3e-2 if method == "prompt" else 1e-2 if method == "lora" else 2e-3)
    tp = tmp_path / "tp"
    result = torchrun(COMMON, split, tp, save_every=3, **kw)
    assert "tensor-parallel 2 x data-parallel 1" in result.stdout
    one_process(COMMON, whole, tmp_path / "one", save_every=3, **kw)
    assert_same_run(tp, tmp_path / "one", tol=1e-4)
    losses = [r["loss"] for k, r in sorted(metrics(tp).items()) if k[1] == "train"]
    assert losses[-1] < losses[0]
    if method == "full":  # each rank's shard staged, then exported whole by rank 0 (merge_format hf)
        got = load_model(tp / "model", read_model_args(tp / "model")).state_dict()
        want = load_model(tmp_path / "one" / "model", read_model_args(tmp_path / "one" / "model")).state_dict()
        assert_same_tensors(got, want, tol=1e-5)
        assert not list(tp.glob(".model*"))  # the staging folder is gone
        base = load_file(str(whole / "consolidated.00.safetensors"))
        assert (got["layers.0.attention.wk.weight"] - base["layers.0.attention.wk.weight"]).abs().max() > 1e-4
    else:
        got, want = adapter(tp), adapter(tmp_path / "one")
        assert_same_tensors(got, want, tol=1e-5)
        if method == "lora":  # every linear of both layers, whole (gathered) shapes
            assert len(got) == 2 * 7 * 2
            assert got["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
            assert got["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 192)  # ffn 192
            # resuming tensor-parallel: each rank reloads its own shard of the adapter and its moments
            step3 = tp / "checkpoints" / "step_000003"
            result = torchrun(COMMON, split, tmp_path / "resumed", save_every=3, resume=str(step3), **kw)
            assert f"resumed from {step3} at step 3" in result.stdout
            assert_same_run(tmp_path / "resumed", tp, tol=1e-6, steps={4, 5, 6})
            assert_same_tensors(adapter(tmp_path / "resumed"), got, tol=1e-6)


def test_tensor_parallel_dpo_matches_one_process(gqa_ckpts, tmp_path):
    """DPO on 2 tensor-parallel shards: the answers' log-probs come through the column-parallel
    output layer (its logits gathered), the reference with the adapter off on the same shards;
    losses, TRL's metrics and the adapter follow one process on the whole checkpoint."""
    whole, split = gqa_ckpts
    pref = Path(DEMO_TRAIN).parent
    kw = dict(task="dpo", train_file=str(pref / "pref_train.jsonl"), eval_file=str(pref / "pref_eval.jsonl"),
              micro_batch_size=4, max_steps=4, eval_every=2)
    tp = tmp_path / "tp"
    result = torchrun(COMMON, split, tp, **kw)
    assert "tensor-parallel 2 x data-parallel 1" in result.stdout
    one_process(COMMON, whole, tmp_path / "one", **kw)
    assert_same_run(tp, tmp_path / "one", tol=1e-4, names=("loss", "grad_norm", "eval_loss", "rewards/chosen",
                                                          "rewards/rejected", "rewards/margins", "logps/chosen"))
    assert_same_tensors(adapter(tp), adapter(tmp_path / "one"), tol=1e-5)


def test_full_fine_tuning_on_vocab_split_shards_matches_one_process(gqa_ckpts, vocab_split_ckpt, tmp_path):
    """The embedding trains through fairscale's VocabParallelEmbedding; the model written per rank
    keeps the vocabulary split (merge_format ours) and merges (split_model.py --n 1) into one
    process's model."""
    whole, _ = gqa_ckpts
    kw = dict(method="full", micro_batch_size=4, lr=2e-3, merge_format="ours")
    tp = tmp_path / "tp"
    result = torchrun(COMMON, vocab_split_ckpt, tp, **kw)
    assert "tensor-parallel 2 x data-parallel 1" in result.stdout
    one_process(COMMON, whole, tmp_path / "one", **kw)
    assert_same_run(tp, tmp_path / "one", tol=1e-4)
    assert load_file(str(tp / "model" / "consolidated.00.safetensors"))["tok_embeddings.weight"].shape == (192, 64)
    merged = run([sys.executable, "split_model.py", "--n", "1", "--ckpt_dir", str(tp / "model"),
                  "--out", str(tmp_path / "merged"), "--quiet"])
    assert merged.returncode == 0, merged.stderr
    got = load_file(str(tmp_path / "merged" / "consolidated.00.safetensors"))
    want = load_file(str(tmp_path / "one" / "model" / "consolidated.00.safetensors"))
    assert_same_tensors(got, want, tol=1e-5)
    base = load_file(str(whole / "consolidated.00.safetensors"))
    assert (got["tok_embeddings.weight"] - base["tok_embeddings.weight"]).abs().max() > 1e-4


def test_full_fine_tuning_with_a_score_head_under_ddp(mha_ckpt, tmp_path):
    """cls with method full: the LM output layer is unused, so it must not be trainable, or DDP
    stops at the second step waiting for its gradient. Same steps as one process."""
    rows = [{"text": f"The {obj}", "label": color} for obj, (color, _) in FACTS.items()]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(method="full", task="cls", train_file=str(data), eval_file="", eval_split=0.2, lr=1e-3, max_steps=4)
    torchrun(COMMON, mha_ckpt, tmp_path / "dp", micro_batch_size=2, **kw)
    one_process(COMMON, mha_ckpt, tmp_path / "one", micro_batch_size=4, **kw)
    assert_same_run(tmp_path / "dp", tmp_path / "one", tol=1e-5)
