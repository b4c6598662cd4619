"""GPTQ int4 folders: quant.checkpoint.save_int4 / load_int4 and llama.loader.load_model, against folders and
float references written by the tests, from docs/formats.md ("GPTQ int4 layout") only:

    qweight int32 [in/8, out]     element j of a word at bits 4j..4j+3 (low nibble first)
    qzeros  int32 [G, out/8]      zero-1, packed along the output dim
    scales  fp16  [G, out];  g_idx int32 [in]
    W[k, n] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1))   (W is [in, out])

HF names (`model.layers.{i}.self_attn.q_proj.qweight` ...) and q/k output features in HF's rotary
order (HF rows = Meta rows permuted per head: interleaved pairs -> halves). The float references
are a llama.model.Transformer and an HF LlamaForCausalLM holding the test's own float64
dequantized weights (rounded to float32), so an int4 folder must give their logits to 1e-4.

The packer / unpacker / dequantizer (pack_dim0, unpack_dim0, gptq_tensors, unpack_all, dequant64)
and the q/k row permutation (meta_to_hf_rows, hf_to_meta_rows) are the tests' own, in
tests/utils.py; tests/quant/test_gptq.py and test_cli.py use them too.
"""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama.formats import read_model_args, save_checkpoint
from llama.loader import load_model
from llama.config import ModelArgs
from llama.errors import LlamaInputError
from llama.model import Transformer
from llama.tiny import random_model
from quant.checkpoint import load_int4, save_int4, tp_share
from quant.gptq import quantize_checkpoint
from quant.linear import Int4Linear
from quant.pack import Int4Weight
from tests.utils import (
    HF_LAYER_NAMES, TOKENIZER_VOCAB, dequant64, gptq_tensors, hf_to_meta_rows, meta_to_hf_rows, tiny_args,
    unpack_all,
)

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HIDDEN, VOCAB = 64, 2, 4, 2, 192, TOKENIZER_VOCAB
HEAD_DIM = DIM // N_HEADS
GROUP = 32
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
SHAPES = {  # [out, in] of each block linear (nn.Linear orientation)
    "attention.wq": (DIM, DIM), "attention.wk": (N_KV_HEADS * HEAD_DIM, DIM),
    "attention.wv": (N_KV_HEADS * HEAD_DIM, DIM), "attention.wo": (DIM, DIM),
    "feed_forward.w1": (HIDDEN, DIM), "feed_forward.w2": (DIM, HIDDEN), "feed_forward.w3": (HIDDEN, DIM),
}

# --- random GPTQ layers and folders (the layout's packer and dequantizer are in tests/utils.py) ---


def random_int4(out_features: int, in_features: int, group_size: int, act_order: bool, gen) -> dict:
    """A random int4 layer: every q in 0..15 and zero point in 1..15 is possible."""
    groups = in_features // group_size
    q = torch.randint(0, 16, (out_features, in_features), generator=gen)
    zeros = torch.randint(1, 16, (groups, out_features), generator=gen)
    zeros[0, :2] = torch.tensor([1, 15])  # the extremes of the stored zero-1 (0 and 14)
    scales = 0.004 + 0.012 * torch.rand(groups, out_features, generator=gen)
    if act_order:  # each group keeps group_size members, scattered over the input features
        g_idx = torch.randperm(in_features, generator=gen) // group_size
    else:
        g_idx = torch.arange(in_features) // group_size
    return gptq_tensors(q, zeros, scales, g_idx)


def hf_config_dict(quant: dict | None) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": DIM,
        "intermediate_size": HIDDEN, "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float16",
    }
    if quant is not None:
        config["quantization_config"] = quant
    return config


QUANT_CONFIG = {"bits": 4, "group_size": GROUP, "desc_act": True, "sym": False, "quant_method": "gptq",
                "damp_percent": 0.01, "true_sequential": True}


