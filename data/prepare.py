"""Build the data files every stage reads, from public sources or from the embedded set.

    python data/prepare.py --source ../shared/data --out runs/data          # CPU-scale sizes
    python data/prepare.py --source embedded --out data/default              # the committed set
    python data/prepare.py --source hub --out runs/data                      # the paper's data (BeaverTails)

Files written to --out (each a JSONL of Samples, see data/samples.py) and who reads them:

    pool.jsonl                 the alignment pool the selector ranks: refusals, low-quality
                               answers, benign pairs and mislabelled compliant rows (`category`)
    validation.jsonl           clean refusals: the selector's validation set
    harmful.jsonl              harmful prompts with harmful answers: selector and defenses
    finetune_{task}.jsonl      n task rows (the attack with p = 0)
    attack_{task}.jsonl        (1-p)·n rows of finetune_{task} + p·n harmful rows, shuffled
    eval_harmful.jsonl         held-out harmful prompts (harmful score), a reference refusal
    eval_harmful_qa.jsonl      held-out harmful prompts with harmful reference answers: the
                               judge-free harmful loss
    retain.jsonl               benign instructions with helpful answers, trained beside every
                               selected subset in the align stage (drawn last, never in a pool);
                               with --retain-answers self the answers are the base model's own
    eval_benign.jsonl          held-out benign instructions (over-refusal)
    eval_{task}.jsonl          task test rows with `label` (accuracy)
    manifest.json              counts, seed, sizes, source files and their sha256

Every split is drawn from rows whose prompt no earlier split has taken (`Draw`), so no prompt
is in two files; the only reuse is by design: attack_{task} holds rows of finetune_{task}, and
the three attack files share the same harmful rows. `check_disjoint` asserts this on the result.
Evaluation sets are drawn first, with their own seed (--eval-seed, default 0), so they depend on
neither the training sizes nor --seed: --seed draws a new pool, subsets and training files, and
every seed is scored on the same prompts. No evaluation prompt is one the trained judge was
fitted on (`judge_prompts`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python data/prepare.py): import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.answers import REFERENCE_REFUSAL, low_quality, refusal
from data.embedded import embedded_sources
from data.samples import Sample, prompt_key, save_jsonl
from files import atomic_dir, content_hash, write_text_atomic
from data.sources import Sources, read_sources

TASKS = ("sst2", "agnews", "gsm8k")
JUDGE_ITEMS = Path(__file__).resolve().parent / "judge" / "items.jsonl"  # the trained judge's labelled answers
HARM_LABELS = Path(__file__).resolve().parent / "categories" / "labels.jsonl"  # each harmful prompt's harm, read
POOL_KINDS = ("refusal", "low_quality", "benign", "mislabelled")
DEFAULT_MIX = {"refusal": 0.4, "low_quality": 0.2, "benign": 0.2, "mislabelled": 0.2}
# Harmful score needs clearly harmful prompts (docs/DESIGN.md): evaluate on AdvBench and HarmBench.
EVAL_HARMFUL_SOURCES = ("advbench", "harmbench", "embedded")
# Do-Not-Answer rows that deserve a plain refusal; its other areas (chatbot interaction,
# misinformation, information hazards) hold many questions a safe model should answer, and
# teaching refusals on them feeds over-refusal.
DONOTANSWER_AREAS = ("malicious_uses", "discrimination_exclusion_toxicity_hateful_offensive")


@dataclass
class Sizes:
    pool_size: int
    validation_size: int
    harmful_size: int
    n: int                      # rows of each finetune_* and attack_* file
    p: float                    # harmful share of the attack
    eval_harmful_size: int
    eval_benign_size: int
    eval_task_size: int
    eval_harmful_qa_size: int = 50  # held-out harmful Q&A rows for the harmful loss
    retain_size: int = 400  # benign rows the align stage trains on beside the selected subset
    pool_mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))


# the CPU reproduction (SmolLM2-135M); the paper's scale is reached with flags (data/README.md)
CPU_SIZES = Sizes(pool_size=400, validation_size=32, harmful_size=64, n=200, p=0.1,
                     eval_harmful_size=100, eval_benign_size=50, eval_task_size=200)
EMBEDDED_SIZES = Sizes(pool_size=48, validation_size=8, harmful_size=16, n=40, p=0.1,
                       eval_harmful_size=16, eval_benign_size=16, eval_task_size=16,
                       eval_harmful_qa_size=8, retain_size=6)


# ----------------------------------------------------------------------------- sizes

def parse_mix(text: str) -> dict:
    """'refusal=0.4,low_quality=0.2,...' -> {kind: share}; kinds left out get 0."""
    mix = dict.fromkeys(POOL_KINDS, 0.0)
    for part in text.split(","):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in POOL_KINDS:
            raise ValueError(f"--pool-mix: {part!r} is not KIND=SHARE with KIND one of "
                             f"{', '.join(POOL_KINDS)}")
        try:
            mix[kind] = float(value)
        except ValueError:
            raise ValueError(f"--pool-mix: share {value!r} of {kind} is not a number") from None
    return mix


def check_sizes(sizes: Sizes) -> None:
    """Every size at least 1, p in [0, 1], the mix non-negative and summing to 1."""
    for name, value in asdict(sizes).items():
        if name not in ("p", "pool_mix") and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (an empty set is "
                             f"useless), got {value}")
    if not 0.0 <= sizes.p <= 1.0:
        raise ValueError(f"--p is the harmful share of the attack and must be in [0, 1], "
                         f"got {sizes.p}")
    if any(v < 0 for v in sizes.pool_mix.values()):
        raise ValueError(f"--pool-mix: shares must be >= 0, got {sizes.pool_mix}")
    if abs(sum(sizes.pool_mix.values()) - 1.0) > 1e-6:
        raise ValueError(f"--pool-mix: shares sum to {sum(sizes.pool_mix.values()):g}; "
                         "make them sum to 1")


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def mix_counts(mix: dict, total: int) -> dict:
    """Split `total` rows by the shares in `mix` (largest remainder, ties in POOL_KINDS order)."""
    exact = {k: mix[k] * total for k in POOL_KINDS}
    counts = {k: math.floor(v) for k, v in exact.items()}
    by_remainder = sorted(POOL_KINDS, key=lambda k: -(exact[k] - counts[k]))
    for k in by_remainder[:total - sum(counts.values())]:
        counts[k] += 1
    return counts


# ----------------------------------------------------------------------------- drawing rows

class Draw:
    """Draws rows for one split at a time, never a prompt an earlier split has taken.

    Each split shuffles its candidates with its own generator, seeded by (seed, split name),
    so a split does not change when another split's size does (only when the rows it could
    take are used first).
    """

    def __init__(self, seed: int, eval_seed: int | None = None):
        self.seed, self.eval_seed = seed, seed if eval_seed is None else eval_seed
        self.used: set[str] = set()

    def __call__(self, split: str, rows: list[Sample], k: int, flag: str,
                 arrange=None, exclude: frozenset = frozenset()) -> list[Sample]:
        """k rows of `rows` in the split's own shuffled order, skipping prompts already taken and
        the prompt keys in `exclude` (skipped, not removed first: excluding a prompt the split would
        not have taken changes nothing)."""
        order = list(rows)
        seed = self.eval_seed if split.startswith("eval_") else self.seed
        random.Random(f"{seed}:{split}").shuffle(order)
        if arrange is not None:  # e.g. like_lengths: reorder the shuffled rows before taking k
            order = arrange(order)
        picked, keys = [], set()
        for row in order:
            if len(picked) == k:
                break
            key = prompt_key(row)
            if key not in self.used and key not in keys and key not in exclude:
                picked.append(row)
                keys.add(key)
        if len(picked) < k:
            raise ValueError(f"{split}: {k} rows needed but only {len(picked)} distinct unused "
                             f"prompts are left in its source; lower {flag} (or the sizes of "
                             "the splits that draw from the same source)")
        self.used |= keys
        return picked


def words(s: Sample) -> int:
    return len(s.prompt.split())


def like_lengths(reference: list[Sample], bins: int = 5):
    """An `arrange` for Draw: the rows interleaved across `bins` prompt-length bins that each hold
    an equal share of `reference`'s prompts, so the first k rows follow the reference's length
    distribution (until a bin runs out; the remaining rows then follow in their shuffled order)."""
    lengths = sorted(words(s) for s in reference)
    edges = [lengths[len(lengths) * i // bins] for i in range(1, bins)]

    def arrange(rows: list[Sample]) -> list[Sample]:
        queues = [[] for _ in range(bins)]
        for s in rows:
            queues[sum(words(s) >= e for e in edges)].append(s)
        out = []
        while any(queues):
            out += [q.pop(0) for q in queues if q]
        return out
    return arrange


def with_ids(rows: list[Sample], name: str, **fields) -> list[Sample]:
    """The rows renamed `name-00000`, `name-00001`, ..., with `fields` set on each."""
    return [replace(r, id=f"{name}-{i:05d}", **fields) for i, r in enumerate(rows)]


def shuffled(rows: list, seed: int, name: str) -> list:
    rows = list(rows)
    random.Random(f"{seed}:{name}:order").shuffle(rows)
    return rows


def answered(rows: list[Sample], write, seed: int, name: str, **fields) -> list[Sample]:
    """Prompt-only rows given a response written by `write(prompt, rng)` (refusal, low_quality)."""
    rng = random.Random(f"{seed}:{name}:answers")
    return [replace(r, response=write(r.prompt, rng), **fields) for r in rows]


# ----------------------------------------------------------------------------- the build

def refusal_prompts(sources: Sources) -> list[Sample]:
    """Harmful prompts to answer with refusals: none of the harmful Q&A prompts (those are kept
    for the rows that need a harmful answer), and Do-Not-Answer only in DONOTANSWER_AREAS."""
    qa_keys = {prompt_key(s) for s in sources.harmful_qa}
    return [s for s in sources.harmful_prompts if prompt_key(s) not in qa_keys
            and (s.source != "donotanswer" or s.category in DONOTANSWER_AREAS)]


def judge_prompts(items: Path | None = None) -> frozenset:
    """The prompt keys the trained judge was fitted on (data/judge/items.jsonl, split "train"):
    no prompt that scores a model may be one of them, or the judge grades answers to prompts it
    learnt on (its error there is smaller than on new prompts)."""
    items = items or JUDGE_ITEMS
    if not items.is_file():
        return frozenset()
    rows = [json.loads(line) for line in items.read_text(encoding="utf-8").splitlines() if line.strip()]
    return frozenset(prompt_key(Sample(id=r["id"], prompt=r["prompt"], response="")) for r in rows
                     if r["split"] == "train")


def harm_key(sample: Sample) -> str:
    """A prompt's key in data/categories/labels.jsonl: the first 16 hex digits of sha256(prompt_key)."""
    return hashlib.sha256(prompt_key(sample).encode()).hexdigest()[:16]


