"""`dvc repro` of the data stages on the ci profile in a fresh workspace, and a DVC remote round trip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import dvc_bin, make_workspace

pytestmark = pytest.mark.integration

DATA_STAGES = ("ingest", "validate", "split", "featurize")


def _env() -> dict[str, str]:
    venv_bin = str(Path(dvc_bin()).parent)
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}


def _dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([dvc_bin(), *args], cwd=ws, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = make_workspace(tmp_path_factory.mktemp("ws"), profile="ci")
    _dvc(ws, "repro", "featurize")
    return ws


def test_repro_writes_every_data_stage_output(workspace: Path) -> None:
    raw = pd.read_parquet(workspace / "data/raw/posts.parquet")
    manifest = json.loads((workspace / "data/raw/manifest.json").read_text())
    assert manifest["data_version"].startswith("sha256:")
    assert set(raw["slice"]) == {"text_only", "image_only", "text_image", "hidden_image_ad"}

    report = json.loads((workspace / "reports/validation.json").read_text())
    assert report["accepted"] + report["rejected"] == len(raw)
    assert report["data_version"] == manifest["data_version"]

    sizes = {s: len(pd.read_parquet(workspace / f"data/split/{s}.parquet")) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == report["accepted"]
    assert sizes["train"] > sizes["val"] > 0 and sizes["test"] > 0

    for split, n in sizes.items():
        arrays = np.load(workspace / f"data/features/{split}.npz", allow_pickle=False)
        assert len(arrays["id"]) == n
        for name in ("tfidf", "sent_emb", "sift_bow", "hsv", "qr", "token_ids", "image_small"):
            assert arrays[name].shape[0] == n, name
            assert np.isfinite(arrays[name].astype(np.float64)).all(), name
    assert (workspace / "artifacts/featurizer/meta.json").is_file()


def test_second_repro_is_a_no_op(workspace: Path) -> None:
    out = _dvc(workspace, "repro", "featurize").stdout
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' didn't change" in out, out


def test_params_change_reruns_only_downstream(workspace: Path) -> None:
    params = workspace / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("phash_max_distance: 4", "phash_max_distance: 3", 1))
        status = _dvc(workspace, "status", "--with-deps", "featurize").stdout
        assert "split" in status and "ingest" not in status.split("split")[0]
    finally:
        params.write_text(original)


def test_push_and_pull_round_trip(workspace: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    _dvc(workspace, "remote", "add", "-f", "-d", "rt", str(remote))
    _dvc(workspace, "push")
    assert any(remote.rglob("*")), "nothing was pushed"
    before = (workspace / "data/raw/posts.parquet").read_bytes()

    shutil.rmtree(workspace / "data")
    shutil.rmtree(workspace / ".dvc" / "cache")
    # Only the data stages have run here; later stages have no recorded outputs to pull.
    _dvc(workspace, "pull", "--with-deps", "featurize")
    assert (workspace / "data/raw/posts.parquet").read_bytes() == before
    assert (workspace / "data/features/train.npz").is_file()
    status = _dvc(workspace, "status", "--with-deps", "featurize").stdout
    assert "changed" not in status, status
