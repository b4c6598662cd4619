"""Bad input stops with one `error: ...` line BEFORE anything is written; a disk that fills up
mid-write, a kill or Ctrl-C leaves no file under a final name and an older split as it was; the
output folder is never silently clobbered."""
import errno
import json
import os
import random
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest

import split.output as split_output
from llama.tiny import random_model
from tests.utils import BROKEN_META, ROOT, broken_meta, random_ours, run_signalled, run_split, tiny_args, write_meta


shutil_usage = namedtuple("usage", "total used free")


def refused(capsys, *argv) -> str:
    assert run_split(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


@pytest.mark.parametrize("overrides,n,says", [
    ({}, 3, "n_heads 4 does not divide by 3"),
    ({"n_kv_heads": 2}, 4, "n_kv_heads 2 does not divide by 4"),
    ({"vocab_size": 387}, 2, "vocab size (output.weight rows) 387 does not divide by 2"),
    ({"hidden_dim": 198}, 4, "hidden dim 198 does not divide by 4"),
    ({"dim": 72, "n_heads": 6, "n_kv_heads": 6}, 4, "n_heads 6 does not divide by 4"),
    ({}, 0, "--n must be a positive integer"),
])
def test_n_that_does_not_divide(tmp_path, capsys, overrides, n, says):
    src = random_ours(tmp_path, **overrides)
    assert says in refused(capsys, "--n", n, "--ckpt_dir", src)
    assert not (tmp_path / f"src_fs{n}").exists()


def test_output_folder_with_another_checkpoint(tmp_path, capsys):
    src, other = random_ours(tmp_path), random_ours(tmp_path, "other", seed=1)
    out = tmp_path / "out"
    assert run_split("--n", 4, "--ckpt_dir", other, "--out", out) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert "--overwrite" in refused(capsys, "--n", 2, "--ckpt_dir", src, "--out", out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched

    assert run_split("--n", 2, "--ckpt_dir", src, "--out", out, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("consolidated.*")) == ["consolidated.00.safetensors", "consolidated.01.safetensors"]
    assert json.loads((out / "split.json").read_text())["source"] == str(src.resolve())

    # the very same split again: a no-op
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run_split("--n", 2, "--ckpt_dir", src, "--out", out) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # ...but not once the source has changed
    random_ours(tmp_path, "src2", seed=3)
    os.replace(tmp_path / "src2" / "consolidated.00.safetensors", src / "consolidated.00.safetensors")
    assert "--overwrite" in refused(capsys, "--n", 2, "--ckpt_dir", src, "--out", out)
    # an HF folder counts as a checkpoint too; the source folder itself is never an output
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert "--overwrite" in refused(capsys, "--n", 2, "--ckpt_dir", src, "--out", tmp_path / "hf")
    assert "is the checkpoint being split" in refused(capsys, "--n", 2, "--ckpt_dir", src, "--out", src, "--overwrite")


def test_missing_middle_shard(tmp_path, capsys):
    args = tiny_args()
    meta = write_meta(random_model(args).state_dict(), args, tmp_path / "meta", 4)
    (meta / "consolidated.01.pth").unlink()
    assert "consolidated.01.pth is missing" in refused(capsys, "--n", 2, "--ckpt_dir", meta)
    assert not (tmp_path / "meta_fs2").exists()


def test_missing_last_of_four_shards_without_manifest(tmp_path, capsys):
    """No gap in the names: the first shard's embedding share says how many there should be."""
    args = tiny_args()
    meta = write_meta(random_model(args).state_dict(), args, tmp_path / "meta", 4)
    (meta / "consolidated.03.pth").unlink()
    err = refused(capsys, "--n", 1, "--ckpt_dir", meta)
    assert "consolidated.03.pth is missing" in err and "looks like a 4-shard checkpoint" in err
    assert not (tmp_path / "meta_fs1").exists()


@pytest.mark.parametrize("case", BROKEN_META)
def test_shards_missing_extra_or_of_two_checkpoints(tmp_path, capsys, case):
    meta = broken_meta(tmp_path, case)
    assert BROKEN_META[case] in refused(capsys, "--n", 1, "--ckpt_dir", meta)
    assert not (tmp_path / f"{case}_fs1").exists()


def test_tokenizer_of_another_model(tmp_path, capsys, tokenizer_path):
    """The split copies the source's tokenizer: one of another vocabulary is refused, not copied."""
    src = random_ours(tmp_path, vocab_size=500)  # the tokenizer has 384 pieces
    shutil.copy(tokenizer_path, src / "tokenizer.model")
    err = refused(capsys, "--n", 2, "--ckpt_dir", src)
    assert f"{src / 'tokenizer.model'}: tokenizer has 384 tokens but the model's vocab_size is 500" in err
    assert not (tmp_path / "src_fs2").exists()


@pytest.mark.parametrize("where", ["out", "parent"])
def test_output_path_is_a_file(tmp_path, capsys, where):
    src = random_ours(tmp_path)
    (tmp_path / "taken").write_bytes(b"keep me")
    out = tmp_path / "taken" if where == "out" else tmp_path / "taken" / "out"
    err = refused(capsys, "--n", 2, "--ckpt_dir", src, "--out", out)
    assert ("a file, not a folder" if where == "out" else f"{tmp_path / 'taken'} is a file") in err
    assert (tmp_path / "taken").read_bytes() == b"keep me"


def test_missing_or_truncated_last_shard_with_manifest(tmp_path, capsys):
    src = random_ours(tmp_path)
    assert run_split("--n", 4, "--ckpt_dir", src) == 0
    fs4 = tmp_path / "src_fs4"
    last = fs4 / "consolidated.03.safetensors"
    data = last.read_bytes()
    last.unlink()
    err = refused(capsys, "--n", 2, "--ckpt_dir", fs4)
    assert "consolidated.03.safetensors: missing" in err and "split.json" in err
    last.write_bytes(data[:-8])
    assert "split.json records" in refused(capsys, "--n", 2, "--ckpt_dir", fs4)
    assert not (tmp_path / "src_fs4_fs2").exists()


def no_files_left(out) -> None:
    """Nothing under a final name, and no temp files either."""
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def contents(folder) -> dict:
    """Every file of a folder (temp files left by a kill aside): name -> bytes."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.endswith(".tmp")}


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_disk_full_mid_write_leaves_no_file(tmp_path, capsys, monkeypatch, fmt):
    src = random_ours(tmp_path)
    calls = {"n": 0}
    real_write, real_save = split_output._write, split_output._save_pth

    def full_write(f, data):
        calls["n"] += 1
        if calls["n"] == 30:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(f, data)

    def full_save(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second file: half written, then the disk is full
            path.write_bytes(b"PK" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, path)

    monkeypatch.setattr(split_output, "_write", full_write)
    monkeypatch.setattr(split_output, "_save_pth", full_save)
    out = tmp_path / "out"
    assert run_split("--n", 2, "--ckpt_dir", src, "--out", out, "--format", fmt) == 1
    assert capsys.readouterr().err == f"error: no space left on device writing {out}; nothing was written\n"
    no_files_left(out)
    # over an existing split (--overwrite): the old one stays as it was, nothing half-new is there
    monkeypatch.setattr(split_output, "_write", real_write)
    monkeypatch.setattr(split_output, "_save_pth", real_save)
    assert run_split("--n", 4, "--ckpt_dir", src, "--out", out) == 0
    before = contents(out)
    monkeypatch.setattr(split_output, "_write", full_write)
    monkeypatch.setattr(split_output, "_save_pth", full_save)
    calls["n"] = 0
    assert run_split("--n", 2, "--ckpt_dir", src, "--out", out, "--format", fmt, "--overwrite") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(before) and contents(out) == before


def test_command_line_error_is_one_line(tmp_path):
    src = random_ours(tmp_path)
    result = subprocess.run([sys.executable, "split_model.py", "--n", "3", "--ckpt_dir", str(src)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --n 3: n_heads 4 does not divide by 3 (each rank needs whole heads)"
    assert not (tmp_path / "src_fs3").exists()
    help_text = subprocess.run([sys.executable, "split_model.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    for flag in ("--n", "--ckpt_dir", "--out", "--mode", "--format", "--overwrite", "--quiet"):
        assert flag in help_text


def test_not_enough_free_space_is_refused_up_front(tmp_path, capsys, monkeypatch):
    src = random_ours(tmp_path)
    monkeypatch.setattr(split_output.shutil, "disk_usage", lambda p: shutil_usage(total=10**9, used=10**9 - 1000, free=1000))
    assert "only 0.00 GB is free" in refused(capsys, "--n", 2, "--ckpt_dir", src, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


WRITES = 44  # split.output._write calls of the 2-way split below (a header and the blocks of each file)


def test_killed_split_leaves_no_file_that_looks_complete(tmp_path):
    src = random_ours(tmp_path)
    out = tmp_path / "out"
    argv = ["--n", "2", "--ckpt_dir", str(src), "--out", str(out), "--quiet"]
    result = run_signalled("split.output:_write", 20, "SIGKILL", "split_model", *argv)
    assert result.returncode == -9
    left = sorted(p.name for p in out.iterdir())
    assert left and all(name.startswith(".") and name.endswith(".tmp") for name in left)  # only temp files
    # the next run is not blocked by them, and clears them away
    assert run_split(*argv) == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert (out / "split.json").is_file()


@pytest.mark.parametrize("signame,seed", [("SIGKILL", 0), ("SIGKILL", 1), ("SIGINT", 2)])
def test_interrupted_overwrite_keeps_the_older_split(tmp_path, signame, seed):
    """A split replacing another (--overwrite), killed or Ctrl-C'd at a seeded random moment of
    its writing: the older split is still there byte for byte; Ctrl-C says so in one line."""
    src = random_ours(tmp_path)
    out = tmp_path / "out"
    assert run_split("--n", 4, "--ckpt_dir", src, "--out", out) == 0
    before = contents(out)
    argv = ["--n", "2", "--ckpt_dir", str(src), "--out", str(out), "--overwrite", "--quiet"]
    moment = random.Random(seed).randrange(1, WRITES + 1)
    result = run_signalled("split.output:_write", moment, signame, "split_model", *argv)
    if signame == "SIGINT":
        assert result.returncode == 130
        assert result.stderr == f"error: interrupted; nothing was written to {out}\n"
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # cleaned up on the way out
    else:
        assert result.returncode == -9
    assert contents(out) == before
    assert run_split(*argv) == 0
    assert json.loads((out / "split.json").read_text())["n"] == 2
    assert sorted(p.name for p in out.glob("consolidated.*")) == ["consolidated.00.safetensors",
                                                                  "consolidated.01.safetensors"]
