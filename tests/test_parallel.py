"""torchrun on the CPU (gloo): 2 processes select, align and fine-tune as 1 process on the same
global batch (parallel.py), and a run checkpointed with one process count resumes with another."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, interrupt_at
from safetensors.torch import load_file

import train

TINY = ["--preset", "tiny", "--select-steps", "2", "--align-max-steps", "4", "--align-batch-size", "4",
        "--align-save-every", "2", "--finetune-max-steps", "3", "--eval-limit", "2"]


def torchrun(n: int, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def adapter(run, stage):
    return load_file(str(run / stage / "adapter" / "adapter_model.safetensors"))


def assert_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol)


def losses(run, stage):
    return [json.loads(line)["loss"] for line in (run / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("defense", ["sft", "booster", "repnoise"])
def test_two_processes_step_as_one(tmp_path, defense):
    """Each rank a shard of every batch, gradients summed by token share: the same adapters and
    losses as one process (booster's and repnoise's harmful-stream terms, repnoise's noise
    included, are computed alike on both ranks)."""
    flags = ["--stage", "finetune", *TINY, "--align-defense", defense]
    for stage in ("select", "align"):
        train.main(["--stage", stage, "--out", str(tmp_path / "one"), *flags[2:]])
    train.main(["--out", str(tmp_path / "one"), *flags])
    torchrun(2, "--stage", "all", "--out", str(tmp_path / "two"), *flags[2:])
    scores = [[json.loads(line)["score"] for line in (tmp_path / run / "select" / "selection.jsonl").open()]
              for run in ("one", "two")]
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # Pharmacist's pool batches scored across ranks
    for stage in ("align", "finetune"):
        assert_close(adapter(tmp_path / "one", stage), adapter(tmp_path / "two", stage))
        assert losses(tmp_path / "one", stage) == pytest.approx(losses(tmp_path / "two", stage), abs=1e-5)
    summary = json.loads((tmp_path / "two" / "align" / "summary.json").read_text())
    assert summary["processes"] == 2 and not list((tmp_path / "two").glob("**/*.rank*"))
    assert (tmp_path / "two" / "eval" / "results.json").exists()  # eval ran on rank 0


def test_resume_with_another_process_count(tmp_path, monkeypatch):
    """Stopped after 2 steps in one process, resumed under torchrun with 2: the end is the
    uninterrupted run's."""
    flags = [*TINY, "--align-defense", "sft"]
    train.main(["--stage", "select", "--out", str(tmp_path / "whole"), *flags])
    train.main(["--stage", "align", "--out", str(tmp_path / "whole"), *flags])
    train.main(["--stage", "select", "--out", str(tmp_path / "cut"), *flags])
    interrupt_at(monkeypatch, "sft", 2)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--stage", "align", "--out", str(tmp_path / "cut"), *flags])
    monkeypatch.undo()
    assert (tmp_path / "cut" / "align" / "checkpoint.pt").exists()
    done = torchrun(2, "--stage", "align", "--resume", "--out", str(tmp_path / "cut"), *flags)
    assert "resumed at step 2" in done.stdout
    assert_close(adapter(tmp_path / "whole", "align"), adapter(tmp_path / "cut", "align"))


def test_fsdp_shards_the_frozen_weights_and_steps_as_one(tmp_path):
    """--fsdp: each of 2 ranks holds half the frozen weights, and align (merged and saved from
    the gathered weights) and finetune end as one process without FSDP."""
    flags = [*TINY, "--align-defense", "sft"]
    train.main(["--stage", "all", "--out", str(tmp_path / "one"), *flags])
    torchrun(2, "--stage", "all", "--fsdp", "--out", str(tmp_path / "two"), *flags)
    for stage in ("align", "finetune"):
        assert_close(adapter(tmp_path / "one", stage), adapter(tmp_path / "two", stage))
        assert losses(tmp_path / "one", stage) == pytest.approx(losses(tmp_path / "two", stage), abs=1e-5)
        one, two = (json.loads((tmp_path / r / stage / "summary.json").read_text())["weights_mb_per_process"]
                    for r in ("one", "two"))
        assert two == pytest.approx(one / 2, rel=0.02)
    merged = [load_file(str(tmp_path / r / "align" / "model" / "model.safetensors")) for r in ("one", "two")]
    assert_close(*merged)


def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "align", "--fsdp", "--out", str(tmp_path), *TINY])
    assert e.value.code == 2 and "torchrun --nproc_per_node N" in capsys.readouterr().err
