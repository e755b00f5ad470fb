"""Hot reload against a live server: a swap under load fails no request, a failed load keeps
the old model and says so, a changed bundle folder and a moved registry alias are picked up."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving_fixtures import LiveServer, b64, ci_params, png_bytes, shared_bundle

pytestmark = pytest.mark.integration

TOKEN = "reload-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def bundle_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_bundle(tmp_path_factory, "a")


@pytest.fixture(scope="module")
def bundle_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_bundle(tmp_path_factory, "b")


def _version(url: str) -> str | None:
    model = httpx.get(f"{url}/readyz", timeout=10).json().get("model")
    return model["model_version"] if model else None


def _wait_for(predicate, timeout: float = 60.0, step: float = 0.1) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def _reloads(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == "adfilter_model_reloads":
            for s in family.samples:
                if s.name == "adfilter_model_reloads_total":
                    out[s.labels["result"]] = s.value
    return out


def test_reload_under_load_fails_no_request(bundle_a: Path, bundle_b: Path, tmp_path: Path) -> None:
    import numpy as np

    params = ci_params(store={"url": f"sqlite:///{tmp_path / 'p.db'}"})
    image = b64(png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    bodies = [{"text": "win a prize, call now"}, {"text": "see you later", "image": image},
              {"posts": [{"text": "hello"}, {"image": image}, {"text": "free entry, text WIN"}]}]
    with LiveServer(params, str(bundle_a), poll_seconds=0, admin_token=TOKEN) as live:
        version_a = _version(live.url)
        results: list[tuple[int, set[str]]] = []
        stop = threading.Event()

        def load(worker: int) -> None:
            with httpx.Client(base_url=live.url, timeout=60) as c:
                i = worker
                while not stop.is_set() and len(results) < 2000:
                    r = c.post("/v1/moderate", json=bodies[i % len(bodies)])
                    i += 1
                    data = r.json()
                    versions = ({x["model_version"] for x in data["results"]} | {data["model_version"]}
                                if "results" in data else {data.get("model_version")})
                    results.append((r.status_code, versions))

        workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        assert _wait_for(lambda: len(results) >= 20)
        r = httpx.post(f"{live.url}/admin/reload", json={"source": str(bundle_b)}, headers=AUTH)
        assert r.status_code == 202, r.text
        assert _wait_for(lambda: _version(live.url) == "test-b")
        n_at_swap = len(results)
        assert _wait_for(lambda: len(results) >= n_at_swap + 20)
        stop.set()
        for w in workers:
            w.join()
        ready = httpx.get(f"{live.url}/readyz").json()

    statuses = [s for s, _ in results]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    seen = [v for _, v in results]
    assert all(len(v) == 1 for v in seen), "one request was answered by two models"
    flat = [next(iter(v)) for v in seen]
    assert version_a in flat and "test-b" in flat
    assert flat[-1] == "test-b" and version_a != "test-b"
    assert ready["source"] == str(bundle_b) and ready["last_reload_error"] is None


def test_failed_reload_keeps_the_old_model_and_reports_it(bundle_a: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle_a, broken)
    (broken / "model.pt").write_bytes(b"this is not TorchScript")
    params = ci_params(store={"url": f"sqlite:///{tmp_path / 'p.db'}"})
    with LiveServer(params, str(bundle_a), poll_seconds=0, admin_token=TOKEN) as live:
        before = _version(live.url)
        r = httpx.post(f"{live.url}/admin/reload", json={"source": str(broken), "wait": True},
                       headers=AUTH, timeout=120)
        assert r.status_code == 500 and r.json()["error"]["code"] == "reload_failed"
        assert "TorchScript" in r.json()["error"]["message"]
        r = httpx.post(f"{live.url}/admin/reload", json={"source": str(tmp_path / "missing")},
                       headers=AUTH)
        assert r.status_code == 202
        assert _wait_for(lambda: not httpx.get(f"{live.url}/readyz").json()["loading"])
        ready = httpx.get(f"{live.url}/readyz")
        assert ready.status_code == 200
        status = ready.json()
        assert status["model"]["model_version"] == before
        assert "lacks" in status["last_reload_error"] and status["source"] == str(bundle_a)
        assert _reloads(live.url).get("failure") == 2.0
        ok = httpx.post(f"{live.url}/v1/moderate", json={"text": "still serving?"})
        assert ok.status_code == 200 and ok.json()["model_version"] == before


def test_polling_picks_up_a_rewritten_bundle_folder(bundle_a: Path, bundle_b: Path,
                                                     tmp_path: Path) -> None:
    live_dir = tmp_path / "export"
    shutil.copytree(bundle_a, live_dir)
    params = ci_params(store={"url": f"sqlite:///{tmp_path / 'p.db'}"})
    with LiveServer(params, str(live_dir), poll_seconds=0.2) as live:
        first = _version(live.url)
        time.sleep(0.05)
        shutil.copy2(bundle_b / "model.pt", live_dir / "model.pt")
        assert _wait_for(lambda: _version(live.url) == "test-b", timeout=60)
        assert first != "test-b"
        assert _reloads(live.url).get("success", 0) >= 2


def test_registry_alias_move_is_followed(bundle_a: Path, bundle_b: Path, tmp_path: Path) -> None:
    import mlflow
    import mlflow.pyfunc

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serving-test")
    client = mlflow.MlflowClient(tracking_uri=uri)

    class Placeholder(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
            return model_input

    def register(bundle: Path) -> str:
        # The layout tasks.register logs: a pyfunc model whose artifact `bundle` is the folder.
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="ad-filter", python_model=Placeholder(),
                                           artifacts={"bundle": str(bundle)}, pip_requirements=[])
        return str(mlflow.register_model(info.model_uri, "ad-filter").version)

    v1 = register(bundle_a)
    client.set_registered_model_alias("ad-filter", "champion", v1)
    params = ci_params(store={"url": f"sqlite:///{tmp_path / 'p.db'}"},
                       cache_dir=str(tmp_path / "cache"))
    params = dataclasses.replace(params, mlflow=dataclasses.replace(params.mlflow, tracking_uri=uri))
    with LiveServer(params, "models:/ad-filter@champion", poll_seconds=0.3) as live:
        assert _version(live.url) == f"ad-filter/{v1}"
        r = httpx.post(f"{live.url}/v1/moderate", json={"text": "from the registry"})
        assert r.status_code == 200 and r.json()["model_version"] == f"ad-filter/{v1}"
        v2 = register(bundle_b)
        client.set_registered_model_alias("ad-filter", "champion", v2)
        assert _wait_for(lambda: _version(live.url) == f"ad-filter/{v2}", timeout=90)
        assert (tmp_path / "cache" / "ad-filter" / v2).is_dir()
        r = httpx.post(f"{live.url}/v1/moderate", json={"text": "from the registry"})
        assert r.json()["model_version"] == f"ad-filter/{v2}"

