"""The same weights in every on-disk format load to identical tensors and logits.

One random Meta-layout state dict is written, by the tests' own code (tests/utils.py, from
docs/formats.md), as: Meta single `.pth`, Meta 2-shard `.pth` (fairscale split), our safetensors
(via save_checkpoint), HF single safetensors, HF sharded safetensors with an index, and HF
`pytorch_model.bin`.
"""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llama.formats import detect_format, read_model_args, save_checkpoint  # noqa: E402
from llama.loader import load_model  # noqa: E402
from llama.errors import LlamaInputError  # noqa: E402
from tests.utils import chunk_state, meta_state_to_hf  # noqa: E402

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB = 64, 2, 4, 2, 384
MULTIPLE_OF, HIDDEN = 32, 192  # Meta's rule: int(2 * 4 * 64 / 3) = 170, rounded up to 32 -> 192
HEAD_DIM = DIM // N_HEADS
NORM_EPS, ROPE_THETA = 1e-5, 10000.0

PARAMS = {
    "dim": DIM, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS,
    "vocab_size": VOCAB, "multiple_of": MULTIPLE_OF, "norm_eps": NORM_EPS, "rope_theta": ROPE_THETA,
}


def meta_shapes() -> dict:
    kv = N_KV_HEADS * HEAD_DIM
    shapes = {"tok_embeddings.weight": (VOCAB, DIM), "norm.weight": (DIM,), "output.weight": (VOCAB, DIM)}
    for i in range(N_LAYERS):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (DIM, DIM), p + "attention.wk.weight": (kv, DIM),
            p + "attention.wv.weight": (kv, DIM), p + "attention.wo.weight": (DIM, DIM),
            p + "feed_forward.w1.weight": (HIDDEN, DIM), p + "feed_forward.w2.weight": (DIM, HIDDEN),
            p + "feed_forward.w3.weight": (HIDDEN, DIM),
            p + "attention_norm.weight": (DIM,), p + "ffn_norm.weight": (DIM,),
        })
    return shapes


def random_meta_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in meta_shapes().items():
        if len(shape) == 1:
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key == "tok_embeddings.weight":
            state[key] = torch.randn(shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
    return state


def hf_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS, vocab_size=VOCAB, rms_norm_eps=NORM_EPS, rope_theta=ROPE_THETA,
        max_position_embeddings=128, tie_word_embeddings=False, attn_implementation="eager",
    )


def hf_model_from(state: dict) -> LlamaForCausalLM:
    model = LlamaForCausalLM(hf_config()).float()
    hf_state = meta_state_to_hf(state, N_LAYERS, N_HEADS, N_KV_HEADS)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    return model.eval()


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_state():
    return random_meta_state(seed=0)


@pytest.fixture(scope="module")
def hf_model(meta_state):
    return hf_model_from(meta_state)


