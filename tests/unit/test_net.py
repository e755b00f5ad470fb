"""Contract tests over the model registry: shapes, no NaN, masks, one backward step, tracing."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from models.net import INPUT_NAMES, NetConfigError, count_parameters, net_inputs
from models.registry import (
    UnknownModelError,
    create_model,
    list_models,
    profile_parameter_count,
    rebuild_spec,
)
from tests.model_fixtures import SMALL_DIMS, synthetic_arrays

SEQ, SIZE = 12, 32
TINY = {
    "feature_dims": SMALL_DIMS,
    "image_size": SIZE,
    "max_seq_tokens": SEQ,
    "feature_dim": 16,
    "num_heads": 2,
    "fusion_layers": 1,
    "dropout": 0.0,
    "vision_backbone": "test_efficientnet",
    "text_embedding_size": 16,
    "text_hidden_size": 32,
    "text_num_layers": 1,
    "text_num_heads": 2,
    "text_intermediate_size": 64,
}


_BUILT: dict[str, torch.nn.Module] = {}


def _net(name: str = "multimodal") -> torch.nn.Module:
    """A fresh copy of one seeded build per name (building is the slow part of these tests)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = create_model(name, **TINY).eval()
    return copy.deepcopy(_BUILT[name])


def _inputs(n: int = 9, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return net_inputs(synthetic_arrays(n, seed=seed, image_size=SIZE, seq_len=SEQ))


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'resnet'.*known models: multimodal"):
        create_model("resnet")


def test_unknown_backbone_is_named() -> None:
    with pytest.raises(NetConfigError, match="'efficientnet_b99' is not a timm model"):
        create_model("multimodal", **{**TINY, "vision_backbone": "efficientnet_b99"})


def test_feature_dim_must_split_into_heads() -> None:
    with pytest.raises(NetConfigError, match="feature_dim 18 is not a multiple of model.num_heads 4"):
        create_model("multimodal", **{**TINY, "feature_dim": 18, "num_heads": 4})


@pytest.mark.parametrize("name", list_models())
def test_output_shapes_and_ranges(name: str) -> None:
    net = _net(name)
    with torch.no_grad():
        ad_logit, sensitivity, score = net(*_inputs(9))
    for out in (ad_logit, sensitivity, score):
        assert out.shape == (9,)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()
    assert ((sensitivity >= 0) & (sensitivity <= 1)).all()
    assert ((score >= 0) & (score <= 1)).all()
    expected = (0.85 * torch.sigmoid(ad_logit) + 0.15 * sensitivity).clamp(0, 1)
    torch.testing.assert_close(score, expected)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("train_mode", [False, True])
def test_no_nan_when_modalities_are_missing(name: str, train_mode: bool) -> None:
    net = _net(name).train(train_mode)
    arrays = synthetic_arrays(6, image_size=SIZE, seq_len=SEQ)
    cases = {
        "nothing": (np.zeros(6, bool), np.zeros(6, bool)),
        "text only": (np.ones(6, bool), np.zeros(6, bool)),
        "image only": (np.zeros(6, bool), np.ones(6, bool)),
        "one image": (np.ones(6, bool), np.eye(6, dtype=bool)[0]),
    }
    for case, (has_text, has_image) in cases.items():
        a = {**arrays, "has_text": has_text, "has_image": has_image}
        a["token_ids"] = np.where(has_text[:, None], a["token_ids"], 0)
        outputs = net(*net_inputs(a))
        assert all(torch.isfinite(o).all() for o in outputs), case
        if train_mode:
            outputs[0].sum().backward()
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            assert all(torch.isfinite(g).all() for g in grads), case
            net.zero_grad()


@pytest.mark.parametrize("name", list_models())
def test_one_backward_step_changes_every_branch(name: str) -> None:
    net = _net(name).train()
    before = copy.deepcopy(net.state_dict())
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    inputs = _inputs(8)
    ad_logit, sensitivity, _ = net(*inputs)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(ad_logit, torch.ones(8)) + (
        sensitivity - 0.5
    ).pow(2).mean()
    loss.backward()
    optimizer.step()
    after = net.state_dict()
    for prefix in ("vision.backbone", "vision.proj", "text.encoder", "handcrafted.qr",
                   "text_to_image", "image_to_text", "joint", "ad_head", "sensitivity_head"):
        keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point()]
        assert keys, prefix
        assert any(not torch.equal(before[k], after[k]) for k in keys), f"{prefix} did not change"


