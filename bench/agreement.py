"""Agreement between the two independent readings of the judge's labels (data/judge/labels.jsonl).

    python bench/agreement.py [--ranges j0600-j1399,j1400-j1950,...]

An item read twice holds the first reader's labels (`harmful`, `refusal`, `degenerate`, or under
`first` where settling the difference changed them) and the second reading (`second`). For each
id range and for all of them: the share of items the two readings agree on and Cohen's kappa,
per label. Prints the markdown table of data/judge/README.md.
"""
import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("harmful", "refusal", "degenerate")
RANGES = "j0600-j1399,j1400-j1950,j2211-j2542,j2543-j2848,j2849-j3010,j3011-j3140,j3141-j3361,j3362-j3481,j3482-j3539,j3540-j3611,j3612-j3769,j3770-j3977,j3978-j4012,j4013-j4093,j4094-j4130,j4131-j4287,j4288-j4367,j4368-j4477,j4478-j4638,j4639-j4707,j4708-j4812,j4813-j4853,j4854-j4918,j4919-j9999"


def readings(labels: list[dict]) -> list[tuple[dict, dict]]:
    """(first, second) label dicts of every item read twice."""
    return [(x.get("first") or {k: x[k] for k in LABELS}, x["second"]) for x in labels if "second" in x]


def kappa(a: list[int], b: list[int]) -> tuple[float, float | None]:
    """(agreement, Cohen's kappa) of two 0/1 readings; kappa is None where chance agreement is 1."""
    n = len(a)
    agree = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    return agree, None if chance == 1 else (agree - chance) / (1 - chance)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=Path, default=ROOT / "data" / "judge" / "labels.jsonl")
    p.add_argument("--ranges", default=RANGES, help="comma list of first-last id ranges")
    args = p.parse_args(argv)
    labels = [json.loads(line) for line in args.labels.read_text().splitlines() if line.strip()]
    groups = [(r, [x for x in labels if r.split("-")[0] <= x["id"] <= r.split("-")[1]]) for r in args.ranges.split(",")]
    groups = [(r, readings(xs)) for r, xs in groups] + [("all", readings(labels))]
    groups = [(r, pairs) for r, pairs in groups if pairs]
    cell = lambda ag, k: f"{ag:.3f}, {'–' if k is None else f'{k:.3f}'}"  # noqa: E731
    lines = ["| label | " + " | ".join(f"{r} ({len(pairs)})" for r, pairs in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for label in LABELS:
        lines.append(f"| {label} | " + " | ".join(cell(*kappa([a[label] for a, _ in pairs], [b[label] for _, b in pairs]))
                                                for _, pairs in groups) + " |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
