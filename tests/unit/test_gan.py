"""The parent-conditioned feature-space GAN: trains on toy features, emits valid variants of
real posts, and its quality checks tell real from noise."""

from __future__ import annotations

import numpy as np
import pytest

from adfilter.config import GanParams
from models import gan as G

WIDTHS = {"tfidf": 4, "sent_emb": 6, "sift_bow": 5, "hsv": 4, "qr": 1}
PARAMS = GanParams(noise_dim=8, hidden_dim=16, epochs=3, batch_size=32, lr=2e-4, moment_weight=1.0,
                   min_step=0.3, max_step=1.0, step_weight=10.0, basis_dim=3, holdout_fraction=0.2, sensitivity_boost=1.0, max_c2st_auc=0.85, knn_k=3,
                   max_rounds=2)


def toy(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.4).astype(int)
    has_text = rng.random(n) < 0.7
    has_image = ~has_text | (rng.random(n) < 0.5)
    emb = rng.normal(label[:, None] * 1.5, 1.0, (n, 6))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    p_sift = np.where(label[:, None] == 1, [0.5, 0.2, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.3, 0.3])
    sift = np.stack([rng.multinomial(30, p) for p in p_sift]) / 30.0
    hsv = np.stack([rng.multinomial(1000, [0.4, 0.3, 0.2, 0.1]) for _ in range(n)]) / 1000.0
    arrays = {
        "tfidf": rng.normal(label[:, None] * 0.5, 0.1, (n, 4)) * has_text[:, None],
        "sent_emb": emb * has_text[:, None],
        "sift_bow": sift * has_image[:, None],
        "hsv": hsv * has_image[:, None],
        "qr": ((rng.random(n) < 0.3 * label) & has_image)[:, None].astype(float),
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    cond = G.conditions(label, 0.5 * label, has_text, has_image)
    return arrays, cond


def test_gan_trains_a_few_steps_and_samples_valid_variants_of_their_parents():
    arrays, cond = toy(200, 0)
    layout = G.Layout.of(arrays)
    assert layout.widths == WIDTHS
    x = layout.concat(arrays)
    # An empty text's margin column is the model's intercept, not zero (as the featurizer writes).
    x[cond[:, 2] < 0.5, 3] = -0.7
    gan = G.train_gan(x, cond, layout, PARAMS, seed=0, progress=False, fixed_tail={"tfidf": 1})
    assert len(gan.history) == PARAMS.epochs
    assert all(np.isfinite(list(h.values())).all() for h in gan.history)

    fake = gan.sample(x, cond, seed=1)
    assert fake.shape == x.shape and np.isfinite(fake).all()
    assert np.array_equal(fake, gan.sample(x, cond, seed=1))
    assert not np.array_equal(fake, gan.sample(x, cond, seed=2))
    parts, parent = layout.split(fake), layout.split(x)
    text, image = cond[:, 2] > 0.5, cond[:, 3] > 0.5
    assert np.allclose(np.linalg.norm(parts["sent_emb"][text], axis=1), 1.0, atol=1e-5)
    # An absent modality keeps the parent's block (zeros, or the intercept margin).
    for block in ("tfidf", "sent_emb"):
        assert np.array_equal(parts[block][~text], parent[block][~text])
    for block in ("sift_bow", "hsv", "qr"):
        assert np.array_equal(parts[block][~image], parent[block][~image])
    # The fixed tail (margins) and the QR flag are the parent's; the rest moved.
    assert np.array_equal(parts["tfidf"][:, 3], x[:, 3])
    assert np.array_equal(parts["qr"], parent["qr"])
    assert np.abs(parts["tfidf"][text, :3] - parent["tfidf"][text, :3]).mean() > 1e-3
    # Histograms: sum to 1, zeros exactly where the parent has zeros, and whole counts over
    # some total near the parent's (30 keypoints here), as a real bag of words.
    sift, sift_parent = parts["sift_bow"][image], parent["sift_bow"][image]
    assert np.allclose(sift.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(sift == 0, sift_parent == 0)
    for row in sift[sift.sum(axis=1) > 0]:
        assert any(np.allclose(row * t, np.round(row * t), atol=1e-3) for t in range(1, 91))


def test_dense_steps_stay_in_the_blocks_principal_subspace():
    rng = np.random.default_rng(4)
    n = 300
    arrays, cond = toy(n, 4)
    cond[:, 2] = 1.0
    # tfidf rows on a 2-D plane of the 4-D block.
    plane = rng.normal(size=(2, 4))
    arrays["tfidf"] = (rng.normal(size=(n, 2)) @ plane).astype(np.float32)
    layout = G.Layout.of(arrays)
    x = layout.concat(arrays)
    params = GanParams(**{**PARAMS.__dict__, "basis_dim": 2})
    gan = G.train_gan(x, cond, layout, params, seed=0, progress=False)
    move = layout.split(gan.sample(x, cond, seed=3))["tfidf"] - arrays["tfidf"]
    # The residual of the moves after projecting on the plane is nil.
    q, _ = np.linalg.qr(plane.T)
    residual = move - (move @ q) @ q.T
    assert np.abs(move).mean() > 1e-3 and np.abs(residual).max() < 1e-4


def test_sample_refuses_parents_and_conditions_of_different_lengths():
    arrays, cond = toy(60, 5)
    layout = G.Layout.of(arrays)
    x = layout.concat(arrays)
    gan = G.train_gan(x, cond, layout, PARAMS, seed=0, progress=False)
    with pytest.raises(G.GanError, match="parents"):
        gan.sample(x[:10], cond[:9], seed=0)


def test_quality_check_rejects_noise_and_accepts_real_samples():
    arrays, _ = toy(600, 2)
    layout = G.Layout.of(arrays)
    x = layout.concat(arrays)
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-3)
    real_a, real_b, train = x[:150], x[150:300], x[300:]
    noise = np.random.default_rng(0).normal(0.0, 1.0, real_a.shape).astype(np.float32)

    bad = G.quality_report(mean, std, layout, real_a, noise, train, PARAMS)
    good = G.quality_report(mean, std, layout, real_a, real_b, train, PARAMS)
    assert not bad["passed"] and bad["c2st_auc"] > 0.95
    assert good["passed"] and good["c2st_auc"] < 0.75
    assert bad["knn_precision"] < 0.05 < good["knn_precision"]
    assert bad["mmd2"] > 10 * max(good["mmd2"], 1e-4)


def test_knn_realism_and_mmd_behave_on_simple_clouds():
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (300, 3))
    near, far = rng.normal(0, 1, (100, 3)), rng.normal(8, 1, (100, 3))
    assert G.knn_realism(real, near, 5).mean() > 0.8
    assert G.knn_realism(real, far, 5).mean() == 0.0
    assert G.mmd2(real, near) < 0.02 < G.mmd2(real, far)


def test_gan_refuses_too_little_data():
    arrays, cond = toy(10, 3)
    layout = G.Layout.of(arrays)
    with pytest.raises(G.GanError, match="at least 32"):
        G.train_gan(layout.concat(arrays), cond, layout, PARAMS, progress=False)
