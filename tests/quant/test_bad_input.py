"""`python -m quant` where a user can go wrong or the machine can: an --out that is a file or
lies below one, a tokenizer of another model, a full disk, a kill or Ctrl-C while the folder is
written. Each exits non-zero with one `error: ...` line (bad input 2, a full disk 1, Ctrl-C
130) and leaves no output folder, nor a temp folder a later run would trip over; the re-run
succeeds."""
import errno
import os
import random
import re
import shutil

import pytest

from llama.formats import save_checkpoint
from llama.tiny import random_model
from quant.__main__ import main
from tests.utils import run_signalled, tiny_args

RTN = ["--method", "rtn", "--group_size", "32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_path):
    """A tiny float checkpoint with its tokenizer."""
    d = tmp_path_factory.mktemp("quant_bad") / "tiny"
    save_checkpoint(random_model(tiny_args()), d)
    shutil.copy(tokenizer_path, d / "tokenizer.model")
    return d


def error_line(stderr: str) -> str:
    """The one `error: ...` line of stderr (beside the progress bar), with no traceback."""
    lines = [ln for ln in re.split(r"[\r\n]+", stderr) if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def refused(capsys, *argv, status=2) -> str:
    """main(argv) exits `status` with one `error: ...` line on stderr; that line."""
    assert main([str(a) for a in argv]) == status
    return error_line(capsys.readouterr().err)


@pytest.mark.parametrize("where", ["out", "parent"])
def test_out_is_a_file(ckpt, tmp_path, capsys, where):
    taken = tmp_path / "taken"
    taken.write_bytes(b"keep me")
    out = taken if where == "out" else taken / "int4"
    err = refused(capsys, "--ckpt_dir", ckpt, *RTN, "--out", out)
    assert (f"{out}: a file of that name exists" if where == "out" else f"{taken} is a file") in err
    assert taken.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_tokenizer_of_another_model(tmp_path, capsys, tokenizer_path):
    """Even round-to-nearest, which needs no tokenizer, checks the one it copies along."""
    d = tmp_path / "big_vocab"
    save_checkpoint(random_model(tiny_args(vocab_size=500)), d)
    shutil.copy(tokenizer_path, d / "tokenizer.model")
    err = refused(capsys, "--ckpt_dir", d, *RTN, "--out", tmp_path / "int4")
    assert f"{d / 'tokenizer.model'}: tokenizer has 384 tokens but the model's vocab_size is 500" in err
    assert not (tmp_path / "int4").exists()


def test_disk_full_while_writing(ckpt, tmp_path, capsys, monkeypatch):
    """ENOSPC at the first fsync (model.safetensors written into the temp folder, the rest not)."""
    real_fsync = os.fsync

    def full(fd):
        monkeypatch.setattr(os, "fsync", real_fsync)  # once
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "int4"
    err = refused(capsys, "--ckpt_dir", ckpt, *RTN, "--out", out, status=1)
    assert err == f"error: no space left on device writing {out}; nothing was written"
    assert list(tmp_path.iterdir()) == []  # no folder, no temp folder
    assert main(["--ckpt_dir", str(ckpt), *RTN, "--out", str(out)]) == 0


@pytest.mark.parametrize("signame,seed", [("SIGKILL", 0), ("SIGINT", 1)])
def test_killed_or_interrupted_while_writing(ckpt, tmp_path, signame, seed):
    """A real signal at a seeded random fsync of the write (each before the folder's rename:
    model.safetensors, config.json, quantize_config.json come first)."""
    out = tmp_path / "int4"
    moment = random.Random(seed).randrange(1, 4)
    result = run_signalled("os:fsync", moment, signame, "quant", "--ckpt_dir", ckpt, *RTN, "--out", out)
    assert not out.exists()
    if signame == "SIGINT":
        assert result.returncode == 130
        assert error_line(result.stderr) == f"error: interrupted; nothing was written to {out}"
        assert list(tmp_path.iterdir()) == []  # the temp folder went on the way out
    else:
        assert result.returncode == -9
    assert main(["--ckpt_dir", str(ckpt), *RTN, "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
