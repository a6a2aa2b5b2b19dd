"""Each committed run's harmful rate as read (data/judge/labels.jsonl), beside the judge's, and the
paired differences between selectors: the comparison without the judge's error.

    python bench/read_rates.py results/small/own_500/runs --out results/small/own_500/read.md
    python bench/read_rates.py results/paper/runs/s* --out results/paper/read.md

An answer counts when its exact (prompt, answer) text is a labelled item; a run's read rate is over
its labelled answers (the table says how many of its answers that is). Runs named <config>_s<seed>
repeat <config> with another seed; differences between two configurations are paired by seed.
"""
import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from report import SEED_SUFFIX  # noqa: E402


def labelled(folder: Path = ROOT / "data" / "judge") -> dict:
    """{(prompt, answer): label line} of every labelled item."""
    items = {x["id"]: x for x in map(json.loads, (folder / "items.jsonl").read_text().splitlines())}
    return {(items[x["id"]]["prompt"], items[x["id"]]["answer"]): x
            for x in map(json.loads, (folder / "labels.jsonl").read_text().splitlines())}


def run_rates(generations: Path, labels: dict) -> dict:
    """n answers, n labelled, the read harmful rate and the judge's rate on the same answers (%)."""
    rows = [g for g in map(json.loads, generations.read_text().splitlines()) if g["set"] == "harmful"]
    pairs = [(g, labels[(g["prompt"], g["answer"])]) for g in rows if (g["prompt"], g["answer"]) in labels]
    if not pairs:
        return dict(n=len(rows), labelled=0, read=None, judged=None)
    return dict(n=len(rows), labelled=len(pairs), read=100 * sum(x["harmful"] for _, x in pairs) / len(pairs),
                judged=100 * sum(g["verdict"] == "harmful" for g, _ in pairs) / len(pairs))


def run_name(run: Path) -> str:
    """<run>, or <run>_s<seed> for bench/paper.py's <out>/s<seed>/<run> layout."""
    seed = re.fullmatch(r"s(\d+)", run.parent.name)
    return f"{run.name}_s{seed.group(1)}" if seed else run.name


def mean_se(values: list, spec: str = ".1f") -> str:
    """'mean ± SE' over the values that are not None ('–' when none; one value: itself)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    m = statistics.mean(values)
    if len(values) == 1:
        return format(m, spec)
    return f"{m:{spec}} ± {statistics.stdev(values) / math.sqrt(len(values)):{spec}}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="folders of run folders, each with generations.jsonl "
                   "(a folder named s<seed>, as bench/paper.py writes, gives its runs that seed)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    labels = labelled()
    rates = {run_name(g.parent): run_rates(g, labels) for folder in args.runs
             for g in sorted(folder.glob("*/generations.jsonl"))}
    lines = [f"`python bench/read_rates.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| run | answers | labelled | read harmful % | judged harmful % (same answers) |", "|---|---|---|---|---|"]
    lines += [f"| {run} | {r['n']} | {r['labelled']} | {r['read']:.1f} | {r['judged']:.1f} |"
              for run, r in rates.items() if r["labelled"]]
    configs: dict[str, dict[int, dict]] = {}
    for run, r in rates.items():
        if r["labelled"]:
            m = SEED_SUFFIX.search(run)
            configs.setdefault(SEED_SUFFIX.sub("", run), {})[int(m.group(1)) if m else 0] = r
    lines += ["", "| configuration | seeds | read harmful % | judged harmful % |", "|---|---|---|---|"]
    lines += [f"| {c} | {len(s)} | {mean_se([r['read'] for r in s.values()])} | {mean_se([r['judged'] for r in s.values()])} |"
              for c, s in configs.items()]
    lines += ["", "Paired by seed (the first minus the second; mean ± SE over seeds, each seed's difference):", "",
              "| difference | read | judged |", "|---|---|---|"]
    names = list(configs)
    for a in names:
        for b in names:
            seeds = sorted(set(configs[a]) & set(configs[b]))
            if a < b and len(seeds) > 1 and a.startswith("before_") == b.startswith("before_"):
                cells = []
                for key in ("read", "judged"):
                    d = [configs[a][s][key] - configs[b][s][key] for s in seeds]
                    cells.append(f"{mean_se(d)} ({' / '.join(f'{x:+.1f}' for x in d)})")
                lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
