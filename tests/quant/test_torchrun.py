"""LoRA fine-tuning on int4 / NF4 bases under `torchrun --nproc_per_node 2` (gloo, CPU) against
one process: tensor parallel on a split_model.py checkpoint quantized on load (each rank
quantizes its own shard), and data parallel on a GPTQ folder from `python -m quant`.

The model: dim 128, 4 heads, 2 kv heads, FFN 384 (multiple_of 64). Int4 uses group size 32,
which divides the local input width of the row-parallel layers (wo: 64, w2: 192 per rank), and
every feature count is a multiple of 8. For NF4 the row-parallel local widths are multiples of
bitsandbytes' block of 64, so each shard's blocks are blocks of the whole weight (see
test_nf4_shards_quantize_like_slices_of_the_whole for what differs anyway, and why)."""
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from llama.formats import read_model_args, save_checkpoint
from llama.loader import load_model
from llama.tiny import random_model
from quant.linear import NF4Linear
from tests.utils import (
    DEMO_EVAL, DEMO_TRAIN, fs_dim, merge_shards, metrics_by_step as metrics, nf4_dequant, one_process, run,
    tiny_args, torchrun,
)

ARGS = dict(dim=128, n_heads=4, n_kv_heads=2, multiple_of=64)
GROUP = 32

COMMON = dict(dtype="float32", device="cpu", method="lora", task="sft", train_file=str(DEMO_TRAIN),
              eval_file=str(DEMO_EVAL), template="plain", cutoff_len=64, seed=0, lr=1e-2, warmup_steps=0,
              lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=["all-linear"], shuffle=True, max_steps=6,
              eval_every=3, save_every=0, exact_match_samples=0, epochs=1.0, precision="fp32", adam_eps=1e-6,
              quant_group_size=GROUP)
# adam_eps 1e-6 as in tests/finetune/test_torchrun.py: float32 summation-order noise on a ~0
# gradient must not turn into an lr-sized update


def worst_difference(got_dir, want_dir, names=("loss", "grad_norm", "eval_loss")) -> float:
    """The largest relative difference of the runs' logged values; both must log the same steps."""
    got, want = metrics(got_dir), metrics(want_dir)
    assert got.keys() == want.keys() and len([k for k in want if k[1] == "train"]) == COMMON["max_steps"]
    worst = 0.0
    for key in want:
        for name in names:
            if name in want[key]:
                worst = max(worst, abs(got[key][name] - want[key][name]) / max(abs(want[key][name]), 1e-12))
    return worst


