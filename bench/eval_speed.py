"""The evaluation's cost and its numbers: the reference settings against the defaults, same model.

    python bench/eval_speed.py --runs runs/v2/random_sft_k160,smollm2-135m-instruct --data runs/data

Each model (a train.py run folder: its aligned model plus the attack's adapter when there is one;
or a model folder or built-in name) is evaluated twice in this process on the same prompts:
`reference` = fp32 weights, batches of 16, SST-2 by generating up to 16 tokens (the settings
before the likelihood classifier and bf16 inference); `default` = EvalConfig's defaults (bf16
weights where the CPU has bf16 units, batches of up to 64 rows and 4096 prompt tokens, SST-2 by
the labels' likelihood). The table sets the two evaluations' seconds and numbers side by side,
and the share of SST-2 rows on which the generated answer and the likeliest label agree.
Writes results/eval_speed.{md,json} (or --out) and each evaluation's generations under --work.
`--rescored` evaluates nothing: after `python evaluate.py rescore results/eval_speed` it writes the
tables again with the judged numbers of the committed evaluations, the times as they were.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as E  # noqa: E402
import hf  # noqa: E402
import default_weights  # noqa: E402
from files import write_text_atomic  # noqa: E402

SETTINGS = {"reference": dict(batch_size=16, classify="generate", bf16=False), "default": {}}


def load(spec: str):
    """A run folder (align/model + finetune/adapter) or a model folder / built-in name."""
    run = Path(spec)
    if (run / "align" / "model").is_dir():
        model, tok = hf.load_pretrained(run / "align" / "model")
        if (run / "finetune" / "adapter").is_dir():
            hf.load_lora(model, run / "finetune" / "adapter")
        return model, tok
    return default_weights.load_pretrained(spec)


def label_of(answer: str, labels) -> str | None:
    """The label a generated answer gives: the first label word in it (None if none)."""
    found = [(answer.lower().find(w.lower()), w) for w in labels if w.lower() in answer.lower()]
    return min(found)[1] if found else None


def agreement(reference: Path, default: Path, task: str = "sst2") -> float:
    read = lambda p: {r["id"]: r["answer"] for r in map(json.loads, (p / "generations.jsonl").read_text().splitlines())
                      if r["set"] == task}
    gen, lik = read(reference), read(default)
    return 100 * sum(label_of(gen[i], E.LABELS[task]) == lik[i] for i in lik) / len(lik)


def judged(r: dict) -> dict:
    """The numbers an evaluation's results.json gives a row (what `evaluate.py rescore` can change)."""
    return dict(harmful_score=r.get("harmful_score"), refusal=r.get("outcomes", {}).get("refusal"),
                degenerate=r.get("outcomes", {}).get("degenerate"), over_refusal=r.get("over_refusal"),
                sst2=r.get("accuracy", {}).get("sst2"), harmful_loss=r.get("harmful_loss"))


def rescored(rows: list[dict], results: Path) -> list[dict]:
    """The rows of an earlier call with the numbers of their committed evaluations, results/<model
    name>/<setting>/results.json, as `evaluate.py rescore results/eval_speed` left them; times kept."""
    return [dict(r, **judged(json.loads((results / Path(r["model"]).name / r["setting"] / "results.json").read_text())))
            for r in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="", help="comma list of run folders or models")
    p.add_argument("--data", default="runs/data")
    p.add_argument("--tasks", default="harmful,harmful_qa,benign,sst2")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--work", default="runs/eval_speed", help="where each evaluation writes its generations")
    p.add_argument("--out", default="results/eval_speed")
    p.add_argument("--rescored", action="store_true", help="evaluate nothing: the tables of the last call (--out "
                   ".json) again with the numbers of its committed evaluations (--out/<model>/<setting>/results.json)")
    args = p.parse_args(argv)
    if not args.runs and not args.rescored:
        p.error("--runs is required (or --rescored)")
    rows = rescored(json.loads(Path(args.out + ".json").read_text()), Path(args.out)) if args.rescored else []
    for spec in [] if args.rescored else args.runs.split(","):
        for setting, overrides in SETTINGS.items():
            cfg = E.EvalConfig(max_new_tokens=args.max_new_tokens, limit=args.limit, tasks=args.tasks, **overrides)
            model, tok = load(spec)
            out = Path(args.work) / Path(spec).name / setting
            r = E.run_eval(model, tok, args.data, out, cfg)
            rows.append(dict(model=spec, setting=setting, eval_time_s=r["eval_time_s"], **judged(r),
                             config=dataclasses.asdict(cfg)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "config"}), flush=True)
        if "sst2" in args.tasks:
            rows[-1]["sst2_agreement"] = agreement(out.parent / "reference", out)
    lines = ["| model | setting | eval s | harmful (trained judge) % | refusal % | degenerate % | over-refusal % "
             "| SST-2 % | harmful loss | SST-2 rows where generation = likeliest label |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f=".1f": "–" if v is None else format(v, f)
    for r in rows:
        lines.append(f"| {r['model']} | {r['setting']} | {r['eval_time_s']:.0f} | {fmt(r['harmful_score'])} | "
                     f"{fmt(r['refusal'])} | {fmt(r['degenerate'])} | {fmt(r['over_refusal'])} | {fmt(r['sst2'])} | "
                     f"{fmt(r['harmful_loss'], '.3f')} | {fmt(r.get('sst2_agreement'))} |")
    text = "\n".join(lines) + (f"\n\nData {args.data}, first {args.limit} rows of each set ({args.tasks}), "
                               f"{args.max_new_tokens} new tokens. reference: {SETTINGS['reference']}; "
                               "default: EvalConfig's defaults.\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(text, Path(args.out + ".md"))
    write_text_atomic(json.dumps(rows, indent=2) + "\n", Path(args.out + ".json"))
    print(text)


if __name__ == "__main__":
    main()
