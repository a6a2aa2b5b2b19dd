#!/usr/bin/env bash
# Two single-seed trials of the retain answers, Full+SFT evaluated before any attack (harmful and
# benign prompts only). DATA_P4 is the small preset's data folder with reference retain answers
# (data/prepare.py --source DATA --out runs/small_p4/data --p 0.4); each trial's data folder is a
# copy of it whose retain.jsonl holds SmolLM2-135M-Instruct's own greedy answers (64 new tokens, batch
# 64, cut to whole sentences, as data/prepare.py --retain-answers self does): full_self for the same
# 400 retain prompts, full_self_all for those and the 275 AlpacaEval prompts no split takes (675).
# commands_500.sh: Full+SFT with 500 of the small preset's 675 retain rows, seeds 0-2 (full_self_500_s*).
set -euo pipefail
for v in self self_all; do
  python train.py --stage align --out runs/or/full_$v --data runs/or/data_$v --align-epochs 2
  python train.py --stage eval --out runs/or/full_$v --data runs/or/data_$v --eval-tasks harmful,benign \
    --eval-max-new-tokens 48 --eval-limit 100
done
