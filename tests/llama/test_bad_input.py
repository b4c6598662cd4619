"""Bad checkpoints, configs and tokenizers give one clear LlamaInputError naming the file.

Every case goes through both entry points, `Llama.build(ckpt_dir, ...)` and
`load_model(ckpt_dir, read_model_args(ckpt_dir))` (tokenizer cases through `Llama.build` and
`Tokenizer` only), and a few through the `example.py` command line, which must print a one-line
`error: ...` and no traceback. The exporters (`python -m llama.export`, `python -m
llama.export.delta`) answer bad output paths, a full disk, a kill and Ctrl-C the same way,
leaving nothing behind.
"""
import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama.formats import read_model_args, save_checkpoint
from llama.loader import load_model
from llama.errors import LlamaInputError
from llama.generation import Llama
from llama.tiny import random_model
from llama.tokenizers import Tokenizer
from llama.export.__main__ import main as export_main
from llama.export.delta import main as delta_main
from tests.utils import BROKEN_META, ROOT, broken_meta, meta_state_to_hf, run_signalled, tiny_args

ST = "consolidated.00.safetensors"
PTH = "consolidated.00.pth"


# --- building good checkpoints to break -------------------------------------------------------


@pytest.fixture(scope="module")
def good_ours(tmp_path_factory, tokenizer_path) -> Path:
    """params.json + consolidated.00.safetensors + tokenizer.model (GQA, 2 layers)."""
    d = tmp_path_factory.mktemp("good") / "ours"
    save_checkpoint(random_model(tiny_args(n_kv_heads=2)), d)
    shutil.copy(tokenizer_path, d / "tokenizer.model")
    return d


def copy_ours(good_ours, tmp_path, name="ckpt") -> Path:
    d = tmp_path / name
    shutil.copytree(good_ours, d)
    return d


def to_meta(d: Path) -> Path:
    """Turn our format into Meta's: the same tensors torch.save'd as consolidated.00.pth."""
    torch.save(load_file(str(d / ST)), d / PTH)
    (d / ST).unlink()
    return d


def to_hf(d: Path) -> Path:
    """Turn our format into HF's: config.json + model.safetensors, HF names, q/k rows permuted
    (the tests' own converter, tests/utils.py)."""
    args = read_model_args(d)
    out = meta_state_to_hf(load_file(str(d / ST)), args.n_layers, args.n_heads, args.n_kv_heads)
    save_file(out, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_position_embeddings": 512,
    }))
    (d / ST).unlink()
    (d / "params.json").unlink()
    return d


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            data.pop(k)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


