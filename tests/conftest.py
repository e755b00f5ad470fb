"""Shared fixtures. Tests never reach a network: model hubs are switched off for every test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

# What a workspace copy of the project needs to run its pipeline.
PROJECT_FILES = ("adfilter", "models", "tasks", "serving", "dags", "dvc.yaml", "params.yaml")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


def make_workspace(dest: Path, profile: str = "ci") -> Path:
    """A fresh git + DVC repository holding the project's code, with `profile` selected."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    params = dest / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("profile: default", f"profile: {profile}", 1))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=env)
    subprocess.run([dvc_bin(), "init", "-q"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "workspace"], cwd=dest, check=True, env=env)
    return dest


def dvc_bin() -> str:
    local = ROOT / ".venv" / "bin" / "dvc"
    return str(local) if local.exists() else "dvc"


@pytest.fixture
def params_yaml_text(repo_root: Path) -> str:
    return (repo_root / "params.yaml").read_text()
