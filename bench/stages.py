"""Each stage's wall time of `train.py --stage all` at other commits of this repository, alternating.

    python bench/stages.py before=0261ed9 now=HEAD "now+compile=HEAD:--align-compile --finetune-compile" [--rounds 2]

A variant is name=revision[:train.py flags]. Each revision is checked out once into a temporary git
worktree; every round runs every variant once, in the order given, on the same machine and with
the same Python, so a slow spell of the machine hits each variant alike. Each run is
`train.py --stage all --preset cpu` (SmolLM2-135M on the embedded data) into a fresh folder; the
table is the median over rounds of each stage's `stage_time_s` (its summary.json: the stage's
process from loading to its files, compiles included), and each variant against the first.
Writes results/speed/stages_<device>_<processor>.{md,json}.
"""
import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from speed import results_file  # noqa: E402  (bench/, this file's folder)

import torch  # noqa: E402

import fast  # noqa: E402
import model as M  # noqa: E402

STAGES = ("select", "align", "finetune", "eval")


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """'name=rev[:flags]' -> (name, rev, flags)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"variant {text!r}: write name=revision[:train.py flags], e.g. now=HEAD:--align-compile")
    rev, _, flags = rest.partition(":")
    return name, rev, flags.split()


def checkout(rev: str, into: Path) -> Path:
    """A detached worktree of `rev` in `into` (the repository itself untouched)."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True, text=True)
    if sha.returncode:
        raise SystemExit(f"revision {rev!r} is not a commit of {ROOT}")
    path = into / sha.stdout.strip()[:12]
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), sha.stdout.strip()], cwd=ROOT, check=True)
    return path


def stage_times(tree: Path, out: Path, flags: list[str]) -> dict[str, float]:
    """Run `train.py --stage all --preset cpu` in a worktree; each stage's stage_time_s."""
    cmd = [sys.executable, "train.py", "--stage", "all", "--preset", "cpu", "--out", str(out), *flags]
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed in {tree}: {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {s: json.loads((out / s / "summary.json").read_text())["stage_time_s"] for s in STAGES}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="name=revision[:train.py flags]")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    times: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: checkout(rev, Path(tmp)) for _, rev, _ in variants}
        commits = {rev: tree.name[:7] for rev, tree in trees.items()}
        try:
            for r in range(args.rounds):
                for name, rev, flags in variants:
                    times[name].append(stage_times(trees[rev], Path(tmp) / "runs" / f"{name}_{r}", flags))
                    print(f"round {r + 1} {name}: " + ", ".join(f"{s} {t:.1f} s" for s, t in times[name][-1].items()),
                          flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    median = {name: {s: statistics.median(t[s] for t in runs) for s in STAGES} for name, runs in times.items()}
    first = variants[0][0]
    device = M.default_device()
    lines = [f"`train.py --stage all --preset cpu`, each stage's wall time (s), median of {args.rounds} rounds, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}:", "",
             "| variant | revision and flags | " + " | ".join(STAGES) + " | total | against " + first + " |",
             "|---|---|" + "---|" * (len(STAGES) + 2)]
    for name, rev, flags in variants:
        total = sum(median[name].values())
        lines.append(f"| {name} | {rev} ({commits[rev]}) {' '.join(flags)} | " + " | ".join(f"{median[name][s]:.1f}" for s in STAGES)
                     + f" | {total:.1f} | {sum(median[first].values()) / total:.2f}x |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = results_file(device, fast.train_dtype(device, True), prefix="stages_")
    out.with_suffix(".json").write_text(json.dumps({"variants": variants, "commits": commits, "times": times}, indent=2))
    out.with_suffix(".md").write_text(text + f"\ncommand: python bench/stages.py {shlex.join(sys.argv[1:])}\n")
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