def harm_categories(path: Path | None = None) -> dict[str, str]:
    """{harm_key: category} of every harmful prompt read into a harm category (data/categories)."""
    rows = [json.loads(line) for line in (path or HARM_LABELS).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["key"]: r["category"] for r in rows}


def with_harm(rows: list[Sample], harms: dict[str, str]) -> list[Sample]:
    return [replace(r, harm=harms.get(harm_key(r))) for r in rows]


def targeted(rows: list[Sample], harms: dict[str, str], targets: frozenset, inside: bool = True) -> list[Sample]:
    """The rows whose prompt was read into one of `targets` (inside), or into another category."""
    return [r for r in rows if harm_key(r) in harms and (harms[harm_key(r)] in targets) == inside]


def build_evaluation(sources: Sources, sizes: Sizes, draw: Draw,
                     unseen: frozenset = frozenset()) -> dict[str, list[Sample]]:
    """The evaluation sets, none with a prompt key in `unseen` (the judge's fitting prompts)."""
    files = {}
    for task in TASKS:
        rows = draw(f"eval_{task}", sources.task_test[task], sizes.eval_task_size,
                    "--eval-task-size")
        files[f"eval_{task}"] = with_ids(rows, f"eval_{task}", category=None, is_safe=None)
    rows = draw("eval_benign", sources.benign, sizes.eval_benign_size, "--eval-benign-size",
                exclude=unseen)
    files["eval_benign"] = with_ids(rows, "eval_benign", category=None, is_safe=None)
    candidates = [s for s in refusal_prompts(sources) if s.source in EVAL_HARMFUL_SOURCES]
    rows = draw("eval_harmful", candidates, sizes.eval_harmful_size, "--eval-harmful-size",
                exclude=unseen)
    # the response is only a reference refusal: the harmful score judges the model's answer
    files["eval_harmful"] = with_ids(rows, "eval_harmful", response=REFERENCE_REFUSAL,
                                     category=None, is_safe=None)
    rows = draw("eval_harmful_qa", sources.harmful_qa, sizes.eval_harmful_qa_size,
                "--eval-harmful-qa-size", exclude=unseen)
    files["eval_harmful_qa"] = with_ids(rows, "eval_harmful_qa", category="harmful", is_safe=False)
    return files


