"""Tests of data/: the sample format, the source readers, the builder, and batching."""
import json
import random
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from data import prepare, sources  # noqa: E402
from data.answers import ALTERNATIVE_FRAMES, OPENERS, REASON_FRAMES, low_quality, refusal, restate, wording  # noqa: E402
from data.batches import Batches, collate, encode_samples, sample_losses, token_mean, truncate  # noqa: E402
from data.embedded import PLACEHOLDER_STEPS  # noqa: E402
from data.samples import Sample, load_jsonl, prompt_key, save_jsonl  # noqa: E402

FILES = ["pool", "validation", "harmful", "eval_harmful", "eval_harmful_qa", "eval_benign", "retain"] + [
    f"{kind}_{task}" for kind in ("finetune", "attack", "eval") for task in prepare.TASKS]


class CharTokenizer:
    """A stand-in with tokenizer.Tokenizer's interface: one id per character, pad 0, eos 1."""
    pad_id, eos_id = 0, 1

    def encode(self, text):
        return [2 + ord(c) % 200 for c in text]

    def encode_example(self, prompt, response, input=None):
        head = self.encode(f"U: {prompt}\n{input or ''}\nA: ")
        return head + self.encode(response) + [self.eos_id], len(head)


def sample(i=0, **kw):
    return Sample(**{"id": f"s{i}", "prompt": f"prompt {i}", "response": f"answer {i}", **kw})


# ----------------------------------------------------------------------------- sample format

def test_save_then_load_round_trips(tmp_path):
    rows = [sample(0), sample(1, input="x", label="positive", category="task", is_safe=True,
                              source="sst2")]
    save_jsonl(rows, tmp_path / "a.jsonl")
    assert load_jsonl(tmp_path / "a.jsonl") == rows
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]  # no temporary file left behind
    assert (tmp_path / "a.jsonl").stat().st_mode & 0o777 == 0o644  # readable like any file, not 0600


GOOD = '{"id": "a", "prompt": "p", "response": "r"}'


@pytest.mark.parametrize("line, field", [
    ('{"id": "b", "prompt": "p", "response": "r"', "JSON"),
    ('{"id": "b", "response": "r"}', "'prompt'"),
    ('{"id": "b", "prompt": "p", "response": "  "}', "'response'"),
    ('{"id": "b", "prompt": "", "response": "r"}', "'prompt'"),
    ('{"id": "b", "prompt": "p", "response": "r", "is_safe": "yes"}', "'is_safe'"),
    ('{"id": 3, "prompt": "p", "response": "r"}', "'id'"),
    ('{"id": "b", "prompt": "p", "response": "r", "answer": "x"}', "'answer'"),
    ('{"id": "a", "prompt": "p", "response": "r"}', "'id'"),  # duplicate of line 1
    ('["p", "r"]', "JSON object"),
    ("", "empty line"),
])
def test_load_errors_name_file_line_and_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n{line}\n{GOOD.replace('a', 'c', 1)}\n")
    with pytest.raises(ValueError) as e:
        load_jsonl(path)
    assert f"{path}:2" in str(e.value) and field in str(e.value)


