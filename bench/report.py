"""Several runs in one table, seeds merged, and the paper's Fig. 1 (harmful score against the
number of alignment samples).

    python bench/report.py RUN_DIR... --out DIR [--no-figure]

A run folder is a `train.py --out` folder (its eval/, align/ and select/ stages) or an
`evaluate.py --out` folder. Writes DIR/report.md and, unless --no-figure, DIR/fig1.png.
"""
import argparse
import copy
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from files import read_json, write_text_atomic  # noqa: E402


def load_run(run) -> dict:
    """A run's numbers and metadata, merged from results.json / summary.json in the run folder, its
    eval/ and align/ stages and select/, or an exported run's align_summary.json (first found wins);
    what is missing stays missing."""
    run, merged = Path(run), {"run": Path(run).name}
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    for folder in (run, run / "eval", run / "align", run / "select"):
        for name in ("results.json", "summary.json", "align_summary.json"):
            if (folder / name).is_file():
                for k, v in read_json(folder / name, "rerun the stage that wrote it").items():
                    if v is not None:
                        merged.setdefault(k, v)
    return merged


def fmt(value, spec=".1f") -> str:
    return "–" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def row_order(r: dict):
    """Rows grouped by selector and defense; within a group, by number of alignment samples."""
    n = r.get("n_align")
    return str(r.get("selector")), str(r.get("defense")), n if isinstance(n, (int, float)) else 0


SEED_SUFFIX = re.compile(r"_s(\d+)$")  # runs named <config>_s<seed> repeat <config> with another seed


def numbers(obj, prefix: str = "") -> dict:
    """{path: value} of every number in a nested results dict ('outcomes.refusal': 12.0, ...)."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in numbers(value, f"{prefix}{key}.").items()}
    is_number = isinstance(obj, (int, float)) and not isinstance(obj, bool)
    return {prefix[:-1]: float(obj)} if is_number else {}


def get(row: dict, path: str):
    """The value at a dotted path of a nested dict, or None."""
    for key in path.split("."):
        row = row.get(key) if isinstance(row, dict) else None
    return row


def put(row: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        row = row.setdefault(key, {})
    row[last] = value


def merge_seeds(rows: list[dict]) -> list[dict]:
    """Runs that differ only in their seed (and were scored by the same judge) become one row:
    every number the runs hold is replaced by its mean over the seeds, and row["se"][path] is its
    standard error over seeds (std / sqrt(n)); a single run keeps its binomial standard error over
    the prompts for the harmful score."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((SEED_SUFFIX.sub("", r["run"]), r.get("judge")), []).append(r)
    merged = []
    for (name, _), group in groups.items():
        row = copy.deepcopy(group[0])
        row.update(run=name, seeds=len(group), per_seed=[r.get("harmful_score") for r in group], se={})
        if len(group) == 1:
            row["se"]["harmful_score"] = group[0].get("harmful_se")
        else:
            per_seed = [numbers(r) for r in group]
            for path in dict.fromkeys(k for values in per_seed for k in values):
                values = [v[path] for v in per_seed if path in v]
                put(row, path, sum(values) / len(values))
                row["se"][path] = float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else None
        merged.append(row)
    return merged


def pm(r: dict, path: str, spec: str = ".1f") -> str:
    """A cell: the value at `path`, with ± its standard error where the row has one."""
    value, se = get(r, path), r.get("se", {}).get(path)
    return fmt(value, spec) if se is None or value is None else f"{fmt(value, spec)} ± {fmt(se, spec)}"


def _corrected(r: dict) -> str:
    c = r.get("harmful_corrected")
    return "–" if not c else f"{pm(r, 'harmful_corrected.rate')} ({c['low']:.1f}–{c['high']:.1f})"


def _outcomes(key: str, kinds: tuple[str, ...]):
    return lambda r: " / ".join(pm(r, f"{key}.{k}", ".0f") for k in kinds)


# (column, the key that makes it appear, its cell): the measures of results files that have them;
# with several seeds each number is the mean ± its standard error over seeds (the interval of the
# corrected rate: the means of its ends)
EXTRA_COLUMNS = [
    ("judge", "judge", lambda r: fmt(r.get("judge"))),
    ("harmful, corrected (95 %)", "harmful_corrected", _corrected),
    ("refusal / degenerate / compliant (%)", "outcomes", _outcomes("outcomes", ("refusal", "degenerate", "compliant"))),
    ("harmful loss", "harmful_loss", lambda r: pm(r, "harmful_loss", ".3f")),
    ("refusal loss", "refusal_loss", lambda r: pm(r, "refusal_loss", ".3f")),
    ("refusal_judge (rule)", "harmful_by_judge", lambda r: pm(r, "harmful_by_judge.refusal")),
    ("benign: refusal / degenerate / helpful (%)", "benign_outcomes",
     _outcomes("benign_outcomes", ("refusal", "degenerate", "helpful"))),
]


