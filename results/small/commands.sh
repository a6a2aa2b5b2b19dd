#!/usr/bin/env bash
# The commands behind results/small: the attack's first calibration (p = 0.1, runs/ and
# calibration.md), then the small reproduction at the calibrated attack (lr 2e-4, 4 epochs, p = 0.4:
# harmful_share/): report.md, before_after.md, precision.md, fig1.png, per_run/ and runs/ (each run's
# configs, results and generations; before_<run> is the same aligned model with no attack), the retain
# rows with AlpacaEval's reference answers; then the same with the retain rows answered by the model
# itself (data/prepare.py --retain-answers self): own_answers/; then all 675
# retain prompts the other splits leave, self-answered, and compiled blocks: own_675/; then the same
# with two configurations at a time, one thread each (--jobs 2, the preset's default): jobs2/; then the
# first 500 of the 675 retain rows (the preset's default): own_500/.
# DATA is the folder of public data sets (data/README.md); every call resumes:
# a finished run is skipped.
set -euo pipefail
DATA=${DATA:-../shared/data}
python bench/reproduce.py --source "$DATA" --out runs/small --results results/small --phases calibrate --selectors full,random --defenses sft
python bench/reproduce.py --source "$DATA" --out runs/small_p4 --preset small  # at commit 25a5993: reference retain answers
python bench/reproduce.py --source "$DATA" --out runs/small_own --preset small --results results/small/own_answers  # at commit d56d8fc
python bench/reproduce.py --source "$DATA" --out runs/small_675 --preset small --results results/small/own_675  # at commit 436e1e5
python bench/reproduce.py --source "$DATA" --out runs/small_jobs2 --preset small --results results/small/jobs2  # at commit 9a69f3d
python bench/reproduce.py --source "$DATA" --out runs/small_500 --preset small --results results/small/own_500  # at commit 551d09f