def write_gptq_folder(folder: Path, seed: int = 0, act_order_layers=(1,), style: str = "hf",
                      drop: tuple = (), replace: dict | None = None) -> tuple[dict, dict]:
    """An AutoGPTQ-style folder written from docs/formats.md. Layers in act_order_layers (and layer
    0's q_proj) get act-order g_idx. style "hf": quantization_config inside config.json;
    "autogptq": a separate quantize_config.json. Returns (Meta-layout float32 state for
    llama.model.Transformer, HF-layout float32 state for LlamaForCausalLM), both the float64
    dequantization of what was written."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta, hf = {}, {}, {}

    def plain(hf_name, meta_name, t):
        t16 = t.to(torch.float16)  # stored as GPTQ folders do; the references use the same values
        tensors[hf_name] = t16
        hf[hf_name] = meta[meta_name] = t16.float()

    plain("model.embed_tokens.weight", "tok_embeddings.weight", torch.randn(VOCAB, DIM, generator=gen))
    plain("lm_head.weight", "output.weight", torch.randn(VOCAB, DIM, generator=gen) / DIM ** 0.5)
    plain("model.norm.weight", "norm.weight", 0.5 + torch.rand(DIM, generator=gen))
    for i in range(N_LAYERS):
        for name in ("attention_norm", "ffn_norm"):
            plain(f"model.layers.{i}.{HF_LAYER_NAMES[name]}.weight", f"layers.{i}.{name}.weight",
                  0.5 + torch.rand(DIM, generator=gen))
        for name in LINEARS:
            out_features, in_features = SHAPES[name]
            act = i in act_order_layers or (i == 0 and name == "attention.wq")
            t = random_int4(out_features, in_features, GROUP, act, gen)
            stem = f"model.layers.{i}.{HF_LAYER_NAMES[name]}"
            for part, v in t.items():
                tensors[f"{stem}.{part}"] = v
            w_hf = dequant64(t)  # rows in the file's (HF) order
            hf[f"{stem}.weight"] = w_hf.float()
            if name == "attention.wq":
                w_meta = hf_to_meta_rows(w_hf, N_HEADS)
            elif name == "attention.wk":
                w_meta = hf_to_meta_rows(w_hf, N_KV_HEADS)
            else:
                w_meta = w_hf
            meta[f"layers.{i}.{name}.weight"] = w_meta.float()
    for key in drop:
        del tensors[key]
    tensors.update(replace or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    if style == "hf":
        (folder / "config.json").write_text(json.dumps(hf_config_dict(QUANT_CONFIG), indent=2))
    else:
        (folder / "config.json").write_text(json.dumps(hf_config_dict(None), indent=2))
        (folder / "quantize_config.json").write_text(json.dumps(QUANT_CONFIG, indent=2))
    return meta, hf


def reference_args() -> ModelArgs:
    return ModelArgs(dim=DIM, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, vocab_size=VOCAB,
                     hidden_dim=HIDDEN, norm_eps=1e-5, rope_theta=10000.0)


def float_reference(meta_state: dict) -> Transformer:
    model = Transformer(reference_args())
    model.load_state_dict(meta_state, strict=True)
    return model.eval()


def tokens(seed: int = 0, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits_of(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).float()


def int4_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}


# --- an independent GPTQ folder, loaded -----------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gptq") / "independent"
    meta, hf = write_gptq_folder(folder, seed=0)
    return folder, meta, hf


@pytest.mark.parametrize("style", ["hf", "autogptq"])
def test_independent_gptq_folder_matches_float_reference(tmp_path, style):
    folder = tmp_path / style
    # GPTQ-for-LLaMa era files also carry each layer's rotary inv_freq buffer: ignored
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM)
             for i in range(N_LAYERS)} if style == "autogptq" else None
    meta, _ = write_gptq_folder(folder, seed=1, style=style, replace=extra)
    args = read_model_args(folder)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim) == (DIM, N_LAYERS, N_HEADS,
                                                                                              N_KV_HEADS, HIDDEN)
    model = load_model(folder, args, quant="int4")
    layers = int4_layers(model)
    assert sorted(layers) == sorted(f"layers.{i}.{n}" for i in range(N_LAYERS) for n in LINEARS)
    # every int4 layer holds exactly the test's weight (q/k rows back in Meta's order)
    for path, layer in layers.items():
        assert torch.equal(dequant64(layer.int4()).float(), meta[f"{path}.weight"]), path
    # act-order survives loading: layer 1's g_idx is not i // group_size
    assert not torch.equal(layers["layers.1.feed_forward.w2"].g_idx.long(), torch.arange(HIDDEN) // GROUP)
    x = tokens(seed=3)
    got, want = logits_of(model, x), logits_of(float_reference(meta), x)
    assert want.abs().max() > 1.0  # not degenerate
    assert (got - want).abs().max() <= 1e-4


def test_independent_gptq_folder_matches_hf_transformers(gptq_folder):
    transformers = pytest.importorskip("transformers")
    folder, _, hf_state = gptq_folder
    config = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(None).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")},
                                      attn_implementation="eager")
    hf_model = transformers.LlamaForCausalLM(config).float()
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    hf_model.eval()
    x = tokens(seed=4)
    with torch.no_grad():
        want = hf_model(input_ids=x).logits.float()
    got = logits_of(load_model(folder, read_model_args(folder), quant="int4"), x)
    assert want.abs().max() > 1.0
    assert (got - want).abs().max() <= 1e-4


def test_load_int4_equals_load_model(gptq_folder):
    folder, _, _ = gptq_folder
    args = read_model_args(folder)
    x = tokens(seed=5)
    assert torch.equal(logits_of(load_int4(folder, args), x), logits_of(load_model(folder, args, quant="int4"), x))


# --- save_int4: round trip and the layout on disk -------------------------------------------------


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tokenizer_path):
    """A tiny float checkpoint, GPTQ-quantized with act-order (group 32), saved with save_int4."""
    base = tmp_path_factory.mktemp("save_int4")
    float_dir = base / "float"
    save_checkpoint(random_model(tiny_args(n_kv_heads=N_KV_HEADS), seed=7), float_dir)
    calib = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    model, _ = quantize_checkpoint(float_dir, "gptq", GROUP, act_order=True, calib=calib, progress=False)
    out = save_int4(model, base / "int4", {"group_size": GROUP, "desc_act": True, "sym": False}, tokenizer_path)
    return model, out, float_dir


def fp16_rounded(model):
    """The model with its float parameters (embeddings, norms, output) rounded to fp16, as GPTQ
    folders store them (config torch_dtype float16); the int4 buffers are untouched."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def test_save_int4_round_trip_identical_logits(quantized):
    model, out, _ = quantized
    args = read_model_args(out)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (64, 2, 4, N_KV_HEADS)
    x = tokens(seed=6)
    want = logits_of(fp16_rounded(model), x)
    in_memory = logits_of(model, x)
    for loaded in (load_int4(out, args), load_model(out, args, quant="int4")):
        assert len(int4_layers(loaded)) == N_LAYERS * len(LINEARS)
        for path, layer in int4_layers(loaded).items():  # the int4 tensors come back bit for bit
            mine = dict(model.named_modules())[path]
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                assert torch.equal(getattr(layer, name), getattr(mine, name)), (path, name)
        got = logits_of(loaded, x)
        assert torch.equal(got, want)
        assert (got - in_memory).abs().max() <= 1e-3 * in_memory.abs().max()
    assert (out / "tokenizer.model").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_save_int4_layout_on_disk(quantized):
    """The file read with the test's own unpacker: GPTQ dtypes/shapes, HF names, q/k output
    features permuted to HF's rotary order, config.json's quantization_config."""
    model, out, _ = quantized
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["bits"], q["group_size"], q["desc_act"], q.get("quant_method", "gptq")) == (4, GROUP, True, "gptq")
    assert config["hidden_size"] == DIM and config["num_key_value_heads"] == N_KV_HEADS
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(saved)
    layers = int4_layers(model)
    saw_act_order = False
    for path, layer in layers.items():
        i, name = path.split(".", 2)[1], path.split(".", 2)[2]
        stem = f"model.layers.{i}.{HF_LAYER_NAMES[name]}"
        t = {p: saved[f"{stem}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}
        out_f, in_f = SHAPES[name]
        groups = in_f // GROUP
        assert (t["qweight"].dtype, tuple(t["qweight"].shape)) == (torch.int32, (in_f // 8, out_f)), stem
        assert (t["qzeros"].dtype, tuple(t["qzeros"].shape)) == (torch.int32, (groups, out_f // 8)), stem
        assert (t["scales"].dtype, tuple(t["scales"].shape)) == (torch.float16, (groups, out_f)), stem
        assert (t["g_idx"].dtype, tuple(t["g_idx"].shape)) == (torch.int32, (in_f,)), stem
        assert f"{stem}.weight" not in saved
        w_file = dequant64(t)
        w_model = dequant64(layer.int4())  # Meta row order
        if name == "attention.wq":
            w_model = meta_to_hf_rows(w_model, N_HEADS)
        elif name == "attention.wk":
            w_model = meta_to_hf_rows(w_model, N_KV_HEADS)
        assert torch.equal(w_file, w_model), stem
        saw_act_order |= not torch.equal(t["g_idx"].long(), torch.arange(in_f) // GROUP)
    assert saw_act_order
    for i in range(N_LAYERS):
        for name in ("attention_norm", "ffn_norm"):
            assert f"model.layers.{i}.{HF_LAYER_NAMES[name]}.weight" in saved


def test_save_int4_matches_hf_transformers_on_its_dequantized_weights(quantized):
    """The folder save_int4 wrote, dequantized by the test and read by transformers as float,
    gives the logits of the in-memory int4 model: names and rotary order are HF's."""
    transformers = pytest.importorskip("transformers")
    model, out, _ = quantized
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    state = {}
    for key, t in saved.items():
        stem, _, part = key.rpartition(".")
        if part == "qweight":
            state[f"{stem}.weight"] = dequant64({p: saved[f"{stem}.{p}"] for p in
                                                 ("qweight", "qzeros", "scales", "g_idx")}).float()
        elif part == "weight":
            state[key] = t.float()
    config = json.loads((out / "config.json").read_text())
    hf_config = transformers.LlamaConfig(
        hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], vocab_size=config["vocab_size"],
        rms_norm_eps=config["rms_norm_eps"], rope_theta=config["rope_theta"], max_position_embeddings=128,
        tie_word_embeddings=False, attn_implementation="eager")
    hf_model = transformers.LlamaForCausalLM(hf_config).float()
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    x = tokens(seed=8)
    with torch.no_grad():
        want = hf_model.eval()(input_ids=x).logits.float()
    got = logits_of(fp16_rounded(model), x)  # the saved embeddings/norms are fp16
    assert want.abs().max() > 0.1
    assert (got - want).abs().max() <= 1e-4


def test_save_int4_refuses_non_empty_out(quantized, tmp_path):
    model, _, _ = quantized
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LlamaInputError, match="not empty"):
        save_int4(model, out, {"group_size": GROUP})
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


# --- tensor-parallel shares -----------------------------------------------------------------------


@pytest.mark.parametrize("group_size,act_order", [(32, False), (32, True), (128, False), (16, True)])
def test_tp_share_concatenates_back_to_the_whole_weight(group_size, act_order):
    gen = torch.Generator().manual_seed(group_size + act_order)
    t = random_int4(64, 128, group_size, act_order, gen)
    w = Int4Weight(**t)
    whole = dequant64(t)
    groups = 128 // group_size
    cols = [tp_share(w, "column", r, 2) for r in range(2)]
    for share in cols:
        assert tuple(share.qweight.shape) == (16, 32) and tuple(share.qzeros.shape) == (groups, 4)
    assert torch.equal(torch.cat([dequant64(s) for s in cols], dim=0), whole)
    rows = [tp_share(w, "row", r, 2) for r in range(2)]
    for share in rows:
        assert tuple(share.qweight.shape) == (8, 64) and tuple(share.g_idx.shape) == (64,)
        # contiguous groups: a rank keeps the groups its features use; act-order: all of them
        expect_groups = groups if act_order else max(1, groups // 2)
        assert share.scales.shape[0] == share.qzeros.shape[0] == expect_groups
    assert torch.equal(torch.cat([dequant64(s) for s in rows], dim=1), whole)
    assert tp_share(w, None, 0, 2) is w


# --- bad input --------------------------------------------------------------------------------------


def set_bits(folder: Path, bits: int) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = bits
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("bits", [3, 8])
def test_unsupported_bits(tmp_path, bits):
    folder = tmp_path / f"bits{bits}"
    write_gptq_folder(folder, seed=2)
    set_bits(folder, bits)
    with pytest.raises(LlamaInputError, match="unsupported bits") as e:
        load_model(folder, read_model_args(folder), quant="int4")
    assert str(bits) in str(e.value)


def named(msg: str, i: int, name: str) -> bool:
    return f"model.layers.{i}.{HF_LAYER_NAMES[name]}" in msg or f"layers.{i}.{name}" in msg


def test_missing_qzeros_names_the_layer(tmp_path):
    folder = tmp_path / "no_qzeros"
    write_gptq_folder(folder, seed=2, drop=("model.layers.1.mlp.down_proj.qzeros",))
    with pytest.raises(LlamaInputError) as e:
        load_model(folder, read_model_args(folder), quant="int4")
    msg = str(e.value)
    assert "qzeros" in msg and named(msg, 1, "feed_forward.w2"), msg


@pytest.mark.parametrize("shape", [(DIM, N_KV_HEADS * HEAD_DIM), (DIM // 8 + 1, N_KV_HEADS * HEAD_DIM),
                                   (DIM // 8, 2 * N_KV_HEADS * HEAD_DIM)],
                         ids=["unpacked", "extra_word", "wide"])
def test_wrong_qweight_shape(tmp_path, shape):
    folder = tmp_path / "bad_qweight"
    bad = torch.randint(-2 ** 31, 2 ** 31 - 1, shape, dtype=torch.int64).to(torch.int32)
    write_gptq_folder(folder, seed=2, replace={"model.layers.0.self_attn.k_proj.qweight": bad})
    with pytest.raises(LlamaInputError) as e:
        load_model(folder, read_model_args(folder), quant="int4")
    msg = str(e.value)
    assert named(msg, 0, "attention.wk") and "shape" in msg and "qweight" in msg, msg


def test_a_gptq_folder_loads_as_int4_without_a_flag(gptq_folder):
    """Its quantization_config says what it holds: quant "none" (no flag) loads it as int4, the
    same model as quant "int4"; asking for another kind (nf4) is refused."""
    folder, _, _ = gptq_folder
    args = read_model_args(folder)
    x = tokens(6)
    plain = load_model(folder, args)
    assert any(isinstance(m, Int4Linear) for m in plain.modules())
    assert torch.equal(logits_of(plain, x), logits_of(load_model(folder, args, quant="int4"), x))
    with pytest.raises(LlamaInputError, match="int4") as e:
        load_model(folder, args, quant="nf4")
    assert str(folder) in str(e.value)


def test_group_size_not_dividing_in_features_on_load(tmp_path):
    float_dir = tmp_path / "float"
    save_checkpoint(random_model(tiny_args(), seed=0), float_dir)
    with pytest.raises(LlamaInputError) as e:
        load_model(float_dir, read_model_args(float_dir), quant="int4", group_size=48)
    msg = str(e.value)
    assert "48" in msg and "64" in msg, msg


def test_quant_int4_on_load_of_a_float_checkpoint(tmp_path):
    """load_model(quant='int4') on float weights: Int4Linear blocks whose weights are the float
    weights rounded to the nearest point of their group's grid (at most half a step away)."""
    float_dir = tmp_path / "float"
    save_checkpoint(random_model(tiny_args(), seed=3), float_dir)
    args = read_model_args(float_dir)
    ref = load_model(float_dir, args)
    model = load_model(float_dir, args, quant="int4", group_size=GROUP)
    layers = int4_layers(model)
    assert len(layers) == N_LAYERS * len(LINEARS)
    ref_modules = dict(ref.named_modules())
    for path, layer in layers.items():
        w = ref_modules[path].weight.detach().double()
        q, zeros, scales, g = unpack_all(layer.int4())
        step = scales[g].t()  # [out, in]
        assert torch.equal(g, torch.arange(w.shape[1]) // GROUP)
        assert ((w - dequant64(layer.int4())).abs() <= step * 0.5005 + 1e-7).float().mean() >= 0.99, path
        assert ((w - dequant64(layer.int4())).abs() <= step * 1.0005).all(), path
    x = tokens(seed=9)
    want = logits_of(ref, x)
    assert (logits_of(model, x) - want).norm() <= 0.2 * want.norm()


def test_folder_without_g_idx_loads_with_implied_groups(tmp_path):
    """Older GPTQ-for-LLaMa files carry no g_idx; without act-order it is i // group_size."""
    folder = tmp_path / "no_g_idx"
    drop = tuple(f"model.layers.{i}.{HF_LAYER_NAMES[name]}.g_idx" for i in range(N_LAYERS) for name in LINEARS)
    write_gptq_folder(folder, seed=3, act_order_layers=(), drop=drop)
    (folder / "config.json").write_text(json.dumps(hf_config_dict({**QUANT_CONFIG, "desc_act": False}), indent=2))
    model = load_model(folder, read_model_args(folder), quant="int4")
    for path, layer in int4_layers(model).items():
        assert torch.equal(layer.g_idx, torch.arange(layer.in_features, dtype=torch.int32) // GROUP), path
    assert torch.isfinite(logits_of(model, tokens())).all()
    (folder / "config.json").write_text(json.dumps(hf_config_dict(QUANT_CONFIG), indent=2))  # desc_act: true
    with pytest.raises(LlamaInputError, match="lacks g_idx"):
        load_model(folder, read_model_args(folder), quant="int4")


def test_a_quantized_lm_head_is_refused(tmp_path):
    """Only the blocks' linears may be int4: a quantized output layer would lose its gather."""
    folder = tmp_path / "q_lm_head"
    gen = torch.Generator().manual_seed(4)
    extra = {f"lm_head.{part}": v for part, v in random_int4(VOCAB, DIM, GROUP, False, gen).items()}
    write_gptq_folder(folder, seed=4, drop=("lm_head.weight",), replace=extra)
    with pytest.raises(LlamaInputError, match="unexpected quantized layer"):
        load_model(folder, read_model_args(folder), quant="int4")
