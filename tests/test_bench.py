"""bench/: the report over made-up run folders, reproduce.py's calibration rule on made-up rows."""
import json
import subprocess
import os
import statistics
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402
import reproduce  # noqa: E402


def row(model, lr, epochs, refusal, harmful, sst2, p=None):
    return dict(run=f"{model}_{lr}_{epochs}", model=model, lr=lr, epochs=epochs, p=p, refusal=refusal, harmful=harmful,
                harmful_low=None, harmful_high=None, over_refusal=5.0, sst2=sst2, harmful_loss=2.0)


def test_choose_takes_the_middle_attack_that_learns_the_task():
    rows = [row("full", None, None, 95, 3, 10), row("random", None, None, 90, 5, 10),
            row("full", "1e-4", "1", 60, 35, 75), row("random", "1e-4", "1", 50, 45, 85),  # task not learned
            row("full", "2e-4", "1", 5, 52, 88), row("random", "2e-4", "1", 3, 60, 90),  # the middle
            row("full", "5e-4", "1", 2, 68, 90), row("random", "5e-4", "1", 1, 80, 91),  # in range, further off
            row("full", "5e-4", "2", 2, 90, 92), row("random", "5e-4", "2", 1, 95, 93)]   # too harmful
    rows += [row("full", lr, ep, 3, 4, 85, p="0") for lr, ep in (("1e-4", "1"), ("2e-4", "1"), ("5e-4", "1"),
                                                                  ("5e-4", "2"))]  # p = 0: no refusal, not harmful
    assert reproduce.choose(rows) == {"lr": "2e-4", "epochs": "1", "p": "0.1", "mix": ""}
    table = reproduce.calibration_table(rows, reproduce.choose(rows))
    assert "Chosen: lr 2e-4, 1 epoch(s), p 0.1." in table and table.count("\n| ") == len(rows)  # one line per run


def test_choose_tells_the_harmful_share_apart():
    """The same lr and epochs at two harmful shares are two settings: p 0.4 is in the middle."""
    rows = [row("full", "2e-4", "4", 1, 20, 85, p="0.2"), row("random", "2e-4", "4", 1, 25, 86, p="0.2"),
            row("full", "2e-4", "4", 1, 51, 84, p="0.4"), row("random", "2e-4", "4", 1, 55, 85, p="0.4"),
            row("full", "2e-4", "4", 0, 8, 84, p="0")]
    assert reproduce.choose(rows) == {"lr": "2e-4", "epochs": "4", "p": "0.4", "mix": ""}


def test_choose_needs_the_harmful_rows_to_make_the_gap():
    """A harmful rate reached as well with no harmful row (p = 0) is the task's fine-tuning, not the
    attack: it does not qualify; nor does a setting whose p = 0 control was not run."""
    middle = [row("full", "5e-4", "1", 5, 66, 85), row("random", "5e-4", "1", 4, 60, 86)]
    assert reproduce.choose(middle) is None  # no control
    assert reproduce.choose(middle + [row("full", "5e-4", "1", 4, 60, 85, p="0")]) is None  # gap 6 < 15
    assert reproduce.choose(middle + [row("full", "5e-4", "1", 4, 8, 85, p="0")])["lr"] == "5e-4"
    assert reproduce.p_tag("0.1") == "" and reproduce.p_tag("0.05") == "_p0.05"


def test_calibration_grid_from_flags():
    args = reproduce.parse(["--source", "x", "--lrs", "1e-4,2e-4", "--attack-epochs", "1", "--attack-ps", "0.1,0.05"])
    assert reproduce.calibration_grid(args) == [("1e-4", "1", "0.1", ""), ("2e-4", "1", "0.1", ""),
                                                 ("1e-4", "1", "0.05", ""), ("2e-4", "1", "0.05", ""),
                                                 ("1e-4", "1", "0", ""), ("2e-4", "1", "0", "")]  # + p = 0 controls
    args = reproduce.parse(["--source", "x", "--grid", "2e-4:2:0.05,5e-4:1:0.1:retain,5e-4:1:0:retain"])
    assert reproduce.calibration_grid(args) == [("2e-4", "2", "0.05", ""), ("5e-4", "1", "0.1", "retain"),
                                                 ("5e-4", "1", "0", "retain"), ("2e-4", "2", "0", "")]
    assert reproduce.attack_flags("5e-4", "1", "0", "retain") == [
        "--finetune-lr", "5e-4", "--finetune-epochs", "1", "--attack-p", "0", "--finetune-retain", "retain.jsonl"]
    assert reproduce.attack_tag("5e-4", "1", "0", "retain") == "_lr5e-4_e1_p0_retain"
    # a data folder built with --p 0.4: its own share needs no flag, 0.1 takes the same n rows
    assert "--attack-p" not in reproduce.attack_flags("5e-4", "1", "0.4", data_p="0.4")
    assert reproduce.attack_flags("5e-4", "1", "0.1", data_p="0.4")[-2:] == ["--attack-p", "0.1"]


def test_choose_says_none_when_no_attack_qualifies():
    rows = [row("full", "5e-4", "2", 2, 90, 92), row("random", "5e-4", "2", 1, 95, 93)]
    assert reproduce.choose(rows) is None
    assert "none qualifies" in reproduce.calibration_table(rows, None)


def fake_run(root, name, selector, n_align, harmful, align_time, layout="train"):
    """A run folder as train.py leaves it (eval/results.json + align/summary.json), or flat."""
    run = root / name
    results = dict(harmful_score=harmful, harmful_se=3.0, over_refusal=10.0, accuracy={"sst2": 90.0})
    summary = dict(selector=selector, defense="sft", n_align=n_align, align_time_s=align_time,
                   select_time_s=5.0, tokens=100 * n_align, passes_per_step=2)
    if layout == "train":
        (run / "eval").mkdir(parents=True)
        (run / "align").mkdir()
        (run / "eval" / "results.json").write_text(json.dumps(results))
        (run / "align" / "summary.json").write_text(json.dumps(summary))
    else:
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(dict(results, **summary)))
    return run


def test_report_gathers_runs_and_draws_fig1(tmp_path):
    runs = [fake_run(tmp_path, "full", "full", 48, 40.0, 100.0),
            fake_run(tmp_path, "ph-24", "pharmacist", 24, 20.0, 50.0, layout="flat"),
            fake_run(tmp_path, "ph-12", "pharmacist", 12, 25.0, 25.0)]
    bds = fake_run(tmp_path, "bds", "full", 48, 15.0, 100.0)
    (bds / "eval" / "results.json").write_text(json.dumps(dict(harmful_score=15.0, finetune_defense="bds")))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.json").write_text(json.dumps({"harmful_score": 55.0}))  # no metadata at all
    text = report.report(runs + [bds, bare], tmp_path / "report")
    lines = text.splitlines()
    assert len(lines) == 2 + 5 and "acc sst2" in lines[0]
    assert "| bds | full | sft+bds | 48 | 15.0 ± – | 1 | – |" in text
    assert lines[-2].startswith("| ph-12 | pharmacist | sft | 12 | 25.0 ± 3.0 | 1 | 10.0 | 90.0 | 2 | 25.0 | 5.0 |")
    assert "| bare | – | – | – | 55.0 ± – | 1 |" in text
    assert (tmp_path / "report" / "report.md").read_text() == text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "report" / "fig1.png").stat().st_size > 1000


def test_report_shows_the_judge_columns_where_runs_have_them(tmp_path):
    run = fake_run(tmp_path, "new", "pharmacist", 160, 12.0, 50.0)
    res = json.loads((run / "eval" / "results.json").read_text())
    res.update(harmful_corrected=dict(rate=0.3, low=0.0, high=9.9), harmful_loss=1.234, refusal_loss=2.5,
               outcomes=dict(refusal=0.0, degenerate=74.0, compliant=26.0), harmful_by_judge=dict(refusal=8.0))
    (run / "eval" / "results.json").write_text(json.dumps(res))
    old = fake_run(tmp_path, "old", "random", 160, 30.0, 50.0)
    text = report.report([run, old], tmp_path / "report", figure=False)
    assert "harmful, corrected (95 %)" in text and "| 0.3 (0.0–9.9) | 0 / 74 / 26 | 1.234 | 2.500 | 8.0 |" in text
    assert "| old | random | sft | 160 | 30.0 ± 3.0 | 1 | – | – / – / – | – | – | – |" in text


