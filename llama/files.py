"""Atomic file writes: a temp file (or folder) beside the target, fsync, then rename, so a kill at
any moment leaves either the old file or the new one under the final name, never a partial one."""
import contextlib
import glob
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

from llama.errors import LlamaInputError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path in the target's folder; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private (and writers may recreate it); these are ordinary files
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(path):
    """Yield a temp folder beside `path` to fill; on success fsync its files and rename it to
    `path` (which must not exist, or be an empty folder); on any failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes folders private; this is an ordinary output folder
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def temp_prefix(path: Path) -> str:
    """The name prefix of this process's temp files for `path`: hidden, with the host and pid of
    the writer. A writer killed outright (SIGKILL, power loss) leaves its temp behind; the next
    write of the same path removes those whose process no longer runs on this host (a shared
    filesystem's other hosts keep theirs: their pids mean nothing here)."""
    host = socket.gethostname().replace(".", "_")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(host)}-*-.*"):
        pid = stale.name[len(path.name) + len(host) + 3:].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
    return f".{path.name}.{host}-{os.getpid()}-."


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def check_parent(path, option: str = "--out") -> None:
    """Refuse, before anything is written, an output path below a file (no folder can be made
    there: the writers would fail only after the work is done). `option` names the setting the
    user gave the path with."""
    for parent in Path(path).parents:  # nearest first
        if parent.exists():
            if not parent.is_dir():
                raise LlamaInputError(f"{path}: {parent} is a file, so nothing can be written below it; "
                                      f"choose another {option}")
            return


def check_new_output(path) -> None:
    """An output that must not exist yet (an empty folder will do), below a folder."""
    path = Path(path)
    check_parent(path)
    if path.is_dir():
        if any(path.iterdir()):
            raise LlamaInputError(f"{path}: a folder that is not empty; choose another --out or remove it")
    elif path.exists():
        raise LlamaInputError(f"{path}: a file of that name exists; choose another --out or remove it")


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def fsync_dir(folder) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_safetensors(tensors: dict, path, metadata: Optional[dict] = None) -> None:
    """Write tensors to a safetensors file atomically; tied tensors (shared storage, which
    safetensors refuses) are written as copies."""
    from safetensors.torch import save_file

    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous()
        if v.data_ptr() in seen:
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=metadata)
