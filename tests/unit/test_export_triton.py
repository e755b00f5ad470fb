"""The export's pure parts on a tiny traced net: Triton config, parity, mixed trace batches."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adfilter.config import TritonParams
from models.net import INPUT_NAMES, net_inputs
from models.registry import create_model
from tasks.export import (
    ExportError,
    check_parity,
    forward_input_names,
    mixed_batch,
    parity_posts,
    tensor_specs,
    trace_net,
    triton_config,
    write_triton_repository,
)
from tests.model_fixtures import SMALL_DIMS, synthetic_arrays

SEQ, SIZE = 12, 32
TINY = {
    "feature_dims": SMALL_DIMS, "image_size": SIZE, "max_seq_tokens": SEQ, "feature_dim": 16,
    "num_heads": 2, "fusion_layers": 1, "dropout": 0.1, "vision_backbone": "test_efficientnet",
    "text_embedding_size": 16, "text_hidden_size": 32, "text_num_layers": 1, "text_num_heads": 2,
    "text_intermediate_size": 64,
}
TRITON = TritonParams(model_name="ad_filter", max_batch_size=64, preferred_batch_size=[8, 32],
                      max_queue_delay_microseconds=2000, instance_kind="KIND_CPU",
                      instance_count=2)
# TorchScript's scalar type names -> Triton data types (model_config.proto).
TRITON_OF_SCALAR = {"Float": "TYPE_FP32", "Long": "TYPE_INT64", "Bool": "TYPE_BOOL",
                    "Int": "TYPE_INT32", "Byte": "TYPE_UINT8"}


# --------------------------------------------------------------------------- a pbtxt reader

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip():
                raise ValueError(f"cannot read pbtxt at {text[pos:pos + 30]!r}")
            break
        pos = m.end()
        if m.group(1) is None and m.group(0).strip():
            out.append(m.group(0).strip())
    return out


def parse_pbtxt(text: str) -> dict[str, Any]:
    """Protobuf text format -> dicts; a field given twice or as `[...]` becomes a list."""
    tokens = _tokens(text)
    pos = 0

    def value() -> Any:
        nonlocal pos
        tok = tokens[pos]
        if tok == "{":
            pos += 1
            return message("}")
        if tok == "[":
            pos += 1
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        pos += 1
        if tok.startswith('"'):
            return tok[1:-1]
        return int(tok) if re.fullmatch(r"-?\d+", tok) else tok

    def message(end: str | None) -> dict[str, Any]:
        nonlocal pos
        fields: dict[str, Any] = {}
        while pos < len(tokens) and tokens[pos] != end:
            name = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            v = value()
            if name in fields:
                fields[name] = [*fields[name], v] if isinstance(fields[name], list) else [fields[name], v]
            else:
                fields[name] = v
        if end is not None:
            assert tokens[pos] == end, f"expected {end!r}"
            pos += 1
        return fields

    result = message(None)
    assert pos == len(tokens), "trailing tokens"
    return result


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def traced() -> tuple[torch.nn.Module, torch.jit.ScriptModule, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    net = create_model("multimodal", **TINY).eval()
    arrays = synthetic_arrays(30, seed=1, image_size=SIZE, seq_len=SEQ)
    inputs = net_inputs(mixed_batch(arrays, 6))
    return net, trace_net(net, inputs), inputs


def test_config_matches_the_traced_models_inputs(traced, tmp_path: Path) -> None:
    net, module, inputs = traced
    with torch.inference_mode():
        outputs = net(*inputs)
    names = forward_input_names(net)
    model_path = tmp_path / "model.pt"
    module.save(str(model_path))
    model_dir = write_triton_repository(
        model_path, tensor_specs(names, inputs),
        tensor_specs(["ad_logit", "sensitivity", "score"], outputs), TRITON, tmp_path / "triton",
    )
    assert (model_dir / "1" / "model.pt").read_bytes() == model_path.read_bytes()
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())

    assert config["name"] == "ad_filter"
    assert config["platform"] == "pytorch_libtorch"
    assert config["max_batch_size"] == 64
    graph_inputs = list(module.graph.inputs())[1:]  # the first is `self`
    assert [i.debugName().split(".")[0] for i in graph_inputs] == list(INPUT_NAMES)
    assert [c["name"] for c in config["input"]] == [f"INPUT__{i}" for i in range(9)]
    for block, graph_input in zip(config["input"], graph_inputs, strict=True):
        ty = graph_input.type()
        assert block["data_type"] == TRITON_OF_SCALAR[ty.scalarType()], block
        per_row = ty.sizes()[1:]
        if per_row:
            assert block["dims"] == per_row and "reshape" not in block
        else:  # [batch] tensors: Triton sees [batch, 1] and reshapes to [batch]
            assert block["dims"] == [1] and block["reshape"] == {"shape": []}
    assert config["input"][1]["dims"] == [3, SIZE, SIZE]
    assert config["input"][0]["data_type"] == "TYPE_INT64"

    assert [c["name"] for c in config["output"]] == ["OUTPUT__0", "OUTPUT__1", "OUTPUT__2"]
    for block, out in zip(config["output"], outputs, strict=True):
        assert out.dim() == 1 and block["data_type"] == "TYPE_FP32"
        assert block["dims"] == [1] and block["reshape"] == {"shape": []}

    assert config["dynamic_batching"] == {"preferred_batch_size": [8, 32],
                                          "max_queue_delay_microseconds": 2000}
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]


def test_gpu_instances_and_batch_limits_come_from_params() -> None:
    specs = [{"name": "x", "dtype": "float32", "shape": [4]}]
    gpu = TritonParams("m", 128, [32, 64], 500, "KIND_GPU", 1)
    config = parse_pbtxt(triton_config(specs, specs, gpu))
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]
    assert config["max_batch_size"] == 128
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 500
    too_big = TritonParams("m", 16, [8, 32], 500, "KIND_CPU", 1)
    with pytest.raises(ExportError, match=r"preferred_batch_size \[32\] exceeds max_batch_size 16"):
        write_triton_repository(Path("unused.pt"), specs, specs, too_big, Path("/nonexistent"))


def test_trace_matches_eager_at_other_batch_sizes(traced) -> None:
    net, module, _ = traced
    posts = net_inputs(synthetic_arrays(40, seed=2, image_size=SIZE, seq_len=SEQ))
    parity = check_parity(net, module, posts, batch_sizes=[1, 7, 40])
    assert parity["n_posts"] == 40
    assert parity["max_abs_diff"] <= 1e-5
    assert set(parity["max_abs_diff_by_output"]) == {"0", "1", "2"}


def test_parity_detects_a_model_that_differs() -> None:
    class Shifted(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.sum(1), x.sum(1) + 1e-3 * (x[:, 0] > 0)

    x = torch.randn(20, 3)
    parity = check_parity(lambda x: (x.sum(1), x.sum(1)), Shifted(), [x], [1, 8])
    assert parity["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert parity["max_abs_diff_by_output"]["0"] == 0.0


def test_a_python_branch_frozen_by_the_trace_fails_parity() -> None:
    class Branchy(torch.nn.Module):
        def forward(self, x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
            if bool(flag.any()):  # a data-dependent Python choice: the trace keeps one side
                return x * 2
            return x

    x = torch.ones(6, 2)
    traced = trace_net(Branchy(), [x, torch.ones(6, dtype=torch.bool)])
    parity = check_parity(Branchy(), traced, [x, torch.zeros(6, dtype=torch.bool)], [3])
    assert parity["max_abs_diff"] == 1.0


def test_mixed_batch_holds_every_modality_mix_with_zeros_for_the_missing_one() -> None:
    arrays = synthetic_arrays(9, seed=3, image_size=SIZE, seq_len=SEQ)
    only_both = {k: v[2::3] for k, v in arrays.items()}  # rows with text and an image
    batch = mixed_batch(only_both, 7)
    assert list(zip(batch["has_text"], batch["has_image"], strict=True))[:3] == [
        (True, False), (False, True), (True, True)]
    no_text = ~batch["has_text"]
    no_image = ~batch["has_image"]
    assert not batch["token_ids"][no_text].any() and not batch["sent_emb"][no_text].any()
    assert not batch["image_small"][no_image].any() and not batch["hsv"][no_image].any()
    assert batch["token_ids"][batch["has_text"]].any(axis=1).all()
    with pytest.raises(ExportError, match="trace_batch_size is 2"):
        mixed_batch(arrays, 2)
    text_only = {k: v[0::3] for k, v in arrays.items()}
    with pytest.raises(ExportError, match="0 with an image"):
        mixed_batch(text_only, 6)


def test_parity_posts_take_test_first_then_top_up() -> None:
    splits = {s: synthetic_arrays(n, seed=i, image_size=SIZE, seq_len=SEQ)
              for i, (s, n) in enumerate({"train": 50, "val": 30, "test": 40}.items())}
    posts, sources = parity_posts(splits, 100)
    assert sources == {"test": 40, "val": 30, "train": 30}
    assert len(posts["has_text"]) == 100
    np.testing.assert_array_equal(posts["tfidf"][:40], splits["test"]["tfidf"])
    np.testing.assert_array_equal(posts["tfidf"][70:], splits["train"]["tfidf"][:30])
    posts, sources = parity_posts(splits, 10)
    assert sources == {"test": 10} and len(posts["qr"]) == 10
    with pytest.raises(ExportError, match="needs 500 posts"):
        parity_posts(splits, 500)


def test_parity_must_run_at_a_batch_size_other_than_the_trace_one(tmp_path: Path) -> None:
    import dataclasses

    from adfilter.config import load_params
    from tasks.export import export

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml", profile="ci")
    same = dataclasses.replace(params, export=dataclasses.replace(
        params.export, trace_batch_size=8, parity_batch_sizes=[8]))
    with pytest.raises(ExportError, match=r"parity_batch_sizes \[8\] must include a size other"):
        export(same, model_dir=tmp_path / "none", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
