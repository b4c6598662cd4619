"""`python -m quant` end to end on a tiny saved checkpoint: the folder it writes loads with
llama.loader.load_model(quant="int4") and gives logits close to the float model, and its weights, read with the
test's own unpacker (tests/utils.py), are the float weights on the int4 grid.
Bad input exits 2 with one "error: ..." line and leaves no output (nor temp folder) behind.

The success paths, --help and one error run as subprocesses; the other error cases call
quant.__main__.main(argv) in-process (its return value is the exit status: `sys.exit(main())`)
to keep this file's runtime down.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.formats import read_model_args, save_checkpoint
from llama.loader import load_model
from llama.tiny import corpus, random_model
from quant.__main__ import main
from quant.linear import Int4Linear
from tests.utils import HF_LAYER_NAMES, dequant64, hf_to_meta_rows, run, tiny_args, unpack_all

N_HEADS, N_KV_HEADS = 4, 2
FLAGS = ["--ckpt_dir", "--out", "--method", "--group_size", "--act_order", "--sym", "--calib", "--n_samples",
         "--seq_len", "--damp", "--tokenizer_path"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "quant", *args], timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in re.split(r"[\r\n]+", stderr) if "error:" in ln]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_path):
    """A tiny float checkpoint (GQA, dim 64, 2 layers) with its tokenizer, and a calibration file."""
    base = tmp_path_factory.mktemp("cli")
    d = base / "tiny"
    save_checkpoint(random_model(tiny_args(n_kv_heads=N_KV_HEADS), seed=11), d)
    shutil.copy(tokenizer_path, d / "tokenizer.model")
    calib = base / "calib.txt"
    calib.write_text("\n".join(corpus(200, seed=4)))
    return d, calib


def tokens() -> torch.Tensor:
    return torch.randint(3, 384, (2, 20), generator=torch.Generator().manual_seed(0))


def check_output_folder(out: Path, float_dir: Path, group_size: int, act_order: bool, sym: bool, half_step: bool):
    """Loads as int4; logits near the float model's; each weight on its group's grid near the float weight."""
    import json

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "quantize_config.json",
                                                    "tokenizer.model"]
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["bits"], q["group_size"], bool(q["desc_act"]), bool(q["sym"])) == (4, group_size, act_order, sym)
    args = read_model_args(out)
    ref = load_model(float_dir, read_model_args(float_dir))
    model = load_model(out, args, quant="int4")
    x = tokens()
    with torch.no_grad():
        want, got = ref(x), model(x)
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.25, rel  # measured 0.12 (rtn per-channel sym and gptq g32) on this random model

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    ref_modules = dict(ref.named_modules())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 14
    saw_act_order = False
    for path, layer in layers.items():
        i, name = path.split(".", 2)[1], path.split(".", 2)[2]
        stem = f"model.layers.{i}.{HF_LAYER_NAMES[name]}"
        t = {p: saved[f"{stem}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}
        w_file = dequant64(t)  # HF row order for q/k
        if name == "attention.wq":
            w_file = hf_to_meta_rows(w_file, N_HEADS)
        elif name == "attention.wk":
            w_file = hf_to_meta_rows(w_file, N_KV_HEADS)
        w = ref_modules[path].weight.detach().double()
        _, zeros, scales, g = unpack_all(t)
        if sym:
            assert bool((zeros == 8).all())
        else:
            assert int(zeros.min()) >= 1 and int(zeros.max()) <= 15
        in_f = w.shape[1]
        size = in_f if group_size == -1 else group_size
        assert scales.shape[0] == in_f // size
        saw_act_order |= not torch.equal(g, torch.arange(in_f) // size)
        step = (scales[g].t() if name not in ("attention.wq", "attention.wk")
                else hf_to_meta_rows(scales[g].t(), N_HEADS if name == "attention.wq" else N_KV_HEADS))
        err = (w - w_file).abs()
        if half_step:  # round to nearest: half a step, bar clamping at the grid's ends
            assert (err <= step * 0.5005 + 1e-9).double().mean() > 0.99, path
            assert bool((err <= step * 1.0005).all()), path
        else:  # GPTQ moves weights to cut output error, but stays near them
            assert float(err.norm() / w.norm()) < 0.3, path
    assert saw_act_order == act_order
    return rel


def test_help_mentions_every_flag():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for flag in FLAGS:
        assert flag in r.stdout, flag


def test_rtn_end_to_end(ckpt, tmp_path):
    d, _ = ckpt
    out = tmp_path / "tiny_int4"
    r = run_cli("--ckpt_dir", d, "--method", "rtn", "--group_size", "-1", "--sym", "--out", out)
    assert r.returncode == 0, r.stderr
    assert not error_lines(r.stderr)
    rel = check_output_folder(out, d, -1, act_order=False, sym=True, half_step=True)
    print(f"rtn per-channel sym: relative logit error {rel:.3f}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_int4"]  # no temp folder beside it


def test_gptq_end_to_end(ckpt, tmp_path):
    d, calib = ckpt
    out = tmp_path / "tiny_gptq"
    r = run_cli("--ckpt_dir", d, "--method", "gptq", "--group_size", "32", "--act_order", "--calib", calib,
                "--n_samples", "4", "--seq_len", "32", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "relative output error" in r.stdout
    rel = check_output_folder(out, d, 32, act_order=True, sym=False, half_step=False)
    print(f"gptq g32 act-order: relative logit error {rel:.3f}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_gptq"]


def test_error_exit_2_one_line_as_subprocess(ckpt, tmp_path):
    d, _ = ckpt
    out = tmp_path / "out"
    r = run_cli("--ckpt_dir", d, "--method", "gptq", "--out", out)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and "--calib" in lines[0], r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def run_main(capsys, argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return rc, lines[0]


def error_case(ckpt, tmp_path, case):
    d, calib = ckpt
    short = tmp_path / "short.txt"
    short.write_text("The cat sees the dog.")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"The cat \xff\xfe sees the dog. " * 50)
    return {
        "gptq_without_calib": (["--method", "gptq"], ["--calib"]),
        "calib_too_short": (["--method", "gptq", "--calib", short, "--n_samples", 4, "--seq_len", 32],
                            [str(short), "128"]),  # 4 windows of 32 tokens: needs 128
        "calib_missing": (["--method", "gptq", "--calib", tmp_path / "nope.txt", "--n_samples", 4, "--seq_len", 32],
                          ["nope.txt", "not found"]),
        "group_size_not_dividing": (["--method", "rtn", "--group_size", 48], ["48", "64"]),
        "group_size_zero": (["--method", "rtn", "--group_size", 0], ["--group_size"]),
        "n_samples_zero": (["--method", "gptq", "--calib", calib, "--n_samples", 0], ["--n_samples"]),
        "rtn_act_order": (["--method", "rtn", "--act_order"], ["--act_order"]),
        "calib_not_utf8": (["--method", "gptq", "--calib", binary, "--n_samples", 1, "--seq_len", 8], ["UTF-8"]),
    }[case]


@pytest.mark.parametrize("case", ["gptq_without_calib", "calib_too_short", "calib_missing",
                                  "group_size_not_dividing", "group_size_zero", "n_samples_zero",
                                  "rtn_act_order", "calib_not_utf8"])
def test_errors_exit_2_and_leave_nothing(ckpt, tmp_path, capsys, case):
    d, _ = ckpt
    argv, expect = error_case(ckpt, tmp_path, case)
    work = tmp_path / "outputs"
    work.mkdir()
    out = work / "tiny_int4"
    rc, line = run_main(capsys, ["--ckpt_dir", d, "--out", out, *argv])
    assert rc == 2
    for word in expect:
        assert word in line, (word, line)
    assert list(work.iterdir()) == []  # no output, no half-written temp folder


def test_out_existing_non_empty_left_untouched(ckpt, tmp_path, capsys):
    d, _ = ckpt
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "sub").mkdir()
    rc, line = run_main(capsys, ["--ckpt_dir", d, "--method", "rtn", "--group_size", 32, "--out", out])
    assert rc == 2 and str(out) in line and "not empty" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]
    assert (out / "notes.txt").read_text() == "precious" and list((out / "sub").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no temp folder left


def test_out_non_empty_is_refused_before_quantizing(ckpt, tmp_path, capsys):
    d, _ = ckpt
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    rc = main(["--ckpt_dir", str(d), "--method", "rtn", "--group_size", "32", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "quantizing" not in err  # the progress bar of the work thrown away


def test_missing_ckpt_dir(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    out = tmp_path / "out"
    rc, line = run_main(capsys, ["--ckpt_dir", missing, "--method", "rtn", "--out", out])
    assert rc == 2 and str(missing) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_ckpt_dir_with_tokenizer_path(tmp_path, capsys, tokenizer_path):
    missing = tmp_path / "no_such_model"
    rc, line = run_main(capsys, ["--ckpt_dir", missing, "--method", "rtn", "--tokenizer_path", tokenizer_path,
                                 "--out", tmp_path / "out"])
    assert rc == 2 and str(missing) in line and "not found" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_ckpt_dir_says_not_found(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    rc, line = run_main(capsys, ["--ckpt_dir", missing, "--method", "rtn", "--out", tmp_path / "out"])
    assert rc == 2 and "not found" in line and "tokenizer" not in line
