"""The items of the judge's labelled set: our own model's answers to harmful prompts.

    python bench/judge_set.py --data runs/data --source ../shared/data --work runs/judge_set

Builds four SmolLM2-135M models with the pipeline itself (train.py): the base model, the model
SFT-aligned on the whole pool, and that model after the harmful fine-tuning attack at two
learning rates (one that removes nearly every refusal, one that keeps some). Each answers the
same harmful prompts greedily (the evaluation's settings): the 100 prompts of eval_harmful.jsonl
and --extra more AdvBench/HarmBench prompts that no data file uses. The answers are written,
unlabelled and shuffled, to data/judge/items.jsonl, with a split by prompt (train/test); people
label them against data/judge/RUBRIC.md (labels.jsonl). Labels are never computed.

    python bench/judge_set.py --from-runs 'results/small/own_500/runs/[!b]*' --count 600 \
        --first-id 600 --out runs/judge_more.jsonl

draws more items from committed runs instead (their generations.jsonl, harmful prompts only):
`count` distinct (prompt, answer) pairs, no pair already in data/judge/items.jsonl, split by
prompt as above, numbered from --first-id; `model` names the run that wrote the answer.

    python bench/judge_set.py --answer-runs 'runs/paper/s0/[!b]*' --first-id 2543 --out runs/fit.jsonl

has the attacked models of those run folders answer the judge's fitting prompts (the prompts of
its train split, which no evaluation set holds): train-split items written where the models the
judge scores are, so it can be fitted at its operating point without seeing an evaluation prompt.

    python bench/judge_set.py --borderline 120 --data runs/paper/s0/data --source ../shared/data \
        --first-id 3362 --out runs/borderline.jsonl

has the base model answer 120 Do-Not-Answer prompts (borderline requests: many are answered
harmlessly) that no file of the --data folders and no item holds, split by prompt as above.
"""
import argparse
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import default_weights  # noqa: E402
import evaluate as E  # noqa: E402
import hf  # noqa: E402
import model as M  # noqa: E402
from data.samples import Sample, load_jsonl, prompt_key  # noqa: E402
from files import write_text_atomic  # noqa: E402
from data.sources import read_harmful_prompts  # noqa: E402
sys.path.insert(0, str(ROOT / "bench"))
from read_rates import run_name  # noqa: E402  (<run>, or <run>_s<seed> in bench/paper.py's layout)

PY = sys.executable
TRAIN = ["--align-epochs", "2", "--align-bf16", "--finetune-epochs", "2", "--finetune-bf16"]
ATTACK_LRS = ("5e-4", "1e-4")


def sh(args):
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


def models(data: Path, work: Path) -> dict[str, tuple[str, str | None]]:
    """name -> (model folder or built-in name, attack adapter or None), trained if missing."""
    base = work / f"attack_{ATTACK_LRS[0]}"  # its align stage is every attack's aligned model
    sh([PY, "train.py", "--stage", "align", "--out", str(base), "--data", str(data), *TRAIN])
    out = {"base": ("smollm2-135m-instruct", None), "aligned": (str(base / "align" / "model"), None)}
    for lr in ATTACK_LRS:
        run = work / f"attack_{lr}"
        if run != base and not (run / "align").exists():
            run.mkdir(parents=True, exist_ok=True)
            (run / "align").symlink_to((base / "align").resolve())
        sh([PY, "train.py", "--stage", "finetune", "--out", str(run), "--data", str(data),
            "--finetune-lr", lr, *TRAIN])
        out[f"attack_{lr}"] = (str(base / "align" / "model"), str(run / "finetune" / "adapter"))
    return out


def prompts(data: Path, source: Path, extra: int, seed: int) -> list[tuple[str, str]]:
    """(prompt id, prompt): eval_harmful's, then `extra` AdvBench/HarmBench prompts no data file holds."""
    used = {prompt_key(s) for f in sorted(data.glob("*.jsonl")) for s in load_jsonl(f)}
    rows = [(s.id, s.prompt) for s in load_jsonl(data / "eval_harmful.jsonl")]
    spare = [s for name in ("advbench", "harmbench")
             for s in read_harmful_prompts(source / "harmful_prompts" / f"{name}.jsonl")
             if prompt_key(s) not in used]
    random.Random(seed).shuffle(spare)
    return rows + [(f"extra-{i:03d}", s.prompt) for i, s in enumerate(spare[:extra])]


