#!/usr/bin/env bash
# Full+SFT before any attack with 500 self-answered retain rows, seeds 0-2: between the 400 rows of
# own_answers (refusal 91.7, over-refusal 16.7) and the 675 of the small preset (89.7, 7.3-8.0).
# The data folder is the small preset's (runs/small_675/data, bench/reproduce.py --preset small) with
# retain.jsonl cut to its first 500 rows (the first 400 are own_answers' prompts). Align and eval
# flags as the preset's; seeds 0 and 1 side by side with one thread each, then seed 2 alone.
set -euo pipefail
mkdir -p runs/or/data_self_500 && cp runs/small_675/data/* runs/or/data_self_500/
head -500 runs/small_675/data/retain.jsonl > runs/or/data_self_500/retain.jsonl
one() {
  python train.py --stage align --out runs/or/full500_s$1 --data runs/or/data_self_500 --align-epochs 2 \
    --align-compile --align-seed $1
  python train.py --stage eval --out runs/or/full500_s$1 --data runs/or/data_self_500 \
    --eval-tasks harmful,harmful_qa,benign,sst2 --eval-max-new-tokens 48 --eval-limit 100
}
OMP_NUM_THREADS=1 one 0 > runs/or/full500_s0.log 2>&1 &
OMP_NUM_THREADS=1 one 1 > runs/or/full500_s1.log 2>&1
wait
one 2 > runs/or/full500_s2.log 2>&1
