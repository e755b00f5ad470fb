"""A small but real model bundle for the serving tests, and a live server to drive.

`build_bundle` makes the export layout (`model.pt` with `config.json`, `gate.bin` +
`gate.json`, `featurizer/`, `export.json`) from real parts on a few posts: real SMS texts and
rendered images from `adfilter.sample`, a FeaturePipeline fitted on them, a fastText gate
trained on them, and the ci-sized `models.net.MultimodalNet` traced with TorchScript. The net
is untrained; the serving tests check the contract and the plumbing, not accuracy.

`LiveServer` runs the app under a real uvicorn server on 127.0.0.1 (a free port) in a thread
and shuts it down the way a signal would, so the lifespan's flush runs.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adfilter.config import GateParams, Params, load_params, to_dict
from adfilter.schema import COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def ci_params(validate: dict[str, Any] | None = None, **serve_overrides: Any) -> Params:
    """The ci profile with `serve` fields replaced (nested sections as dicts), and `validate`
    fields (the image and text limits the server applies)."""
    params = load_params(ROOT / "params.yaml", profile="ci")
    serve = params.serve
    for key, value in serve_overrides.items():
        if isinstance(value, dict):
            value = dataclasses.replace(getattr(serve, key), **value)
        serve = dataclasses.replace(serve, **{key: value})
    params = dataclasses.replace(params, serve=serve)
    if validate:
        params = dataclasses.replace(params, validate=dataclasses.replace(params.validate, **validate))
    return params


def png_bytes(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sample_posts(n_text: int = 160, n_image: int = 24, seed: int = 0, size: int = 96) -> tuple[
        pd.DataFrame, dict[str, np.ndarray]]:
    """Real SMS texts (ads and clean) and rendered images: (posts table, id -> RGB image)."""
    from adfilter.sample import load_backgrounds, load_sms_corpus, render_post_image

    sms = load_sms_corpus()
    spam = sms[sms["label"] == 1].sample(n_text // 3, random_state=seed)
    ham = sms[sms["label"] == 0].sample(n_text - len(spam), random_state=seed)
    texts = pd.concat([spam, ham]).sample(frac=1.0, random_state=seed)
    rows, images = [], {}
    for i, (text, label) in enumerate(zip(texts["text"], texts["label"], strict=True)):
        rows.append({"id": f"t{i:04d}", "text": text, "image": "", "label": int(label),
                     "sensitivity": 0.5 * int(label), "slice": "text_only"})
    backgrounds = load_backgrounds()
    for i in range(n_image):
        ad = i % 2 == 1
        style = ("qr", "banner", "poster")[i % 3] if ad else "plain"
        img = render_post_image(seed, i, "prize" if ad else "clean", style, size, backgrounds)
        pid = f"i{i:04d}"
        images[pid] = np.asarray(img.convert("RGB"), dtype=np.uint8)
        rows.append({"id": pid, "text": "" if i % 4 else "look at this", "image": f"{pid}.png",
                     "label": int(ad), "sensitivity": 0.5 * int(ad), "slice": "image_only"})
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df, images


def build_bundle(dest: Path, seed: int = 0, low: float | None = None,
                 high: float | None = None) -> Path:
    """A bundle folder at `dest` (see the module docstring). `low` / `high` default to gate
    thresholds that leave confident texts to the gate and the rest to the deep model."""
    import torch

    from adfilter.features import FeaturePipeline
    from models.gate import FastTextGate
    from models.net import INPUT_NAMES, OUTPUT_NAMES, net_inputs
    from models.registry import create_model, net_spec

    params = load_params(ROOT / "params.yaml", profile="ci")
    feat = dataclasses.replace(
        params.featurize,
        text=dataclasses.replace(params.featurize.text, svd_dim=16, max_seq_tokens=32),
        image=dataclasses.replace(params.featurize.image, image_size=96, sift_vocab_size=16,
                                  sift_max_keypoints=60, hsv_bins=[6, 2, 2]),
    )
    dest = Path(dest)
    work = dest.parent / f".{dest.name}-posts"
    work.mkdir(parents=True, exist_ok=True)
    df, images = sample_posts(seed=seed)
    from PIL import Image

    for pid, rgb in images.items():
        Image.fromarray(rgb).save(work / f"{pid}.png")
    dest.mkdir(parents=True, exist_ok=True)
    pipeline = FeaturePipeline.fit(df, feat, seed=seed, image_root=work)
    pipeline.save(dest / "featurizer")

    gate_params = GateParams(epoch=25, lr=0.5, word_ngrams=2, minn=2, maxn=4, dim=16,
                             bucket=20000, min_count=1, thread=1, seed=seed,
                             max_recall_loss=0.002, block=True, safety_logit=0.0)
    text_rows = df[df["text"] != ""]
    gate = FastTextGate.train(text_rows["text"].tolist(), text_rows["label"].to_numpy(), gate_params)
    gate.low = 0.2 if low is None else low
    gate.high = 0.8 if high is None else high
    gate.save(dest)

    torch.manual_seed(seed)
    spec = net_spec(params.model, pipeline.feature_dims, feat.image.net_image_size,
                    feat.text.max_seq_tokens)
    net = create_model(spec["name"], **spec["kwargs"]).eval()
    mixed = df.iloc[[0, 1, 2, len(df) - 1, len(df) - 2, len(df) - 3]]
    arrays = pipeline.featurize_posts(
        mixed["text"].tolist(), [images.get(pid) for pid in mixed["id"]])
    inputs = net_inputs(arrays)
    with torch.no_grad():
        traced = torch.jit.trace(net, inputs, check_trace=False, strict=False)
    config = {
        "params": to_dict(params),
        "net": spec,
        "feature_dims": pipeline.feature_dims,
        "inputs": [{"name": n, "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": list(t.shape[1:])} for n, t in zip(INPUT_NAMES, inputs, strict=True)],
        "outputs": list(OUTPUT_NAMES),
        "provenance": {"data_version": "test", "git_commit": None},
        "seed": seed,
    }
    torch.jit.save(traced, str(dest / "model.pt"),
                   _extra_files={"config.json": json.dumps(config)})
    (dest / "export.json").write_text(json.dumps({"parity": {"max_abs_diff": 0.0},
                                                  "provenance": config["provenance"]}))
    shutil.rmtree(work, ignore_errors=True)
    return dest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """`create_app(params, ...)` under uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, params: Params, bundle: str, **app_kwargs: Any) -> None:
        import uvicorn

        from serving.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(params, bundle, **app_kwargs)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.serving

    def __enter__(self) -> LiveServer:
        self.thread.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=5)
                last = r.json()
                if r.status_code == 200:
                    return
                if last.get("last_reload_error") and not last.get("loading"):
                    raise RuntimeError(f"the server could not load its model: {last}")
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server at {self.url} not ready after {timeout} s: {last}")

    def stop(self, timeout: float = 120.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


_BUILT: dict[str, Path] = {}


def shared_bundle(tmp_path_factory: Any, name: str = "a") -> Path:
    """One bundle per test session, shared by every serving test module."""
    if name not in _BUILT:
        root = tmp_path_factory.mktemp("serving-bundles")
        base = _BUILT.get("a") or build_bundle(root / "a")
        _BUILT["a"] = base
        if name != "a":
            _BUILT[name] = variant(base, root / name, name)
    return _BUILT[name]


def variant(base: Path, dest: Path, version: str) -> Path:
    """A copy of bundle `base` that is a different model version (its config names it)."""
    import torch

    shutil.copytree(base, dest)
    extra = {"config.json": ""}
    module = torch.jit.load(str(base / "model.pt"), _extra_files=extra)
    config = json.loads(extra["config.json"])
    config["model_version"] = f"test-{version}"
    torch.jit.save(module, str(dest / "model.pt"), _extra_files={"config.json": json.dumps(config)})
    return dest
