"""LoRA adapters saved by PEFT itself, with the options PEFT writes, loaded by finetune.adapters.load_adapter.

PEFT (a test-only reference) runs on HF's LlamaForCausalLM built from our tiny model
(tests/utils.hf_from_ours); each adapter gets random B (PEFT's B starts at zero) and random copies
of its modules_to_save, is saved with save_pretrained, and loaded onto a fresh copy of our model:
the logits must match PEFT's. Options we can't reproduce must be refused with one line naming the
adapter folder and the option, and the tests show that ignoring them would give other logits.
"""
import json
import shutil
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, TaskType, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from finetune.adapters import attach, load_adapter, save_trained  # noqa: E402
from finetune.config import TrainConfig  # noqa: E402
from finetune.methods.lora import lora_layers  # noqa: E402
from llama.errors import LlamaInputError  # noqa: E402
from llama.tokenizers import Tokenizer  # noqa: E402
from tests.utils import ALL_HF, hf_from_ours, make_ours, peft_module_name, tiny_args  # noqa: E402

TOL = 2e-5  # ours vs PEFT logits, float32, absolute (the logits are O(1..10))
PREFIX = "base_model.model."


def random_tokens(seed: int, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(3, 384, shape, generator=torch.Generator().manual_seed(seed))


def peft_adapter(folder, ours, seed: int = 0, **lora_kwargs):
    """PEFT's LoRA with these LoraConfig options on HF's copy of `ours`, made to look trained (random
    B, random copies of modules_to_save), saved to `folder`. Returns the PEFT model."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank_pattern with use_rslora, unmatched patterns
        model = get_peft_model(hf_from_ours(ours), LoraConfig(lora_dropout=0.0, **{"r": 4, "lora_alpha": 8,
                                                                                  **lora_kwargs}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + torch.rand(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * p.std().clamp(min=0.3))
    model.save_pretrained(folder)
    return model.eval()


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, PeftModel):
            return model(input_ids=tokens).logits.float()
        return model(tokens).float()


def fresh(ours):
    """A new copy of our base model (load_adapter changes the model it is given)."""
    model = make_ours(ours.args, seed=0)
    model.load_state_dict(ours.state_dict())
    return model


def lora_module_names(peft_model) -> set:
    return {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def assert_matches_peft(ours, folder, theirs, seed: int = 3):
    """Load `folder` onto a fresh copy of ours: the same modules adapted, each with PEFT's scaling
    and rank, and the same logits."""
    loaded = load_adapter(fresh(ours), folder)
    modules = dict(theirs.named_modules())
    assert {peft_module_name(p) for p in lora_layers(loaded)} == lora_module_names(theirs)
    for path, layer in lora_layers(loaded).items():
        ref = modules[peft_module_name(path)]
        assert layer.r == ref.r["default"], path
        assert layer.scaling == pytest.approx(ref.scaling["default"], rel=1e-12), path
    tokens = random_tokens(seed)
    got, want = logits(loaded, tokens), logits(theirs, tokens)
    assert (want - logits(ours, tokens)).abs().max() > 0.1  # the adapter really changes the logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    return loaded


def edit_adapter(src, dst, config_changes=None, drop=(), add=None):
    """A copy of adapter folder src with some config keys changed and tensors dropped or added."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not any(d in k for d in drop)}
    tensors.update(add or {})
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def refused(ours, folder, *needles):
    """Loading folder onto ours fails with one line naming the folder and each needle; the model is
    left as it was."""
    model = fresh(ours)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LlamaInputError) as e:
        load_adapter(model, folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert not lora_layers(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    return msg


# --- options honoured ------------------------------------------------------------------------------

OPTIONS = {
    # what PEFT writes for all-linear: the expanded names, in no particular order
    "expanded_list": dict(target_modules=ALL_HF[::-1]),
    "all_linear_string": dict(target_modules="all-linear"),
    "full_name_suffixes": dict(target_modules=["model.layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "v_proj"]),
    # fullmatched to the whole name: the bare "up_proj" alternative matches nothing
    "regex": dict(target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj|model\.layers\.0\.mlp\.\w+_proj|up_proj"),
    "layers_to_transform_list": dict(target_modules=ALL_HF, layers_to_transform=[1]),
    "layers_to_transform_int_pattern": dict(target_modules=["q_proj", "k_proj", "down_proj"], layers_to_transform=0,
                                            layers_pattern="layers"),
    "exclude_modules": dict(target_modules=ALL_HF, exclude_modules=["layers.0.self_attn.q_proj", "up_proj"]),
    "rank_pattern": dict(target_modules=ALL_HF, rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6,
                                                              "k_proj": 3}),
    # the first key that matches a whole dotted suffix wins: "_proj" and "self_attn" match nothing
    "alpha_pattern": dict(target_modules=ALL_HF, alpha_pattern={"_proj": 50, "self_attn": 60,
                                                                r"model\.layers\.0\.self_attn\..*": 3.0,
                                                                "v_proj": 32, "gate_proj": 1}),
    "rank_and_alpha_pattern_rslora": dict(target_modules=ALL_HF, use_rslora=True, rank_pattern={"o_proj": 8},
                                          alpha_pattern={"layers.1.self_attn.o_proj": 2}),
    "rslora": dict(target_modules=["q_proj", "v_proj"], use_rslora=True, r=6, lora_alpha=5),
    "modules_to_save_lm_head": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "modules_to_save_embed": dict(target_modules=["k_proj", "o_proj"], modules_to_save=["embed_tokens"]),
    # "norm" matches every module whose name ends with it: both norms of each block and the final one
    "modules_to_save_all": dict(target_modules=ALL_HF, modules_to_save=["lm_head", "embed_tokens", "norm"]),
    "modules_to_save_block_linear": dict(target_modules=ALL_HF, modules_to_save=["layers.0.self_attn.k_proj"]),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_peft_adapter_with_option_matches_peft(tmp_path, name):
    ours = make_ours(tiny_args(n_kv_heads=2), seed=1)
    theirs = peft_adapter(tmp_path / "adapter", ours, seed=2, **OPTIONS[name])
    loaded = assert_matches_peft(ours, tmp_path / "adapter", theirs)
    if name.startswith("modules_to_save"):  # the whole weights were replaced, not adapted
        changed = {k for k, v in loaded.state_dict().items() if "lora_" not in k
                   and not torch.equal(v, ours.state_dict()[k.replace(".base.", ".")])}
        assert changed
        assert not any(k.replace(".base.", ".").removesuffix(".weight") in lora_layers(loaded) for k in changed)


def test_options_change_the_outcome(tmp_path):
    """The options matter, so the test above could fail: loading the same tensors with the option
    dropped from the config (uniform rank/alpha, no rslora, no modules_to_save) gives other logits or
    is refused."""
    ours = make_ours(tiny_args(), seed=1)
    tokens = random_tokens(4)
    theirs = peft_adapter(tmp_path / "a", ours, seed=5, target_modules=ALL_HF, alpha_pattern={"v_proj": 32})
    plain = edit_adapter(tmp_path / "a", tmp_path / "a_plain", {"alpha_pattern": {}})
    assert (logits(load_adapter(fresh(ours), plain), tokens) - logits(theirs, tokens)).abs().max() > 0.05
    theirs = peft_adapter(tmp_path / "b", ours, seed=5, target_modules=ALL_HF, use_rslora=True)
    plain = edit_adapter(tmp_path / "b", tmp_path / "b_plain", {"use_rslora": False})
    assert (logits(load_adapter(fresh(ours), plain), tokens) - logits(theirs, tokens)).abs().max() > 0.05
    # a rank the pattern doesn't explain is a shape error, not a silent load
    peft_adapter(tmp_path / "c", ours, seed=5, target_modules=ALL_HF, rank_pattern={"q_proj": 2})
    refused(ours, edit_adapter(tmp_path / "c", tmp_path / "c_plain", {"rank_pattern": {}}), "q_proj.lora_A", "rank 4")
    # whole weights not named in modules_to_save are refused, not dropped
    peft_adapter(tmp_path / "d", ours, seed=5, target_modules=["q_proj"], modules_to_save=["norm"])
    refused(ours, edit_adapter(tmp_path / "d", tmp_path / "d_plain", {"modules_to_save": None}), "norm.weight",
            "modules_to_save does not name")


def test_saved_embedding_layers_load_as_peft_loads_them(tmp_path):
    """save_pretrained(save_embedding_layers=True) (also PEFT's choice when the vocabulary was resized)
    writes the embeddings whole without modules_to_save naming them; PEFT's loader puts them into the
    base model, and so must ours. A resized vocabulary is refused with its shape."""
    ours = make_ours(tiny_args(), seed=1)
    torch.manual_seed(0)
    model = get_peft_model(hf_from_ours(ours), LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "embed_tokens" in name or "lm_head" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {f"{PREFIX}lm_head.weight", f"{PREFIX}model.embed_tokens.weight"} <= set(saved)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] is None
    theirs = PeftModel.from_pretrained(hf_from_ours(ours), tmp_path / "adapter").eval()
    loaded = assert_matches_peft(ours, tmp_path / "adapter", theirs)
    assert not torch.equal(loaded.tok_embeddings.weight, ours.tok_embeddings.weight)
    assert not torch.equal(loaded.output.weight, ours.output.weight)

    bigger = torch.cat([saved[f"{PREFIX}model.embed_tokens.weight"], torch.zeros(8, 64)])
    resized = edit_adapter(tmp_path / "adapter", tmp_path / "resized",
                           add={f"{PREFIX}model.embed_tokens.weight": bigger})
    refused(ours, resized, "embed_tokens.weight", "(392, 64)", "vocabulary resized")


def test_our_own_cls_adapter_and_a_peft_seq_cls_adapter_load(tmp_path, tokenizer_path):
    """modules_to_save = ["score"] (ours) or ["classifier", "score"] (PEFT's SEQ_CLS): the score head's
    tensor is left to the caller; the LoRA part loads and matches PEFT's hidden states."""
    args = tiny_args()
    ours = make_ours(args, seed=7)
    cfg = TrainConfig(method="lora", task="cls", lora_targets=["q_proj", "v_proj"], lora_r=4, lora_alpha=8.0,
                      lora_dropout=0.0, ckpt_dir=str(tmp_path / "base"))
    task_model = attach(fresh(ours), cfg, Tokenizer(tokenizer_path), num_labels=3)
    with torch.no_grad():
        for layer in lora_layers(task_model.model).values():
            layer.lora_B.weight.normal_(std=0.3)
    save_trained(task_model, cfg, tmp_path / "ours_cls")
    assert json.loads((tmp_path / "ours_cls" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    tokens = random_tokens(8)
    loaded = load_adapter(fresh(ours), tmp_path / "ours_cls")
    torch.testing.assert_close(logits(loaded, tokens), logits(task_model.model, tokens), atol=0, rtol=0)

    from transformers import LlamaForSequenceClassification

    hf = hf_from_ours(ours)
    hf.config.num_labels, hf.config.pad_token_id = 3, 0
    seq = LlamaForSequenceClassification(hf.config).float()
    seq.model.load_state_dict(hf.model.state_dict())
    torch.manual_seed(0)
    theirs = get_peft_model(seq, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["k_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    theirs.save_pretrained(tmp_path / "peft_cls")
    config = json.loads((tmp_path / "peft_cls" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["classifier", "score"]
    score = load_file(str(tmp_path / "peft_cls" / "adapter_model.safetensors"))[f"{PREFIX}score.weight"]
    loaded = load_adapter(fresh(ours), tmp_path / "peft_cls")
    with torch.no_grad():
        got = loaded.hidden_states(loaded.tok_embeddings(tokens))[:, -1] @ score.T
        want = theirs.eval()(input_ids=tokens).logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


# --- options refused -------------------------------------------------------------------------------


@pytest.mark.parametrize("option,needle", [
    (dict(use_dora=True), "use_dora = true"),
    (dict(lora_bias=True), "lora_bias = true"),
    (dict(init_lora_weights="pissa"), 'init_lora_weights = "pissa"'),
    (dict(init_lora_weights="olora"), 'init_lora_weights = "olora"'),
])
def test_refused_options_would_have_changed_the_logits(tmp_path, option, needle):
    """PEFT's DoRA, LoRA-bias, PiSSA/OLoRA adapters are refused; loading their plain LoRA part
    instead would give other logits than PEFT's (PiSSA/OLoRA: PEFT re-runs the initialisation on
    the base weights when it loads the adapter)."""
    ours = make_ours(tiny_args(), seed=1)
    theirs = peft_adapter(tmp_path / "adapter", ours, seed=2, target_modules=["q_proj", "down_proj"], **option)
    refused(ours, tmp_path / "adapter", needle)
    if "init_lora_weights" in option:  # what PEFT's own loader makes of the saved folder
        torch.manual_seed(0)
        theirs = PeftModel.from_pretrained(hf_from_ours(ours), tmp_path / "adapter").eval()
    key = next(iter(option))
    off = {"use_dora": False, "lora_bias": False, "init_lora_weights": True}[key]
    plain = edit_adapter(tmp_path / "adapter", tmp_path / "plain", {key: off}, drop=("magnitude", "lora_B.bias"))
    tokens = random_tokens(5)
    assert (logits(load_adapter(fresh(ours), plain), tokens) - logits(theirs, tokens)).abs().max() > 0.05


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_is_refused(tmp_path, bias):
    """bias != "none" is refused. (A LLaMA has no biases, so PEFT's file has nothing for them here;
    a base with biases would save trained ones.)"""
    ours = make_ours(tiny_args(), seed=1)
    peft_adapter(tmp_path / "adapter", ours, seed=2, target_modules=["v_proj"], bias=bias)
    refused(ours, tmp_path / "adapter", f'bias = "{bias}"')


@pytest.mark.parametrize("changes,needle", [
    ({"fan_in_fan_out": True}, "fan_in_fan_out = true"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"use_qalora": True}, "use_qalora"),
    ({"trainable_token_indices": [5, 6]}, "trainable_token_indices"),
    ({"alora_invocation_tokens": [7, 8]}, "alora_invocation_tokens"),
    ({"some_future_option": {"on": True}}, "some_future_option"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),  # with a regex target_modules: PEFT refuses it too
])
def test_other_options_are_refused(tmp_path, changes, needle):
    ours = make_ours(tiny_args(), seed=1)
    peft_adapter(tmp_path / "adapter", ours, seed=2, target_modules=r".*\.q_proj")
    refused(ours, edit_adapter(tmp_path / "adapter", tmp_path / "edited", changes), needle)


def test_harmless_keys_are_ignored(tmp_path):
    ours = make_ours(tiny_args(), seed=1)
    theirs = peft_adapter(tmp_path / "adapter", ours, seed=2, target_modules=["q_proj"])
    edited = edit_adapter(tmp_path / "adapter", tmp_path / "edited", {
        "some_future_option": None, "megatron_config": None, "lora_dropout": 0.3, "init_lora_weights": "gaussian",
        "revision": "main", "velora_config": None})
    assert_matches_peft(ours, edited, theirs)


# --- the config and the tensors must agree -----------------------------------------------------------


def test_config_and_tensors_must_agree(tmp_path):
    ours = make_ours(tiny_args(), seed=1)
    peft_adapter(tmp_path / "a", ours, seed=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    key = f"{PREFIX}model.layers.1.self_attn.v_proj"
    # targeted, but the file lacks its tensors
    refused(ours, edit_adapter(tmp_path / "a", tmp_path / "b", drop=(f"{key}.",)), "layers.1.self_attn.v_proj",
            "no LoRA tensors")
    # tensors for a module the config doesn't target
    refused(ours, edit_adapter(tmp_path / "a", tmp_path / "c", {"target_modules": ["q_proj"]}), "v_proj",
            "does not target")
    # an A without its B
    refused(ours, edit_adapter(tmp_path / "a", tmp_path / "d", drop=(f"{key}.lora_B",)), f"{key}.lora_B")
    # modules_to_save names lm_head, the file lacks it
    refused(ours, edit_adapter(tmp_path / "a", tmp_path / "e", drop=("lm_head",)), "lm_head", "modules_to_save")
    # a whole tensor that is no weight of a LLaMA
    refused(ours, edit_adapter(tmp_path / "a", tmp_path / "f", add={f"{PREFIX}model.extra.weight": torch.zeros(2)}),
            "model.extra.weight")
    # LoRA on lm_head (PEFT can, we don't)
    peft_adapter(tmp_path / "g", ours, seed=2, target_modules=["q_proj", "lm_head"])
    refused(ours, tmp_path / "g", "LoRA on lm_head")


def test_modules_to_save_of_a_tied_embedding_is_refused(tmp_path):
    ours = make_ours(tiny_args(), seed=1)
    peft_adapter(tmp_path / "a", ours, seed=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    tied = fresh(ours)
    tied.output.weight = tied.tok_embeddings.weight
    with pytest.raises(LlamaInputError, match="ties"):
        load_adapter(tied, tmp_path / "a")
    assert not lora_layers(tied)
