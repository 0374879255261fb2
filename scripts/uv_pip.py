"""Run `uv pip install` with what pip itself would use: its indexes, find-links, constraints and
certificate, read from pip's own configuration (files and PIP_* variables, `pip config list`).

    .venv/bin/python scripts/uv_pip.py install [uv pip install arguments...]

`make install` uses it: uv installs the same versions as pip from the same places in about a third of
the time (BENCHMARKS.md), byte-compiling in parallel. Exit status 127 when uv is not installed next to
this Python, so the caller can fall back to pip. uv picks the best version across all indexes, as pip
does (`--index-strategy unsafe-best-match`), so an extra index cannot pin an older release.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# pip option -> uv option; options pip repeats are space-separated lists in pip's configuration
_LISTS = {
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}


def pip_settings(python: str) -> dict[str, str]:
    """pip's effective settings for `install` (global, then install-specific, then PIP_* variables
    last: pip's own precedence), as {option: value}."""
    out = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    rank = {"global": 0, "install": 1, ":env:": 2}
    found: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        section, _, option = key.rpartition(".")
        if section not in rank or not option:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        if option not in found or rank[section] >= found[option][0]:
            found[option] = (rank[section], value)
    return {k: v for k, (_, v) in found.items()}


def uv_arguments(settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv flags and environment variables for pip's settings."""
    args, env = [], {}
    if "index-url" in settings:
        args += ["--index-url", settings["index-url"]]
    for option, flag in _LISTS.items():
        for value in settings.get(option, "").split():
            args += [flag, value]
    if settings.get("no-index", "").lower() in {"1", "true", "yes", "on"}:
        args.append("--no-index")
    if "cert" in settings:
        env["SSL_CERT_FILE"] = settings["cert"]
    return args, env


def main(argv: list[str]) -> int:
    uv = Path(sys.executable).with_name("uv")
    if not uv.exists():
        print(f"uv_pip: no uv next to {sys.executable}", file=sys.stderr)
        return 127
    if not argv or argv[0] != "install":
        print("usage: uv_pip.py install [arguments...]", file=sys.stderr)
        return 2
    args, env = uv_arguments(pip_settings(sys.executable))
    command = [str(uv), "pip", "install", "--python", sys.executable, "--compile-bytecode"]
    command += ["--index-strategy", "unsafe-best-match", *args, *argv[1:]]
    return subprocess.run(command, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
