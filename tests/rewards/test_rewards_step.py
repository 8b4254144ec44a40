"""Step reward: TF-IDF cosine against scikit-learn, and G^t / P^t with memory and redundancy, computed by hand."""
import math
import random

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

from stepsearch.rewards.answer import normalize_answer
from stepsearch.rewards.step import step_rewards, step_rewards_group, tfidf_cosine, tfidf_cosine_batch

WORDS = ["alpha", "beta", "gamma", "delta", "the", "a", "an", "x", "42", "U.S.A.", "well-known", "Paris,"]
UNICODE_WORDS = [
    "Éclair", "naïve", "東京", "über", "STRASSE", "straße", "İstanbul", "ﬁne", "Ωmega", "日本語", "ÅÄÖ", "—",
    "«quoted»",
    "ǅemal", "ΣΊΣΥΦΟΣ", "x̃y",
]


def sklearn_cosine(doc, golden):
    matrix = TfidfVectorizer().fit_transform([normalize_answer(text) for text in [doc, *golden]])
    return cosine_similarity(matrix[:1], matrix[1:])[0]


def random_text(rng, words):
    return " ".join(rng.choice(words) for _ in range(rng.randint(0, 25)))


@pytest.mark.parametrize("words", [WORDS, UNICODE_WORDS, WORDS + UNICODE_WORDS], ids=["ascii", "unicode", "mixed"])
def test_tfidf_cosine_equals_sklearn_on_random_texts(words):
    rng = random.Random(1234)
    compared = 0
    for _ in range(150):
        doc = random_text(rng, words)
        golden = [random_text(rng, words) for _ in range(rng.randint(1, 4))]
        try:
            expected = sklearn_cosine(doc, golden)
        except ValueError:  # scikit-learn rejects an all-empty vocabulary; ours scores 0
            assert tfidf_cosine(doc, golden) == [0.0] * len(golden)
            continue
        np.testing.assert_allclose(tfidf_cosine(doc, golden), expected, rtol=0, atol=1e-9)
        compared += 1
    assert compared > 100


def test_tfidf_hand_computed():
    # Fitted on {"xx yy", "xx zz"}: N = 2, idf(xx) = ln(3/3) + 1 = 1, idf(yy) = idf(zz) = ln(3/2) + 1 = a.
    # doc = (1, a, 0), golden = (1, 0, a) -> cosine = 1 / (1 + a^2).
    a = math.log(1.5) + 1
    assert tfidf_cosine("xx yy", ["xx zz"]) == pytest.approx([1 / (1 + a * a)], abs=1e-12)
    assert tfidf_cosine("Paris, France!", ["the paris france"]) == pytest.approx([1.0], abs=1e-12)


def test_tfidf_idf_is_refitted_per_document():
    # The golden docs' norms depend on which doc joined the fit, so the batch must not share one IDF across rows.
    golden = ["alpha beta beta gamma", "beta delta"]
    docs = ["alpha delta", "gamma gamma epsilon", "beta"]
    batch = tfidf_cosine_batch(docs, golden)
    assert batch.shape == (3, 2)
    for row, doc in zip(batch, docs):
        np.testing.assert_allclose(row, sklearn_cosine(doc, golden), rtol=0, atol=1e-9)


def test_tfidf_empty_sides():
    assert tfidf_cosine("", ["alpha beta"]) == [0.0]
    with_empty_golden = ["", "alpha"]
    expected = sklearn_cosine("alpha beta", with_empty_golden)
    assert tfidf_cosine("alpha beta", with_empty_golden) == pytest.approx(list(expected), abs=1e-12)
    assert expected[0] == 0.0
    assert tfidf_cosine("", [""]) == [0.0]
    assert tfidf_cosine("alpha", []) == []
    assert tfidf_cosine_batch([], ["alpha"]).shape == (0, 1)


def test_tfidf_duplicate_golden_docs_count_twice_in_document_frequency():
    golden = ["alpha beta", "alpha beta", "gamma"]
    np.testing.assert_allclose(tfidf_cosine("alpha gamma", golden), sklearn_cosine("alpha gamma", golden), atol=1e-9)


GOLDEN = ["Paris France", "Berlin Germany"]
PARIS, BERLIN, TOKYO = ("d1", "Paris, France."), ("d3", "Berlin Germany"), ("d2", "Tokyo Japan")


