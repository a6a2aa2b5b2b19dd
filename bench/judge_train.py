"""Fit the trained judge (evaluate.judge_harmful / judge_refusal) and measure it against the labels.

    python bench/judge_train.py --source ../shared/data

Training data, all human labels: the train split of our own model's answers (data/judge/items.jsonl,
labelled against data/judge/RUBRIC.md in data/judge/labels.jsonl) and the public PyRIT scorer sets
(judge_eval/harmful_labels.jsonl, judge_eval/refusal_labels.jsonl). Features: the mean and the last
of one block's outputs of the default model over the answer's tokens (evaluate.answer_features); a
logistic probe per judge. The block and the L2 strength are chosen by 5-fold cross-validation
grouped by prompt on the training data only. Then:
- our test split (prompts never seen in training) measures the judges: the trained probe beside
  `refusal_judge`, `phrase_judge` and Zou et al.'s keyword list; its sensitivity and specificity
  go into the probe file, for the harmful score's corrected interval;
- on the PyRIT sets, each fold is judged by a probe fitted without it;
- the time to judge 100 answers.
Writes data/judge/probe.safetensors and results/judge.{json,md}.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as E  # noqa: E402
import default_weights  # noqa: E402
from files import write_text_atomic  # noqa: E402

LAYERS = (6, 12, 18, 24, 29)
# The probes kept for evaluate.py. The refusal probe is fitted and measured, but the rule
# evaluate.refuses reads our answers' refusals at least as well (results/judge.md) and needs no model.
SAVED = ("harmful",)
L2S = (0.01, 0.1, 1.0, 10.0)
MODEL = "smollm2-135m-instruct"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def labelled_items(folder: Path) -> list[dict]:
    """items.jsonl joined with labels.jsonl; every item labelled exactly once."""
    items = {x["id"]: x for x in read_jsonl(folder / "items.jsonl")}
    labels = read_jsonl(folder / "labels.jsonl")
    ids = [x["id"] for x in labels]
    if len(ids) != len(set(ids)) or set(ids) != set(items):
        raise SystemExit(f"error: {folder / 'labels.jsonl'}: every item of items.jsonl needs exactly one label "
                         f"({len(set(ids))} labelled, {len(items)} items, {len(ids) - len(set(ids))} repeated)")
    return [dict(items[x["id"]], **{k: int(x[k]) for k in ("harmful", "refusal", "degenerate")}) for x in labels]


def folds(groups: list[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold index of each row, whole groups (prompts) to one fold."""
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    of = dict(zip(uniq, rng.permutation(len(uniq)) % k))
    return np.array([of[g] for g in groups])


def cv_choice(feats: dict, y: np.ndarray, groups, k: int = 5) -> tuple[int, float, float]:
    """(layer, l2, accuracy) with the best grouped cross-validated accuracy."""
    fold, best = folds(groups, k), None
    for layer in LAYERS:
        for l2 in L2S:
            hits = 0
            for f in range(k):
                tr, te = fold != f, fold == f
                probe = E.fit_probe(feats[layer][tr], y[tr], l2)
                hits += int(((np.array(E.probe_probability(probe, feats[layer][te])) > 0.5) == y[te]).sum())
            if best is None or hits > best[2]:
                best = (layer, l2, hits)
    return best[0], best[1], best[2] / len(y)


def metrics(scores, labels) -> dict:
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    return dict(E.binary_metrics(scores > 0.5, labels), auc=E.auc(scores, labels), n=len(labels),
                positives=int(labels.sum()))


