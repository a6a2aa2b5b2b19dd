#!/usr/bin/env bash
# The commands behind results/small: the attack's calibration, then the small reproduction at the
# calibrated attack. DATA is the folder of public data sets (data/README.md); every call resumes:
# a finished run is skipped.
set -euo pipefail
DATA=${DATA:-../shared/data}
python bench/reproduce.py --source "$DATA" --out runs/small --results results/small --phases calibrate --selectors full,random --defenses sft
python bench/reproduce.py --source "$DATA" --out runs/small --preset small