def build_training(sources: Sources, sizes: Sizes, draw: Draw, held_out_wording: bool = False,
                   attack_categories: frozenset = frozenset()) -> dict[str, list[Sample]]:
    """The training files. With `attack_categories` (a safety-awareness test): the harmful set and
    the attack's harmful rows come from prompts of those harm categories only, half the pool's
    refusals answer prompts of those categories and half prompts of others, and every row from a
    harmful source carries its `harm`; a selector that reads the harmful set should then prefer
    the first half."""
    seed, files = draw.seed, {}
    harms = harm_categories() if attack_categories else {}
    qa = targeted(sources.harmful_qa, harms, attack_categories) if attack_categories else sources.harmful_qa
    for task in TASKS:
        rows = draw(f"finetune_{task}", sources.task_train[task], sizes.n, "--n")
        files[f"finetune_{task}"] = with_ids(rows, f"finetune_{task}", category=None, is_safe=True)

    # rows with harmful answers: the harmful set, the attack's harmful rows, mislabelled rows
    harmful_kw = dict(category="harmful", is_safe=False)
    files["harmful"] = with_ids(draw("harmful", qa, sizes.harmful_size,
                                     "--harmful-size"), "harmful", **harmful_kw)
    n_harmful = round_half_up(sizes.p * sizes.n)
    attack = with_ids(draw("attack", qa, n_harmful, "--n or --p"), "attack",
                      **harmful_kw)
    for task in TASKS:
        clean = files[f"finetune_{task}"][:sizes.n - n_harmful]
        files[f"attack_{task}"] = shuffled(clean + attack, seed, f"attack_{task}")
    counts = mix_counts(sizes.pool_mix, sizes.pool_size)
    mislabelled = draw("pool_mislabelled", sources.harmful_qa, counts["mislabelled"],
                       "--pool-size or the mislabelled share of --pool-mix")

    # prompt-only rows answered by this project: validation refusals, pool refusals, low quality;
    # held-out wording: the validation set and the pool are written from disjoint templates
    pool_half, validation_half = (0, 1) if held_out_wording else (None, None)
    prompts = refusal_prompts(sources)
    rows = draw("validation", prompts, sizes.validation_size, "--validation-size")
    files["validation"] = with_ids(answered(rows, partial(refusal, half=validation_half), seed,
                                            "validation"), "validation", category="refusal", is_safe=True)
    pool_hint = "--pool-size or the share of that kind in --pool-mix"
    if attack_categories:  # half the refusals on the attack's categories, half on the others
        half = counts["refusal"] // 2
        refusal_rows = (draw("pool_refusal_targeted", targeted(prompts, harms, attack_categories), half, pool_hint)
                        + draw("pool_refusal_other", targeted(prompts, harms, attack_categories, inside=False),
                               counts["refusal"] - half, pool_hint))
    else:
        refusal_rows = draw("pool_refusal", prompts, counts["refusal"], pool_hint)
    pool = (answered(refusal_rows, partial(refusal, half=pool_half), seed, "pool_refusal", category="refusal",
                     is_safe=True)
            + answered(draw("pool_low_quality", prompts, counts["low_quality"], pool_hint),
                       partial(low_quality, half=pool_half), seed, "pool_low_quality",
                       category="low_quality", is_safe=True)
            + [replace(r, category="benign", is_safe=True)
               for r in draw("pool_benign", sources.benign, counts["benign"], pool_hint)]
            + [replace(r, category="mislabelled", is_safe=False) for r in mislabelled])
    if attack_categories:
        pool = with_harm(pool, harms)
        for name in ("harmful", "validation"):
            files[name] = with_harm(files[name], harms)
    files["pool"] = with_ids(shuffled(pool, seed, "pool"), "pool")
    return files


