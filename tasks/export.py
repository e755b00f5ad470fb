"""Stage `export`: the trained net as TorchScript, the fastText gate, and a Triton repository.

Writes `artifacts/export/`:
- `model.pt`: the whole inference graph traced from preprocessed tensors to both heads and
  the score, with the resolved params, feature dims, provenance and input specs embedded as
  `config.json`;
- `example_inputs.pt`: a dict of example input tensors and the outputs they must give;
- `gate.bin` + `gate.json`: the fastText gate and its thresholds, calibrated on val against
  the deep model's val scores;
- `triton/<model_name>/config.pbtxt` + `triton/<model_name>/1/model.pt`;
- `export.json`: parity, fresh-process check, latency and file list (a DVC metric).

The stage fails when the traced model differs from the eager one by more than
`export.parity_atol`, or when `model.pt` cannot be run by a process that imports only torch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adfilter.config import Params, TritonParams, load_params, to_dict
from adfilter.schema import HIDDEN_IMAGE_AD
from adfilter.versioning import provenance

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("ad_logit", "sensitivity", "score")
SPLITS = ("train", "val", "test")
MODEL_FILE = "model.pt"
EXAMPLES_FILE = "example_inputs.pt"
REPORT_FILE = "export.json"
EMBEDDED_CONFIG = "config.json"
# Arrays that belong to one modality: zeros when the post lacks it (the featurizer's rule).
TEXT_KEYS = ("token_ids", "tfidf", "sent_emb")
IMAGE_KEYS = ("image_small", "sift_bow", "hsv", "qr")
# (has_text, has_image) of the rows of a traced batch, in turn.
MODALITY_MIX = ((True, False), (False, True), (True, True))

# torch dtype -> Triton `data_type` (model_config.proto)
TRITON_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "TYPE_BOOL",
    torch.uint8: "TYPE_UINT8",
    torch.int8: "TYPE_INT8",
    torch.int16: "TYPE_INT16",
    torch.int32: "TYPE_INT32",
    torch.int64: "TYPE_INT64",
    torch.float16: "TYPE_FP16",
    torch.bfloat16: "TYPE_BF16",
    torch.float32: "TYPE_FP32",
    torch.float64: "TYPE_FP64",
}


class ExportError(RuntimeError):
    """An export that must not be shipped: parity failed, or the file does not run alone."""


# --------------------------------------------------------------------------- input specs


def tensor_specs(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """Name, dtype and per-row shape (batch dimension left out) of each tensor, in order."""
    if len(names) != len(tensors):
        raise ValueError(f"{len(names)} names for {len(tensors)} tensors: {list(names)}")
    return [
        {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape[1:])}
        for name, t in zip(names, tensors, strict=True)
    ]


def forward_input_names(net: nn.Module) -> list[str]:
    """The net's forward arguments in order: the order of INPUT__0..INPUT__n."""
    return [
        p.name
        for p in inspect.signature(net.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


# --------------------------------------------------------------------------- tracing and parity


def trace_net(net: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.jit.ScriptModule:
    """Trace `net` in eval mode. `inputs` should mix modalities so no branch is constant-folded."""
    net.eval()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        # torch's own check re-traces on the same batch and compares graph text, which fails
        # on harmless renaming; `check_parity` compares outputs on other posts and batch sizes.
        traced = torch.jit.trace(net, tuple(inputs), check_trace=False, strict=False)
    # Library shape assertions (MultiheadAttention, transformers) warn on every trace; whether
    # one of them matters is what the parity check finds out, so they are kept out of the log.
    for message in sorted({str(w.message).split(".")[0] for w in caught}):
        log.debug("tracer: %s", message)
    return traced


def _outputs(result: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(result, torch.Tensor):
        return (result,)
    return tuple(result)


def check_parity(
    eager: Callable[..., Any],
    traced: Callable[..., Any],
    inputs: Sequence[torch.Tensor],
    batch_sizes: Sequence[int],
) -> dict[str, Any]:
    """Run both models over every row of `inputs` once per batch size; max |difference|.

    Each output (head) gets its own figure; `max_abs_diff` is the largest over all heads and
    batch sizes.
    """
    n = int(inputs[0].shape[0])
    per_batch: dict[str, float] = {}
    per_output: dict[int, float] = {}
    with torch.inference_mode():
        for bs in batch_sizes:
            worst = 0.0
            for start in range(0, n, bs):
                chunk = [t[start : start + bs] for t in inputs]
                a = _outputs(eager(*chunk))
                b = _outputs(traced(*chunk))
                if len(a) != len(b):
                    raise ExportError(f"eager gives {len(a)} outputs, traced {len(b)}")
                for i, (x, y) in enumerate(zip(a, b, strict=True)):
                    if x.shape != y.shape:
                        raise ExportError(
                            f"output {i} at batch size {bs}: eager shape {tuple(x.shape)}, "
                            f"traced {tuple(y.shape)}"
                        )
                    diff = float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
                    if not np.isfinite(diff):
                        diff = float("inf")
                    worst = max(worst, diff)
                    per_output[i] = max(per_output.get(i, 0.0), diff)
            per_batch[str(bs)] = worst
    return {
        "n_posts": n,
        "batch_sizes": list(batch_sizes),
        "max_abs_diff": max(per_batch.values()) if per_batch else 0.0,
        "max_abs_diff_by_batch_size": per_batch,
        "max_abs_diff_by_output": {str(k): v for k, v in sorted(per_output.items())},
    }


def measure_latency(
    model: Callable[..., Any],
    inputs: Sequence[torch.Tensor],
    batch_sizes: Sequence[int],
    repeats: int,
) -> dict[str, float]:
    """Median wall time per post (ms) of a forward pass at each batch size, after a warm-up."""
    n = int(inputs[0].shape[0])
    result: dict[str, float] = {}
    with torch.inference_mode():
        for bs in batch_sizes:
            idx = torch.arange(bs) % n
            batch = [t[idx] for t in inputs]
            model(*batch)  # warm-up: the first TorchScript call runs the profiling executor
            times = []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                model(*batch)
                times.append(time.perf_counter() - t0)
            result[str(bs)] = float(np.median(times)) * 1000.0 / bs
    return result


# --------------------------------------------------------------------------- fresh process

# Runs in `python -I` (no project, no PYTHONPATH, no user site) and imports torch only.
_FRESH_SCRIPT = r"""
import json, sys
import torch
extra = {"config.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=extra)
embedded = json.loads(extra["config.json"] or "{}")
data = torch.load(sys.argv[2])
with torch.inference_mode():
    out = model(*[data["inputs"][name] for name in data["input_names"]])
if isinstance(out, torch.Tensor):
    out = (out,)
diffs = [float((o.float() - e.float()).abs().max()) for o, e in zip(out, data["outputs"])]
foreign = sorted(m for m in ("adfilter", "models", "tasks", "transformers", "timm", "lightning")
                 if m in sys.modules)
print(json.dumps({"n_outputs": len(out), "max_abs_diff": max(diffs), "foreign_modules": foreign,
                  "shapes": [list(o.shape) for o in out], "n_posts": int(out[0].shape[0]),
                  "embedded_input_names": embedded.get("input_names")}))
"""


def save_examples(
    path: Path,
    input_names: Sequence[str],
    inputs: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
) -> None:
    torch.save(
        {
            "input_names": list(input_names),
            "inputs": {n: t.contiguous() for n, t in zip(input_names, inputs, strict=True)},
            "output_names": list(OUTPUT_NAMES[: len(outputs)]),
            "outputs": [o.contiguous() for o in outputs],
        },
        path,
    )


def check_fresh_process(
    model_path: Path, examples_path: Path, atol: float, timeout_s: float = 300.0
) -> dict[str, Any]:
    """Load `model_path` in a new interpreter that imports only torch and replay the examples."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    with tempfile.TemporaryDirectory(prefix="adfilter-fresh-") as cwd:
        proc = subprocess.run(
            [sys.executable, "-I", "-W", "ignore", "-c", _FRESH_SCRIPT,
             str(Path(model_path).resolve()), str(Path(examples_path).resolve())],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s,
        )
    if proc.returncode != 0:
        raise ExportError(
            f"{model_path} does not run in a fresh process importing only torch "
            f"(exit {proc.returncode}):\n{proc.stderr.strip()[-3000:]}"
        )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    names = torch.load(examples_path)["input_names"]
    report["ok"] = (report["max_abs_diff"] <= atol and not report["foreign_modules"]
                    and report["embedded_input_names"] == names)
    if not report["ok"]:
        raise ExportError(
            f"{model_path} in a fresh process: max |diff| {report['max_abs_diff']:.3g} "
            f"(allowed {atol:g}), modules imported besides torch: {report['foreign_modules']}, "
            f"embedded input names {report['embedded_input_names']} (expected {names})"
        )
    return report


# --------------------------------------------------------------------------- Triton


def _dims(shape: Sequence[int]) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def _tensor_block(kind: str, index: int, spec: Mapping[str, Any]) -> str:
    dtype = getattr(torch, spec["dtype"])
    if dtype not in TRITON_DTYPES:
        raise ExportError(f"{kind} '{spec['name']}': dtype {spec['dtype']} has no Triton type")
    lines = [
        "  {",
        f'    name: "{kind}__{index}"',
        f"    data_type: {TRITON_DTYPES[dtype]}",
    ]
    if spec["shape"]:
        lines.append(f"    dims: {_dims(spec['shape'])}")
    else:
        # One value per row: Triton needs a non-empty shape, the model sees [batch].
        lines.append("    dims: [ 1 ]")
        lines.append("    reshape: { shape: [ ] }")
    lines.append("  }")
    return "\n".join(lines)


def triton_config(
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
    triton: TritonParams,
) -> str:
    """`config.pbtxt` for the `pytorch_libtorch` backend; INPUT__i follows the forward's order."""
    legend = [f"# INPUT__{i}: {s['name']}" for i, s in enumerate(inputs)]
    legend += [f"# OUTPUT__{i}: {s['name']}" for i, s in enumerate(outputs)]
    parts = [
        "# Written by `python -m tasks.export`; the model is artifacts/export/model.pt.",
        *legend,
        f'name: "{triton.model_name}"',
        'platform: "pytorch_libtorch"',
        f"max_batch_size: {triton.max_batch_size}",
        "input [",
        ",\n".join(_tensor_block("INPUT", i, s) for i, s in enumerate(inputs)),
        "]",
        "output [",
        ",\n".join(_tensor_block("OUTPUT", i, s) for i, s in enumerate(outputs)),
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: {_dims(triton.preferred_batch_size)}",
        f"  max_queue_delay_microseconds: {triton.max_queue_delay_microseconds}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {triton.instance_count}",
        f"    kind: {triton.instance_kind}",
        "  }",
        "]",
    ]
    return "\n".join(parts) + "\n"


def write_triton_repository(
    model_path: Path,
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
    triton: TritonParams,
    repo_dir: Path,
) -> Path:
    """`repo_dir/<model_name>/config.pbtxt` and `.../1/model.pt`; returns the model folder."""
    too_big = [b for b in triton.preferred_batch_size if b > triton.max_batch_size]
    if too_big:
        raise ExportError(
            f"export.triton.preferred_batch_size {too_big} exceeds max_batch_size "
            f"{triton.max_batch_size}: lower them in params.yaml"
        )
    model_dir = repo_dir / triton.model_name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_path, model_dir / "1" / "model.pt")
    (model_dir / "config.pbtxt").write_text(triton_config(inputs, outputs, triton))
    return model_dir


# --------------------------------------------------------------------------- batches


def mixed_batch(arrays: Mapping[str, np.ndarray], size: int, offset: int = 0) -> dict[str, np.ndarray]:
    """`size` rows cycling text-only, image-only, text+image, from real texts and images.

    A row's text arrays come from a post with text and its image arrays from a post with an
    image, so every mix exists even when a split lacks one of the slices.
    """
    if size < len(MODALITY_MIX):
        raise ExportError(
            f"export.trace_batch_size is {size}; it must be >= {len(MODALITY_MIX)} so the traced "
            "batch holds text-only, image-only and text+image posts"
        )
    text_rows = np.flatnonzero(arrays["has_text"])
    image_rows = np.flatnonzero(arrays["has_image"])
    if text_rows.size == 0 or image_rows.size == 0:
        raise ExportError(
            "tracing needs at least one post with text and one with an image in the features; "
            f"found {text_rows.size} with text and {image_rows.size} with an image"
        )
    out: dict[str, list[np.ndarray]] = {k: [] for k in (*TEXT_KEYS, *IMAGE_KEYS)}
    has_text, has_image = [], []
    for j in range(size):
        t, i = MODALITY_MIX[j % len(MODALITY_MIX)]
        tr = text_rows[(offset + j) % text_rows.size]
        ir = image_rows[(offset + j) % image_rows.size]
        for key in TEXT_KEYS:
            out[key].append(arrays[key][tr] if t else np.zeros_like(arrays[key][tr]))
        for key in IMAGE_KEYS:
            out[key].append(arrays[key][ir] if i else np.zeros_like(arrays[key][ir]))
        has_text.append(t)
        has_image.append(i)
    batch = {k: np.stack(v) for k, v in out.items()}
    batch["has_text"] = np.array(has_text)
    batch["has_image"] = np.array(has_image)
    return batch


def parity_posts(
    arrays: Mapping[str, Mapping[str, np.ndarray]], n_posts: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """`n_posts` posts: test posts first, topped up from val and then train."""
    keys = (*TEXT_KEYS, *IMAGE_KEYS, "has_text", "has_image")
    parts, sources, total = [], {}, 0
    for split in ("test", "val", "train"):
        if total >= n_posts:
            break
        take = min(n_posts - total, len(arrays[split]["has_text"]))
        parts.append({k: arrays[split][k][:take] for k in keys})
        sources[split] = int(take)
        total += take
    if total < n_posts:
        raise ExportError(
            f"the parity check needs {n_posts} posts (export.parity_posts) but the splits "
            f"hold only {total}; lower export.parity_posts or add data"
        )
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}, sources


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _texts(split_dir: Path, split: str, ids: np.ndarray) -> np.ndarray:
    """The split parquet's texts, in the order of the feature arrays' `id`."""
    import pandas as pd

    path = split_dir / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the split stage first (dvc repro split)")
    frame = pd.read_parquet(path, columns=["id", "text"]).set_index("id")
    ids = ids.astype(str)
    missing = np.setdiff1d(ids, frame.index.astype(str).to_numpy())
    if missing.size:
        raise ExportError(
            f"{path} lacks {missing.size} ids of {split}.npz (e.g. {missing[0]}); the features "
            "are from another split: re-run featurize (dvc repro featurize)"
        )
    return frame.loc[ids, "text"].fillna("").astype(str).to_numpy()


# --------------------------------------------------------------------------- gate


def export_gate(
    params: Params,
    split_dir: Path,
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    deep: nn.Module | torch.jit.ScriptModule,
    out_dir: Path,
) -> dict[str, Any]:
    """Train the fastText gate, calibrate it on val against `deep`'s scores, save it.

    The gate reads text only, so it is trained on posts whose label is their text's label
    (posts with text, without the hidden-image-ad slice, whose ad is in the image), and it is
    calibrated for, and applies to, posts without an image: a post with an image always goes
    to the deep model, which is the only part that sees the image.
    """
    from models.gate import NEVER_ALLOW, NEVER_BLOCK, FastTextGate, cascade_report
    from models.predict import predict_arrays

    texts = {s: _texts(split_dir, s, arrays[s]["id"]) for s in ("train", "val", "test")}
    train = arrays["train"]
    rows = train["has_text"] & (train["slice"].astype(str) != HIDDEN_IMAGE_AD)
    if rows.sum() == 0:
        raise ExportError("the train split has no post with text: the fastText gate cannot train")
    gate = FastTextGate.train(list(texts["train"][rows]), train["label"][rows], params.gate)

    threshold = float(params.model.threshold)
    scope: dict[str, np.ndarray] = {}
    scores: dict[str, np.ndarray] = {}
    for split in ("val", "test"):
        a = arrays[split]
        scope[split] = a["has_text"] & ~a["has_image"]
        subset = {k: v[scope[split]] for k, v in a.items()}
        scores[split] = predict_arrays(deep, subset)["score"] if scope[split].any() else np.zeros(0)

    val = arrays["val"]
    note = None
    try:
        low, high = gate.calibrate(list(texts["val"][scope["val"]]), val["label"][scope["val"]],
                                   scores["val"], threshold)
    except ValueError as exc:
        # Without ads among val's text-only posts recall loss cannot be bounded: defer all.
        gate.low, gate.high = low, high = NEVER_ALLOW, NEVER_BLOCK
        note = f"not calibrated ({exc}); the gate defers every post to the deep model"
        log.warning("gate %s", note)
    gate.save(out_dir)

    reports = {}
    for split in ("val", "test"):
        mask = scope[split]
        if mask.any():
            p_gate = gate.predict_proba(list(texts[split][mask]))
            reports[split] = cascade_report(p_gate, arrays[split]["label"][mask], scores[split],
                                            threshold, low, high)
    meta_path = out_dir / "gate.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta.update({
        "scope": "posts with text and no image; every other post goes to the deep model",
        "deep_threshold": threshold,
        "calibrated_on": f"val: {int(scope['val'].sum())} text-only posts",
        "note": note,
        "cascade": reports,
    })
    meta_path.write_text(json.dumps(_json_safe(meta), indent=2) + "\n", encoding="utf-8")
    log.info("gate: low %.4f, high %.4f; on test text-only posts %s", low, high,
             reports.get("test"))
    return {"low": low, "high": high, "trained_on": int(rows.sum()), "note": note,
            "cascade": reports}


def _json_safe(value: Any) -> Any:
    from models.metrics import json_safe

    return json_safe(value)


# --------------------------------------------------------------------------- the stage


def _check_torchscript_ready(net: nn.Module) -> list[str]:
    """Names of transformers submodules; each must be built with `torchscript=True`."""
    found = []
    for name, module in net.named_modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "torchscript"):
            if not config.torchscript:
                raise ExportError(
                    f"submodule '{name}' ({type(module).__name__}) was built without "
                    "torchscript=True; torch.jit.trace needs its tuple outputs: build its config "
                    "with torchscript=True (models/net.py)"
                )
            found.append(name)
    return found


