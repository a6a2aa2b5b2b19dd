"""train.py on the tiny preset: the stages end to end, resume, NaN stop, flags and bad input."""
import dataclasses
import json
import os
import re
import signal

import pytest
import torch
from conftest import interrupt_at, interrupt_selector_at, make_model, make_tokenizer

import default_weights
import defenses
import fast
import files
import hf
import model as M
import train
from data.batches import Stream, encode_samples
from data.samples import load_jsonl


def test_stage_all_tiny_writes_every_output(tmp_path):
    train.main(["--stage", "all", "--preset", "tiny", "--out", str(tmp_path), "--select-steps", "2"])
    for stage, files in {"select": ["selection.jsonl", "subset.jsonl"], "align": ["model", "adapter"],
                         "finetune": ["adapter", "metrics.jsonl"], "eval": ["results.json", "generations.jsonl"]}.items():
        assert (tmp_path / stage / "summary.json").exists()
        for f in files:
            assert (tmp_path / stage / f).exists(), (stage, f)
    pool = load_jsonl(train.ROOT / "data" / "default" / "pool.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "select" / "selection.jsonl").read_text().splitlines()]
    subset = load_jsonl(tmp_path / "select" / "subset.jsonl")  # validates against the data format
    assert len(rows) == len(pool) and sum(r["selected"] for r in rows) == len(subset)
    assert sorted(r["rank"] for r in rows) == list(range(len(pool)))
    align = json.loads((tmp_path / "align" / "summary.json").read_text())
    assert align["n_align"] == len(subset) and align["tokens_per_s"] > 0 and align["passes_per_step"] == 1
    retain = load_jsonl(train.ROOT / "data" / "default" / "retain.jsonl")
    assert align["n_retain"] == len(retain) > 0 and align["n_train"] == len(subset) + len(retain)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0 <= results["harmful_score"] <= 100 and results["selector"] == "pharmacist"
    assert results["model"].endswith("finetune/adapter")  # the attacked model: aligned model + adapter
    finetune = json.loads((tmp_path / "finetune" / "summary.json").read_text())
    assert finetune["final_loss"] > 0 and (tmp_path / "finetune" / "config.json").exists()
    assert not list(tmp_path.glob("*/.settings.started.json"))  # finished stages keep only config.json


def test_align_without_retain_trains_on_the_subset_alone(tmp_path):
    train.main(["--stage", "align", "--preset", "tiny", "--out", str(tmp_path), "--align-retain", "",
                "--align-max-steps", "1"])
    align = json.loads((tmp_path / "align" / "summary.json").read_text())
    assert align["n_retain"] == 0 and align["n_train"] == align["n_align"]


def tiny_run(tmp_path, name, cfg, monkeypatch=None, stop_at=None, resume=False, stop=KeyboardInterrupt):
    """Train the tiny model on the embedded pool; optionally raise `stop` (Ctrl-C) at step `stop_at`.
    A resumed run starts from another RNG state: the checkpoint must restore it."""
    torch.manual_seed(123 if resume else 0)
    model, tok = make_model(), make_tokenizer()
    M.add_lora(model, 4, 8)
    samples = load_jsonl(train.ROOT / "data" / "default" / "pool.jsonl")
    ex = encode_samples(samples, tok, 48)
    harmful = Stream(ex, 4, tok.pad_id, seed=1)
    ctx = defenses.Context(model=model, params=[p for p in model.parameters() if p.requires_grad],
                           next_harmful=harmful, next_align=harmful, n_samples=len(ex),
                           # T-Vaccine: 1 of 2 blocks (the other None), drawn again at steps 6 and 9, after
                           # the checkpoint of step 4: the resumed draws need the RNG restored
                           cfg=defenses.DefenseConfig(tvaccine_layers=1, tvaccine_every=3))
    if stop_at is not None:
        real = defenses.STEPS[cfg.defense]

        def interrupted(ctx, batch):
            if ctx.step == stop_at:
                if stop == "SIGTERM":
                    os.kill(os.getpid(), signal.SIGTERM)
                raise stop
            return real(ctx, batch)
        monkeypatch.setitem(defenses.STEPS, cfg.defense, interrupted)
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    train.train(model, ex, tok.pad_id, cfg, ctx, out, {"harmful": harmful}, resume=resume)
    return [p.detach().clone() for p in ctx.params]


@pytest.mark.parametrize("defense", ["sft", "booster", "repnoise", "tvaccine"])  # repnoise draws noise: the RNG restored; tvaccine keeps layers frozen (None gradients)
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch, defense):
    cfg = train.TrainConfig(defense=defense, epochs=2, batch_size=4, grad_accum=2, lr=1e-2, save_every=100)
    straight = tiny_run(tmp_path, "a", cfg)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path, "b", cfg, monkeypatch, stop_at=4)
    monkeypatch.undo()
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 4
    resumed = tiny_run(tmp_path, "b", cfg, resume=True)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_a_truncated_checkpoint_is_an_error_that_names_it(tmp_path, monkeypatch):
    cfg = train.TrainConfig(epochs=1, batch_size=4, lr=1e-2, save_every=100)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path, "c", cfg, monkeypatch, stop_at=2)
    monkeypatch.undo()
    ckpt = tmp_path / "c" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="checkpoint.pt: unreadable checkpoint"):
        tiny_run(tmp_path, "c", cfg, resume=True)