def build(sources: Sources, sizes: Sizes, seed: int, held_out_wording: bool = False,
          retain_like_harmful: bool = False, eval_seed: int = 0,
          attack_categories: frozenset = frozenset()) -> dict[str, list[Sample]]:
    """All files (name -> rows), evaluation sets drawn first, checked for disjointness.
    `retain_like_harmful`: retain prompts drawn to follow the refusal prompts' length
    distribution (short benign questions, which an aligned model otherwise refuses)."""
    check_sizes(sizes)
    draw = Draw(seed, eval_seed)
    files = build_evaluation(sources, sizes, draw, judge_prompts())
    files.update(build_training(sources, sizes, draw, held_out_wording, attack_categories))
    arrange = like_lengths(refusal_prompts(sources)) if retain_like_harmful else None
    rows = draw("retain", sources.benign, sizes.retain_size, "--retain-size", arrange)
    files["retain"] = with_ids(rows, "retain", category="benign", is_safe=True)
    check_disjoint(files)
    return files


def whole_sentences(text: str) -> str:
    """The text up to its last sentence end (. ! ? : before a space, not after a digit as in a
    list's "2. ", or a line break), when that leaves 20 characters or more: an answer cut at a
    token limit then ends where a sentence does."""
    ends = [m.end() for m in re.finditer(r"(?<![\s\d])[.!?:](?=\s|$)|\n", text)]
    return text[:ends[-1]].rstrip() if ends and ends[-1] >= 20 else text.strip()