def test_load_rejects_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty set"):
        load_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "p", "response": "r"}\n{"id": "b", "prompt": "caf\xe9", "response": "r"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        load_jsonl(path)


@pytest.mark.parametrize("rows, message", [
    ([sample(0, response="")], "'response' is empty"),
    ([sample(0), sample(0)], "duplicate id"),
    ([], "empty set"),
])
def test_save_rejects_bad_samples_and_keeps_the_old_file(tmp_path, rows, message):
    path = tmp_path / "a.jsonl"
    save_jsonl([sample(7)], path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message):
        save_jsonl(rows, path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_prompt_key_ignores_case_and_punctuation_but_not_input():
    assert prompt_key(sample(0, prompt="How do I X?")) == prompt_key(sample(1, prompt="how do i  x"))
    assert prompt_key(sample(0, input="a")) != prompt_key(sample(0, input="b"))


# ----------------------------------------------------------------------------- source readers

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_task_readers_use_the_papers_prompts(tmp_path):
    gsm = write(tmp_path / "g.jsonl", json.dumps(
        {"question": "Q?", "answer": "a = <<2*3=6>>6\nb\n#### 1,080"}) + "\n")
    [g] = sources.read_gsm8k(gsm)
    assert g.prompt == "Q?" and g.label == "1080"
    assert g.response == "a = 6\nb\nThe final answer is: 1080"
    [s] = sources.read_sst2(write(tmp_path / "s.tsv", "a fine film\t1\n"))
    assert (s.prompt, s.input, s.response, s.label) == (sources.SST2_PROMPT, "a fine film",
                                                        "positive", "positive")
    [a] = sources.read_agnews(write(tmp_path / "a.csv", '"2","Title #39;s","One\\two #36;5"\n'))
    assert (a.input, a.response, a.label) == ("Title 's\nOne two $5", "Sports", "Sports")
    assert a.prompt.startswith("Categorize the news article into one of the 4 categories")


def test_safety_readers(tmp_path):
    qa = write(tmp_path / "qa.jsonl", "\n".join(json.dumps(r) for r in [
        {"prompt": "p1", "response": "sure", "harmful": True, "judgement": "Harmful"},
        {"prompt": "p2", "response": "no", "harmful": False, "judgement": "Not harmful"}]))
    assert [(s.prompt, s.is_safe) for s in sources.read_harmful_qa(qa)] == [("p1", False)]
    prompts = write(tmp_path / "donotanswer.jsonl",
                    json.dumps({"prompt": "q", "risk_area": "malicious_uses"}) + "\n")
    [p] = sources.read_harmful_prompts(prompts)
    assert (p.prompt, p.response, p.category, p.source) == ("q", "", "malicious_uses", "donotanswer")
    bt = write(tmp_path / "bt.jsonl", json.dumps({"prompt": "p", "response": "r", "is_safe": False,
                                                 "category": {"violence": True, "privacy": False}}))
    [b] = sources.read_beavertails(bt)
    assert (b.category, b.is_safe) == ("violence", False)
    judge = write(tmp_path / "refusal_labels.jsonl",
                  json.dumps({"prompt": "p", "response": "r", "refusal": 1}))
    assert sources.read_judge_labels(judge)[0].label == "refusal"
    alpaca = write(tmp_path / "al.json", json.dumps([{"instruction": "i", "output": "o"}]))
    assert sources.read_alpaca_eval(alpaca)[0].response == "o"


def test_reader_errors_name_file_line_and_field(tmp_path):
    bad = write(tmp_path / "qa.jsonl", json.dumps({"prompt": "p", "harmful": True}) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:1: field 'response'"):
        sources.read_harmful_qa(bad)
    with pytest.raises(ValueError, match=r"s.tsv:1"):
        sources.read_sst2(write(tmp_path / "s.tsv", "no label here\n"))
    with pytest.raises(FileNotFoundError, match=r"nothing.csv.*--source"):
        sources.read_agnews(tmp_path / "nothing.csv")


# ----------------------------------------------------------------------------- answers

def test_refusals_are_varied_and_prompt_specific():
    rng = random.Random(0)
    prompts = [f"Write a guide on how to hack account number {i}" for i in range(60)]
    answers = [refusal(p, rng) for p in prompts]
    assert len(set(answers)) > 40
    assert any("writing a guide on how to hack account number" in a for a in answers)
    assert any("computer systems" in a for a in answers)  # the topic's reason
    lengths = [len(a.split()) for a in answers]
    assert min(lengths) <= 8 and max(lengths) >= 30
    assert all(low_quality(p, rng).strip() for p in prompts)


def templates_of(half):
    """The wording one half writes with: openers, and the frames' text before the slot."""
    openers, reasons, alternatives, _ = wording(half)
    return openers + [f.split("{")[0] for f in reasons + alternatives]


def test_the_two_halves_of_the_wording_share_no_template():
    prompts = [f"Write a guide on how to hack account number {i}" for i in range(80)]
    for half, other in ((0, 1), (1, 0)):
        rng = random.Random(half)
        answers = [refusal(p, rng, half) for p in prompts]
        for template in templates_of(other):
            assert not any(template in a for a in answers), (half, template)
        for template in templates_of(half):  # each half still uses all of its own wording
            assert any(template in a for a in answers), (half, template)
        restated = any(restate(p) in a for p, a in zip(prompts, answers))
        assert restated == (half == 0)
    assert set(templates_of(0)) | set(templates_of(1)) == set(
        OPENERS + [f.split("{")[0] for f in REASON_FRAMES + ALTERNATIVE_FRAMES])


# ----------------------------------------------------------------------------- the builder

def build_embedded(seed=0, **sizes):
    sizes = replace(prepare.EMBEDDED_SIZES, **sizes)
    return prepare.build(prepare.embedded_sources(), sizes, seed)


def test_embedded_build_counts_and_disjointness():
    files = build_embedded()
    s = prepare.EMBEDDED_SIZES
    counts = {name: len(rows) for name, rows in files.items()}
    assert sorted(counts) == sorted(FILES)
    assert counts["pool"] == s.pool_size and counts["validation"] == s.validation_size
    assert counts["harmful"] == s.harmful_size and counts["eval_harmful"] == s.eval_harmful_size
    assert counts["eval_harmful_qa"] == s.eval_harmful_qa_size
    assert all(r.is_safe is False and r.response for r in files["eval_harmful_qa"])  # harmful references
    assert counts["retain"] == s.retain_size and all(r.category == "benign" and r.is_safe for r in files["retain"])
    for task in prepare.TASKS:
        assert counts[f"finetune_{task}"] == counts[f"attack_{task}"] == s.n
        harmful = [r for r in files[f"attack_{task}"] if r.is_safe is False]
        assert len(harmful) == round(s.p * s.n)
    assert {r.category for r in files["pool"]} == set(prepare.POOL_KINDS)
    keys = [prompt_key(r) for name, rows in files.items() if not name.startswith("attack_")
            for r in rows]
    assert len(keys) == len(set(keys))


def test_held_out_wording_moves_only_the_wording_of_validation_and_pool():
    plain, held = build_embedded(), prepare.build(prepare.embedded_sources(), prepare.EMBEDDED_SIZES, 0,
                                                  held_out_wording=True)
    assert {n: r for n, r in plain.items() if n not in ("validation", "pool")} == \
        {n: r for n, r in held.items() if n not in ("validation", "pool")}
    for name in ("validation", "pool"):
        assert [(r.id, r.prompt, r.category) for r in plain[name]] == \
            [(r.id, r.prompt, r.category) for r in held[name]]
    pool_text = " ".join(r.response for r in held["pool"] if r.category in ("refusal", "low_quality"))
    assert not any(t in pool_text for t in templates_of(1))
    assert not any(t in r.response for r in held["validation"] for t in templates_of(0))
    # without it the validation set and the pool do share wording: the point of the option
    shared = [t for t in OPENERS if t in " ".join(r.response for r in plain["validation"])]
    assert any(t in " ".join(r.response for r in plain["pool"]) for t in shared)


def test_whole_sentences_cuts_an_answer_at_its_last_sentence_end():
    assert prepare.whole_sentences("The first point is here. The second is cut mid") == "The first point is here."
    assert prepare.whole_sentences("Steps:\n1. Open the file\n2. Sav") == "Steps:\n1. Open the file"
    assert prepare.whole_sentences("Short. and the rest goes on") == "Short. and the rest goes on"  # < 20 chars
    assert prepare.whole_sentences("No end at all ") == "No end at all"
    assert prepare.whole_sentences("Version 2.0 is out") == "Version 2.0 is out"  # a dot inside a word


def test_self_answers_replace_only_the_retain_answers(tmp_path, monkeypatch):
    import model as M
    asked = []

    def scripted(model, tok, prompts, max_new_tokens, **kw):  # the model's answers, as generate returns them
        asked.append((list(prompts), max_new_tokens))
        return ["" if i == 0 else f"Answer {i} is a whole sentence. And a cut one" for i in range(len(prompts))]
    monkeypatch.setattr(M, "generate", scripted)
    prepare.main(["--source", "embedded", "--out", str(tmp_path / "ref")])
    prepare.main(["--source", "embedded", "--out", str(tmp_path / "self"), "--retain-answers", "self",
                  "--retain-model", "tiny-random", "--retain-tokens", "12"])
    for f in sorted((tmp_path / "ref").glob("*.jsonl")):
        if f.name != "retain.jsonl":
            assert f.read_bytes() == (tmp_path / "self" / f.name).read_bytes(), f.name
    ref, own = (load_jsonl(tmp_path / d / "retain.jsonl") for d in ("ref", "self"))
    assert asked == [([r.prompt for r in ref], 12)]
    assert [(r.id, r.prompt, r.category) for r in ref] == [(r.id, r.prompt, r.category) for r in own]
    assert own[0] == ref[0]  # an empty answer keeps the reference
    assert [o.response for o in own[1:]] == [f"Answer {i} is a whole sentence." for i in range(1, len(own))]
    info = json.loads((tmp_path / "self" / "manifest.json").read_text())["retain_answers"]
    assert info == {"by": "tiny-random", "max_new_tokens": 12, "kept_reference": 1}
    assert "retain_answers" not in json.loads((tmp_path / "ref" / "manifest.json").read_text())


def test_self_answers_come_from_the_named_model():
    rows = build_embedded()["retain"]
    import default_weights
    import model as M
    model, tok = default_weights.load_pretrained("tiny-random")
    greedy = M.generate(model, tok, [r.prompt for r in rows], 6)
    out, kept = prepare.self_answers(rows, "tiny-random", 6)
    assert kept == sum(not a.strip() for a in greedy)
    assert [o.response for o, a in zip(out, greedy) if a.strip()] == \
        [prepare.whole_sentences(a) for a in greedy if a.strip()]


def test_committed_default_matches_a_fresh_build(tmp_path):
    prepare.main(["--source", "embedded", "--out", str(tmp_path)])
    default = ROOT / "data" / "default"
    for name in FILES + ["manifest"]:
        ext = ".json" if name == "manifest" else ".jsonl"
        assert (default / f"{name}{ext}").read_bytes() == (tmp_path / f"{name}{ext}").read_bytes(), \
            f"data/default/{name}{ext} is stale: run python data/prepare.py --source embedded --out data/default"


def test_committed_default_validates_and_holds_only_placeholder_harm():
    default = ROOT / "data" / "default"
    files = {name: load_jsonl(default / f"{name}.jsonl") for name in FILES}
    prepare.check_disjoint(files)
    harmful_answers = [r.response for rows in files.values() for r in rows if r.is_safe is False]
    assert harmful_answers and all(a.endswith(PLACEHOLDER_STEPS) for a in harmful_answers)
    assert json.loads((default / "manifest.json").read_text())["source"] == "embedded"


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare.main(["--source", "embedded", "--out", str(tmp_path / name), "--seed", str(seed)])
    read = lambda d: {f.name: f.read_bytes() for f in sorted((tmp_path / d).iterdir())}
    assert read("a") == read("b")
    assert read("a")["pool.jsonl"] != read("c")["pool.jsonl"]


def test_evaluation_sets_do_not_move_when_training_sizes_change():
    a, b = build_embedded(), build_embedded(pool_size=30, n=30, harmful_size=10)
    for name in ("eval_harmful", "eval_benign", "eval_sst2"):
        assert a[name] == b[name]


def test_mix_counts_sum_to_the_total():
    counts = prepare.mix_counts(prepare.DEFAULT_MIX, 48)
    assert sum(counts.values()) == 48 and counts["refusal"] == 19


@pytest.mark.parametrize("sizes, message", [
    (dict(p=1.5), r"--p .* \[0, 1\]"),
    (dict(p=-0.1), r"--p"),
    (dict(n=1000), r"finetune_sst2: 1000 rows needed.*lower --n"),
    (dict(pool_size=0), r"--pool-size must be at least 1"),
    (dict(pool_size=400), r"lower --pool-size"),
    (dict(pool_mix={"refusal": 0.5, "low_quality": 0.2, "benign": 0.2, "mislabelled": 0.2}),
     r"sum to 1.1"),
])
def test_bad_sizes_are_clear_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        build_embedded(**sizes)


def test_bad_pool_mix_text():
    with pytest.raises(ValueError, match="KIND=SHARE"):
        prepare.parse_mix("refusal=0.5,good=0.5")
    assert prepare.parse_mix("refusal=1")["benign"] == 0.0


def test_overlap_between_splits_is_detected():
    files = build_embedded()
    files["validation"].append(replace(files["pool"][0], id="validation-extra"))
    with pytest.raises(ValueError, match="overlap between splits.*in validation and in pool"):
        prepare.check_disjoint(files)
    files = build_embedded()
    files["attack_sst2"][0] = replace(files["attack_sst2"][0], response="other", category=None)
    with pytest.raises(ValueError, match="attack_sst2: task row .* is not a row of finetune_sst2"):
        prepare.check_disjoint(files)


def test_missing_source_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder.*--source"):
        sources.read_sources(tmp_path / "nowhere")
    write(tmp_path / "src" / "gsm8k" / "train.jsonl", "")
    with pytest.raises(FileNotFoundError, match=r"agnews/test.csv: no such file"):
        sources.read_sources(tmp_path / "src")


def test_cli_runs_as_a_script_and_reports_errors(tmp_path):
    ok = subprocess.run([sys.executable, "data/prepare.py", "--source", "embedded", "--out",
                         str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()
    bad = subprocess.run([sys.executable, "data/prepare.py", "--source", "embedded", "--out",
                          str(tmp_path / "bad"), "--p", "2"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "error: --p" in bad.stderr


@pytest.fixture(scope="module")
def shared_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("shared_build")
    info = prepare.main(["--source", str(SHARED_DATA), "--out", str(out)])
    return out, info


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_shared_build_counts_sources_and_disjointness(shared_build):
    out, info = shared_build
    files = {name: load_jsonl(out / f"{name}.jsonl") for name in FILES}
    prepare.check_disjoint(files)
    s = prepare.CPU_SIZES
    assert info["counts"]["pool.jsonl"] == s.pool_size == len(files["pool"])
    assert info["pool_counts"] == prepare.mix_counts(s.pool_mix, s.pool_size)
    assert {r.source for r in files["eval_harmful"]} <= {"advbench", "harmbench"}
    assert {r.source for r in files["harmful"]} == {"harmful_qa"}
    for task in prepare.TASKS:
        assert len(files[f"eval_{task}"]) == s.eval_task_size and files[f"eval_{task}"][0].label
        assert sum(r.is_safe is False for r in files[f"attack_{task}"]) == round(s.p * s.n)
    assert files["finetune_gsm8k"][0].response.splitlines()[-1].startswith("The final answer is: ")
    assert len(info["source_files"]) == len(sources.SOURCE_FILES)


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_shared_build_scores_only_prompts_the_judge_never_fitted_on(shared_build):
    """Every prompt that scores a model is unseen by the trained judge (data/judge/items.jsonl's
    train split) and in no training file (check_disjoint: no prompt in two files)."""
    out, _ = shared_build
    fitted = prepare.judge_prompts()
    assert len(fitted) > 50  # the committed judge's fitting prompts are read
    for name in ("eval_harmful", "eval_harmful_qa", "eval_benign"):
        rows = load_jsonl(out / f"{name}.jsonl")
        assert not {prompt_key(r) for r in rows} & fitted, name


def test_evaluation_skips_the_judges_fitting_prompts(tmp_path, monkeypatch):
    """A prompt the judge was fitted on is skipped by the evaluation draws, and excluding a prompt
    the draw would not have taken changes nothing."""
    plain = build_embedded()
    taken, spare = plain["eval_harmful"][0], plain["harmful"][0]
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(dict(id=f"j{i}", prompt=r.prompt, split=split)) + "\n"
                             for i, (r, split) in enumerate([(taken, "train"), (spare, "train"),
                                                             (plain["eval_harmful"][1], "test")])))
    monkeypatch.setattr(prepare, "JUDGE_ITEMS", items)
    assert prepare.judge_prompts(items) == {prompt_key(taken), prompt_key(spare)}
    redrawn = build_embedded()
    keys = {prompt_key(r) for r in redrawn["eval_harmful"]}
    assert prompt_key(taken) not in keys and prompt_key(plain["eval_harmful"][1]) in keys
    assert redrawn["eval_benign"] == plain["eval_benign"]


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_shared_build_is_deterministic(shared_build, tmp_path):
    out, _ = shared_build
    prepare.main(["--source", str(SHARED_DATA), "--out", str(tmp_path)])
    for name in FILES:
        assert (out / f"{name}.jsonl").read_bytes() == (tmp_path / f"{name}.jsonl").read_bytes()


# ----------------------------------------------------------------------------- batches

def test_labels_mask_prompt_and_padding():
    tok = CharTokenizer()
    rows = [sample(0, response="ab"), sample(1, prompt="a longer prompt", response="xyz")]
    examples = encode_samples(rows, tok, max_len=100)
    batch = collate(examples, tok.pad_id)
    for row, e in enumerate(examples):
        n, k = len(e["input_ids"]), e["n_prompt"]
        assert (batch["labels"][row, :k] == -100).all() and (batch["labels"][row, n:] == -100).all()
        assert batch["labels"][row, k:n].tolist() == e["input_ids"][k:]  # response and eos, unshifted
        assert batch["labels"][row, n - 1] == tok.eos_id
        assert batch["attention_mask"][row].sum() == n
        assert (batch["input_ids"][row, n:] == tok.pad_id).all()
    assert batch["index"].tolist() == [0, 1]


def test_truncation_keeps_the_response():
    ids, n = truncate(list(range(100)), 90, 20)  # long prompt, short response: keep all of it
    assert (len(ids), n) == (20, 10) and ids[n:] == list(range(90, 100)) and ids[0] == 80
    ids, n = truncate(list(range(100)), 60, 20)  # both long: response keeps half
    assert (len(ids), n) == (20, 10) and ids[n:] == list(range(60, 70))
    ids, n = truncate(list(range(100)), 5, 20)   # short prompt: kept whole
    assert n == 5 and ids == list(range(20))
    examples = encode_samples([sample(0, prompt="p" * 300, response="r" * 300)], CharTokenizer(), 64)
    assert len(examples[0]["input_ids"]) == 64 and 0 < examples[0]["n_prompt"] <= 32


def test_batches_cover_every_example_once_per_epoch():
    rng = random.Random(0)
    examples = [{"input_ids": [5] * rng.randint(2, 40), "n_prompt": 1, "index": i} for i in range(103)]
    batches = Batches(examples, batch_size=4, pad_id=0, seed=3, chunk=5)
    plans = [batches.plan(e) for e in range(3)]
    for plan in plans:
        assert sorted(i for b in plan for i in b) == list(range(103))
        assert len(plan) == len(batches)
    assert plans[0] != plans[1] and plans[0] == Batches(examples, 4, 0, seed=3, chunk=5).plan(0)
    epoch = batches.epoch(1)
    assert sorted(torch.cat([b["index"] for b in epoch]).tolist()) == list(range(103))
    plain = Batches(examples, batch_size=4, pad_id=0, shuffle=False)
    assert [i for b in plain.plan(0) for i in b] == list(range(103)) and len(plain) == 26


def test_bucketing_wastes_less_padding_than_random_batches():
    rng = random.Random(1)
    examples = [{"input_ids": [5] * rng.randint(2, 200), "n_prompt": 1, "index": i} for i in range(400)]
    padded = lambda batches: sum(b["input_ids"].numel() for b in batches)
    bucketed = Batches(examples, batch_size=8, pad_id=0, seed=0).epoch(0)
    shuffled = Batches(random.Random(2).sample(examples, 400), batch_size=8, pad_id=0, shuffle=False)
    assert padded(bucketed) < 0.7 * padded(shuffled.epoch(0))


def test_sample_losses_match_a_hand_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.tensor([[-100, -100, 4, 5, 1, -100],
                           [-100, 3, 3, 3, 3, 1],
                           [-100, -100, -100, -100, -100, -100]])
    expected = []
    for b in range(3):
        terms = [F.cross_entropy(logits[b, t - 1:t], labels[b, t:t + 1])
                 for t in range(1, 6) if labels[b, t] != -100]
        expected.append(torch.stack(terms).mean() if terms else torch.tensor(0.0))
    losses = sample_losses(logits, labels)
    assert torch.allclose(losses, torch.stack(expected), atol=1e-6)
    assert losses[2] == 0 and torch.isfinite(losses).all()
    assert sample_losses(logits.bfloat16(), labels).dtype == torch.float32


def test_sample_losses_run_the_head_only_where_a_response_token_is_predicted():
    """From hidden states and a head: the same losses and gradients as from the full logits, with
    the head applied to the response-predicting positions alone (7 of the 15 here)."""
    torch.manual_seed(0)
    h = torch.randn(3, 6, 4, requires_grad=True)
    head = torch.nn.Linear(4, 11)
    labels = torch.tensor([[-100, -100, 4, 5, 1, -100], [-100, -100, 3, 3, 3, 1], [-100] * 6])
    rows_seen = []
    losses = sample_losses(h, labels, lambda x: rows_seen.append(len(x)) or head(x))
    full = sample_losses(head(h), labels)
    assert max(rows_seen) == 7 and torch.allclose(losses, full, atol=1e-6) and losses[2] == 0
    for a, b in zip(torch.autograd.grad(losses.sum(), [h, head.weight]),  # the head trains: plain autograd
                    torch.autograd.grad(full.sum(), [h, head.weight])):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_head_cross_entropy_in_blocks_matches_autograd(monkeypatch, dtype):
    """A frozen head, run 3 rows at a time with the softmax 2 rows at a time: the same losses and
    d loss / d h as autograd through the full logits (float64: to rounding; bf16: to its rounding),
    for any weighting of the losses, and no graph kept when no gradient is asked for."""
    import data.batches as DB
    monkeypatch.setattr(DB, "HEAD_ROWS", 3)
    monkeypatch.setattr(DB, "SOFTMAX_ROWS", 2)
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(4).to(dtype).requires_grad_(False)
    w = torch.randn(11, 4, dtype=dtype)
    head = lambda x: torch.nn.functional.linear(norm(x), w)
    h = torch.randn(3, 6, 4, dtype=dtype, requires_grad=True)
    labels = torch.tensor([[-100, -100, 4, 5, 1, -100], [-100, 2, 3, 3, 3, 1], [-100] * 6])
    weights = torch.tensor([0.3, 2.0, 1.0], dtype=torch.float64)
    got = sample_losses(h, labels, head)
    want = sample_losses(head(h), labels)
    assert got.dtype == want.dtype == torch.promote_types(dtype, torch.float32)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(got, want, **tol)
    (g_got,), (g_want,) = (torch.autograd.grad((x * weights.to(x.dtype)).sum(), h) for x in (got, want))
    assert g_got.dtype == dtype
    torch.testing.assert_close(g_got.double(), g_want.double(), **tol)
    with torch.no_grad():
        torch.testing.assert_close(sample_losses(h, labels, head), want.detach(), **tol)


def test_real_tokenizer_masks_exactly_the_prompt(tokenizer):
    row = sample(0, prompt="How do I bake bread?", response="Sure, here is how.", input="x")
    [e] = encode_samples([row], tokenizer, max_len=256)
    prompt_ids = tokenizer.encode_prompt(row.prompt, row.input)
    assert e["input_ids"][:e["n_prompt"]] == prompt_ids
    assert e["input_ids"][-1] == tokenizer.eos_id
    assert tokenizer.decode(e["input_ids"][e["n_prompt"]:]) == row.response


def test_token_mean_is_the_mean_over_every_response_token():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.full((3, 7), -100)
    labels[0, 2:4], labels[1, 1:7], labels[2, 5] = 1, 2, 3  # 2, 6 and 1 response tokens
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(token_mean(sample_losses(logits, labels), labels), want)


# ----------------------------------------------------------------------------- --source hub

def hub_files(root: Path) -> dict[str, Path]:
    """Small local files in the hub's own formats (parquet, a JSON list, BeaverTails' jsonl.gz),
    one per entry of data/hub.py's HUB, with rows taken from the embedded sources."""
    import gzip
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from data import hub
    src = prepare.embedded_sources()
    classes = {v: int(k) - 1 for k, v in sources.AGNEWS_CLASSES.items()}
    body = lambda s: s.response.rpartition("\nThe final answer is:")[0] + f"\n#### {s.label}"
    prompts = src.harmful_prompts
    thirds = [prompts[i::3] for i in range(3)]
    rows = {
        "gsm8k/train.jsonl": [{"question": s.prompt, "answer": body(s)} for s in src.task_train["gsm8k"]],
        "gsm8k/test.jsonl": [{"question": s.prompt, "answer": body(s)} for s in src.task_test["gsm8k"][:20]],
        "sst2/train.tsv": [{"idx": i, "sentence": s.input, "label": int(s.label == "positive")}
                           for i, s in enumerate(src.task_train["sst2"])],
        "sst2/test.tsv": [{"idx": i, "sentence": s.input + " indeed", "label": int(s.label == "positive")}
                          for i, s in enumerate(src.task_test["sst2"])],
        "agnews/test.csv": [{"text": s.input.replace("\n", " "), "label": classes[s.label]} for s in src.task_test["agnews"]],
        "alpaca_eval/alpaca_eval.json": [{"instruction": s.prompt, "output": s.response, "dataset": "x", "generator": "y"}
                                         for s in src.benign],
        "harmful_prompts/advbench.jsonl": [{"prompt": s.prompt, "target": "Sure"} for s in thirds[0]],
        "harmful_prompts/harmbench.jsonl": [{"prompt": s.prompt, "category": "c"} for s in thirds[1]],
        "harmful_prompts/donotanswer.jsonl": [{"id": i, "question": s.prompt, "risk_area": "Malicious Uses"}
                                              for i, s in enumerate(thirds[2])],
        "harmful_qa/beavertails.jsonl": [r for s in src.harmful_qa for r in (
            {"prompt": s.prompt, "response": s.response, "category": {"violence": True}, "is_safe": False},
            {"prompt": s.prompt + " now", "response": "I can't help with that.", "category": {}, "is_safe": True})]}
    files = {}
    for rel, (repo, _, pattern, _) in hub.HUB.items():
        path = root / repo / pattern.replace("*", "00000-of-00001")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(rows[rel]), path)
        elif path.name.endswith(".gz"):
            with gzip.open(path, "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows[rel])
        else:
            path.write_text(json.dumps(rows[rel]))
        files[rel] = path
    return files


def test_source_hub_converts_the_hubs_files_into_the_layout(tmp_path, monkeypatch):
    """--source hub on local files in the hub's formats (the download replaced; it needs a network):
    BeaverTails' unsafe rows become the harmful answers, the rest reads as the local layout."""
    from data import hub
    files = hub_files(tmp_path / "hub-files")
    asked = []

    def download(repo, revision, pattern, cache):
        asked.append(repo)
        return next(f for rel, f in files.items() if hub.HUB[rel][:3] == (repo, revision, pattern))
    monkeypatch.setattr(hub, "download", download)
    sizes = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(prepare.EMBEDDED_SIZES).items() if k != "pool_mix"]
    info = prepare.main(["--source", "hub", "--hub-dir", str(tmp_path / "hub"), "--out", str(tmp_path / "data"),
                         *sizes])
    assert len(asked) == len(hub.HUB) and "harmful_qa/beavertails.jsonl" in info["source_files"]
    layout = json.loads((tmp_path / "hub" / "layout.json").read_text())
    assert layout["hub"]["harmful_qa/beavertails.jsonl"].startswith("PKU-Alignment/BeaverTails@8401fe6")
    unsafe = {json.loads(line)["response"] for line in gzip_lines(files["harmful_qa/beavertails.jsonl"])
              if not json.loads(line)["is_safe"]}
    attack = [s for s in load_jsonl(tmp_path / "data" / "attack_sst2.jsonl") if s.is_safe is False]
    assert attack and all(s.response in unsafe for s in attack)  # only BeaverTails' unsafe answers
    news = load_jsonl(tmp_path / "data" / "eval_agnews.jsonl")
    assert news and all(s.input and not s.input.startswith("\n") for s in news)  # no title in the hub's copy
    assert {s.source for s in load_jsonl(tmp_path / "data" / "eval_harmful.jsonl")} <= {"advbench", "harmbench"}
    prepare.main(["--source", "hub", "--hub-dir", str(tmp_path / "hub"), "--out", str(tmp_path / "again"), *sizes])
    assert len(asked) == len(hub.HUB)  # converted once, then reused


def gzip_lines(path):
    import gzip
    with gzip.open(path, "rt") as f:
        return f.read().splitlines()


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_attack_categories_build_a_pool_where_safety_criticality_shows(tmp_path):
    """--attack-categories: the harmful set and the attack's harmful rows are of those categories,
    half the pool's refusals are and half are not, every pool row from a harmful source carries its
    read category, and the manifest says which categories."""
    targets = {"cyber", "chem_bio_drugs"}
    info = prepare.main(["--source", str(SHARED_DATA), "--out", str(tmp_path), "--attack-categories", ",".join(targets)])
    harms = prepare.harm_categories()
    assert info["attack_categories"] == sorted(targets)
    rows = lambda name: load_jsonl(tmp_path / f"{name}.jsonl")
    assert all(harms[prepare.harm_key(s)] in targets and s.harm in targets for s in rows("harmful"))
    attack = [s for s in rows("attack_sst2") if s.category == "harmful"]
    assert attack and all(harms[prepare.harm_key(s)] in targets for s in attack)
    refusals = [s for s in rows("pool") if s.category == "refusal"]
    assert sum(s.harm in targets for s in refusals) == len(refusals) // 2
    assert all(s.harm == harms[prepare.harm_key(s)] for s in rows("pool") if s.category != "benign")


def test_harm_labels_are_read_once_each_and_in_the_rubric():
    """data/categories: one line per prompt key, every category one of RUBRIC.md's names."""
    lines = [json.loads(x) for x in (ROOT / "data" / "categories" / "labels.jsonl").read_text().splitlines()]
    rubric = (ROOT / "data" / "categories" / "RUBRIC.md").read_text()
    assert len({r["key"] for r in lines}) == len(lines) > 1000
    assert all(f"`{r['category']}`" in rubric and r["reader"] for r in lines)
