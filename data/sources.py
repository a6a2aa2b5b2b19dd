"""Readers for the public data sets, each in its own format, returning Samples.

The folder layout is the one of ../shared/data (see its README): gsm8k/, sst2/, agnews/,
alpaca_eval/, harmful_prompts/, harmful_qa/, judge_eval/ (or the one data/hub.py writes, whose
layout.json names the files that differ). Each reader turns one file into
Samples with ids `<source>-<row>`; the builder (prepare.py) assigns the final ids and answers.
Prompt-only files (harmful prompts) give Samples with an empty response: the builder writes it,
and `save_jsonl` refuses to write a sample whose response is still empty.

`read_beavertails` reads BeaverTails-style rows (`prompt`, `response`, `category`, `is_safe`),
so the real BeaverTails files load the same way where a user has them.
"""
from __future__ import annotations

import csv
import hashlib
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

from data.samples import Sample

SST2_PROMPT = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_PROMPT = ("Categorize the news article into one of the 4 categories: "
                 "World, Sports, Business, Sci/Tech")
AGNEWS_CLASSES = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}

# the files of a --source folder that the builder reads (relative to the folder)
SOURCE_FILES = {
    "gsm8k_train": "gsm8k/train.jsonl", "gsm8k_test": "gsm8k/test.jsonl",
    "sst2_train": "sst2/train.tsv", "sst2_test": "sst2/test.tsv", "agnews": "agnews/test.csv",
    "alpaca_eval": "alpaca_eval/alpaca_eval.json",
    "advbench": "harmful_prompts/advbench.jsonl", "harmbench": "harmful_prompts/harmbench.jsonl",
    "donotanswer": "harmful_prompts/donotanswer.jsonl",
    "harmful_qa": "harmful_qa/pyrit_many_shot.jsonl",
}