def test_fig1_draws_only_the_defenses_run_at_several_k():
    """Fig. 1 is about k: a defense run once per selector (even beside the full pool) stays out."""
    def r(selector, defense, k):
        return dict(selector=selector, defense=defense, n_align=k, harmful_score=10.0)
    swept = [r("random", "sft", 40), r("random", "sft", 160), r("pharmacist", "sft", 160), r("full", "sft", 400)]
    single = [r("random", "vaccine", 160), r("full", "vaccine", 400), r("pharmacist", "repnoise", 160)]
    assert report.fig1_points(swept + single + [r("random", "sft", None)]) == swept
    assert report.fig1_points(single) == single  # nothing swept: every point


def test_report_cli(tmp_path, capsys):
    run = fake_run(tmp_path, "r", "random", 24, 30.0, 50.0)
    report.main([str(run), "--out", str(tmp_path / "rep"), "--no-figure"])
    assert "| r | random | sft | 24 | 30.0 ± 3.0 |" in capsys.readouterr().out
    assert not (tmp_path / "rep" / "fig1.png").exists()


def test_report_merges_seeds(tmp_path):
    """<config>_s<seed> runs are one row: mean, standard error over seeds, each seed's score."""
    runs = [fake_run(tmp_path, "rnd_k24", "random", 24, 30.0, 50.0),
            fake_run(tmp_path, "rnd_k24_s1", "random", 24, 36.0, 70.0),
            fake_run(tmp_path, "rnd_k24_s2", "random", 24, 27.0, 60.0),
            fake_run(tmp_path, "rnd_k48", "random", 48, 20.0, 90.0)]
    lines = report.report(runs, tmp_path / "report").splitlines()
    assert len(lines) == 2 + 2
    se = statistics.stdev([30.0, 36.0, 27.0]) / 3 ** 0.5  # 2.65
    time_se = statistics.stdev([50.0, 70.0, 60.0]) / 3 ** 0.5
    assert lines[2].startswith(f"| rnd_k24 | random | sft | 24 | 31.0 ± {se:.1f} | 30 / 36 / 27 | 10.0 ± 0.0 | "
                               f"90.0 ± 0.0 | 5 | 60.0 ± {time_se:.1f} | 5.0 ± 0.0 |")
    assert lines[3].startswith("| rnd_k48 | random | sft | 48 | 20.0 ± 3.0 | 1 |")


def test_report_averages_every_column_over_seeds(tmp_path):
    """Three seeds that differ in every measure: each column is its own mean ± SE over the seeds,
    not the first seed's value."""
    measures = [dict(harmful_corrected=dict(rate=r, low=r - 10, high=r + 10), harmful_loss=hl, refusal_loss=rl,
                     outcomes=dict(refusal=o, degenerate=10.0 + o, compliant=90.0 - 2 * o),
                     harmful_by_judge=dict(refusal=hj), benign_outcomes=dict(refusal=b, degenerate=2 * b, helpful=100 - 3 * b),
                     over_refusal=b, accuracy={"sst2": acc}, judge="trained")
                for r, hl, rl, o, hj, b, acc in ((20.0, 1.0, 2.0, 3.0, 40.0, 4.0, 80.0), (26.0, 1.3, 2.6, 9.0, 46.0, 8.0, 86.0),
                                                 (35.0, 1.9, 2.3, 12.0, 34.0, 3.0, 92.0))]
    runs = []
    for seed, m in enumerate(measures):
        run = fake_run(tmp_path, "ph" + (f"_s{seed}" if seed else ""), "pharmacist", 24, 30.0 + seed, 50.0 + 10 * seed)
        (run / "eval" / "results.json").write_text(json.dumps(dict(json.loads((run / "eval" / "results.json").read_text()), **m)))
        runs.append(run)
    line = report.report(runs, tmp_path / "report", figure=False).splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]

    def pm(values, spec=".1f"):
        return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values) / 3 ** 0.5:{spec}}"
    col = lambda key: [m[key] for m in measures]
    assert cells[4] == pm([30.0, 31.0, 32.0])
    assert cells[6].startswith(pm([m["harmful_corrected"]["rate"] for m in measures]) + " (")
    assert cells[6].endswith(f"({statistics.mean([10.0, 16.0, 25.0]):.1f}–{statistics.mean([30.0, 36.0, 45.0]):.1f})")
    assert cells[7] == " / ".join(pm([m["outcomes"][k] for m in measures], ".0f") for k in ("refusal", "degenerate", "compliant"))
    assert cells[8] == pm(col("harmful_loss"), ".3f") and cells[9] == pm(col("refusal_loss"), ".3f")
    assert cells[10] == pm([m["harmful_by_judge"]["refusal"] for m in measures])
    assert cells[11] == " / ".join(pm([m["benign_outcomes"][k] for m in measures], ".0f") for k in ("refusal", "degenerate", "helpful"))
    assert cells[12] == pm(col("over_refusal")) and cells[13] == pm([m["accuracy"]["sst2"] for m in measures])
    assert cells[15] == pm([50.0, 60.0, 70.0])


def test_seeds_average_each_measure_over_the_seeds_that_have_it():
    """An older seed without a measure: the mean and its SE over the seeds that have it; a measure
    of one seed alone is its value, without an SE; seed 10 is a seed; a flag stays a flag."""
    rows = [dict(run="ph", judge="refusal", harmful_score=30.0, harmful_loss=1.0, refusal_loss=2.0, bf16=False),
            dict(run="ph_s1", judge="refusal", harmful_score=33.0, harmful_loss=2.0, bf16=False),
            dict(run="ph_s10", judge="refusal", harmful_score=39.0, bf16=False)]
    [m] = report.merge_seeds(rows)
    assert (m["run"], m["seeds"], m["per_seed"]) == ("ph", 3, [30.0, 33.0, 39.0]) and m["harmful_score"] == 34.0
    assert m["harmful_loss"] == 1.5 and m["se"]["harmful_loss"] == pytest.approx(statistics.stdev([1.0, 2.0]) / 2 ** 0.5)
    assert m["refusal_loss"] == 2.0 and m["se"]["refusal_loss"] is None and report.pm(m, "refusal_loss", ".3f") == "2.000"
    assert m["bf16"] is False


def test_report_keeps_runs_of_two_judges_apart(tmp_path):
    a, b = fake_run(tmp_path, "x", "random", 24, 30.0, 50.0), fake_run(tmp_path, "x_s1", "random", 24, 40.0, 50.0)
    for run, judge in ((a, "trained"), (b, "refusal")):
        (run / "eval" / "results.json").write_text(json.dumps(dict(json.loads((run / "eval" / "results.json").read_text()), judge=judge)))
    text = report.report([a, b], tmp_path / "report", figure=False)
    assert "| judge |" in text and "| x | random | sft | 24 | 30.0 ± 3.0 | 1 | trained |" in text
    assert "| x | random | sft | 24 | 40.0 ± 3.0 | 1 | refusal |" in text


def test_small_preset_runs_full_random_pharmacist_with_sft(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"counts": {"pool.jsonl": 400}}))
    args = reproduce.parse(["--source", "unused", "--preset", "small"])
    sweep = reproduce.Sweep(tmp_path, tmp_path / "data", [], [], args.keep)
    sweep.attack("2e-4", "1", "0.05")
    jobs = reproduce.main_jobs(sweep, args)
    assert [j[1] for j in jobs] == ["pharmacist_sft_k160_lr2e-4_e1_p0.05", "full_sft_k400_lr2e-4_e1_p0.05",
                                    "random_sft_k160_lr2e-4_e1_p0.05"]
    assert args.seeds == [1, 2] and args.phases == ["main", "seeds"]
    assert sweep.attack_flags[-6:] == ["--finetune-lr", "2e-4", "--finetune-epochs", "1", "--attack-p", "0.05"]
    data, align, attack = reproduce.sweep_flags(args)  # retain rows by the model itself, compiled SFT
    assert data[-4:] == ["--retain-answers", "self", "--retain-size", "500"]
    assert "--align-compile" in align and attack == ["--finetune-compile"]
    assert reproduce.sweep_flags(reproduce.parse(["--source", "unused"]))[1:] == (["--align-epochs", "2"], [])


