"""LoRA on quantized bases ("peft-int4" and QLoRA): the wrapped layer and a whole model against
float references holding the dequantized weights (the tests' own GPTQ-layout decoder in
tests/utils.py for int4, bitsandbytes' dequantize_4bit for NF4); fine-tuning on int4 / NF4 lowers
the demo eval loss; merge = true on an int4 base exports a float checkpoint that re-quantizes and
reloads; and example.py generates the same text from a float checkpoint quantized on load and from
the GPTQ folder `python -m quant --method rtn` writes of it (with and without an adapter trained
on int4).
"""
import copy
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from finetune.adapters import load_adapter
from finetune.config import TrainConfig
from finetune.methods.lora import LoRALinear, apply_lora, lora_layers
from finetune.trainer import train
from llama.formats import read_model_args, save_checkpoint
from llama.loader import load_model
from llama.tiny import random_model
from quant.gptq import GPTQ, rtn
from llama.layers import BLOCK_LINEARS
from quant.linear import Int4Linear, NF4Linear, quantize_model_
from tests.utils import (
    dequant64, eval_loss_of, nf4_dequant, peft_module_name, read_metrics, run, tiny_args, trainer_config,
)

GROUP = 32  # divides every input width of tiny_args (64, and the FFN's 192)


# --- independent references ----------------------------------------------------------------


def ref_dequant(layer: Int4Linear) -> torch.Tensor:
    """[out, in] float64 from the layer's GPTQ tensors, decoded by the tests' own dequant64
    (tests/utils.py, from docs/formats.md): qweight [in/8, out] low nibble first along the input
    dim, qzeros [G, out/8] along the output dim storing zero-1,
    W[k, n] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1))."""
    return dequant64({p: getattr(layer, p) for p in ("qweight", "qzeros", "scales", "g_idx")})


def float_linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight.float())
    lin.requires_grad_(False)
    return lin


def twin_lora(quant_base: nn.Module, float_base: nn.Module, r=4, alpha=8.0, seed=0):
    """The same adapter (A and a nonzero B, so both matmuls carry gradient) on both bases."""
    got, want = LoRALinear(quant_base, r, alpha), LoRALinear(float_base, r, alpha)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in ("lora_A", "lora_B"):
            w = torch.randn(getattr(got, part).weight.shape, generator=gen) * 0.1
            getattr(got, part).weight.copy_(w)
            getattr(want, part).weight.copy_(w)
    return got, want


def forward_backward(layer: LoRALinear, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_out)
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


