"""The paper's table and its paired comparisons, from results/paper/table.jsonl (bench/paper.py).

    python bench/paper_report.py [--table results/paper/table.jsonl] [--out results/paper/table.md]

Beside table.md it writes cells.jsonl: table.jsonl's lines with every judged number read again from
each run's results.json (the judge `evaluate.py rescore` last applied; table.jsonl keeps the numbers
each run finished with) and `harmful_after_read`, the numbers the tables are made of.

Each cell: the mean over its seeds ± the standard error over seeds (one seed: its value). The
"read" columns count the after-attack answers the labels of data/judge/ read as harmful, for cells
whose every answer is labelled (the judge over-counts: docs/RESULTS.md, "Judge"). The
comparisons are paired by seed (the same pool draw, evaluation prompts and attack): the mean of
the per-seed differences ± their standard error, and each seed's sign. Alignment cost is compared
as tokens trained on (`align_tokens`: the same work measure whatever else the machine ran) and as
wall time (cells run two at a time share the cores, so their times are noisier). The paper's abstract gives
Pharmacist's gains over the full set for RepNoise and T-Vaccine: defense (harmful score) 2.60 and
3.30 points lower, fine-tune accuracy 3.50 and 1.10 points higher, alignment time 56.83 % and
57.63 % lower.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from paper import ATTACK, numbers, read  # noqa: E402
from read_rates import labelled, mean_se, run_rates  # noqa: E402
from report import plot_fig1  # noqa: E402
PAPER = {"repnoise": dict(harmful=-2.60, accuracy=3.50, time=-56.83),
         "tvaccine": dict(harmful=-3.30, accuracy=1.10, time=-57.63)}  # Pharmacist − full, the abstract
COLUMNS = [("harmful_after_read", "read harmful after (%)"), ("harmful_after", "judged harmful after (%)"), ("harmful_after_corrected", "corrected (%)"),
           ("refusal_after", "refusal after (%)"), ("over_refusal_before", "over-refusal before (%)"),
           ("broken_benign_before", "broken benign before (%)"), ("sst2_after", "SST-2 after (%)"),
           ("harmful_loss_after", "harmful loss after"), ("select_time_s", "select (s)"),
           ("align_time_s", "align (s)")]


def rescored(rows: list[dict]) -> list[dict]:
    """Each row with its judged numbers read again from the committed results.json beside its
    generations (after and before the attack), so `evaluate.py rescore results/paper/runs`,
    which rewrites those, reaches the table."""
    out = []
    for r in rows:
        after, before = (ROOT / r.get(key, "") for key in ("generations", "generations_before"))
        if (after.parent / "results.json").is_file() and (before.parent / "results.json").is_file():
            r = dict(r, **numbers(read(after.parent / "results.json"), read(before.parent / "results.json")))
        out.append(r)
    return out


def with_read_rates(rows: list[dict], labels: dict) -> list[dict]:
    """Each row with `harmful_after_read`: the share of its after-attack answers to harmful prompts
    that the labels (data/judge/) read as harmful, where every one of them is labelled (else None)."""
    out = []
    for r in rows:
        path = ROOT / r.get("generations", "")
        rates = run_rates(path, labels) if path.is_file() else {}
        full = rates.get("labelled") and rates["labelled"] == rates["n"]
        out.append(dict(r, harmful_after_read=rates["read"] if full else None))
    return out


def cells(rows: list[dict], pool: str = "") -> dict:
    """{(defense, selector, k): {seed: row}} of the cells on one kind of pool ("": the planted pool
    of the table; "safety": bench/paper.py's safety part), the strength part's cells left out."""
    out: dict = {}
    for r in rows:
        if r.get("pool", "") == pool and r.get("part") != "strength":
            out.setdefault((r["defense"], r["selector"], r["k"]), {})[r["seed"]] = r
    return out


def strength_cells(rows: list[dict]) -> dict:
    """{(defense, attack lr): {seed: row}}: the strength part's cells and the table's cells of the
    same subsets (selector, k, seed) at the calibrated attack."""
    subsets = {(r["selector"], r["k"], r["seed"]) for r in rows if r.get("part") == "strength"}
    out: dict = {}
    for r in rows:
        if r.get("part", "table") in ("strength", "table") and (r["selector"], r["k"], r["seed"]) in subsets:
            out.setdefault((r["defense"], r.get("attack_lr", ATTACK["lr"])), {})[r["seed"]] = r
    return out


def table(rows: list[dict], pool: str = "") -> str:
    lines = ["| defense | selector | k | seeds | " + " | ".join(name for _, name in COLUMNS) + " |",
             "|" + "---|" * (4 + len(COLUMNS))]
    for (defense, selector, k), seeds in sorted(cells(rows, pool).items(), key=lambda c: (c[0][0], c[0][1], c[0][2])):
        lines.append(f"| {defense} | {selector} | {k} | {','.join(map(str, sorted(seeds)))} | " + values(seeds) + " |")
    return "\n".join(lines) + "\n"


def strength_table(rows: list[dict]) -> str:
    """The strength part's table: the COLUMNS but the times (a cell at another strength reuses its
    calibrated cell's selection and alignment)."""
    columns = [c for c in COLUMNS if not c[0].endswith("_time_s")]
    lines = ["| defense | attack lr | seeds | " + " | ".join(name for _, name in columns) + " |",
             "|" + "---|" * (3 + len(columns))]
    for (defense, lr), seeds in sorted(strength_cells(rows).items(), key=lambda c: (c[0][0], float(c[0][1]))):
        lines.append(f"| {defense} | {lr} | {','.join(map(str, sorted(seeds)))} | " + values(seeds, columns) + " |")
    return "\n".join(lines) + "\n"


def values(seeds: dict, columns=COLUMNS) -> str:
    """A cell's columns over its seeds: mean ± SE (one seed: its value)."""
    return " | ".join(mean_se([r.get(key) for r in seeds.values()], ".3f" if "loss" in key else ".1f") for key, _ in columns)


def with_signs(d: list[float]) -> str:
    """Per-seed differences as mean ± SE and each seed's sign."""
    return f"{mean_se(d)} ({' '.join('+' if x > 0 else '−' if x < 0 else '0' for x in d)})"


def paired(rows: list[dict], ours: str = "pharmacist", keep: int = 160, pool: str = "",
           others: tuple = (("full", 400), ("random", 160), ("loss", 160), ("pharmacist-lam0", 160), ("oracle", 160))) -> str:
    """Pharmacist − each other subset per defense, paired by seed, beside the paper."""
    by = cells(rows, pool)
    lines = ["| defense | Pharmacist − | seeds | read harmful after (points) | judged harmful after (points) | SST-2 after (points) | "
             "align tokens (%) | align time (%) | select + align time (%) | paper (harmful / accuracy / time) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for defense in sorted({d for d, _, _ in by}):
        mine = by.get((defense, ours, keep), {})
        for other, k in others:
            theirs = by.get((defense, other, k), {})
            seeds = sorted(set(mine) & set(theirs))
            if not seeds:
                continue

            def diff(key, relative=False, plus=()):
                if any(r[s].get(key) is None for r in (mine, theirs) for s in seeds):
                    return "–"  # a row made before the table recorded it
                d = []
                for s in seeds:
                    a = mine[s].get(key, 0) + sum(mine[s].get(p) or 0 for p in plus)
                    b = theirs[s].get(key, 0) + sum(theirs[s].get(p) or 0 for p in plus)
                    d.append(100 * (a - b) / b if relative else a - b)
                return with_signs(d)
            p = PAPER.get(defense)
            paper = f"{p['harmful']:+.2f} / {p['accuracy']:+.2f} / {p['time']:+.2f} %" if p and other == "full" else ""
            lines.append(f"| {defense} | {other} | {','.join(map(str, seeds))} | {diff('harmful_after_read')} | {diff('harmful_after')} | "
                         f"{diff('sst2_after')} | {diff('align_tokens', True)} | {diff('align_time_s', True)} | "
                         f"{diff('align_time_s', True, ('select_time_s',))} | {paper} |")
    return "\n".join(lines) + "\n"


def bds_table(rows: list[dict]) -> str:
    """The bds parts: each subset attacked plainly (the table's SFT cell) and with each BDS variant
    (bds; bds-safe0, its weights alone), paired by seed; a variant other than bds also against bds;
    and the share of BDS's weight mass on the attack's harmful rows beside those rows' share."""
    by = cells(rows)
    lines = ["| BDS | selector | k | seeds | read harmful after, plain → BDS (%) | BDS − plain, read (points) | "
             "judged, plain → BDS (%) | BDS − plain, judged (points) | − bds, read (points) | "
             "BDS weight on harmful rows (%) | harmful rows (%) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (defense, selector, k), bds in sorted(by.items()):
        plain = by.get(("sft", selector, k), {}) if defense.startswith("sft+bds") else {}
        seeds = sorted(set(plain) & set(bds))
        if not seeds:
            continue

        def pair(key, base=plain):
            a, b = [base[s].get(key) if s in base else None for s in seeds], [bds[s].get(key) for s in seeds]
            if None in a + b:
                return "–", "–"
            return f"{mean_se(a)} → {mean_se(b)}", with_signs([y - x for x, y in zip(a, b)])
        share = lambda key: mean_se([100 * r[key] if r.get(key) is not None else None for r in (bds[s] for s in seeds)])  # noqa: E731
        against_bds = pair("harmful_after_read", by.get(("sft+bds", selector, k), {}))[1] if defense != "sft+bds" else ""
        lines.append(f"| {defense.removeprefix('sft+')} | {selector} | {k} | {','.join(map(str, seeds))} | "
                     f"{' | '.join(pair('harmful_after_read'))} | {' | '.join(pair('harmful_after'))} | {against_bds} | "
                     f"{share('bds_harmful_share')} | {share('attack_harmful_share')} |")
    return "\n".join(lines) + "\n"


def fig1_points(rows: list[dict], selectors=("pharmacist", "random")) -> list[dict]:
    """Paper Fig. 1's points: SFT with each selector at every k, over the seeds of the fig1 part that
    every such cell has (a seed still running is left out, so every k has the same seeds): read
    harmful after the attack where every cell is read (else judged), and alignment time; the mean
    over those seeds, and each seed's harmful rate beside it."""
    sft = {(selector, k): by_seed for (defense, selector, k), by_seed in sorted(cells(rows).items())
           if defense == "sft" and selector in selectors}
    seeds = {r["seed"] for r in rows if r.get("part") == "fig1"}
    for by_seed in sft.values():
        seeds &= set(by_seed)
    points = []
    for (selector, k), by_seed in sft.items():
        mine = [by_seed[s] for s in sorted(seeds)]
        if not mine:
            continue
        read = [r.get("harmful_after_read") for r in mine]
        key = "harmful_after" if None in read else "harmful_after_read"
        by_seed = [float(r[key]) for r in mine]
        points.append(dict(selector=selector, defense="sft", n_align=k, seeds=sorted(seeds), score=key,
                           harmful_score=float(np.mean(by_seed)), harmful_by_seed=by_seed,
                           align_time_s=float(np.mean([r["align_time_s"] for r in mine]))))
    return points


def fig1_table(points: list[dict]) -> str:
    lines = ["| selector | k | seeds | harmful after (%) | each seed | measured by | align time (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['selector']} | {p['n_align']} | {','.join(map(str, p['seeds']))} | {p['harmful_score']:.1f} | "
              f"{' / '.join(f'{h:g}' for h in p['harmful_by_seed'])} | "
              f"{'read' if p['score'] == 'harmful_after_read' else 'judged'} | {p['align_time_s']:.0f} |" for p in points]
    return "\n".join(lines) + "\n"


def order_noise(rows: list[dict], k: int = 400) -> str:
    """The spread of one cell from run to run, read harmful after: at k = the whole pool Pharmacist's
    and Random's SFT cells (the fig1 part) train on the same rows and differ only in their order,
    and the full pool's (the table's) in a third. Per seed the three rates; then the SD of one run
    from the order-only pairs (sqrt(mean d^2 / 2)), and pooled over the three cells of each seed
    (the mean of their variances), each also as the SE of a difference paired over three seeds
    (SD·sqrt(2/3))."""
    by = cells(rows)
    ph, ra, full = ({s: r["harmful_after_read"] for s, r in by.get(("sft", selector, k), {}).items()
                     if r.get("harmful_after_read") is not None} for selector in ("pharmacist", "random", "full"))
    seeds = sorted(set(ph) & set(ra))
    if not seeds:
        return ""
    lines = [f"| seed | Pharmacist, k = {k} | Random, k = {k} | full pool | Pharmacist − Random |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {ph[s]:g} | {ra[s]:g} | {format(full[s], 'g') if s in full else '–'} | {ph[s] - ra[s]:+g} |" for s in seeds]
    order = float(np.sqrt(np.mean([(ph[s] - ra[s]) ** 2 for s in seeds]) / 2))
    triples = [[ph[s], ra[s], full[s]] for s in seeds if s in full]
    text = f"\nSD of one run from the order-only pairs ({len(seeds)} seeds): {order:.1f} points; " \
           f"a difference paired over three seeds: SE {order * np.sqrt(2 / 3):.1f}"
    if triples:
        pooled = float(np.sqrt(np.mean([np.var(t, ddof=1) for t in triples])))
        text += f". With the full pool's cells ({len(triples)} seeds): SD {pooled:.1f}, SE {pooled * np.sqrt(2 / 3):.1f}"
    return "\n".join(lines) + "\n" + text + ".\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=Path, default=ROOT / "results" / "paper" / "table.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "paper" / "table.md")
    args = p.parse_args(argv)
    if not args.table.is_file():
        p.error(f"{args.table}: no such file (bench/paper.py writes it)")
    rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
    rows = with_read_rates(rescored(rows), labelled())
    text = (f"`python bench/paper_report.py`: {len(rows)} cells of {args.table.name}\n\n" + table(rows)
            + "\nPaired by seed (mean ± SE of the per-seed differences, each seed's sign):\n\n" + paired(rows))
    if any(r.get("pool") == "safety" for r in rows):
        k = min(r["k"] for r in rows if r.get("pool") == "safety")
        text += ("\nThe safety part (a pool whose refusals half cover the attack's harm categories; k = "
                 f"{k}):\n\n" + table(rows, "safety") + "\nPaired by seed:\n\n"
                 + paired(rows, keep=k, pool="safety", others=(("pharmacist-lam0", k), ("random", k))))
    if any(r.get("defense", "").startswith("sft+bds") for r in rows):
        text += ("\nThe bds parts (the tuning-stage defense at the attack; bds-safe0: its weights alone, "
                 "no alignment loss):\n\n" + bds_table(rows))
    points = fig1_points(rows)
    if any(r.get("part") == "fig1" for r in rows) and points:
        text += "\nFig. 1 (SFT, harmful after the attack against k; `fig1.png`):\n\n" + fig1_table(points)
        plot_fig1(points, args.out.with_name("fig1.png"), ylabel="harmful after the attack (%)")
        noise = order_noise(rows)
        if noise:
            text += "\nThe noise between runs (the same rows in other orders, read harmful after, %):\n\n" + noise
    if any(r.get("part") == "strength" for r in rows):
        text += ("\nThe strength part (Random's subset attacked at a weaker and a stronger learning rate than the "
                 f"calibrated {ATTACK['lr']}):\n\n" + strength_table(rows))
    args.out.write_text(text)
    args.out.with_name("cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(text)


if __name__ == "__main__":
    main()