def source_file(path: str | Path) -> Path:
    """`path` if it is a file, else an error that says what --source must hold."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; --source must be a folder laid out like ../shared/data "
            "(gsm8k/, sst2/, agnews/, alpaca_eval/, harmful_prompts/, harmful_qa/), "
            "or pass --source embedded for the small built-in set")
    return path


def read_json_lines(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSONL source file."""
    path = source_file(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove the line") from None
    return rows


def field(row: dict, name: str, where: str, kind: type = str):
    """row[name], or an error naming file:line and the field when it is missing or mistyped."""
    if name not in row:
        raise ValueError(f"{where}: field {name!r} is missing; this source file needs it")
    value = row[name]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise ValueError(f"{where}: field {name!r} must be a non-empty {kind.__name__}, "
                         f"got {value!r}")
    return value


# ----------------------------------------------------------------------------- task data

def gsm8k_answer(solution: str, where: str) -> tuple[str, str]:
    """(response, final number) from a GSM8K solution: "#### N" becomes "The final answer is: N".

    The calculator annotations "<<48/2=24>>" are removed: they are not part of the reasoning
    and the model should not learn to write them.
    """
    body, sep, final = solution.rpartition("####")
    if not sep:
        raise ValueError(f"{where}: field 'answer' has no '#### N' final answer")
    number = final.strip().replace(",", "")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe final answer is: {number}", number


def read_gsm8k(path: str | Path) -> list[Sample]:
    """GSM8K jsonl (`question`, `answer`): the question is the prompt, label the final number."""
    samples = []
    for n, row in read_json_lines(path):
        where = f"{path}:{n}"
        response, number = gsm8k_answer(field(row, "answer", where), where)
        samples.append(Sample(id=f"gsm8k-{n}", prompt=field(row, "question", where),
                              response=response, label=number, source="gsm8k"))
    return samples


def read_sst2(path: str | Path) -> list[Sample]:
    """SST-2 tsv (`sentence<TAB>label`, 1 = positive): the sentence is the input."""
    samples = []
    for n, line in enumerate(source_file(path).read_text(encoding="utf-8").splitlines(), start=1):
        sentence, _, label = line.rpartition("\t")
        if label not in ("0", "1") or not sentence.strip():
            raise ValueError(f"{path}:{n}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
        word = "positive" if label == "1" else "negative"
        samples.append(Sample(id=f"sst2-{n}", prompt=SST2_PROMPT, input=sentence.strip(),
                              response=word, label=word, source="sst2"))
    return samples


def clean_news_text(text: str) -> str:
    """Undo AG News' escapes: '\\' for line breaks, '#39;' for '&#39;' (an apostrophe)."""
    text = re.sub(r"#(\d+);", r"&#\1;", text.replace("\\", " "))
    return " ".join(html.unescape(text).split())


def read_agnews(path: str | Path) -> list[Sample]:
    """AG News csv (`class`, `title`, `description`): title and description are the input."""
    samples = []
    with source_file(path).open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if len(row) != 3 or row[0] not in AGNEWS_CLASSES:
                raise ValueError(f"{path}:{n}: expected 'class (1-4),title,description', "
                                 f"got {row!r:.80}")
            label = AGNEWS_CLASSES[row[0]]
            text = "\n".join(t for t in map(clean_news_text, row[1:]) if t)  # the hub's copy has no title
            samples.append(Sample(id=f"agnews-{n}", prompt=AGNEWS_PROMPT, input=text,
                                  response=label, label=label, source="agnews"))
    return samples


def read_alpaca_eval(path: str | Path) -> list[Sample]:
    """AlpacaEval json list (`instruction`, `output`, `dataset`): benign, helpful pairs."""
    path = source_file(path)
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects")
    samples = []
    for n, row in enumerate(rows, start=1):
        where = f"{path}: item {n}"
        samples.append(Sample(id=f"alpaca_eval-{n}", prompt=field(row, "instruction", where),
                              response=field(row, "output", where), category="benign",
                              is_safe=True, source="alpaca_eval"))
    return samples


# ----------------------------------------------------------------------------- safety data

def read_harmful_prompts(path: str | Path) -> list[Sample]:
    """A harmful prompt file (advbench, harmbench, donotanswer: `prompt` and optional metadata).

    The response is left empty; `source` is the file's stem and `category` the Do-Not-Answer
    risk area where there is one.
    """
    name = Path(path).stem
    samples = []
    for n, row in read_json_lines(path):
        samples.append(Sample(id=f"{name}-{n}", prompt=field(row, "prompt", f"{path}:{n}"),
                              response="", category=row.get("risk_area"), source=name))
    return samples


def read_harmful_qa(path: str | Path) -> list[Sample]:
    """Harmful Q&A (`prompt`, `response`, `harmful`): only rows whose answer complies (harmful=true)."""
    samples = []
    for n, row in read_json_lines(path):
        where = f"{path}:{n}"
        if field(row, "harmful", where, bool):
            samples.append(Sample(id=f"harmful_qa-{n}", prompt=field(row, "prompt", where),
                                  response=field(row, "response", where), category="harmful",
                                  is_safe=False, source="harmful_qa"))
    return samples


def read_judge_labels(path: str | Path) -> list[Sample]:
    """Human-labelled judge sets: `prompt`, `response` and `refusal` or `harmful` (1 or 0).

    refusal_labels: label "refusal" or "answer". harmful_labels: label "harmful" or "harmless",
    `is_safe` the opposite of harmful, `category` the file's category.
    """
    name = Path(path).stem
    samples = []
    for n, row in read_json_lines(path):
        where = f"{path}:{n}"
        if "refusal" in row:
            label, is_safe = ("refusal" if field(row, "refusal", where, int) else "answer"), None
        else:
            harmful = field(row, "harmful", where, int)
            label, is_safe = ("harmful" if harmful else "harmless"), not harmful
        samples.append(Sample(id=f"{name}-{n}", prompt=field(row, "prompt", where),
                              response=field(row, "response", where), label=label,
                              category=row.get("category"), is_safe=is_safe, source=name))
    return samples


def beavertails_category(value, where: str) -> str | None:
    """BeaverTails' category is a dict {harm name: bool}; keep the true names, joined by ','."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return ",".join(k for k, v in value.items() if v) or None
    raise ValueError(f"{where}: field 'category' must be a string or a dict of booleans")


def read_beavertails(path: str | Path) -> list[Sample]:
    """BeaverTails-style jsonl rows (`prompt`, `response`, `category`, `is_safe`)."""
    samples = []
    for n, row in read_json_lines(path):
        where = f"{path}:{n}"
        samples.append(Sample(id=f"beavertails-{n}", prompt=field(row, "prompt", where),
                              response=field(row, "response", where),
                              category=beavertails_category(row.get("category"), where),
                              is_safe=field(row, "is_safe", where, bool), source="beavertails"))
    return samples


# ----------------------------------------------------------------------------- all sources

@dataclass
class Sources:
    """Everything the builder draws from, whatever folder (or the embedded set) it came from."""
    harmful_prompts: list[Sample]       # harmful requests, response empty
    harmful_qa: list[Sample]            # harmful requests with compliant answers
    benign: list[Sample]                # benign instructions with helpful answers
    task_train: dict[str, list[Sample]]  # task name -> rows to fine-tune on
    task_test: dict[str, list[Sample]]   # task name -> rows to evaluate on (may be the same
                                         # list as task_train: the builder keeps them disjoint)
    files: dict[str, str]               # source file (relative path) -> sha256


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_sources(root: str | Path) -> Sources:
    """Read every file the builder needs from a folder laid out like ../shared/data."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; pass --source a folder laid out like "
                                "../shared/data (see data/README.md), or --source embedded")
    layout = root / "layout.json"  # written by data/hub.py: sources whose file has another name
    rels = {**SOURCE_FILES, **(json.loads(layout.read_text())["files"] if layout.is_file() else {})}
    f = {name: root / rel for name, rel in rels.items()}
    agnews = read_agnews(f["agnews"])  # only a test split exists: the builder splits it
    return Sources(
        harmful_prompts=(read_harmful_prompts(f["advbench"]) + read_harmful_prompts(f["harmbench"])
                         + read_harmful_prompts(f["donotanswer"])),
        harmful_qa=read_harmful_qa(f["harmful_qa"]),
        benign=read_alpaca_eval(f["alpaca_eval"]),
        task_train={"sst2": read_sst2(f["sst2_train"]), "agnews": agnews,
                    "gsm8k": read_gsm8k(f["gsm8k_train"])},
        task_test={"sst2": read_sst2(f["sst2_test"]), "agnews": agnews,
                   "gsm8k": read_gsm8k(f["gsm8k_test"])},
        files={rel: sha256(root / rel) for rel in rels.values()},
    )