_DELETE = object()


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def write_st_raw(path: Path, header, data: bytes = b"\0" * 64) -> None:
    """A safetensors file with a hand-written header (which may be wrong)."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


# --- the two entry points, and the check every error must pass -------------------------------


def via_build(d: Path, **kw):
    return Llama.build(str(d), max_seq_len=32, max_batch_size=1, device="cpu", **kw)


def via_load_model(d: Path):
    return load_model(str(d), read_model_args(str(d)))


ENTRIES = {"build": via_build, "load_model": via_load_model}


def assert_clean_error(fn, *must_contain) -> str:
    """fn() raises exactly one LlamaInputError, one line long, naming every `must_contain`."""
    with pytest.raises(LlamaInputError) as info:
        fn()
    msg = str(info.value)
    for part in must_contain:
        assert str(part) in msg, f"{part!r} not named in error: {msg}"
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    assert len(msg) < 500, msg
    # raised by our checks (`from None`): no torch/json exception chained underneath it
    err = info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), repr(err.__context__)
    return msg


# --- sanity: the good checkpoints load, so the bad cases fail for the reason they say ---------


@pytest.mark.parametrize("fmt", ["ours", "meta", "hf"])
def test_good_checkpoints_load(good_ours, tmp_path, fmt):
    d = copy_ours(good_ours, tmp_path)
    reference = load_file(str(d / ST))
    d = {"ours": lambda x: x, "meta": to_meta, "hf": to_hf}[fmt](d)
    model = via_build(d).model
    state = model.state_dict()
    for key, t in reference.items():
        torch.testing.assert_close(state[key], t, rtol=0, atol=0, msg=key)


# --- folders and configs ---------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_missing_folder(tmp_path, entry):
    d = tmp_path / "no_such_ckpt"
    assert_clean_error(lambda: ENTRIES[entry](d), d)


@pytest.mark.parametrize("entry", ENTRIES)
def test_folder_without_params_or_config(good_ours, tmp_path, entry):
    d = copy_ours(good_ours, tmp_path)
    (d / "params.json").unlink()
    msg = assert_clean_error(lambda: ENTRIES[entry](d), d)
    assert "params.json" in msg and "config.json" in msg


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("content", ['{"dim": 64,', "", "\xff\xfe garbage", "[1, 2]"], ids=["cut", "empty", "binary", "list"])
def test_params_json_not_valid(good_ours, tmp_path, entry, content):
    d = copy_ours(good_ours, tmp_path)
    (d / "params.json").write_bytes(content.encode("latin-1"))
    assert_clean_error(lambda: ENTRIES[entry](d), d / "params.json")


@pytest.mark.parametrize("entry", ENTRIES)
def test_params_json_without_dim(good_ours, tmp_path, entry):
    d = copy_ours(good_ours, tmp_path)
    edit_json(d / "params.json", dim=_DELETE)
    assert_clean_error(lambda: ENTRIES[entry](d), d / "params.json", "dim")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(
    "key,value", [("dim", "64"), ("dim", None), ("n_heads", 0), ("n_layers", -1), ("dim", 64.5), ("n_kv_heads", 3)]
)
def test_params_json_bad_values(good_ours, tmp_path, entry, key, value):
    d = copy_ours(good_ours, tmp_path)
    edit_json(d / "params.json", **{key: value})
    assert_clean_error(lambda: ENTRIES[entry](d), d / "params.json", key)


@pytest.mark.parametrize("entry", ENTRIES)
def test_config_json_without_hidden_size(good_ours, tmp_path, entry):
    d = to_hf(copy_ours(good_ours, tmp_path))
    edit_json(d / "config.json", hidden_size=_DELETE)
    assert_clean_error(lambda: ENTRIES[entry](d), d / "config.json", "hidden_size")


@pytest.mark.parametrize("entry", ENTRIES)
def test_config_json_not_valid(good_ours, tmp_path, entry):
    d = to_hf(copy_ours(good_ours, tmp_path))
    (d / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers"')
    assert_clean_error(lambda: ENTRIES[entry](d), d / "config.json")


# --- weight files ----------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("fmt", ["ours", "hf"])
def test_truncated_safetensors(good_ours, tmp_path, entry, fmt):
    d = copy_ours(good_ours, tmp_path)
    if fmt == "hf":
        d = to_hf(d)
    path = d / (ST if fmt == "ours" else "model.safetensors")
    truncate(path)
    assert_clean_error(lambda: ENTRIES[entry](d), path)


CORRUPT_HEADERS = {
    "garbage": lambda raw: raw[:8] + os.urandom(40) + raw[48:],
    "huge_length": lambda raw: (10**15).to_bytes(8, "little") + raw[8:],
    "empty_file": lambda raw: b"",
    "not_object": lambda raw: b"\x08" + b"\0" * 7 + b"[1, 2]  ",
    "entry_without_offsets": None,
    "shape_vs_bytes": None,
    "unknown_dtype": None,
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind", CORRUPT_HEADERS)
def test_corrupt_safetensors_header(good_ours, tmp_path, entry, kind):
    d = copy_ours(good_ours, tmp_path)
    path = d / ST
    if kind == "entry_without_offsets":
        write_st_raw(path, {"norm.weight": {"dtype": "F32", "shape": [64]}})
    elif kind == "shape_vs_bytes":
        write_st_raw(path, {"norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 8]}})
    elif kind == "unknown_dtype":
        write_st_raw(path, {"norm.weight": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}})
    else:
        path.write_bytes(CORRUPT_HEADERS[kind](path.read_bytes()))
    assert_clean_error(lambda: ENTRIES[entry](d), path)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "truncated_legacy", "empty", "not_a_dict", "not_tensors"])
def test_corrupt_meta_pth(good_ours, tmp_path, entry, damage):
    d = to_meta(copy_ours(good_ours, tmp_path))
    path = d / PTH
    if damage == "truncated":
        truncate(path)
    elif damage == "random_bytes":
        path.write_bytes(os.urandom(path.stat().st_size))
    elif damage == "truncated_legacy":  # pre-zip torch.save format (can't be mmapped)
        torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
        truncate(path)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not_a_dict":
        torch.save([torch.zeros(2)], path)
    elif damage == "not_tensors":
        torch.save({**torch.load(path, weights_only=True), "norm.weight": 1.0}, path)
    assert_clean_error(lambda: ENTRIES[entry](d), path)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("fmt", ["ours", "meta", "hf"])
def test_shapes_disagree_with_config(good_ours, tmp_path, entry, fmt):
    """The config says dim 128; the weights are dim 64."""
    d = copy_ours(good_ours, tmp_path)
    if fmt == "hf":
        to_hf(d)
        edit_json(d / "config.json", hidden_size=128)
    else:
        if fmt == "meta":
            to_meta(d)
        edit_json(d / "params.json", dim=128)
    weights = {"ours": ST, "meta": PTH, "hf": "model.safetensors"}[fmt]
    msg = assert_clean_error(lambda: ENTRIES[entry](d), d / weights)
    assert "shape" in msg


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("fmt", ["ours", "meta"])
def test_missing_tensor(good_ours, tmp_path, entry, fmt):
    d = copy_ours(good_ours, tmp_path)
    sd = load_file(str(d / ST))
    del sd["layers.1.feed_forward.w2.weight"]
    save_file(sd, str(d / ST))
    if fmt == "meta":
        to_meta(d)
    assert_clean_error(lambda: ENTRIES[entry](d), d, "layers.1.feed_forward.w2.weight")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("fmt", ["meta", "ours"])
def test_missing_shard(good_ours, tmp_path, entry, fmt):
    """consolidated.00 and .02 present, .01 absent: say which shard is missing."""
    d = copy_ours(good_ours, tmp_path)
    if fmt == "meta":
        to_meta(d)
    ext = ".pth" if fmt == "meta" else ".safetensors"
    shutil.copy(d / f"consolidated.00{ext}", d / f"consolidated.02{ext}")
    assert_clean_error(lambda: ENTRIES[entry](d), d, f"consolidated.01{ext}")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", BROKEN_META)
def test_shards_missing_extra_or_of_two_checkpoints(tmp_path, tokenizer_path, entry, case):
    """The last shard gone (no gap in the names), one too many, or shard 1 of another model."""
    d = broken_meta(tmp_path, case, tokenizer_path)
    assert_clean_error(lambda: ENTRIES[entry](d), BROKEN_META[case])


# --- tokenizers ------------------------------------------------------------------------------


def test_tokenizer_vocab_disagrees_with_model(tmp_path, tokenizer_path):
    d = tmp_path / "ckpt"
    save_checkpoint(random_model(tiny_args(vocab_size=500)), d)  # the tokenizer has 384 pieces
    shutil.copy(tokenizer_path, d / "tokenizer.model")
    msg = assert_clean_error(lambda: via_build(d), d / "tokenizer.model")
    assert "500" in msg and "384" in msg


@pytest.mark.parametrize("content", [b"hello world\n", b"", b"random"], ids=["text", "empty", "random"])
def test_tokenizer_not_sentencepiece(good_ours, tmp_path, content):
    d = copy_ours(good_ours, tmp_path)
    tok = d / "tokenizer.model"
    tok.write_bytes(os.urandom(4096) if content == b"random" else content)
    assert_clean_error(lambda: via_build(d), tok)
    assert_clean_error(lambda: Tokenizer(tok), tok)
    # also when passed explicitly, from elsewhere
    other = tmp_path / "elsewhere.model"
    shutil.copy(tok, other)
    assert_clean_error(lambda: via_build(d, tokenizer_path=str(other)), other)


def test_tokenizer_missing(good_ours, tmp_path):
    d = copy_ours(good_ours, tmp_path)
    (d / "tokenizer.model").unlink()
    assert_clean_error(lambda: via_build(d), d, "tokenizer")
    assert_clean_error(lambda: via_build(d, tokenizer_path=str(tmp_path / "nope.model")), tmp_path / "nope.model")


# --- the command line: one `error:` line, no traceback ---------------------------------------


# the in-process tests above cover every case; these check the CLI's handling, ~3 s of torch import each
CLI_CASES = ["truncated_safetensors", "corrupt_pth", "bad_tokenizer"]


def _break_for_cli(good_ours, root: Path, case: str) -> tuple[Path, Path]:
    """(ckpt_dir to pass, path the error must name)."""
    d = copy_ours(good_ours, root, case)
    if case == "missing_folder":
        shutil.rmtree(d)
        return d, d
    if case == "truncated_safetensors":
        truncate(d / ST)
        return d, d / ST
    if case == "corrupt_pth":
        to_meta(d)
        (d / PTH).write_bytes(os.urandom(2048))
        return d, d / PTH
    if case == "bad_tokenizer":
        (d / "tokenizer.model").write_text("not a tokenizer")
        return d, d / "tokenizer.model"
    if case == "params_without_dim":
        edit_json(d / "params.json", dim=_DELETE)
        return d, d / "params.json"
    raise AssertionError(case)


@pytest.fixture(scope="module")
def cli_runs(good_ours, tmp_path_factory):
    """Start `python example.py --ckpt_dir <bad>` for every case at once (each one spends most of
    its time importing torch), then hand each test its finished process."""
    root = tmp_path_factory.mktemp("cli")
    started = {}
    for case in CLI_CASES:
        d, named = _break_for_cli(good_ours, root, case)
        proc = subprocess.Popen(
            [sys.executable, "example.py", "--ckpt_dir", str(d), "--max_gen_len", "2", "--device", "cpu"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        started[case] = (proc, named)
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("case", CLI_CASES)
def test_example_cli_reports_one_line(cli_runs, case):
    proc, named = cli_runs[case]
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0, stdout + stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert str(named) in errors[0], errors[0]


# --- the exporters: output paths, a full disk, a kill, Ctrl-C ----------------------------------


def export_error(capsys, run, argv, status=2) -> str:
    """run(argv) (an exporter's main) exits `status` with one `error: ...` line; that line."""
    assert run([str(a) for a in argv]) == status
    err = capsys.readouterr().err
    lines = [ln for ln in re.split(r"[\r\n]+", err) if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("fmt", ["hf", "pth", "gguf"])
@pytest.mark.parametrize("where", ["out", "parent"])
def test_export_out_is_a_file(good_ours, tmp_path, capsys, fmt, where):
    taken = tmp_path / "taken"
    taken.write_bytes(b"keep me")
    out = taken if where == "out" else taken / "export"
    line = export_error(capsys, export_main, ["--ckpt_dir", good_ours, "--format", fmt, "--out", out, "--quiet"])
    assert (f"{out}: a file of that name exists" if where == "out" else f"{taken} is a file") in line
    assert taken.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_export_tokenizer_of_another_model(tmp_path, capsys, tokenizer_path):
    d = tmp_path / "big_vocab"
    save_checkpoint(random_model(tiny_args(vocab_size=500)), d)
    line = export_error(capsys, export_main, ["--ckpt_dir", d, "--format", "hf", "--out", tmp_path / "hf",
                                              "--tokenizer_path", tokenizer_path, "--quiet"])
    assert f"{tokenizer_path}: tokenizer has 384 tokens but the model's vocab_size is 500" in line
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("tool", ["hf", "pth", "gguf", "delta"])
def test_export_disk_full_while_writing(good_ours, tmp_path, capsys, monkeypatch, tool):
    """ENOSPC at the first fsync: a folder's first files are in its temp folder, a GGUF file is
    complete under its temp name; neither may appear under the final name."""
    real_fsync = os.fsync

    def full(fd):
        monkeypatch.setattr(os, "fsync", real_fsync)  # once
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "work" / "export"
    out.parent.mkdir()
    if tool == "delta":  # base + base: the delta tool writes through the same exporters
        run, argv = delta_main, ["apply", "--base", good_ours, "--delta", good_ours, "--out", out, "--quiet"]
    else:
        run, argv = export_main, ["--ckpt_dir", good_ours, "--format", tool, "--out", out, "--quiet"]
    monkeypatch.setattr(os, "fsync", full)
    line = export_error(capsys, run, argv, status=1)
    assert line == f"error: no space left on device writing {out}; nothing was written"
    assert list(out.parent.iterdir()) == []  # no output, no temp file or folder
    assert run([str(a) for a in argv]) == 0 and out.exists()


@pytest.mark.parametrize("fmt,hook,calls,signame,seed", [
    ("hf", "os:fsync", 3, "SIGKILL", 0),  # config.json, generation_config.json, tokenizer files: before the rename
    ("gguf", "gguf:GGUFWriter.write_tensor_data", 19, "SIGINT", 1),  # 2 layers x 9 tensors + embedding + norm + output
])
def test_export_killed_or_interrupted_while_writing(good_ours, tmp_path, fmt, hook, calls, signame, seed):
    """A real signal at a seeded random moment of the write: no output; Ctrl-C says so in one
    line and takes its temp file away; the re-run succeeds."""
    out = tmp_path / ("model.gguf" if fmt == "gguf" else "hf")
    argv = ["--ckpt_dir", good_ours, "--format", fmt, "--out", out, "--quiet"]
    result = run_signalled(hook, random.Random(seed).randrange(1, calls + 1), signame, "llama.export", *argv)
    assert not out.exists()
    if signame == "SIGINT":
        assert result.returncode == 130
        assert result.stderr.strip() == f"error: interrupted; nothing was written to {out}"
        assert list(tmp_path.iterdir()) == []
    else:
        assert result.returncode == -9
    assert export_main([str(a) for a in argv]) == 0 and out.exists()
    assert list(tmp_path.iterdir()) == [out]  # the killed writer's temp is gone with the re-run