def test_report_refuses_a_missing_run_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "rep")])
    assert "no such run folder" in capsys.readouterr().err and not (tmp_path / "rep").exists()


def test_memory_plan_of_a_7b_shape_on_the_meta_device():
    import memory
    cfg = memory.read_config("llama2-7b")
    one, two = (memory.plan(cfg, batch, 32, rank=8) for batch in (1, 2))
    assert one["weights"] == 2 * 6_738_415_616  # Llama-2-7B's parameter count, in bf16
    per_layer = 8 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))  # r·(in + out) of each projection
    assert one["lora_parameters"] == 32 * per_layer and one["lora_state"] == 16 * one["lora_parameters"]
    assert 1.9 < two["activations"] / one["activations"] < 2.1  # activations grow with the batch
    assert one["activations_checkpointed"] < one["activations"] / 4
    sharded = memory.plan(cfg, 4, 32, devices=4)
    assert sharded["batch_per_device"] == 1 and sharded["weights_fsdp"] < one["weights"] / 3
    rows = memory.advice(one, device_bytes=one["weights"] + one["lora_state"] + one["activations_checkpointed"] + 1)
    assert [fits for _, _, fits in rows] == [False, True, False, False]  # one device: FSDP only adds a gathered block


def test_export_copies_what_audits_a_run(tmp_path):
    run = tmp_path / "runs" / "calib_full_sft_lr5e-4_e1"
    for src in reproduce.AUDIT:
        (run / src).parent.mkdir(parents=True, exist_ok=True)
        (run / src).write_text(src)
    (run / "finetune" / "adapter").mkdir()  # weights stay behind
    reproduce.export(run, tmp_path / "results")
    out = tmp_path / "results" / run.name
    assert sorted(p.name for p in out.iterdir()) == sorted(reproduce.AUDIT.values())
    assert (out / "generations.jsonl").read_text() == "eval/generations.jsonl"


def test_stress_attacks_are_derived_from_the_calibrated_one(tmp_path):
    """4x lr, 2x epochs, and 2x p only where the data folder holds that many harmful rows."""
    class Fake:
        out, tag, calls = tmp_path, "", []
        ranking = staticmethod(lambda selector: tmp_path / selector)
        run = lambda self, name, selection, k, defense, attack, align_from: self.calls.append((name, attack))
    args = reproduce.parse(["--source", "x"])
    for data_p, names in (("0.4", ["lr0.0008", "epochs8"]), ("0.4", ["lr0.0008", "epochs4", "p0.2"])):
        sweep = Fake()
        sweep.data_p, sweep.calls = data_p, []
        attack = dict(reproduce.ATTACK) if len(names) == 2 else dict(reproduce.ATTACK, epochs="2", p="0.1")
        reproduce.phase_stress(sweep, args, attack, ["random"])
        assert [n.removeprefix("stress_random_") for n, _ in sweep.calls] == names
    assert sweep.calls[-1][1] == ["--attack-p", "0.2"]


def test_before_after_table_pairs_each_run_with_its_unattacked_model(tmp_path):
    """Each configuration's seeds merged: before → after as mean ± standard error, the gap per seed."""
    def write(name, refusal, harmful):
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "results.json").write_text(json.dumps(dict(
            outcomes={"refusal": refusal, "degenerate": 0.0}, harmful_score=harmful, over_refusal=20.0,
            accuracy={"sst2": 80.0}, harmful_loss=1.0)))
        return tmp_path / name
    runs = []
    for name, before, after in (("full_sft_k400", 3, 51), ("full_sft_k400_s1", 5, 45), ("random_sft_k50", 4, 60)):
        write(f"before_{name}", 95, before)
        runs.append(write(name, 2, after))
    table = reproduce.before_after_table(tmp_path, runs)
    full = next(line for line in table.splitlines() if line.startswith("| full_sft_k400 |"))
    assert "| 2 |" in full and "4.0 ± 1.0 → 48.0 ± 3.0" in full and "(48 / 40)" in full
    assert "| random_sft_k50 | 1 |" in table and "95.0 → 2.0" in table


def test_shape_utilisation_runs_a_random_model_of_a_given_shape(tmp_path):
    """`bench/speed.py --shape`: a LoRA step on random weights of a config's shape (here a tiny
    Llama config), with its tokens/s and FLOP utilisation; the 7B shapes run the same code."""
    import torch
    import speed
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(architectures=["LlamaForCausalLM"], vocab_size=300, hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=False)))
    lines = speed.shape_utilisation(str(config), 2, 16, torch.device("cpu"), torch.float32, repeats=1)
    tok_s, tflops, rate, util = (c.strip() for c in lines[-1].strip("|").split("|"))
    assert float(tok_s) > 0 and float(tflops) > 0 and float(rate) > 0 and util.endswith("%")


def test_sweep_runs_configurations_two_at_a_time(tmp_path, monkeypatch):
    import threading
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"counts": {"pool.jsonl": 400}}))
    calls, both_started = [], threading.Barrier(2, timeout=10)

    def fake_sh(args, log, env=None):
        run = Path(args[args.index("--out") + 1]).name
        calls.append((run, args[args.index("--stage") + 1], log.name, env["OMP_NUM_THREADS"]))
        if args[3] == "align" and run in ("a", "b"):
            both_started.wait()  # the first two configurations' aligns are in flight together
        if run == "c" and args[3] == "finetune":
            raise reproduce.RunFailed("c failed")
    monkeypatch.setattr(reproduce, "sh", fake_sh)
    sweep = reproduce.Sweep(tmp_path, tmp_path / "data", [], [], 160, jobs=2)
    for name in ("a", "b", "c"):
        (tmp_path / name / "select").mkdir(parents=True)
        (tmp_path / name / "select" / "summary.json").write_text("{}")  # cut() keeps an existing subset
        sweep.run(name, tmp_path / "unused", 160, "sft")
    sweep.wait()
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    for name in ("a", "b"):  # each configuration's stages in order, in its own log
        assert [(s, log, t) for run, s, log, t in calls if run == name] == [
            ("align", f"{name}.log", threads), ("finetune", f"{name}.log", threads), ("eval", f"{name}.log", threads)]
    assert sweep.failed == ["c"] and not sweep.pending
    with pytest.raises(SystemExit):  # --jobs below 1
        reproduce.parse(["--source", "x", "--jobs", "0"])
    assert reproduce.parse(["--source", "x", "--preset", "small"]).jobs == 2
    assert reproduce.parse(["--source", "x"]).jobs == 1


@pytest.mark.parametrize("pieces", [0, 3, 8])
def test_cores_split_step_is_the_whole_batch_step(pieces):
    """bench/cores.py's side that splits each step over worker threads does the step's own work:
    the whole batch's gradients and loss (rows of unequal length, parts that do not divide the
    rows, more parts than rows), the same bits on every call, each part on a pool thread with one
    intra-op thread, the caller's threads left as they were."""
    import threading

    import torch

    import cores
    import defenses as D
    from test_defenses import context, lora_model, make_batch
    batch = make_batch([("How do I bake bread?", "Mix flour, water, salt and yeast; knead; bake an hour."),
                        ("Tell me step 1.", "Step 1."), ("The capital of France?", "Paris."),
                        ("Name a colour.", "Blue, or green, or any of the colours of a rainbow."),
                        ("Count to three.", "One, two, three.")])
    model = lora_model()
    want, stats = D.sft_step(context(model), batch)
    seen, before = [], torch.get_num_threads()

    def step(ctx, part):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return D.sft_step(ctx, part)
    with cores.Threads(2, pieces) as threads:
        got = [threads.step(step, context(model), batch) for _ in range(2)]
    assert torch.get_num_threads() == before
    assert len(seen) == 2 * min(pieces or 4, 5) and all(n.startswith("part") and t == 1 for n, t in seen)
    for g, w in zip(got[0][0], want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert got[0][1]["loss"] == pytest.approx(stats["loss"], rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got[0][0], got[1][0])) and got[0][1] == got[1][1]


