"""`model.pt` runs in an interpreter that imports torch only (no project, no transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.net import INPUT_NAMES, net_inputs
from models.registry import create_model
from tasks.export import (
    EMBEDDED_CONFIG,
    ExportError,
    check_fresh_process,
    mixed_batch,
    save_examples,
    trace_net,
)
from tests.model_fixtures import SMALL_DIMS, synthetic_arrays

pytestmark = pytest.mark.integration

TINY = {
    "feature_dims": SMALL_DIMS, "image_size": 32, "max_seq_tokens": 12, "feature_dim": 16,
    "num_heads": 2, "vision_backbone": "test_efficientnet", "text_embedding_size": 16,
    "text_hidden_size": 32, "text_num_layers": 1, "text_num_heads": 2,
    "text_intermediate_size": 64,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple, tuple]:
    torch.manual_seed(0)
    net = create_model("multimodal", **TINY).eval()
    arrays = synthetic_arrays(24, seed=4, seq_len=12)
    traced = trace_net(net, net_inputs(mixed_batch(arrays, 6)))
    path = tmp_path_factory.mktemp("fresh") / "model.pt"
    torch.jit.save(traced, str(path),
                   _extra_files={EMBEDDED_CONFIG: json.dumps({"input_names": list(INPUT_NAMES)})})
    inputs = net_inputs(mixed_batch(arrays, 10, offset=3))
    with torch.inference_mode():
        outputs = net(*inputs)
    return path, inputs, outputs


def test_model_runs_alone_and_matches_the_expected_outputs(saved) -> None:
    path, inputs, outputs = saved
    examples = path.with_name("example_inputs.pt")
    save_examples(examples, INPUT_NAMES, inputs, outputs)
    report = check_fresh_process(path, examples, atol=1e-5)
    assert report["ok"]
    assert report["foreign_modules"] == []
    assert report["max_abs_diff"] <= 1e-5
    assert report["shapes"] == [[10], [10], [10]]
    assert report["embedded_input_names"] == list(INPUT_NAMES)


def test_wrong_expected_outputs_fail_the_check(saved) -> None:
    path, inputs, outputs = saved
    examples = path.with_name("wrong_inputs.pt")
    save_examples(examples, INPUT_NAMES, inputs, (outputs[0] + 1e-3, *outputs[1:]))
    with pytest.raises(ExportError, match="fresh process: max \\|diff\\| 0.001"):
        check_fresh_process(path, examples, atol=1e-5)
