"""llama.files: atomic writes, and the temp files a killed writer leaves behind."""
import signal
import socket
import subprocess
import sys

from llama.files import atomic_folder, atomic_write_bytes

HOST = socket.gethostname().replace(".", "_")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writers_temp_is_removed_by_the_next_write(tmp_path):
    """A real writer SIGKILLed inside atomic_folder leaves its hidden temp; the next write of the
    same path removes it and leaves exactly the output."""
    out = tmp_path / "out"
    script = ("import os, signal, sys; from llama.files import atomic_folder\n"
              "with atomic_folder(sys.argv[1]) as tmp:\n"
              "    (tmp / 'half').write_bytes(b'x' * 1000)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".out.") and (left[0] / "half").exists()
    with atomic_folder(out) as tmp:
        (tmp / "whole").write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["whole"]


def test_only_dead_writers_of_this_host_and_path_are_swept(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [tmp_path / f".model.bin.{HOST}-{live.pid}-.abc.tmp",  # a writer still at work
                tmp_path / f".model.bin.otherhost-{dead_pid()}-.abc.tmp",  # another host's (shared filesystem)
                tmp_path / f".model.bin.bak.{HOST}-{dead_pid()}-.abc.tmp",  # another path's
                tmp_path / ".model.bin.keep"]  # not ours at all
        swept = [tmp_path / f".model.bin.{HOST}-{dead_pid()}-.abc.tmp", tmp_path / f".model.bin.{HOST}-{dead_pid()}-.xyz"]
        for p in kept + swept[:1]:
            p.write_bytes(b"old")
        swept[1].mkdir()
        (swept[1] / "part").write_bytes(b"old")
        atomic_write_bytes(tmp_path / "model.bin", b"new")
        assert sorted(tmp_path.iterdir()) == sorted(kept + [tmp_path / "model.bin"])
        assert (tmp_path / "model.bin").read_bytes() == b"new"
    finally:
        live.kill()
        live.wait()

