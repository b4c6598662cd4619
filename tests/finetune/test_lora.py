"""finetune.lora and the LoRA side of finetune.adapters against PEFT (a test-only reference).

PEFT runs on HF's LlamaForCausalLM; ours on our Transformer with the same weights, converted by
the tests' own converter in tests/utils.py (q/k rows go from Meta's interleaved RoPE layout to
HF's half rotation per head, as docs/formats.md states). Adapter A/B values are copied from PEFT
into ours, so outputs and gradients must agree; the export test goes the other way (our saved
folder into PEFT).
"""
import json
import math

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from finetune.adapters import attach, load_adapter, save_trained  # noqa: E402
from finetune.methods import get_method  # noqa: E402
from finetune.config import TrainConfig  # noqa: E402
from finetune.methods.lora import LoRALinear, apply_lora, lora_layers, resolve_targets, set_merged  # noqa: E402
from llama.errors import LlamaInputError  # noqa: E402
from llama.model import Transformer  # noqa: E402
from llama.tokenizers import Tokenizer  # noqa: E402
from tests.utils import (  # noqa: E402
    ALL_HF, hf_from_ours, hf_to_meta_rows, make_ours, meta_state_to_hf, peft_module_name, rope_heads, tiny_args,
)

TOL_LAYER = 1e-5  # one linear layer, float32, absolute
TOL_MODEL = 1e-5  # whole model, float32, relative to the largest value compared
TOL_LOGITS = 1e-4  # ours vs HF/PEFT logits, absolute (logits are O(1))


# --- the test's own reference helpers (the shared ones are in tests/utils.py) ---------------------


def copy_peft_lora_into_ours(peft_model, ours: nn.Module, args) -> None:
    """Set every LoRALinear of ours to the A/B of the matching PEFT layer (q/k B rows to Meta's layout)."""
    modules = dict(peft_model.named_modules())
    layers = lora_layers(ours)
    assert len(layers) == 7 * args.n_layers
    for path, layer in layers.items():
        theirs = modules[peft_module_name(path.removeprefix("model."))]
        a, b = theirs.lora_A["default"].weight.detach(), theirs.lora_B["default"].weight.detach()
        heads = rope_heads(path.rsplit(".", 1)[1], args)
        if heads:
            b = hf_to_meta_rows(b, heads)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        assert layer.scaling == pytest.approx(theirs.scaling["default"], rel=1e-12)


def randomize_lora_b(module: nn.Module, seed: int, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def random_tokens(seed: int, shape=(2, 16), vocab: int = 384) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --- one linear layer ------------------------------------------------------------------------------


class OneLinear(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("r,alpha,rslora", [(4, 8.0, False), (4, 8.0, True), (8, 3.0, False), (3, 16.0, True)])
def test_lora_linear_matches_peft(r, alpha, rslora):
    """Same A, nonzero B and same input: PEFT and ours give the same output and the same gradients
    of A, B and the input."""
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=False)
    peft_model = get_peft_model(OneLinear(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                            target_modules=["proj"], use_rslora=rslora))
    theirs = dict(peft_model.named_modules())["base_model.model.proj"]
    randomize_lora_b(peft_model, seed=1)
    ours = LoRALinear(nn.Linear(48, 40, bias=False), r, alpha, 0.0, rslora)
    with torch.no_grad():
        ours.base.weight.copy_(base.weight)
        ours.lora_A.weight.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.weight.copy_(theirs.lora_B["default"].weight)
    expected_scaling = alpha / math.sqrt(r) if rslora else alpha / r
    assert ours.scaling == pytest.approx(expected_scaling) == theirs.scaling["default"]

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 48, generator=g)
    w = torch.randn(3, 5, 40, generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), peft_model(x2)
    # the adapter really contributes: the output differs from the base's
    assert (y2 - base(x)).abs().max() > 0.1
    torch.testing.assert_close(y1, y2, atol=TOL_LAYER, rtol=0)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=TOL_LAYER, rtol=0)
    torch.testing.assert_close(ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad, atol=TOL_LAYER, rtol=0)
    torch.testing.assert_close(ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad, atol=TOL_LAYER, rtol=0)
    # and by hand: y = x W^T + (x A^T B^T) * scaling
    a, b = ours.lora_A.weight.detach(), ours.lora_B.weight.detach()
    by_hand = x @ base.weight.detach().T + (x @ a.T @ b.T) * expected_scaling
    torch.testing.assert_close(y1.detach(), by_hand, atol=TOL_LAYER, rtol=0)


