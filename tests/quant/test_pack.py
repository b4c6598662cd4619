"""quant.pack against an independent GPTQ-layout writer/reader written from docs/formats.md
("GPTQ int4 layout"): pure numpy bit operations, low nibble first, qzeros = zero-1 packed along
the output dim, the top nibble wrapping into the int32 sign bit.

    W[k, n] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1))     (W is [in, out])

That writer/reader (np_pack_rows, np_unpack_rows, gptq_layer, gptq_unpack, ref_dequant,
random_layer) is the tests' own, in tests/utils.py; tests/quant/test_kernels.py and its Triton
interpreter subprocess use it too.
"""
import numpy as np
import pytest
import torch

from llama.errors import LlamaInputError
from quant import kernels
from quant.pack import dequantize, group_index, pack, pack_cols, pack_rows, unpack_cols, unpack_rows
from tests.utils import gptq_unpack, np_pack_rows, np_unpack_rows, random_layer, ref_dequant

# --- a second reference straight from the unpacked values -----------------------------------------


def raw_dequant(raw) -> torch.Tensor:
    """The same formula straight from the unpacked values (no packing at all): [out, in] float64."""
    g = raw["g_idx"]
    s = raw["scales"].astype(np.float64)
    return torch.from_numpy(s[g, :].T * (raw["q"] - raw["zeros"][g, :].T))


# layouts: (in, out, group_size, act_order)
LAYOUTS = {
    "g32": (64, 16, 32, False),
    "g64": (128, 24, 64, False),
    "ragged_K200_g64": (200, 16, 64, False),   # last group 8 wide; K not a multiple of the group size
    "act_order_g32": (128, 32, 32, True),
    "act_order_ragged": (200, 16, 64, True),
    "per_channel": (96, 40, -1, False),
}


# --- the test's own layout, checked against hand-worked words ------------------------------------


def test_independent_packer_hand_worked_word():
    """Column [1..8]: nibble j holds j+1 -> 0x87654321, which as int32 is 0x87654321 - 2**32."""
    q = np.arange(1, 9).reshape(8, 1)
    assert int(np_pack_rows(q)[0, 0]) == 0x87654321 - 2 ** 32
    assert int(np_pack_rows(np.full((8, 1), 15))[0, 0]) == -1
    assert int(np_pack_rows(np.array([[0]] * 7 + [[8]]))[0, 0]) == -2 ** 31
    assert (np_unpack_rows(np_pack_rows(q)) == q).all()


# --- pack/unpack round trips ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 1), (16, 3), (64, 24), (200, 40), (1024, 8)])
def test_pack_rows_round_trip_and_layout(shape):
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    q = torch.randint(0, 16, shape, generator=gen)
    packed = pack_rows(q)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0] // 8, shape[1])
    assert torch.equal(unpack_rows(packed).long(), q)
    # the same bits as the independent writer, and the independent reader gets q back
    assert torch.equal(packed, torch.from_numpy(np_pack_rows(q.numpy())))
    assert (np_unpack_rows(packed.numpy()) == q.numpy()).all()


@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (25, 64), (4, 4096)])
def test_pack_cols_round_trip_and_layout(shape):
    gen = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    q = torch.randint(0, 16, shape, generator=gen)
    packed = pack_cols(q)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], shape[1] // 8)
    assert torch.equal(unpack_cols(packed).long(), q)
    assert torch.equal(packed, torch.from_numpy(np.ascontiguousarray(np_pack_rows(q.numpy().T).T)))


def test_pack_extremes_sign_bit():
    """All-15 words are -1; a top nibble >= 8 makes the word negative, as in GPTQ files."""
    q = torch.full((16, 4), 15)
    assert (pack_rows(q) == -1).all()
    q = torch.zeros(8, 2, dtype=torch.long)
    q[7] = torch.tensor([8, 7])
    assert pack_rows(q).tolist() == [[-2 ** 31, 7 << 28]]
    assert torch.equal(unpack_rows(pack_rows(q)).long(), q)


def test_pack_rows_rejects_partial_word():
    with pytest.raises(LlamaInputError):
        pack_rows(torch.zeros(12, 4, dtype=torch.long))