def test_metrics_lines_are_valid_json():
    line = train.json_line(dict(step=1, loss=float("nan"), grad_norm=float("inf"), lr=1e-3))
    assert json.loads(line) == dict(step=1, loss=None, grad_norm=None, lr=1e-3) and "NaN" not in line


def test_sigterm_checkpoints_like_ctrl_c(tmp_path, monkeypatch):
    cfg = train.TrainConfig(epochs=1, batch_size=4, lr=1e-2, save_every=100)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path, "t", cfg, monkeypatch, stop_at=3, stop="SIGTERM")
    assert torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=False)["step"] == 3


def test_a_crash_then_resume_logs_every_step_once(tmp_path, monkeypatch):
    """Killed between checkpoints (here: an error at step 3, the last checkpoint at step 2), the
    resumed run drops the metrics rows after its checkpoint and writes each step once."""
    cfg = train.TrainConfig(epochs=1, batch_size=4, lr=1e-2, save_every=2)
    with pytest.raises(RuntimeError):
        tiny_run(tmp_path, "k", cfg, monkeypatch, stop_at=3, stop=RuntimeError)
    monkeypatch.undo()
    tiny_run(tmp_path, "k", cfg, resume=True)
    rows = [json.loads(x) for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) > 3
    assert rows[0]["lr"] > 0 and rows[-1]["lr"] > 0  # the rate each step used (the schedule ends after it)


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    def nan_at_3(ctx, batch):
        grads, stats = defenses.sft_step(ctx, batch)
        return grads, dict(stats, loss=float("nan") if ctx.step == 3 else stats["loss"])
    monkeypatch.setitem(defenses.STEPS, "sft", nan_at_3)
    cfg = train.TrainConfig(epochs=1, batch_size=4, save_every=2)
    with pytest.raises(train.NonFiniteLoss, match="step 3"):
        tiny_run(tmp_path, "nan", cfg)
    # the periodic checkpoint of step 2 stays: the weights that led to the NaN are not saved over it
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert [json.loads(x)["step"] for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    bad = json.loads((tmp_path / "nan" / "nonfinite.json").read_text())
    assert bad["step"] == 3 and bad["stats"]["loss"] is None and len(bad["rows"]) == 4  # NaN written as null


def test_every_config_field_has_a_flag():
    actions = [a for a in train.build_parser(train.Config())._actions if a.dest != "help"]
    n_fields = sum(len(dataclasses.fields(getattr(train.Config(), f.name)))
                   if dataclasses.is_dataclass(getattr(train.Config(), f.name)) else 1
                   for f in dataclasses.fields(train.Config))
    assert len(actions) == len({a.dest for a in actions}) == n_fields  # 1:1, no two fields share a flag
    for a in actions:  # a section's flags carry its prefix
        section = a.dest.partition(".")[0] if "." in a.dest else None
        assert section is None or a.option_strings[0].startswith("--" + train.SECTIONS[section]), a.option_strings
    cfg = train.parse_args(["--preset", "tiny", "--select-keep", "0.25", "--align-lr", "0.01", "--align-bf16",
                            "--defense-rho", "3", "--eval-limit", "5"])
    assert (cfg.select.keep, cfg.align.lr, cfg.align.bf16, cfg.defense.rho, cfg.eval.limit) == (0.25, 0.01, True, 3.0, 5)
    assert cfg.model == "tiny-random" and cfg.finetune.lr == train.Config().finetune.lr


@pytest.mark.parametrize("argv", [["--stage", "nope"], ["--preset", "huge"], ["--align-defense", "bds"],
                                  ["--finetune-defense", "vaccine"], ["--align-lr", "fast"],
                                  ["--seed", "1"], ["--keep", "0.5"], ["--rho", "3"],  # unprefixed: no such flag
                                  ["--select-selector", "magic"], ["--select-mode", "magic"],
                                  ["--select-outer-every", "0"], ["--align-clip", "0"], ["--align-epochs", "0"],
                                  ["--finetune-lr", "-1e-4"], ["--align-lr", "inf"], ["--align-lr", "nan"], ["--align-batch-size", "0"], ["--select-passes", "0"],
                                  ["--eval-max-new-tokens", "0"], ["--eval-limit", "-1"], ["--eval-judge", "trainedd"],
                                  ["--eval-tasks", "harmful,sst"], ["--attack-task", "imdb"], ["--data", "no/such/dir"],
                                  ["--align-bf16", "maybe"], ["--eval-judge", "moderation"],
                                  ["--align-compile", "--align-defense", "vaccine"],
                                  # issue 34: found before any model loads
                                  ["--select-keep", "1.5"], ["--select-keep", "401"], ["--select-keep", "nan"],
                                  ["--select-lora-layers", "-2"], ["--select-steps", "-1"], ["--select-inner-lr", "-1"],
                                  ["--select-outer-decay", "0"], ["--select-outer-decay", "1.5"],
                                  ["--align-lora-targets", "foo_proj"], ["--align-lora-targets", ""],
                                  ["--align-max-len", "1"], ["--attack-p", "0.9", "--stage", "all"],
                                  ["--eval-moderation-model", "/nonexistent"],
                                  ["--defense-rho", "-1"], ["--defense-repnoise-lens-layers", "-1"],
                                  ["--defense-tvaccine-layers", "0"], ["--defense-bds-lr", "0"],
                                  ["--defense-repnoise-alpha", "nan"], ["--defense-bds-weighting", "tanh"]])
def test_bad_flags_are_errors(argv, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_missing_earlier_stage_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--stage align"):
        train.main(["--stage", "finetune", "--preset", "tiny", "--out", str(tmp_path)])


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        train.main(["--stage", "select", "--preset", "tiny", "--out", str(tmp_path), "--data", str(tmp_path)])


def test_bad_keep_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):  # found by the flag checks, before any work
        train.main(["--stage", "select", "--preset", "tiny", "--out", str(tmp_path), "--select-keep", "0"])
    assert "--select-keep 0.0: must be > 0" in capsys.readouterr().err


def test_a_redone_stage_redoes_the_stages_that_read_it(tmp_path, capsys):
    """select redone with another selector: `--stage all` redoes align, finetune and eval (their
    input changed) instead of keeping outputs of the old selection."""
    base = ["--preset", "tiny", "--out", str(tmp_path), "--select-steps", "2", "--align-max-steps", "2",
            "--finetune-max-steps", "2", "--eval-limit", "2"]
    train.main(["--stage", "all", *base])
    before = {s: json.loads((tmp_path / s / "summary.json").read_text())["fingerprint"] for s in train.STAGES}
    train.main(["--stage", "select", "--force", "--select-selector", "random", *base])
    capsys.readouterr()
    train.main(["--stage", "all", "--select-selector", "random", *base])
    after = {s: json.loads((tmp_path / s / "summary.json").read_text()) for s in train.STAGES}
    assert all(after[s]["fingerprint"] != before[s] for s in train.STAGES)
    assert after["align"]["selector"] == "random" and "redoing align" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"other settings \(align.lr"):  # its own flag changed: no silent reuse
        train.main(["--stage", "align", "--select-selector", "random", "--align-lr", "0.1", *base])


