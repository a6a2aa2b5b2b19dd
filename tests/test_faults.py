"""Fault injection: train.py and data/prepare.py stopped right after each of their renames in
turn (files.rename's hook, PHARMACIST_FAULT_AFTER=N), then run again. The next run ends with the
outputs of an uninterrupted run or stops with one line; it never says "already done" over a
stage whose files are a mix of two runs.

In one process for speed: files.crash raises `Killed` where a real fault calls os._exit (the
subprocess test at the end kills train.py for real), and this process's own leftovers count as a
dead writer's."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import interrupt_at

import files
import train
from data import prepare

BASE = ["--preset", "tiny", "--select-steps", "2", "--align-max-steps", "2", "--finetune-max-steps", "2",
        "--align-save-every", "1", "--finetune-save-every", "1", "--eval-limit", "1", "--eval-max-new-tokens", "2",
        "--eval-tasks", "harmful,sst2"]
REDO = {"select": ["--select-seed", "1", "--select-selector", "random"], "align": ["--align-lr", "0.002"],
        "finetune": ["--finetune-lr", "0.002"], "eval": ["--eval-max-new-tokens", "3"]}  # another output each
COMPARED = {"select": ["subset.jsonl", "selection.jsonl"], "align": ["adapter/adapter_model.safetensors", "model"],
            "finetune": ["adapter/adapter_model.safetensors"], "eval": ["generations.jsonl"]}  # (adapter_config.json names --out)


class Killed(BaseException):
    """The fault: not an Exception, so no `except Exception` handles it (a kill runs no handler)."""


def fault_after(monkeypatch, n: int):
    """The n-th rename from now is the process's last."""
    def crash():
        raise Killed
    monkeypatch.setattr(files, "renames", 0)
    monkeypatch.setenv("PHARMACIST_FAULT_AFTER", str(n))
    monkeypatch.setattr(files, "crash", crash)
    real = files.pid_alive
    monkeypatch.setattr(files, "pid_alive", lambda pid: pid != os.getpid() and real(pid))


def renames_of(monkeypatch, argv) -> int:
    """How many renames the command does, uninterrupted."""
    monkeypatch.setattr(files, "renames", 0)
    train.main(argv)
    return files.renames