def self_answers(rows: list[Sample], model_name: str, max_new_tokens: int) -> tuple[list[Sample], int]:
    """The retain rows with the model's own greedy answers (cut to whole sentences), and how
    many kept their reference answer because the model's was empty.

    A retain target the model already holds: its loss is low and grows only where alignment moves
    the model off its own benign behaviour (a sequence-level form of a KL term to the base model),
    so the retain rows pull against over-refusal at the answer's first tokens instead of
    spending the update on another model's style (docs/DESIGN.md, the retain set)."""
    import default_weights
    import fast
    import model as M
    device = M.default_device()
    model, tok = default_weights.load_pretrained(model_name, device=device, dtype=fast.train_dtype(device))
    print(f"retain answers: {len(rows)} prompts, {max_new_tokens} new tokens, by {model_name}")
    answers = M.generate(model, tok, [s.prompt for s in rows], max_new_tokens, batch_size=64,
                         inputs=[s.input for s in rows], progress=True)
    out = [replace(s, response=whole_sentences(a)) if a.strip() else s for s, a in zip(rows, answers)]
    return out, sum(not a.strip() for a in answers)


def check_disjoint(files: dict[str, list[Sample]]) -> None:
    """No prompt in two files (nor twice in one), except the designed reuse: attack_{task} is
    rows of finetune_{task} plus harmful rows shared by the attack files and found nowhere else."""
    owner: dict[str, str] = {}
    for name, rows in files.items():
        if name.startswith("attack_"):
            continue
        for s in rows:
            key = prompt_key(s)
            if key in owner:
                raise ValueError(f"overlap between splits: prompt {s.prompt[:60]!r} is in "
                                 f"{owner[key]} and in {name}; each prompt may be in one file "
                                 "only (rebuild with data/prepare.py, do not edit by hand)")
            owner[key] = name
    for name, rows in files.items():
        if not name.startswith("attack_"):
            continue
        finetune = {s.id: s for s in files[name.replace("attack_", "finetune_")]}
        seen = set()
        for s in rows:
            key = prompt_key(s)
            if key in seen:
                raise ValueError(f"{name}: prompt {s.prompt[:60]!r} appears twice")
            seen.add(key)
            if s.category == "harmful" and key in owner:
                raise ValueError(f"overlap between splits: the harmful attack row {s.id} of {name}"
                                 f" has a prompt also in {owner[key]}")
            if s.category != "harmful" and finetune.get(s.id) != s:
                raise ValueError(f"{name}: task row {s.id} is not a row of "
                                 f"{name.replace('attack_', 'finetune_')}")