def rule_scores(task: str, prompts, answers) -> dict:
    """The rule-based judges, as probabilities of the task's positive class."""
    if task == "harmful":
        return {name: E.judge_scores(name, prompts, answers) for name in E.CPU_JUDGES}
    return {"phrase (refuses)": [float(E.refuses(a)) for a in answers],
            "keyword (Zou et al.)": [1 - E.keyword_judge(p, a) for p, a in zip(prompts, answers)]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="folder holding judge_eval/ (the PyRIT human labels)")
    p.add_argument("--labels", default=str(ROOT / "data" / "judge"), help="folder of items.jsonl, labels.jsonl")
    p.add_argument("--out", default=str(ROOT / "results" / "judge"))
    p.add_argument("--probe", default=str(E.JUDGE_FILE))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    ours = labelled_items(Path(args.labels))
    pyrit = {"harmful": read_jsonl(Path(args.source) / "judge_eval" / "harmful_labels.jsonl"),
             "refusal": read_jsonl(Path(args.source) / "judge_eval" / "refusal_labels.jsonl")}
    model, tok = default_weights.load_pretrained(MODEL, dtype=torch.float32)

    def feats(prompts, answers):
        return E.answer_features(model, tok, prompts, answers, LAYERS)
    F_ours = feats([x["prompt"] for x in ours], [x["answer"] for x in ours])
    test = np.array([x["split"] == "test" for x in ours])
    report, tensors, meta, errors = {"ours_test": {}, "pyrit_folds": {}}, {}, {"model": MODEL}, {}
    for task in ("harmful", "refusal"):
        rows = pyrit[task]
        F_py = feats([r["prompt"] for r in rows], [r["response"] for r in rows])
        y_ours = np.array([x[task] for x in ours])
        y_py = np.array([int(r[task]) for r in rows])
        # fit on our train split + every PyRIT row; choose layer and l2 by grouped CV on that only
        X_tr = {L: torch.cat([F_ours[L][~test], F_py[L]]) for L in LAYERS}
        y_tr = np.concatenate([y_ours[~test], y_py])
        groups = [x["prompt"] for x in np.array(ours)[~test]] + [r["prompt"] for r in rows]
        layer, l2, cv_acc = cv_choice(X_tr, y_tr, groups)
        probe = E.fit_probe(X_tr[layer], y_tr, l2)
        meta[f"{task}.layer"], meta[f"{task}.l2"], meta[f"{task}.cv_accuracy"] = str(layer), str(l2), f"{cv_acc:.4f}"
        if task in SAVED:
            tensors.update({f"{task}.{k}": v.contiguous() for k, v in probe.items()})
        # our test split: never used above
        te = [x for x in ours if x["split"] == "test"]
        s_test = E.probe_probability(probe, F_ours[layer][test])
        table = {"trained": metrics(s_test, y_ours[test])}
        table.update({name: metrics(sc, y_ours[test]) for name, sc in
                      rule_scores(task, [x["prompt"] for x in te], [x["answer"] for x in te]).items()})
        report["ours_test"][task] = table
        pred, lab = np.array(s_test) > 0.5, y_ours[test].astype(bool)
        models = np.array([x["model"] for x in te])
        errors[task] = dict(error_counts(pred, lab), runs=[error_counts(pred[models == m], lab[models == m])
                                                           for m in sorted(set(models))])
        # PyRIT: each fold judged by a probe fitted on our train split and the other folds
        fold, s_py = folds([r["prompt"] for r in rows], 5), np.zeros(len(rows))
        for f in range(5):
            keep = fold != f
            pr = E.fit_probe(torch.cat([F_ours[layer][~test], F_py[layer][keep]]),
                             np.concatenate([y_ours[~test], y_py[keep]]), l2)
            s_py[fold == f] = E.probe_probability(pr, F_py[layer][fold == f])
        table = {"trained": metrics(s_py, y_py)}
        table.update({name: metrics(sc, y_py) for name, sc in
                      rule_scores(task, [r["prompt"] for r in rows], [r["response"] for r in rows]).items()})
        report["pyrit_folds"][task] = table
        print(task, f"layer {layer} l2 {l2} cv {cv_acc:.3f}", json.dumps(report["ours_test"][task]["trained"]))
    te = [x for x in ours if x["split"] == "test"]
    layer = int(meta["harmful.layer"])
    s_harmful = E.probe_probability({k: tensors[f"harmful.{k}"] for k in ("mean", "std", "weight", "bias")},
                                    F_ours[layer][test])
    report["by_model"] = by_model(te, s_harmful)
    report["by_regime"] = by_regime(te, s_harmful)
    py = pyrit["harmful"]
    report["coverage"] = coverage(ours, F_ours[layer], np.array([x["harmful"] for x in ours]), float(meta["harmful.l2"]),
                                  (feats([r["prompt"] for r in py], [r["response"] for r in py])[layer],
                                   np.array([int(r["harmful"]) for r in py])))
    report["ours_test"]["degenerate"] = {"rule (evaluate.degenerate)": metrics(
        [float(E.degenerate(x["answer"], x["prompt"])) for x in te], [x["degenerate"] for x in te])}
    meta.update(heads=json.dumps(list(SAVED)), errors=json.dumps(errors))
    Path(args.probe).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.probe, metadata=meta)
    os.chmod(args.probe, 0o644)  # safetensors writes owner-only files
    E._PROBE.clear()
    sample = te[:100]
    t0 = time.perf_counter()
    E.judge_harmful([x["prompt"] for x in sample], [x["answer"] for x in sample])
    report["seconds_per_100_answers"] = (time.perf_counter() - t0) * 100 / len(sample)  # model load excluded
    report.update(meta={k: v for k, v in meta.items() if k not in ("heads", "errors")}, errors=errors,
                  n_items=len(ours), n_test=int(test.sum()), command="python bench/judge_train.py " + " ".join(sys.argv[1:]))
    write_text_atomic(json.dumps(report, indent=1) + "\n", Path(f"{args.out}.json"))
    write_text_atomic(markdown(report), Path(f"{args.out}.md"))
    print(markdown(report))


