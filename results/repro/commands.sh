#!/usr/bin/env bash
# The calls that made results/repro (the earlier protocol: alignment on the selected rows alone,
# the rule judge). Each call resumes the same run folder, skipping finished runs; the order only
# decides what finishes first. The code versions are the commits named before each block
# (git worktree add ../v <commit>, then run from there).
set -euo pipefail
R="python bench/reproduce.py --out runs/repro --source ${DATA:-../shared/data}"

# code at 26cda4f
$R --phases calibrate,main,fig1
$R --phases main --selectors pharmacist
$R --phases stress --selectors random,pharmacist
$R --phases seeds --selectors random,pharmacist --seeds 1
$R --phases bds --selectors random,pharmacist
$R --phases defenses --selectors pharmacist --defenses repnoise
$R --phases defenses --selectors pharmacist,random --defenses tvaccine,booster
$R --phases seeds --selectors random,pharmacist --seeds 2
$R --phases main --selectors full --defenses vaccine
$R --phases seeds --selectors random,pharmacist --seeds 3

# code at cd3af1d (bench/reproduce.py from 0f539d9 for the seal/loss seeds and the last two calls)
$R --phases defenses --selectors random --defenses repnoise
$R --phases main --selectors seal,loss --defenses sft
$R --phases defenses --selectors full --defenses tvaccine
$R --phases seeds --selectors loss,seal --seeds 1 --defenses sft
$R --phases seeds --selectors random,pharmacist --seeds 1 --defenses vaccine
$R --phases seeds --selectors loss,seal --seeds 2 --defenses sft
$R --phases seeds --selectors random,pharmacist --seeds 2 --defenses vaccine
$R --phases seeds --selectors loss,seal --seeds 3 --defenses sft
$R --phases defenses --selectors full --defenses booster
$R --phases main --selectors seal,loss --defenses vaccine
$R --phases defenses --selectors full --defenses repnoise

# code at 611b6c6 (seed 0), then f962b5b (seeds 1 and 2): held-out wording
$R --phases wording --selectors loss,pharmacist,random --defenses sft --seeds 1,2
