#!/usr/bin/env bash
# The runs of results/v2: the trained judge, the refusal/degenerate rates and the harmful loss on
# a few representative models. Data: python data/prepare.py --source <public data> --out runs/data
set -euo pipefail
COMMON="--data runs/data --select-keep 160 --select-bf16 --align-epochs 2 --align-bf16 --finetune-epochs 2
        --finetune-bf16 --finetune-lr 5e-4 --eval-tasks harmful,harmful_qa,benign,sst2 --eval-max-new-tokens 48
        --eval-limit 100"
for sel in pharmacist random; do
  python train.py --stage all --out runs/v2/${sel}_sft_k160 --select-selector $sel $COMMON
done
python train.py --stage all --out runs/v2/random_vaccine_k160 --select-selector random --align-defense vaccine $COMMON
EV="--data runs/data --tasks harmful,harmful_qa,benign,sst2 --max-new-tokens 48 --limit 100"
python evaluate.py --model smollm2-135m-instruct --out runs/v2/base/eval $EV
# the SFT-aligned model of bench/judge_set.py (the whole pool, 2 epochs), before any attack
python evaluate.py --model runs/judge_set/attack_5e-4/align/model --out runs/v2/full_sft_no_attack/eval $EV
python bench/report.py runs/v2/* --out results/v2 --no-figure
