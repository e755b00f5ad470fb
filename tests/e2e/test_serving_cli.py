"""`adfilter serve` as an operator runs it: a separate process on 127.0.0.1, driven over HTTP,
stopped with SIGTERM; every answered post is in the store afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving.store import read_predictions
from tests.serving_fixtures import ROOT, free_port, shared_bundle

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_bundle(tmp_path_factory)


def test_serve_command_answers_and_flushes_on_sigterm(bundle_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = tmp_path / "predictions.db"
    env = {**os.environ, "ADFILTER_ADMIN_TOKEN": "e2e-token", "ADFILTER_LOG_LEVEL": "warning",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "adfilter.cli", "--params", str(ROOT / "params.yaml"), "serve",
           "--profile", "ci", "--host", "127.0.0.1", "--port", str(port), "--bundle", str(bundle_dir),
           "--store-url", f"sqlite:///{db}", "--poll-seconds", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("adfilter serve did not become ready in 180 s")

        answered = 0
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(20):
                r = c.post("/v1/moderate", json={"text": f"message number {i}: call me later"})
                assert r.status_code == 200, r.text
                answered += 1
            r = c.post("/v1/moderate", json={"posts": [{"text": "a"}, {"text": "b"}]})
            assert r.status_code == 200
            answered += 2
            assert c.post("/v1/moderate", json={"text": 1}).status_code == 422
            reload = c.post("/admin/reload", json={"wait": True},
                            headers={"authorization": "Bearer e2e-token"})
            assert reload.status_code == 200, reload.text
            assert c.get("/healthz").json() == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        # uvicorn shuts down gracefully, then re-raises the signal: the conventional status.
        assert proc.returncode in (0, -signal.SIGTERM), out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    rows = read_predictions(f"sqlite:///{db}")
    assert len(rows) == answered