def outputs(run) -> dict:
    return {f"{stage}/{name}": files.content_hash(run / stage / name)
            for stage, names in COMPARED.items() for name in names}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run with BASE, and for each stage a finished run with its REDO flags."""
    root = tmp_path_factory.mktemp("faults")
    train.main(["--stage", "all", *BASE, "--out", str(root / "base")])
    for stage, flags in REDO.items():
        train.main(["--stage", "all", *BASE, *flags, "--out", str(root / stage)])
    return root


@pytest.mark.parametrize("stage", train.STAGES)
def test_a_redo_killed_at_any_rename_is_redone_or_refused(finished, tmp_path, monkeypatch, capsys, stage):
    """Issue 34, A: --stage S --force with other flags over a finished run, killed after its n-th
    rename for every n; then --stage all with those flags ends with the outputs of the run that
    had them from the start (the stage alone could stop with one line instead; `all` redoes).
    --resume too, on every other n."""
    want = outputs(finished / stage)
    assert want != outputs(finished / "base")  # the redo changes the stage's output
    redo = ["--stage", stage, "--force", *BASE, *REDO[stage]]
    total = renames_of(monkeypatch, [*redo, "--out", str(shutil.copytree(finished / "base", tmp_path / "count"))])
    assert total >= 4
    for n in range(1, total + 1):
        run = shutil.copytree(finished / "base", tmp_path / f"n{n}")
        fault_after(monkeypatch, n)
        with pytest.raises(Killed):
            train.main([*redo, "--out", str(run)])
        monkeypatch.delenv("PHARMACIST_FAULT_AFTER")
        capsys.readouterr()
        again = ["--stage", "all", *BASE, *REDO[stage], "--out", str(run), *(["--resume"] if n % 2 else [])]
        train.main(again)  # --stage all redoes what the kill left unfinished: never refused here
        assert outputs(run) == want, (stage, n, capsys.readouterr().out)
        shutil.rmtree(run)


def test_a_checkpoint_of_an_earlier_start_is_never_resumed(finished, tmp_path, monkeypatch, capsys):
    """Issue 34, B: a finished stage leaves its last checkpoint; a redo with other flags killed
    before its first checkpoint, then --resume, starts from step 0 (not the old run's steps)."""
    run = shutil.copytree(finished / "base", tmp_path / "run")
    assert (run / "align" / "checkpoint.pt").exists()
    fault_after(monkeypatch, 1)  # the redo's first rename: its started record
    with pytest.raises(Killed):
        train.main(["--stage", "align", "--force", *BASE, *REDO["align"], "--out", str(run)])
    assert not (run / "align" / "checkpoint.pt").exists() and not (run / "align" / "summary.json").exists()
    monkeypatch.delenv("PHARMACIST_FAULT_AFTER")
    train.main(["--stage", "all", "--resume", *BASE, *REDO["align"], "--out", str(run)])
    assert "resumed at step" not in capsys.readouterr().out
    assert outputs(run) == outputs(finished / "align")
    with pytest.raises(SystemExit):  # --resume --force: one of the two
        train.parse_args(["--resume", "--force", "--preset", "tiny"])


def test_a_checkpoint_names_its_start(tmp_path):
    ck = files.Checkpoint(tmp_path / "c.pt", 1, owner="a", x=[])
    ck.mark(1)
    with pytest.raises(ValueError, match="another start"):
        files.Checkpoint(tmp_path / "c.pt", 1, owner="b", x=[]).load()
    assert files.Checkpoint(tmp_path / "c.pt", 1, owner="a", x=[]).load()[0] == 1


def test_a_data_build_killed_at_any_rename_leaves_one_build(tmp_path, monkeypatch):
    """Issue 34, D: prepare.py --seed 1 over a seed-0 folder, killed after each rename: the folder
    is the seed-0 build or the seed-1 build, whole (train.py's check passes); killed between the
    swap's two renames, train.py puts the seed-0 build back."""
    old = tmp_path / "old"
    prepare.main(["--source", "embedded", "--out", str(old)])
    monkeypatch.setattr(files, "renames", 0)  # over a copy of the seed-0 build: the swap's renames counted
    prepare.main(["--source", "embedded", "--out", str(shutil.copytree(old, tmp_path / "new")), "--seed", "1"])
    total, swapped, aside = files.renames, False, False
    for n in range(1, total + 1):
        data = shutil.copytree(old, tmp_path / f"d{n}")
        fault_after(monkeypatch, n)
        with pytest.raises(Killed):
            prepare.main(["--source", "embedded", "--out", str(data), "--seed", "1"])
        monkeypatch.delenv("PHARMACIST_FAULT_AFTER")
        gone = not data.exists()  # killed between the two renames of the swap
        aside = aside or data.exists() and any(tmp_path.glob(f".{data.name}.*.old"))  # killed after both
        assert train.data_problem(train.Config(data=str(data))) is None
        seed = json.loads((data / "manifest.json").read_text())["seed"]
        assert files.content_hash(data) == files.content_hash(old if seed == 0 else tmp_path / "new"), n
        assert not gone or seed == 0
        swapped = swapped or gone
        prepare.main(["--source", "embedded", "--out", str(data), "--seed", "1"])
        assert files.content_hash(data) == files.content_hash(tmp_path / "new")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    assert swapped and aside  # the kills between the swap's renames and right after them were among them


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_write_that_fails_leaves_the_old_file_or_folder_and_nothing_beside_it(tmp_path):
    (tmp_path / "f.json").write_text("old")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "w").write_text("old")
    for write, path in ((files.atomic_file, tmp_path / "f.json"), (files.atomic_dir, tmp_path / "d")):
        with pytest.raises(RuntimeError):
            with write(path) as tmp:
                (tmp / "w" if tmp.is_dir() else tmp).write_text("half")
                raise RuntimeError
    assert (tmp_path / "f.json").read_text() == "old" and (tmp_path / "d" / "w").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.json"]