def adapter_difference(got_dir, want_dir) -> float:
    a = load_file(str(got_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(want_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer_path):
    """(whole, split in 2 by split_model.py, GPTQ folder of the whole by `python -m quant --method rtn`)."""
    root = tmp_path_factory.mktemp("quant_tp")
    whole = root / "whole"
    save_checkpoint(random_model(tiny_args(**ARGS), seed=5), whole)
    shutil.copy(tokenizer_path, whole / "tokenizer.model")
    split, gptq = root / "tp2", root / "int4"
    result = run([sys.executable, "split_model.py", "--n", "2", "--ckpt_dir", whole, "--out", split, "--quiet"],
                 timeout=400)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in split.glob("consolidated.*")) == ["consolidated.00.safetensors",
                                                                     "consolidated.01.safetensors"]
    if not (split / "tokenizer.model").is_file():
        shutil.copy(tokenizer_path, split / "tokenizer.model")
    result = run([sys.executable, "-m", "quant", "--ckpt_dir", whole, "--method", "rtn", "--group_size", GROUP,
                  "--out", gptq], timeout=400)
    assert result.returncode == 0, result.stderr
    return whole, split, gptq


def test_nf4_shards_quantize_like_slices_of_the_whole():
    """What a tensor-parallel rank's NF4 weight is, against slicing the whole NF4 weight.
    bitsandbytes quantizes the flattened [out, in] weight in blocks of 64 with the block's absmax
    (then, double quant, those absmax values in 8 bits in blocks of 256, offset by their mean).
    - column shards (rows out/2) are contiguous runs of whole blocks: the 4-bit codes are equal;
    - row shards (columns in/2) are whole blocks only when in/2 is a multiple of 64 (here:
      wo 64, w2 192): then the codes are equal too;
    - either way the double-quantized absmax differs slightly (another mean, other blocks of
      256), so the dequantized weights differ by about 1/20 of the NF4 rounding error itself.
    Without double quant the column shards would be exact. Hence test_tensor_parallel's NF4
    reference (a float checkpoint of the shards' own NF4 weights); and with in/2 not a multiple
    of 64 (e.g. dim 64: wo's local width 32) row shards would be quantized on other blocks, a
    difference as large as the NF4 error itself."""
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in ((128, 128), (128, 384), (384, 128)):  # wq/wo, w2, w1/w3 of the model above
        w = torch.randn(out_f, in_f, generator=gen) * 0.02
        whole = NF4Linear(w)
        full = nf4_dequant(whole)
        nf4_error = float((full - w).abs().max())
        codes = whole.inner.weight.data.flatten()
        for part, sl in (("column", (slice(0, out_f // 2), slice(None))), ("row", (slice(None), slice(in_f // 2, None)))):
            shard = NF4Linear(w[sl].contiguous())
            shard_codes = shard.inner.weight.data.flatten()  # two 4-bit codes per byte, row-major
            flat_idx = torch.arange(out_f * in_f).view(out_f, in_f)[sl].flatten()
            assert torch.equal(shard_codes, codes[flat_idx[::2] // 2]), part
            diff = float((nf4_dequant(shard) - full[sl]).abs().max())
            assert diff < 0.1 * nf4_error, (part, diff, nf4_error)
    # the misaligned case (documentation of the limit above): in/2 = 32 puts two rows in a block
    w = torch.randn(64, 64, generator=gen) * 0.02
    full = nf4_dequant(NF4Linear(w))
    misaligned = float((nf4_dequant(NF4Linear(w[:, 32:].contiguous())) - full[:, 32:]).abs().max())
    assert misaligned > 0.5 * float((full - w).abs().max())


# int4: each rank's RTN of its shard is exactly the whole weight's (groups of 32 never straddle a
# shard border), so only float32 summation order differs, as for a float base: every logged loss,
# grad norm and eval loss within 1e-4 (relative), the adapters within 3e-5 (Adam turns summation
# noise on near-zero gradients into updates; measured 1.1e-5).
# NF4: the ranks' double-quantized block scales differ slightly from the whole weight's (see the
# test above), so the exact check is against one process on a float checkpoint holding the very
# weights the ranks hold (each shard quantized by bitsandbytes and dequantized by its
# dequantize_4bit, concatenated): same tolerances as int4. Against one process NF4-quantizing the
# unsplit checkpoint, the losses agree within 1e-3 (measured 6e-5; grad norms differ by up to
# 2e-3 and the adapters by up to 3e-2, Adam amplifying the small gradient differences, so those
# are not compared there).
def nf4_of_shards(whole, split, out):
    """A float checkpoint of `whole` whose block linears hold the NF4 weights of split's shards."""
    model = load_model(whole, read_model_args(whole))
    shards = [load_file(str(split / f"consolidated.{r:02d}.safetensors")) for r in range(2)]
    state = model.state_dict()
    replaced = 0
    for key in state:
        dim = fs_dim(key)
        if key.startswith("layers.") and dim is not None:  # the block linears
            parts = [nf4_dequant(NF4Linear(s[key])) for s in shards]
            state[key] = torch.cat(parts, dim=dim)
            assert (state[key] - model.state_dict()[key]).abs().max() > 0
            replaced += 1
    assert replaced == 7 * model.args.n_layers
    save_checkpoint(model, out, state)
    shutil.copy(whole / "tokenizer.model", out / "tokenizer.model")
    return out


def assert_close_runs(got_dir, want_dir, tol, adapter_tol=None, names=("loss", "grad_norm", "eval_loss")):
    worst = worst_difference(got_dir, want_dir, names)
    adapters = adapter_difference(got_dir, want_dir) if adapter_tol is not None else 0.0
    print(f"{got_dir.name} vs {want_dir.name}: worst relative {'/'.join(names)} difference {worst:.2e}"
          + (f", adapter max difference {adapters:.2e}" if adapter_tol is not None else ""))
    assert worst <= tol and adapters <= (adapter_tol or 0.0), (worst, adapters)


@pytest.mark.parametrize("quant", ["int4", "nf4"])
def test_tensor_parallel_lora_on_a_quantized_base_matches_one_process(ckpts, tmp_path, quant):
    whole, split, _ = ckpts
    tp = tmp_path / "tp"
    merge = quant == "int4"
    result = torchrun(COMMON, split, tp, timeout=400, quant=quant, micro_batch_size=4, merge=merge, merge_format="ours")
    assert "tensor-parallel 2 x data-parallel 1" in result.stdout
    one_process(COMMON, whole, tmp_path / "one", quant=quant, micro_batch_size=4, merge=merge, merge_format="ours")
    if quant == "int4":
        assert_close_runs(tp, tmp_path / "one", 1e-4, adapter_tol=3e-5)
        # merge = true, merge_format ours, under tensor parallelism: each rank writes its dequantized shard + its
        # share of B @ A; put together they are the one-process export (adapters within 3e-5,
        # B @ A * 2 within 1e-4; the int4 part is exactly the same)
        got = merge_shards(tp / "merged")
        want = load_file(str(tmp_path / "one" / "merged" / "consolidated.00.safetensors"))
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == torch.float32
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-4, msg=key)
        # ... and both trained on int4, not on the float weights: step 1 (the base on the first
        # batch, LoRA B starting at zero) is well outside that tolerance from a float base's
        # (measured: loss 1.6e-3, grad norm 5.5e-2 relative)
        one_process(COMMON, whole, tmp_path / "float", quant="none", micro_batch_size=4, max_steps=1)
        got, fp = metrics(tp)[(1, "train")], metrics(tmp_path / "float")[(1, "train")]
        assert abs(got["loss"] - fp["loss"]) > 5e-4 * fp["loss"], (got, fp)
        assert abs(got["grad_norm"] - fp["grad_norm"]) > 1e-2 * fp["grad_norm"], (got, fp)
    else:
        reference = nf4_of_shards(whole, split, tmp_path / "nf4_of_shards")
        one_process(COMMON, reference, tmp_path / "one_float", quant="none", micro_batch_size=4)
        assert_close_runs(tp, tmp_path / "one_float", 1e-4, adapter_tol=3e-5)
        assert_close_runs(tp, tmp_path / "one", 1e-3, names=("loss", "eval_loss"))
    losses = [r["loss"] for k, r in sorted(metrics(tp).items()) if k[1] == "train"]
    assert losses[-1] < losses[0]


def test_data_parallel_lora_on_a_gptq_folder_matches_one_process(ckpts, tmp_path):
    """A GPTQ folder is one shard, so 2 processes are data parallel: 2 x micro-batch 2 follow one
    process x micro-batch 4 step for step (each rank loads the same int4 weights)."""
    _, _, gptq = ckpts
    dp = tmp_path / "dp"
    result = torchrun(COMMON, gptq, dp, timeout=400, quant="int4", micro_batch_size=2)
    assert "tensor-parallel 1 x data-parallel 2" in result.stdout
    one_process(COMMON, gptq, tmp_path / "one", quant="int4", micro_batch_size=4)
    assert_close_runs(dp, tmp_path / "one", 1e-5, adapter_tol=3e-5)