def test_a_missing_modality_has_no_effect() -> None:
    net = _net()
    arrays = synthetic_arrays(9, image_size=SIZE, seq_len=SEQ)
    text_only, image_only = ~arrays["has_image"], ~arrays["has_text"]
    assert text_only.any() and image_only.any()
    changed = {k: v.copy() for k, v in arrays.items()}
    rng = np.random.default_rng(1)
    # Text-only posts get an image and image features, image-only posts get text features;
    # the flags still say those are absent.
    for key in ("sift_bow", "hsv", "qr"):
        changed[key][text_only] = rng.random(changed[key][text_only].shape) + 5
    changed["image_small"][text_only] = 255
    changed["token_ids"][image_only, :5] = 2050
    for key in ("tfidf", "sent_emb"):
        changed[key][image_only] = rng.random(changed[key][image_only].shape) + 5
    with torch.no_grad():
        a = net(*net_inputs(arrays))
        b = net(*net_inputs(changed))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)

    # ... while the same change does move a post that has the modality.
    both = arrays["has_text"] & arrays["has_image"]
    changed["image_small"][both] = 255
    with torch.no_grad():
        c = net(*net_inputs(changed))
    assert not torch.allclose(a[0][both], c[0][both])


def test_a_post_scores_the_same_alone_or_in_any_batch() -> None:
    net = _net()
    inputs = _inputs(9)
    with torch.no_grad():
        batch = net(*inputs)
        for i in (0, 1, 2):
            alone = net(*(t[i : i + 1] for t in inputs))
            for x, y in zip(batch, alone, strict=True):
                torch.testing.assert_close(x[i : i + 1], y, rtol=0, atol=1e-5)


def test_trace_holds_for_other_batch_sizes_and_modality_mixes() -> None:
    net = _net()
    inputs = _inputs(12)
    with torch.no_grad():
        traced = torch.jit.trace(net, tuple(t[:4] for t in inputs), check_trace=True)
        for rows in (slice(0, 1), slice(1, 2), slice(5, 12), slice(0, 12)):
            part = [t[rows] for t in inputs]
            for x, y in zip(net(*part), traced(*part), strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
        # A batch unlike the traced one: no images at all, then no text at all.
        no_image = list(inputs)
        no_image[INPUT_NAMES.index("has_image")] = torch.zeros(12, dtype=torch.bool)
        no_text = list(inputs)
        no_text[INPUT_NAMES.index("has_text")] = torch.zeros(12, dtype=torch.bool)
        for part in (no_image, no_text):
            for x, y in zip(net(*part), traced(*part), strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_rebuild_spec_recreates_the_same_net() -> None:
    net = _net()
    spec = rebuild_spec({"name": "multimodal", "kwargs": TINY}, net)
    again = create_model(spec["name"], **spec["kwargs"]).eval()
    again.load_state_dict(net.state_dict())
    inputs = _inputs(5)
    with torch.no_grad():
        for x, y in zip(net(*inputs), again(*inputs), strict=True):
            torch.testing.assert_close(x, y)
    assert count_parameters(again) == count_parameters(net)


def test_net_inputs_name_missing_arrays() -> None:
    arrays = synthetic_arrays(3, image_size=SIZE, seq_len=SEQ)
    del arrays["hsv"]
    with pytest.raises(KeyError, match="hsv"):
        net_inputs(arrays)


def test_every_profile_builds_and_gpu_stays_under_130m(repo_root: Path) -> None:
    counts = {p: profile_parameter_count(repo_root / "params.yaml", p) for p in ("ci", "default", "gpu")}
    for profile, c in counts.items():
        assert c["total"] == c["vision"] + c["text"] + c["fusion_and_heads"], profile
    assert counts["ci"]["total"] < counts["default"]["total"] < counts["gpu"]["total"]
    assert counts["gpu"]["total"] <= 130_000_000
