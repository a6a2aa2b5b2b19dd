#!/usr/bin/env bash
# The commands behind results/small/control: Full+SFT attacked at several harmful shares p
# (p = 0: no harmful row at all), with SST-2 alone or SST-2 plus the retain rows (benign
# instructions) as the user's data. DATA is the folder of public data sets (data/README.md);
# every call resumes: a finished run is skipped.
set -euo pipefail
DATA=${DATA:-../shared/data}
python bench/reproduce.py --source "$DATA" --out runs/small --results results/small/control --phases calibrate \
  --selectors full --defenses sft \
  --grid 2e-4:2:0.05,5e-4:1:0.05,5e-4:1:0,2e-4:2:0.02,2e-4:2:0,1e-4:2:0.1,1e-4:2:0,5e-4:1:0.1:retain,5e-4:1:0:retain
