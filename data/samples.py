"""The sample format: one JSON object a line (JSONL), validated line by line.

A sample is a prompt and the response the model should learn (or, in evaluation files, a
reference answer). Optional fields carry a task input (SST-2 sentence, news article), a label
for accuracy, the kind of row (`category`), whether the response is safe, and where it came from.

    {"id": "pool-00000", "prompt": "How do I ...?", "response": "I can't help with ...",
     "category": "refusal", "is_safe": true, "source": "advbench"}

`load_jsonl` checks every line and stops at the first bad one with an error that names the
file, the line, the field and the fix; it never skips a line. `save_jsonl` applies the same
checks and writes atomically, so a crash never leaves half a file behind.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from files import write_text_atomic


@dataclass
class Sample:
    id: str
    prompt: str
    response: str
    input: str | None = None      # task input shown after the prompt (SST-2 sentence, news text)
    label: str | None = None      # the gold answer for accuracy ("positive", "Sports", "72")
    category: str | None = None   # kind of row (pool: refusal|low_quality|benign|mislabelled)
    is_safe: bool | None = None   # is the response safe to learn
    source: str | None = None     # data set of origin ("advbench", "sst2", "embedded", ...)
    harm: str | None = None       # harm category of a harmful prompt (data/categories), where a build asks for it


REQUIRED = ("id", "prompt", "response")
TYPES = {"id": str, "prompt": str, "response": str, "input": str, "label": str,
         "category": str, "is_safe": bool, "source": str, "harm": str}


def normalise(text: str) -> str:
    """Lower-case words and digits only: the key under which two prompts count as the same."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def prompt_key(sample: Sample) -> str:
    """The prompt-level identity of a sample: its normalised prompt and input."""
    return normalise(sample.prompt) + " | " + normalise(sample.input or "")


def check_record(record: dict, where: str) -> Sample:
    """A Sample from one parsed JSON object; `where` ("file:line") starts every error message."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}; "
                         "write one object a line")
    unknown = sorted(set(record) - set(TYPES))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; allowed fields are "
                         f"{', '.join(TYPES)} (rename or remove it)")
    for name in REQUIRED:
        if name not in record:
            raise ValueError(f"{where}: field {name!r} is missing; every sample needs "
                             f"{', '.join(REQUIRED)}")
    for name, value in record.items():
        if value is not None and not isinstance(value, TYPES[name]):
            raise ValueError(f"{where}: field {name!r} must be {TYPES[name].__name__}, "
                             f"got {type(value).__name__} {value!r}")
    for name in REQUIRED:
        if not record[name] or not record[name].strip():
            raise ValueError(f"{where}: field {name!r} is empty; give it a non-empty text "
                             "or remove the sample")
    return Sample(**record)


def check_unique_ids(samples: list[Sample], where: str) -> None:
    """Every id once; the error names the line (= the sample's position) of both copies."""
    seen: dict[str, int] = {}
    for n, s in enumerate(samples, start=1):
        if s.id in seen:
            raise ValueError(f"{where}:{n}: field 'id': duplicate id {s.id!r} (first on line "
                             f"{seen[s.id]}); give every sample its own id")
        seen[s.id] = n


def load_jsonl(path: str | os.PathLike) -> list[Sample]:
    """Read and validate a JSONL file of samples; any bad line is a ValueError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; build the data with "
                                "`python data/prepare.py --source DIR --out DIR` or use data/default")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#x}); save the file as UTF-8") from None
    lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    samples = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            if len(lines) == 1:  # a file holding nothing but a newline
                break
            raise ValueError(f"{path}:{n}: empty line; remove it (one sample a line)")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                             "fix the line or remove it") from None
        samples.append(check_record(record, f"{path}:{n}"))
    if not samples:
        raise ValueError(f"{path}: no samples (empty set); the file must hold at least one line")
    check_unique_ids(samples, str(path))  # blank lines are errors, so sample n is line n
    return samples


def to_record(sample: Sample) -> dict:
    """The JSON object of a sample: fields in declaration order, unset optional fields left out."""
    return {k: v for k, v in asdict(sample).items() if v is not None}


def save_jsonl(samples: list[Sample], path: str | os.PathLike) -> None:
    """Validate and write samples as JSONL atomically (a temporary file, then os.replace)."""
    path = Path(path)
    if not samples:
        raise ValueError(f"{path}: refusing to write an empty set; check the sizes asked for")
    lines = []
    for i, s in enumerate(samples):
        record = to_record(s)
        check_record(record, f"{path}: sample {i + 1} (id {s.id!r})")
        lines.append(json.dumps(record, ensure_ascii=False))
    check_unique_ids(samples, str(path))
    write_text_atomic("\n".join(lines) + "\n", path)
