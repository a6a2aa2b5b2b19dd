"""The ledger of the judge's labels (data/judge/labels.jsonl): one row per batch of items.

    python bench/agreement.py [--batches j0000,j0600,...]

A batch is the items from one first id up to the next batch's first id (data/judge/README.md says
what each batch is and how it was drawn). Per batch, and over all of them: how many items, who
read them first, the labels' counts, how many were read a second time and by whom, how many of
those differences were settled, and per label the share of items the two readings agree on and
Cohen's kappa. An item read twice holds the first reader's labels (`harmful`, `refusal`,
`degenerate`, or under `first` where settling the difference changed them) and the second
reading (`second`). Prints the markdown table of data/judge/README.md.
"""
import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("harmful", "refusal", "degenerate")
# the first id of each batch; a new batch adds its first id here
BATCHES = ("j0000,j0600,j1400,j1951,j2211,j2543,j2849,j3011,j3141,j3362,j3482,j3540,"
           "j3612,j3770,j3978,j4013,j4094,j4131,j4288,j4368,j4478,j4639,j4708,j4813,"
           "j4854,j4919,j4987,j5049,j5422,j5459,j5517,j5550,j5622,j5689,j5759,j5841,"
           "j5895,j5954,j5982,j6037,j6079,j6109,j6157,j6170,j6186,j6196,j6239,j6275,"
           "j6323,j6371,j6418,j6459,j6502,j6538,j6561,j6601,j6638,j6683,j6718,j6765,"
           "j6798,j6890,j6972")


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


def batches(labels: list[dict], starts: list[str]) -> list[tuple[str, list[dict]]]:
    """(name "first-last", items) per batch, in id order; ids compare as strings (j + 4 digits)."""
    starts = sorted(starts)
    out = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else None
        xs = [x for x in labels if x["id"] >= start and (end is None or x["id"] < end)]
        if xs:
            out.append((f"{xs[0]['id']}–{xs[-1]['id']}", xs))
    return out


def row(name: str, xs: list[dict], who: bool = True) -> str:
    """One ledger line: counts, readers (`who`) and, where items were read twice, agreement and kappa per label."""
    pairs = readings(xs)
    names = lambda rs: ", ".join(sorted(set(rs), key=lambda r: (len(r), r))) if who else "(above)"  # noqa: E731
    cells = [name, str(len(xs)), names(x["reader"] for x in xs),
             " / ".join(str(sum(x[k] for x in xs)) for k in LABELS),
             str(len(pairs)), names(b["reader"] for _, b in pairs) or "–", str(sum("settled" in x for x in xs))]
    for label in LABELS:
        if not pairs:
            cells.append("–")
            continue
        agree, k = kappa([a[label] for a, _ in pairs], [b[label] for _, b in pairs])
        cells.append(f"{agree:.3f}, {'–' if k is None else f'{k:.3f}'}")
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=Path, default=ROOT / "data" / "judge" / "labels.jsonl")
    p.add_argument("--batches", default=BATCHES, help="comma list of each batch's first id")
    args = p.parse_args(argv)
    labels = sorted((json.loads(line) for line in args.labels.read_text().splitlines() if line.strip()),
                    key=lambda x: x["id"])
    lines = ["| items | n | first reading | harmful / refusal / degenerate | read twice | second reading | settled | "
             + " | ".join(f"{label}: agreement, κ" for label in LABELS) + " |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(name, xs) for name, xs in batches(labels, args.batches.split(","))]
    lines.append(row("all", labels, who=False))
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
