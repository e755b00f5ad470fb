"""The model bundle the server runs, from a local folder or the MLflow model registry.

A bundle is the folder the export stage writes (`artifacts/export/`):

    model.pt      TorchScript of the whole inference graph, with `config.json` as an extra file
                  (resolved params, feature dims, provenance, input names/shapes/dtypes)
    gate.bin      the fastText gate; gate.json its calibrated thresholds `low` / `high`
    featurizer/   the fitted FeaturePipeline (adfilter.features.FeaturePipeline.load)
    export.json   parity figures and provenance

A source is either a folder or `models:/<name>@<alias>` (or `models:/<name>/<version>`): the
version the alias points to is downloaded with `mlflow.artifacts.download_artifacts` into
`serve.cache_dir/<name>/<version>/`, once, and the bundle folder is found inside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from serving.gate import META_FILE as GATE_META
from serving.gate import MODEL_FILE as GATE_MODEL
from serving.gate import TextGate

log = logging.getLogger(__name__)

MODEL_FILE: Final = "model.pt"
CONFIG_EXTRA: Final = "config.json"
FEATURIZER_DIR: Final = "featurizer"
EXPORT_META: Final = "export.json"
REQUIRED: Final = (MODEL_FILE, GATE_MODEL, GATE_META)

# The net's forward order and dtypes, used when config.json does not list its inputs.
DEFAULT_INPUTS: Final = (
    ("token_ids", "int64"),
    ("image", "float32"),
    ("tfidf", "float32"),
    ("sent_emb", "float32"),
    ("sift_bow", "float32"),
    ("hsv", "float32"),
    ("qr", "float32"),
    ("has_text", "bool"),
    ("has_image", "bool"),
)

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class BundleError(RuntimeError):
    """A bundle that cannot be served: a missing file, a model that does not run, a bad source."""


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """Where bundles come from: a folder, or a registered model's alias or version."""

    spec: str
    path: Path | None = None
    name: str | None = None
    alias: str | None = None
    version: str | None = None

    @property
    def is_registry(self) -> bool:
        return self.name is not None


def parse_source(spec: str) -> Source:
    """A `Source` from `serve.bundle` / `--bundle`: a folder or `models:/name@alias`."""
    spec = spec.strip()
    if spec.startswith("models:/"):
        m = _REGISTRY_URI.match(spec)
        if not m:
            raise BundleError(
                f"bundle source '{spec}': registry sources look like models:/ad-filter@champion "
                f"or models:/ad-filter/3"
            )
        return Source(spec, name=m["name"], alias=m["alias"], version=m["version"])
    if "://" in spec:
        raise BundleError(
            f"bundle source '{spec}': only a local folder or a models:/ registry URI is served; "
            f"download other locations first"
        )
    return Source(spec, path=Path(spec))


def registry_version(source: Source, tracking_uri: str) -> str:
    """The registry version `source` points to now (its alias is looked up)."""
    if source.version is not None:
        return source.version
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(source.name, source.alias)
    except Exception as exc:  # MlflowException, connection errors, ...
        raise BundleError(
            f"{source.spec}: cannot resolve alias '{source.alias}' of registered model "
            f"'{source.name}' at {tracking_uri} ({exc}); register a model and set the alias "
            f"(adfilter promote) or serve a local folder with --bundle"
        ) from exc
    return str(mv.version)


def fingerprint(path: Path) -> str:
    """Changes whenever a bundle file is rewritten (names, sizes, mtimes): what polling watches
    for a local folder."""
    parts = []
    for name in (*REQUIRED, EXPORT_META, f"{FEATURIZER_DIR}/meta.json"):
        f = path / name
        if f.is_file():
            st = f.stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def current_revision(source: Source, tracking_uri: str) -> str:
    """A string that changes when the source would give a different bundle."""
    if source.is_registry:
        return registry_version(source, tracking_uri)
    assert source.path is not None
    return fingerprint(source.path)