def report(runs, out, figure: bool = True) -> str:
    """One markdown table over runs (rows: selector × defense, seeds merged), report.md, fig1.png."""
    rows = [load_run(r) for r in runs]
    for r in rows:  # a tuning-stage defense (BDS) on top of the alignment defense reads "sft+bds"
        if r.get("defense") and r.get("finetune_defense") not in (None, "sft"):
            r["defense"] = f"{r['defense']}+{r['finetune_defense']}"
    rows = sorted(merge_seeds(rows), key=row_order)
    tasks = sorted({t for r in rows for t in r.get("accuracy", {})})
    judges = {r.get("judge") for r in rows}
    extra = [(name, cell) for name, key, cell in EXTRA_COLUMNS if any(key in r for r in rows)
             and (key != "judge" or len(judges) > 1)]  # a judge column only where runs differ in judge
    head = ["run", "selector", "defense", "n align", "harmful score", "seeds", *[n for n, _ in extra],
            "over-refusal", *[f"acc {t}" for t in tasks], "align work (k tok-passes)", "align time (s)",
            "select time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        harmful = "–" if r.get("harmful_score") is None else f"{r['harmful_score']:.1f} ± {fmt(r['se'].get('harmful_score'))}"
        seeds = " / ".join(fmt(v, ".0f") for v in r["per_seed"]) if r["seeds"] > 1 else "1"
        # alignment compute that CPU contention cannot inflate: tokens x forward-backward passes per step
        work = r["tokens"] * r["passes_per_step"] / 1000 if {"tokens", "passes_per_step"} <= r.keys() else None
        cells = [r["run"], fmt(r.get("selector")), fmt(r.get("defense")), fmt(r.get("n_align"), "g"), harmful,
                 seeds, *[cell(r) for _, cell in extra], pm(r, "over_refusal"),
                 *[pm(r, f"accuracy.{t}") for t in tasks],
                 fmt(work, ".0f"), pm(r, "align_time_s"), pm(r, "select_time_s")]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(text, out / "report.md")
    if figure:
        plot_fig1(rows, out / "fig1.png")
    return text


def fig1_points(rows: list[dict]) -> list[dict]:
    """The rows Fig. 1 draws: it is about k, so only the defenses that one selector ran at several k
    (the full pool's point beside them); all rows when no defense was run at several k."""
    points = [r for r in rows if isinstance(r.get("n_align"), (int, float)) and r.get("harmful_score") is not None]
    ks: dict[tuple, set] = {}
    for r in points:
        if r.get("selector") != "full":
            ks.setdefault((str(r.get("defense")), r.get("selector")), set()).add(r["n_align"])
    swept = {defense for (defense, _), k in ks.items() if len(k) > 1}
    return [r for r in points if str(r.get("defense")) in swept] if swept else points


def plot_fig1(rows: list[dict], path: Path, ylabel: str = "harmful score (%)") -> None:
    """Paper Fig. 1: harmful score and alignment time against the number of alignment samples."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return
    points = fig1_points(rows)
    if not points:
        print("no run with n_align and harmful_score: no figure")
        return
    several_defenses = len({str(r.get("defense")) for r in points}) > 1

    def line(r):  # one line per selector, and per defense when the runs differ in defense
        return f"{r.get('selector')} / {r.get('defense')}" if several_defenses else str(r.get("selector"))

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in sorted({line(r) for r in points}):
        mine = sorted((r for r in points if line(r) == name), key=lambda r: r["n_align"])
        for ax, key in zip(axes, ("harmful_score", "align_time_s")):
            xy = [(r["n_align"], r[key]) for r in mine if r.get(key) is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=name)
    for ax, label in zip(axes, (ylabel, "alignment time (s)")):
        ax.set_xlabel("number of alignment samples")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (train.py --out, or evaluate.py --out)")
    p.add_argument("--out", required=True)
    p.add_argument("--no-figure", action="store_true", help="the table only (runs not spread over k)")
    args = p.parse_args(argv)
    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        p.error(f"no such run folder: {', '.join(missing)}")
    try:
        print(report(args.runs, args.out, figure=not args.no_figure), end="")
    except (ValueError, OSError) as e:  # a damaged results file, an --out that cannot be written: one line
        sys.exit(f"report.py: error: {e}")


if __name__ == "__main__":
    main()