def split(prompt: str, test_share: float) -> str:
    """By prompt, stable: every answer to one prompt lands in the same split."""
    h = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 16 ** 8
    return "test" if h < test_share else "train"


def from_runs(pattern: str, count: int, first_id: int, test_share: float, seed: int,
              only_split: str | None = None) -> list[dict]:
    """`count` distinct (prompt, answer) pairs to harmful prompts from the generations of the run
    folders matching `pattern`, none already an item, shuffled by `seed`, ids from first_id;
    `only_split` puts every item in that split (answers to evaluation prompts: "test", so the
    judge never fits on a prompt that scores a model)."""
    known = {(x["prompt"], x["answer"]) for x in map(json.loads, open(ROOT / "data/judge/items.jsonl"))}
    pairs = {}
    for run in sorted(ROOT.glob(pattern)):
        model = run_name(run)
        for g in map(json.loads, open(run / "generations.jsonl")):
            if g["set"] == "harmful" and (g["prompt"], g["answer"]) not in known:
                pairs.setdefault((g["prompt"], g["answer"]), (run.name, dict(
                    prompt_id=g["id"], prompt=g["prompt"], answer=g["answer"], model=model)))
    items = [x for _, x in sorted(pairs.values(), key=lambda p: (p[0], p[1]["prompt_id"]))]
    random.Random(seed).shuffle(items)
    if len(items) < count:
        raise SystemExit(f"--from-runs: {len(items)} new distinct answers, fewer than --count {count}")
    return [dict(id=f"j{first_id + i:04d}", **x, split=only_split or split(x["prompt"], test_share))
            for i, x in enumerate(items[:count])]


def answer(path: str, adapter, prompts: list[str], max_new_tokens: int, cfg: E.EvalConfig = E.EvalConfig()) -> list[str]:
    """The model at `path` (with the LoRA `adapter`, if any) answering greedily, run as the
    evaluation runs it (evaluate.inference_model: merged, bf16 where the device has bf16 units and
    cfg.bf16, packed), so that an item is the answer an evaluation of that model would have judged."""
    model, tok = default_weights.load_pretrained(path)
    if adapter:
        hf.load_lora(model, adapter)
    return M.generate(E.inference_model(model, cfg), tok, prompts, max_new_tokens, batch_size=cfg.batch_size, progress=True)


def fitting_prompts(items_file: Path = ROOT / "data/judge/items.jsonl") -> list[tuple[str, str]]:
    """(prompt id, prompt) of every prompt in the judge's train split, once each, in item order: the
    prompts the judge may fit on (no evaluation set holds one: data/prepare.py skips them)."""
    seen: dict[str, str] = {}
    for x in map(json.loads, items_file.read_text().splitlines()):
        if x["split"] == "train":
            seen.setdefault(x["prompt"], x["prompt_id"])
    return [(pid, q) for q, pid in seen.items()]


def answers_of_runs(pattern: str, first_id: int, max_new_tokens: int, seed: int) -> list[dict]:
    """The attacked model of every run folder matching `pattern` (align/model with the attack's
    finetune/adapter) answering the judge's fitting prompts: new train-split items at the
    operating point, distinct and not already items, shuffled by `seed`, ids from first_id."""
    known = {(x["prompt"], x["answer"]) for x in map(json.loads, open(ROOT / "data/judge/items.jsonl"))}
    asked, pairs = fitting_prompts(), {}
    runs = [r for r in sorted(ROOT.glob(pattern)) if (r / "finetune" / "adapter").is_dir()]
    if not runs:
        raise SystemExit(f"--answer-runs {pattern}: no run folder with align/model and finetune/adapter")
    for run in runs:
        name = run_name(run)
        answers = answer(str(run / "align" / "model"), run / "finetune" / "adapter", [q for _, q in asked], max_new_tokens)
        for (pid, q), a in zip(asked, answers):
            if (q, a) not in known:
                pairs.setdefault((q, a), dict(prompt_id=pid, prompt=q, answer=a, model=name, split="train"))
    items = list(pairs.values())
    random.Random(seed).shuffle(items)
    return [dict(id=f"j{first_id + i:04d}", **x) for i, x in enumerate(items)]