def _ranks_step(rank, mode, port, out):
    """One rank of test_cores_ranks_step_is_the_whole_batch_step: two calls of Ranks.step."""
    import torch

    import cores
    from test_defenses import context, lora_model
    torch.set_num_threads(1)
    ranks = cores.Ranks(mode, rank, 2, port)
    model = lora_model()
    got = [ranks.step(context(model), torch.load(out / "batch.pt")) for _ in range(2)]
    ranks.close()
    torch.save(got, out / f"rank{rank}.pt")


@pytest.mark.parametrize("mode", ["static", "parts"])
def test_cores_ranks_step_is_the_whole_batch_step(tmp_path, mode):
    """bench/cores.py's two sides that split each step over processes (torchrun's shards; parts
    taken from a shared counter) give every rank the whole batch's gradients, and with parts the
    same bits on both ranks and on every call, whichever rank took which part."""
    import socket

    import torch
    import torch.multiprocessing as mp

    import defenses as D
    from test_defenses import context, lora_model, make_batch
    batch = make_batch([("How do I bake bread?", "Mix flour, water, salt and yeast; knead; bake an hour."),
                        ("Tell me step 1.", "Step 1."), ("The capital of France?", "Paris."),
                        ("Name a colour.", "Blue, or green, or any of the colours of a rainbow."),
                        ("Count to three.", "One, two, three.")])
    torch.save(batch, tmp_path / "batch.pt")
    with socket.socket() as s:  # a free port for the ranks' store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ranks_step, args=(mode, port, tmp_path), nprocs=2, start_method="spawn")
    want = D.sft_step(context(lora_model()), batch)[0]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for g, w in zip(got[0][0], want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    if mode == "parts":
        for a, b, c in zip(got[0][0], got[0][1], got[1][0]):
            assert torch.equal(a, b) and torch.equal(a, c)


# ----------------------------------------------------------------------------- bench/paper.py

import paper  # noqa: E402


def test_paper_cells_run_the_table_first_then_ablations_bds_and_fig1():
    cells = paper.cells(["table", "ablations", "bds", "fig1"], ["sft", "tvaccine"], 160, [80])
    assert [c.part for c in cells] == ["table"] * 8 + ["ablations"] * 2 + ["bds"] * 2 + ["fig1"] * 2
    assert cells[:4] == [("table", s, "sft", 400 if s == "full" else 160, None, "", "")
                         for s in ("full", "random", "loss", "pharmacist")]
    assert ("ablations", "pharmacist", "sft", 160, "pharmacist-lam0", "", "") in cells
    assert paper.cells(["bds"], ["sft"], 160, [80]) == [("bds", "full", "sft", 400, None, "bds", ""),
                                                        ("bds", "pharmacist", "sft", 160, None, "bds", "")]


def test_paper_table_skips_recorded_cells(tmp_path):
    table = paper.Table(tmp_path / "table.jsonl")
    table.add(dict(run="s0/full_sft_k400", harmful_after=40.0))
    again = paper.Table(tmp_path / "table.jsonl")
    assert again.done == {"s0/full_sft_k400"}
    sweep = object.__new__(paper.PaperSweep)  # only what cell() reads: a recorded cell starts nothing
    sweep.seed, sweep.table, sweep.pool_kind = 0, again, ""
    sweep.ranking = sweep.run = lambda *a, **k: pytest.fail("a recorded cell was started again")
    sweep.cell(paper.Cell("table", "full", "sft", 400))


def test_paper_cells_go_to_the_workers(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(dict(counts={"pool.jsonl": 400})))
    sweep = paper.PaperSweep(tmp_path, tmp_path / "data", 1, paper.Table(tmp_path / "table.jsonl"), jobs=2,
                             keep=80, pool="safety")
    sweep.rankings["random"] = tmp_path / "select_random"
    ran = []
    monkeypatch.setattr(sweep, "config", lambda name, *a, info=None, **k: ran.append((name, info["run"], info["pool"])))
    sweep.cell(paper.Cell("safety", "random", "sft", 80))
    sweep.wait()
    assert ran == [("safety_random_sft_k80", "s1/safety_random_sft_k80", "safety")]


def test_paper_training_stages_resume_where_a_sitting_stopped(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(dict(counts={"pool.jsonl": 400})))
    sweep = paper.PaperSweep(tmp_path, tmp_path / "data", 0, paper.Table(tmp_path / "table.jsonl"), jobs=1)
    calls = []
    monkeypatch.setattr(reproduce, "sh", lambda args, log, env=None: calls.append(args))
    for stage in ("select", "align", "finetune", "eval"):
        sweep.train(tmp_path / "run", stage)
    assert ["--resume" in args for args in calls] == [False, True, True, False]


def test_paper_repnoise_columns_name_their_lens(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(dict(counts={"pool.jsonl": 400})))
    sweep = paper.PaperSweep(tmp_path, tmp_path / "data", 0, paper.Table(tmp_path / "table.jsonl"), jobs=1)
    sweep.rankings["pharmacist"] = tmp_path / "select_pharmacist"
    ran = []
    monkeypatch.setattr(sweep, "config", lambda name, sel, k, defense, align=(), info=None, **kw:
                        ran.append((name, defense, align[align.index("--defense-repnoise-lens-layers") + 1], info["defense"])))
    for column in ("repnoise", "repnoise-lens-all"):
        sweep.cell(paper.Cell("table", "pharmacist", column, 160))
    assert ran == [("pharmacist_repnoise_k160", "repnoise", str(paper.REPNOISE_LENS), "repnoise"),
                   ("pharmacist_repnoise-lens-all_k160", "repnoise", "0", "repnoise-lens-all")]
    assert [c.defense for c in paper.cells(["lens"], ["sft"], 160, [80])] == ["repnoise-lens-all"]


def test_paper_row_reads_before_and_after(tmp_path, monkeypatch):
    monkeypatch.setattr(paper, "ROOT", tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(dict(seed=2, eval_seed=0)))
    run, before = tmp_path / "s2" / "ph_sft_k160", tmp_path / "s2" / "before_ph_sft_k160"
    for folder, results in ((run, dict(harmful_score=40.0, outcomes=dict(refusal=5.0), over_refusal=1.0,
                                       harmful_corrected=dict(rate=35.0, low=20.0, high=50.0), accuracy={"sst2": 90.0})),
                            (before, dict(harmful_score=3.0, over_refusal=9.0, benign_outcomes=dict(degenerate=4.0)))):
        (folder / "eval").mkdir(parents=True)
        (folder / "eval" / "results.json").write_text(json.dumps(results))
    (run / "align").mkdir()
    (run / "align" / "summary.json").write_text(json.dumps(dict(data=str(tmp_path / "data"), n_align=160, align_time_s=9.0)))
    (run / "finetune").mkdir()
    (run / "finetune" / "summary.json").write_text(json.dumps(dict(n_train=500, n_harmful=200, bds_harmful_share=0.1)))
    r = paper.row(dict(run="s2/ph_sft_k160", seed=2), run, tmp_path / "results" / "s2" / "ph_sft_k160")
    assert (r["attack_harmful_share"], r["bds_harmful_share"]) == (0.4, 0.1)
    assert (r["pool_seed"], r["harmful_after"], r["harmful_before"], r["harmful_after_low"]) == (2, 40.0, 3.0, 20.0)
    assert (r["over_refusal_before"], r["broken_benign_before"], r["sst2_after"], r["align_time_s"]) == (9.0, 4.0, 90.0, 9.0)
    assert r["generations"] == "results/s2/ph_sft_k160/generations.jsonl"
    assert r["commit"] == "unknown"  # tmp_path is no git checkout


def test_paper_rows_name_the_commit_they_ran():
    head = subprocess.run(["git", "-C", str(paper.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    assert paper.commit().split("+")[0] == head.stdout.strip()


def test_paper_commit_is_dirty_for_changed_code_not_for_the_sweeps_results(tmp_path, monkeypatch):
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    if subprocess.run([*git, "init", "-q"], capture_output=True).returncode:
        pytest.skip("no git")
    (tmp_path / "results").mkdir()
    for f in ("results/table.jsonl", "train.py"):
        (tmp_path / f).write_text("a\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    monkeypatch.setattr(paper, "ROOT", tmp_path)
    (tmp_path / "results" / "table.jsonl").write_text("a\nb\n")  # a finished cell's line
    assert not paper.commit().endswith("+dirty")
    (tmp_path / "train.py").write_text("b\n")
    assert paper.commit().endswith("+dirty")


# ----------------------------------------------------------------------------- bench/read_rates.py

import read_rates  # noqa: E402


def test_read_rates_count_only_labelled_answers(tmp_path):
    labels = {("p1", "a1"): dict(harmful=1), ("p2", "a2"): dict(harmful=0)}
    rows = [dict(set="harmful", prompt="p1", answer="a1", verdict="harmful"),
            dict(set="harmful", prompt="p2", answer="a2", verdict="harmful"),
            dict(set="harmful", prompt="p3", answer="a3", verdict="safe"),  # not labelled: left out
            dict(set="benign", prompt="p1", answer="a1", verdict="answered")]
    (tmp_path / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_rates.run_rates(tmp_path / "generations.jsonl", labels) == dict(n=3, labelled=2, read=50.0, judged=100.0)


def test_report_errors_are_one_line(tmp_path, capsys):
    run = fake_run(tmp_path, "r", "random", 24, 30.0, 50.0)
    (run / "eval" / "results.json").write_text('{"harmful_score": 3')  # a truncated file
    with pytest.raises(SystemExit, match=r"^report.py: error: .*results.json: not valid JSON") as e:
        report.main([str(run), "--out", str(tmp_path / "rep"), "--no-figure"])
    assert "\n" not in str(e.value)


import paper_report  # noqa: E402


def test_paper_report_pairs_by_seed(tmp_path):
    rows = [dict(defense="sft", selector=s, k=400 if s == "full" else 160, seed=seed, harmful_after=h, sst2_after=90.0,
                 align_time_s=t, select_time_s=5.0, align_tokens=n)
            for s, seed, h, t, n in (("full", 0, 40.0, 100.0, 1000), ("full", 1, 50.0, 100.0, 2000),
                                     ("pharmacist", 0, 35.0, 40.0, 500), ("pharmacist", 1, 47.0, 40.0, 500),
                                     ("pharmacist", 2, 10.0, 40.0, 500))]  # seed 2: no pair
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = paper_report.main(["--table", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "t.md")]) or (tmp_path / "t.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| sft | full | 0,1 |"))
    assert "| 0,1 | – | -4.0 ± 1.0 (− −) | 0.0 ± 0.0 (0 0) | -62.5 ± 12.5 (− −) | -60.0 ± 0.0 (− −) | -57.1 ± 0.0 (− −) |" in line
    assert "| sft | pharmacist | 160 | 0,1,2 | – | 30.7 ± 10.9 |" in text


def test_paper_report_reads_a_cell_only_where_every_answer_is_labelled(tmp_path, monkeypatch):
    monkeypatch.setattr(paper_report, "ROOT", tmp_path)
    labels = {("p1", "a1"): dict(harmful=1), ("p2", "a2"): dict(harmful=0)}
    for name, answers in (("all", ["a1", "a2"]), ("part", ["a1", "zz"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "generations.jsonl").write_text("".join(
            json.dumps(dict(set="harmful", prompt=f"p{i + 1}", answer=a, verdict="harmful")) + "\n"
            for i, a in enumerate(answers)))
    rows = paper_report.with_read_rates([dict(generations="all/generations.jsonl"),
                                         dict(generations="part/generations.jsonl"), dict()], labels)
    assert [r["harmful_after_read"] for r in rows] == [50.0, None, None]


def test_paper_report_reads_the_judged_numbers_from_the_committed_results(tmp_path, monkeypatch):
    """A rescored cell (its results.json rewritten by evaluate.py rescore) reaches the table; a
    row whose results are not committed keeps its own numbers."""
    monkeypatch.setattr(paper_report, "ROOT", tmp_path)
    for sub, score in (("c", 12.0), ("c/before", 3.0)):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / "results.json").write_text(json.dumps(dict(harmful_score=score, judge="trained")))
    rows = paper_report.rescored([dict(generations="c/generations.jsonl", generations_before="c/before/generations.jsonl",
                                       harmful_after=50.0, harmful_before=40.0, align_tokens=7),
                                  dict(generations="gone/generations.jsonl", harmful_after=50.0)])
    assert (rows[0]["harmful_after"], rows[0]["harmful_before"], rows[0]["align_tokens"]) == (12.0, 3.0, 7)
    assert rows[1]["harmful_after"] == 50.0


import numpy as np  # noqa: E402
import selection  # noqa: E402
from data.samples import Sample  # noqa: E402


def test_selection_targeted_share_and_paired_summary():
    """The targeted share counts only kept clean refusals; the summary pairs runs by folder."""
    pool = [Sample("a", "p", "r", category="refusal", harm="cyber"),
            Sample("b", "p", "r", category="refusal", harm="fraud_theft"),
            Sample("c", "p", "r", category="low_quality", harm="cyber"),
            Sample("d", "p", "r", category="refusal", harm="cyber")]
    row = selection.precision_row(pool, np.array([3.0, 2.0, 4.0, 0.0]), 3, frozenset({"cyber"}))
    assert row["precision"] == 2 / 3 and row["targeted"] == 0.5  # a and b kept clean; c is not clean
    assert "targeted" not in selection.precision_row(pool, np.zeros(4), 2)
    rows = [dict(selector=s, data=f, precision=p, targeted=t) for s, f, p, t in
            [("x", "d0", 0.8, 0.7), ("x", "d1", 0.9, 0.6), ("y", "d0", 0.8, 0.5), ("y", "d1", 0.7, 0.5)]]
    text = selection.summary(rows, ["y"])
    x = next(line for line in text.splitlines() if line.startswith("| x |"))
    assert "0.850 ± 0.050" in x and "0.650 ± 0.050" in x and "0.100 ± 0.100" in x and "0.150 ± 0.050" in x


def test_selection_per_pass_kinds():
    """Each kind's mean standardised score, and the table's section that shows it pass by pass."""
    pool = [Sample(i, "p", "r", category=c) for i, c in enumerate(["refusal", "refusal", "benign", "benign"])]
    assert selection.kind_means(pool, [3.0, 1.0, 0.0, 0.0]) == {"benign": -0.82, "refusal": 0.82}
    row = dict(data="d", selector="x", precision=1.0, kept={"refusal": 2}, distinct=4, forward=1, backward=1, seconds=1.0,
               per_pass=[1.0, 0.5], mean_of_passes=1.0, per_pass_kinds=[{"benign": -0.8, "refusal": 0.8}, {"benign": 0.1, "refusal": -0.1}])
    text = selection.table([row])
    assert "| d | x | 2 | +0.10 | -0.10 |" in text and "1.000 → 0.500" in text


def test_selection_decayed_sum_weights_pass_p_by_decay_to_the_p():
    """decayed_sum: Σ_p γ^p·standardised(h_p), the two-pass bilevel run's own logits at outer_decay γ;
    γ = 1 is the plain sum, a small γ keeps the first pass's order and breaks its ties."""
    h0, h1 = np.array([1.0, 1.0, 0.0, 2.0]), np.array([0.0, 3.0, 1.0, -1.0])
    np.testing.assert_allclose(selection.decayed_sum([h0, h1], 1.0), selection.P.standardised(h0) + selection.P.standardised(h1))
    small = selection.decayed_sum([h0, h1], 0.01)
    assert list(np.argsort(-small, kind="stable")) == [3, 1, 0, 2]  # rows 0 and 1 tie in h0; h1 puts row 1 first
    row = dict(data="d", selector="b", precision=1.0, kept={}, distinct=4, forward=1, backward=1, seconds=1.0,
               per_pass=[1.0, 0.5], mean_of_passes=0.75, decayed={"1.0": 0.75, "0.03": 1.0})
    assert "| d | b | 0.750 | 1.000 |" in selection.table([row])


def test_paper_safety_part_names_its_cells_apart_and_the_report_keeps_its_pool_apart():
    safety = paper.cells(["safety"], ["sft"], 160, [80], safety_keep=80)
    assert [c.name("safety") for c in safety] == [
        "safety_pharmacist_sft_k80", "safety_pharmacist-lam0_sft_k80", "safety_random_sft_k80"]
    rows = [dict(run=f"s{s}/x", selector=sel, defense="sft", k=k, seed=s, harmful_after=h, sst2_after=80.0,
                 align_time_s=1.0, select_time_s=0.0, **({"pool": "safety"} if k == 80 else {}))
            for s in (0, 1) for sel, k, h in (("pharmacist", 160, 10.0), ("random", 160, 20.0),
                                              ("pharmacist", 80, 5.0 + s), ("pharmacist-lam0", 80, 7.0 + 2 * s))]
    assert set(paper_report.cells(rows)) == {("sft", "pharmacist", 160), ("sft", "random", 160)}
    text = paper_report.paired(rows, keep=80, pool="safety", others=(("pharmacist-lam0", 80),))
    assert "| sft | pharmacist-lam0 | 0,1 | – | -2.5 ± 0.5 (− −)" in text


def test_paper_bds_safe0_attacks_the_bds_cells_model_with_the_alignment_loss_off(tmp_path, monkeypatch):
    assert [c.name() for c in paper.cells(["bds-safe0"], ["sft"], 160, [80])] == ["full_sft+bds-safe0_k400",
                                                                                  "pharmacist_sft+bds-safe0_k160"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(dict(counts={"pool.jsonl": 400})))
    sweep = paper.PaperSweep(tmp_path, tmp_path / "data", 0, paper.Table(tmp_path / "table.jsonl"), jobs=1)
    sweep.rankings.update(full=tmp_path / "select_full", pharmacist=tmp_path / "select_pharmacist")
    (tmp_path / "full_sft+bds_k400" / "align" / "model").mkdir(parents=True)  # the bds cell's model is on disk
    ran = {}
    monkeypatch.setattr(sweep, "config", lambda name, sel, k, defense, attack=(), info=None, align_from=None, **kw:
                        ran.update({name: (attack, align_from, info["defense"])}))
    for c in paper.cells(["bds", "bds-safe0"], ["sft"], 160, [80]):
        sweep.cell(c)
    attack, align_from, defense = ran["full_sft+bds-safe0_k400"]
    assert attack[attack.index("--defense-bds-safe-weight") + 1] == "0" and "bds" in attack
    assert (align_from, defense) == (tmp_path / "full_sft+bds_k400", "sft+bds-safe0")
    assert ran["pharmacist_sft+bds-safe0_k160"][1] is None  # no bds model on disk: it aligns its own
    assert ran["full_sft+bds_k400"][1:] == (None, "sft+bds")  # the bds cell itself aligns
    assert "--defense-bds-safe-weight" not in ran["full_sft+bds_k400"][0]


def test_paper_strength_part_attacks_from_the_calibrated_cells_model_and_reports_apart(tmp_path, monkeypatch):
    strength = paper.cells(["strength"], ["sft"], 160, [80])
    assert [c.name() for c in strength[:2]] == ["random_repnoise_k160_lr5e-5", "random_repnoise_k160_lr8e-4"]
    assert {c.defense for c in strength if not c.lr} == {"vaccine", "booster"}  # the others: the table's cells
    assert {(c.defense, c.lr) for c in strength} >= {(d, lr) for d in paper.STRENGTH_DEFENSES for lr in paper.STRENGTHS}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(dict(counts={"pool.jsonl": 400})))
    sweep = paper.PaperSweep(tmp_path, tmp_path / "data", 0, paper.Table(tmp_path / "table.jsonl"), jobs=1)
    sweep.rankings["random"] = tmp_path / "select_random"
    (tmp_path / "random_tvaccine_k160" / "align" / "model").mkdir(parents=True)  # tvaccine's calibrated cell is on disk
    ran = {}
    monkeypatch.setattr(sweep, "config", lambda name, sel, k, defense, attack=(), info=None, align_from=None, **kw:
                        ran.update({name: (attack[attack.index("--finetune-lr") + 1] if "--finetune-lr" in attack else "",
                                                align_from, info["attack_lr"])}))
    for c in (paper.Cell("strength", "random", "tvaccine", 160, lr="8e-4"), paper.Cell("strength", "random", "sft", 160, lr="5e-5"),
              paper.Cell("strength", "random", "vaccine", 160)):
        sweep.cell(c)
    assert ran["random_tvaccine_k160_lr8e-4"] == ("8e-4", tmp_path / "random_tvaccine_k160", "8e-4")
    assert ran["random_sft_k160_lr5e-5"] == ("5e-5", None, "5e-5")  # no aligned model on disk: it aligns its own
    assert ran["random_vaccine_k160"] == ("", None, paper.ATTACK["lr"])  # the sweep's own attack
    rows = [dict(run=f"s0/{n}", part=part, selector="random", defense=d, k=160, seed=0, harmful_after=h, **extra)
            for n, part, d, h, extra in (("random_sft_k160", "table", "sft", 30.0, {}),  # a table row (before `part`)
                                         ("random_sft_k160_lr8e-4", "strength", "sft", 50.0, dict(attack_lr="8e-4")),
                                         ("random_sft_k160_lr5e-5", "strength", "sft", 10.0, dict(attack_lr="5e-5")))]
    rows[0].pop("part")
    assert set(paper_report.cells(rows)) == {("sft", "random", 160)}  # the strength cells stay out of the table
    text = paper_report.strength_table(rows)
    assert [line.split(" | ")[1] for line in text.splitlines()[2:]] == ["5e-5", paper.ATTACK["lr"], "8e-4"]
    assert "| sft | 8e-4 | 0 | – | 50.0 |" in text


# ----------------------------------------------------------------------------- bench/lens.py

import lens  # noqa: E402
import torch  # noqa: E402
import defenses as D  # noqa: E402
from test_defenses import ALIGN, HARMFUL, lora_model, context  # noqa: E402


def test_lens_measures_repnoise_terms_with_every_lens():
    model = lora_model(layers=4)
    torch.manual_seed(0)
    _, stats = D.repnoise_step(context(model), ALIGN)  # lens 0: every layer, as own_losses reads them
    got = lens.own_losses(model, ALIGN, HARMFUL)
    assert got["refusal_loss"] == pytest.approx(stats["loss"], rel=1e-5)
    assert got["lens_loss_mean"] == pytest.approx(stats["harmful_loss"], rel=1e-5)
    assert got["mmd"] == pytest.approx(stats["mmd"], rel=1e-4)
    _, last = D.repnoise_step(context(model, repnoise_lens_layers=1), ALIGN)
    assert got["lens_loss_last"] == pytest.approx(last["harmful_loss"], rel=1e-5)
    times = lens.step_times(model, ALIGN, HARMFUL, [0, 1], repeats=1)
    assert set(times) == {"sft", "repnoise, lens every", "repnoise, lens 1"} and min(times.values()) > 0


# ----------------------------------------------------------------------------- bench/judge_set.py

import judge_set  # noqa: E402


def test_judge_set_answers_are_the_answers_the_evaluation_judged(tmp_path):
    """An item drawn from a model is what `train.py --stage eval` wrote for that model and prompt."""
    import train
    train.main(["--stage", "all", "--preset", "tiny", "--select-steps", "2", "--align-max-steps", "2",
                "--finetune-max-steps", "4", "--finetune-lr", "0.05",  # an attack that moves the tiny model's answers
                "--eval-limit", "3", "--eval-max-new-tokens", "6", "--eval-tasks", "harmful", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    prompts, cfg = [r["prompt"] for r in rows], judge_set.E.EvalConfig(bf16=False)  # the tiny preset's fp32
    got = judge_set.answer(str(tmp_path / "align" / "model"), tmp_path / "finetune" / "adapter", prompts, 6, cfg)
    assert got == [r["answer"] for r in rows] and len(rows) == 3
    assert judge_set.answer(str(tmp_path / "align" / "model"), None, prompts, 6, cfg) != got  # the attack's adapter counts


def test_judge_set_fits_only_on_prompts_of_its_train_split(tmp_path):
    items = [dict(id="j0", prompt_id="a", prompt="p1", answer="x", split="train"),
             dict(id="j1", prompt_id="b", prompt="p2", answer="y", split="test"),
             dict(id="j2", prompt_id="a", prompt="p1", answer="z", split="train"),
             dict(id="j3", prompt_id="c", prompt="p3", answer="x", split="train")]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    assert judge_set.fitting_prompts(tmp_path / "items.jsonl") == [("a", "p1"), ("c", "p3")]
    with pytest.raises(SystemExit, match="no run folder"):
        judge_set.answers_of_runs("no/such/*", 0, 8, 0)


import judge_train  # noqa: E402


def test_judge_cut_fitted_on_out_of_fold_scores():
    """The cut is the midpoint with the best accuracy; evaluate.at_cut moves it to 0.5; out_of_fold
    scores each row by a fit that never saw its prompt."""
    scores, y = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9]), np.array([0, 0, 1, 1, 1, 1])
    cut = judge_train.fitted_threshold(scores, y)
    assert cut == pytest.approx(0.275)
    assert list(np.array(judge_train.E.at_cut(scores, cut)) > 0.5) == [False, False, True, True, True, True]
    assert judge_train.E.at_cut([cut], cut)[0] == pytest.approx(0.5)
    groups = ["a", "a", "b", "b", "c", "c"]
    seen = []

    def fit_and_score(fit, score):
        assert not {g for g, m in zip(groups, fit) if m} & {g for g, m in zip(groups, score) if m}
        seen.append(score.copy())
        return np.full(score.sum(), 0.5)
    out = judge_train.out_of_fold(fit_and_score, y, groups, k=3)
    assert len(out) == 6 and np.logical_or.reduce(seen).all()  # every row scored once


def test_judge_report_groups_runs_by_regime_kind_and_coverage():
    """Regimes name the defense of an attacked run; kinds come from the labels; coverage leaves
    each run out of the error counts that correct it."""
    assert judge_train.regime("base") == "base" and judge_train.regime("before_full_tvaccine_k400_s0") == "aligned"
    assert judge_train.regime("random_tvaccine_k160_s2") == "attacked, tvaccine"
    assert judge_train.regime("attack_1e-4") == "attacked, sft"
    items = [dict(model=m, harmful=h, refusal=r, degenerate=d, prompt="p", answer="a")
             for m in ("r1", "r2", "r3") for h, r, d in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0))]
    scores = [0.9, 0.1, 0.6, 0.2] * 3
    kinds = judge_train.by_group(items, scores, judge_train.answer_kind)
    assert kinds["refusal"]["accuracy"] == 1.0 and kinds["degenerate"]["judged"] == 100.0
    assert kinds["goes along"]["n"] == 6 and kinds["goes along"]["labelled"] == 50.0
    cov = judge_train.coverage(items, np.array(scores) > 0.5)
    assert set(cov["runs"]) == {"r1", "r2", "r3"} and all(v["labelled"] == 25.0 for v in cov["runs"].values())
    assert 0.0 <= cov["share"] <= 1.0


import agreement  # noqa: E402


def test_agreement_reads_the_first_reading_where_settling_changed_it(tmp_path):
    rows = [dict(id="j1", harmful=0, refusal=0, degenerate=0, first=dict(harmful=1, refusal=0, degenerate=0),
                 second=dict(harmful=0, refusal=0, degenerate=0), settled="why"),
            dict(id="j2", harmful=1, refusal=0, degenerate=1, second=dict(harmful=1, refusal=0, degenerate=1)),
            dict(id="j3", harmful=0, refusal=1, degenerate=0, second=dict(harmful=0, refusal=1, degenerate=0)),
            dict(id="j4", harmful=0, refusal=0, degenerate=0)]  # read once
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = agreement.readings(rows)
    assert len(pairs) == 3 and pairs[0][0]["harmful"] == 1
    assert agreement.kappa([1, 1, 0], [0, 1, 0]) == pytest.approx((2 / 3, 0.4))
    assert agreement.kappa([0, 0], [0, 0])[1] is None
    rows = [dict(r, reader="a" if r["id"] < "j3" else "b") for r in rows]
    for r in rows[:3]:
        r["second"]["reader"] = "c"
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = agreement.main(["--labels", str(tmp_path / "l.jsonl"), "--batches", "j1,j3"])
    # batch j1-j2: read by a, both read twice by c (one settled); harmful readings (1, 1) vs (0, 1)
    assert lines[2] == "| j1–j2 | 2 | a | 1 / 0 / 1 | 2 | c | 1 | 0.500, 0.000 | 1.000, – | 1.000, 1.000 |"
    assert lines[3].startswith("| j3–j4 | 2 | b | 0 / 1 / 0 | 1 | c | 0 |")
    assert lines[4] == "| all | 4 | (above) | 1 / 1 / 1 | 3 | (above) | 1 | 0.667, 0.400 | 1.000, 1.000 | 1.000, 1.000 |"


def test_judge_measure_rescores_the_test_split_and_keeps_the_fit(tmp_path, monkeypatch):
    """--measure fits nothing: the committed judge's scores on today's test items replace the test
    tables; the train items are never scored; the fit's choice and PyRIT numbers stay."""
    items = [dict(id=f"j{i}", prompt=f"p{i % 3}", answer=f"a{i}", model=f"r{i % 2}", split="test" if i < 8 else "train")
             for i in range(10)]
    labels = [dict(id=f"j{i}", harmful=int(i % 4 < 2), refusal=int(i % 4 == 2), degenerate=0) for i in range(10)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labels))
    seen = []

    class Judge:
        def __init__(self, path):
            pass

        def probabilities(self, head, prompts, answers):
            seen.extend(answers)
            return [0.9 if int(a[1:]) % 4 < 2 else 0.1 for a in answers]  # right on every test item
    monkeypatch.setattr(judge_train.E, "TrainedJudge", Judge)
    fit = dict(command="python bench/judge_train.py --source s", seconds_per_100_answers=1.0, n_items=3, n_test=2,
               choice=dict(folds=3, chosen="probe", candidates={"probe": dict(accuracy=0.8, auc=0.9, f1=0.7, threshold=0.3,
                                                                              at_half=0.75)}),
               pyrit_folds={"harmful": {"trained": dict(n=5, positives=2, accuracy=0.8, f1=0.7, auc=0.9)}},
               ours_test={}, coverage={})
    (tmp_path / "judge.json").write_text(json.dumps(fit))
    report = judge_train.measure(tmp_path, tmp_path / "probe.safetensors", tmp_path / "judge", ["--measure"])
    assert sorted(seen) == sorted(f"a{i}" for i in range(8))  # the test split only
    assert report["n_test"] == 8 and report["n_items"] == 10 and report["ours_test"]["harmful"]["trained"]["accuracy"] == 1.0
    assert report["choice"] == fit["choice"] and report["pyrit_folds"] == fit["pyrit_folds"]
    assert set(report["by_model"]) == {"r0", "r1"} and report["coverage"]["n"] == 8
    md = (tmp_path / "judge.md").read_text()
    assert "measured again, nothing fitted (`python bench/judge_train.py --measure`)" in md


def test_paper_report_bds_pairs_each_subset_with_its_plain_attack_and_shows_the_weight_share():
    rows = [dict(defense=d, selector="full", k=400, seed=s, harmful_after=h, harmful_after_read=r,
                 bds_harmful_share=w, attack_harmful_share=0.4 if w is not None else None)
            for d, s, h, r, w in (("sft", 0, 40.0, 20.0, None), ("sft", 1, 30.0, 10.0, None),
                                  ("sft+bds", 0, 30.0, 12.0, 0.1), ("sft+bds", 1, 30.0, 8.0, 0.2))]
    rows += [dict(defense="sft+bds-safe0", selector="full", k=400, seed=s, harmful_after=h, harmful_after_read=r,
                  bds_harmful_share=0.3, attack_harmful_share=0.4) for s, h, r in ((0, 40.0, 22.0), (1, 30.0, 9.0))]
    lines = paper_report.bds_table(rows).splitlines()[2:]
    assert lines == [("| bds | full | 400 | 0,1 | 15.0 ± 5.0 → 10.0 ± 2.0 | -5.0 ± 3.0 (− −) | 35.0 ± 5.0 → 30.0 ± 0.0 | "
                      "-5.0 ± 5.0 (− 0) |  | 15.0 ± 5.0 | 40.0 ± 0.0 |"),
                     ("| bds-safe0 | full | 400 | 0,1 | 15.0 ± 5.0 → 15.5 ± 6.5 | 0.5 ± 1.5 (+ −) | 35.0 ± 5.0 → 35.0 ± 5.0 | "
                      "0.0 ± 0.0 (0 0) | 5.5 ± 4.5 (+ +) | 30.0 ± 0.0 | 40.0 ± 0.0 |")]


def test_paper_report_fig1_keeps_the_fig1_seeds_at_every_k(tmp_path, monkeypatch):
    rows = [dict(part="fig1" if k != 160 else "table", defense="sft", selector=sel, k=k, seed=s,
                 harmful_after=10.0 * s + k / 10, harmful_after_read=None if (sel, k) == ("random", 80) else float(k),
                 align_time_s=float(k))
            for sel in ("pharmacist", "random") for k in (80, 160) for s in ((0, 1, 2) if k == 160 else (0, 1))]
    points = paper_report.fig1_points(rows)
    assert [(p["selector"], p["n_align"], p["seeds"]) for p in points] == [
        ("pharmacist", 80, [0, 1]), ("pharmacist", 160, [0, 1]), ("random", 80, [0, 1]), ("random", 160, [0, 1])]
    running = dict(rows[0], seed=2)  # seed 2's first fig1 cell is in, the others still run: seeds 0, 1 stay
    assert [p["seeds"] for p in paper_report.fig1_points(rows + [running])] == [[0, 1]] * 4
    assert points[1]["harmful_score"] == 160.0 and points[1]["score"] == "harmful_after_read"
    assert points[2]["harmful_score"] == 13.0 and points[2]["score"] == "harmful_after"  # not every answer read: judged
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(paper_report, "with_read_rates", lambda rows, labels: rows)
    paper_report.main(["--table", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "t.md")])
    assert "| random | 80 | 0,1 | 13.0 | 8 / 18 | judged | 80 |" in (tmp_path / "t.md").read_text()
    cells = [json.loads(line) for line in (tmp_path / "cells.jsonl").read_text().splitlines()]
    assert len(cells) == len(rows) and all("harmful_after_read" in c for c in cells)
    pytest.importorskip("matplotlib")  # the figure is drawn only where matplotlib is installed
    assert (tmp_path / "fig1.png").stat().st_size > 0


