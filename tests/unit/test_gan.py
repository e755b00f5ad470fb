"""The feature-space GAN: trains on toy features, emits valid blocks, and its quality checks
tell real from noise."""

from __future__ import annotations

import numpy as np
import pytest

from adfilter.config import GanParams
from models import gan as G

WIDTHS = {"tfidf": 4, "sent_emb": 6, "sift_bow": 5, "hsv": 4, "qr": 1}
PARAMS = GanParams(noise_dim=8, hidden_dim=16, epochs=3, batch_size=32, lr=2e-4, moment_weight=1.0,
                   holdout_fraction=0.2, sensitivity_boost=1.0, max_c2st_auc=0.85, knn_k=3,
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


def test_gan_trains_a_few_steps_and_samples_valid_blocks():
    arrays, cond = toy(200, 0)
    layout = G.Layout.of(arrays)
    assert layout.widths == WIDTHS
    x = layout.concat(arrays)
    gan = G.train_gan(x, cond, layout, PARAMS, seed=0, progress=False)
    assert len(gan.history) == PARAMS.epochs
    assert all(np.isfinite(list(h.values())).all() for h in gan.history)

    fake = gan.sample(cond, seed=1)
    assert fake.shape == x.shape and np.isfinite(fake).all()
    assert np.array_equal(fake, gan.sample(cond, seed=1))
    parts = layout.split(fake)
    text, image = cond[:, 2] > 0.5, cond[:, 3] > 0.5
    assert np.allclose(np.linalg.norm(parts["sent_emb"][text], axis=1), 1.0, atol=1e-5)
    for block in ("tfidf", "sent_emb"):
        assert not parts[block][~text].any()
    for block in ("sift_bow", "hsv", "qr"):
        assert not parts[block][~image].any()
    sums = parts["hsv"][image].sum(axis=1)
    assert np.allclose(sums[sums > 0], 1.0, atol=1e-5)
    assert set(np.unique(parts["qr"])) <= {0.0, 1.0}
    # Histograms are count-like: exact zeros happen, as in real bag-of-words rows.
    assert (parts["sift_bow"][image] == 0).any()


def test_histogram_totals_recover_the_counts_behind_the_histograms():
    arrays, _ = toy(100, 1)
    totals = G.histogram_totals(G.Layout.of(arrays).concat(arrays), G.Layout.of(arrays))
    assert np.all(totals["sift_bow"] <= 30) and np.median(totals["sift_bow"]) >= 10
    assert np.median(totals["hsv"]) >= 100


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