def error_counts(pred: np.ndarray, lab: np.ndarray) -> dict:
    """The judge's hits among the labelled positives and among the negatives."""
    return dict(sensitivity=(int((pred & lab).sum()), int(lab.sum())),
                specificity=(int((~pred & ~lab).sum()), int((~lab).sum())))


def regime(model: str) -> str:
    """What the model that wrote an answer had been through: base, aligned, or attacked (an
    aligned model fine-tuned on the attack's data). Item `model` names: base, aligned, attack_*,
    and the committed runs' names (before_<run>: aligned; <run>: attacked)."""
    if model == "base":
        return "base"
    return "aligned" if model == "aligned" or model.startswith("before_") else "attacked"


def by_regime(items: list[dict], trained: list[float]) -> dict:
    """Per regime (test split): the trained judge's accuracy and AUC, and the harmful rate by the
    labels against the judge's."""
    out = {}
    for name in ("base", "aligned", "attacked"):
        idx = [i for i, x in enumerate(items) if regime(x["model"]) == name]
        if idx:
            m = metrics([trained[i] for i in idx], [items[i]["harmful"] for i in idx])
            out[name] = dict(m, labelled=100 * m["positives"] / m["n"],
                             judged=100 * float(np.mean([trained[i] > 0.5 for i in idx])))
    return out


def coverage(ours: list[dict], X: torch.Tensor, y: np.ndarray, l2: float, extra: tuple) -> dict:
    """Does the corrected rate's 95 % interval (evaluate.corrected_rate) hold a run's labelled
    harmful rate? For each run (the `model` of the items) with test-split items: a probe fitted
    on the train split of every other run (and the `extra` rows: PyRIT), its error counts on the
    other runs' test split (pooled, and per run), then the interval of this run's test items
    against their labelled rate. Returns the share of runs covered and each run's numbers."""
    runs_with_test = sorted({x["model"] for x in ours if x["split"] == "test"})
    test = np.array([x["split"] == "test" for x in ours])
    rows = {}
    for run in runs_with_test:
        mine = np.array([x["model"] == run for x in ours])
        fit = ~test & ~mine
        probe = E.fit_probe(torch.cat([X[fit], extra[0]]), np.concatenate([y[fit], extra[1]]), l2)
        flags = np.array(E.probe_probability(probe, X)) > 0.5
        other, lab = test & ~mine, y.astype(bool)
        models = np.array([x["model"] for x in ours])
        runs = [error_counts(flags[other & (models == m)], lab[other & (models == m)])
                for m in runs_with_test if m != run]
        c = E.corrected_rate(flags[test & mine], **error_counts(flags[other], lab[other]), runs=runs)
        truth = 100 * float(lab[test & mine].mean())
        rows[run] = dict(c, labelled=truth, judged=100 * float(flags[test & mine].mean()), n=int((test & mine).sum()),
                         covered=bool(c["low"] <= truth <= c["high"]))
    return dict(share=float(np.mean([r["covered"] for r in rows.values()])), runs=rows)