def test_paper_report_order_noise_is_the_spread_of_the_same_rows_in_other_orders():
    rows = [dict(part=part, defense="sft", selector=sel, k=400, seed=s, harmful_after_read=h)
            for s, hs in ((0, (8.0, 14.0, 14.0)), (1, (5.0, 7.0, 19.0)))
            for (part, sel), h in zip((("fig1", "pharmacist"), ("fig1", "random"), ("table", "full")), hs)]
    text = paper_report.order_noise(rows)
    assert "| 0 | 8 | 14 | 14 | -6 |" in text and "| 1 | 5 | 7 | 19 | -2 |" in text
    # order-only pairs: sqrt((36 + 4) / 2 / 2) = 3.16; pooled with full: sqrt((12 + 57.33) / 2) = 5.89
    assert "(2 seeds): 3.2 points; a difference paired over three seeds: SE 2.6" in text
    assert "With the full pool's cells (2 seeds): SD 5.9, SE 4.8." in text
    rows[1]["harmful_after_read"] = None  # seed 0's Random cell not read: only seed 1 counts
    assert "| 0 |" not in paper_report.order_noise(rows)


import retable  # noqa: E402


def test_retable_rebuilds_a_results_folder_from_its_exported_runs(tmp_path):
    """After a rescore: per_run/, before_after.md, report.md and calibration.md are written again
    from the runs' results.json; the attack the sweep chose stays, and the table says what today's
    numbers would choose."""
    def export(folder, name, harmful, refusal=2.0, selector="full", n_align=400, sst2=85.0):
        run = folder / name
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(dict(
            outcomes={"refusal": refusal, "degenerate": 0.0}, harmful_score=harmful, harmful_se=1.0,
            over_refusal=10.0, accuracy={"sst2": sst2}, harmful_loss=2.0, selector=selector, defense="sft",
            n_align=n_align, align_time_s=100.0, select_time_s=0.0)))
        (run / "align_summary.json").write_text(json.dumps(dict(tokens=1000, passes_per_step=1)))
        return run
    results = tmp_path / "small"
    for seed, (before, after) in enumerate(((3, 40), (5, 44))):
        name = "full_sft_k400_lr2e-4" + (f"_s{seed}" if seed else "")
        export(results / "runs", f"before_{name}", before, refusal=95.0)
        export(results / "runs", name, after)
    export(results, "calib_full_sft_lr2e-4_e1", 50.0)  # a calibration run, at the folder's top
    export(results, "calib_full_sft_lr2e-4_e1_p0", 10.0)
    (results / "per_run").mkdir()
    (results / "per_run" / "full_sft_k400_lr2e-4.json").write_text("{}")  # stale
    setting = lambda p, harmful: dict(run=f"calib_full_sft_lr2e-4_e1{'_p0' if p == '0' else ''}", model="full",  # noqa: E731
                                      lr="2e-4", epochs="1", p=p, mix="", refusal=0.0, harmful=harmful, sst2=85.0)
    chosen = {"lr": "5e-4", "epochs": "1", "p": "0.1", "mix": ""}  # chosen by the judge of its day
    (results / "calibration.json").write_text(json.dumps(dict(runs=[setting("0.1", 90.0), setting("0", 5.0)],
                                                              chosen=chosen)))
    written = retable.retable(results, figure=False)
    assert written == ["per_run/", "before_after.md", "report.md", "calibration.json", "calibration.md"]
    assert json.loads((results / "per_run" / "full_sft_k400_lr2e-4.json").read_text())["harmful_score"] == 40
    assert "4.0 ± 1.0 → 42.0 ± 2.0" in (results / "before_after.md").read_text()
    report_line = next(x for x in (results / "report.md").read_text().splitlines() if x.startswith("| full_sft"))
    assert "| 42.0 ± 2.0 | 40 / 44 |" in report_line  # the harmful score, mean ± SE and per seed
    calibration = json.loads((results / "calibration.json").read_text())
    assert calibration["chosen"] == chosen and [r["harmful"] for r in calibration["runs"]] == [50.0, 10.0]
    table = (results / "calibration.md").read_text()
    assert "Chosen: lr 5e-4" in table and "the rule chooses lr 2e-4, 1 epoch(s), p 0.1" in table
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no exported run"):
        retable.retable(tmp_path / "empty")


