"""finetune/plan.py: byte counts against hand-computed ones for a tiny config, the planner's CPU
estimate against measured peaks of real training steps (bench/plan_check.py's workers, fresh
processes), and the command line's errors."""
import subprocess
import sys

import pytest

from finetune.config import TrainConfig
from finetune.plan import Devices, block_activation_bytes, parse_gpus, plan, resolve
from llama.config import ModelArgs
from llama.errors import LlamaInputError
from tests.utils import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import plan_check  # noqa: E402

CPU = Devices("cpu", 1, 1 << 40)
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, multiple_of=32)  # FFN 192, kv width 32


def setup_of(placement="single", devices=CPU, quant="none", **keys):
    cfg = TrainConfig(**{"dtype": "float32", "device": "cpu", **keys}).check()
    return resolve(cfg, ModelArgs(**TINY), devices, placement, quant)


def test_lora_counts_by_hand():
    # r * (in + out) per target: wq 64->64, wv 64->32; 2 layers; float32; grads 4 B, AdamW 8 B
    mem = plan(setup_of(method="lora", lora_r=4, lora_targets=["wq", "wv"]))[0]
    params = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert (mem.trainable, mem.gradients, mem.optimizer) == (4 * params, 4 * params, 8 * params)
    # the frozen base: all weights in float32 (7 linears, 2 norms per block; embedding, norm, output)
    block = 64 * 64 * 2 + 32 * 64 * 2 + 3 * 192 * 64 + 2 * 64
    assert mem.base_weights == 4 * (2 * block + 384 * 64 * 2 + 64)


def test_full_and_int4_counts_by_hand():
    full = plan(setup_of(method="full"))[0]
    n = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 192 * 64 + 2 * 64) + 384 * 64 * 2 + 64
    assert (full.base_weights, full.trainable, full.optimizer) == (0, 4 * n, 8 * n)
    # int4, group 32: qweight in*out/2, qzeros groups*out/2, scales fp16 groups*out, g_idx int32 in
    int4 = plan(setup_of(method="lora", quant="int4", quant_group_size=32))[0]

    def q(out, inp):
        g = inp // 32
        return out * inp // 2 + g * out // 2 + 2 * g * out + 4 * inp

    linears = 2 * q(64, 64) + 2 * q(32, 64) + 2 * q(192, 64) + q(64, 192)
    scratch = 192 * 64 * 4  # the largest linear dequantized, float32 activations
    assert int4.base_weights == 2 * (linears + 2 * 64 * 4) + 4 * (384 * 64 * 2 + 64) + scratch


def test_activations_by_hand():
    # full, float32, batch 2 x seq 8 (T = 16): per block, from llama/model.py's code
    s = setup_of(method="full", micro_batch_size=2, cutoff_len=8)
    T, d, kv, f = 16, 64, 32, 192
    norms = 2 * (T * d * 4 + T * d * 4)  # input (float32) and normalised x, twice
    linear_inputs = T * d * 4 * 2 + T * f * 4  # n1, n2 and w2's input (wo's is SDPA's output)
    attention = T * (2 * d + 2 * kv) * 4 + 2 * 4 * 8 * 4 + 2 * 8 * 8 * 4  # q, k, v, out; logsumexp; float mask
    ffn = 3 * T * f * 4
    assert block_activation_bytes(s, 1) == norms + linear_inputs + attention + ffn


def test_layerwise_and_sharded_placements_split_the_model():
    one = plan(setup_of(method="lora"))[0]
    two = parse_gpus("2x1GB")
    layerwise = plan(setup_of("layerwise", two, method="lora"))
    assert len(layerwise) == 2 and sum(m.trainable for m in layerwise) == one.trainable
    fsdp = plan(setup_of("fsdp", parse_gpus("4x80GB"), method="full"))[0]
    full = plan(setup_of(method="full"))[0]
    assert fsdp.optimizer == full.optimizer // 4 and fsdp.gradients == full.gradients // 4


@pytest.mark.parametrize("case,batch", [(0, 2), (1, 4), (2, 2), (2, 8)],
                         ids=["lora-qv-dropout-b2", "lora-all-linear-b4", "full-b2", "full-b8"])
def test_cpu_estimate_within_15_percent_of_measured(case, batch):
    """Peak RSS above the loaded model (fresh process, glibc returning freed memory) of 3 real
    steps vs the planner's trainable + gradients + optimizer + activations."""
    spec = plan_check.CASES[case]
    estimate, measured = plan_check.estimate(spec, batch)["compared"], plan_check.measure(spec, batch)["increase"]
    assert abs(estimate / measured - 1) <= 0.15, f"estimate {estimate / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"


def test_gpus_spec():
    assert parse_gpus("2x24GB") == Devices("cuda", 2, 24 * 2**30)
    for bad in ("2x24XB", "24GB", "0x80GB", "x80GB"):
        with pytest.raises(LlamaInputError, match="--gpus"):
            parse_gpus(bad)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "finetune.plan", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_reports_and_errors():
    out = run_cli("--config", "torchrun_configs/13B_int4_lora_2gpu.toml", "--model", "65B", "--gpus", "2x24GB",
                  "--grad_checkpointing", "false", "--micro_batch_size", "4")
    assert out.returncode == 0, out.stderr
    assert "does NOT fit" in out.stdout and "grad_checkpointing = true" in out.stdout
    for args, message in ((["--model", "99B"], "unknown preset"), (["--model", "7B", "--gpus", "2x24XB"], "--gpus"),
                          (["--model", "7B", "--placement", "zigzag"], "--placement"),
                          (["--model", "7B", "--lr_typo", "1"], "unknown config key")):
        bad = run_cli(*args)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    help_text = run_cli("--help").stdout
    assert all(flag in help_text for flag in ("--gpus", "--model", "--placement", "--cutoff_len"))


def test_preference_tasks_plan_chosen_and_rejected_rows():
    """rm and dpo forward 2 sequences per pair: their activations are sft's at twice the batch."""
    for task in ("dpo", "rm"):
        pairs = plan(setup_of(method="lora", task=task, micro_batch_size=2, cutoff_len=32))[0]
        rows = plan(setup_of(method="lora", task="sft" if task == "dpo" else "cls", micro_batch_size=4,
                             cutoff_len=32))[0]
        assert pairs.activations == rows.activations > 0, task
