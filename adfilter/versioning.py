"""Which data and code made an artifact: the data version, the DVC hash and the git commit.

The data version is a content hash of the raw snapshot (`data/raw/manifest.json`, written by
`ingest`), so it is known inside every stage, also before DVC has written `dvc.lock`. Where
DVC has recorded the snapshot, its md5 is reported beside it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable
from pathlib import Path

import yaml

MANIFEST = "manifest.json"


def content_hash(files: Iterable[Path], root: Path) -> str:
    """sha256 over the relative names and bytes of `files`, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def data_version(raw_dir: str | Path = "data/raw") -> str:
    """The raw snapshot's version, e.g. `sha256:3f2a9c...` (first 16 hex digits)."""
    manifest = Path(raw_dir) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: run the ingest stage first (dvc repro ingest)")
    return json.loads(manifest.read_text())["data_version"]


def dvc_out_md5(out: str = "data/raw", lock: str | Path = "dvc.lock") -> str | None:
    """The md5 DVC recorded for the output `out` in `dvc.lock`, or None if not recorded yet."""
    lock = Path(lock)
    if not lock.is_file():
        return None
    data = yaml.safe_load(lock.read_text()) or {}
    for stage in (data.get("stages") or {}).values():
        for entry in stage.get("outs") or []:
            if entry.get("path") == out:
                return entry.get("md5")
    return None


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def provenance(raw_dir: str | Path = "data/raw") -> dict[str, str | None]:
    """What every report, checkpoint and exported model embeds."""
    try:
        version = data_version(raw_dir)
    except FileNotFoundError:
        version = None
    return {"data_version": version, "dvc_md5": dvc_out_md5(), "git_commit": git_commit()}