def test_a_data_folder_that_differs_in_the_attack_keeps_the_alignment(tmp_path, capsys):
    """Another attack file (another --p) in a copy of the data folder: align, which never reads
    it, is kept; finetune, which does, is an error naming the file (--force redoes it)."""
    import shutil
    other = tmp_path / "data"
    shutil.copytree(train.ROOT / "data" / "default", other)
    rows = (other / "attack_sst2.jsonl").read_text().splitlines(keepends=True)
    (other / "attack_sst2.jsonl").write_text("".join(rows[1:]))
    manifest = json.loads((other / "manifest.json").read_text())  # as prepare.py writes it
    manifest["files"]["attack_sst2.jsonl"] = files.content_hash(other / "attack_sst2.jsonl")
    (other / "manifest.json").write_text(json.dumps(manifest))
    base = ["--preset", "tiny", "--out", str(tmp_path / "run"), "--select-steps", "2", "--align-max-steps", "2",
            "--finetune-max-steps", "2"]
    for stage in ("select", "align", "finetune"):
        train.main(["--stage", stage, *base])
    capsys.readouterr()
    for stage in ("select", "align"):
        train.main(["--stage", stage, "--data", str(other), *base])
        assert f"[{stage}] already done" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"other inputs \(data.attack_sst2.jsonl"):
        train.main(["--stage", "finetune", "--data", str(other), *base])