@pytest.mark.parametrize("n_kv_heads,rslora", [(4, False), (2, True)])
def test_lora_model_matches_peft(n_kv_heads, rslora):
    """Whole model, all-linear LoRA with nonzero B: logits, input-embedding gradients and every
    A/B gradient agree with PEFT on HF's model (q/k B compared in Meta's row layout)."""
    args = tiny_args(n_kv_heads=n_kv_heads)
    ours = make_ours(args, seed=n_kv_heads)
    torch.manual_seed(5)
    theirs = get_peft_model(hf_from_ours(ours), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                          target_modules=ALL_HF, use_rslora=rslora))
    randomize_lora_b(theirs, seed=6)
    ours.requires_grad_(False)
    apply_lora(ours, "all-linear", 4, 8.0, 0.0, rslora)
    copy_peft_lora_into_ours(theirs, ours, args)

    tokens = random_tokens(7)
    h = ours.tok_embeddings(tokens).detach()
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    ours_logits = ours.output(ours.hidden_states(h1)).float()
    their_logits = theirs(inputs_embeds=h2).logits.float()
    torch.testing.assert_close(ours_logits, their_logits, atol=TOL_LOGITS, rtol=0)
    # the adapters matter: without them the logits are far off
    with theirs.disable_adapter(), torch.no_grad():
        plain = theirs(inputs_embeds=h).logits
    assert (plain - their_logits).abs().max() > 0.1

    w = torch.randn(ours_logits.shape, generator=torch.Generator().manual_seed(8))
    (ours_logits.log_softmax(-1) * w).sum().backward()
    (their_logits.log_softmax(-1) * w).sum().backward()
    assert rel_err(h1.grad, h2.grad) <= TOL_MODEL
    modules = dict(theirs.named_modules())
    for path, layer in lora_layers(ours).items():
        ref = modules[peft_module_name(path)]
        ga, gb = ref.lora_A["default"].weight.grad, ref.lora_B["default"].weight.grad
        heads = rope_heads(path.rsplit(".", 1)[1], args)
        if heads:
            gb = hf_to_meta_rows(gb, heads)
        assert rel_err(layer.lora_A.weight.grad, ga) <= TOL_MODEL, path
        assert rel_err(layer.lora_B.weight.grad, gb) <= TOL_MODEL, path
    # only the adapters train
    assert all(("lora_" in n) == p.requires_grad for n, p in ours.named_parameters())


# --- initialisation ---------------------------------------------------------------------------------


def test_fresh_lora_changes_nothing_and_a_has_peft_bound():
    torch.manual_seed(0)
    base = nn.Linear(256, 96, bias=False)
    layer = LoRALinear(base, r=16, alpha=32.0)
    assert layer.lora_A.weight.shape == (16, 256) and layer.lora_B.weight.shape == (96, 16)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(4, 256)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)

    # PEFT: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / math.sqrt(256)
    a = layer.lora_A.weight.detach()
    assert a.abs().max() <= bound + 1e-7
    assert a.abs().max() > 0.98 * bound  # fills the range: 4096 draws
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform, not normal
    theirs = dict(get_peft_model(OneLinear(nn.Linear(256, 96, bias=False)),
                                 LoraConfig(r=16, lora_alpha=32, target_modules=["proj"])).named_modules())
    peft_a = theirs["base_model.model.proj"].lora_A["default"].weight.detach()
    assert peft_a.abs().max() <= bound + 1e-7 and peft_a.abs().max() > 0.98 * bound
    assert torch.count_nonzero(theirs["base_model.model.proj"].lora_B["default"].weight) == 0

    # on a whole model: logits unchanged by apply_lora
    model = make_ours(tiny_args())
    tokens = random_tokens(1)
    with torch.no_grad():
        before = model(tokens)
        wrapped = apply_lora(model, ["q_proj", "wv", "down_proj"], 4, 8.0)
        after = model(tokens)
    assert sorted(wrapped) == sorted(f"layers.{i}.{m}" for i in range(2)
                                     for m in ("attention.wq", "attention.wv", "feed_forward.w2"))
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_resolve_targets():
    assert resolve_targets("all-linear") == ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    assert resolve_targets(["all-linear"]) == resolve_targets("all-linear")
    assert resolve_targets(["q_proj", "v_proj", "gate_proj", "down_proj", "up_proj"]) == ["wq", "wv", "w1", "w2", "w3"]
    assert resolve_targets(["wk", "o_proj"]) == ["wk", "wo"]
    assert resolve_targets("k_proj") == ["wk"]
    with pytest.raises(LlamaInputError, match="qproj"):
        resolve_targets(["q_proj", "qproj"])
    with pytest.raises(LlamaInputError):
        resolve_targets(["lm_head"])
    with pytest.raises(LlamaInputError):
        apply_lora(make_ours(tiny_args()), ["bogus"], 4, 8.0)
    with pytest.raises(LlamaInputError):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1.0)


# --- merging ------------------------------------------------------------------------------------------