def assert_same_step(got: LoRALinear, want: LoRALinear, x, tol):
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(*x.shape[:-1], want.lora_B.weight.shape[0], generator=gen)
    for name, a, b in zip(("output", "input grad", "lora_A grad", "lora_B grad"),
                          forward_backward(got, x, grad_out), forward_backward(want, x, grad_out)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


# --- one layer ---------------------------------------------------------------------------------


def int4_layer(kind: str, out_features=48, in_features=128) -> Int4Linear:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(out_features, in_features, generator=gen)
    if kind == "rtn-g32":
        return Int4Linear.from_int4(rtn(w, 32), 32)
    if kind == "per-channel-sym":
        return Int4Linear.from_int4(rtn(w, -1, sym=True), -1)
    # GPTQ with act-order: g_idx is not monotonic, the kernels take their general path
    g = GPTQ(in_features)
    g.add_batch(torch.randn(256, in_features, generator=gen) * torch.linspace(0.2, 3, in_features))
    layer = Int4Linear.from_int4(g.quantize(w, 32, act_order=True), 32)
    assert not bool((layer.g_idx[1:] >= layer.g_idx[:-1]).all())
    return layer


@pytest.mark.parametrize("kind", ["rtn-g32", "per-channel-sym", "gptq-act-order-g32"])
@pytest.mark.parametrize("shape", [(1, 128), (3, 7, 128), (64, 128)], ids=["M1", "M21", "M64"])
def test_lora_on_int4_matches_lora_on_its_dequantized_weight(kind, shape):
    base = int4_layer(kind)
    assert not list(base.parameters()), "the int4 base must hold no trainable parameters"
    got, want = twin_lora(base, float_linear(ref_dequant(base)))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    assert_same_step(got, want, x, tol=1e-5)
    assert {n for n, p in got.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}


@pytest.mark.parametrize("shape", [(1, 128), (3, 7, 128)], ids=["M1", "M21"])
def test_lora_on_nf4_matches_lora_on_its_dequantized_weight(shape):
    """bitsandbytes' CPU 4-bit path dequantizes with the same kernel and then runs a float32
    matmul (measured difference 0 here), so the float32 tolerance 1e-5 holds as for int4."""
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    base = NF4Linear(w)
    assert not [p for p in base.parameters() if p.requires_grad]
    reference = nf4_dequant(base)
    # sanity of the reference itself: NF4 is within half its widest code gap (~0.14) of each
    # block's absmax from the float weight, and not equal to it
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    err = (reference - w).reshape(-1, 64).abs()
    assert bool((err <= 0.16 * absmax + 1e-6).all()) and float(err.max()) > 0
    got, want = twin_lora(base, float_linear(reference))
    assert_same_step(got, want, torch.randn(*shape, generator=torch.Generator().manual_seed(5)), tol=1e-5)


def test_nf4_weight_keeps_its_layout_through_an_evaluation(monkeypatch):
    """bitsandbytes, where it detects AVX512-BF16, repacks a Linear4bit's weight in place on its
    first no-grad forward in eval mode and keeps it repacked. NF4Linear opts out: after an
    evaluation the packed bytes, the forward and training are what they were. The detection is
    forced on, so this holds on CPUs without AVX512-BF16 too."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(6)) * 0.05
    base = NF4Linear(w)
    packed = base.inner.weight.data.clone()
    reference = nf4_dequant(base)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        evaluated = base.eval()(x)
    assert torch.equal(base.inner.weight.data, packed)
    torch.testing.assert_close(evaluated, x @ reference.t(), rtol=1e-5, atol=1e-5)
    got, want = twin_lora(base.train(), float_linear(reference))
    assert_same_step(got, want, x, tol=1e-5)


# --- a whole model -----------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["int4", "nf4"])
def test_quantized_model_with_lora_matches_float_model_with_dequantized_weights(quant):
    args = tiny_args(n_kv_heads=2)
    model = random_model(args, seed=7)
    reference = copy.deepcopy(model)
    quantize_model_(model, quant, GROUP)
    modules = dict(model.named_modules())
    ref_modules = dict(reference.named_modules())
    for i in range(args.n_layers):
        for name in BLOCK_LINEARS:
            q = modules[f"layers.{i}.{name}"]
            assert isinstance(q, Int4Linear if quant == "int4" else NF4Linear)
            with torch.no_grad():
                ref_modules[f"layers.{i}.{name}"].weight.copy_(ref_dequant(q) if quant == "int4" else nf4_dequant(q))
    model.requires_grad_(False)
    reference.requires_grad_(False)
    apply_lora(model, "all-linear", 4, 8.0)
    apply_lora(reference, "all-linear", 4, 8.0)
    gen = torch.Generator().manual_seed(8)
    got_layers, want_layers = lora_layers(model), lora_layers(reference)
    assert got_layers.keys() == want_layers.keys() and len(got_layers) == 7 * args.n_layers
    with torch.no_grad():
        for path in got_layers:
            for part in ("lora_A", "lora_B"):
                w = torch.randn(getattr(got_layers[path], part).weight.shape, generator=gen) * 0.05
                getattr(got_layers[path], part).weight.copy_(w)
                getattr(want_layers[path], part).weight.copy_(w)
    tokens = torch.randint(1, args.vocab_size, (2, 16), generator=gen)
    with torch.no_grad():
        got, want = model(tokens), reference(tokens)
        plain = random_model(args, seed=7)(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the comparison is not between two float models


# --- fine-tuning on quantized bases --------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_ckpt(tmp_path_factory, tokenizer_path):
    """A tiny GQA checkpoint whose float32 weights are exactly fp16 values, so a GPTQ folder
    (which stores the unquantized tensors as fp16) holds the very same model as the float one.
    The output layer is scaled up 4x: sharper logits, so the quantization error shows in the
    eval loss (int4 RTN g32 moves it by 1.2e-3, NF4 by 4e-4 relative, vs 3e-4 and 8e-5 unscaled)."""
    out = tmp_path_factory.mktemp("fp16base")
    model = random_model(tiny_args(n_kv_heads=2), seed=11)
    with torch.no_grad():
        model.output.weight.mul_(4)
        for p in model.parameters():
            p.copy_(p.half().float())
    save_checkpoint(model, out)
    shutil.copy(tokenizer_path, out / "tokenizer.model")
    return out


def config(ckpt, out_dir, **kw) -> TrainConfig:
    """The small sft LoRA run on the demo data of tests/finetune/test_trainer.py (trainer_config),
    at lr 1e-2 and with this file's int4 group size."""
    return trainer_config(ckpt, out_dir, **{"lr": 1e-2, "quant_group_size": GROUP, **kw})


def dequantized_float_model(ckpt, quant: str) -> nn.Module:
    """The float model holding the weights a quant base trains on (our decoder / bnb's)."""
    args = read_model_args(ckpt)
    float_model = load_model(ckpt, args)
    quantized = quantize_model_(load_model(ckpt, args), quant, GROUP)
    q_modules, f_modules = dict(quantized.named_modules()), dict(float_model.named_modules())
    with torch.no_grad():
        for i in range(args.n_layers):
            for name in BLOCK_LINEARS:
                q = q_modules[f"layers.{i}.{name}"]
                f_modules[f"layers.{i}.{name}"].weight.copy_(ref_dequant(q) if quant == "int4" else nf4_dequant(q))
    return float_model


@pytest.fixture(scope="module")
def int4_run(fp16_ckpt, tmp_path_factory):
    """LoRA on an int4 (RTN g32 on load) base, merge = true: (out_dir, results)."""
    out = tmp_path_factory.mktemp("int4_run")
    return out, train(config(fp16_ckpt, out, quant="int4", merge=True))


@pytest.mark.parametrize("quant", ["int4", "nf4"])
def test_lora_on_a_quantized_base_lowers_eval_loss(fp16_ckpt, int4_run, tmp_path, quant):
    # lr 0: one step that changes nothing, so its final eval is the untrained adapter's (= the base's)
    before = train(config(fp16_ckpt, tmp_path / "before", quant=quant, max_steps=1, lr=0.0))
    # ... which is the float model holding the dequantized weights, not the float checkpoint
    reference = eval_loss_of(dequantized_float_model(fp16_ckpt, quant), fp16_ckpt)
    assert before["eval_loss"] == pytest.approx(reference, rel=1e-5)
    float_loss = eval_loss_of(load_model(fp16_ckpt, read_model_args(fp16_ckpt)), fp16_ckpt)
    assert abs(before["eval_loss"] - float_loss) > 1e-4 * float_loss  # 10x the tolerance above
    if quant == "int4":
        out, after = int4_run
    else:
        out = tmp_path / "after"
        after = train(config(fp16_ckpt, out, quant=quant))
    assert after["eval_loss"] < before["eval_loss"] - 0.3, (before, after)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5]) - 0.5, losses


