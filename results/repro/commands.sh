#!/bin/bash
# The exact commands that made results/repro (two sessions, one shared run folder runs/repro;
# every command skips the runs that already finished, so the order only sets what finishes first).
# Session 1: the default phases calibrate, main, fig1 (stopped by the session's end):
python bench/reproduce.py --out runs/repro --source ../shared/data --phases calibrate,main,fig1
# Session 2, in priority order:
R="python bench/reproduce.py --out runs/repro --source ../shared/data"
$R --phases main --selectors pharmacist
$R --phases stress --selectors random,pharmacist
$R --phases seeds --selectors random,pharmacist --seeds 1
$R --phases bds --selectors random,pharmacist
$R --phases defenses --selectors pharmacist --defenses repnoise
$R --phases defenses --selectors pharmacist,random --defenses tvaccine,booster
$R --phases seeds --selectors random,pharmacist --seeds 2
$R --phases main --selectors full --defenses vaccine
$R --phases seeds --selectors random,pharmacist --seeds 3
# Session 3, in this order, from a git worktree at cd3af1d (sessions 1-2 ran 26cda4f and before:
# session 3's runs add the bf16 LoRA-sum fix, not yet the response-only LM head of 8c30d08;
# bench/reproduce.py itself was taken from main from the seal/loss seeds on, for that phase):
$R --phases defenses --selectors random --defenses repnoise
$R --phases main --selectors seal,loss --defenses sft
$R --phases defenses --selectors full --defenses tvaccine
$R --phases seeds --selectors loss,seal --seeds 1 --defenses sft
$R --phases seeds --selectors random,pharmacist --seeds 1 --defenses vaccine
$R --phases seeds --selectors loss,seal --seeds 2 --defenses sft
$R --phases seeds --selectors random,pharmacist --seeds 2 --defenses vaccine
$R --phases seeds --selectors loss,seal --seeds 3 --defenses sft
$R --phases defenses --selectors full --defenses booster
# Session 4, from a git worktree at cd3af1d again (same code as session 3's runs), with
# bench/reproduce.py from main at 0f539d9:
$R --phases main --selectors seal,loss --defenses vaccine
$R --phases defenses --selectors full --defenses repnoise
# then, from a worktree at 611b6c6 (the response-only LM head and --held-out-wording): the
# selectors on a pool whose refusals share no template with the validation set
$R --phases wording --selectors loss,pharmacist,random --defenses sft --seeds 1,2
# (seed 0 ran first from a worktree at 611b6c6; seeds 1 and 2 from one at f962b5b, whose wording phase
# also runs --seeds)
# Each reproduce.py call ends by writing results/repro/{report.md, stress/report.md, precision.md,
# calibration.json, fig1.png} from every finished run; per-run numbers: results/repro/per_run/;
# the wording phase's tables: results/repro/held_out_wording/.