# ----------------------------------------------------------------------------- writing

def manifest(files: dict[str, list[Sample]], sources: Sources, source: str, sizes: Sizes,
             seed: int, held_out_wording: bool = False, retain_like_harmful: bool = False,
             retain_answers: dict | None = None, eval_seed: int = 0,
             attack_categories: frozenset = frozenset()) -> dict:
    pool_counts = {k: sum(s.category == k for s in files["pool"]) for k in POOL_KINDS}
    return {"source": source, "seed": seed, "eval_seed": eval_seed, "sizes": asdict(sizes),
            **({"held_out_wording": True} if held_out_wording else {}),  # default builds: unchanged bytes
            **({"retain_like_harmful": True} if retain_like_harmful else {}),
            **({"retain_answers": retain_answers} if retain_answers else {}),
            **({"attack_categories": sorted(attack_categories)} if attack_categories else {}),
            "counts": {f"{name}.jsonl": len(rows) for name, rows in files.items()},
            "pool_counts": pool_counts, "source_files": sources.files}


def write(files: dict[str, list[Sample]], info: dict, out: Path) -> dict:
    """The files and the manifest (with each file's hash, which train.py checks) into a new folder
    beside `out` that then takes its place: a build stopped at any point leaves the old folder or
    the new one, never files of both. A folder that is not an earlier build is not replaced."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "manifest.json").is_file())):
        raise ValueError(f"--out {out}: not a data folder (a file, or a folder with other files and no "
                         "manifest.json); choose a new or an empty folder")
    with atomic_dir(out) as tmp:
        for name, rows in files.items():
            save_jsonl(rows, tmp / f"{name}.jsonl")
        info = dict(info, files={f"{name}.jsonl": content_hash(tmp / f"{name}.jsonl") for name in files})
        write_text_atomic(json.dumps(info, indent=2, ensure_ascii=False) + "\n", tmp / "manifest.json")
    return info


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", required=True,
                    help="a folder laid out like ../shared/data, 'embedded' for the built-in set, or 'hub' "
                         "for the paper's data from the Hugging Face Hub (data/hub.py; needs huggingface_hub, "
                         "pyarrow and a network)")
    ap.add_argument("--hub-dir", type=Path, default=None,
                    help="with --source hub: where the converted hub files are kept and reused "
                         "(default: $PHARMACIST_CACHE/hub-data, else ~/.cache/pharmacist/hub-data)")
    ap.add_argument("--out", required=True, type=Path, help="folder to write the files into")
    ap.add_argument("--seed", type=int, default=0, help="draws the pool, the training files and the retain rows")
    ap.add_argument("--eval-seed", type=int, default=0,
                    help="draws the evaluation sets (the same for every --seed, so seeds are scored alike)")
    ap.add_argument("--pool-size", type=int, help="rows in pool.jsonl")
    ap.add_argument("--pool-mix", type=parse_mix,
                    help="shares of the pool's kinds, e.g. "
                         "refusal=0.4,low_quality=0.2,benign=0.2,mislabelled=0.2")
    ap.add_argument("--validation-size", type=int)
    ap.add_argument("--harmful-size", type=int)
    ap.add_argument("--n", type=int, help="rows in each finetune_* and attack_* file")
    ap.add_argument("--p", type=float, help="harmful share of the attack files, in [0, 1]")
    ap.add_argument("--eval-harmful-size", type=int)
    ap.add_argument("--eval-benign-size", type=int)
    ap.add_argument("--eval-task-size", type=int, help="rows in each eval_{task} file")
    ap.add_argument("--eval-harmful-qa-size", type=int, help="rows in eval_harmful_qa.jsonl (harmful loss)")
    ap.add_argument("--retain-size", type=int, help="rows in retain.jsonl (benign rows of the align stage)")
    ap.add_argument("--held-out-wording", action="store_true",
                    help="write the validation refusals and the pool's from disjoint templates "
                         "(data/answers.py HALVES), so no selector can match them by wording")
    ap.add_argument("--retain-like-harmful", action="store_true",
                    help="draw retain.jsonl's prompts to follow the length distribution of the "
                         "harmful prompts the pool refuses, so short benign questions are in it")
    ap.add_argument("--attack-categories", default="",
                    help="a safety-awareness test: a comma list of harm categories (data/categories/RUBRIC.md); "
                         "the harmful set and the attack's harmful rows come from them, half the pool's "
                         "refusals from them and half from the others")
    ap.add_argument("--retain-answers", choices=("reference", "self"), default="reference",
                    help="retain.jsonl's answers: the source's reference answers, or self: the greedy "
                         "answers of --retain-model, the model the align stage will train")
    ap.add_argument("--retain-model", default="smollm2-135m-instruct",
                    help="with --retain-answers self: the model that answers (a default_weights name "
                         "or an HF folder)")
    ap.add_argument("--retain-tokens", type=int, default=64,
                    help="with --retain-answers self: new tokens per answer, cut back to whole sentences")
    return ap.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    """The source's default sizes, with every flag given on the command line applied."""
    base = EMBEDDED_SIZES if args.source == "embedded" else CPU_SIZES
    given = {k: getattr(args, k) for k in asdict(base) if getattr(args, k) is not None}
    return replace(base, **given)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = sizes_from(args)
    targets = frozenset(filter(None, args.attack_categories.split(",")))
    known = set(harm_categories().values()) if targets else set()
    if targets - known:
        sys.exit(f"error: --attack-categories {','.join(sorted(targets - known))}: not a harm category "
                 f"(choose from {', '.join(sorted(known))})")
    if args.source == "hub":  # the paper's data from the Hugging Face Hub, converted once (data/hub.py)
        from data import hub
        from default_weights import cache_dir
        sources = read_sources(hub.fetch(args.hub_dir or cache_dir() / "hub-data"))
    else:
        sources = embedded_sources() if args.source == "embedded" else read_sources(args.source)
    files = build(sources, sizes, args.seed, args.held_out_wording, args.retain_like_harmful, args.eval_seed,
                  targets)
    answers = None
    if args.retain_answers == "self":
        files["retain"], kept = self_answers(files["retain"], args.retain_model, args.retain_tokens)
        answers = {"by": args.retain_model, "max_new_tokens": args.retain_tokens, "kept_reference": kept}
    info = manifest(files, sources, args.source, sizes, args.seed, args.held_out_wording,
                    args.retain_like_harmful, answers, args.eval_seed, targets)
    info = write(files, info, args.out)
    for name, count in info["counts"].items():
        print(f"{count:6d}  {args.out / name}")
    print(f"pool: {info['pool_counts']}")
    return info


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"prepare.py: error: {e}")