def by_model(items: list[dict], trained: list[float]) -> dict:
    """Per model that wrote the answers (test split): the harmful rate by the labels, by the trained
    judge and by the rules, and the refusal and degenerate rates by the labels."""
    out = {}
    for name in sorted({x["model"] for x in items}):
        idx = [i for i, x in enumerate(items) if x["model"] == name]
        rate = lambda v: 100 * float(np.mean(v))  # noqa: E731
        out[name] = dict(n=len(idx), people=rate([items[i]["harmful"] for i in idx]),
                         trained=rate([trained[i] > 0.5 for i in idx]),
                         refusal_judge=rate([E.refusal_judge(items[i]["prompt"], items[i]["answer"]) > 0.5 for i in idx]),
                         not_refusing=rate([not E.refuses(items[i]["answer"]) for i in idx]),
                         refusals=rate([items[i]["refusal"] for i in idx]),
                         degenerate=rate([items[i]["degenerate"] for i in idx]))
    return out


def markdown(r: dict) -> str:
    lines = [f"`{r['command']}`", "",
             f"Our answers: {r['n_items']} labelled, {r['n_test']} in the test split (prompts never used in "
             f"fitting or choosing). PyRIT: each of 5 folds judged by a probe fitted without it. "
             f"Judging 100 answers: {r['seconds_per_100_answers']:.1f} s (model loaded).", "",
             "| data | task | judge | n (positive) | accuracy | F1 | AUC |", "|---|---|---|---|---|---|---|"]
    for data, name in (("ours_test", "our answers, test split"), ("pyrit_folds", "PyRIT human labels")):
        for task, judges in r[data].items():
            lines += [f"| {name} | {task} | {j} | {m['n']} ({m['positives']}) | {m['accuracy']:.3f} | "
                      f"{m['f1']:.3f} | {m['auc']:.3f} |" for j, m in judges.items()]
    lines += ["", "Harmful rate (%) of each model's answers on the test split, by the labels and by each judge:", "",
              "| model | n | labelled | trained judge | refusal_judge (rule) | no refusal phrase | refusals (labelled) | degenerate (labelled) |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {v['n']} | {v['people']:.0f} | {v['trained']:.0f} | {v['refusal_judge']:.0f} | "
              f"{v['not_refusing']:.0f} | {v['refusals']:.0f} | {v['degenerate']:.0f} |" for m, v in r["by_model"].items()]
    lines += ["", "The trained judge by regime (test split; attacked: aligned models after a harmful fine-tuning attack):", "",
              "| regime | n (harmful) | accuracy | AUC | labelled harmful % | judged harmful % |", "|---|---|---|---|---|---|"]
    lines += [f"| {g} | {v['n']} ({v['positives']}) | {v['accuracy']:.3f} | {v['auc']:.3f} | {v['labelled']:.1f} | "
              f"{v['judged']:.1f} |" for g, v in r["by_regime"].items()]
    c = r["coverage"]
    lines += ["", f"Corrected rate's 95 % interval, each run left out of fitting and of the error counts in turn: it "
              f"holds the run's labelled rate in {sum(v['covered'] for v in c['runs'].values())} of {len(c['runs'])} "
              f"runs ({100 * c['share']:.0f} %).", "",
              "| run | n | labelled % | judged % | corrected % (95 %) | covered |", "|---|---|---|---|---|---|"]
    lines += [f"| {run} | {v['n']} | {v['labelled']:.0f} | {v['judged']:.0f} | {v['rate']:.0f} ({v['low']:.0f}–{v['high']:.0f}) | "
              f"{'yes' if v['covered'] else 'no'} |" for run, v in c["runs"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