def test_attack_p_takes_another_harmful_share_of_the_same_rows():
    own = train.attack_rows(train.parse_args(["--preset", "tiny"]))
    half = train.attack_rows(train.parse_args(["--preset", "tiny", "--attack-p", "0.05"]))
    harmful = [s for s in own if s.is_safe is False]
    assert (len(own), len(harmful)) == (40, 4) and len(half) == 40
    assert {s.id for s in half if s.is_safe is False} == {s.id for s in harmful[:2]}  # fewer of the same rows
    assert len({s.id for s in half}) == 40  # task rows fill the rest, none twice
    with pytest.raises(ValueError, match="--attack-p 0.5: 20 harmful rows needed"):
        train.attack_rows(train.parse_args(["--preset", "tiny", "--attack-p", "0.5"]))
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "tiny", "--attack-p", "1.5"])


def test_a_damaged_summary_is_an_error_naming_it(tmp_path):
    base = ["--preset", "tiny", "--out", str(tmp_path), "--select-steps", "2"]
    train.main(["--stage", "select", *base])
    (tmp_path / "select" / "summary.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"select/summary.json: not valid JSON .*--force"):
        train.main(["--stage", "select", *base])


def test_flag_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--preset", "tiny", "--align-bogus", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unrecognized arguments: --align-bogus" in err


def test_resume_with_other_flags_is_an_error(tmp_path, monkeypatch):
    base = ["--preset", "tiny", "--out", str(tmp_path), "--stage", "align"]
    interrupt_at(monkeypatch, "sft", 1)
    with pytest.raises(KeyboardInterrupt):
        train.main(base)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="align.lr"):
        train.main([*base, "--resume", "--align-lr", "0.01"])
    train.main([*base, "--resume"])  # the same flags: continues
    assert (tmp_path / "align" / "summary.json").exists()


def test_two_processes_cannot_share_a_run_folder(tmp_path):
    import subprocess
    import sys
    import time
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(train.ROOT)!r}); "
                               f"import train; lock = train.run_lock(__import__('pathlib').Path({str(tmp_path)!r})); "
                               "lock.__enter__(); print('held', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"another process is running in it \\(pid {holder.pid}\\)"):
            train.main(["--stage", "select", "--preset", "tiny", "--out", str(tmp_path)])
        assert not (tmp_path / "select").exists()  # nothing started
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with train.run_lock(tmp_path):  # the holder is gone: the lock is free again
        pass


def test_select_stage_resumes_after_ctrl_c(tmp_path, monkeypatch):
    base = ["--stage", "select", "--preset", "tiny", "--select-mode", "bilevel", "--select-steps", "6",
            "--select-save-every", "2"]
    train.main([*base, "--out", str(tmp_path / "a")])
    interrupt_selector_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train.main([*base, "--out", str(tmp_path / "b")])
    monkeypatch.undo()
    assert not (tmp_path / "b" / "select" / "summary.json").exists()
    train.main([*base, "--out", str(tmp_path / "b"), "--resume"])
    read = lambda run: (run / "select" / "selection.jsonl").read_text()
    assert read(tmp_path / "b") == read(tmp_path / "a")


