"""`make install`'s uv path (scripts/uv_pip.py): pip's own settings carried over to uv, so that uv
installs from the same indexes, links, constraints and certificate as pip."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("uv_pip", ROOT / "scripts" / "uv_pip.py")
uv_pip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(uv_pip)


def test_pip_settings_read_config_files_and_environment_with_pips_precedence(tmp_path, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\n"
        "index-url = https://mirror.example/simple\n"
        "extra-index-url = file:///opt/a/simple file:///opt/b/simple\n"
        "constraint = /etc/pins.txt\n"
        "[install]\n"
        "index-url = https://install-only.example/simple\n"
    )
    for name in [n for n in __import__("os").environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    monkeypatch.setenv("PIP_CERT", "/etc/ssl/ca.pem")

    settings = uv_pip.pip_settings(sys.executable)

    assert settings["index-url"] == "https://install-only.example/simple"  # [install] over [global]
    assert settings["extra-index-url"] == "file:///opt/a/simple file:///opt/b/simple"
    assert settings["constraint"] == "/etc/pins.txt"
    assert settings["find-links"] == "/opt/wheels"  # PIP_* variables count too
    assert settings["cert"] == "/etc/ssl/ca.pem"


def test_uv_arguments_carry_every_index_link_and_constraint():
    args, env = uv_pip.uv_arguments(
        {
            "index-url": "https://mirror.example/simple",
            "extra-index-url": "file:///opt/a/simple file:///opt/b/simple",
            "find-links": "/opt/wheels",
            "constraint": "/etc/pins.txt",
            "cert": "/etc/ssl/ca.pem",
            "timeout": "180",  # no uv equivalent that changes what is installed: left out
        }
    )
    assert args == [
        "--index-url",
        "https://mirror.example/simple",
        "--extra-index-url",
        "file:///opt/a/simple",
        "--extra-index-url",
        "file:///opt/b/simple",
        "--find-links",
        "/opt/wheels",
        "--constraint",
        "/etc/pins.txt",
    ]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/ca.pem"}


def test_without_uv_it_exits_127_so_make_falls_back_to_pip(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(ROOT / "scripts" / "uv_pip.py"), "install", "x"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 127
    assert "no uv next to" in done.stderr
