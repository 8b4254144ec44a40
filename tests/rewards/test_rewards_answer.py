"""Answer metrics: SQuAD normalisation, EM/F1 over aliases, and the decided edge cases (empty predictions, gold
aliases that normalise to nothing). Extraction and the format rule are the segmenter's (tests/rollout)."""
import pytest

from stepsearch.rewards.answer import exact_match, f1_score, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("U.S.A.", "usa"),
        ("an apple a day", "apple day"),
        ("Theatre of the Absurd", "theatre of absurd"),
        ("  Café\tÜNÏCODE\n", "café ünïcode"),
        ("", ""),
        ("the a an", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_the_best_alias_and_normalises():
    assert exact_match("The Eiffel Tower.", ["eiffel tower", "la tour eiffel"]) == 1.0
    assert exact_match("Tour Eiffel", ["eiffel tower", "la tour eiffel"]) == 0.0
    assert exact_match("Paris", "paris") == 1.0  # a bare string is one alias
    assert exact_match(None, ["paris"]) == 0.0
    assert exact_match("paris", []) == 0.0


def test_f1_hand_computed():
    # [big, red, dog] vs [red, dog, barks]: 2 common, precision 2/3, recall 2/3 -> F1 2/3.
    assert f1_score("the big red dog", ["red dog barks"]) == pytest.approx(2 / 3)
    # [capital, of, france] vs [paris, capital]: 1 common, P = 1/3, R = 1/2 -> F1 = 2PR/(P+R) = 0.4.
    assert f1_score("capital of France", ["Paris capital"]) == pytest.approx(0.4)


def test_f1_counts_repeated_tokens_as_a_multiset():
    # Counter intersection {xx: 1, yy: 1}: 2 common of 3 each -> 2/3 (a set overlap would wrongly give 1.0).
    assert f1_score("xx xx yy", ["xx yy yy"]) == pytest.approx(2 / 3)


def test_f1_is_max_over_golds_and_zero_without_overlap():
    assert f1_score("red dog", ["blue cat", "red dog"]) == 1.0
    assert f1_score("red dog", ["blue cat"]) == 0.0
    assert f1_score(None, ["red dog"]) == 0.0
    assert f1_score("red dog", []) == 0.0


def test_gold_aliases_that_normalise_to_nothing_are_ignored():
    # "the" and "?" normalise to "": an empty prediction must not match them (EM 0, F1 0) ...
    assert exact_match("", ["the"]) == 0.0 and f1_score("", ["the"]) == 0.0
    assert exact_match("A", ["the", "?"]) == 0.0 and f1_score("the", ["?"]) == 0.0
    # ... and the other aliases still count.
    assert exact_match("Paris", ["the", "paris"]) == 1.0
    assert f1_score("Paris France", ["?", "paris"]) == pytest.approx(2 / 3)


def test_empty_prediction_scores_zero():
    assert exact_match("", ["paris"]) == 0.0 and f1_score("  ", ["paris"]) == 0.0


def test_unicode_answers():
    assert exact_match("Zürich", ["zürich"]) == 1.0
    assert f1_score("東京 タワー", ["東京"]) == pytest.approx(2 / 3)