def test_pack_rejects_zero_point_zero():
    raw, *_ = random_layer(64, 16, 32)
    zeros = torch.as_tensor(raw["zeros"]).clone()
    zeros[0, 0] = 0
    with pytest.raises(ValueError, match="1..15"):
        pack(torch.as_tensor(raw["q"]), zeros, torch.as_tensor(raw["scales"].astype(np.float32)),
             torch.as_tensor(raw["g_idx"]))


def test_group_index():
    assert group_index(200, 64).tolist() == [i // 64 for i in range(200)]
    assert group_index(96, -1).tolist() == [0] * 96


# --- our pack vs the independent layout, both directions ----------------------------------------


@pytest.mark.parametrize("name", LAYOUTS)
def test_our_pack_is_the_gptq_layout(name):
    """quant.pack.pack writes the same int32 words as the test's writer, and the test's reader
    recovers q, zero-1, scales and g_idx from it."""
    k, n, gs, act = LAYOUTS[name]
    raw, t, _, _ = random_layer(k, n, gs, act, seed=1)
    ours = pack(torch.as_tensor(raw["q"]), torch.as_tensor(raw["zeros"]),
                torch.as_tensor(raw["scales"].astype(np.float32)), torch.as_tensor(raw["g_idx"]))
    assert ours.qweight.dtype == torch.int32 and ours.qweight.shape == (k // 8, n)
    assert ours.qzeros.dtype == torch.int32 and ours.qzeros.shape == (int(raw["g_idx"].max()) + 1, n // 8)
    assert ours.scales.dtype == torch.float16 and ours.g_idx.dtype == torch.int32
    assert (ours.in_features, ours.out_features) == (k, n)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(ours, key), t[key]), key
    q, z = gptq_unpack(ours.tensors())
    assert (q == raw["q"].T).all() and (z == raw["zeros"] - 1).all()
    # our packing read back by the test's dequant = the formula on the raw values
    assert torch.equal(ref_dequant(ours.tensors()), raw_dequant(raw))


@pytest.mark.parametrize("name", LAYOUTS)
def test_dequantize_reads_the_independent_layout(name):
    """quant.pack.dequantize on tensors written by the test's packer equals the float64 formula
    exactly (in float32 too: |q - z| <= 15 times an fp16 scale is exact in float32)."""
    k, n, gs, act = LAYOUTS[name]
    raw, t, w, ref = random_layer(k, n, gs, act, seed=2)
    assert torch.equal(ref, raw_dequant(raw))
    for dtype in (torch.float64, torch.float32):
        got = dequantize(w, dtype)
        assert got.dtype == dtype and got.shape == (n, k)
        assert torch.equal(got.double(), ref), dtype
    # bf16: (q - z) exact, times the bf16-rounded scale, one rounding
    s16 = torch.as_tensor(raw["scales"]).to(torch.bfloat16).double().numpy()
    g = raw["g_idx"]
    want = torch.from_numpy(s16[g, :].T * (raw["q"] - raw["zeros"][g, :].T)).to(torch.bfloat16)
    assert torch.equal(dequantize(w, torch.bfloat16), want)


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("transposed", [False, True])
def test_kernels_dequantize_into(name, transposed):
    """quant.kernels.dequantize_into (the byte-wise dequant of the dequant path and the backward
    pass) equals the float64 reference exactly, W [out, in] or W.T [in, out], fresh or into a
    reused scratch buffer holding stale values."""
    k, n, gs, act = LAYOUTS[name]
    raw, t, w, ref = random_layer(k, n, gs, act, seed=3)
    want = ref.t() if transposed else ref
    got = kernels.dequantize_into(w, torch.float32, transposed=transposed)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(got.double(), want)
    buf = torch.full((k * n + 37,), float("nan"))[: k * n]
    got = kernels.dequantize_into(w, torch.float32, out=buf, transposed=transposed)
    assert torch.equal(got.double(), want)
    assert got.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("name", ["g64", "act_order_g32", "ragged_K200_g64", "per_channel"])
def test_contiguous_groups_detects_act_order(name):
    """Only plain i // group_size layouts with whole groups count as contiguous (the fast paths)."""
    k, n, gs, act = LAYOUTS[name]
    _, _, w, _ = random_layer(k, n, gs, act, seed=4)
    expected = {"g64": 64, "act_order_g32": None, "ragged_K200_g64": None, "per_channel": k}[name]
    assert kernels.contiguous_groups(w) == expected