def fetch(source: Source, tracking_uri: str, cache_dir: str | Path) -> tuple[Path, str, str]:
    """A local bundle folder for `source`: (folder, model_version, revision)."""
    if not source.is_registry:
        assert source.path is not None
        path = source.path
        missing = [n for n in REQUIRED if not (path / n).is_file()]
        if missing:
            raise BundleError(
                f"bundle folder {path} lacks {', '.join(missing)}: point --bundle (serve.bundle) "
                f"at the export stage's output (artifacts/export, written by dvc repro export)"
            )
        return path, "", fingerprint(path)

    version = registry_version(source, tracking_uri)
    dest = Path(cache_dir) / source.name / version
    if not _find_bundle(dest):
        import mlflow.artifacts

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent))
        try:
            os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{source.name}/{version}", dst_path=str(tmp)
            )
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)  # a half-downloaded version is never mistaken for a whole one
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BundleError(
                f"{source.spec}: downloading version {version} of '{source.name}' from "
                f"{tracking_uri} failed ({type(exc).__name__}: {exc})"
            ) from exc
    found = _find_bundle(dest)
    if found is None:
        raise BundleError(
            f"{source.spec}: version {version} of '{source.name}' (downloaded to {dest}) holds "
            f"no bundle folder with {', '.join(REQUIRED)}; register the export stage's folder"
        )
    return found, f"{source.name}/{version}", version


def _find_bundle(root: Path, depth: int = 4) -> Path | None:
    """The bundle folder inside a downloaded registry version: the pyfunc artifact named
    `bundle` that `tasks.register` logs (read from `MLmodel`), else the shallowest folder
    under `root` holding the bundle files."""
    if not root.is_dir():
        return None
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        import yaml

        try:
            spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
            entry = spec["flavors"]["python_function"]["artifacts"]["bundle"]["path"]
        except (yaml.YAMLError, KeyError, TypeError):
            entry = None
        if entry and all((root / entry / n).is_file() for n in REQUIRED):
            return root / entry
    level = [root]
    for _ in range(depth + 1):
        for folder in level:
            if all((folder / n).is_file() for n in REQUIRED):
                return folder
        level = sorted(p for folder in level for p in folder.iterdir() if p.is_dir())
        if not level:
            break
    return None


# --------------------------------------------------------------------------- the TorchScript model


