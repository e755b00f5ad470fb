"""Text features: TF-IDF + SVD, sentence embeddings and token ids of the normalised text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adfilter.config import TextFeatureParams
from adfilter.features import text as text_features
from adfilter.features.text import (
    EmbedderError,
    SentenceEncoder,
    TextFeaturizer,
    normalize_text,
    resolve_embedder,
)
from adfilter.features.textnorm import normalize_text as textnorm_normalize

PARAMS = TextFeatureParams(
    word_ngram_range=[1, 2],
    char_ngram_range=[2, 4],
    max_features_word=500,
    max_features_char=2000,
    svd_dim=6,
    margins=[],
    margin_folds=5,
    embedder="bundled",
    embed_batch_size=4,
    max_seq_tokens=12,
)

TRAIN = [
    "WINNER!! You have won a free prize, call now to claim",
    "Free entry to win cash, text WIN to 80086",
    "URGENT your mobile number has won a 2000 award",
    "Are we still meeting for lunch tomorrow?",
    "Sorry I'll call you later, in a meeting",
    "Can you pick up some milk on the way home",
    "Ok see you at the station at six",
    "Congratulations you are selected for a free holiday, reply YES",
]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder("bundled", batch_size=4, max_seq_tokens=12)


def test_normalize_text_is_the_shared_normaliser() -> None:
    assert normalize_text is textnorm_normalize
    assert text_features.normalize_text("ＷＩＮ a prize") == "win a prize"


def test_tfidf_block_shape_and_zero_for_empty_text() -> None:
    feats = TextFeaturizer.fit([normalize_text(t) for t in TRAIN], PARAMS, seed=0)
    out = feats.transform([normalize_text(TRAIN[0]), "", "see you at lunch"])
    assert out.shape == (3, 6) and out.dtype == np.float32
    assert not out[1].any()
    assert np.abs(out[0]).sum() > 0 and np.abs(out[2]).sum() > 0


def test_vocabulary_comes_from_the_fitting_texts_only() -> None:
    feats = TextFeaturizer.fit([normalize_text(t) for t in TRAIN], PARAMS, seed=0)
    assert "prize" in feats.word.vocabulary_
    assert "zyzzyva" not in feats.word.vocabulary_
    feats.transform(["zyzzyva zyzzyva"])
    assert "zyzzyva" not in feats.word.vocabulary_


def test_similar_texts_are_closer_in_the_tfidf_block() -> None:
    feats = TextFeaturizer.fit([normalize_text(t) for t in TRAIN], PARAMS, seed=0)
    spam, spam2, ham = feats.transform(
        [
            normalize_text(t)
            for t in ("win a free prize now", "claim your free prize", "lunch tomorrow?")
        ]
    )
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    assert cos(spam, spam2) > cos(spam, ham)


def test_svd_width_is_capped_by_the_data_and_padded_to_svd_dim() -> None:
    params = TextFeatureParams(**{**PARAMS.__dict__, "svd_dim": 50})
    feats = TextFeaturizer.fit([normalize_text(t) for t in TRAIN[:3]], params, seed=0)
    out = feats.transform([normalize_text(t) for t in TRAIN])
    assert out.shape == (8, 50)
    assert feats.svd.n_components == 3
    assert not out[:, 3:].any()


def test_svd_is_seeded() -> None:
    texts = [normalize_text(t) for t in TRAIN]
    a = TextFeaturizer.fit(texts, PARAMS, seed=3).transform(texts)
    b = TextFeaturizer.fit(texts, PARAMS, seed=3).transform(texts)
    np.testing.assert_array_equal(a, b)


def test_embeddings_are_unit_length_and_zero_without_text(encoder: SentenceEncoder) -> None:
    texts = ["win a free prize", "", "see you at lunch"]
    emb = encoder.embed(texts, np.array([True, False, True]))
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb[[0, 2]], axis=1), 1.0, rtol=1e-5)
    assert not emb[1].any()


def test_obfuscated_ad_embeds_near_its_clean_version(encoder: SentenceEncoder) -> None:
    obfuscated = "W1N a FR££ prize, txt 0 8 0 0 to claim"
    clean = "Win a free prize, text 0800 to claim"
    ham = "Are we still meeting for lunch tomorrow?"
    emb = encoder.embed([normalize_text(t) for t in (obfuscated, clean, ham)], np.ones(3, bool))
    to_clean, to_ham = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert to_clean > to_ham + 0.2, (to_clean, to_ham)


def test_embeddings_do_not_depend_on_the_batch(encoder: SentenceEncoder) -> None:
    texts = [normalize_text(t) for t in TRAIN]
    batch = encoder.embed(texts, np.ones(len(texts), bool))
    alone = encoder.embed(texts[2:3], np.ones(1, bool))
    np.testing.assert_allclose(alone[0], batch[2], atol=1e-5)


def test_token_ids_are_wordpiece_ids_padded_with_zero(encoder: SentenceEncoder) -> None:
    tok = encoder.tokenizer
    long_text = normalize_text(" ".join(TRAIN))
    ids = encoder.token_ids(["win a prize", "", long_text])
    assert ids.shape == (3, 12) and ids.dtype == np.int32
    expected = tok("win a prize")["input_ids"]
    assert ids[0, : len(expected)].tolist() == expected
    assert not ids[0, len(expected) :].any()
    assert ids[1].tolist() == [tok.cls_token_id, tok.sep_token_id] + [0] * 10
    assert (ids[2] != 0).all() and ids[2, -1] == tok.sep_token_id
    assert encoder.vocab_size == tok.vocab_size


def test_resolve_embedder(tmp_path: Path) -> None:
    bundled = Path(resolve_embedder("bundled"))
    assert (bundled / "config.json").is_file()
    assert resolve_embedder(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_embedder("someone/some-model") == "someone/some-model"


def test_unloadable_embedder_fails_with_a_clear_message(tmp_path: Path) -> None:
    enc = SentenceEncoder(str(tmp_path / "no-such-model"), batch_size=2, max_seq_tokens=8)
    with pytest.raises(EmbedderError, match="featurize.text.embedder"):
        enc.embed(["hello"], np.ones(1, bool))


# --------------------------------------------------------------------------- margin columns

MARGINS = TextFeatureParams(**{**PARAMS.__dict__, "margins": ["char_svm", "word_lr"],
                               "margin_folds": 3})
LABELS = [1, 1, 1, 0, 0, 0, 0, 1]


def _many() -> tuple[list[str], np.ndarray]:
    """40 texts: the 8 above with a number appended, so folds have both classes."""
    texts = [normalize_text(f"{t} {k}") for k in range(5) for t in TRAIN]
    return texts, np.array(LABELS * 5)


def test_margin_columns_follow_the_svd_block_and_rank_ads_first() -> None:
    texts, y = _many()
    feats = TextFeaturizer.fit(texts, MARGINS, seed=0, labels=y)
    out = feats.transform([normalize_text("win a free prize call now"),
                           normalize_text("see you at lunch tomorrow")])
    assert out.shape == (2, 8) and feats.width == 8
    assert (out[0, 6:] > out[1, 6:]).all()  # both models: the ad scores above the clean text


def test_train_texts_get_out_of_fold_margins() -> None:
    texts, y = _many()
    feats = TextFeaturizer.fit(texts, MARGINS, seed=0, labels=y)
    in_sample = feats.transform(texts)[:, 6:]
    assert feats.oof_margins.shape == (40, 2)
    # Models that never saw a text are less sure of it than the one fitted on it.
    assert not np.allclose(feats.oof_margins, in_sample)
    sign = np.where(y == 1, 1.0, -1.0)[:, None]
    assert (sign * feats.oof_margins).mean() < (sign * in_sample).mean()


def test_texts_labelled_minus_one_stay_out_of_the_margin_fit() -> None:
    texts, y = _many()
    left_out = y.copy()
    left_out[:8] = -1  # the first copy of every text: like hidden image ads' captions
    feats = TextFeaturizer.fit(texts, MARGINS, seed=0, labels=left_out)
    # Left-out rows are scored by the models fitted on all the others, not out of fold.
    full = feats.transform(texts[:8])[:, 6:]
    np.testing.assert_allclose(feats.oof_margins[:8], full, rtol=1e-5, atol=1e-5)


def test_margins_need_labels_and_known_names() -> None:
    texts, y = _many()
    with pytest.raises(ValueError, match="need the labels"):
        TextFeaturizer.fit(texts, MARGINS, seed=0)
    bad = TextFeatureParams(**{**PARAMS.__dict__, "margins": ["bert_head"]})
    with pytest.raises(ValueError, match=r"unknown models \['bert_head'\]"):
        TextFeaturizer.fit(texts, bad, seed=0, labels=y)
    with pytest.raises(ValueError, match="40 texts but 3 labels"):
        TextFeaturizer.fit(texts, MARGINS, seed=0, labels=[0, 1, 0])


def test_one_class_leaves_the_margin_columns_zero() -> None:
    texts, _ = _many()
    feats = TextFeaturizer.fit(texts, MARGINS, seed=0, labels=np.zeros(40, int))
    assert not feats.transform(texts)[:, 6:].any()
    assert not feats.oof_margins.any()


def test_margin_models_survive_state_round_trip() -> None:
    texts, y = _many()
    feats = TextFeaturizer.fit(texts, MARGINS, seed=0, labels=y)
    again = TextFeaturizer.from_state(MARGINS, feats.state())
    np.testing.assert_array_equal(again.transform(texts), feats.transform(texts))


def test_the_contiguous_projection_gives_exactly_the_svd_transform() -> None:
    import scipy.sparse as sp

    texts, y = _many()
    feats = TextFeaturizer.fit(texts, MARGINS, seed=0, labels=y)
    stacked = sp.hstack([feats.word.transform(texts), feats.char.transform(texts)]).tocsr()
    expected = feats.svd.transform(stacked)
    np.testing.assert_array_equal(feats.transform(texts)[:, : expected.shape[1]], expected)
    assert feats.projection.flags["C_CONTIGUOUS"]
