#!/usr/bin/env bash
# The commands behind results/small/harmful_share: Full+SFT aligned on a data folder whose attack
# files hold 40 % harmful rows (--data-p 0.4), attacked on SST-2 at each lr x epochs with p = 0.4,
# 0.2 and 0 (no harmful row; --attack-p takes the same n = 200 rows). DATA is the folder of public
# data sets (data/README.md); every call resumes: a finished run is skipped.
set -euo pipefail
DATA=${DATA:-../shared/data}
python bench/reproduce.py --source "$DATA" --out runs/small_p4 --results results/small/harmful_share --data-p 0.4 \
  --phases calibrate --selectors full --defenses sft \
  --grid 5e-4:1:0.4,5e-4:1:0.2,5e-4:1:0,2e-4:4:0.4,2e-4:4:0,5e-4:2:0.4,5e-4:2:0
