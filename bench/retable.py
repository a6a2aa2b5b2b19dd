"""Rebuild a results folder's tables from the runs it holds, after `evaluate.py rescore` judged
their answers again: nothing is trained or generated.

    python evaluate.py rescore results/small          # every results.json under it, today's judge
    python bench/retable.py results/small results/small/own_500 ...

A results folder is what `bench/reproduce.py` wrote: exported runs (bench/reproduce.export: the
configs, summaries, results.json and generations of each) in runs/ and, for the calibration runs,
at its top. From them this writes again, where the folder has them:
  per_run/<run>.json   each run's results.json;
  report.md, fig1.png  bench/report.py over the runs evaluated before the attack too (before_<run>);
  before_after.md      those runs before and after the attack, seeds merged;
  calibration.md/json  the calibration runs' numbers; `chosen` stays the attack the sweep chose and
                       ran with, and the table says which setting today's numbers would choose.
precision.md and the selections do not depend on the judge and are left as they are.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from files import write_text_atomic  # noqa: E402
from report import report  # noqa: E402  (bench/, this file's folder)
from reproduce import before_after_table, calibration_table, choose, eval_results, run_metrics  # noqa: E402


def exported_runs(results: Path) -> dict[str, Path]:
    """Every exported run of a results folder by name: runs/<run>/ and <run>/ at its top."""
    folders = [results / "runs", results]
    return {r.name: r for f in folders if f.is_dir() for r in sorted(f.iterdir())
            if r.is_dir() and (r / "results.json").is_file()}


def recalibrate(calibration: dict, runs: dict[str, Path]) -> tuple[dict, str]:
    """calibration.json with each row's numbers read again from its run, and its table."""
    rows = [dict(row, **{k: v for k, v in run_metrics(runs[row["run"]], row["model"], row["lr"], row["epochs"],
                                                       row.get("p"), row.get("mix", "")).items() if k != "run"})
            if row["run"] in runs else row for row in calibration["runs"]]
    chosen, today = calibration["chosen"], choose(rows)
    same = today == chosen or (today is not None and chosen is not None and all(today[k] == chosen.get(k) for k in today))
    note = ("" if same else "\nBy these numbers the rule chooses "
            + (f"lr {today['lr']}, {today['epochs']} epoch(s), p {today['p']}" if today else "no setting")
            + "; the choice above was made by the numbers of the judge of its day.\n")
    return dict(calibration, runs=rows), calibration_table(rows, chosen) + note


def retable(results: Path, figure: bool = True) -> list[str]:
    """Writes a results folder's tables again from its runs; returns the files written."""
    runs, written = exported_runs(results), []
    if not runs:
        raise FileNotFoundError(f"{results}: no exported run (a folder with results.json) in it or in its runs/")
    if (results / "per_run").is_dir():
        for name, run in runs.items():
            write_text_atomic(eval_results(run).read_text(), results / "per_run" / f"{name}.json")
        written.append("per_run/")
    main = [runs[n] for n in runs if f"before_{n}" in runs]  # the runs evaluated before the attack too
    if main:
        write_text_atomic(before_after_table(main[0].parent, main), results / "before_after.md")
        report(main, results, figure=figure)
        written += ["before_after.md", "report.md"] + (["fig1.png"] if figure else [])
    if (results / "calibration.json").is_file():
        calibration, table = recalibrate(json.loads((results / "calibration.json").read_text()), runs)
        write_text_atomic(json.dumps(calibration, indent=2), results / "calibration.json")
        write_text_atomic(table, results / "calibration.md")
        written += ["calibration.json", "calibration.md"]
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="results folders bench/reproduce.py wrote")
    p.add_argument("--no-figure", action="store_true", help="leave fig1.png as it is")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        p.error(f"no such folder: {', '.join(missing)}")
    for folder in args.folders:
        try:
            print(f"{folder}: {', '.join(retable(folder, figure=not args.no_figure))}")
        except FileNotFoundError as e:
            p.error(str(e))


if __name__ == "__main__":
    main()