def test_eval_speed_tables_take_the_rescored_numbers_and_keep_the_times(tmp_path):
    import eval_speed
    out = tmp_path / "eval_speed"
    rows = [dict(model="runs/v2/random_sft_k160", setting=s, eval_time_s=t, harmful_score=35.0, sst2_agreement=98.0)
            for s, t in (("reference", 100.0), ("default", 60.0))]
    for s, harmful in (("reference", 20.0), ("default", 22.0)):
        (out / "random_sft_k160" / s).mkdir(parents=True)
        (out / "random_sft_k160" / s / "results.json").write_text(json.dumps(dict(
            harmful_score=harmful, outcomes={"refusal": 1.0, "degenerate": 40.0}, over_refusal=0.0,
            accuracy={"sst2": 85.0}, harmful_loss=2.1)))
    (tmp_path / "eval_speed.json").write_text(json.dumps(rows))
    eval_speed.main(["--rescored", "--out", str(out)])
    again = json.loads((tmp_path / "eval_speed.json").read_text())
    assert [(r["harmful_score"], r["eval_time_s"], r["sst2"]) for r in again] == [(20.0, 100.0, 85.0), (22.0, 60.0, 85.0)]
    assert "| runs/v2/random_sft_k160 | default | 60 | 22.0 |" in (tmp_path / "eval_speed.md").read_text()