def export(
    params: Params,
    model_dir: Path = Path("artifacts/model"),
    features_dir: Path = Path("data/features"),
    split_dir: Path = Path("data/split"),
    out_dir: Path = Path("artifacts/export"),
    featurizer_dir: Path = Path("artifacts/featurizer"),
) -> dict[str, Any]:
    """Trace, check and package the trained net and the gate; returns `export.json`'s content.

    `out_dir` becomes a self-contained bundle: the featurizer is copied in beside the model,
    so a registered version or a server needs nothing else to turn a raw post into a score.
    """
    from models.data import load_npz
    from models.net import INPUT_NAMES, net_inputs
    from models.predict import load_net

    cfg = params.export
    if not set(cfg.parity_batch_sizes) - {cfg.trace_batch_size}:
        raise ExportError(
            f"export.parity_batch_sizes {cfg.parity_batch_sizes} must include a size other than "
            f"export.trace_batch_size {cfg.trace_batch_size}: a trace can be right only at the "
            "batch size it was recorded with"
        )
    started = time.perf_counter()
    model_dir, features_dir = Path(model_dir), Path(features_dir)
    split_dir, out_dir = Path(split_dir), Path(out_dir)
    net, model_config = load_net(model_dir)
    names = forward_input_names(net)
    if tuple(names) != tuple(INPUT_NAMES):
        raise ExportError(f"the net's forward takes {names}, models.net.INPUT_NAMES says "
                          f"{list(INPUT_NAMES)}; fix models/net.py so both agree")
    transformers_modules = _check_torchscript_ready(net)
    arrays = {s: load_npz(features_dir / f"{s}.npz") for s in SPLITS}
    if out_dir.exists():
        shutil.rmtree(out_dir)  # the stage's declared output: no stale file survives a rerun
    out_dir.mkdir(parents=True)

    trace_inputs = net_inputs(mixed_batch(arrays["test"], cfg.trace_batch_size))
    traced = trace_net(net, trace_inputs)
    with torch.inference_mode():
        trace_outputs = _outputs(net(*trace_inputs))
    input_specs = tensor_specs(names, trace_inputs)
    output_specs = tensor_specs(OUTPUT_NAMES, trace_outputs)
    for i, spec in enumerate(input_specs):
        spec["triton_name"] = f"INPUT__{i}"
    for i, spec in enumerate(output_specs):
        spec["triton_name"] = f"OUTPUT__{i}"

    embedded = {
        "input_names": names,
        "output_names": list(OUTPUT_NAMES),
        "inputs": input_specs,
        "outputs": output_specs,
        "input_conventions": model_config.get("inputs"),
        "threshold": float(params.model.threshold),
        "score_weights": model_config.get("score_weights"),
        "feature_dims": model_config.get("feature_dims"),
        "image_size": model_config.get("image_size"),
        "max_seq_tokens": model_config.get("max_seq_tokens"),
        "net": model_config.get("net"),
        "tuned_overrides": model_config.get("overrides"),
        "params": to_dict(params),
        "trained_with": model_config.get("params"),
        "provenance": provenance(),
        "trained_from": model_config.get("provenance"),
        "torch_version": torch.__version__,
        "trace_batch_size": cfg.trace_batch_size,
    }
    model_path = out_dir / MODEL_FILE
    torch.jit.save(traced, str(model_path),
                   _extra_files={EMBEDDED_CONFIG: json.dumps(embedded, default=str)})
    loaded = torch.jit.load(str(model_path))
    log.info("traced %s at batch %d (%s)", model_path, cfg.trace_batch_size,
             ", ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in input_specs))

    parity_arrays, sources = parity_posts(arrays, cfg.parity_posts)
    parity = check_parity(net, loaded, net_inputs(parity_arrays), cfg.parity_batch_sizes)
    parity.update(atol=cfg.parity_atol, sources=sources, ok=parity["max_abs_diff"] <= cfg.parity_atol)
    log.info("parity on %d posts at batch sizes %s: max |traced - eager| = %.3g (allowed %g)",
             parity["n_posts"], cfg.parity_batch_sizes, parity["max_abs_diff"], cfg.parity_atol)
    if not parity["ok"]:
        _write_report(out_dir, {"ok": False, "parity": parity})
        raise ExportError(
            f"{model_path}: traced and eager outputs differ by {parity['max_abs_diff']:.3g} "
            f"> export.parity_atol {cfg.parity_atol:g} ({parity['max_abs_diff_by_batch_size']} "
            "by batch size); a data-dependent Python branch in the net was frozen by the trace: "
            "make it a tensor operation (torch.where, masks)"
        )

    example_inputs = net_inputs(mixed_batch(arrays["test"], cfg.trace_batch_size + 1, offset=1))
    with torch.inference_mode():
        example_outputs = _outputs(net(*example_inputs))
    examples_path = out_dir / EXAMPLES_FILE
    save_examples(examples_path, names, example_inputs, example_outputs)
    fresh = check_fresh_process(model_path, examples_path, cfg.parity_atol)
    log.info("fresh process importing only torch: max |diff| %.3g on %d example posts",
             fresh["max_abs_diff"], int(example_inputs[0].shape[0]))

    latency_inputs = net_inputs(parity_arrays)
    latency = {
        "eager_ms_per_post": measure_latency(net, latency_inputs, cfg.latency_batch_sizes,
                                             cfg.latency_repeats),
        "torchscript_ms_per_post": measure_latency(loaded, latency_inputs,
                                                   cfg.latency_batch_sizes, cfg.latency_repeats),
        "torch_threads": torch.get_num_threads(),
    }
    log.info("latency per post (ms) eager %s, TorchScript %s", latency["eager_ms_per_post"],
             latency["torchscript_ms_per_post"])

    gate = export_gate(params, split_dir, arrays, loaded, out_dir)
    featurizer_dir = Path(featurizer_dir)
    if not (featurizer_dir / "meta.json").is_file():
        raise ExportError(f"{featurizer_dir}/meta.json not found: run the featurize stage first")
    shutil.copytree(featurizer_dir, out_dir / "featurizer")
    triton_dir = write_triton_repository(model_path, input_specs, output_specs, cfg.triton,
                                         out_dir / "triton")

    report = {
        "ok": True,
        "model": str(model_path),
        "model_sha256": _sha256(model_path),
        "model_bytes": model_path.stat().st_size,
        "transformers_modules": transformers_modules,
        "inputs": input_specs,
        "outputs": output_specs,
        "parity": parity,
        "fresh_process": fresh,
        "latency": latency,
        "gate": gate,
        "triton": {"model_dir": str(triton_dir), "config": str(triton_dir / "config.pbtxt"),
                   **to_dict(cfg.triton)},
        "files": sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()),
        "provenance": embedded["provenance"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    report["files"] = sorted({*report["files"], REPORT_FILE})
    _write_report(out_dir, report)
    log.info("export written to %s in %.1fs", out_dir, report["seconds"])
    return report


def _write_report(out_dir: Path, report: Mapping[str, Any]) -> None:
    path = out_dir / REPORT_FILE
    path.write_text(json.dumps(_json_safe(report), indent=2) + "\n", encoding="utf-8")


def read_embedded_config(model_path: str | Path) -> dict[str, Any]:
    """The `config.json` that `export` embedded in a TorchScript file."""
    extra = {EMBEDDED_CONFIG: ""}
    torch.jit.load(str(model_path), _extra_files=extra)
    if not extra[EMBEDDED_CONFIG]:
        raise ExportError(f"{model_path} holds no {EMBEDDED_CONFIG}: it was not written by tasks.export")
    return json.loads(extra[EMBEDDED_CONFIG])


def main(argv: list[str] | None = None) -> None:
    from adfilter.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m tasks.export", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    export(load_params(args.params))


if __name__ == "__main__":
    main()
