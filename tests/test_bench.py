"""bench/reproduce.py's calibration rule on made-up sweep rows."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import reproduce  # noqa: E402


def row(model, lr, epochs, refusal, harmful, sst2):
    return dict(run=f"{model}_{lr}_{epochs}", model=model, lr=lr, epochs=epochs, refusal=refusal, harmful=harmful,
                harmful_low=None, harmful_high=None, over_refusal=5.0, sst2=sst2, harmful_loss=2.0)


def test_choose_takes_the_middle_attack_that_learns_the_task():
    rows = [row("full", None, None, 95, 3, 10), row("random", None, None, 90, 5, 10),
            row("full", "1e-4", "1", 60, 35, 75), row("random", "1e-4", "1", 50, 45, 85),  # task not learned
            row("full", "2e-4", "1", 45, 52, 88), row("random", "2e-4", "1", 30, 60, 90),  # the middle
            row("full", "5e-4", "1", 32, 68, 90), row("random", "5e-4", "1", 10, 80, 91),  # in range, further off
            row("full", "5e-4", "2", 2, 90, 92), row("random", "5e-4", "2", 1, 95, 93)]   # broken
    assert reproduce.choose(rows) == {"lr": "2e-4", "epochs": "1"}
    table = reproduce.calibration_table(rows, reproduce.choose(rows))
    assert "Chosen: lr 2e-4, 1 epoch(s)." in table and table.count("\n| ") == len(rows)  # one line per run


def test_choose_says_none_when_no_attack_qualifies():
    rows = [row("full", "5e-4", "2", 2, 90, 92), row("random", "5e-4", "2", 1, 95, 93)]
    assert reproduce.choose(rows) is None
    assert "none qualifies" in reproduce.calibration_table(rows, None)