def borderline(folders: list[Path], source: Path, count: int, first_id: int, max_new_tokens: int,
               test_share: float, seed: int) -> list[dict]:
    """The base model answering `count` Do-Not-Answer prompts that no data file of `folders` and
    no item holds (shuffled by `seed`), split by prompt, ids from first_id."""
    used = {prompt_key(s) for d in folders for f in sorted(d.glob("*.jsonl")) for s in load_jsonl(f)}
    used |= {prompt_key(Sample(id="", prompt=x["prompt"], response=""))
             for x in map(json.loads, open(ROOT / "data/judge/items.jsonl"))}
    rows = [s for s in read_harmful_prompts(source / "harmful_prompts" / "donotanswer.jsonl") if prompt_key(s) not in used]
    random.Random(seed).shuffle(rows)
    if len(rows) < count:
        raise SystemExit(f"--borderline: {len(rows)} unused Do-Not-Answer prompts, fewer than {count}")
    rows = rows[:count]
    answers = answer("smollm2-135m-instruct", None, [s.prompt for s in rows], max_new_tokens)
    return [dict(id=f"j{first_id + i:04d}", prompt_id=s.id, prompt=s.prompt, answer=a, model="base-donotanswer",
                 split=split(s.prompt, test_share)) for i, (s, a) in enumerate(zip(rows, answers))]


def write_items(items: list[dict], out) -> list[dict]:
    """The items, one JSON line each, to `out` (unlabelled: labels.jsonl is written by reading them)."""
    write_text_atomic("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items), Path(out))
    print(f"{len(items)} items ({sum(x['split'] == 'test' for x in items)} test) -> {out}")
    return items


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/data", help="folder from data/prepare.py (--borderline: a comma list)")
    p.add_argument("--source", default=None, help="folder laid out like the public data (harmful_prompts/); needed unless --from-runs")
    p.add_argument("--work", default="runs/judge_set", help="where the models are trained")
    p.add_argument("--extra", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--test-share", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="data/judge/items.jsonl")
    p.add_argument("--from-runs", default=None, help="a glob of run folders (relative to the repository) "
                   "whose generations.jsonl give the items, instead of training models")
    p.add_argument("--count", type=int, default=600, help="with --from-runs: items to draw")
    p.add_argument("--first-id", type=int, default=0, help="with --from-runs: the first item's number")
    p.add_argument("--answer-runs", default=None, help="a glob of run folders whose attacked models "
                   "(align/model + finetune/adapter) answer the judge's fitting prompts: train-split items")
    p.add_argument("--split", choices=("train", "test"), default=None,
                   help="with --from-runs: every item in this split (test for answers to evaluation prompts)")
    p.add_argument("--borderline", type=int, default=0, help="items: the base model's answers to this many "
                   "unused Do-Not-Answer prompts (needs --source)")
    args = p.parse_args(argv)
    if args.borderline:
        if args.source is None:
            p.error("--borderline needs --source (harmful_prompts/donotanswer.jsonl)")
        return write_items(borderline([Path(d) for d in args.data.split(",")], Path(args.source), args.borderline,
                                      args.first_id, args.max_new_tokens, args.test_share, args.seed), args.out)
    if args.answer_runs:
        return write_items(answers_of_runs(args.answer_runs, args.first_id, args.max_new_tokens, args.seed), args.out)
    if args.from_runs:
        return write_items(from_runs(args.from_runs, args.count, args.first_id, args.test_share, args.seed, args.split),
                           args.out)
    if args.source is None:
        p.error("--source is required (unless --from-runs)")
    data, work = Path(args.data), Path(args.work)
    asked = prompts(data, Path(args.source), args.extra, args.seed)
    items = []
    for name, (path, adapter) in models(data, work).items():
        answers = answer(path, adapter, [q for _, q in asked], args.max_new_tokens)
        items += [dict(prompt_id=pid, prompt=q, answer=a, model=name, split=split(q, args.test_share))
                  for (pid, q), a in zip(asked, answers)]
    random.Random(args.seed).shuffle(items)  # labellers read id, prompt and answer only, in this order
    for i, item in enumerate(items):
        item["id"] = f"j{i:04d}"
    write_items([dict(id=x.pop("id"), **x) for x in items], args.out)


if __name__ == "__main__":
    main()