class DeepModel:
    """The TorchScript inference graph: feature arrays in, `p_ad`, `sensitivity`, `score` out."""

    def __init__(self, module: Any, config: Mapping[str, Any], device: str,
                 optimize: bool = False) -> None:
        self.module = module
        self.config = dict(config)
        self.device = device
        self.optimize = optimize
        specs = config.get("inputs") or [{"name": n, "dtype": d} for n, d in DEFAULT_INPUTS]
        self.inputs = [(str(s["name"]), str(s.get("dtype", ""))) for s in specs]

    @classmethod
    def load(cls, path: Path, device: str, optimize: bool = False) -> DeepModel:
        import torch

        extra = {CONFIG_EXTRA: ""}
        try:
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as exc:
            raise BundleError(f"{path}: not a loadable TorchScript model ({exc})") from exc
        module.eval()
        raw = extra[CONFIG_EXTRA]
        try:
            config = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise BundleError(f"{path}: its {CONFIG_EXTRA} extra file is not JSON ({exc})") from exc
        return cls(module, config, device, optimize)

    def tensors(self, arrays: Mapping[str, np.ndarray]) -> list[Any]:
        """The forward's arguments, in its order, from FeaturePipeline arrays."""
        import torch

        out = []
        for name, dtype in self.inputs:
            if name == "image":
                # uint8 NHWC as the featurizer writes it -> float NCHW in [0, 1]; the net
                # normalises further itself.
                t = torch.from_numpy(np.ascontiguousarray(arrays["image_small"]))
                t = t.to(self.device).permute(0, 3, 1, 2).to(torch.float32).div(255.0)
            else:
                if name not in arrays:
                    raise BundleError(
                        f"the model's input '{name}' is not among the featurizer's arrays "
                        f"({', '.join(sorted(arrays))}); the bundle's model and featurizer do "
                        f"not belong together"
                    )
                t = torch.from_numpy(np.ascontiguousarray(arrays[name])).to(self.device)
                t = t.to(getattr(torch, dtype)) if dtype and hasattr(torch, dtype) else t
            out.append(t)
        return out

    def predict(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        # `optimize=False` skips the profiling executor (see serve.torchscript_optimize).
        with torch.inference_mode(), torch.jit.optimized_execution(self.optimize):
            ad_logit, sensitivity, score = self.module(*self.tensors(arrays))[:3]
            return {
                "p_ad": torch.sigmoid(ad_logit).float().cpu().numpy().reshape(-1),
                "sensitivity": sensitivity.float().cpu().numpy().reshape(-1),
                "score": score.float().cpu().numpy().reshape(-1),
            }


# --------------------------------------------------------------------------- the bundle


@dataclass
class Bundle:
    """Everything one model version needs to answer requests; immutable once loaded, so a
    request that started on it can finish on it while a newer one is swapped in."""

    path: Path
    version: str
    revision: str
    source: str
    gate: TextGate
    model: DeepModel
    featurizer: Any  # adfilter.features.FeaturePipeline
    threshold: float
    config: dict[str, Any]
    export_meta: dict[str, Any]
    loaded_at: float = field(default_factory=time.time)

    @classmethod
    def load(
        cls,
        path: str | Path,
        version: str = "",
        revision: str = "",
        source: str = "",
        device: str = "cpu",
        default_threshold: float = 0.85,
        optimize: bool = False,
        gate_thresholds: tuple[float | None, float | None] = (None, None),
    ) -> Bundle:
        # The featurizer's sentence model must never reach a model hub from the server.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from adfilter.features import FeaturePipeline

        path = Path(path)
        missing = [n for n in REQUIRED if not (path / n).is_file()]
        if missing:
            raise BundleError(f"bundle folder {path} lacks {', '.join(missing)}")
        featurizer_dir = path / FEATURIZER_DIR
        if not featurizer_dir.is_dir() and (path.parent / FEATURIZER_DIR).is_dir():
            # An export folder beside artifacts/featurizer from before the copy was added.
            featurizer_dir = path.parent / FEATURIZER_DIR
            log.warning("%s has no %s/; using %s", path, FEATURIZER_DIR, featurizer_dir)
        try:
            featurizer = FeaturePipeline.load(featurizer_dir)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise BundleError(f"bundle {path}: the featurizer does not load ({exc})") from exc
        try:
            gate = TextGate.load(path)
        except (FileNotFoundError, ValueError) as exc:
            raise BundleError(f"bundle {path}: the gate does not load ({exc})") from exc
        low, high = gate_thresholds
        if low is not None or high is not None:
            low = gate.low if low is None else float(low)
            high = gate.high if high is None else float(high)
            if not low < high:
                raise BundleError(f"serve.gate_low {low} must be below serve.gate_high {high}")
            log.info("gate thresholds from params: low %g, high %g (gate.json: %g, %g)",
                     low, high, gate.low, gate.high)
            gate.low, gate.high = low, high
        model = DeepModel.load(path / MODEL_FILE, device, optimize)
        export_meta = _read_json(path / EXPORT_META)
        config = model.config
        threshold = _threshold(config, default_threshold)
        if not version:
            # The file's own hash, not export.json's record of it: a hand-copied model.pt
            # must not be reported under the version of the one it replaced.
            version = str(config.get("model_version")
                          or f"local-{_file_hash(path / MODEL_FILE)[:12]}")
        return cls(path, version, revision, source or str(path), gate, model, featurizer,
                   threshold, config, export_meta)

    @property
    def image_size(self) -> int:
        return int(self.featurizer.params.image.net_image_size)

    def info(self) -> dict[str, Any]:
        return {
            "model_version": self.version,
            "source": self.source,
            "path": str(self.path),
            "threshold": self.threshold,
            "gate": {"low": self.gate.low, "high": self.gate.high},
            "loaded_at": self.loaded_at,
            "provenance": self.config.get("provenance") or self.export_meta.get("provenance"),
        }


def _threshold(config: Mapping[str, Any], default: float) -> float:
    # The threshold the model was evaluated and the gate calibrated with travels with it.
    try:
        return float(config["params"]["model"]["threshold"])
    except (KeyError, TypeError, ValueError):
        return float(config.get("threshold", default))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("%s is not JSON; ignored", path)
        return {}
    return data if isinstance(data, dict) else {}


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
