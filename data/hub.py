"""`data/prepare.py --source hub`: the paper's public data from the Hugging Face Hub, written into a
folder laid out like ../shared/data, which the builder then reads as any --source folder.

The safety data is BeaverTails (Ji et al. 2023; the attack and harmful set of the Vaccine, Booster
and RepNoise experiments): its 30k training split's unsafe rows (a harmful request and an answer
that complies) become harmful_qa/beavertails.jsonl. The harmful prompts (AdvBench, HarmBench,
Do-Not-Answer), the benign instructions (AlpacaEval) and the tasks (SST-2, AG News, GSM8K) are the
same data sets as the local layout, from their hub copies. A `layout.json` in the folder tells
`read_sources` which file stands for which source where the names differ from SOURCE_FILES.

Needs `huggingface_hub` (and `pyarrow` for the parquet files) and a network, neither of which the
embedded default needs. The conversion is tested on local files in the hub's layout
(tests/test_data.py); the download itself is not run in the tests.
"""
from __future__ import annotations

import csv
import fnmatch
import gzip
import io
import json
import lzma
import re
from pathlib import Path

from files import atomic_dir

BEAVERTAILS = ("PKU-Alignment/BeaverTails", "8401fe609d288129cc684a9b3be6a93e41cfe678")  # repo, revision


def rows_of(path: Path) -> list[dict]:
    """The records of a hub file: parquet, JSON list, or JSON lines (plain, .gz or .xz)."""
    name = path.name
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading the hub's parquet files needs pyarrow: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    opener = gzip.open if name.endswith(".gz") else lzma.open if name.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if name.removesuffix(".gz").removesuffix(".xz").endswith(".json"):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def tsv(rows) -> str:
    return "".join(f"{r['sentence'].strip()}\t{r['label']}\n" for r in rows)


def snake(text: str) -> str:
    """'Malicious Uses' -> 'malicious_uses': Do-Not-Answer's risk areas as the local copy writes them."""
    return re.sub(r"[^a-z]+", "_", text.lower()).strip("_")


def news_csv(rows) -> str:
    """ag_news's `text` (title and description in one) and `label` 0-3 -> class 1-4, '', text."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows((r["label"] + 1, "", r["text"]) for r in rows)
    return out.getvalue()


# layout file -> (dataset repo, revision, file pattern in the repo, rows -> the layout's text)
HUB = {
    "gsm8k/train.jsonl": ("openai/gsm8k", "main", "main/train-*.parquet",
                          lambda rs: jsonl({"question": r["question"], "answer": r["answer"]} for r in rs)),
    "gsm8k/test.jsonl": ("openai/gsm8k", "main", "main/test-*.parquet",
                         lambda rs: jsonl({"question": r["question"], "answer": r["answer"]} for r in rs)),
    "sst2/train.tsv": ("stanfordnlp/sst2", "main", "data/train-*.parquet", tsv),
    "sst2/test.tsv": ("stanfordnlp/sst2", "main", "data/validation-*.parquet", tsv),  # the hub's test has no labels
    "agnews/test.csv": ("fancyzhx/ag_news", "main", "data/test-*.parquet", news_csv),
    "alpaca_eval/alpaca_eval.json": ("tatsu-lab/alpaca_eval", "main", "alpaca_eval.json",
                                     lambda rs: json.dumps(rs, ensure_ascii=False, indent=1)),
    "harmful_prompts/advbench.jsonl": ("walledai/AdvBench", "main", "data/train-*.parquet",
                                       lambda rs: jsonl({"prompt": r["prompt"]} for r in rs)),
    "harmful_prompts/harmbench.jsonl": ("walledai/HarmBench", "main", "standard/train-*.parquet",
                                        lambda rs: jsonl({"prompt": r["prompt"]} for r in rs)),
    "harmful_prompts/donotanswer.jsonl": ("LibrAI/do-not-answer", "main", "data/train-*.parquet",
                                          lambda rs: jsonl({"prompt": r["question"], "risk_area": snake(r["risk_area"])}
                                                           for r in rs)),
    "harmful_qa/beavertails.jsonl": (*BEAVERTAILS, "round0/30k/train.jsonl.gz",  # the unsafe answers only
                                     lambda rs: jsonl({"prompt": r["prompt"], "response": r["response"], "harmful": True}
                                                      for r in rs if r["is_safe"] is False)),
}
LAYOUT = {"harmful_qa": "harmful_qa/beavertails.jsonl"}  # sources whose file differs from SOURCE_FILES


def download(repo: str, revision: str, pattern: str, cache: Path) -> Path:
    """The first file of a dataset repo matching `pattern`, fetched into the hub cache."""
    try:
        from huggingface_hub import hf_hub_download, list_repo_files
    except ImportError:
        raise ImportError("--source hub needs huggingface_hub: pip install huggingface_hub pyarrow") from None
    names = sorted(fnmatch.filter(list_repo_files(repo, repo_type="dataset", revision=revision), pattern))
    if not names:
        raise FileNotFoundError(f"{repo}@{revision}: no file matches {pattern!r}; the repository's layout changed")
    return Path(hf_hub_download(repo, names[0], repo_type="dataset", revision=revision, cache_dir=cache))


def convert(files: dict[str, Path], out: Path) -> None:
    """Write the layout into `out` (all or nothing) from local hub files, one per entry of HUB."""
    with atomic_dir(out) as tmp:
        for rel, (repo, revision, pattern, to_text) in HUB.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(to_text(rows_of(files[rel])), encoding="utf-8")
        sources = {rel: f"{repo}@{revision}:{pattern}" for rel, (repo, revision, pattern, _) in HUB.items()}
        (tmp / "layout.json").write_text(json.dumps(dict(files=LAYOUT, hub=sources), indent=1))


def fetch(out: Path) -> Path:
    """Download every file of HUB and write the layout in `out` (reused when it is there)."""
    if (out / "layout.json").is_file():
        return out
    cache = out.parent / (out.name + ".download")
    convert({rel: download(repo, rev, pattern, cache) for rel, (repo, rev, pattern, _) in HUB.items()}, out)
    return out
