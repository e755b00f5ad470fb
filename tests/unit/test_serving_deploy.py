"""The deployment files in docker/, checked offline (no container engine runs here):

- the compose file against the Compose Specification JSON schema (`docker/compose-spec.schema.json`,
  the schema docker-compose 1.29.2 validates with), plus what a schema cannot see: every
  dependency, volume, build file and mounted file exists; and `docker-compose config` itself
  when that binary is installed (`apt-get install docker-compose`);
- the Prometheus rules: the p99 > 100 ms alert, over metrics the server really exports;
- the Kubernetes autoscaler: scales the Deployment on the adapter's p99 metric at 100 ms.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from serving.metrics import ServingMetrics

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
REQUIRED_SERVICES = {
    "postgres", "redis", "minio", "mlflow", "airflow-apiserver", "airflow-scheduler",
    "airflow-dag-processor", "airflow-worker", "serve", "prometheus", "triton", "serve-gpu",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _exported_metric_names() -> set[str]:
    """Every series name the server's registry can export (labelled metrics have no samples
    before their first observation, so the names come from the family types)."""
    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",),
                "gauge": ("",), "info": ("_info",)}
    names = set()
    for family in ServingMetrics().registry.collect():
        names.update(f"{family.name}{s}" for s in suffixes.get(family.type, ("",)))
    return names


def test_compose_file_matches_the_compose_schema(compose: dict) -> None:
    schema = json.loads((DOCKER / "compose-spec.schema.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_the_schema_check_can_fail(compose: dict) -> None:
    schema = json.loads((DOCKER / "compose-spec.schema.json").read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["serve"]["portz"] = ["8000:8000"]
    broken["services"]["redis"]["healthcheck"]["retries"] = "many"
    errors = list(jsonschema.Draft201909Validator(schema).iter_errors(broken))
    assert len(errors) >= 2


def test_compose_stack_is_complete_and_consistent(compose: dict) -> None:
    services = compose["services"]
    assert REQUIRED_SERVICES <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        build = svc.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
        for vol in svc.get("volumes") or []:
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                path = (DOCKER / source).resolve()
                # Config files ship with the repo; data folders (the Triton repository) are
                # written by the pipeline.
                if "artifacts" not in source:
                    assert path.exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"
    assert services["airflow-worker"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert "redis://redis" in services["airflow-worker"]["environment"]["AIRFLOW__CELERY__BROKER_URL"]
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "postgresql://" in mlflow_cmd and "s3://" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    serve_cmd = " ".join(services["serve"]["command"])
    assert "models:/ad-filter@champion" in serve_cmd and "postgresql://" in serve_cmd
    assert any("/models" in v for v in services["triton"]["volumes"])
    host_ports = [p.split(":")[0] for s in services.values() for p in s.get("ports") or []]
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"


def test_serve_command_flags_exist() -> None:
    from adfilter.cli import build_parser

    compose = yaml.safe_load(COMPOSE.read_text())
    parser = build_parser()
    for name in ("serve", "serve-gpu"):
        args = parser.parse_args(compose["services"][name]["command"])
        assert args.command == "serve" and args.bundle == "models:/ad-filter@champion"
        assert args.tracking_uri == "http://mlflow:5000"


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose not installed (apt-get install docker-compose)")
def test_docker_compose_config_accepts_the_file() -> None:
    for extra in ([], ["--profile", "gpu"]):
        proc = subprocess.run(["docker-compose", "-f", str(COMPOSE), *extra, "config", "-q"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr


def test_prometheus_alerts_p99_over_100ms_on_exported_metrics() -> None:
    rules = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    p99 = alerts["AdfilterLatencyP99Above100ms"]
    expr = " ".join(p99["expr"].split())
    assert expr.startswith("histogram_quantile(0.99,") and expr.endswith("> 0.1")
    exported = _exported_metric_names()
    for r in (rule for g in rules["groups"] for rule in g["rules"]):
        for metric in re.findall(r"\badfilter_[a-z_]+\b", r["expr"]):
            assert metric in exported, f"rule uses {metric}, which serving/metrics.py does not export"
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    assert "/etc/prometheus/alerts.yml" in config["rule_files"]
    compose = yaml.safe_load(COMPOSE.read_text())
    for job in config["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            assert target.split(":")[0] in compose["services"], target


def test_hpa_scales_the_deployment_on_the_adapter_p99() -> None:
    hpa = yaml.safe_load((DOCKER / "k8s" / "hpa.yaml").read_text())
    deployment, service = list(yaml.safe_load_all((DOCKER / "k8s" / "serve.yaml").read_text()))
    adapter = yaml.safe_load((DOCKER / "k8s" / "prometheus-adapter.yaml").read_text())
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["kind"] == "HorizontalPodAutoscaler"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["averageValue"] == "100m"
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert "histogram_quantile(0.99" in rule["metricsQuery"]
    for name in re.findall(r"\badfilter_[a-z_]+\b", rule["seriesQuery"] + rule["metricsQuery"]):
        assert name in _exported_metric_names(), name
    probes = deployment["spec"]["template"]["spec"]["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("*.Dockerfile")))
def test_dockerfiles_copy_files_that_exist(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    assert re.search(r"^FROM \S+", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} (context: repo root)"