@pytest.fixture(scope="module")
def dirs(meta_state, hf_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    out = {name: root / name for name in
           ("meta", "meta_2shard", "ours", "ours_2shard", "hf", "hf_sharded", "hf_bin")}
    for d in out.values():
        d.mkdir()

    # Meta, one file; Meta checkpoints may carry rope.freqs, which a loader must ignore.
    (out["meta"] / "params.json").write_text(json.dumps(PARAMS))
    torch.save({**meta_state, "rope.freqs": torch.randn(HEAD_DIM // 2)}, out["meta"] / "consolidated.00.pth")

    # Meta, two model-parallel shards
    (out["meta_2shard"] / "params.json").write_text(json.dumps(PARAMS))
    for rank, shard in enumerate(chunk_state(meta_state, 2)):
        torch.save(shard, out["meta_2shard"] / f"consolidated.{rank:02d}.pth")

    # ours: save_checkpoint of the model loaded from the Meta file
    save_checkpoint(load_model(out["meta"], read_model_args(out["meta"])), out["ours"])
    # ours, two shards written by hand in the same layout
    from safetensors.torch import save_file

    (out["ours_2shard"] / "params.json").write_text(json.dumps(PARAMS))
    for rank, shard in enumerate(chunk_state(meta_state, 2)):
        save_file(shard, str(out["ours_2shard"] / f"consolidated.{rank:02d}.safetensors"))

    # HF: single safetensors, sharded safetensors with an index, and pytorch_model.bin
    hf_model.save_pretrained(out["hf"])
    hf_model.save_pretrained(out["hf_sharded"], max_shard_size="40KB")
    hf_model.config.save_pretrained(out["hf_bin"])
    hf_state = meta_state_to_hf(meta_state, N_LAYERS, N_HEADS, N_KV_HEADS)
    torch.save(hf_state, out["hf_bin"] / "pytorch_model.bin")
    return out


ALL = ["meta", "meta_2shard", "ours", "ours_2shard", "hf", "hf_sharded", "hf_bin"]
EXPECTED_FORMAT = {"meta": "meta", "meta_2shard": "meta", "ours": "ours", "ours_2shard": "ours",
                   "hf": "hf", "hf_sharded": "hf", "hf_bin": "hf"}


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


# --- tests ---------------------------------------------------------------------------------------


def test_files_on_disk_are_what_each_format_claims(dirs):
    assert sorted(p.name for p in dirs["meta_2shard"].glob("consolidated.*.pth")) == [
        "consolidated.00.pth", "consolidated.01.pth"]
    shard0 = torch.load(dirs["meta_2shard"] / "consolidated.00.pth", weights_only=True)
    assert shard0["layers.0.attention.wk.weight"].shape == (N_KV_HEADS * HEAD_DIM // 2, DIM)
    assert shard0["layers.0.attention.wo.weight"].shape == (DIM, DIM // 2)
    assert shard0["tok_embeddings.weight"].shape == (VOCAB, DIM // 2)
    assert (dirs["ours"] / "consolidated.00.safetensors").is_file()
    assert not list(dirs["ours"].glob("*.pth"))
    assert (dirs["hf"] / "model.safetensors").is_file()
    index = json.loads((dirs["hf_sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert not (dirs["hf_sharded"] / "model.safetensors").exists()
    assert (dirs["hf_bin"] / "pytorch_model.bin").is_file()
    assert not list(dirs["hf_bin"].glob("*.safetensors"))


@pytest.mark.parametrize("name", ALL)
def test_detect_format(dirs, name):
    assert detect_format(dirs[name]).name == EXPECTED_FORMAT[name]


def test_detect_format_rejects_folders_without_a_config(tmp_path):
    with pytest.raises(LlamaInputError):
        detect_format(tmp_path)  # empty folder
    with pytest.raises(LlamaInputError):
        detect_format(tmp_path / "does-not-exist")


@pytest.mark.parametrize("name", ALL)
def test_model_args_agree(dirs, name):
    args = read_model_args(dirs[name])
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == (
        DIM, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB)
    assert args.ffn_hidden_dim == HIDDEN
    assert args.norm_eps == pytest.approx(NORM_EPS)
    assert args.rope_theta == pytest.approx(ROPE_THETA)
    assert args.rope_scaling is None and not args.tie_word_embeddings


@pytest.mark.parametrize("name", ALL)
def test_tensors_identical_to_the_source(dirs, meta_state, name):
    model = load_model(dirs[name], read_model_args(dirs[name]))
    got = model.state_dict()
    assert set(got) == set(meta_state)
    for key, expected in meta_state.items():
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], expected), key


def test_logits_identical_across_formats_and_match_hf(dirs, hf_model):
    x = tokens(seed=1)
    with torch.no_grad():
        logits = {name: load_model(dirs[name], read_model_args(dirs[name]))(x) for name in ALL}
        reference = hf_model(input_ids=x).logits.float()
    for name in ALL:
        assert torch.equal(logits[name], logits["meta"]), name
    assert (logits["meta"] - reference).abs().max() <= 1e-4
    assert reference.abs().max() > 1.0  # not degenerate


def test_hf_reload_of_our_hf_folder_matches(dirs, meta_state):
    """The HF folders written here are genuine: transformers itself reads them back."""
    x = tokens(seed=2)
    with torch.no_grad():
        ours = load_model(dirs["meta"], read_model_args(dirs["meta"]))(x)
        for name in ("hf_sharded", "hf_bin"):
            theirs = LlamaForCausalLM.from_pretrained(dirs[name], attn_implementation="eager").float().eval()
            assert (theirs(input_ids=x).logits.float() - ours).abs().max() <= 1e-4, name


def test_ours_round_trip_twice(dirs, tmp_path):
    """save_checkpoint(load_model(x)) is a fixed point: params.json and tensors survive."""
    first = load_model(dirs["ours"], read_model_args(dirs["ours"]))
    save_checkpoint(first, tmp_path)
    assert detect_format(tmp_path).name == "ours"
    assert read_model_args(tmp_path) == read_model_args(dirs["meta"])
    second = load_model(tmp_path, read_model_args(tmp_path))
    for key, t in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], t), key


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_load(dirs, meta_state, name):
    model = load_model(dirs[name], read_model_args(dirs[name]), dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert params and all(p.dtype == torch.bfloat16 for p in params.values())
    for key, expected in meta_state.items():
        assert torch.equal(model.state_dict()[key], expected.to(torch.bfloat16)), key
    x = tokens(seed=3)
    with torch.no_grad():
        got = model(x)
        full = load_model(dirs["meta"], read_model_args(dirs["meta"]))(x)
    assert got.dtype == torch.float32  # logits come back in float32
    assert torch.isfinite(got).all()
    # bf16 keeps ~3 significant digits: close to float32, but not equal
    assert (got - full).abs().max() <= 0.05 * full.abs().max()
    assert not torch.equal(got, full)
