"""Wall time of a pipeline run, then of the same run again with nothing changed (every stage cached).

    .venv/bin/python benchmarks/cached_rerun.py [--config configs/demo.yaml] [--work DIR] [override ...]

Both runs are `tunegate run` subprocesses against one fresh MLflow store and output directory under
WORK. The second finds every training and data stage in the stage cache, and the candidate already
champion, so it trains, evaluates and registers nothing. Prints both wall times and their ratio
(the target: under 5%).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tunegate-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).with_name("tunegate")),
        "run",
        "--config",
        args.config,
        f"registry.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"run.output_dir={work / 'runs'}",
        *args.overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1"}
    walls = []
    for i in (1, 2):
        start = time.perf_counter()
        with open(work / f"run{i}.log", "w") as log:
            code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        walls.append(time.perf_counter() - start)
        print(f"run {i}: {walls[-1]:.1f} s wall, exit {code} (log {work / f'run{i}.log'})", flush=True)
        if code != 0:
            sys.exit(code)
    print(f"rerun / first run: {100 * walls[1] / walls[0]:.1f}%")


if __name__ == "__main__":
    main()