def test_a_swap_cut_short_is_put_back_before_the_next_write(tmp_path):
    """Killed between atomic_dir's two renames: the old folder lies aside as .NAME.PID.old. The
    next write of NAME puts it back first, so a write that then fails leaves the old folder."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "w").write_text("old")
    out.rename(tmp_path / f".model.{dead_pid()}.old")
    with pytest.raises(RuntimeError):
        with files.atomic_dir(out):
            raise RuntimeError
    assert (out / "w").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_data_build_never_replaces_a_folder_that_is_not_one(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a data folder"):
        prepare.main(["--source", "embedded", "--out", str(mine)])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_an_edited_output_of_a_finished_stage_is_redone(finished, tmp_path, capsys):
    """The summary lists each output with its hash: select/subset.jsonl edited by hand after select
    finished is not "already done"; the stage is redone and its output is the run's own again."""
    run = shutil.copytree(finished / "base", tmp_path / "run")
    subset = run / "select" / "subset.jsonl"
    subset.write_text("".join(subset.read_text().splitlines(keepends=True)[1:]))
    capsys.readouterr()
    train.main(["--stage", "select", *BASE, "--out", str(run)])
    assert "subset.jsonl is missing or changed since select finished: redoing select" in capsys.readouterr().out
    assert files.content_hash(subset) == files.content_hash(finished / "base" / "select" / "subset.jsonl")


def test_resume_refuses_a_checkpoint_of_another_start(tmp_path, monkeypatch):
    """A stage's checkpoint names its start (the stage's fingerprint): one copied in from a start
    with another --align-lr is refused, not resumed with the wrong weights."""
    a, b = (["--stage", "align", *BASE, "--out", str(tmp_path / run)] for run in "ab")
    interrupt_at(monkeypatch, "sft", 1)
    for argv in ([*a, "--align-lr", "0.002"], b):
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)
    monkeypatch.undo()
    shutil.copy(tmp_path / "a" / "align" / "checkpoint.pt", tmp_path / "b" / "align" / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint.pt: a checkpoint of another start"):
        train.main([*b, "--resume"])


def test_a_mixed_data_folder_is_refused(tmp_path):
    prepare.main(["--source", "embedded", "--out", str(tmp_path / "a")])
    prepare.main(["--source", "embedded", "--out", str(tmp_path / "b"), "--seed", "1"])
    shutil.copy(tmp_path / "b" / "pool.jsonl", tmp_path / "a" / "pool.jsonl")
    assert "pool.jsonl is not the file its manifest.json lists" in train.data_problem(train.Config(data=str(tmp_path / "a")))
    with pytest.raises(SystemExit):  # before anything runs
        train.parse_args(["--data", str(tmp_path / "a")])


def test_a_real_kill_mid_redo_is_redone(finished, tmp_path):
    """The hook itself: train.py killed (os._exit) in a redo, in a process of its own."""
    run = shutil.copytree(finished / "base", tmp_path / "run")
    env = dict(os.environ, PHARMACIST_FAULT_AFTER="3")
    p = subprocess.run([sys.executable, str(train.ROOT / "train.py"), "--stage", "align", "--force", *BASE,
                        *REDO["align"], "--out", str(run)], env=env, capture_output=True, text=True)
    assert p.returncode == 137, p.stderr[-2000:]
    assert not (run / "align" / "summary.json").exists() and not (run / "finetune" / "summary.json").exists()
    train.main(["--stage", "all", *BASE, *REDO["align"], "--out", str(run)])
    assert outputs(run) == outputs(finished / "align")

