"""Atomic writes: a file or a folder appears complete or not at all; and `Checkpoint`, a loop's
state written with them, so an interrupted loop resumes where it stopped.

Everything a run writes (JSON, JSONL, checkpoints, model and adapter folders, the converted
default model) goes through these, so an interrupted process never leaves a half-written
output where the next run would read it.

    with atomic_file(path) as tmp:      # write tmp; it replaces path when the block succeeds
        torch.save(state, tmp)
    with atomic_dir(folder) as tmp:     # fill the folder tmp; it replaces folder at the end
        save_file(tensors, tmp / "model.safetensors")

Every rename goes through `rename`, which a test can make the last thing the process does
(PHARMACIST_FAULT_AFTER=N: killed right after the N-th), so tests/test_faults.py stops a run at
each of its writes in turn. `content_hash` names a file's or a folder's content, which is how a
stage records its outputs and inputs (train.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


renames = 0  # renames done by this process (the fault hook counts them)


def rename(src, dst) -> None:
    """os.replace, counted. Test hook: with PHARMACIST_FAULT_AFTER=N in the environment the process
    dies (like kill -9: no cleanup) right after its N-th rename."""
    global renames
    os.replace(src, dst)
    renames += 1
    if str(renames) == os.environ.get("PHARMACIST_FAULT_AFTER"):
        crash()


def crash():
    os._exit(137)  # tests/test_faults.py replaces this with an exception to stay in one process


@contextmanager
def atomic_file(path):
    """A temporary file beside `path`, renamed over it when the block ends without an error
    (removed when it raises); readable like any file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private to us
        rename(tmp, path)
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


def read_json(path, fix: str = "restore or re-create the file"):
    """A JSON file's object; a damaged file is a ValueError naming it and the fix."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {fix}") from None


def make_readable(folder: Path) -> None:
    """Ordinary permissions for a finished folder: mkdtemp and safetensors make things private to us."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def restore_swapped(out: Path) -> None:
    """A swap (atomic_dir) killed between its two renames leaves no `out` and the old folder aside as
    .NAME.PID.old: put it back. The redo did not finish, so the folder is the earlier one, whole."""
    if out.exists():
        return
    for old in out.parent.glob(f".{out.name}.*.old"):
        pid = old.name[len(out.name) + 2:].split(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            os.rename(old, out)
            return


def remove_orphans(out: Path) -> None:
    """Temporary siblings of `out` (.NAME.PID.*: new files and folders, and old folders moved aside)
    left by a process that was killed (SIGKILL, power loss): a pid no longer running means nobody
    will finish them. An old folder whose swap was cut short comes back first (restore_swapped)."""
    restore_swapped(out)
    for tmp in out.parent.glob(f".{out.name}.*"):
        pid = tmp.name[len(out.name) + 2:].split(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            remove(tmp)


def remove(path: Path) -> None:
    """A file or a folder, gone (nothing when absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            rename(out, old)
            rename(tmp, out)
            shutil.rmtree(old)
        else:
            rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed


HASHES: dict = {}  # path -> [size, mtime_ns, inode, hash]: files content_hash has read (train.py keeps it in --out)


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (16 hex digits), read again only when its size, mtime or inode changed."""
    st = path.stat()
    key = [st.st_size, st.st_mtime_ns, st.st_ino]
    known = HASHES.get(str(path.resolve()))
    if known and known[:3] == key:
        return known[3]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    HASHES[str(path.resolve())] = [*key, h.hexdigest()[:16]]
    return h.hexdigest()[:16]


def content_hash(path) -> str | None:
    """A file's hash, or a folder's (its files' relative names and hashes); None when absent."""
    path = Path(path)
    if path.is_file():
        return file_hash(path)
    if not path.is_dir():
        return None
    files = sorted(f for f in path.rglob("*") if f.is_file())
    text = "".join(f"{f.relative_to(path)}\t{file_hash(f)}\n" for f in files)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Checkpoint:
    """A loop's state at its last step boundary, in a file: saved every `every` steps, at the end
    and when the loop is interrupted (Ctrl-C, SIGTERM), so a resumed loop ends as an uninterrupted
    one would. `parts` are the loop's objects, restored in place: a list of tensors (trainable
    weights), objects with state_dict (optimizers, schedulers, a defense context, per-sample
    weights), objects with a `drawn` position (data streams) and plain objects (their attributes);
    `values` (step counters, held tensors) are handed back to the caller. With the RNG states."""

    def __init__(self, path, every: int, writes: bool = True, owner: str = "", **parts):
        self.path, self.every, self.parts, self.boundary = Path(path) if path else None, every, parts, None
        self.writes = writes  # False: loads but never writes (the other ranks of a parallel run)
        self.owner = owner  # the start it belongs to (train.py: the stage's fingerprint); load refuses another's

    @staticmethod
    def _state(obj):
        if isinstance(obj, list):
            return [t.detach().clone() for t in obj]
        if hasattr(obj, "drawn"):
            return obj.drawn
        if hasattr(obj, "state_dict"):
            return copy.deepcopy(obj.state_dict())
        return {k: v for k, v in vars(obj).items() if k != "t0"}

    @staticmethod
    def _restore(obj, state):
        if isinstance(obj, list):
            with torch.no_grad():
                for t, x in zip(obj, state):
                    t.copy_(x)
        elif hasattr(obj, "drawn"):
            obj.drawn = state
        elif hasattr(obj, "load_state_dict"):
            obj.load_state_dict(state)
        else:
            vars(obj).update(state)

    def mark(self, step: int, **values):
        """The state after `step` steps; written when `step` is a multiple of `every`."""
        rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        self.boundary = dict(step=step, values=copy.deepcopy(values), rng=rng, owner=self.owner,
                             parts={k: self._state(v) for k, v in self.parts.items()})
        if step and step % self.every == 0:
            self.save()

    def save(self):
        if self.path and self.writes and self.boundary is not None:
            with atomic_file(self.path) as tmp:
                torch.save(self.boundary, tmp)

    def load(self) -> tuple[int, dict]:
        """(steps done, values) from the file, every part restored; (0, {}) when there is none."""
        if not self.path or not self.path.exists():
            return 0, {}
        try:
            state = torch.load(self.path, weights_only=False)
        except Exception as e:  # truncated by a full disk, or not a checkpoint
            raise ValueError(f"{self.path}: unreadable checkpoint ({e}); start over without --resume") from None
        if state.get("owner", "") != self.owner:
            raise ValueError(f"{self.path}: a checkpoint of another start (other flags or inputs); "
                             "start over without --resume")
        for k, v in self.parts.items():
            self._restore(v, state["parts"][k])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        print(f"resumed at step {state['step']} from {self.path}")
        return state["step"], state["values"]

    @contextmanager
    def saved_on_interrupt(self):
        """Ctrl-C or SIGTERM inside the block: the last boundary is written, then the interrupt goes on."""
        def on_sigterm(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        try:
            old = signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread: leave signals alone
            old = None
        try:
            yield
        except KeyboardInterrupt:
            self.save()
            if self.path and self.boundary is not None:
                print(f"\nstopped; checkpoint at step {self.boundary['step']} in {self.path} (continue with --resume)",
                      file=sys.stderr)
            raise
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
