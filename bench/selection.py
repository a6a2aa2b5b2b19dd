"""Which selector finds the clean refusals of a planted pool, and what it costs.

    python bench/selection.py --data runs/data,runs/data_hw [--bf16] [--align]

Each --data folder (from data/prepare.py; the pool's `category` says which rows are clean
refusals) is ranked by every selector in --runs, all in one process on one model. The table gives
precision@k (the share of clean refusals among the k kept rows), what was kept by kind, the
number of distinct scores, forward/backward passes and seconds. --align also times SFT alignment
(the align stage's loop, --align-epochs epochs) on the whole pool and on each selector's k rows of
the first folder, so "selection + alignment on the subset" can be set against "alignment on the
whole pool". Writes results/select.{md,json} (or --out).
"""
import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import default_weights  # noqa: E402
import flags  # noqa: E402
import model as M  # noqa: E402
import pharmacist as P  # noqa: E402
import train  # noqa: E402
from data.samples import load_jsonl  # noqa: E402
from read_rates import mean_se  # noqa: E402

# name -> SelectConfig overrides; the defaults are pharmacist.SelectConfig's
RUNS = {
    "pharmacist": {},  # the default mode: first_order
    "pharmacist-bilevel": dict(mode="bilevel"),
    "pharmacist-lookahead": dict(mode="bilevel", lookahead=True),
    "seal": dict(selector="seal"),
    "loss": dict(selector="loss"),
    "random": dict(selector="random"),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/data", help="comma list of data folders (data/prepare.py)")
    p.add_argument("--runs", default="pharmacist,pharmacist-bilevel,seal,loss,random",
                   help=f"comma list of {', '.join(RUNS)}; NAME:field=value/field=value adds "
                        "SelectConfig overrides (e.g. pharmacist-bilevel:passes=3/outer_lr=0.5)")
    p.add_argument("--keep", type=float, default=160, help="rows kept (count or fraction)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for selection and alignment")
    p.add_argument("--align", action="store_true", help="also time SFT alignment, whole pool and subsets")
    p.add_argument("--align-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-pass", action="store_true",
                   help="also the precision@k of each scoring pass alone and of the mean of their standardised "
                        "scores (a bilevel run's passes, or first-order checkpoints)")
    p.add_argument("--versus", default="", help="comma list of --runs entries: a summary over the --data folders "
                                                "(each its own pool draw) with every run's paired difference from each")
    p.add_argument("--out", default="results/select")
    return p.parse_args(argv)


def run_spec(spec: str) -> tuple[str, dict]:
    """'pharmacist-bilevel:passes=3/outer_lr=0.5' -> (the same string, its SelectConfig overrides)."""
    name, _, extra = spec.partition(":")
    if name not in RUNS:
        raise SystemExit(f"error: --runs {name!r}: choose from {', '.join(RUNS)}")
    over = dict(RUNS[name])
    fields = {f.name: f for f in dataclasses.fields(P.SelectConfig)}
    for item in filter(None, extra.split("/")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"error: --runs {spec!r}: SelectConfig has no field {key!r}")
        over[key] = flags.flag_type(fields[key])(value)
    return spec, over


def precision_row(pool, scores, k: int, targets: frozenset = frozenset()) -> dict:
    """precision@k (the share of clean refusals among the k kept rows), what was kept by kind and,
    on a pool built with --attack-categories, `targeted`: the share of the kept clean refusals whose
    prompt is of a category the attack targets (0.5 of the pool's refusals are)."""
    kind = np.array([s.category for s in pool])
    _, kept = P.ranking(scores, k)
    row = dict(precision=float((kind[kept] == "refusal").mean()),
               kept={c: int((kind[kept] == c).sum()) for c in sorted(set(kind))})
    if targets:
        clean = kept & (kind == "refusal")
        hit = np.array([s.harm in targets for s in pool])
        row["targeted"] = float(hit[clean].mean()) if clean.any() else float("nan")
    return row


def kind_means(pool, scores) -> dict:
    """The mean standardised score of each planted kind of row: which kinds a scoring pass lifts
    above the pool's mean (> 0) and which it pushes below."""
    kind, z = np.array([s.category for s in pool]), P.standardised(np.asarray(scores, dtype=np.float64))
    return {c: round(float(z[kind == c].mean()), 2) for c in sorted(set(kind))}


DECAYS = (1.0, 0.3, 0.1, 0.03)  # outer_decay values --per-pass reads off one run's passes


def decayed_sum(passes: list[np.ndarray], decay: float) -> np.ndarray:
    """Σ_p decay^p·standardised(h_p): a two-pass bilevel run's own final logits at outer_decay =
    decay (up to the factor outer_lr), since its inner pass trains on the first step's weights only."""
    return sum(decay ** p * P.standardised(h) for p, h in enumerate(passes))


@contextlib.contextmanager
def recorded_passes(on: bool):
    """With `on`, the scores of every pharmacist.score_pass call, in order (the caller's list)."""
    passes, real = [], P.score_pass
    if on:
        def recording(*a, **kw):
            passes.append(real(*a, **kw).copy())
            return passes[-1]
        P.score_pass = recording
    try:
        yield passes
    finally:
        P.score_pass = real


def summary(rows, versus: list[str]) -> str:
    """Over the --data folders (each its own pool draw): every run's precision@k and targeted share
    as mean ± SE, and its paired difference (by folder) from each --versus run."""
    runs = list(dict.fromkeys(r["selector"] for r in rows))
    by = {(r["selector"], r["data"]): r for r in rows}
    folders = list(dict.fromkeys(r["data"] for r in rows))
    keys = [k for k in ("precision", "targeted") if all(k in r for r in rows)]
    head = "| selector | folders | " + " | ".join(f"{k} (mean ± SE)" for k in keys)
    head += "".join(f" | {k} − {v} (paired)" for v in versus for k in keys) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        have = [f for f in folders if (run, f) in by]
        cells = [mean_se([by[run, f][k] for f in have], ".3f") for k in keys]
        for v in versus:
            both = [f for f in have if (v, f) in by]
            cells += [mean_se([by[run, f][k] - by[v, f][k] for f in both], ".3f") if both and run != v else ""
                      for k in keys]
        lines.append(f"| {run} | {len(have)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def time_alignment(model, tok, data, harmful, epochs: int, bf16: bool, seed: int) -> float:
    """Seconds of the align stage's loop (SFT, a fresh LoRA) on `data`; the model comes back clean."""
    cfg = train.Config(resume=False)
    cfg.align = dataclasses.replace(cfg.align, epochs=epochs, bf16=bf16, seed=seed, save_every=10**9)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train.run_training(cfg, cfg.align, model, tok, next(model.parameters()).device, data, harmful,
                           data, Path(tmp))
        seconds = time.perf_counter() - t0
    M.remove_lora(model)
    model.requires_grad_(False)
    return seconds


def main(argv=None):
    args = parse(argv)
    torch.manual_seed(args.seed)
    model, tok = default_weights.load_pretrained(args.model)
    rows, aligned = [], {}
    for folder in args.data.split(","):
        folder = Path(folder)
        pool, validation, harmful = (load_jsonl(folder / f) for f in ("pool.jsonl", "validation.jsonl", "harmful.jsonl"))
        k = P.keep_count(args.keep, len(pool))
        manifest = folder / "manifest.json"
        targets = frozenset(json.loads(manifest.read_text()).get("attack_categories", [])) if manifest.is_file() else frozenset()
        for spec in args.runs.split(","):
            name, over = run_spec(spec)
            cfg = dataclasses.replace(P.SelectConfig(seed=args.seed, bf16=args.bf16, keep=args.keep), **over)
            t0 = time.perf_counter()
            with recorded_passes(args.per_pass) as passes:
                sel = P.select(model, tok, pool, validation, harmful, cfg)
            seconds = time.perf_counter() - t0
            row = dict(data=folder.name, selector=name, k=k, seconds=seconds,
                       forward=sel.stats.get("forward_passes", 0), backward=sel.stats.get("backward_passes", 0),
                       distinct=P.score_stats(sel.scores)["distinct"], config=dataclasses.asdict(cfg),
                       **precision_row(pool, sel.scores, k, targets))
            if passes:
                row["per_pass"] = [precision_row(pool, h, k)["precision"] for h in passes]
                row["per_pass_kinds"] = [kind_means(pool, h) for h in passes]
                row["decayed"] = {str(d): precision_row(pool, decayed_sum(passes, d), k)["precision"] for d in DECAYS}
                row["mean_of_passes"] = row["decayed"]["1.0"]  # the plain sum of the standardised passes
            if args.align and folder == Path(args.data.split(",")[0]):
                if "full" not in aligned:
                    aligned["full"] = time_alignment(model, tok, pool, harmful, args.align_epochs, args.bf16, args.seed)
                _, kept = P.ranking(sel.scores, k)
                subset = [s for s, keep in zip(pool, kept) if keep]
                row["align_subset_s"] = time_alignment(model, tok, subset, harmful, args.align_epochs,
                                                       args.bf16, args.seed)
                row["align_full_s"] = aligned["full"]
            rows.append(row)
            print(json.dumps({k_: v for k_, v in row.items() if k_ != "config"}), flush=True)
            write(rows, Path(args.out), args)
    print(table(rows) + ("\n" + summary(rows, versus_runs(args)) if args.versus else ""))


def versus_runs(args) -> list[str]:
    return [v for v in args.versus.split(",") if v]


def table(rows) -> str:
    timed = any("align_subset_s" in r for r in rows)
    targeted = any("targeted" in r for r in rows)
    head = "| data | selector | precision@k | " + ("targeted share | " if targeted else "")
    head += "kept by kind | distinct scores | fwd / bwd passes | select (s) |"
    head += " align subset (s) | select + align subset vs align full (s) |" if timed else ""
    head += " precision@k of each scoring pass |" if any("per_pass" in r for r in rows) else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        kept = ", ".join(f"{c} {n}" for c, n in r["kept"].items())
        line = (f"| {r['data']} | {r['selector']} | {r['precision']:.3f} | "
                + (f"{r['targeted']:.3f} | " if targeted else "") + f"{kept} | {r['distinct']} | "
                f"{r['forward']} / {r['backward']} | {r['seconds']:.0f} |")
        if timed:
            line += (f" {r['align_subset_s']:.0f} | {r['seconds'] + r['align_subset_s']:.0f} vs "
                     f"{r['align_full_s']:.0f} |" if "align_subset_s" in r else " | |")
        if "per_pass" in r:
            line += f" {' → '.join(f'{x:.3f}' for x in r['per_pass'])}; their mean {r['mean_of_passes']:.3f} |"
        lines.append(line)
    decayed = [r for r in rows if "decayed" in r and len(r["per_pass"]) > 1]
    if decayed:
        lines += ["", "Precision@k of the passes' standardised scores summed with weights outer_decay^p (a two-pass "
                  "bilevel run's own ranking at that outer_decay):", "",
                  "| data | selector | " + " | ".join(f"outer_decay {d}" for d in decayed[0]["decayed"]) + " |",
                  "|" + "---|" * (2 + len(decayed[0]["decayed"]))]
        lines += [f"| {r['data']} | {r['selector']} | " + " | ".join(f"{x:.3f}" for x in r["decayed"].values()) + " |"
                  for r in decayed]
    kinds = [r for r in rows if "per_pass_kinds" in r]
    if kinds:
        names = sorted({c for r in kinds for means in r["per_pass_kinds"] for c in means})
        lines += ["", "Mean standardised score of each kind of row, pass by pass (> 0: the pass ranks the kind above the pool's mean):", "",
                  "| data | selector | pass | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
        for r in kinds:
            for i, means in enumerate(r["per_pass_kinds"]):
                lines.append(f"| {r['data']} | {r['selector']} | {i + 1} | " + " | ".join(f"{means.get(c, 0):+.2f}" for c in names) + " |")
    return "\n".join(lines) + "\n"


def write(rows, out: Path, args):
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/selection.py " + " ".join(sys.argv[1:])
    Path(f"{out}.json").write_text(json.dumps(dict(command=cmd, rows=rows), indent=1) + "\n")
    Path(f"{out}.md").write_text(f"`{cmd}`\n\n" + table(rows) + ("\n" + summary(rows, versus_runs(args)) if args.versus else ""))


if __name__ == "__main__":
    main()