def test_step_rewards_hand_computed_memory_and_redundancy():
    # Cosines (n = 2): PARIS -> (1, 0), BERLIN -> (0, 1), TOKYO -> (0, 0).
    # t=1 D={PARIS, TOKYO}:  c = (1, 0), G = (1 + 0)/2 = 0.5, P = 0,   m = (1, 0)
    # t=2 D={PARIS, BERLIN}: c = (1, 1), G = (0 + 1)/2 = 0.5, P = 1/2, m = (1, 1)
    # t=3 D={PARIS}:         c = (1, 0), G = 0 (memory),      P = 1
    gains, penalties = step_rewards([[PARIS, TOKYO], [PARIS, BERLIN], [PARIS]], GOLDEN)
    assert gains == pytest.approx([0.5, 0.5, 0.0], abs=1e-12)
    assert penalties == pytest.approx([0.0, 0.5, 1.0])


def test_step_rewards_partial_similarity_and_gain_only_above_memory():
    # golden "xx zz"; "xx yy" has cosine s = 1/(1 + a^2), a = ln(3/2) + 1 (see test_tfidf_hand_computed).
    # t=1 "xx yy": G = s, m = s.  t=2 "xx zz": G = 1 - s, m = 1.  t=3 "xx yy" (new id): G = 0, P = 0.
    a = math.log(1.5) + 1
    similarity = 1 / (1 + a * a)
    gains, penalties = step_rewards([[("p", "xx yy")], [("q", "xx zz")], [("r", "xx yy")]], ["xx zz"])
    assert gains == pytest.approx([similarity, 1 - similarity, 0.0], abs=1e-12)
    assert penalties == [0.0, 0.0, 0.0]


def test_coverage_is_max_over_the_round_not_mean():
    # One perfect and one useless doc in the same round: c = 1 (a mean would give 0.5).
    gains, _ = step_rewards([[("a", "xx zz"), ("b", "qq rr")]], ["xx zz"])
    assert gains == pytest.approx([1.0])


def test_duplicates_within_a_round_are_not_redundant_but_every_earlier_copy_is():
    # t=1: d1 twice -> P = 0.  t=2: d1, d1, d4 -> 2 of 3 entries seen earlier -> P = 2/3.
    _, penalties = step_rewards([[PARIS, PARIS], [PARIS, PARIS, ("d4", "Rome")]], GOLDEN)
    assert penalties == pytest.approx([0.0, 2 / 3])


def test_redundancy_identity_doc_id_versus_text():
    # Same normalised text under two ids: redundant by text, not by id.
    rounds = [[("d1", "Paris, France.")], [("d9", "paris france")]]
    assert step_rewards(rounds, GOLDEN, redundancy_identity="doc_id")[1] == [0.0, 0.0]
    assert step_rewards(rounds, GOLDEN, redundancy_identity="text")[1] == [0.0, 1.0]
    # Same id, different text: redundant by id only.
    rounds = [[("d1", "Paris")], [("d1", "Berlin")]]
    assert step_rewards(rounds, GOLDEN, redundancy_identity="doc_id")[1] == [0.0, 1.0]
    assert step_rewards(rounds, GOLDEN, redundancy_identity="text")[1] == [0.0, 0.0]


def test_no_golden_docs_gives_all_zeros():
    assert step_rewards([[PARIS], [PARIS]], []) == ([0.0, 0.0], [0.0, 0.0])


def test_empty_rounds_and_no_rounds():
    gains, penalties = step_rewards([[], [PARIS], []], GOLDEN)
    assert gains == pytest.approx([0.0, 0.5, 0.0]) and penalties == [0.0, 0.0, 0.0]
    assert step_rewards([], GOLDEN) == ([], [])


def test_unicode_and_empty_texts():
    rounds = [[("u", "")], [("v", "東京タワー 日本")]]
    gains, penalties = step_rewards(rounds, ["東京タワー 日本", "Zürich"])
    assert gains == pytest.approx([0.0, 0.5]) and penalties == [0.0, 0.0]


def test_group_equals_per_trajectory():
    rng = random.Random(7)
    golden = [random_text(rng, WORDS) for _ in range(3)]
    trajectories = [
        [[(f"id{rng.randint(0, 6)}", random_text(rng, WORDS)) for _ in range(3)] for _ in range(rng.randint(0, 4))]
        for _ in range(6)
    ]
    for identity in ("doc_id", "text"):
        grouped = step_rewards_group(trajectories, golden, identity)
        assert grouped == [step_rewards(rounds, golden, identity) for rounds in trajectories]


def test_unknown_redundancy_identity_is_rejected():
    with pytest.raises(ValueError, match="redundancy_identity"):
        step_rewards([[PARIS]], GOLDEN, redundancy_identity="title")