def test_merge_unmerge_and_merged_state_dict():
    args = tiny_args(n_kv_heads=2)
    model = make_ours(args)
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = random_tokens(2)
    with torch.no_grad():
        plain = model(tokens)
    model.requires_grad_(False)
    apply_lora(model, "all-linear", 4, 8.0)
    randomize_lora_b(model, seed=3)
    with torch.no_grad():
        unmerged = model(tokens)
        set_merged(model, True)
        assert all(layer.merged for layer in lora_layers(model).values())
        merged = model(tokens)
        wq = model.layers[0].attention.wq
        by_hand = plain_state["layers.0.attention.wq.weight"] + wq.lora_B.weight @ wq.lora_A.weight * wq.scaling
        torch.testing.assert_close(wq.base.weight, by_hand, atol=1e-6, rtol=0)
        set_merged(model, False)
        again = model(tokens)
    assert (unmerged - plain).abs().max() > 0.1  # the adapters matter
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=0)
    for path, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base.weight, plain_state[f"{path}.weight"], atol=1e-6, rtol=0)
    # merging twice folds once
    with torch.no_grad():
        layer = model.layers[1].feed_forward.w2
        layer.merge()
        layer.merge()
        torch.testing.assert_close(layer.base.weight, plain_state["layers.1.feed_forward.w2.weight"]
                                   + layer.delta_weight(), atol=1e-6, rtol=0)
        layer.unmerge()

    state = get_method("lora").merged_state_dict(model)
    assert set(state) == set(plain_state)  # plain names: no .base., no lora_
    for key, value in state.items():
        path = key.removesuffix(".weight")
        layer = lora_layers(model).get(path)
        expected = plain_state[key]
        if layer is not None:
            expected = expected + layer.lora_B.weight @ layer.lora_A.weight * layer.scaling
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)
        assert value.dtype == plain_state[key].dtype
    fresh = Transformer(args)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), unmerged, atol=1e-5, rtol=0)


def test_merged_weights_match_peft_merge_and_unload():
    args = tiny_args()
    ours = make_ours(args, seed=3)
    torch.manual_seed(4)
    theirs = get_peft_model(hf_from_ours(ours), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_HF))
    randomize_lora_b(theirs, seed=9)
    ours.requires_grad_(False)
    apply_lora(ours, "all-linear", 4, 8.0)
    copy_peft_lora_into_ours(theirs, ours, args)
    expected = meta_state_to_hf(get_method("lora").merged_state_dict(ours), args.n_layers, args.n_heads, args.n_kv_heads)
    merged_hf = theirs.merge_and_unload().state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(merged_hf[key], value, atol=1e-6, rtol=0, msg=key)


# --- export to PEFT and back --------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads,rslora", [(4, False), (2, True)])
def test_saved_adapter_loads_into_peft_and_back(tmp_path, tokenizer_path, n_kv_heads, rslora):
    args = tiny_args(n_kv_heads=n_kv_heads)
    base = make_ours(args, seed=11)
    plain_state = {k: v.clone() for k, v in base.state_dict().items()}
    hf = hf_from_ours(base)
    cfg = TrainConfig(method="lora", lora_targets=["all-linear"], lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                      use_rslora=rslora, ckpt_dir=str(tmp_path / "base"))
    torch.manual_seed(0)
    task_model = attach(base, cfg, Tokenizer(tokenizer_path))
    randomize_lora_b(task_model, seed=12)  # trained-looking adapter: B nonzero everywhere
    out = tmp_path / "adapter"
    save_trained(task_model, cfg, out)

    # format: PEFT's names and shapes, the same key set PEFT itself writes
    tensors = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is rslora and sorted(config["target_modules"]) == sorted(ALL_HF)
    assert "base_model_name_or_path" in config
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, args.dim)
    assert tensors[key.replace("lora_A", "lora_B")].shape == (args.n_heads * args.head_dim, 4)
    k_b = key.replace("q_proj", "k_proj").replace("lora_A", "lora_B")
    assert tensors[k_b].shape == (args.n_kv_heads * args.head_dim, 4)
    torch.manual_seed(0)
    reference = get_peft_model(hf_from_ours(make_ours(args, seed=11)),
                               LoraConfig(r=4, lora_alpha=8, target_modules=ALL_HF, use_rslora=rslora))
    reference.save_pretrained(tmp_path / "peft_saved")
    peft_tensors = load_file(str(tmp_path / "peft_saved" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in peft_tensors.items()}

    tokens = random_tokens(13, (3, 12))
    with torch.no_grad():
        ours_logits = task_model.model(tokens)
        peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
        peft_logits = peft_model(input_ids=tokens).logits.float()
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=tokens).logits.float()
    assert (plain - peft_logits).abs().max() > 0.1  # the adapter is really applied
    torch.testing.assert_close(peft_logits, ours_logits, atol=TOL_LOGITS, rtol=0)
    assert peft_model.peft_config["default"].use_rslora is rslora

    fresh = Transformer(args)
    fresh.load_state_dict(plain_state)
    fresh = load_adapter(fresh.eval(), out)
    assert len(lora_layers(fresh)) == 7 * args.n_layers
    for path, layer in lora_layers(fresh).items():
        src = lora_layers(task_model.model)[path]
        assert torch.equal(layer.lora_A.weight, src.lora_A.weight)
        assert torch.equal(layer.lora_B.weight, src.lora_B.weight)
        assert layer.scaling == src.scaling
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), ours_logits, atol=0, rtol=0)