def run_python(cmd, timeout=300):
    result = run([sys.executable, *cmd], timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def logits_of(model: nn.Module, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens)


def test_merge_on_an_int4_base_exports_a_float_checkpoint_that_requantizes(fp16_ckpt, int4_run, tmp_path):
    """Acceptance: LoRA merged into an int4 base exports a float checkpoint (an HF folder, the
    default merge_format), optionally re-quantized."""
    out, _ = int4_run
    merged_dir = out / "merged"
    args = read_model_args(fp16_ckpt)
    config_json = json.loads((merged_dir / "config.json").read_text())
    assert config_json["model_type"] == "llama" and "quantization_config" not in config_json
    assert not (merged_dir / "quantize_config.json").exists() and (merged_dir / "tokenizer.model").is_file()
    stored = load_file(str(merged_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in stored.values())
    assert not any(k.endswith(("qweight", "qzeros", "scales", "g_idx")) or "lora" in k for k in stored)
    merged_model = load_model(merged_dir, read_model_args(merged_dir))
    merged_state = merged_model.state_dict()

    # weights: our decode of the int4 base + B @ A * alpha / r from the saved (PEFT) adapter, for
    # the layers whose rows need no RoPE permutation (v, o and the FFN)
    base_int4 = load_model(fp16_ckpt, args, quant="int4", group_size=GROUP)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    modules = dict(base_int4.named_modules())
    for i in range(args.n_layers):
        for ours in ("attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            prefix = peft_module_name(f"layers.{i}.{ours}")
            delta = adapter[f"{prefix}.lora_B.weight"].double() @ adapter[f"{prefix}.lora_A.weight"].double() * (16 / 8)
            want = ref_dequant(modules[f"layers.{i}.{ours}"]) + delta
            torch.testing.assert_close(merged_state[f"layers.{i}.{ours}.weight"].double(), want, rtol=0, atol=1e-6)
            assert delta.abs().max() > 1e-3  # the adapter trained

    # logits: the merged float model against the int4 base + adapter it came from. Float32
    # rounding differs only in the order of the sums (W x + B (A x) vs (W + B A) x): 1e-4
    tokens = torch.randint(1, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    merged_logits = logits_of(merged_model, tokens)
    lora_logits = logits_of(load_adapter(base_int4, out / "adapter"), tokens)
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-4, atol=1e-4)
    base_logits = logits_of(load_model(fp16_ckpt, args, quant="int4", group_size=GROUP), tokens)
    assert (lora_logits - base_logits).abs().max() > 1e-2

    # re-quantized with python -m quant (RTN g32): a GPTQ folder that load_model reads as int4
    requant = tmp_path / "merged_int4"
    run_python(["-m", "quant", "--ckpt_dir", merged_dir, "--method", "rtn", "--group_size", GROUP, "--out", requant,
                "--tokenizer_path", fp16_ckpt / "tokenizer.model"])
    config_json = json.loads((requant / "config.json").read_text())
    assert config_json["quantization_config"]["bits"] == 4 and config_json["quantization_config"]["group_size"] == GROUP
    reloaded = load_model(requant, read_model_args(requant), quant="int4")
    r_modules = dict(reloaded.named_modules())
    for i in range(args.n_layers):
        for name in BLOCK_LINEARS:
            layer = r_modules[f"layers.{i}.{name}"]
            assert isinstance(layer, Int4Linear)
            # round to nearest: every weight within one step of its group's grid (half a step,
            # plus the zero point clamped to 1..15 on groups without negative weights)
            merged_w = merged_state[f"layers.{i}.{name}.weight"].double()
            step = layer.scales.double()[layer.g_idx.long()].t()  # [out, in]
            err = (ref_dequant(layer) - merged_w).abs()
            assert bool((err <= step * 1.0001 + 1e-6).all()), f"layers.{i}.{name}"
            assert float((err / step).mean()) < 0.3
    # the re-quantized model's logits are as close to the merged float model's as the first
    # quantization's were to the float base, within 2x: both are one RTN g32 rounding, but the
    # trained adapter widens the weights' ranges and so the steps (measured 0.16 vs 0.11). The
    # per-weight bound above is the sharp check (on this random model near-uniform attention hides
    # even q/k rows out of RoPE order from the logits: 0.9%)
    requant_logits = logits_of(reloaded, tokens)
    float_logits = logits_of(load_model(fp16_ckpt, args), tokens)
    first_err = float((base_logits - float_logits).norm() / float_logits.norm())
    requant_err = float((requant_logits - merged_logits).norm() / merged_logits.norm())
    print(f"relative logit error: int4 base vs float {first_err:.4f}, re-quantized vs merged {requant_err:.4f}")
    assert 0 < requant_err <= 2 * first_err, (requant_err, first_err)


# --- example.py --quant int4 ---------------------------------------------------------------------


def generate(ckpt, *extra) -> str:
    cmd = ["example.py", "--ckpt_dir", ckpt, "--quant", "int4", "--group_size", GROUP, "--temperature", "0",
           "--dtype", "float32", "--max_gen_len", "12", "--prompt", "What color is the frog?", "--prompt", "The quick robot", *extra]
    return run_python(cmd).stdout


@pytest.fixture(scope="module")
def gptq_folder(fp16_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "int4"
    run_python(["-m", "quant", "--ckpt_dir", fp16_ckpt, "--method", "rtn", "--group_size", GROUP, "--out", out])
    return out


def test_example_int4_on_load_and_from_a_gptq_folder_generate_the_same_text(fp16_ckpt, gptq_folder, int4_run):
    """Both are the same RTN g32 weights (the float weights are fp16 values, so the folder's fp16
    copies of the embedding, norms and output are exact): greedy text must be identical, and so
    with an adapter trained on the int4 base."""
    from_float, from_folder = generate(fp16_ckpt), generate(gptq_folder)
    assert from_float.count("> ") == 2 and from_float == from_folder, (from_float, from_folder)
    adapter = int4_run[0] / "adapter"
    tuned_float, tuned_folder = generate(fp16_ckpt, "--adapter", adapter), generate(gptq_folder, "--adapter", adapter)
    assert f"adapter {adapter}" in tuned_float
    assert tuned_float == tuned_folder, (tuned_float, tuned_folder)
    assert tuned_float.split("\n", 1)[1] != from_float  # the adapter changed the answers


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_quantized_base_trains_adapters_only(method):
    """int4/NF4 weights are frozen buffers: full or freeze tuning on them is refused up front."""
    from llama.errors import LlamaInputError

    with pytest.raises(LlamaInputError, match="lora or prompt"):
        TrainConfig(quant="int4", method=method).check()