def test_select_prints_a_summary_a_person_can_read(tmp_path, capsys):
    """kept k of N, the three highest- and the three lowest-scored rows (score, prompt, answer) in
    lines of at most 100 characters, the kept rows by planted kind, the precision on clean
    refusals, and where the files are."""
    train.main(["--stage", "select", "--preset", "tiny", "--out", str(tmp_path), "--select-steps", "2"])
    out = capsys.readouterr().out
    pool = {s.id: s for s in load_jsonl(train.ROOT / "data" / "default" / "pool.jsonl")}
    rows = sorted((json.loads(x) for x in (tmp_path / "select" / "selection.jsonl").read_text().splitlines()),
                  key=lambda r: r["rank"])
    kept = [pool[r["id"]].category for r in rows if r["selected"]]
    assert f"pharmacist kept {len(kept)} of {len(pool)} pool rows" in out and 0 < len(kept) < len(pool)
    shown = [line for line in out.splitlines() if re.match(r" *[+-]\d+\.\d{4}  ", line)]
    assert len(shown) == 6 and max(map(len, shown)) <= 100
    for line, r in zip(shown, rows[:3] + rows[-3:]):  # best first, then the three lowest
        s = pool[r["id"]]
        assert line.startswith(f"{r['score']:+9.4f}  {s.prompt[:20]}") and s.response[:20] in line, (line, s)
    planted = [s.category for s in pool.values()]
    for kind in ("refusal", "low_quality", "benign", "mislabelled"):
        assert f"{kind} {kept.count(kind)} of {planted.count(kind)}" in out
    assert f"precision (clean refusals among the {len(kept)} kept): {kept.count('refusal') / len(kept):.3f}" in out
    assert f"files in {tmp_path / 'select'}/:" in out and "selection.jsonl" in out and "subset.jsonl" in out


def test_the_select_summary_of_a_pool_without_planted_kinds():
    """Kinds are counted only where every row carries one: here three rows of four have none."""
    pool = load_jsonl(train.ROOT / "data" / "default" / "pool.jsonl")[:4]
    pool[:3] = [dataclasses.replace(s, category=None) for s in pool[:3]]
    report = train.select_report(pool, [0.5, 2.0, -1.0, 1.0], [2, 0, 3, 1], 2, "loss", "runs/x/select")
    assert report.splitlines()[0] == "loss kept 2 of 4 pool rows" and "files in runs/x/select/:" in report
    assert "planted" not in report and "precision" not in report and "rows between" not in report
    assert [line.split()[0] for line in report.splitlines()[2:6]] == ["+2.0000", "+1.0000", "+0.5000", "-1.0000"]
    full = train.select_report(pool, [0.0] * 4, [0, 1, 2, 3], 4, "full", "runs/x/select")
    assert full.splitlines()[0] == "full kept 4 of 4 pool rows (full keeps every row; --select-keep is not used)"


def test_bf16_training_follows_the_fp32_run(tmp_path, monkeypatch):
    """40 SFT steps over bf16 frozen weights (float32 adapters and Adam) against the same run in
    float32, on the tiny model: the loss curves within 0.1 % of each other, the adapters within 3 %
    (relative norm of the difference), and the aligned model merged into the float32 weights."""
    monkeypatch.setattr(fast, "_cpu_bf16_faster", lambda: True)  # bf16 on any CPU (slow ones too)
    runs = {}
    for bf16 in ("false", "true"):
        out = tmp_path / bf16
        train.main(["--stage", "align", "--preset", "tiny", "--out", str(out), "--align-epochs", "20",
                    "--align-max-steps", "40", "--align-lr", "3e-3", "--align-bf16", bf16])
        losses = [json.loads(x)["loss"] for x in (out / "align" / "metrics.jsonl").read_text().splitlines()]
        adapter = hf.load_lora(make_model(), out / "align" / "adapter")
        runs[bf16] = losses, [p.detach().clone() for p in adapter.parameters() if p.requires_grad]
        summary = json.loads((out / "align" / "summary.json").read_text())
        assert summary["precision"] == ("bf16" if bf16 == "true" else "fp32")
    (l32, a32), (l16, a16) = runs["false"], runs["true"]
    assert len(l32) == len(l16) == 40 and l32[-1] < l32[0] - 0.2  # it trains
    assert max(abs(a - b) / a for a, b in zip(l32, l16)) < 1e-3  # measured 6e-5
    diff = torch.sqrt(sum((a - b).square().sum() for a, b in zip(a32, a16)))
    assert diff / torch.sqrt(sum(a.square().sum() for a in a32)) < 0.03  # measured 0.006
    merged, _ = hf.load_pretrained(tmp_path / "true" / "align" / "model", device="cpu")
    base, _ = default_weights.load_pretrained("tiny-random", device="cpu", dtype=torch.float32)
    want = M.merge_lora(hf.load_lora(base, tmp_path / "true" / "align" / "adapter"))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), want.state_dict().values()))


