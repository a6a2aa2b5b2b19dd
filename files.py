"""Atomic writes: a file or a folder appears complete or not at all.

Everything a run writes (JSON, JSONL, checkpoints, model and adapter folders, the converted
default model) goes through these, so an interrupted process never leaves a half-written
output where the next run would read it.

    with atomic_file(path) as tmp:      # write tmp; it replaces path when the block succeeds
        torch.save(state, tmp)
    with atomic_dir(folder) as tmp:     # fill the folder tmp; it replaces folder at the end
        save_file(tensors, tmp / "model.safetensors")
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path):
    """A temporary file beside `path`, renamed over it when the block ends without an error
    (removed when it raises); readable like any file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private to us
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)


def finite(obj):
    """The object with every non-finite float as None: JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(obj, path) -> None:
    write_text_atomic(json.dumps(finite(obj), indent=2, default=str) + "\n", path)


def make_readable(folder: Path) -> None:
    """Ordinary permissions for a finished folder: mkdtemp and safetensors make things private to us."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def remove_orphans(out: Path) -> None:
    """Temporary siblings of `out` left by a process that was killed (SIGKILL, power loss): their
    name holds the writer's pid, and a pid no longer running means nobody will finish them."""
    for tmp in out.parent.glob(f".{out.name}.*"):
        pid = tmp.name[len(out.name) + 2:].split(".")[0]
        if tmp.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextmanager
def atomic_dir(out):
    """A temporary sibling folder to fill; it takes the place of `out` (replacing an older one)
    when the block ends without an error, and is removed when it raises."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}."))
    try:
        yield tmp
        make_readable(tmp)
        if out.exists():  # swap: the old folder moves aside, the new one in, the old one goes
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed
