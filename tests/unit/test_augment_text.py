"""Training and held-out text families: disjoint, each changes text, the normaliser undoes
exactly the ones it should."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from adfilter.augment import heldout, images, text
from adfilter.augment.heldout import IMAGE_FAMILIES, TEXT_FAMILIES
from adfilter.augment.text import FAMILIES, AugmentError, Obfuscator, build_nltk_data, check_names
from adfilter.config import ObfuscationParams
from adfilter.features.textnorm import normalize_text

AD = ("WINNER!! As a valued network customer you have been selected to receive a 900 prize "
      "reward. Call 09061701461 or visit www.getzed.co.uk to claim")
CLEAN = "Sorry I will call you later, meeting at 5 with the team"


def _imports(module) -> set[str]:
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_training_and_heldout_families_share_no_name_and_no_code():
    assert not set(FAMILIES) & set(TEXT_FAMILIES)
    assert not set(images.TRANSFORMS) & set(IMAGE_FAMILIES)
    train_funcs = {f.apply for f in FAMILIES.values()}
    held_funcs = {f.apply for f in TEXT_FAMILIES.values()}
    assert not train_funcs & held_funcs
    # The held-out module never imports the training modules, nor they it.
    assert not {m for m in _imports(heldout) if m.startswith("adfilter.augment")}
    assert "adfilter.augment.heldout" not in _imports(text)
    assert "adfilter.augment.heldout" not in _imports(images)


def test_training_and_heldout_families_insert_disjoint_characters():
    train_chars = set().union(*(f.alphabet for f in FAMILIES.values()))
    held_chars = set().union(*(f.alphabet for f in TEXT_FAMILIES.values()))
    assert train_chars and held_chars
    assert not train_chars & held_chars
    # The alphabets are honest: what a family emits beyond ASCII is in its alphabet.
    for family in FAMILIES.values():
        for seed in range(5):
            out = family.apply(AD, random.Random(seed), 0.5)
            assert {c for c in out if not c.isascii()} <= family.alphabet, family.name
    for family in TEXT_FAMILIES.values():
        out = family.apply(AD, random.Random(0))
        assert {c for c in out if not c.isascii()} <= family.alphabet, family.name


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_training_family_changes_text_and_normaliser_undoes_the_ones_it_should(name):
    family = FAMILIES[name]
    assert family.applies(AD)
    for seed in range(8):
        out = family.apply(AD, random.Random(seed), 0.35)
        assert out != AD
        undone = normalize_text(out) == normalize_text(AD)
        assert undone == family.undone_by_normalize, (name, out, normalize_text(out))


@pytest.mark.parametrize("name", sorted(TEXT_FAMILIES))
def test_each_heldout_family_changes_text_and_normaliser_undoes_the_ones_it_should(name):
    family = TEXT_FAMILIES[name]
    for seed in range(8):
        out = family.apply(AD, random.Random(seed))
        assert out != AD
        assert (normalize_text(out) == normalize_text(AD)) == family.undone_by_normalize, (name, out)


def test_families_that_need_digits_or_links_say_so():
    assert not FAMILIES["spaced_digits"].applies(CLEAN.replace("5", "five"))
    assert not FAMILIES["dot_spelled"].applies(CLEAN)
    assert FAMILIES["dot_spelled"].applies("see example.com")


def _obfuscation(**kw) -> ObfuscationParams:
    base = dict(families={n: 1.0 for n in FAMILIES}, max_families=3, rate=0.35, max_attempts=4)
    base.update(kw)
    return ObfuscationParams(**base)


def test_obfuscator_never_returns_what_normalises_back_and_is_seeded():
    ob = Obfuscator(_obfuscation())
    outs = [ob.variant(t, random.Random(s)) for t in (AD, CLEAN) for s in range(20)]
    for t, result in zip([AD] * 20 + [CLEAN] * 20, outs, strict=True):
        assert result is not None
        variant, chosen = result
        assert chosen and set(chosen) <= set(FAMILIES)
        assert normalize_text(variant) != normalize_text(t)
    assert ob.variant(AD, random.Random(3)) == ob.variant(AD, random.Random(3))


def test_obfuscator_gives_up_when_only_undone_families_are_allowed():
    ob = Obfuscator(_obfuscation(families={"fullwidth": 1.0, "mixed_script": 1.0}))
    assert ob.variant(AD, random.Random(0)) is None


def test_unknown_family_names_the_params_key():
    with pytest.raises(AugmentError, match="augment.obfuscation.families.*nope"):
        Obfuscator(_obfuscation(families={"nope": 1.0}))
    with pytest.raises(AugmentError, match="negative"):
        check_names({"fullwidth": -1.0}, FAMILIES, "augment.obfuscation.families")


def test_nltk_stopwords_corpus_is_built_not_downloaded(tmp_path):
    root = build_nltk_data(tmp_path)
    words = (root / "corpora" / "stopwords" / "english").read_text().split()
    assert {"the", "and", "you"} <= set(words)
    assert len(words) == len(set(words)) > 100