def test_a_later_field_at_its_default_leaves_the_settings_as_they_were():
    """--eval-compile came after runs were made: off, the eval settings (and so the fingerprints of
    finished runs) are what they were without it; on, they differ."""
    off = train.stage_settings(train.parse_args(["--preset", "tiny"]), "eval")
    on = train.stage_settings(train.parse_args(["--preset", "tiny", "--eval-compile"]), "eval")
    assert "compile" not in off["eval"] and on["eval"]["compile"] is True
    assert train.changed(off, on) == ["eval.compile None -> True"]
    for stage in ("align", "finetune"):
        off = train.stage_settings(train.parse_args(["--preset", "tiny"]), stage)
        on = train.stage_settings(train.parse_args(["--preset", "tiny", f"--{stage}-compile"]), stage)
        assert "compile" not in off[stage] and train.changed(off, on) == [f"{stage}.compile None -> True"]
    for stage in ("align", "finetune"):  # --defense-repnoise-lens-layers came after T-Vaccine runs had started
        off = train.stage_settings(train.parse_args(["--preset", "tiny"]), stage)
        on = train.stage_settings(train.parse_args(["--preset", "tiny", "--defense-repnoise-lens-layers", "6"]), stage)
        assert "repnoise_lens_layers" not in off["defense"]
        assert train.changed(off, on) == ["defense.repnoise_lens_layers None -> 6"]


FAST = ["--preset", "tiny", "--select-steps", "2", "--align-max-steps", "2", "--finetune-max-steps", "2",
        "--eval-limit", "1", "--eval-max-new-tokens", "2", "--eval-tasks", "harmful"]


def test_a_defense_setting_changed_on_a_finished_stage_is_an_error(tmp_path):
    train.main(["--stage", "align", *FAST, "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"other settings \(defense.rho"):
        train.main(["--stage", "align", *FAST, "--out", str(tmp_path), "--defense-rho", "3"])


def test_a_defense_setting_changed_on_a_finished_finetune_is_an_error(tmp_path):
    base = ["--stage", "finetune", *FAST, "--finetune-defense", "bds", "--out", str(tmp_path)]
    train.main(["--stage", "align", *FAST, "--out", str(tmp_path)])
    train.main(base)
    summary = json.loads((tmp_path / "finetune" / "summary.json").read_text())
    assert 0.0 <= summary["bds_harmful_share"] <= 1.0 and summary["n_harmful"] > 0  # the weight on the harmful rows
    with pytest.raises(ValueError, match=r"finetune was made with other settings \(defense.bds_lr"):
        train.main([*base, "--defense-bds-lr", "0.05"])


def test_a_defense_setting_changed_under_stage_all_is_an_error_too(tmp_path, capsys):
    """--stage all redoes a stage whose inputs changed, never one whose own flags did."""
    base = ["--stage", "all", *FAST, "--out", str(tmp_path)]
    train.main(base)
    before = (tmp_path / "align" / "summary.json").read_text()
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"align was made with other settings \(defense.repnoise_alpha"):
        train.main([*base, "--defense-repnoise-alpha", "0.5"])
    assert "[select] already done" in capsys.readouterr().out
    assert (tmp_path / "align" / "summary.json").read_text() == before


def test_a_finetune_made_over_another_aligned_model_is_not_done(tmp_path):
    """align/ replaced by a finished align of the same selection with another lr (copied from a
    run that shares select/): the finetune made over the old model is not reused."""
    import shutil
    run, other = tmp_path / "run", tmp_path / "other"
    for stage in ("select", "align", "finetune"):
        train.main(["--stage", stage, *FAST, "--out", str(run)])
    shutil.copytree(run / "select", other / "select")
    train.main(["--stage", "align", *FAST, "--out", str(other), "--align-lr", "0.002"])
    shutil.rmtree(run / "align")
    shutil.copytree(other / "align", run / "align")
    with pytest.raises(ValueError, match=r"finetune was made from other inputs \(inputs.align/model"):
        train.main(["--stage", "finetune", *FAST, "--out", str(run)])


def hand_built(tmp_path):
    """A copy of the default data folder without file hashes in its manifest (a folder built or
    edited by hand: train.py checks what each stage read instead)."""
    import shutil
    data = shutil.copytree(train.ROOT / "data" / "default", tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["files"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def test_a_stage_refuses_an_earlier_stage_whose_data_changed(tmp_path, capsys):
    """Issue 34, C: a selected pool row edited after select: align alone is an error naming the
    file; --stage all redoes select and then align."""
    data = hand_built(tmp_path)
    base = [*FAST, "--data", str(data), "--out", str(tmp_path / "run")]
    train.main(["--stage", "select", *base])
    chosen = load_jsonl(tmp_path / "run" / "select" / "subset.jsonl")[0].id
    rows = [json.loads(x) for x in (data / "pool.jsonl").read_text().splitlines()]
    for r in rows:
        r["response"] += " (edited)" if r["id"] == chosen else ""
    (data / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"select is stale: .*data.pool.jsonl"):
        train.main(["--stage", "align", *base])
    train.main(["--stage", "all", *base])
    assert any(s.response.endswith("(edited)") for s in load_jsonl(tmp_path / "run" / "select" / "subset.jsonl"))


def test_a_changed_task_row_under_attack_p_is_another_finetune_input(tmp_path):
    """--attack-p takes its task rows from finetune_{task}.jsonl: an edit there is a change of
    the finetune's data (a folder without manifest hashes: the stage's record catches it)."""
    data = hand_built(tmp_path)
    base = [*FAST, "--data", str(data), "--out", str(tmp_path / "run"), "--attack-p", "0.05"]
    for stage in ("align", "finetune"):
        train.main(["--stage", stage, *base])
    rows = [json.loads(x) for x in (data / "finetune_sst2.jsonl").read_text().splitlines()]
    rows[0]["input"] = "an edited " + rows[0]["input"]
    (data / "finetune_sst2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"finetune was made from other inputs \(data.finetune_sst2.jsonl"):
        train.main(["--stage", "finetune", *base])


def test_a_stage_refuses_a_changed_model_or_a_missing_earlier_output(tmp_path, tiny_dir):
    """Issue 34, C: the --model folder's weights replaced under a finished align: an error naming
    the model; align/model deleted under a finished finetune: eval names it."""
    base = [*FAST, "--model", str(tiny_dir), "--out", str(tmp_path / "run")]
    train.main(["--stage", "all", *base])
    hf.save_pretrained(make_model(seed=1), make_tokenizer(), tiny_dir)
    with pytest.raises(ValueError, match=r"select was made from other inputs \(inputs.model"):
        train.main(["--stage", "select", *base])
    for stage in ("align", "eval"):  # a later stage names the first stage that read the old weights
        with pytest.raises(ValueError, match=r"select is stale: .*inputs.model"):
            train.main(["--stage", stage, *base])
    train.main(["--stage", "all", *base])  # redoes every stage
    import shutil
    shutil.rmtree(tmp_path / "run" / "align" / "model")
    with pytest.raises(ValueError, match=r"align/model is missing or changed since align finished"):
        train.main(["--stage", "eval", *base])


def test_a_killed_redo_never_reads_as_done(tmp_path, monkeypatch, capsys):
    """Issue 34, A, the reproducer: a --force redo of align with another lr interrupted after its
    new adapter is written: the next run redoes align (and what reads it), not "already done"."""
    base = [*FAST, "--out", str(tmp_path)]
    train.main(["--stage", "all", *base])
    real = M.merge_lora
    monkeypatch.setattr(M, "merge_lora", lambda model: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train.main(["--stage", "align", "--force", "--align-lr", "0.001", *base])
    monkeypatch.setattr(M, "merge_lora", real)
    capsys.readouterr()
    with pytest.raises(ValueError, match="align is unfinished"):
        train.main(["--stage", "finetune", *base])
    train.main(["--stage", "all", "--align-lr", "0.001", *base])
    out = capsys.readouterr().out
    assert "[align] already done" not in out and "[finetune] already done" not in out
    assert json.loads((tmp_path / "align" / "summary.json").read_text())["settings"]["align"]["lr"] == 0.001


def test_run_flags_are_checked_first(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for argv, message in [(["--out", ""], "--out ''"), (["--out", str(tmp_path / "file")], "a file, not a folder"),
                          (["--resume", "--force"], "choose one")]:
        with pytest.raises(SystemExit):
            train.parse_args(["--preset", "tiny", *argv])
        assert message in capsys.readouterr().err


def test_a_half_written_metrics_line_does_not_block_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    train.keep_metrics(path, 5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
